// The split behind fp32 on tensor cores (Tf32x3 in mma.cuh), for host and device: x = big + small, each a tf32
// value (fp32 bits whose 13 low mantissa bits are zero, which the tensor cores ignore), big = x rounded to tf32
// and small the remainder x - big (exact in fp32) rounded in turn. Host-visible so that its error bounds are tested
// without a GPU (tf32_test.cpp).
#pragma once
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>

namespace nsa::cuda {

__host__ __device__ inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

__host__ __device__ inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// x rounded to tf32, to nearest on the magnitude (ties away from zero), in the bits. Finite x only: within half a
// tf32 ulp of FLT_MAX it would round to infinity.
__host__ __device__ inline uint32_t tf32_round(float x) { return (float_bits(x) + 0x1000u) & 0xffffe000u; }

// x = big + small to within 2^-22 |x|, |x - big| <= 2^-11 |x|.
__host__ __device__ inline void tf32_split(float x, uint32_t& big, uint32_t& small) {
  big = tf32_round(x);
  small = tf32_round(x - bits_float(big));
}

}  // namespace nsa::cuda
