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

template <typename T>
__global__ void gate_kernel(T* __restrict__ o,  // [B, T, HQ, V]
                            Branch cmp, Branch slc, Branch swa, int64_t rows, int64_t V) {
  const int64_t n = rows * V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / V;
    float acc = 0.f;
    const Branch branches[3] = {slc, cmp, swa};
    for (const Branch& br : branches)
      if (br.o && br.gate)
        acc += Elem<T>::to_float(static_cast<const T*>(br.gate)[row]) * Elem<T>::to_float(static_cast<const T*>(br.o)[i]);
    o[i] = Elem<T>::from_float(acc);
  }
}

}  // namespace

void gate_forward(void* o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp, const void* g_slc,
                  const void* g_swa, const DeviceLayout& L, cudaStream_t s) {
  const int64_t rows = L.B * L.T * L.HQ;
  if (rows == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(div_up(rows * L.V, threads), 65536);
    gate_kernel<T><<<unsigned(blocks), threads, 0, s>>>(static_cast<T*>(o), Branch{o_cmp, g_cmp}, Branch{o_slc, g_slc},
                                                       Branch{o_swa, g_swa}, rows, L.V);
    check_launch("gate_kernel");
  });
}

}  // namespace nsa::cuda
