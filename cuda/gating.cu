// Gated output (nsa-spec §2.6): o = g_slc * o_slc + g_cmp * o_cmp + g_swa * o_swa, each gate broadcast over the
// V columns of its (token, head); a null gate or branch drops that branch. Elementwise, fp32 arithmetic.
// Backward (nsa-spec §3): per branch, do_x = g_x do and dg_x += do . o_x, a warp per (token, head) row.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace nsa::cuda {
namespace {

struct Branch {
  const void* o;     // [B, T, HQ, V]
  const void* gate;  // [B, T, HQ]
};

// Each thread handles VEC consecutive elements of one row (V % VEC == 0), with 16-byte accesses when VEC > 1.
template <typename T, int VEC>
__global__ void gate_kernel(T* __restrict__ o,  // [B, T, HQ, V]
                            Branch cmp, Branch slc, Branch swa, int64_t rows, int64_t V) {
  struct alignas(VEC * sizeof(T)) Pack {  // (alignas(16) would pad a one-element Pack to 16 bytes)
    T x[VEC];
  };
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

// One warp per row; lanes stride over the V columns.
template <typename T>
__global__ void __launch_bounds__(128) gate_backward_kernel(float* __restrict__ dg, float* __restrict__ do_x,
                                                            const T* __restrict__ d_o, const T* __restrict__ o_x,
                                                            const T* __restrict__ g, int64_t rows, int64_t V) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float gate = Elem<T>::to_float(g[row]);
  float dot = 0.f;
  for (int64_t c = lane; c < V; c += 32) {
    const int64_t at = row * V + c;
    const float grad = Elem<T>::to_float(d_o[at]);
    dot = fmaf(grad, Elem<T>::to_float(o_x[at]), dot);
    do_x[at] = gate * grad;
  }
  dot = warp_sum(dot);
  if (lane == 0) dg[row] += dot;
}

}  // namespace

void gate_backward(float* dg_cmp, float* dg_slc, float* dg_swa, float* do_cmp, float* do_slc, float* do_swa,
                   const void* d_o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp,
                   const void* g_slc, const void* g_swa, const DeviceLayout& L, cudaStream_t s) {
  const int64_t rows = L.B * L.T * L.HQ;
  if (rows == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto branch = [&](float* dg, float* do_x, const void* o_x, const void* g) {
      if (!dg || !do_x || !o_x || !g) return;  // the branch is dropped
      const int threads = 128;
      const int64_t blocks = div_up(rows * 32, threads);
      if (blocks >= (int64_t(1) << 31)) throw CudaError("gate_backward_kernel: too many rows for one launch");
      gate_backward_kernel<T><<<unsigned(blocks), threads, 0, s>>>(
          dg, do_x, static_cast<const T*>(d_o), static_cast<const T*>(o_x), static_cast<const T*>(g), rows, L.V);
      check_launch("gate_backward_kernel");
    };
    branch(dg_cmp, do_cmp, o_cmp, g_cmp);
    branch(dg_slc, do_slc, o_slc, g_slc);
    branch(dg_swa, do_swa, o_swa, g_swa);
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
