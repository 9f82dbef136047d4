// Selected attention forward (nsa-spec §2.4), streamed with TMA on sm_90, for groups of 4, 8 or 16k query
// heads.
//
// A CTA takes a run of consecutive tokens of one sequence (selected_runs.cuh) and one 16-head chunk of a kv
// head's query group (G = 4, 8: the group's heads in the first G of 16 rows, the others discarded).
// Each token's valid selections become items: 64-key tiles (a block of BS = 64 is one tile, BS = 128 two).
// A producer warp streams the items, token after token, through a ring of shared-memory stages: per item one
// tensor-map copy per 64-column box of K and V (and of Q with a token's first item), counted on the stage's
// "full" mbarrier. Four consumer warps split each tile's keys, 16 each, and keep their own online softmax
// (a lazy reference max that moves only by more than 2^8, so O is rarely rescaled); after a token's last
// item they merge their four partial results through that item's stage and release it on its "empty"
// mbarrier. Nothing waits CTA-wide per tile, and a copy is one instruction per box instead of a loop of
// per-thread 16-byte copies, whose instruction count limited the per-token walk of the tile kernel. On
// independent selections every token gathers its own blocks; this kernel moves them at ~89% of the L2's
// throughput (ncu, H100), so fewer bytes, not fewer instructions, is what is left to gain.
#include "cuda/selected_attention_streamed.h"

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/selected_runs.cuh"
#include "cuda/tma.cuh"

namespace nsa::cuda {
namespace {

constexpr int kConsumerWarps = 4;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // the last warp produces
constexpr int kTileKeys = 64;
constexpr int kHeads = 16;                            // query heads per CTA
constexpr int kBoxBytes = kTileKeys * 128;            // 64 key rows x 64 columns of 16-bit elements
constexpr int kQBoxBytes = kHeads * 128;              // 16 head rows x 64 columns

// Ring stages: a compile-time knob for tuning (2 measured 5% slower than 3 on an H100; 4 would leave one CTA
// per SM).
#ifndef NSA_STREAMED_STAGES
#define NSA_STREAMED_STAGES 3
#endif
constexpr int kStages = NSA_STREAMED_STAGES;

// One stage: the K boxes, the V boxes, then the Q boxes (written with a token's first item only).
template <int KD, int VD>
struct Stage {
  static constexpr int kKBoxes = KD / 64, kVBoxes = VD / 64;
  static constexpr int kK = 0;
  static constexpr int kV = kKBoxes * kBoxBytes;
  static constexpr int kQ = kV + kVBoxes * kBoxBytes;
  static constexpr int kBytes = kQ + kKBoxes * kQBoxBytes;
  // The merge of four partial outputs needs two fp32 [16 x VD] slots in the K and V boxes.
  static_assert(2 * kHeads * VD * 4 <= kQ, "merge slots must fit in a stage's K and V boxes");
};

template <typename T>
struct StreamedParams {
  T* o;                      // [B, T, HQ, V]
  float* lse;                // [B, T, HQ]
  const int32_t* indices;    // [B, T, H, S]
  const int32_t* counts;     // [B, T, H] or null
  const DeviceSequence* seqs;
  int64_t row_tokens;        // T
  int HQ, H, G, S, BS;
  int rows;                  // query heads per CTA: min(G, 16)
  int run;                   // tokens per CTA: run_tokens(G)
  int max_items;             // tiles per token: S * BS / 64
  float scale_log2;          // scale * log2(e): the softmax runs in base 2
  int32_t* path_counts;      // [3] or null
  RunSplit split;            // runs marked there are left to the union walk; alike null: no split
};

// Shared memory: the stages (1024-byte aligned, for the swizzle), then the full and empty barriers, each
// warp's per-row (reference max, sum) for the merge, per token its item count, and its items (first key).
// Two CTAs per SM need it under 113 KB at K = V = 128 with three stages, so there is no alignment slack:
// the dynamic shared memory itself is declared 1024-byte aligned.
struct StreamedSmem {
  unsigned char* stages;
  uint64_t* full;
  uint64_t* empty;
  float* merge;  // [warp][16 rows][2]
  int* count;    // [kMaxRunTokens]
  int* items;    // [run][max_items]
  static size_t bytes(int stage_bytes, int run, int max_items) {
    return size_t(kStages) * stage_bytes + 2 * kStages * sizeof(uint64_t) +
           kConsumerWarps * kHeads * 2 * sizeof(float) + sizeof(int) * (kMaxRunTokens + size_t(run) * max_items);
  }
  __device__ StreamedSmem(unsigned char* raw, int stage_bytes) {
    stages = raw;
    full = reinterpret_cast<uint64_t*>(stages + kStages * stage_bytes);
    empty = full + kStages;
    merge = reinterpret_cast<float*>(empty + kStages);
    count = reinterpret_cast<int*>(merge + kConsumerWarps * kHeads * 2);
    items = count + kMaxRunTokens;
  }
};

// One consumer warp's share of a token: 16 query rows against 16 keys of every item. Thread layout as the
// mma C fragment: rows g = lane / 4 and g + 8 (ri = 0, 1), columns 2 (lane % 4) + {0, 1} of each 8-wide tile.
template <typename T, int KD, int VD>
struct ConsumerState {
  using St = Stage<KD, VD>;
  float o[VD / 8][4];
  uint32_t q[KD / 16][4];
  float ref[2], sum[2];  // reference max (base 2; -inf before any key) and this thread's partial row sums

