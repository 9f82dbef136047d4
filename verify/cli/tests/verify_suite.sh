#!/usr/bin/env bash
# nsa-verify verify: the CPU backend over the committed golden suite (with the stored reference outputs checked
# against a fresh reference run), reports, filter and shard, and the failures it must catch.
# Usage: verify_suite.sh <nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cases=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['cases']))" "$src/fixtures/manifest.json")

# The whole suite, as CI runs it.
out="$("$bin" verify --backend cpu --check-stored --suite "$src/fixtures" --threads 2 --json "$work/r.json" --junit "$work/r.xml" 2>&1)"
rc=$?
echo "$out"
[ "$rc" -eq 0 ] || fail "verify over the golden suite exited $rc"
grep -Eq "^verify: $cases cases, $((2 * cases)) checks: $((2 * cases)) passed, 0 failed, 0 bad input" <<<"$out" ||
  fail "summary does not count $cases cases with their stored-output checks"
[ "$(grep -c '^PASS ' <<<"$out")" -eq $((2 * cases)) ] || fail "expected $((2 * cases)) PASS lines"
python3 -c "import json,sys; json.load(open(sys.argv[1]))" "$work/r.json" || fail "--json did not write JSON"
python3 -c "import sys, xml.etree.ElementTree as E; E.parse(sys.argv[1])" "$work/r.xml" || fail "--junit did not write XML"

# The default suite is found from the source directory.
(cd "$src" && "$bin" verify --backend cpu --filter fixed_t1 >"$work/default.txt" 2>&1) || fail "default suite: $(cat "$work/default.txt")"
grep -q '^PASS  fixed_t1 ' "$work/default.txt" || fail "default suite did not run fixed_t1"

# Filter and shard select cases; shards partition the selection.
expect 0 '^verify: 2 cases' -- "$bin" verify --suite "$src/fixtures" --filter 'fixed_s1_*'
n0=$("$bin" verify --suite "$src/fixtures" --filter varlen --shard 0/2 | grep -c '^PASS ')
n1=$("$bin" verify --suite "$src/fixtures" --filter varlen --shard 1/2 | grep -c '^PASS ')
nall=$("$bin" verify --suite "$src/fixtures" --filter varlen | grep -c '^PASS ')
[ "$nall" -ge 2 ] && [ $((n0 + n1)) -eq "$nall" ] || fail "shards 0/2 + 1/2 ($n0 + $n1) do not cover the filter ($nall)"

# Row-sampled verification of the forward.
expect 0 '^PASS  bhtd_layout ' -- "$bin" verify --suite "$src/fixtures" --filter bhtd_layout --sample-rows 17 --seed 3 --check-stored

# A stored reference output that drifted is caught (exit 1) ...
cp "$src/fixtures/golden/fixed_g1_f32.safetensors" "$work/drift.safetensors"
python3 - "$work/drift.safetensors" <<'PY'
import json, struct, sys
path = sys.argv[1]
raw = bytearray(open(path, "rb").read())
n = struct.unpack("<Q", raw[:8])[0]
begin, end = json.loads(raw[8:8 + n])["o"]["data_offsets"]
at = 8 + n + begin + (end - begin) // 2 // 4 * 4          # one float32 in the middle of `o`
value = struct.unpack("<f", raw[at:at + 4])[0]
raw[at:at + 4] = struct.pack("<f", value + 0.5)
open(path, "wb").write(raw)
PY
expect 1 '^FAIL  drift/stored ' -- "$bin" verify --check-stored "$work/drift.safetensors"
expect 0 '^PASS  drift ' -- "$bin" verify "$work/drift.safetensors"   # the backend itself is fine

# ... and a fixture that no longer matches its manifest is bad input (exit 2).
mkdir -p "$work/suite/golden"
cp "$src/fixtures/manifest.json" "$work/suite/"
cp "$src"/fixtures/golden/*.safetensors "$work/suite/golden/"
cp "$work/drift.safetensors" "$work/suite/golden/fixed_g1_f32.safetensors"
expect 2 '^ERROR fixed_g1_f32 .*differs from the manifest' -- "$bin" verify --suite "$work/suite" --filter fixed_g1

# Usage errors.
expect 2 'no case matches' -- "$bin" verify --suite "$src/fixtures" --filter no_such_case
expect 2 "shard '2/2'" -- "$bin" verify --suite "$src/fixtures" --shard 2/2
expect 2 'no such suite manifest' -- "$bin" verify --suite "$work/nowhere"
head -c 100 "$src/fixtures/golden/fixed_t1.safetensors" >"$work/cut.safetensors"
expect 2 '^ERROR cut ' -- "$bin" verify "$work/cut.safetensors"

finish
