#!/usr/bin/env bash
# nsa-verify bench: the cpu backend times every forward stage of a small shape and the backward (--backward),
# and writes JSON with the FLOP count of each; bad shapes and an unavailable cuda backend exit 2 with one error
# line.
# Usage: bench.sh <path-to-nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# T=256, HQ=2, H=1, K=V=16, BS=32, S=2, W=8: compressed FLOP = 2*HQ*(K+V) * sum_t floor((t+1)/32)
# = 128 * (32 * (1+...+7) + 8) = 128 * 904 = 115712.
invoke bench --backend cpu --seqlen 256 --heads-q 2 --heads-kv 1 --dim-k 16 --dim-v 16 --block-size 32 \
  --block-count 2 --window 8 --warmup 0 --iters 1 --threads 1 --backward --json "$work/b.json"
[ "$rc" -eq 0 ] || fail "cpu bench exited $rc: $(head -c 300 "$work/stderr")"
for stage in mean_pool compressed_attention topk selected_attention sliding_window gate full_forward gate_backward \
  selected_attention_backward sliding_window_backward compressed_attention_backward mean_pool_backward backward; do
  grep -q "^$stage " "$work/stdout" || fail "stage $stage missing from the table"
done
python3 - "$work/b.json" <<'PY' || fail "JSON report wrong"
import json, sys
r = json.load(open(sys.argv[1]))
stages = {s["name"]: s for s in r["stages"]}
assert r["backend"] == "cpu" and r["shape"]["T"] == 256, r
assert stages["compressed_attention"]["flop"] == 115712, stages["compressed_attention"]
assert all(s["ms"] > 0 for s in r["stages"]), r["stages"]
forward = [n for n in stages if not n.endswith("backward") and n != "full_forward"]
backward = [n for n in stages if n.endswith("_backward")]
assert abs(stages["full_forward"]["flop"] - sum(stages[n]["flop"] for n in forward)) < 1
assert abs(stages["backward"]["flop"] - sum(stages[n]["flop"] for n in backward)) < 1
# K = V: each attention branch's backward has five products against its forward's two per (row, key).
for n in ("compressed_attention", "selected_attention", "sliding_window"):
    assert abs(stages[n + "_backward"]["flop"] - 2.5 * stages[n]["flop"]) < 1, (n, stages[n + "_backward"])
PY

# Bad input: HQ not a multiple of H.
invoke bench --backend cpu --seqlen 64 --heads-q 3 --heads-kv 2
[ "$rc" -eq 2 ] || fail "HQ % H != 0: exit $rc, expected 2"
grep -q "not a multiple of --heads-kv" "$work/stderr" || fail "HQ % H != 0: message: $(cat "$work/stderr")"

# The cuda backend without a device (or without CUDA in the build) is an input error, not a crash.
if ! nvidia-smi -L >/dev/null 2>&1; then
  invoke bench --backend cuda --seqlen 64 --heads-q 2 --heads-kv 1 --dim-k 16 --dim-v 16
  [ "$rc" -eq 2 ] || fail "cuda without a device: exit $rc, expected 2 ($(cat "$work/stderr"))"
  [ "$(wc -l <"$work/stderr")" -eq 1 ] || fail "cuda without a device: expected one error line, got: $(cat "$work/stderr")"
  invoke bench --backend cuda --seqlen 64 --heads-q 2 --heads-kv 1 --dim-k 16 --dim-v 16 --no-sm90-kernels
  [ "$rc" -eq 2 ] || fail "cuda --no-sm90-kernels without a device: exit $rc, expected 2 ($(cat "$work/stderr"))"
  invoke bench --backend cuda --seqlen 64 --heads-q 2 --heads-kv 1 --dim-k 16 --dim-v 16 --smem-limit-kb 99
  [ "$rc" -eq 2 ] || fail "cuda --smem-limit-kb without a device: exit $rc, expected 2 ($(cat "$work/stderr"))"
fi

# A shared-memory limit outside [16, 1024] KB is refused before anything runs.
invoke bench --backend cpu --seqlen 64 --heads-q 2 --heads-kv 1 --smem-limit-kb 8
[ "$rc" -eq 2 ] || fail "--smem-limit-kb 8: exit $rc, expected 2"
grep -q "smem-limit-kb: Value 8 not in range 16 to 1024" "$work/stderr" || fail "--smem-limit-kb 8: message: $(cat "$work/stderr")"

finish
