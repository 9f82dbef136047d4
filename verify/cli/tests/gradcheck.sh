#!/usr/bin/env bash
# nsa-verify gradcheck: the reference passes on the named shapes, shape flags and fixtures (directional and
# elementwise), writes JSON, fails (exit 1) under an impossible bound, and exits 2 on bad input.
# Usage: gradcheck.sh <nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Every named shape, random directions: a row per input with its error, the bound and PASS.
expect 0 '^gradcheck: 7 cases, all inputs within bound$' -- "$bin" gradcheck
expect 0 '^  q +3 +[0-9]\.[0-9]+e-(09|1[0-9]) +1\.0e-07  PASS$' -- "$bin" gradcheck --preset window
expect 0 '^  g_swa +3 .*PASS$' -- "$bin" gradcheck --preset counts --json "$work/grad.json"
grep -q '"pass": true' "$work/grad.json" || fail "JSON report: $(cat "$work/grad.json")"
grep -q '"input": "g_cmp"' "$work/grad.json" || fail "JSON report lacks g_cmp"

# Elementwise on a tiny shape: one check per element (q: 24 tokens x 5 heads x 6 dims).
expect 0 '^  q +720 .*PASS$' -- "$bin" gradcheck --preset g5 --elementwise
expect 0 'elementwise' -- "$bin" gradcheck --varlen 5,0,7 --heads-q 3 --heads-kv 1 --dim-k 3 --dim-v 2 \
  --block-size 2 --block-count 2 --window 2 --elementwise --threads 1

# Shape flags and configuration overrides.
expect 0 '^gradcheck custom: backend cpu, random directions.*PASS$' -- "$bin" gradcheck --varlen 9,0,20 \
  --heads-q 6 --heads-kv 2 --dim-k 8 --dim-v 4 --block-size 4 --window 3 --policy paper --directions 5 --seed 4

# Fixtures, with and without `do`.
"$bin" gen --seqlen 30 --heads-q 4 --heads-kv 2 --dim-k 8 --dim-v 8 --block-size 8 --block-count 2 --dtype f64 \
  --with-grads --seed 2 -o "$work/grads.safetensors" >/dev/null || fail "gen with grads"
expect 0 'all inputs within bound' -- "$bin" gradcheck -i "$work/grads.safetensors"
"$bin" gen --seqlen 30 --heads-q 4 --heads-kv 2 --dim-k 8 --dim-v 8 --block-size 8 --block-count 2 --dtype f32 \
  --seed 2 -o "$work/plain.safetensors" >/dev/null || fail "gen without grads"
expect 0 'all inputs within bound' -- "$bin" gradcheck -i "$work/plain.safetensors" --block-size 4

# A bound no finite difference can meet fails with exit 1 and says where.
expect 1 'FAIL +\(worst: direction [0-9]' -- "$bin" gradcheck --preset g1 --bound 1e-15

# Bad input and usage: exit 2 with one line naming the problem.
expect 2 'error: .*missing\.safetensors' -- "$bin" gradcheck -i "$work/missing.safetensors"
expect 2 'excludes --preset' -- "$bin" gradcheck -i "$work/grads.safetensors" --preset g1
expect 2 '--preset' -- "$bin" gradcheck --preset nope
expect 2 'step must be positive' -- "$bin" gradcheck --preset g1 --step 0
expect 2 'cu_seqlens|varlen' -- "$bin" gradcheck --varlen 4,4 --batch 2
expect 2 'error' -- "$bin" gradcheck --preset g1 --backend nope
expect 0 'Examples' -- "$bin" gradcheck --help

finish
