// Gated output (nsa-spec §2.6): o = g_slc * o_slc + g_cmp * o_cmp + g_swa * o_swa, each gate broadcast over the
// V columns of its (token, head); a null gate or branch drops that branch. Elementwise, fp32 arithmetic.
// Backward (nsa-spec §3): per branch, do_x = g_x do and dg_x += do . o_x, a warp per (token, head) row and the
// three branches in one pass; do_x in fp32 or, for a tensor-core branch, only its rows' gates and deltas (the
// gated form of BranchGrad).
#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace nsa::cuda {
namespace {

struct Branch {
  const void* o;     // [B, T, HQ, V]
  const void* gate;  // [B, T, HQ]
};

// VEC consecutive elements, accessed at once. (alignas(16) would pad a one-element Pack to 16 bytes.)
template <typename T, int VEC>
struct alignas(VEC * sizeof(T)) Packed {
  T x[VEC];
};

// Each thread handles VEC consecutive elements of one row (V % VEC == 0), with 16-byte accesses when VEC > 1.
template <typename T, int VEC>
__global__ void gate_kernel(T* __restrict__ o,  // [B, T, HQ, V]
                            Branch cmp, Branch slc, Branch swa, int64_t rows, int64_t V) {
  using Pack = Packed<T, VEC>;
  static_assert(sizeof(Pack) == VEC * sizeof(T), "Pack must tile the row without padding");
  const int64_t n = rows * V / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i * VEC / V;
    // An absent branch (no output or no gate) joins the sum as gate 0 times 0.
    auto load = [&](const Branch& br, float& g, float (&x)[VEC]) {
      const bool on = br.o && br.gate;
      g = on ? Elem<T>::to_float(static_cast<const T*>(br.gate)[row]) : 0.f;
      const Pack p = on ? reinterpret_cast<const Pack*>(br.o)[i] : Pack{};
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = Elem<T>::to_float(p.x[e]);
    };
    float g_slc, g_cmp, g_swa, x_slc[VEC], x_cmp[VEC], x_swa[VEC];
    load(slc, g_slc, x_slc);
    load(cmp, g_cmp, x_cmp);
    load(swa, g_swa, x_swa);
    Pack out;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      out.x[e] = Elem<T>::from_float(gate_sum(x_slc[e], x_cmp[e], x_swa[e], g_slc, g_cmp, g_swa));
    reinterpret_cast<Pack*>(o)[i] = out;
  }
}

// One branch of the gate backward: dg += do . o_x and either the gated gradient g_x do in fp32 (do_f32) or the
// row's gate and delta do . o_x (gate, delta: BranchGrad's gated form). dg null: the branch is dropped.
template <typename T>
struct GateBranch {
  float* dg = nullptr;
  float* do_f32 = nullptr;
  float* gate = nullptr;
  float* delta = nullptr;
  const T* o_x = nullptr;
  const T* g = nullptr;
};

// One branch's part of a lane's VEC columns: its dot with do, and in the fp32 form its gated gradient stored.
template <typename T, int VEC>
__device__ __forceinline__ void gate_branch_step(const GateBranch<T>& b, float gate, const float (&grad)[VEC],
                                                 const Packed<T, VEC>& o, int64_t at, float& dot) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) dot = fmaf(grad[e], Elem<T>::to_float(o.x[e]), dot);
  if (b.do_f32) {
    Packed<float, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.x[e] = gate * grad[e];
    *reinterpret_cast<Packed<float, VEC>*>(b.do_f32 + at) = out;
  }
}
// A row's results, written by one lane: dg += do . o_x and, in the gated form, the row's gate and delta.
template <typename T>
__device__ __forceinline__ void gate_branch_finish(const GateBranch<T>& b, float gate, float dg_old, float sum,
                                                   int64_t row) {
  b.dg[row] = dg_old + sum;
  if (b.delta) b.delta[row] = sum, b.gate[row] = gate;
}

