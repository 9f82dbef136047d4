// Hopper (sm_90) bulk-copy primitives: mbarriers, tensor-map (TMA) tile loads into 128-byte-swizzled shared
// memory, and the host-side encoding of a tensor map. The device functions compile to nothing below sm_90;
// callers launch their TMA kernels only on devices of compute capability 9.0 or higher.
#pragma once
#include <cstdint>
#include <string>

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace nsa::cuda {

// ---- mbarrier (shared::cta, 64-bit) ----
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
#endif
}
// Makes barrier initialisation visible to the async (TMA) proxy.
__device__ __forceinline__ void mbar_init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// `count` (>= 1) arrivals at once.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar, uint32_t count) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Waits until the phase of parity `parity` has completed. A fresh barrier counts its (virtual) phase of
// parity 1 as completed, so producers start waiting on "empty" barriers with parity 1.
// The suspend-time hint lets a waiting thread sleep until the phase completes (or the hint's nanoseconds
// pass) instead of returning after the short default limit: a spinning producer otherwise takes issue slots
// from the consumers of its scheduler.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity), "r"(10000000u)
        : "memory");
  } while (!done);
#endif
}
// A shared-memory int that one thread publishes and others poll (release / acquire at CTA scope).
__device__ __forceinline__ void store_release(int* p, int v) {
  asm volatile("st.release.cta.shared::cta.b32 [%0], %1;\n" ::"r"(smem_addr(p)), "r"(v) : "memory");
}
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.cta.shared::cta.b32 %0, [%1];\n" : "=r"(v) : "r"(smem_addr(p)) : "memory");
  return v;
}
// Orders this thread's generic-proxy shared-memory accesses before later async-proxy (TMA) writes.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A ring of shared-memory stages that TMA fills: per stage a "full" mbarrier (the producer's arrival plus
// the bytes it announced) and an "empty" one (one arrival per consumer). Fill n, counted from 0, uses stage
// n % stages, and the phase parities follow from n. kStages = 0 takes the stage count at run time (`count`).
template <int kStages>
struct StageRing {
  uint64_t* full;   // [stages]
  uint64_t* empty;  // [stages]
  int count = kStages;
  __device__ int stages() const { return kStages ? kStages : count; }
  // Callers add mbar_init_fence() once all their barriers are initialised.
  __device__ void init(uint32_t consumers) const {
    for (int s = 0; s < stages(); ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], consumers);
  }
  __device__ int stage(int n) const { return n % stages(); }
  __device__ uint32_t phase(int n) const { return (n / stages()) & 1; }
  // Producer: waits until fill n's stage is free, announces `bytes` for it and returns the barrier its copies
  // count on.
  __device__ uint64_t* begin_fill(int n, uint32_t bytes) const {
    mbar_wait(&empty[stage(n)], phase(n) ^ 1);
    mbar_arrive_expect_tx(&full[stage(n)], bytes);
    return &full[stage(n)];
  }
  // Consumer: waits until fill n has landed.
  __device__ void wait_full(int n) const { mbar_wait(&full[stage(n)], phase(n)); }
  // Consumer: its arrival that frees fill n's stage.
  __device__ void release(int n) const { mbar_arrive(&empty[stage(n)]); }
  // Producer: `arrivals` on fill n's "empty" barrier for consumers that will not read it (after
  // begin_fill(n), so that they count towards fill n's phase).
  __device__ void release_for(int n, uint32_t arrivals) const { mbar_arrive(&empty[stage(n)], arrivals); }
};

// One box of a rank-3 tensor map into shared memory (1024-byte aligned for the 128-byte swizzle), counted
// on `bar`. Coordinates are in elements, innermost first; rows outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
#endif
}
// The same with an L2 cache policy (l2_policy).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar,
                                            uint64_t policy) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4}], "
      "[%5], %6;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#endif
}
// L2 cache policies for the hinted copies.
enum class L2Evict { First, Normal, Last };
template <L2Evict kEvict>
__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t policy = 0;
#if __CUDA_ARCH__ >= 900
  if constexpr (kEvict == L2Evict::First) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  else if constexpr (kEvict == L2Evict::Normal) asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  else asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}

// Byte offset of the 16-byte chunk `chunk` (0..7) of row `row` in a tile of 128-byte rows written by TMA
// with CU_TENSOR_MAP_SWIZZLE_128B: the chunk index is XORed with the row's position in its 8-row group.
__device__ __forceinline__ uint32_t swizzle128(int row, int chunk) {
  return uint32_t(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// ---- host: tensor maps ----
// A rank-3 map over a contiguous [d2, d1, d0] tensor of 16-bit elements, boxes of box0 x box1 x box2
// elements, 128-byte swizzle (box0 * 2 must be <= 128), zeros outside. Throws CudaError naming `what`.
inline CUtensorMap make_tensor_map_3d(const void* base, bool bf16, uint64_t d0, uint64_t d1, uint64_t d2,
                                      uint32_t box0, uint32_t box1, uint32_t box2, const char* what) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (!encode) throw CudaError(std::string(what) + ": the driver has no cuTensorMapEncodeTiled");
  CUtensorMap map{};
  const cuuint64_t dims[3] = {d0, d1, d2};
  const cuuint64_t strides[2] = {d0 * 2, d0 * d1 * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {box0, box1, box2};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                            const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw CudaError(std::string(what) + ": cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ")");
  return map;
}

}  // namespace nsa::cuda
