#!/usr/bin/env bash
# nsa-verify run on malformed inputs (nsa-spec §6): every case exits 2 with one stderr line that names the file,
# tensor and problem, and leaves no output file (nor a temporary one) behind. Usage errors exit 2 too.
# Usage: bad_input.sh <path-to-nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
checks=0

python3 "$src/verify/cli/tests/make_bad_inputs.py" "$work/in" || { echo "FAIL: could not craft the bad inputs" >&2; exit 1; }
[ -s "$work/in/cases.tsv" ] || { echo "FAIL: no cases crafted" >&2; exit 1; }

# expect_input_error <label> <fragment> <output path> -- <nsa-verify args...>
expect_input_error() {
  local label="$1" fragment="$2" out="$3"
  shift 4
  checks=$((checks + 1))
  invoke "$@"
  if [ "$rc" -ne 2 ]; then
    fail "$label: exit code $rc, expected 2 (stderr: $(head -c 300 "$work/stderr"))"
    return
  fi
  local lines
  lines=$(wc -l <"$work/stderr")
  if [ "$lines" -ne 1 ]; then
    fail "$label: stderr has $lines lines, expected exactly one:"
    sed 's/^/    /' "$work/stderr" >&2
  fi
  if ! grep -qF -- "$fragment" "$work/stderr"; then
    fail "$label: stderr lacks '$fragment': $(cat "$work/stderr")"
  fi
  if [ -e "$out" ]; then
    fail "$label: output file $out exists after a failed run"
    rm -f "$out"
  fi
  if compgen -G "$out.tmp*" >/dev/null; then
    fail "$label: temporary output left behind: $(echo "$out".tmp*)"
    rm -f "$out".tmp*
  fi
}

# The valid problem runs: the crafted inputs fail for their defect, not for something they share.
checks=$((checks + 1))
invoke run -i "$work/in/valid.safetensors" -o "$work/valid_out.safetensors"
if [ "$rc" -ne 0 ] || [ ! -s "$work/valid_out.safetensors" ]; then
  fail "the valid input did not run (exit $rc): $(cat "$work/stderr")"
fi

# Every crafted case: the error names the input file and the problem.
while IFS=$'\t' read -r file fragment; do
  in="$work/in/$file"
  out="$work/out_${file}"
  expect_input_error "$file" "$fragment" "$out" -- run -i "$in" -o "$out"
  if ! grep -qF -- "$in" "$work/stderr"; then
    fail "$file: stderr does not name the input file $in: $(cat "$work/stderr")"
  fi
done <"$work/in/cases.tsv"

# Input paths that are not fixtures.
expect_input_error "missing input file" "cannot open file" "$work/out_missing" -- \
  run -i "$work/in/does_not_exist.safetensors" -o "$work/out_missing"
expect_input_error "directory as input" "is a directory" "$work/out_dir" -- run -i "$work/in" -o "$work/out_dir"

# Configuration flags that are out of range.
valid="$work/in/valid.safetensors"
expect_input_error "--block-size 0" "block size must be positive, got 0" "$work/out_bs0" -- \
  run -i "$valid" -o "$work/out_bs0" --block-size 0
expect_input_error "--block-size -64" "block size must be positive, got -64" "$work/out_bsneg" -- \
  run -i "$valid" -o "$work/out_bsneg" --block-size -64
expect_input_error "--block-count 0" "block count must be positive" "$work/out_bc0" -- \
  run -i "$valid" -o "$work/out_bc0" --block-count 0
expect_input_error "--window -1" "window must be >= 0" "$work/out_wneg" -- run -i "$valid" -o "$work/out_wneg" --window -1

# Non-finite inputs are accepted when asked for.
checks=$((checks + 1))
invoke run -i "$work/in/nan_in_q.safetensors" -o "$work/nan_out.safetensors" --allow-nonfinite
if [ "$rc" -ne 0 ] || [ ! -s "$work/nan_out.safetensors" ]; then
  fail "--allow-nonfinite: exit $rc, expected 0 and an output file: $(cat "$work/stderr")"
