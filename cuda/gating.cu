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
  const Branch branches[3] = {slc, cmp, swa};
  const int64_t n = rows * V / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i * VEC / V;
    float acc[VEC] = {};
    for (const Branch& br : branches) {
      if (!br.o || !br.gate) continue;
      const float g = Elem<T>::to_float(static_cast<const T*>(br.gate)[row]);
      const Pack x = reinterpret_cast<const Pack*>(br.o)[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += g * Elem<T>::to_float(x.x[e]);
    }
    Pack out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.x[e] = Elem<T>::from_float(acc[e]);
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
