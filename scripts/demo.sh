#!/usr/bin/env bash
# A short tour of nsa-verify on a real input: generate a varlen bf16 problem with gradients, compute every
# stage with the CPU reference, inspect the result, check it, and verify the committed golden suite.
# Exits nonzero when any step fails. Uses ${BUILD_DIR:-build}/nsa-verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BUILD_DIR:-build}/nsa-verify"
if [ ! -x "$bin" ]; then
  echo "demo: $bin is not built (run scripts/setup.sh first)" >&2
  exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "generate: T=1000 as sequences 600, 0, 400; HQ=16, H=1, K=V=64, BS=64, S=16, W=64, bf16, with gradients"
"$bin" gen --preset demo --varlen 600,0,400 --with-grads --seed 1 -o "$work/demo.safetensors"

step "run: every stage and the backward with the CPU reference"
time "$bin" run --backend cpu -i "$work/demo.safetensors" -o "$work/demo_out.safetensors"

step "inspect: what the run wrote"
"$bin" inspect "$work/demo_out.safetensors"

step "check: the run's outputs against the float64 reference recomputed stage by stage"
"$bin" check --expected "$work/demo.safetensors" --actual "$work/demo_out.safetensors"

step "verify: the CPU backend over the committed golden suite, stored reference outputs included"
"$bin" verify --backend cpu --check-stored --suite fixtures --junit "$work/golden.xml"

printf '\ndemo: every step passed\n'
