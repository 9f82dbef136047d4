#!/usr/bin/env bash
# Regenerating the golden suite from fixtures/cases.txt gives the committed files byte for byte.
# Usage: regen_identical.sh <nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NSA_VERIFY="$bin" bash "$src/scripts/regen_fixtures.sh" "$work" >"$work/log.txt" 2>&1 || {
  cat "$work/log.txt"
  echo "regen_identical: regeneration failed"
  exit 1
}
for f in "$src"/fixtures/golden/*.safetensors; do
  name=$(basename "$f")
  if [ ! -f "$work/golden/$name" ]; then
    fail "$name is committed but not generated from fixtures/cases.txt"
  elif ! cmp -s "$f" "$work/golden/$name"; then
    fail "$name differs from its regeneration: $(cmp "$f" "$work/golden/$name" 2>&1 | head -1)"
  fi
done
for f in "$work"/golden/*.safetensors; do
  [ -f "$src/fixtures/golden/$(basename "$f")" ] || fail "$(basename "$f") is generated but not committed"
done
cmp -s "$src/fixtures/manifest.json" "$work/manifest.json" || fail "fixtures/manifest.json differs"
count=$(ls "$work"/golden/*.safetensors | wc -l)
[ "$failures" -eq 0 ] && echo "regen_identical: $count fixtures and the manifest are byte-identical"
finish