  // A barrier of the consumer warps only (the producer runs ahead).
  __device__ __forceinline__ static void consumer_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerWarps * 32) : "memory");
  }

  __device__ __forceinline__ void begin(uint32_t stage) {
#pragma unroll
    for (int n = 0; n < VD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    ref[0] = ref[1] = -INFINITY;
    sum[0] = sum[1] = 0.f;
    const int lane = threadIdx.x % 32, mi = lane >> 3;
    // A fragments: matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15) of each 16-column step.
#pragma unroll
    for (int ks = 0; ks < KD / 16; ++ks)
      ldmatrix_x4(q[ks], stage + St::kQ + (ks >> 2) * kQBoxBytes + swizzle128(8 * (mi & 1) + (lane & 7), 2 * (ks & 3) + (mi >> 1)));
  }

  // S = Q K^T for the warp's 16 keys [first_key + 16 warp, + 16) of the item in `stage`: two 8-key tiles,
  // even and odd k-steps in separate chains.
  __device__ __forceinline__ void scores(uint32_t stage, float (&sc)[2][4]) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, mi = lane >> 3;
    float sa[2][4] = {}, sb[2][4] = {};
    const int krow = 16 * warp + 8 * (mi >> 1) + (lane & 7);
#pragma unroll
    for (int ks = 0; ks < KD / 16; ++ks) {
      uint32_t kb[4];
      ldmatrix_x4(kb, stage + St::kK + (ks >> 2) * kBoxBytes + swizzle128(krow, 2 * (ks & 3) + (mi & 1)));
      float(&acc)[2][4] = (ks & 1) ? sb : sa;
      MmaElem<T>::mma(acc[0], q[ks], kb[0], kb[1]);
      MmaElem<T>::mma(acc[1], q[ks], kb[2], kb[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = sa[nt][e] + sb[nt][e];
  }

  // The online softmax of the item's scores `sc` (keys after t masked) and O += P V from `stage`.
  __device__ __forceinline__ void update(uint32_t stage, const float (&sc)[2][4], int first_key, int t,
                                         float scale_log2) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, mi = lane >> 3;
    float x[2][4];
    const int key0 = first_key + 16 * warp + 2 * (lane % 4);
    const bool edge = first_key + kTileKeys - 1 > t;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x[nt][e] = sc[nt][e] * scale_log2;
        if (edge && key0 + 8 * nt + (e & 1) > t) x[nt][e] = -INFINITY;
      }
    float mx[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      mx[ri] = fmaxf(fmaxf(x[0][2 * ri], x[0][2 * ri + 1]), fmaxf(x[1][2 * ri], x[1][2 * ri + 1]));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 1));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 2));
    }
    // Lazy rescale: the reference moves only when a row's max passes it by 2^8 (p <= 256 otherwise).
    const bool need = mx[0] > ref[0] + 8.f || mx[1] > ref[1] + 8.f;
    if (__any_sync(~0u, need)) {
      float alpha[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const float next = mx[ri] > ref[ri] + 8.f ? mx[ri] : ref[ri];
        alpha[ri] = next == ref[ri] ? 1.f : exp2f(ref[ri] - next);
        sum[ri] *= alpha[ri];
        ref[ri] = next;
      }
#pragma unroll
      for (int n = 0; n < VD / 8; ++n) {
        o[n][0] *= alpha[0], o[n][1] *= alpha[0];
        o[n][2] *= alpha[1], o[n][3] *= alpha[1];
      }
    }
    const float base[2] = {ref[0] == -INFINITY ? 0.f : ref[0], ref[1] == -INFINITY ? 0.f : ref[1]};
    float pr[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[nt][e] = exp2f(x[nt][e] - base[e >> 1]);
        sum[e >> 1] += pr[nt][e];
      }
    // P as the A fragment of one 16-key step: (row g | g + 8) x (keys 0-7 | 8-15).
    const uint32_t pa[4] = {MmaElem<T>::pack(pr[0][0], pr[0][1]), MmaElem<T>::pack(pr[0][2], pr[0][3]),
                            MmaElem<T>::pack(pr[1][0], pr[1][1]), MmaElem<T>::pack(pr[1][2], pr[1][3])};
    // O += P V: B fragments of V by transposed ldmatrix, matrices (keys 0-7 | 8-15) x (columns 0-7 | 8-15).
    const int vrow = 16 * warp + 8 * (mi & 1) + (lane & 7);
