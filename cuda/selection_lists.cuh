// Lists of the valid entries of block_indices by bucket ([token window,] kv head, sequence, block): a counting
// sort on the caller's stream (count, scan, scatter), each bucket's list cut into chunks of up to per_chunk
// entries (a second scan) that a CTA finds by binary search (chunk_bucket). An entry (token, kv head, slot j) is
// valid as in the reference (nsa-spec §2.4): j < block_counts (or S), block c >= 0 and its first key c BS <= t.
// The block-major selected-attention forward (selected_attention_blocks.cu) and the key-block backward
// (selected_attention.cu) both walk a block's selecting tokens this way.
#pragma once
#include <algorithm>
#include <cstdint>

#include <cub/device/device_scan.cuh>

#include "cuda/common.cuh"
#include "cuda/selected_runs.cuh"

namespace nsa::cuda {

struct EntryLists {
  const int32_t* indices;  // [B, T, H, S]
  const int32_t* counts;   // [B, T, H] or null
  DeviceLayout L;
  int S, BS, H;
  int blocks_per_seq;      // ceil(max_len / BS)
  int64_t window_tokens;   // positions per token window
  int64_t buckets;         // windows x H x num_seqs x blocks_per_seq
  int per_chunk;           // entries per chunk
  int64_t tok0, tok1;      // the entries of flat tokens [tok0, tok1) of [B * T] are listed

  // Every token's entries, in chunks of per_chunk. With window_tokens > 0 the buckets are split further by the
  // token's position, window_tokens positions a window, windows outermost: the CTAs that run together then
  // take the tokens of one window (whose query rows, and their gradients, fit in L2) instead of tokens from
  // the whole sequence.
  static EntryLists of(const int32_t* indices, const int32_t* counts, const DeviceLayout& L, int per_chunk,
                       int64_t window_tokens = 0) {
    EntryLists e{};
    e.indices = indices, e.counts = counts, e.L = L;
    e.S = L.block_count, e.BS = L.block_size, e.H = int(L.H);
    e.blocks_per_seq = int(div_up(L.max_len, L.block_size));
    const int64_t len = std::max<int64_t>(L.max_len, 1), plain = int64_t(L.num_seqs) * e.blocks_per_seq * L.H;
    // (Windows are dropped where they would make the bucket arrays large: many sequences.)
    const bool windows = window_tokens > 0 && div_up(len, window_tokens) * plain <= (int64_t(1) << 24);
    e.window_tokens = windows ? window_tokens : len;
    e.buckets = div_up(len, e.window_tokens) * plain;
    e.per_chunk = per_chunk;
    e.tok0 = 0, e.tok1 = L.B * L.T;
    return e;
  }
  // Buckets window by window, then kv head by kv head (the CTAs that run together then share one group's query
  // rows in L2), then sequence, then block.
  __host__ __device__ int64_t bucket_of(int seq, int block, int h, int64_t t) const {
    return ((t / window_tokens * H + h) * L.num_seqs + seq) * blocks_per_seq + block;
  }
  __host__ __device__ void locate(int64_t bucket, int& seq, int& block, int& h) const {
    block = int(bucket % blocks_per_seq);
    seq = int(bucket / blocks_per_seq % L.num_seqs);
    h = int(bucket / blocks_per_seq / L.num_seqs % H);
  }
};

// The scratch arrays of build_entry_lists, in device memory: [buckets + 1] ints each for the counts, the fill
// cursors (the chunk counts in between), the entries' and the chunks' offsets; the list, (flat token, slot) per
// entry; `place` (or null): per window entry i, its position in the list or -1.
struct EntryListArrays {
  int *counts, *fill, *offsets, *chunk_offsets;
  int2* list;
  int* place;
  void* scan_tmp;
  size_t scan_bytes;  // entry_list_scan_bytes
};

namespace lists {

// Calls f(bucket, flat token, h, j) for entry i = ((flat - tok0) H + h) S + j if it is valid and
// skip(seq, t, h) is false.
template <typename Skip, typename F>
__device__ __forceinline__ void visit_entry(const EntryLists& p, int64_t i, const Skip& skip, F&& f) {
  const int j = int(i % p.S);
  const int64_t rest = i / p.S;
  const int h = int(rest % p.H);
  const int64_t flat = p.tok0 + rest / p.H;
  const int seq = p.L.token_seq[flat];
  if (seq < 0) return;
  const DeviceSequence sq = p.L.seqs[seq];
  const int64_t t = flat - (sq.batch * p.L.T + sq.start);
  if (j >= selection_count(p.counts, flat, p.H, h, p.S) || skip(seq, t, h)) return;
  const int c = p.indices[(flat * p.H + h) * p.S + j];
  if (c < 0 || int64_t(c) * p.BS > t) return;
  f(p.bucket_of(seq, c, h, t), flat, h, j);
}

template <typename Skip>
__global__ void count_entries(const EntryLists p, int64_t n, const Skip skip, int* counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    visit_entry(p, i, skip, [&](int64_t b, int64_t, int, int) { atomicAdd(&counts[b], 1); });
}

// counts -> chunks per bucket.
template <int = 0>
__global__ void chunks_of(const EntryLists p, const int* counts, int* chunks) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < p.buckets; b += int64_t(gridDim.x) * blockDim.x)
    chunks[b] = (counts[b] + p.per_chunk - 1) / p.per_chunk;
}

