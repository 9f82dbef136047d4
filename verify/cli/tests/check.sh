#!/usr/bin/env bash
# nsa-verify check: a candidate made by `run` passes (table, JSON, JUnit, row-sampled, baseline-relative), an
# independent implementation's fixtures pass, a wrong candidate fails naming its stage, bad input exits 2.
# Usage: check.sh <nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shape=(--batch 2 --seqlen 70 --heads-q 4 --heads-kv 2 --dim-k 16 --dim-v 8 --block-size 16 --block-count 3 --window 8)
"$bin" gen "${shape[@]}" --dtype f32 --with-grads --seed 1 -o "$work/in.safetensors" >/dev/null || fail "gen"
"$bin" run -i "$work/in.safetensors" -o "$work/out.safetensors" >/dev/null || fail "run"

# The reference's own outputs pass, every stage listed; the reports are written.
expect 0 'PASS: every stage agrees' -- "$bin" check --expected "$work/in.safetensors" --actual "$work/out.safetensors" \
  --json "$work/check.json" --junit "$work/check.xml"
expect 0 '^dk_cmp +backward .*PASS$' -- "$bin" check --expected "$work/in.safetensors" --actual "$work/out.safetensors"
expect 0 '^block_indices +topk +rows 280: exact set 100.00%, tie rows 0, bad rows 0' -- \
  "$bin" check --expected "$work/in.safetensors" --actual "$work/out.safetensors"
grep -q '"first_failing_stage": null' "$work/check.json" || fail "JSON report: $(cat "$work/check.json")"
grep -q '"name": "dq"' "$work/check.json" || fail "JSON report lacks dq"
grep -q 'tests="1" failures="0"' "$work/check.xml" || fail "JUnit report: $(cat "$work/check.xml")"

# Row-sampled and baseline-relative modes.
expect 0 '5 sampled query rows \(forward only\)' -- "$bin" check --expected "$work/in.safetensors" \
  --actual "$work/out.safetensors" --sample-rows 5 --seed 3
expect 0 'baseline-relative' -- "$bin" check --expected "$work/in.safetensors" --actual "$work/out.safetensors" --baseline-relative

# bf16 inputs, varlen with an empty sequence, head-first layout, given indices and block counts.
"$bin" gen --varlen 45,0,33 --heads-q 3 --heads-kv 1 --dim-k 8 --dim-v 12 --block-size 16 --block-count 2 --window 5 \
  --dtype bf16 --with-grads --layout bhtd --given-indices --block-counts --seed 2 -o "$work/bf16.safetensors" >/dev/null ||
  fail "gen bf16"
"$bin" run -i "$work/bf16.safetensors" -o "$work/bf16-out.safetensors" >/dev/null || fail "run bf16"
expect 0 'candidate dtype bf16' -- "$bin" check --expected "$work/bf16.safetensors" --actual "$work/bf16-out.safetensors"
expect 0 'repeat the given selection on 78, differ on 0' -- "$bin" check --expected "$work/bf16.safetensors" \
  --actual "$work/bf16-out.safetensors"

# An independent implementation (paper policy, float32, lse_cmp = -inf on rows without a visible block).
for peer in "$src"/fixtures/peer/*.safetensors; do
  expect 0 'PASS: every stage agrees' -- "$bin" check --expected "$peer" --actual "$peer"
done

# A candidate computed from other inputs fails, and the first failing stage is named.
"$bin" gen "${shape[@]}" --dtype f32 --with-grads --seed 2 -o "$work/other.safetensors" >/dev/null || fail "gen other"
expect 1 'FAIL: first failing stage: mean_pool: k_cmp rel_l2' -- "$bin" check --expected "$work/other.safetensors" \
  --actual "$work/out.safetensors" --junit "$work/fail.xml"
grep -q 'failures="1"' "$work/fail.xml" || fail "JUnit report of a failure: $(cat "$work/fail.xml")"
grep -q '<failure message="first failing stage: mean_pool' "$work/fail.xml" || fail "JUnit failure message"
# A loose --rtol does not hide a candidate computed from other inputs.
expect 1 'first failing stage' -- "$bin" check --expected "$work/other.safetensors" --actual "$work/out.safetensors" --rtol 0.5

# Bad input: exit 2 with one line naming the file and the problem.
expect 2 "missing.safetensors" -- "$bin" check --expected "$work/missing.safetensors" --actual "$work/out.safetensors"
expect 2 "missing.safetensors" -- "$bin" check --expected "$work/in.safetensors" --actual "$work/missing.safetensors"
expect 2 'nsa.block_size = 16 differs from the configuration in use \(32\)' -- "$bin" check \
  --expected "$work/in.safetensors" --actual "$work/out.safetensors" --block-size 32
expect 2 'holds none of the output tensors' -- "$bin" check --expected "$work/in.safetensors" --actual "$work/in.safetensors"
expect 2 '--actual is required' -- "$bin" check --expected "$work/in.safetensors"
expect 0 'Examples:' -- "$bin" check --help

finish
