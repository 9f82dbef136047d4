#!/usr/bin/env bash
# Interop with the official Python safetensors + numpy packages (see interop.py). Missing packages fail the
# test: scripts/setup.sh installs them.
# Usage: python_interop.sh <path-to-nsa-verify> <source-dir>
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
set -e
python3 "$src/verify/cli/tests/interop.py" "$bin" "$work"
