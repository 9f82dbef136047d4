#!/usr/bin/env bash
# nsa-verify gen and inspect: shapes, determinism, the pinned checksum, metadata, and error messages.
# Usage: gen_inspect.sh <nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Explicit shapes, varlen with an empty sequence, gates, gradients.
expect 0 'varlen=100,0,257' -- "$bin" gen --varlen 100,0,257 --heads-q 4 --heads-kv 2 --dim-k 32 --dim-v 16 \
  --dtype f16 --with-grads --block-size 32 --seed 5 -o "$work/a.safetensors"
expect 0 'q +f16 +\[1, 357, 4, 32\]' -- "$bin" inspect "$work/a.safetensors"
expect 0 'v +f16 +\[1, 357, 2, 16\]' -- "$bin" inspect "$work/a.safetensors"
expect 0 'do +f16 +\[1, 357, 4, 16\]' -- "$bin" inspect "$work/a.safetensors"
expect 0 'cu_seqlens +i32 +\[4\] +0 +357 ' -- "$bin" inspect "$work/a.safetensors"
expect 0 'g_swa +f16 +\[1, 357, 4\] +0\.[0-9]+ +0\.[0-9]+' -- "$bin" inspect "$work/a.safetensors"
expect 0 'nsa.generator +philox4x32-10/box-muller' -- "$bin" inspect "$work/a.safetensors"
expect 0 'nsa.seed +5$' -- "$bin" inspect "$work/a.safetensors"
expect 0 'nsa.block_size +32$' -- "$bin" inspect "$work/a.safetensors"
expect 0 'problem: B=1 T=357 HQ=4 H=2 G=2 K=32 V=16 BS=32 S=16 W=0' -- "$bin" inspect "$work/a.safetensors"

# Same seed, same bytes; another seed, other bytes.
"$bin" gen --varlen 100,0,257 --heads-q 4 --heads-kv 2 --dim-k 32 --dim-v 16 --dtype f16 --with-grads \
  --block-size 32 --seed 5 -o "$work/b.safetensors" >/dev/null
cmp -s "$work/a.safetensors" "$work/b.safetensors" || fail "same seed gave different files"
"$bin" gen --varlen 100,0,257 --heads-q 4 --heads-kv 2 --dim-k 32 --dim-v 16 --dtype f16 --with-grads \
  --block-size 32 --seed 6 -o "$work/c.safetensors" >/dev/null
cmp -s "$work/a.safetensors" "$work/c.safetensors" && fail "different seeds gave the same file"

# The pinned seed: checksums from scripts/philox_reference.py, an independent implementation of the mapping.
"$bin" gen --seqlen 21 --heads-q 4 --heads-kv 2 --dim-k 8 --dim-v 6 --dtype f32 --seed 20261126 --with-grads \
  --block-size 8 --block-count 3 -o "$work/pinned.safetensors" >/dev/null
expect 0 'q +f32 +\[1, 21, 4, 8\] .* 1e338735e1b11898$' -- "$bin" inspect "$work/pinned.safetensors"
expect 0 'do +f32 +\[1, 21, 4, 6\] .* 658dd0566ed61272$' -- "$bin" inspect "$work/pinned.safetensors"
expect 0 'g_cmp +f32 +\[1, 21, 4\] .* ab6670892cff7531$' -- "$bin" inspect "$work/pinned.safetensors"
# Read from a pipe (no size known in advance): the same tensors and checksums as from the file.
expect 0 'q +f32 +\[1, 21, 4, 8\] .* 1e338735e1b11898$' -- "$bin" inspect <(cat "$work/pinned.safetensors")
expect 0 'g_cmp +f32 +\[1, 21, 4\] .* ab6670892cff7531$' -- "$bin" inspect <(cat "$work/pinned.safetensors")

# Head-first layout, presets, given indices, block counts, gate selection, no gates.
expect 0 'bhtd' -- "$bin" gen --preset tiny --layout bhtd -o "$work/h.safetensors"
expect 0 'q +f32 +\[1, 4, 37, 16\]' -- "$bin" inspect "$work/h.safetensors"
expect 0 'nsa.layout +bhtd' -- "$bin" inspect "$work/h.safetensors"
expect 0 'given_indices' -- "$bin" gen --preset tiny --block-count 4 --given-indices --block-counts -o "$work/g.safetensors"
expect 0 'nsa.given_indices +1$' -- "$bin" inspect "$work/g.safetensors"
expect 0 'block_indices +i32 +\[1, 37, 2, 4\] +-1 +2 ' -- "$bin" inspect "$work/g.safetensors"
expect 0 'block_counts +i32 +\[1, 37, 2\] +0 +4 ' -- "$bin" inspect "$work/g.safetensors"
"$bin" gen --preset tiny --gates cmp -o "$work/cmp.safetensors" >/dev/null
"$bin" inspect "$work/cmp.safetensors" | grep -Eq '^  (g_slc|g_swa) ' && fail "--gates cmp wrote other gates"
"$bin" gen --preset tiny --no-gates -o "$work/none.safetensors" >/dev/null
"$bin" inspect "$work/none.safetensors" | grep -Eq '^  g_' && fail "--no-gates wrote gates"

# Inspect's JSON and statistics of non-finite values.
expect 0 'nsa.generator' -- "$bin" inspect "$work/g.safetensors" --json "$work/g.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d[0]['tensors'] and d[0]['metadata']['nsa.seed']=='0'" \
  "$work/g.json" || fail "inspect --json is not the expected JSON"
python3 - "$work/nan.safetensors" <<'PY'
import json, struct, sys
data = struct.pack("<4f", 1.0, float("nan"), float("inf"), -3.0)
header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
header += b" " * (-len(header) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(header)) + header + data)
PY
expect 0 'x +f32 +\[4\] +-3 +1 +-1 +1 +1 ' -- "$bin" inspect "$work/nan.safetensors"
expect 0 'not a loadable NSA problem' -- "$bin" inspect "$work/nan.safetensors"

# The float64 reference outputs.
expect 0 'with f64 reference outputs' -- "$bin" gen --preset tiny --with-grads --reference -o "$work/r.safetensors"
expect 0 'nsa.reference_precision +f64' -- "$bin" inspect "$work/r.safetensors"
expect 0 '^  o +f32 +\[1, 37, 4, 16\]' -- "$bin" inspect "$work/r.safetensors"
expect 0 '^  dk_cmp +f32 +\[1, 3, 2, 16\]' -- "$bin" inspect "$work/r.safetensors"

# Bad input: one line naming the problem, exit code 2, no output file.
expect 2 'not a multiple of --heads-kv' -- "$bin" gen --heads-q 6 --heads-kv 4 -o "$work/bad.safetensors"
expect 2 'needs --batch 1' -- "$bin" gen --varlen 3,4 --batch 2 -o "$work/bad.safetensors"
expect 2 'block size must be positive' -- "$bin" gen --block-size 0 -o "$work/bad.safetensors"
expect 2 'unknown|not in|dtype' -- "$bin" gen --dtype i32 -o "$work/bad.safetensors"
expect 2 '-o FILE is required' -- "$bin" gen --seqlen 10
[ -e "$work/bad.safetensors" ] && fail "a failed gen left an output file"
head -c 50 "$work/a.safetensors" >"$work/truncated.safetensors"
expect 2 'truncated.safetensors' -- "$bin" inspect "$work/truncated.safetensors"

finish
