// Selected attention forward (nsa-spec §2.4), block-major, for small query groups. Where every token gathers
// its own S blocks, a group of G < 16 heads fills G rows of a 16-row mma tile and each token loads its blocks
// alone. Here each selected key block gathers the queries that selected it instead, so one load of a block's
// keys serves full 16-row tiles at any G. Three steps, all on the caller's stream:
//  1. lists: the (token, slot) entries of every (kv head, sequence, block), by a counting sort (count, scan,
//     scatter: selection_lists.cuh), and per (token, kv head, slot) the entry's place in them;
//  2. per entry, attention of its G query rows over its block's keys alone: o normalised by its own sum (in the
//     input dtype) and its lse (fp32), into scratch; a CTA of 4 warps takes up to 64 rows of one block;
//  3. per query row, the merge of its slots' results: lse = log sum_j exp(lse_j), o = sum_j exp(lse_j - lse) o_j.
// An entry is valid as in the reference: slot j < block_count, block c >= 0 and its first key c BS <= t. A row
// with no valid entry gets o = 0, lse = 0. The three steps run per window of tokens, so that the scratch they
// need (the partial results dominate: a token's H S entries x G x V elements) stays bounded at any length.
#include "cuda/selected_attention_blocks.h"

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/selected_runs.cuh"
#include "cuda/selection_lists.cuh"

namespace nsa::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 16;        // query rows per warp (the mma's M)
constexpr int kMaxKeys = 128;    // BS <= 128
constexpr int kPad = 8;          // elements of padding per shared-memory row: ldmatrix rows in distinct banks
// Partial results per window of tokens, by default.
constexpr size_t kWindowBytes = size_t(1) << 30;

// The entry lists (selection_lists.cuh: buckets (kv head, sequence, block), chunks of kWarps * 16 / G entries,
// the window's tokens [tok0, tok1)) and what the attention and merge steps add.
struct BlockParams : EntryLists {
  int G;
  RunSplit split;          // runs marked there are left to the union walk; alike null: no split
  int run;                 // the split's run length
};

// Whether the token at position t of sequence seq, kv head h, belongs to a run the union walk takes.
__device__ __forceinline__ bool left_to_union(const BlockParams& p, int seq, int64_t t, int h) {
  return p.split.alike && p.split.alike[p.split.flag(seq, t / p.run, p.H, h)];
}

// The entries that the block-major path leaves to the union walk (build_entry_lists' skip).
struct LeftToUnion {
  BlockParams p;
  __device__ bool operator()(int seq, int64_t t, int h) const { return left_to_union(p, seq, t, h); }
};

