# Shared by the CLI test scripts, which CTest runs as `bash <script> <path-to-nsa-verify> <source-dir>`.
# Sourced, not run: sets bin and src from the arguments, makes a temporary directory $work removed on exit, and
# defines the helpers below. Each check that fails calls `fail`; the script ends with `finish`.
set -uo pipefail
bin="$1"
src="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# invoke ARGS...: runs nsa-verify with ARGS; its exit code in $rc, its output in $work/stdout and $work/stderr.
invoke() {
  "$bin" "$@" >"$work/stdout" 2>"$work/stderr"
  rc=$?
}

# expect CODE PATTERN -- command...: the exit code and a line of its output (stdout + stderr) matching PATTERN.
expect() {
  local code="$1" pattern="$2"
  shift 3
  local out rc
  out="$("$@" 2>&1)"
  rc=$?
  [ "$rc" -eq "$code" ] || fail "exit $rc (expected $code): $*"$'\n'"$out"
  grep -Eq -- "$pattern" <<<"$out" || fail "no line matching '$pattern': $*"$'\n'"$out"
}

# finish: the script's summary line, and its exit code (1 if any check failed).
finish() {
  local name
  name="$(basename "$0" .sh)"
  if [ "$failures" -ne 0 ]; then
    echo "$name: $failures failure(s)"
    exit 1
  fi
  echo "$name: all checks passed"
  exit 0
}
