// Gated output (nsa-spec §2.6): o = g_slc * o_slc + g_cmp * o_cmp + g_swa * o_swa, each gate broadcast over the
// V columns of its (token, head); a null gate or branch drops that branch. Elementwise, fp32 arithmetic.
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
  struct alignas(16) Pack {
    T x[VEC];
  };
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

}  // namespace

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