// Step 2: CTA chunk i of the bucket whose chunk range holds it. Partial results per entry and head g of the
// entry's token: o_part[(pos G + g) V ...] (normalised, input dtype), lse_part[pos G + g] (natural log).
template <typename T, int KD, int VD>
__global__ void __launch_bounds__(kWarps * 32) block_attention(const BlockParams p, const T* __restrict__ q,
                                                               const T* __restrict__ k, const T* __restrict__ v,
                                                               const int* offsets, const int* chunk_offsets,
                                                               const int2* list, T* o_part, float* lse_part) {
  constexpr int kKS = KD + kPad, kVS = VD + kPad;  // shared row strides (elements)
  extern __shared__ __align__(16) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);            // [BS][kKS]
  T* vs = ks + p.BS * kKS;                       // [BS][kVS]
  T* qs = vs + p.BS * kVS;                       // [kWarps][16][kKS]
  const DeviceLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, G = p.G, per_warp = kRows / G;
  // A contiguous range of chunks per CTA: consecutive chunks mostly share their bucket, whose keys then stay.
  const int64_t chunks = chunk_offsets[p.buckets];
  const int64_t chunk_end = chunks * (blockIdx.x + 1) / gridDim.x;
  int64_t loaded = -1;  // the bucket whose K and V are in shared memory
  for (int64_t i = chunks * blockIdx.x / gridDim.x; i < chunk_end; ++i) {
    const int64_t b = chunk_bucket(chunk_offsets, p.buckets, i);
    int seq, block, h;
    p.locate(b, seq, block, h);
    const int first = offsets[b] + int(i - chunk_offsets[b]) * p.per_chunk;
    const int n = min(p.per_chunk, offsets[b + 1] - first);
    const DeviceSequence sq = L.seqs[seq];
    const int64_t key0 = sq.batch * L.T + sq.start + int64_t(block) * p.BS;  // the block's first key row
    const int64_t rest_keys = sq.length - int64_t(block) * p.BS;
    const int keys = int(rest_keys < p.BS ? rest_keys : p.BS);

    __syncthreads();  // the previous chunk is done with shared memory
    // K and V of the block unless already there (rows past the sequence zero), the warps' Q rows (rows past
    // the chunk zero).
    if (b != loaded) {
      for (int x = threadIdx.x; x < p.BS * (KD / 8); x += blockDim.x) {
        const int r = x / (KD / 8), c8 = x % (KD / 8);
        cp_async_16(ks + r * kKS + c8 * 8, r < keys ? k + ((key0 + r) * p.H + h) * KD + c8 * 8 : k, r < keys);
      }
      for (int x = threadIdx.x; x < p.BS * (VD / 8); x += blockDim.x) {
        const int r = x / (VD / 8), c8 = x % (VD / 8);
        cp_async_16(vs + r * kVS + c8 * 8, r < keys ? v + ((key0 + r) * p.H + h) * VD + c8 * 8 : v, r < keys);
      }
      loaded = b;
    }
    T* qw = qs + warp * kRows * kKS;
    for (int x = lane; x < kRows * (KD / 8); x += 32) {
      const int r = x / (KD / 8), c8 = x % (KD / 8), e = warp * per_warp + r / G;
      const bool ok = e < n;
      const int64_t flat = ok ? list[first + e].x : 0;
      cp_async_16(qw + r * kKS + c8 * 8, ok ? q + (flat * L.HQ + int64_t(h) * G + r % G) * KD + c8 * 8 : q, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (warp * per_warp >= n) continue;

    // This lane's rows g and g + 8: entry e[ri], token t[ri] (its last visible key, relative to the block).
    const int g = lane / 4;
    int last[2];
    for (int ri = 0; ri < 2; ++ri) {
      const int e = warp * per_warp + (g + 8 * ri) / G;
      if (e < n) {
        const int64_t flat = list[first + e].x;
        last[ri] = int(flat - key0);  // the token's offset from the block's first key
      } else {
        last[ri] = -1;  // no row: every key masked
      }
    }
    // S = Q K^T over the block's keys, in 16-key groups.
    float s[kMaxKeys / 8][4];
    const int mi = lane >> 3;
#pragma unroll
    for (int nt = 0; nt < kMaxKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks16 = 0; ks16 < KD / 16; ++ks16) {
      uint32_t a[4];
      ldmatrix_x4(a, qw + (8 * (mi & 1) + (lane & 7)) * kKS + 16 * ks16 + 8 * (mi >> 1));
#pragma unroll
      for (int kg = 0; kg < kMaxKeys / 16; ++kg) {
        if (16 * kg >= p.BS) break;
        uint32_t bk[4];
        ldmatrix_x4(bk, ks + (16 * kg + 8 * (mi >> 1) + (lane & 7)) * kKS + 16 * ks16 + 8 * (mi & 1));
        MmaElem<T>::mma(s[2 * kg], a, bk[0], bk[1]);
        MmaElem<T>::mma(s[2 * kg + 1], a, bk[2], bk[3]);
      }
    }
    // Softmax over the visible keys (key x visible to row ri when x <= last[ri]), base 2.
    const float scale_log2 = L.scale * 1.4426950408889634f;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kMaxKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * nt + 2 * (lane % 4) + (e & 1);
        s[nt][e] = key < p.BS && key <= last[e >> 1] ? s[nt][e] * scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 1));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 2));
    }
#pragma unroll
    for (int nt = 0; nt < kMaxKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float base = mx[e >> 1] == -INFINITY ? 0.f : mx[e >> 1];
        s[nt][e] = exp2_ftz(s[nt][e] - base);
        sum[e >> 1] += s[nt][e];
      }
    // O = P V.
    float o[VD / 8][4];
#pragma unroll
    for (int nt = 0; nt < VD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kMaxKeys / 16; ++kk) {
      if (16 * kk >= p.BS) break;
      const uint32_t pa[4] = {MmaElem<T>::pack(s[2 * kk][0], s[2 * kk][1]), MmaElem<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                              MmaElem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              MmaElem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const int vrow = 16 * kk + 8 * (mi & 1) + (lane & 7);
#pragma unroll
      for (int dt = 0; dt < VD / 16; ++dt) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vs + vrow * kVS + 16 * dt + 8 * (mi >> 1));
        MmaElem<T>::mma(o[2 * dt], pa, vb[0], vb[1]);
        MmaElem<T>::mma(o[2 * dt + 1], pa, vb[2], vb[3]);
      }
    }
    // The rows' partial results.
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float total = sum[ri];
      total += __shfl_xor_sync(~0u, total, 1);
      total += __shfl_xor_sync(~0u, total, 2);
      const int r = g + 8 * ri, e = warp * per_warp + r / G;
      if (e >= n) continue;
      const int64_t at = int64_t(first + e) * G + r % G;
      const float inv = 1.f / total;  // the token sees the block's first key: total >= 1
      T* out = o_part + at * VD + 2 * (lane % 4);