// A warp per row, the grid striding over the rows with as many warps as the device holds: a launch of one warp
// per row (4M at 64k) took 2.48 ms against 1.73 (H100; two or four rows per warp, their loads issued together:
// 2.01 / 2.44). Each lane takes VEC consecutive columns at a time (V % VEC == 0).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) gate_backward_kernel(const GateBranch<T> b_cmp, const GateBranch<T> b_slc,
                                                            const GateBranch<T> b_swa, const T* __restrict__ d_o,
                                                            int64_t rows, int64_t V) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const GateBranch<T> br[3] = {b_cmp, b_slc, b_swa};
  for (int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    float gate[3], dg_old[3], dot[3];
#pragma unroll
    for (int x = 0; x < 3; ++x) {
      gate[x] = br[x].dg ? Elem<T>::to_float(br[x].g[row]) : 0.f;
      dg_old[x] = br[x].dg && lane == 0 ? br[x].dg[row] : 0.f;
      dot[x] = 0.f;
    }
    for (int64_t c = int64_t(lane) * VEC; c < V; c += 32 * VEC) {
      const int64_t at = row * V + c;
      const Packed<T, VEC> in = *reinterpret_cast<const Packed<T, VEC>*>(d_o + at);
      Packed<T, VEC> o[3];
#pragma unroll
      for (int x = 0; x < 3; ++x)
        if (br[x].dg) o[x] = *reinterpret_cast<const Packed<T, VEC>*>(br[x].o_x + at);
      float grad[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) grad[e] = Elem<T>::to_float(in.x[e]);
#pragma unroll
      for (int x = 0; x < 3; ++x)
        if (br[x].dg) gate_branch_step(br[x], gate[x], grad, o[x], at, dot[x]);
    }
#pragma unroll
    for (int x = 0; x < 3; ++x) {
      const float sum = warp_sum(dot[x]);
      if (lane == 0 && br[x].dg) gate_branch_finish(br[x], gate[x], dg_old[x], sum, row);
    }
  }
}

}  // namespace

void gate_backward(float* dg_cmp, float* dg_slc, float* dg_swa, float* do_cmp, float* do_slc, float* do_swa,
                   const void* d_o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp,
                   const void* g_slc, const void* g_swa, const DeviceLayout& L, cudaStream_t s, GatedBranches gated) {
  const int64_t rows = L.B * L.T * L.HQ;
  if (rows == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto branch = [&](float* dg, float* do_x, const void* o_x, const void* g, bool gated_form) {
      GateBranch<T> b;
      if (!dg || !do_x || !o_x || !g) return b;  // the branch is dropped
      b.dg = dg, b.o_x = static_cast<const T*>(o_x), b.g = static_cast<const T*>(g);
      if (gated_form) {
        const BranchGrad to = gated_layout(do_x, d_o, L);
        b.gate = const_cast<float*>(to.gate), b.delta = const_cast<float*>(to.delta);
      } else {
        b.do_f32 = do_x;
      }
      return b;
    };
    const GateBranch<T> b_cmp = branch(dg_cmp, do_cmp, o_cmp, g_cmp, gated.cmp);
    const GateBranch<T> b_slc = branch(dg_slc, do_slc, o_slc, g_slc, gated.slc);
    const GateBranch<T> b_swa = branch(dg_swa, do_swa, o_swa, g_swa, gated.swa);
    if (!b_cmp.dg && !b_slc.dg && !b_swa.dg) return;
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>(
        div_up(rows, kThreads / 32),
        int64_t(8) * device_attribute(cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute(multiprocessor count)"));
    // Columns a lane takes at a time: as many as keep the whole warp busy on a row (128 bf16 columns: 4).
    auto go = [&](auto vec) {
      gate_backward_kernel<T, decltype(vec)::value>
          <<<unsigned(blocks), kThreads, 0, s>>>(b_cmp, b_slc, b_swa, static_cast<const T*>(d_o), rows, L.V);
    };
    if (L.V % 8 == 0 && L.V >= 256 && sizeof(T) == 2) go(std::integral_constant<int, 8>{});
    else if (L.V % 4 == 0 && L.V >= 128) go(std::integral_constant<int, 4>{});
    else if (L.V % 2 == 0 && L.V >= 64) go(std::integral_constant<int, 2>{});
    else go(std::integral_constant<int, 1>{});
    check_launch("gate_backward_kernel");
  });
}

void gate_forward(void* o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp, const void* g_slc,
                  const void* g_swa, const DeviceLayout& L, cudaStream_t s) {
  const int64_t rows = L.B * L.T * L.HQ;
  if (rows == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const int threads = 256;
    auto launch = [&](auto kernel, int vec) {
      const int64_t blocks = std::min<int64_t>(div_up(rows * L.V / vec, threads), 132 * 16);
      kernel<<<unsigned(blocks), threads, 0, s>>>(static_cast<T*>(o), Branch{o_cmp, g_cmp}, Branch{o_slc, g_slc},
                                                  Branch{o_swa, g_swa}, rows, L.V);
    };
    if (L.V % kVec == 0) launch(gate_kernel<T, kVec>, kVec);
    else launch(gate_kernel<T, 1>, 1);
    check_launch("gate_kernel");
  });
}

}  // namespace nsa::cuda