// list[pos] = (flat, j) for the bucket's entries from offsets[b]; place[i] = pos (visit_entry's i) when placed.
template <typename Skip>
__global__ void scatter_entries(const EntryLists p, int64_t n, const Skip skip, const int* offsets, int* fill,
                                int2* list, int* place) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    visit_entry(p, i, skip, [&](int64_t b, int64_t flat, int h, int j) {
      const int pos = offsets[b] + atomicAdd(&fill[b], 1);
      list[pos] = make_int2(int(flat), j);
      if (place) place[((flat - p.tok0) * p.H + h) * p.S + j] = pos;
    });
}

}  // namespace lists

// No entry skipped.
struct SkipNone {
  __device__ bool operator()(int, int64_t, int) const { return false; }
};

// The temporary storage of build_entry_lists' scans over `buckets` + 1 counts.
inline size_t entry_list_scan_bytes(int64_t buckets, cudaStream_t s) {
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<int*>(nullptr), static_cast<int*>(nullptr),
                                           buckets + 1, s),
             "cub::DeviceScan::ExclusiveSum(entry lists)");
  return bytes;
}

// Lists the entries of tokens [p.tok0, p.tok1) into `a` on stream s; `name` names the caller in errors.
template <typename Skip>
void build_entry_lists(const EntryLists& p, const Skip& skip, const EntryListArrays& a, cudaStream_t s,
                       const std::string& name) {
  const int64_t n = (p.tok1 - p.tok0) * p.H * p.S;
  size_t scan_bytes = a.scan_bytes;  // (cub takes it by reference)
  const size_t ints = size_t(p.buckets + 1) * sizeof(int);
  CUDA_CHECK(cudaMemsetAsync(a.counts, 0, ints, s), (name + " counts").c_str());
  CUDA_CHECK(cudaMemsetAsync(a.fill + p.buckets, 0, sizeof(int), s), (name + " chunk counts").c_str());
  if (a.place) CUDA_CHECK(cudaMemsetAsync(a.place, 0xff, size_t(n) * 4, s), (name + " places").c_str());
  const int threads = 256;
  const unsigned grid = unsigned(std::min<int64_t>(div_up(std::max<int64_t>(n, 1), threads), 132 * 32));
  lists::count_entries<<<grid, threads, 0, s>>>(p, n, skip, a.counts);
  check_launch((name + " count_entries").c_str());
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(a.scan_tmp, scan_bytes, a.counts, a.offsets, p.buckets + 1, s),
             (name + " entry scan").c_str());
  const unsigned bgrid = unsigned(std::min<int64_t>(div_up(p.buckets, threads), 132 * 32));
  lists::chunks_of<<<bgrid, threads, 0, s>>>(p, a.counts, a.fill);  // fill holds the chunk counts until the scan
  check_launch((name + " chunks_of").c_str());
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(a.scan_tmp, scan_bytes, a.fill, a.chunk_offsets, p.buckets + 1, s),
             (name + " chunk scan").c_str());
  CUDA_CHECK(cudaMemsetAsync(a.fill, 0, ints, s), (name + " fill").c_str());
  lists::scatter_entries<<<grid, threads, 0, s>>>(p, n, skip, a.offsets, a.fill, a.list, a.place);
  check_launch((name + " scatter_entries").c_str());
}

// The bucket of chunk i: the last b with chunk_offsets[b] <= i (an empty bucket shares its successor's start).
__device__ __forceinline__ int64_t chunk_bucket(const int* chunk_offsets, int64_t buckets, int64_t i) {
  int64_t lo = 0, hi = buckets;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_offsets[mid] <= i) lo = mid;
    else hi = mid;
  }
  return lo;
}

}  // namespace nsa::cuda
