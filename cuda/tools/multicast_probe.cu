// Timing probe (not a test): when the CTAs of a cluster need the same gathered 32 KB tiles, does one TMA
// multicast copy per tile deliver them faster than a copy per CTA? Selected attention is bound by the L2's
// throughput for its tile gathers, so a multicast that reads L2 once for several SMs would raise its ceiling.
//
// Each CTA streams `iters` random 64-row x 256-column bf16 tiles (four 64 x 64 boxes, like a K and a V tile
// of K = V = 128) of a 32 MB tensor through a ring of six stages; one thread produces, one consumes (waits and
// releases). CTAs that share a tile sequence: those of a cluster (share 0), b and b + grid / 2 (1), b and
// b ^ 1 (2), the later ones `lag` tiles behind. "own" loads a tile once per CTA; "multicast" once per cluster,
// issued by rank 0 (share 0) or by rank stage % C (share 3) once every CTA's stage is free, or as a plain copy
// per CTA that rank 0 issues back to back into each CTA's stage (share 4). Prints ms and the bytes delivered
// to shared memory and those the copies requested (multicast: once per cluster) per second.
//
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I. cuda/tools/multicast_probe.cu -lcuda
//        -o multicast_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/tma.cuh"
#include "cuda/tools/tool_util.h"

namespace {

using namespace nsa::cuda;

constexpr int kStages = 6, kBoxBytes = 8192, kTileBytes = 4 * kBoxBytes, kRows = 65536, kTiles = kRows / 64;

using nsa::tools::ok;

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// One arrival on the barrier at the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_remote(uint64_t* bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void tma_multicast_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar,
                                                 uint16_t ctas) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3, %4}], [%5], %6;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)), "h"(ctas)
      : "memory");
}

__device__ __forceinline__ uint32_t remote_addr(const void* p, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  return remote;
}
// A plain copy into CTA-of-the-cluster shared memory given by shared::cluster addresses.
__device__ __forceinline__ void tma_load_3d_to(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint32_t hash(uint32_t a, uint32_t b) {
  uint32_t x = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u;
  x ^= x >> 15, x *= 0x2C1B3C6Du, x ^= x >> 12;
  return x;
}

template <int C, bool kMulticast>
__global__ void __launch_bounds__(64, 1) probe(const __grid_constant__ CUtensorMap map, int iters, int share, int lag) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kTileBytes);
  uint64_t* empty = full + kStages;
  uint64_t* ready = empty + kStages;  // rank 0's: every CTA's stage is free
  const uint32_t rank = C > 1 ? cluster_rank() : 0;
  // The CTAs that share a tile sequence: the cluster's (share 0), b and b + grid / 2 (1), b and b ^ 1 (2); the
  // sharer of position n reads the sequence `lag` * n tiles ahead.
  const uint32_t half = gridDim.x / 2;
  const uint32_t seq = share == 0 || share >= 3 ? blockIdx.x / C : share == 1 ? blockIdx.x % half : blockIdx.x / 2;
  const uint32_t pos = share == 0 || share >= 3 ? rank : share == 1 ? blockIdx.x / half : blockIdx.x & 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], 1), mbar_init(&ready[s], C);
    mbar_init_fence();
  }
  if (C > 1) cluster_sync();
  else __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 0; i < iters; ++i) {
      const int s = i % kStages;
      const uint32_t ph = (i / kStages) & 1;
      mbar_wait(&empty[s], ph ^ 1);
      mbar_arrive_expect_tx(&full[s], kTileBytes);
      const int row = int(hash(seq, i + lag * pos) % kTiles) * 64;
      if (kMulticast) {
        // The stage's issuer: rank 0 (share 0) or rank s % C (share 3).
        const uint32_t issuer = share == 3 ? s % C : 0;
        mbar_arrive_remote(&ready[s], issuer);
        if (rank == issuer) {
          mbar_wait(&ready[s], ph);
          if (share == 4) {  // a plain copy per CTA, issued back to back by rank 0
            for (uint32_t r = 0; r < C; ++r)
              for (int b = 0; b < 4; ++b)
                tma_load_3d_to(remote_addr(smem + s * kTileBytes + b * kBoxBytes, r), &map, 64 * b, 0, row,
                               remote_addr(&full[s], r));
          } else
          for (int b = 0; b < 4; ++b)
            tma_multicast_3d(smem + s * kTileBytes + b * kBoxBytes, &map, 64 * b, 0, row, &full[s], uint16_t((1u << C) - 1));
        }
      } else {
        for (int b = 0; b < 4; ++b) tma_load_3d(smem + s * kTileBytes + b * kBoxBytes, &map, 64 * b, 0, row, &full[s]);
      }
    }
  } else if (threadIdx.x == 32) {
    for (int i = 0; i < iters; ++i) {
      const int s = i % kStages;
      mbar_wait(&full[s], (i / kStages) & 1);
      mbar_arrive(&empty[s]);
    }
  }
  __syncwarp();
  if (C > 1) cluster_sync();
}

template <int C, bool kMulticast>
void run(const CUtensorMap& map, int sms, int share = 0, int lag = 0) {
  auto kernel = probe<C, kMulticast>;
  const int bytes = kStages * kTileBytes + 3 * kStages * 8;
  ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "smem attribute");
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = C, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cfg.blockDim = dim3(64), cfg.dynamicSmemBytes = bytes, cfg.attrs = &attr, cfg.numAttrs = 1;
  cfg.gridDim = dim3(unsigned(sms / C * C));
  int clusters = 0;
  ok(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg), "max active clusters");
  cfg.gridDim = dim3(unsigned(std::min(clusters, sms / C) * C));
  const int iters = 6000;
  const std::vector<float> ms =
      nsa::tools::sorted_run_ms(7, [&] { ok(cudaLaunchKernelEx(&cfg, kernel, map, iters, share, lag), "launch"); });
  const double t = ms[ms.size() / 2] * 1e-3, delivered = double(cfg.gridDim.x) * iters * kTileBytes;
  const double read = kMulticast ? delivered / C : delivered;
  std::printf("cluster %d %-9s share %d lag %3d CTAs %3u: %7.3f ms, delivered %6.2f TB/s (%5.1f GB/s per SM), requested %5.2f TB/s\n", C,
              kMulticast ? "multicast" : "own", share, lag, cfg.gridDim.x, t * 1e3, delivered / t * 1e-12,
              delivered / t / cfg.gridDim.x * 1e-9, read / t * 1e-12);
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  ok(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  void* data = nullptr;
  ok(cudaMalloc(&data, size_t(kRows) * 256 * 2), "malloc");
  ok(cudaMemset(data, 0, size_t(kRows) * 256 * 2), "memset");
  const CUtensorMap map = make_tensor_map_3d(data, true, 256, 1, kRows, 64, 1, 64, "probe");
  const int sms = prop.multiProcessorCount;
  run<1, false>(map, sms);
  run<2, false>(map, sms);
  run<4, false>(map, sms);
  run<1, false>(map, sms, 1);
  run<1, false>(map, sms, 2);
  for (int lag : {2, 6, 24}) run<2, false>(map, sms, 0, lag);
  for (int share : {0, 3, 4}) {
    run<2, true>(map, sms, share);
    run<4, true>(map, sms, share);
  }
  return 0;
}
