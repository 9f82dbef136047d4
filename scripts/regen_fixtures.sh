#!/usr/bin/env bash
# Regenerates the golden suite from fixtures/cases.txt: fixtures/golden/<case>.safetensors (inputs and float64
# reference outputs) and fixtures/manifest.json. Deterministic: rerunning it rewrites identical bytes
# (verify/cli/tests/regen_identical.sh checks that).
#   scripts/regen_fixtures.sh            # rewrites the committed suite
#   scripts/regen_fixtures.sh OUT_DIR    # writes OUT_DIR/golden/*.safetensors and OUT_DIR/manifest.json
# The binary is $NSA_VERIFY, else ${BUILD_DIR:-build}/nsa-verify.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${NSA_VERIFY:-$root/${BUILD_DIR:-build}/nsa-verify}"
out="${1:-$root/fixtures}"
if [ ! -x "$bin" ]; then
  echo "regen_fixtures: $bin is not built (run scripts/setup.sh, or set NSA_VERIFY)" >&2
  exit 2
fi
mkdir -p "$out/golden"
# Cases removed from the list must not linger.
rm -f "$out"/golden/*.safetensors
# A fixed thread count keeps any reduction order of the reference the same from run to run.
"$bin" gen --cases "$root/fixtures/cases.txt" --out-dir "$out" --threads 2