#pragma unroll
      for (int nt = 0; nt < VD / 8; ++nt)
        *reinterpret_cast<uint32_t*>(out + 8 * nt) = MmaElem<T>::pack(o[nt][2 * ri] * inv, o[nt][2 * ri + 1] * inv);
      if (lane % 4 == 0) lse_part[at] = (mx[ri] + log2f(total)) * 0.69314718055994531f;
    }
  }
}

// Step 3: one warp per query row (flat token, head) of the window: its slots' partial results merged by their lse.
template <typename T, int VD>
__global__ void merge_partials(const BlockParams p, const int* place, const T* o_part, const float* lse_part, T* o,
                               float* lse) {
  constexpr int kPer = VD / 32;  // columns per lane
  const int lane = threadIdx.x % 32;
  const int64_t row_end = p.tok1 * p.L.HQ;
  for (int64_t row = p.tok0 * p.L.HQ + (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; row < row_end;
       row += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t flat = row / p.L.HQ;
    const int hq = int(row % p.L.HQ), h = hq / p.G, g = hq % p.G;
    const int seq = p.L.token_seq[flat];
    if (seq >= 0 && left_to_union(p, seq, flat - (p.L.seqs[seq].batch * p.L.T + p.L.seqs[seq].start), h)) continue;
    const int* slots = place + ((flat - p.tok0) * p.H + h) * p.S;
    float m = -INFINITY;
    for (int j = 0; j < p.S; ++j) {
      const int pos = slots[j];
      if (pos >= 0) m = fmaxf(m, lse_part[int64_t(pos) * p.G + g]);
    }
    float acc[kPer] = {}, total = 0.f;
    if (m != -INFINITY) {
      for (int j = 0; j < p.S; ++j) {
        const int pos = slots[j];
        if (pos < 0) continue;
        const int64_t at = int64_t(pos) * p.G + g;
        const float w = __expf(lse_part[at] - m);
        total += w;
#pragma unroll
        for (int c = 0; c < kPer; ++c) acc[c] += w * Elem<T>::to_float(o_part[at * VD + lane + 32 * c]);
      }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int c = 0; c < kPer; ++c) o[row * VD + lane + 32 * c] = Elem<T>::from_float(acc[c] * inv);
    if (lane == 0) lse[row] = total > 0.f ? m + logf(total) : 0.f;
  }
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// Tokens per window: partial results within window_bytes (at least one token), entries within int32.
int64_t window_tokens(const DeviceLayout& L, size_t window_bytes, size_t elem_bytes) {
  const int64_t per_token = L.H * L.block_count;
  const int64_t by_bytes = int64_t(window_bytes / (size_t(per_token) * size_t(L.G()) * size_t(L.V) * elem_bytes));
  return std::max<int64_t>(1, std::min({by_bytes, L.B * L.T, ((int64_t(1) << 31) - 1) / per_token}));
}

template <typename T>
void run_blocks(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v, const int32_t* indices,
                const int32_t* counts, const DeviceLayout& L, cudaStream_t s, const RunSplit* split,
                size_t window_bytes) {
  BlockParams p{};
  static_cast<EntryLists&>(p) = EntryLists::of(indices, counts, L, kWarps * (kRows / int(L.G())));
  if (split) p.split = *split;
  p.run = run_tokens(int(L.G()));
  p.G = int(L.G());
  const int64_t window = window_tokens(L, window_bytes ? window_bytes : kWindowBytes, sizeof(T));
  const int64_t entries = window * L.H * L.block_count;  // a window's, an upper bound on the valid ones
  // Scratch: counts, fill cursors, entry and chunk offsets (buckets + 1 each), the scan's temporary storage,
  // the lists, the places, the partial results.
  const size_t scan_bytes = entry_list_scan_bytes(p.buckets, s);
  const size_t ints = align256(size_t(p.buckets + 1) * 4);
  const size_t bytes_counts = 4 * ints, bytes_scan = align256(scan_bytes), bytes_list = align256(size_t(entries) * 8),
               bytes_place = align256(size_t(entries) * 4),
               bytes_o = align256(size_t(entries) * p.G * L.V * sizeof(T)), bytes_lse = align256(size_t(entries) * p.G * 4);
  const size_t total = bytes_counts + bytes_scan + bytes_list + bytes_place + bytes_o + bytes_lse;
  // The stream-ordered pool keeps this much between calls instead of mapping it again each time.
  int device = 0;
  cudaMemPool_t pool;
  uint64_t keep = 0;
  CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice(selected_attention_blocks)");
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool(selected_attention_blocks)");
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolGetAttribute");
  if (keep < total) {
    keep = total;
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  }
  StreamScratch scratch(total, s, "cudaMallocAsync(selected_attention_blocks scratch)");
  unsigned char* base = scratch.as<unsigned char>();
  EntryListArrays a;
  a.counts = reinterpret_cast<int*>(base);
  a.fill = reinterpret_cast<int*>(base + ints);
  a.offsets = reinterpret_cast<int*>(base + 2 * ints);
  a.chunk_offsets = reinterpret_cast<int*>(base + 3 * ints);
  a.scan_tmp = base + bytes_counts;
  a.scan_bytes = scan_bytes;
  a.list = reinterpret_cast<int2*>(base + bytes_counts + bytes_scan);
  a.place = reinterpret_cast<int*>(base + bytes_counts + bytes_scan + bytes_list);
  T* o_part = reinterpret_cast<T*>(base + bytes_counts + bytes_scan + bytes_list + bytes_place);
  float* lse_part = reinterpret_cast<float*>(base + bytes_counts + bytes_scan + bytes_list + bytes_place + bytes_o);

  // The attention kernel for K and V, its shared memory and a grid of every CTA that fits: set once for all
  // windows.
  auto attention = L.K == 128 ? (L.V == 128 ? block_attention<T, 128, 128> : block_attention<T, 128, 64>)
                              : (L.V == 128 ? block_attention<T, 64, 128> : block_attention<T, 64, 64>);
  auto merge = L.V == 128 ? merge_partials<T, 128> : merge_partials<T, 64>;
  const int attention_bytes =
      int((p.BS * (L.K + kPad) + p.BS * (L.V + kPad) + kWarps * kRows * (L.K + kPad)) * int64_t(sizeof(T)));
  CUDA_CHECK(cudaFuncSetAttribute(attention, cudaFuncAttributeMaxDynamicSharedMemorySize, attention_bytes),
             "cudaFuncSetAttribute(selected_attention_blocks block_attention)");
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attention, kWarps * 32, attention_bytes),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor(selected_attention_blocks)");
  const unsigned attention_grid = unsigned(
      std::max(per_sm, 1) * device_attribute(cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute(multiprocessor count)"));
  const int threads = 256;
  for (p.tok0 = 0; p.tok0 < L.B * L.T; p.tok0 = p.tok1) {  // windows of tokens, one after the other on s
    p.tok1 = std::min(L.B * L.T, p.tok0 + window);
    build_entry_lists(p, LeftToUnion{p}, a, s, "selected_attention_blocks");

    attention<<<attention_grid, kWarps * 32, attention_bytes, s>>>(
        p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), a.offsets, a.chunk_offsets,
        a.list, o_part, lse_part);
    check_launch("selected_attention_blocks block_attention");

    const int64_t rows = (p.tok1 - p.tok0) * L.HQ;
    const unsigned mgrid = unsigned(std::min<int64_t>(div_up(rows * 32, threads), 132 * 64));
    merge<<<mgrid, threads, 0, s>>>(p, a.place, o_part, lse_part, static_cast<T*>(o_slc), lse_slc);
    check_launch("selected_attention_blocks merge_partials");
  }
}

}  // namespace

bool selected_blocks_fits(const DeviceLayout& L) {
  if (L.dtype == ElemType::F32 || L.H == 0 || L.num_seqs == 0 || L.B * L.T == 0) return false;
  if (16 % L.G() != 0 || L.G() > 4) return false;
  if ((L.K != 64 && L.K != 128) || (L.V != 64 && L.V != 128)) return false;
  if (L.block_size % 16 != 0 || L.block_size > kMaxKeys) return false;
  return L.B * L.T < (int64_t(1) << 31) && L.H * L.block_count < (int64_t(1) << 31);
}

void selected_attention_blocks(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                               const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                               cudaStream_t s, const RunSplit* split, size_t window_bytes) {
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore)
      run_blocks<T>(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s, split, window_bytes);
  });
}

}  // namespace nsa::cuda