#pragma unroll
    for (int dt = 0; dt < VD / 16; ++dt) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, stage + St::kV + (dt >> 2) * kBoxBytes + swizzle128(vrow, 2 * (dt & 3) + (mi >> 1)));
      MmaElem<T>::mma(o[2 * dt], pa, vb[0], vb[1]);
      MmaElem<T>::mma(o[2 * dt + 1], pa, vb[2], vb[3]);
    }
  }

  // Merges the four warps' partial results for one token and writes its 16 rows of o and lse. `slots` is
  // the token's last stage (its K and V boxes, no longer read); every consumer warp calls this.
  __device__ __forceinline__ void finish(float* slots, float* merge, const StreamedParams<T>& p, int64_t flat,
                                         int head0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    float mine[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      sum[ri] += __shfl_xor_sync(~0u, sum[ri], 1);
      sum[ri] += __shfl_xor_sync(~0u, sum[ri], 2);
      mine[ri] = sum[ri] > 0.f ? ref[ri] : -INFINITY;
      if (lane % 4 == 0) {
        merge[(warp * kHeads + g + 8 * ri) * 2] = mine[ri];
        merge[(warp * kHeads + g + 8 * ri) * 2 + 1] = sum[ri];
      }
    }
    consumer_sync();
    float top[2], total[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int row = g + 8 * ri;
      top[ri] = -INFINITY;
#pragma unroll
      for (int w = 0; w < kConsumerWarps; ++w) top[ri] = fmaxf(top[ri], merge[(w * kHeads + row) * 2]);
      total[ri] = 0.f;
      if (top[ri] != -INFINITY) {
#pragma unroll
        for (int w = 0; w < kConsumerWarps; ++w)
          total[ri] += merge[(w * kHeads + row) * 2 + 1] * exp2f(merge[(w * kHeads + row) * 2] - top[ri]);
      }
      const float scale = top[ri] == -INFINITY ? 0.f : exp2f(mine[ri] - top[ri]);
#pragma unroll
      for (int n = 0; n < VD / 8; ++n) o[n][2 * ri] *= scale, o[n][2 * ri + 1] *= scale;
    }
    // A tree over two fp32 [16 x VD] slots; 8-column groups XOR-swizzled by row against bank conflicts.
    auto at = [&](int slot, int row, int col) {
      return slots + (slot * kHeads + row) * VD + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
    };
    auto put = [&](int slot) {
#pragma unroll
      for (int n = 0; n < VD / 8; ++n)
#pragma unroll
        for (int ri = 0; ri < 2; ++ri)
          *reinterpret_cast<float2*>(at(slot, g + 8 * ri, 8 * n + 2 * (lane % 4))) =
              make_float2(o[n][2 * ri], o[n][2 * ri + 1]);
    };
    auto add = [&](int slot) {
#pragma unroll
      for (int n = 0; n < VD / 8; ++n)
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const float2 v = *reinterpret_cast<const float2*>(at(slot, g + 8 * ri, 8 * n + 2 * (lane % 4)));
          o[n][2 * ri] += v.x, o[n][2 * ri + 1] += v.y;
        }
    };
    if (warp >= 2) put(warp - 2);
    consumer_sync();
    if (warp < 2) add(warp);
    consumer_sync();
    if (warp == 1) put(0);
    consumer_sync();
    if (warp == 0) {
      add(0);
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        if (g + 8 * ri >= p.rows) continue;  // a head of the next group (G < 16)
        const int64_t row = flat * p.HQ + head0 + g + 8 * ri;
        const float inv = total[ri] > 0.f ? 1.f / total[ri] : 0.f;
        T* out = p.o + row * VD + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < VD / 8; ++n) {
          const uint32_t packed = MmaElem<T>::pack(o[n][2 * ri] * inv, o[n][2 * ri + 1] * inv);
          *reinterpret_cast<uint32_t*>(out + 8 * n) = packed;
        }
        if (lane % 4 == 0) p.lse[row] = total[ri] > 0.f ? (top[ri] + log2f(total[ri])) * 0.69314718055994531f : 0.f;
      }
    }
    // These generic writes precede the TMA writes that will refill this stage.
    fence_proxy_async_smem();
  }
};

