#!/usr/bin/env bash
# Installs the build and test dependencies (Debian packages; numpy and safetensors from PyPI for the interop
# test) and configures + builds the toolkit into build/. CUDA targets are added when nvcc is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES="cmake g++ make libeigen3-dev libcli11-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev clang python3 python3-pip"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
if ! python3 -c "import numpy, safetensors" 2>/dev/null; then
  echo "setup: installing numpy and safetensors from PyPI"
  python3 -m pip install -q numpy safetensors 2>/dev/null || python3 -m pip install -q --break-system-packages numpy safetensors
fi

BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${NSA_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
