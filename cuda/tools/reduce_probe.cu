// Timing probe (not a test): how fast can CTAs add fp32 tiles into scattered rows of a gradient, as the
// key-block backward adds dQ = dS K into dq? Each CTA (128 threads, two per SM) adds `iters` tiles of 16 rows x
// 128 fp32 (8 KB, one token's 16 query heads at G = 16) to randomly chosen 8 KB groups of a buffer, by
//   red.v4: 16-byte vector atomics from registers (atomicAdd on float4, four per thread and tile);
//   red.v2: 8-byte vector atomics (atomicAdd on float2, eight per thread and tile);
//   bulk: the tile written to one of four shared-memory buffers, then one bulk reduce copy
//         (cp.reduce.async.bulk .add.f32) issued by thread 0;
//   store: plain 16-byte stores (no reduction: the bound of moving the bytes).
// over the whole buffer (1 GiB) and over its first 32 MiB (L2-resident, as a token window keeps dq rows).
// Prints ms and GB/s of tile bytes added.
//
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I. cuda/tools/reduce_probe.cu -o reduce_probe
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/tools/tool_util.h"

namespace {

constexpr int kThreads = 128, kTileFloats = 16 * 128, kBuffers = 4;

__device__ __forceinline__ uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int kMode>  // 0 red.v4, 1 bulk, 2 store, 3 red.v2
__global__ void __launch_bounds__(kThreads, 2) add_tiles(float* dq, uint32_t groups, int iters) {
  __shared__ __align__(128) float buf[kBuffers][kTileFloats];
  const int tid = threadIdx.x;
  for (int i = 0; i < iters; ++i) {
    const uint32_t g = mix(blockIdx.x * 7919u + uint32_t(i)) % groups;
    float* dst = dq + size_t(g) * kTileFloats;
    const float x = float(i & 7) * 0.25f;
    if constexpr (kMode == 1) {
      float* b = buf[i % kBuffers];
      if (tid == 0) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kBuffers - 1) : "memory");
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<float4*>(b + 4 * tid + 512 * j) = make_float4(x, x + 1.f, x + 2.f, x + 3.f);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
      if (tid == 0) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                     "r"(smem_u32(b)), "n"(kTileFloats * 4)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    } else if constexpr (kMode == 3) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        atomicAdd(reinterpret_cast<float2*>(dst + 2 * tid + 256 * j), make_float2(x, x + 1.f));
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float4* p = reinterpret_cast<float4*>(dst + 4 * tid + 512 * j);
        const float4 v = make_float4(x, x + 1.f, x + 2.f, x + 3.f);
        if constexpr (kMode == 0) atomicAdd(p, v);
        else *p = v;
      }
    }
  }
  if constexpr (kMode == 1)
    if (tid == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

}  // namespace

int main() {
  using nsa::tools::ok;
  const uint32_t all_groups = (1u << 30) / (kTileFloats * 4), l2_groups = (32u << 20) / (kTileFloats * 4);
  float* dq = nullptr;
  ok(cudaMalloc(&dq, size_t(all_groups) * kTileFloats * 4), "malloc");
  ok(cudaMemset(dq, 0, size_t(all_groups) * kTileFloats * 4), "memset");
  int sms = 0;
  ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attribute");
  const int ctas = 2 * sms, iters = 4096;
  const double bytes = double(ctas) * iters * kTileFloats * 4;
  const char* names[] = {"red.v4", "bulk reduce", "store", "red.v2"};
  for (uint32_t groups : {all_groups, l2_groups}) {
    for (int mode = 0; mode < 4; ++mode) {
      auto launch = [&] {
        if (mode == 0) add_tiles<0><<<ctas, kThreads>>>(dq, groups, iters);
        else if (mode == 1) add_tiles<1><<<ctas, kThreads>>>(dq, groups, iters);
        else if (mode == 2) add_tiles<2><<<ctas, kThreads>>>(dq, groups, iters);
        else add_tiles<3><<<ctas, kThreads>>>(dq, groups, iters);
      };
      launch();
      ok(cudaDeviceSynchronize(), names[mode]);
      const std::vector<float> ms = nsa::tools::sorted_run_ms(5, launch);
      std::printf("%-12s over %5u MiB: %8.3f ms  %7.1f GB/s\n", names[mode], groups * kTileFloats * 4 >> 20,
                  ms[2], bytes / (ms[2] * 1e6));
    }
  }
  ok(cudaFree(dq), "free");
  return 0;
}
