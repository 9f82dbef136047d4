#!/usr/bin/env bash
# The CUDA backend's acceptance run, on a machine with an NVIDIA GPU and a CUDA build in ${BUILD_DIR:-build}:
#   1. the GPU unit tests (every kernel against the float64 reference);
#   2. `verify --backend cuda` over the committed golden suite (gradients included) and `gradcheck --backend cuda`;
#   3. T=65536 bf16 cases verified on sampled rows (nsa-spec §5.4): HQ=16, H=1 with a window, the benchmark
#      shape of nsa-spec §7 (HQ=64, H=4; ~12 GB of host memory), and the NSA paper's heads (K = 192, V = 128)
#      with its policy and window;
#   4. varlen cases the streamed selected-attention kernel takes, the gate pass fused into it (G = 32, BS = 64,
#      K != V, block_counts; with a window and without), one the block-major selected-attention path takes
#      (G = 1, BS = 32, K != V, block_counts) and one the wgmma compressed-attention and top-k kernels take (G = 16, K = V = 128, BS = 16), verified, and
#      compute-sanitizer memcheck on them, on varlen golden cases and on the GPU tests' randomly drawn shapes,
#      racecheck and synccheck on golden cases that take the tensor-core backward, and a varlen case that takes
#      its sm_90 version in every branch (verified with gradients, also under memcheck), and a varlen case with the
#      paper's heads (the sm_90 forward and backward kernels' K = 192 instances; verified with gradients, under
#      memcheck, racecheck and synccheck), and the A100's shared-memory staging of the mma.sync kernels (the
#      key-block backward, the forward's one-stage tile kernels) under all three, and the launches of a GPU with
#      99 KB a CTA under memcheck and racecheck, when compute-sanitizer is on PATH;
#   5. `bench --backend cuda` at the reference shapes (nsa-spec §7), at 64k with the sm_80 kernel set, the
#      backward at 8k and 64k, G = 1, 4, 16 at 32k (forward and backward), and the paper's heads at 64k (forward)
#      and 8k (backward).
# Logs and JSON go to ${OUT_DIR:-gpu-check}. Exits nonzero when any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build}"
out="${OUT_DIR:-gpu-check}"
bin="$build/nsa-verify"
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: runs a step, logs it, remembers a failure (a test filter that matched nothing too)
  local name="$1"; shift
  echo "== $name: $*"
  local rc=0
  "$@" >"$out/$name.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then echo "   FAILED (exit $rc), see $out/$name.log"; status=1
  elif grep -q '^\[==========\] 0 tests from' "$out/$name.log"; then echo "   FAILED: no test matched"; status=1
  else echo "   ok"; fi
  tail -n 4 "$out/$name.log" | sed 's/^/   | /'
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
step cuda_tests "$build/cuda_tests" --gtest_brief=1
step golden_suite "$bin" verify --backend cuda --json "$out/golden.json" --junit "$out/golden.xml"
# The CUDA backward against float64 central differences of the reference, on every named small shape.
step gradcheck_cuda "$bin" gradcheck --backend cuda --json "$out/gradcheck_cuda.json"
long="$out/long64k.safetensors"
step long_gen "$bin" gen --seqlen 65536 --heads-q 16 --heads-kv 1 --dim-k 128 --dim-v 128 --block-size 64 \
  --block-count 16 --window 512 --dtype bf16 --seed 64 -o "$long"
step long_sampled bash -c "time '$bin' verify --backend cuda --sample-rows 1024 --seed 1 --json '$out/long64k.json' '$long'"
rm -f "$long"
# The benchmark shape of nsa-spec §7 (HQ=64, H=4: ~12 GB of host memory, mostly the inputs read and widened).
bench64k="$out/bench64k.safetensors"
step bench64k_gen "$bin" gen --seqlen 65536 --heads-q 64 --heads-kv 4 --dim-k 128 --dim-v 128 --block-size 64 \
  --block-count 16 --dtype bf16 --seed 65 -o "$bench64k"
