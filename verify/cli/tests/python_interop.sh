#!/usr/bin/env bash
# Interop with the official Python safetensors + numpy packages (see interop.py). Missing packages fail the
# test: scripts/setup.sh installs them.
# Usage: python_interop.sh <path-to-nsa-verify> <source-dir>
set -euo pipefail
NSA_VERIFY="$1"
SRC="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 "$SRC/verify/cli/tests/interop.py" "$NSA_VERIFY" "$work"
