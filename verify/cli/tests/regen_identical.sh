#!/usr/bin/env bash
# Regenerating the golden suite from fixtures/cases.txt gives the committed files byte for byte.
# Usage: regen_identical.sh <nsa-verify> <source-dir>
set -uo pipefail
bin="$1"
src="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
NSA_VERIFY="$bin" bash "$src/scripts/regen_fixtures.sh" "$work" >"$work/log.txt" 2>&1 || {
  cat "$work/log.txt"
  echo "regen_identical: regeneration failed"
  exit 1
}
status=0
for f in "$src"/fixtures/golden/*.safetensors; do
  name=$(basename "$f")
  if [ ! -f "$work/golden/$name" ]; then
    echo "FAIL: $name is committed but not generated from fixtures/cases.txt"
    status=1
  elif ! cmp -s "$f" "$work/golden/$name"; then
    echo "FAIL: $name differs from its regeneration: $(cmp "$f" "$work/golden/$name" 2>&1 | head -1)"
    status=1
  fi
done
for f in "$work"/golden/*.safetensors; do
  [ -f "$src/fixtures/golden/$(basename "$f")" ] || { echo "FAIL: $(basename "$f") is generated but not committed"; status=1; }
done
cmp -s "$src/fixtures/manifest.json" "$work/manifest.json" || { echo "FAIL: fixtures/manifest.json differs"; status=1; }
count=$(ls "$work"/golden/*.safetensors | wc -l)
[ "$status" -eq 0 ] && echo "regen_identical: $count fixtures and the manifest are byte-identical"
exit "$status"