step bench64k_sampled bash -c "time '$bin' verify --backend cuda --sample-rows 1024 --seed 2 --json '$out/bench64k.json' '$bench64k'"
rm -f "$bench64k"
paper64k="$out/paper64k.safetensors"
step paper64k_gen "$bin" gen --seqlen 65536 --heads-q 64 --heads-kv 4 --dim-k 192 --dim-v 128 --block-size 64 \
  --block-count 16 --window 512 --policy paper --dtype bf16 --seed 69 -o "$paper64k"
step paper64k_sampled bash -c "time '$bin' verify --backend cuda --sample-rows 1024 --seed 3 --json '$out/paper64k.json' '$paper64k'"
rm -f "$paper64k"
streamed="$out/streamed_varlen.safetensors"
step streamed_gen "$bin" gen --varlen 70,0,300,9,190 --heads-q 64 --heads-kv 2 --dim-k 128 --dim-v 64 --block-size 64 \
  --block-count 8 --block-counts --window 64 --dtype bf16 --seed 65 -o "$streamed"
step streamed_verify "$bin" verify --backend cuda "$streamed"
gated="$out/streamed_gated_varlen.safetensors"
step gated_gen "$bin" gen --varlen 70,0,300,9,190 --heads-q 64 --heads-kv 2 --dim-k 128 --dim-v 64 --block-size 64 \
  --block-count 8 --block-counts --dtype bf16 --seed 68 -o "$gated"
step gated_verify "$bin" verify --backend cuda "$gated"
blocks="$out/blocks_varlen.safetensors"
step blocks_gen "$bin" gen --varlen 900,0,33,1300,7 --heads-q 6 --heads-kv 6 --dim-k 128 --dim-v 64 --block-size 32 \
  --block-count 12 --block-counts --window 64 --dtype bf16 --seed 67 -o "$blocks"
step blocks_verify "$bin" verify --backend cuda "$blocks"
wgmma="$out/wgmma_varlen.safetensors"
step wgmma_gen "$bin" gen --varlen 700,0,9,1100,65 --heads-q 32 --heads-kv 2 --dim-k 128 --dim-v 128 --block-size 16 \
  --block-count 16 --dtype bf16 --seed 66 -o "$wgmma"
step wgmma_verify "$bin" verify --backend cuda "$wgmma"
# The sm_90 key-block backward (key_block_backward_sm90.cuh) in every branch: BS = 64, K = V = 128, a window,
# partial blocks, an empty sequence; gradients verified.
kb90="$out/kb90_varlen.safetensors"
step kb90_gen "$bin" gen --varlen 300,0,65,130,1 --heads-q 32 --heads-kv 2 --dim-k 128 --dim-v 128 --block-size 64 \
  --block-count 4 --window 64 --dtype bf16 --seed 5 --with-grads -o "$kb90"
step kb90_verify "$bin" verify --backend cuda "$kb90"
# The NSA paper's heads end to end: K = 192, V = 128, G = 16, a window, partial blocks, an empty sequence.
paper="$out/paper_heads_varlen.safetensors"
step paper_gen "$bin" gen --varlen 300,0,65,700,1 --heads-q 32 --heads-kv 2 --dim-k 192 --dim-v 128 --block-size 64 \
  --block-count 4 --window 64 --policy paper --dtype bf16 --seed 6 --with-grads -o "$paper"
