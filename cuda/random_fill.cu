// Device-side random inputs for benchmarks: a splitmix64 hash of (seed, index), Box-Muller for normals.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace nsa::cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void fill_random_kernel(T* dst, int64_t n, uint64_t seed, bool normal, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed * 0x632be59bd9b4e019ull + uint64_t(i));
    // Two 24-bit uniforms in (0, 1].
    const float u1 = (float((r >> 40) & 0xffffff) + 1.f) * (1.f / 16777216.f);
    const float u2 = (float((r >> 8) & 0xffffff) + 1.f) * (1.f / 16777216.f);
    const float x = normal ? sqrtf(-2.f * logf(u1)) * cospif(2.f * u2) : lo + (hi - lo) * (u1 - 1e-7f);
    dst[i] = Elem<T>::from_float(x);
  }
}

}  // namespace

void fill_random(void* dst, int64_t n, ElemType t, uint64_t seed, bool normal, float lo, float hi, cudaStream_t s) {
  if (n == 0) return;
  dispatch_elem(t, [&](auto tag) {
    using T = decltype(tag);
    const int64_t blocks = std::min<int64_t>(div_up(n, 256), 8192);
    fill_random_kernel<T><<<unsigned(blocks), 256, 0, s>>>(static_cast<T*>(dst), n, seed, normal, lo, hi);
    check_launch("fill_random_kernel");
  });
}

}  // namespace nsa::cuda
