#!/usr/bin/env bash
# Builds the libFuzzer target (clang, ASan + UBSan) in build-fuzz and fuzzes the safetensors reader and the
# problem loader for a bounded time, starting from a copy of fixtures/fuzz-corpus. Exits nonzero on a finding
# (crash, sanitizer report, non-InputError exception); the reproducer is left in $FUZZ_ARTIFACTS.
#
#   scripts/fuzz.sh                      # 60 s
#   FUZZ_SECONDS=600 scripts/fuzz.sh     # longer
#   FUZZ_JOBS=2 scripts/fuzz.sh          # parallel workers
#   build-fuzz/safetensors_fuzz crash-<hash>   # replay a finding
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_MAX_LEN="${FUZZ_MAX_LEN:-16384}"
FUZZ_JOBS="${FUZZ_JOBS:-1}"
FUZZ_BUILD_DIR="${FUZZ_BUILD_DIR:-build-fuzz}"
CXX_FOR_FUZZ="${CXX_FOR_FUZZ:-clang++}"

if ! command -v "$CXX_FOR_FUZZ" >/dev/null; then
  echo "fuzz: $CXX_FOR_FUZZ not found (apt-get install clang)" >&2
  exit 1
fi
# libFuzzer's runtime ships separately on some distributions (Debian 12: libclang-rt-14-dev).
probe_dir="$(mktemp -d)"
trap 'rm -rf "$probe_dir"' EXIT
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe_dir/probe.cpp"
if ! "$CXX_FOR_FUZZ" -fsanitize=fuzzer,address,undefined "$probe_dir/probe.cpp" -o "$probe_dir/probe" 2>"$probe_dir/log"; then
  echo "fuzz: $CXX_FOR_FUZZ cannot link a libFuzzer target (install the clang runtime, e.g. libclang-rt-14-dev):" >&2
  head -3 "$probe_dir/log" >&2
  exit 1
fi

cmake -S . -B "$FUZZ_BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX_FOR_FUZZ" \
  -DNSA_BUILD_FUZZERS=ON -DNSA_BUILD_CUDA=OFF -DNSA_BUILD_TESTS=OFF >/dev/null
cmake --build "$FUZZ_BUILD_DIR" --target safetensors_fuzz -j "${FUZZ_BUILD_JOBS:-2}" >/dev/null

# Fuzz a copy: libFuzzer adds what it finds to the corpus directory, and the committed seeds stay small.
work="$FUZZ_BUILD_DIR/fuzz-work"
rm -rf "$work/corpus"
mkdir -p "$work/corpus"
cp fixtures/fuzz-corpus/* "$work/corpus/"
if [ -z "${FUZZ_ARTIFACTS:-}" ]; then
  FUZZ_ARTIFACTS="$work/artifacts"
  rm -rf "$FUZZ_ARTIFACTS"  # findings of an earlier run must not fail this one
fi
mkdir -p "$FUZZ_ARTIFACTS"

echo "fuzz: safetensors_fuzz for ${FUZZ_SECONDS}s (max_len ${FUZZ_MAX_LEN}, ${FUZZ_JOBS} job(s)), corpus $work/corpus"
status=0
if [ "$FUZZ_JOBS" -gt 1 ]; then
  # -jobs writes one log per worker (fuzz-N.log) into the current directory.
  (cd "$work" && UBSAN_OPTIONS=print_stacktrace=1 ../safetensors_fuzz -max_total_time="$FUZZ_SECONDS" \
     -max_len="$FUZZ_MAX_LEN" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -dict="$(realpath core/safetensors_fuzz.dict)" \
     -artifact_prefix="$(realpath "$FUZZ_ARTIFACTS")/" -jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS" corpus) || status=$?
else
  UBSAN_OPTIONS=print_stacktrace=1 "$FUZZ_BUILD_DIR/safetensors_fuzz" -max_total_time="$FUZZ_SECONDS" \
    -max_len="$FUZZ_MAX_LEN" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -dict=core/safetensors_fuzz.dict \
    -artifact_prefix="$FUZZ_ARTIFACTS/" "$work/corpus" 2>"$work/fuzz.log" || status=$?
  grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added)" "$work/fuzz.log" || true
fi
if [ "$status" -ne 0 ] || find "$FUZZ_ARTIFACTS" -newer "$probe_dir/probe" -name '*-*' | grep -qE '/(crash|leak|timeout|oom)-'; then
  echo "fuzz: FINDING (exit $status); reproducers in $FUZZ_ARTIFACTS:" >&2
  ls "$FUZZ_ARTIFACTS" >&2
  [ -f "$work/fuzz.log" ] && grep -E "ERROR|runtime error|terminate|SUMMARY" "$work/fuzz.log" | head -20 >&2
  exit 1
fi
echo "fuzz: no findings in ${FUZZ_SECONDS}s"