step paper_verify "$bin" verify --backend cuda "$paper"
if command -v compute-sanitizer >/dev/null; then
  for c in fixtures/golden/varlen_empty_short fixtures/golden/block_counts_varlen fixtures/golden/varlen_g16_paper \
           "${streamed%.safetensors}" "${gated%.safetensors}" "${blocks%.safetensors}" "${wgmma%.safetensors}" \
           "${kb90%.safetensors}" "${paper%.safetensors}"; do
    name="$(basename "$c")"
    step "memcheck_$name" compute-sanitizer --tool memcheck --error-exitcode 9 "$bin" run --backend cuda \
      -i "$c.safetensors" -o "$out/memcheck_$name.safetensors"
    rm -f "$out/memcheck_$name.safetensors"
  done
  # The tensor-core backward (key_block_backward.cuh: warp pairs through shared memory and named barriers) under
  # racecheck and synccheck: golden cases whose selected, window and compressed backward take it. The sm_90
  # version's producer signals its cp.async copies through mbarriers, which racecheck does not model (it reports
  # every read of a stage as a race with the copy that filled it), so racecheck leaves that kernel out; synccheck
  # and memcheck take it (kb90 above).
  for c in fixed_k128 fixed_g2_k64_w64 varlen_g16_paper; do
    for tool in racecheck synccheck; do
      exclude=()
      [ "$tool" = racecheck ] && exclude=(--kernel-name-exclude kns=key_block_backward_sm90)
      step "${tool}_$c" compute-sanitizer --tool $tool "${exclude[@]}" --error-exitcode 9 "$bin" run --backend cuda \
        -i "fixtures/golden/$c.safetensors" -o "$out/${tool}_$c.safetensors"
      rm -f "$out/${tool}_$c.safetensors"
    done
  done
  # (racecheck leaves out the sm_90 key-block backward, as above, and the streamed selected-attention kernel,
  # whose planner hands its plans over through mbarriers and a release / acquire counter, which racecheck does
  # not model either.)
  for tool in racecheck synccheck; do
    exclude=()
    [ "$tool" = racecheck ] &&
      exclude=(--kernel-name-exclude kns=selected_streamed_kernel --kernel-name-exclude kns=key_block_backward_sm90)
    step "${tool}_paper_heads" compute-sanitizer --tool $tool "${exclude[@]}" --error-exitcode 9 "$bin" run --backend cuda \
      -i "$paper" -o "$out/${tool}_paper_heads.safetensors"
    rm -f "$out/${tool}_paper_heads.safetensors"
  done
  # The mma.sync key-block backward's (192, 128) rows (the paper's heads off the sm_90 kernels) under racecheck.
  step racecheck_paper_heads_mma_sync compute-sanitizer --tool racecheck --kernel-name kns=key_block_backward_kernel \
    --error-exitcode 9 "$build/cuda_tests" --gtest_brief=1 --gtest_filter='*K192*sm80*'
  # The staging an A100 runs (two stages of rows; at K = V = 128 with 64-key tiles P^T handed over within dS's
  # tile): the key-block cases' sm_80 twins, under all three tools.
  for tool in memcheck racecheck synccheck; do
    step "${tool}_a100_staging" compute-sanitizer --tool $tool --kernel-name kns=key_block_backward_kernel \
      --error-exitcode 9 "$build/cuda_tests" --gtest_brief=1 --gtest_filter='Sm90KeyBlocks/*sm80*'
  done
  # The forward's mma.sync tile kernels with one K/V stage (what an A100 runs at D >= 128): the window's and the
  # union / per-token walks' runs on the sm_80 kernel set, at D = 128 and 256, under all three tools.
  for tool in memcheck racecheck synccheck; do
    step "${tool}_one_stage_tiles" compute-sanitizer --tool $tool --kernel-name kns=_tc_kernel --error-exitcode 9 \
      "$build/cuda_tests" --gtest_brief=1 \
      --gtest_filter='*SlidingWindowCuda.*K128*:*SlidingWindowCuda.*K256*:*SelectedAttentionCudaPaths.*/bf16_G16_K128_BS64_S16'
  done
  # fp32 on the tile kernels (three tf32 products a tile): the window's and the union / per-token walks' fp32 cases
  # at G = 16 (K = 128, and K = 192 on the 256-wide rows), under all three tools.
  for tool in memcheck racecheck synccheck; do
    step "${tool}_fp32_tiles" compute-sanitizer --tool $tool --kernel-name kns=_tc_kernel --error-exitcode 9 \
      "$build/cuda_tests" --gtest_brief=1 \
      --gtest_filter='*SelectedAttentionCudaPaths*f32_G16*:*SlidingWindowCuda*f32_G16_K128_W200*'
  done
  # The launches a GPU with less shared memory gets (DeviceLayout::smem_limit): compressed attention's row kernel,
  # top-k's tile kernel with fewer warps, the window's and selected attention's tiles for 99 KB.
  for tool in memcheck racecheck; do
    step "${tool}_small_smem" compute-sanitizer --tool $tool --error-exitcode 9 "$build/cuda_tests" --gtest_brief=1 \
      --gtest_filter='SmallSharedMemory/CudaBackendStages.*:Shapes/CudaTopkTies.*smem*'
  done
  step synccheck_kb90 compute-sanitizer --tool synccheck --error-exitcode 9 "$bin" run --backend cuda -i "$kb90" \
    -o "$out/synccheck_kb90.safetensors"
  rm -f "$out/synccheck_kb90.safetensors"
  # The randomly drawn shapes of the GPU tests (every dtype, G, K != V, block sizes, varlen, windows), under
  # memcheck as a whole.
  step memcheck_random_shapes compute-sanitizer --tool memcheck --error-exitcode 9 "$build/cuda_tests" \
    --gtest_brief=1 --gtest_filter='Random*'