// A measurement knob: 1 streams every tile and computes nothing, which times the gather alone (the floor of
// this kernel's design; the outputs are left unwritten).
#ifndef NSA_STREAMED_GATHER_ONLY
#define NSA_STREAMED_GATHER_ONLY 0
#endif
constexpr bool kGatherOnly = NSA_STREAMED_GATHER_ONLY;

template <typename T, int KD, int VD>
__global__ void __launch_bounds__(kThreads, 2) selected_streamed_kernel(const __grid_constant__ CUtensorMap map_q,
                                                                     const __grid_constant__ CUtensorMap map_k,
                                                                     const __grid_constant__ CUtensorMap map_v,
                                                                     const StreamedParams<T> p) {
#if __CUDA_ARCH__ >= 900
  using St = Stage<KD, VD>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  if (smem_addr(smem_raw) & 1023) __trap();  // the swizzled addressing below needs the declared alignment
  const StreamedSmem sm(smem_raw, St::kBytes);
  const StageRing<kStages> ring{sm.full, sm.empty};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const DeviceSequence seq = p.seqs[blockIdx.y];
  const int64_t t0 = int64_t(blockIdx.x) * p.run;
  if (t0 >= seq.length) return;
  const int ntok = int(seq.length - t0 < p.run ? seq.length - t0 : p.run);
  const int chunks = p.G > kHeads ? p.G / kHeads : 1;
  const int kv_head = int(blockIdx.z) / chunks;
  const int head0 = kv_head * p.G + (int(blockIdx.z) % chunks) * kHeads;
  const int64_t key_base = seq.batch * p.row_tokens + seq.start;
  if (p.split.alike && p.split.alike[p.split.flag(blockIdx.y, blockIdx.x, p.H, kv_head)]) return;

  if (threadIdx.x == 0) {
    ring.init(kConsumerWarps);
    mbar_init_fence();
    if (p.path_counts) atomicAdd(p.path_counts + 2, 1);
  }
  // Items: per token, in its selection order, the first key of each 64-key tile of a valid entry (c >= 0,
  // tile start <= t). A token with none gets o = 0, lse = 0 here.
  for (int tk = warp; tk < ntok; tk += kConsumerWarps + 1) {
    const int64_t t = t0 + tk, flat = key_base + t;
    const int n = selection_count(p.counts, flat, p.H, kv_head, p.S);
    const int32_t* idx = p.indices + (flat * p.H + kv_head) * p.S;
    int* mine = sm.items + tk * p.max_items;
    int total = 0;
    for (int j0 = 0; j0 < n; j0 += 32) {
      const int c = j0 + lane < n ? idx[j0 + lane] : -1;
      for (int first = 0; first < p.BS; first += kTileKeys) {
        const int64_t key = int64_t(c) * p.BS + first;
        const bool ok = c >= 0 && key <= t;
        const unsigned votes = __ballot_sync(~0u, ok);
        if (ok) mine[total + __popc(votes & ((1u << lane) - 1))] = int(key);
        total += __popc(votes);
      }
    }
    if (lane == 0) sm.count[tk] = total;
    if (total == 0) {
      for (int i = lane; i < p.rows * VD; i += 32)
        p.o[(flat * p.HQ + head0 + i / VD) * VD + i % VD] = Elem<T>::from_float(0.f);
      if (lane < p.rows) p.lse[flat * p.HQ + head0 + lane] = 0.f;
    }
  }
  __syncthreads();

  if (warp == kConsumerWarps) {  // producer
    if (lane == 0) {
      int it = 0;
      for (int tk = 0; tk < ntok; ++tk) {
        const int n = sm.count[tk];
        for (int j = 0; j < n; ++j, ++it) {
          uint64_t* bar = ring.begin_fill(it, j == 0 ? St::kBytes : St::kQ);
          unsigned char* st = sm.stages + ring.stage(it) * St::kBytes;
          const int row = int(key_base + sm.items[tk * p.max_items + j]);
#pragma unroll
          for (int b = 0; b < St::kKBoxes; ++b) tma_load_3d(st + St::kK + b * kBoxBytes, &map_k, 64 * b, kv_head, row, bar);
#pragma unroll
          for (int b = 0; b < St::kVBoxes; ++b) tma_load_3d(st + St::kV + b * kBoxBytes, &map_v, 64 * b, kv_head, row, bar);
          if (j == 0) {
#pragma unroll
            for (int b = 0; b < St::kKBoxes; ++b)
              tma_load_3d(st + St::kQ + b * kQBoxBytes, &map_q, 64 * b, head0, int(key_base + t0 + tk), bar);
          }
        }
      }
    }
    return;
  }

  ConsumerState<T, KD, VD> cs;
  int it = 0;
  for (int tk = 0; tk < ntok; ++tk) {
    const int n = sm.count[tk];
    const int t = int(t0) + tk;
    for (int j = 0; j < n; ++j, ++it) {
      ring.wait_full(it);
      unsigned char* st = sm.stages + ring.stage(it) * St::kBytes;
      const uint32_t st_addr = smem_addr(st);
      if constexpr (!kGatherOnly) {
        if (j == 0) cs.begin(st_addr);
        float sc[2][4];
        cs.scores(st_addr, sc);
        cs.update(st_addr, sc, sm.items[tk * p.max_items + j], t, p.scale_log2);
        if (j == n - 1) cs.finish(reinterpret_cast<float*>(st), sm.merge, p, key_base + t, head0);
      }
      __syncwarp();
      if (lane == 0) ring.release(it);
    }
  }
#endif
}