fi

# A failed run leaves an existing output file as it was.
checks=$((checks + 1))
echo "previous output" >"$work/existing.safetensors"
invoke run -i "$work/in/duplicate_name.safetensors" -o "$work/existing.safetensors"
if [ "$rc" -ne 2 ] || [ "$(cat "$work/existing.safetensors")" != "previous output" ]; then
  fail "a failed run (exit $rc) changed an existing output file"
fi

# An unwritable output is bad input too, and names the path.
expect_input_error "output in a missing directory" "$work/no_such_dir/out.safetensors" "$work/no_such_dir/out.safetensors" -- \
  run -i "$valid" -o "$work/no_such_dir/out.safetensors"

# Usage errors: unknown flag, missing -i, unknown backend, no subcommand.
checks=$((checks + 1))
invoke run -i "$valid" -o "$work/out_flag" --no-such-flag
[ "$rc" -eq 2 ] || fail "unknown flag: exit $rc, expected 2"
grep -q -- "--no-such-flag" "$work/stderr" || fail "unknown flag: stderr does not name it: $(cat "$work/stderr")"
[ -e "$work/out_flag" ] && fail "unknown flag: output written"
checks=$((checks + 1))
invoke run -o "$work/out_noi"
[ "$rc" -eq 2 ] || fail "missing -i: exit $rc, expected 2"
grep -qiE -- "(-i|--input)" "$work/stderr" || fail "missing -i: stderr does not name the option: $(cat "$work/stderr")"
[ -e "$work/out_noi" ] && fail "missing -i: output written"
checks=$((checks + 1))
invoke run -i "$valid" -o "$work/out_be" --backend tpu
[ "$rc" -eq 2 ] || fail "--backend tpu: exit $rc, expected 2"
[ -e "$work/out_be" ] && fail "--backend tpu: output written"
checks=$((checks + 1))
invoke
[ "$rc" -eq 2 ] || fail "no subcommand: exit $rc, expected 2"

# --backend cuda on a build without CUDA: a clear error, no output. A CUDA build runs it instead.
checks=$((checks + 1))
invoke run --backend cuda -i "$valid" -o "$work/out_cuda"
if grep -q "built without" "$work/stderr"; then
  [ "$rc" -eq 2 ] || fail "--backend cuda without CUDA: exit $rc, expected 2"
  [ "$(wc -l <"$work/stderr")" -eq 1 ] || fail "--backend cuda without CUDA: stderr is not one line"
  grep -q "backend 'cuda'" "$work/stderr" || fail "--backend cuda: message does not name the backend: $(cat "$work/stderr")"
  [ -e "$work/out_cuda" ] && fail "--backend cuda without CUDA: output written"
else
  echo "SKIP: the no-CUDA message (this nsa-verify has a CUDA backend; it exited $rc: $(head -c 200 "$work/stderr"))"
  if [ "$rc" -eq 0 ] && [ ! -s "$work/out_cuda" ]; then fail "--backend cuda exited 0 without output"; fi
  if [ "$rc" -ne 0 ] && [ -e "$work/out_cuda" ]; then fail "--backend cuda failed but left output"; fi
  if [ "$rc" -eq 0 ]; then  # a working device: head dims above 256 are bad input for the CUDA backend
    expect_input_error "K = 257 on cuda" "256" "$work/out_k257_cuda" -- \
      run --backend cuda -i "$work/in/k_dim_257.safetensors" -o "$work/out_k257_cuda"
  fi
fi

# The CPU reference has no head-dim limit.
checks=$((checks + 1))
invoke run -i "$work/in/k_dim_257.safetensors" -o "$work/out_k257_cpu"
[ "$rc" -eq 0 ] && [ -s "$work/out_k257_cpu" ] || fail "K = 257 on cpu: exit $rc: $(cat "$work/stderr")"

echo "bad_input: $checks checks"
finish