else
  echo "== memcheck: compute-sanitizer not on PATH, not run"
fi
rm -f "$streamed" "$gated" "$blocks" "$wgmma" "$kb90" "$paper"
shape="--heads-kv 4 --dim-k 128 --dim-v 128 --block-size 64 --block-count 16 --dtype bf16 --warmup 2 --iters 10"
for T in 8192 32768 65536; do
  step "bench_T$T" "$bin" bench --backend cuda --seqlen $T --heads-q 64 $shape --json "$out/bench_T$T.json"
done
# The kernels an sm_80 GPU runs, timed on this device (wgmma and TMA kernels off).
step bench_T65536_sm80_kernels "$bin" bench --backend cuda --seqlen 65536 --heads-q 64 $shape --no-sm90-kernels \
  --json "$out/bench_T65536_sm80_kernels.json"
# The backward pass at 8k (with a window) and 64k.
step bench_T8192_backward "$bin" bench --backend cuda --seqlen 8192 --heads-q 64 ${shape/--warmup 2 --iters 10/--warmup 1 --iters 5} \
  --window 512 --backward --json "$out/bench_T8192_backward.json"
step bench_T65536_backward "$bin" bench --backend cuda --seqlen 65536 --heads-q 64 \
  ${shape/--warmup 2 --iters 10/--warmup 1 --iters 5} --backward --json "$out/bench_T65536_backward.json"
# The same 8k backward on the sm_80 kernel set, with an A100's shared-memory staging (two key-block CTAs an SM).
step bench_T8192_backward_sm80_kernels "$bin" bench --backend cuda --seqlen 8192 --heads-q 64 \
  ${shape/--warmup 2 --iters 10/--warmup 1 --iters 5} --window 512 --backward --no-sm90-kernels \
  --json "$out/bench_T8192_backward_sm80_kernels.json"
for H in 16 4 1; do  # G = 1, 4, 16 at HQ = 16, forward and backward
  step "bench_G$((16 / H))" "$bin" bench --backend cuda --seqlen 32768 --heads-q 16 ${shape/--heads-kv 4/--heads-kv $H} \
    --backward --json "$out/bench_G$((16 / H)).json"
done
# The NSA paper's heads (K = 192, V = 128): the forward at 64k, the backward at 8k with a window.
paper_shape="${shape/--dim-k 128/--dim-k 192}"
step bench_paper_T65536 "$bin" bench --backend cuda --seqlen 65536 --heads-q 64 $paper_shape \
  --json "$out/bench_paper_T65536.json"
step bench_paper_T8192_backward "$bin" bench --backend cuda --seqlen 8192 --heads-q 64 \
  ${paper_shape/--warmup 2 --iters 10/--warmup 1 --iters 5} --window 512 --backward --json "$out/bench_paper_T8192_backward.json"
exit $status
