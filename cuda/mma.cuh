// The tensor-core and shared-memory primitives every CUDA kernel here builds on: the mma.sync m16n8k16 of each
// 16-bit element type, fp32 products on tensor cores as three tf32 mma (Tf32x3), ldmatrix (by pointer or by 32-bit
// shared address) and cp.async.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/tf32.h"

namespace nsa::cuda {

// ---- element type: how two fp32 values become one mma operand register, and which mma to issue ----
template <typename T> struct MmaElem;
template <> struct MmaElem<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // d += a (16x16, row-major) * b (16x8, column-major)
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaElem<__half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- fp32 on tensor cores: three tf32 products (the "3xTF32" split) ----
// A tf32 operand keeps 10 of fp32's 23 mantissa bits. x = big + small with big = x rounded to tf32 and small the
// exact remainder, rounded to tf32 in turn; a * b ~ a_big b_big + a_big b_small + a_small b_big, the dropped
// a_small b_small and the roundings within ~2^-21 of |a b|: close to fp32's own products (2^-24), where one tf32
// product (2^-11) would miss the fp32 tolerance (nsa-spec §5.1: rel-L2 1e-5) by two orders of magnitude.
struct Tf32x3 {
  // The operand split of tf32.h, on a register holding fp32 bits.
  __device__ __forceinline__ static void split(uint32_t x_bits, uint32_t& big, uint32_t& small) {
    tf32_split(__uint_as_float(x_bits), big, small);
  }
  // d += a (16x8, row-major) * b (8x8, column-major), one tf32 mma.
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // acc[j] += a_big b_big[j] and cross[j] += a_big b_small[j] + a_small b_big[j] for N tiles j (cross may be
  // acc), issued kind by kind across the tiles so that N dependency chains are in flight, not one.
  template <int N>
  __device__ __forceinline__ static void mma3(float (&acc)[N][4], float (&cross)[N][4], const uint32_t (&a_big)[4],
                                              const uint32_t (&a_small)[4], const uint32_t (&b_big)[N][2],
                                              const uint32_t (&b_small)[N][2]) {
#pragma unroll
    for (int j = 0; j < N; ++j) mma(cross[j], a_small, b_big[j][0], b_big[j][1]);
#pragma unroll
    for (int j = 0; j < N; ++j) mma(cross[j], a_big, b_small[j][0], b_small[j][1]);
#pragma unroll
    for (int j = 0; j < N; ++j) mma(acc[j], a_big, b_big[j][0], b_big[j][1]);
  }
};

// ---- shared-memory primitives ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Four 8x8 b16 matrices: lanes 8m..8m+7 give the row addresses of matrix m; lane i receives row i / 4,
// columns 2 (i % 4) and 2 (i % 4) + 1 of each matrix, which is the mma A / B fragment layout.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4(r, smem_addr(p)); }
// The same, transposed: the B fragments of two 8-column groups of a row-major [16 x 16] tile.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  ldmatrix_x4_trans(r, smem_addr(p));
}
// 16 bytes global -> shared; `valid == false` writes zeros (src-size 0 reads nothing, but `src` must still be
// a mapped address: callers pass the tensor's base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared (both 4-byte aligned).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}


}  // namespace nsa::cuda