int max_items(const DeviceLayout& L) { return L.block_count * (L.block_size / kTileKeys); }

size_t smem_bytes(const DeviceLayout& L) {
  const int stage = int((L.K / 64 + L.V / 64) * kBoxBytes + (L.K / 64) * kQBoxBytes);
  return StreamedSmem::bytes(stage, run_tokens(int(L.G())), max_items(L));
}

// Calls f with the kernel instance for L's K and V.
template <typename T, typename F>
void with_kernel(const DeviceLayout& L, F&& f) {
  if (L.K == 128 && L.V == 128) f(selected_streamed_kernel<T, 128, 128>);
  else if (L.K == 128) f(selected_streamed_kernel<T, 128, 64>);
  else if (L.V == 128) f(selected_streamed_kernel<T, 64, 128>);
  else f(selected_streamed_kernel<T, 64, 64>);
}

}  // namespace

int selected_streamed_ctas_per_sm(const DeviceLayout& L) {
  int ctas = 0;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore) {
      with_kernel<T>(L, [&](auto kernel) {
        const int bytes = int(smem_bytes(L));
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                   "cudaFuncSetAttribute(selected_streamed_kernel)");
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, bytes),
                   "cudaOccupancyMaxActiveBlocksPerMultiprocessor(selected_streamed_kernel)");
      });
    }
  });
  return ctas;
}

bool selected_streamed_fits(const DeviceLayout& L, const void* q, const void* k, const void* v) {
  if (L.dtype == ElemType::F32 || L.H == 0 || L.block_size % kTileKeys != 0) return false;
  if (L.G() % kHeads != 0 && L.G() != 4 && L.G() != 8) return false;
  if ((L.K != 64 && L.K != 128) || (L.V != 64 && L.V != 128)) return false;
  if (L.B * L.T >= (int64_t(1) << 31) || L.num_seqs == 0) return false;
  if (int64_t(run_tokens(int(L.G()))) * L.block_count > kMaxRunEntries) return false;
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16) return false;
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, "cudaDeviceGetAttribute(compute capability)") < 9)
    return false;
  return smem_bytes(L) <=
         size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(max shared memory)"));
}

void selected_attention_streamed(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                 const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                 cudaStream_t s, int32_t* path_counts, const RunSplit* split) {
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore) {
      StreamedParams<T> p{};
      p.o = static_cast<T*>(o_slc);
      p.lse = lse_slc;
      p.indices = block_indices;
      p.counts = block_counts;
      p.seqs = L.seqs;
      p.row_tokens = L.T;
      p.HQ = int(L.HQ), p.H = int(L.H), p.G = int(L.G()), p.S = L.block_count, p.BS = L.block_size;
      p.rows = int(std::min<int64_t>(L.G(), kHeads));
      p.run = run_tokens(int(L.G()));
      p.max_items = max_items(L);
      p.scale_log2 = L.scale * 1.4426950408889634f;
      p.path_counts = path_counts;
      if (split) p.split = *split;
      const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
      const uint64_t rows = uint64_t(L.B * L.T);
      const CUtensorMap map_q = make_tensor_map_3d(q, bf16, L.K, L.HQ, rows, 64, kHeads, 1, "selected_streamed_kernel(q)");
      const CUtensorMap map_k = make_tensor_map_3d(k, bf16, L.K, L.H, rows, 64, 1, kTileKeys, "selected_streamed_kernel(k)");
      const CUtensorMap map_v = make_tensor_map_3d(v, bf16, L.V, L.H, rows, 64, 1, kTileKeys, "selected_streamed_kernel(v)");
      const dim3 grid(unsigned(div_up(L.max_len, p.run)), unsigned(L.num_seqs),
                      unsigned(L.H * std::max<int64_t>(L.G() / kHeads, 1)));
      if (grid.y > 65535 || grid.z > 65535)
        throw CudaError("selected_streamed_kernel: too many sequences or heads for one launch");
      if (grid.x == 0) return;
      const size_t bytes = smem_bytes(L);
      auto launch = [&](auto kernel) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
                   "cudaFuncSetAttribute(selected_streamed_kernel)");
        kernel<<<grid, kThreads, bytes, s>>>(map_q, map_k, map_v, p);
        check_launch("selected_streamed_kernel");
      };
      with_kernel<T>(L, launch);
    }
  });
}

}  // namespace nsa::cuda
