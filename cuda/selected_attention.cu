// Selected attention forward (nsa-spec §2.4).
//
// Token t (within its sequence), query head i, kv head h = i / G: the first n = block_counts[b,t,h] (or S)
// entries c of block_indices[b,t,h,:] with c >= 0 and c*BS <= t contribute keys [c*BS, min((c+1)*BS-1, t)];
// o = softmax(scale * q k^T) v over those keys, lse = log-sum-exp of the scaled logits; no keys => 0, 0.
//
// Tensor-core path: a CTA takes `tokens_per_tile` consecutive tokens of one sequence x `heads_per_tile` query
// heads of kv head h (attention_tile.cuh). It sorts each token's valid selections, forms the union of the
// tile's blocks in ascending order (a bitmap over a window of blocks, compacted by a prefix count), and walks
// the union in key tiles of kBN keys: one block per tile, several blocks per tile when BS < kBN, several tiles
// per block when BS > kBN. A row masks out the blocks its token did not select (a cursor into the token's
// sorted list) and the keys after its own position; neighbouring tokens share most blocks, so little of the
// union is wasted.
//
// FLOPs (the count the benchmarks report, as the published NSA figures do): 2 * B * T * HQ * S * BS * (K + V),
// i.e. every query row multiplies S full blocks, QK^T and PV, ignoring causal truncation.
#include <algorithm>
#include <string>

#include "cuda/attention_tile.cuh"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace nsa::cuda {
namespace {

using attn::RowMap;
using attn::TileShape;
using attn::TileSmem;
using attn::WarpAttention;

template <typename T>
struct SelectedParams {
  const T* q;                // [B, T, HQ, K]
  const T* k;                // [B, T, H, K]
  const T* v;                // [B, T, H, V]
  T* o;                      // [B, T, HQ, V]
  float* lse;                // [B, T, HQ]
  const int32_t* indices;    // [B, T, H, S]
  const int32_t* counts;     // [B, T, H] or null
  const DeviceSequence* seqs;
  const int32_t* token_seq;  // [B * T]
  int64_t row_tokens;        // T: tokens per batch row
  int HQ, H, G, K, V, S, BS;
  float scale;               // natural
  int heads_per_tile, tokens_per_tile, head_chunks;
};

// Warps per CTA (16 query rows each). A compile-time knob for tuning: -DNSA_SELECTED_WARPS=8.
#ifndef NSA_SELECTED_WARPS
#define NSA_SELECTED_WARPS 4
#endif
constexpr int kWarps = NSA_SELECTED_WARPS;

// Shared memory past the tile: per token its sorted selections [tpt][S] and count [tpt]; the block bitmap
// (one word per thread); per-warp popcount totals; the ordered union of the current window.
struct SelectionSmem {
  int* sel;
  int* sel_count;
  uint32_t* bitmap;
  int* warp_total;
  int* blocks;
  static size_t bytes(int tpt, int S, int threads, int warps) {
    const size_t union_cap = std::min<size_t>(size_t(tpt) * S, size_t(threads) * 32);
    return sizeof(int) * (size_t(tpt) * S + tpt + threads + warps + union_cap);
  }
  __device__ SelectionSmem(unsigned char* base, int tpt, int S, int threads, int warps) {
    sel = reinterpret_cast<int*>(base);
    sel_count = sel + tpt * S;
    bitmap = reinterpret_cast<uint32_t*>(sel_count + tpt);
    warp_total = reinterpret_cast<int*>(bitmap + threads);
    blocks = warp_total + warps;
  }
};

// The key tiles of one window of the union, and the per-row masks (selected_attention_tc_kernel).
template <typename Shape>
struct SelectedKeys {
  static constexpr int kBN = Shape::kBN;
  const int* blocks;  // ascending union of this window
  int num_blocks, BS, len, last_token;
  int blocks_per_tile;  // BS <= kBN: blocks gathered into one tile (<= 32, one mask bit each)
  int tiles_per_block;  // BS > kBN: tiles one block spans
  // This thread's two rows.
  int t_row[2];           // position within the sequence
  bool row_any[2];        // padding row: sees everything (its output is dropped)
  const int* sel_row[2];  // the token's sorted selections
  int sel_count[2];
  int cursor[2];          // next unmatched selection of the row
  uint32_t row_bits[2];   // tile blocks the row selected
  bool block_selected[2]; // BS > kBN: whether the row selected the current block

  __device__ __forceinline__ int count() const {
    return BS <= kBN ? (num_blocks + blocks_per_tile - 1) / blocks_per_tile : num_blocks * tiles_per_block;
  }
  __device__ __forceinline__ void describe(int i, int* key_pos, int* key_slot) const {
    const int j = threadIdx.x;
    if (j >= kBN) return;
    int pos = -1, slot = 0;
    if (BS <= kBN) {
      const int b = j / BS;
      if (b < blocks_per_tile && i * blocks_per_tile + b < num_blocks) {
        pos = blocks[i * blocks_per_tile + b] * BS + j % BS;
        slot = b;
      }
    } else {
      const int off = (i % tiles_per_block) * kBN + j;
      if (off < BS) pos = blocks[i / tiles_per_block] * BS + off;
    }
    // Keys past the tile's last token are seen by no row: skip their load.
    key_pos[j] = pos <= last_token ? pos : -1;
    key_slot[j] = slot;
  }
  __device__ __forceinline__ bool begin(int i, const int* key_pos, const int* key_slot) {
    cur_pos = key_pos;
    cur_slot = key_slot;
    int first_block, nb, keys;
    if (BS <= kBN) {
      first_block = i * blocks_per_tile;
      nb = min(blocks_per_tile, num_blocks - first_block);
      keys = nb * BS;
    } else {
      first_block = i / tiles_per_block;
      nb = 1;
      keys = min(kBN, BS - (i % tiles_per_block) * kBN);
    }
    const int last_pos = key_pos[0] < 0 ? INT_MAX : key_pos[0] + keys - 1;  // only meaningful when contiguous
    const uint32_t all = nb == 32 ? 0xffffffffu : (1u << nb) - 1;
    bool need = false;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (BS <= kBN || i % tiles_per_block == 0) {
        uint32_t bits = 0;
        for (int b = 0; b < nb; ++b) {
          const int c = blocks[first_block + b];
          if (cursor[rr] < sel_count[rr] && sel_row[rr][cursor[rr]] == c) {
            bits |= 1u << b;
            ++cursor[rr];
          }
        }
        row_bits[rr] = bits;
      }
      if (!row_any[rr]) need |= row_bits[rr] != all || t_row[rr] < last_pos;
    }
    // Partial tiles hold zero rows that must not count as keys; blocks of one tile are contiguous only
    // when it holds one block.
    return need || keys < kBN || nb > 1 || key_pos[kBN - 1] < 0;
  }
  __device__ __forceinline__ bool valid(int rr, int col) const {
    if (row_any[rr]) return true;
    const int pos = cur_pos[col];
    return pos >= 0 && pos <= t_row[rr] && ((row_bits[rr] >> cur_slot[col]) & 1u);
  }
  const int* cur_pos = nullptr;  // the tile being multiplied (set by begin)
  const int* cur_slot = nullptr;
};

template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarps) selected_attention_tc_kernel(const SelectedParams<T> p) {
  using Shape = TileShape<T, D, kWarps>;
  extern __shared__ __align__(16) unsigned char smem[];
  TileSmem<T, Shape> sm(smem);
  SelectionSmem ss(smem + Shape::kTileBytes, p.tokens_per_tile, p.S, Shape::kThreads, kWarps);

  const DeviceSequence seq = p.seqs[blockIdx.y];
  const int t0 = blockIdx.x * p.tokens_per_tile;
  if (t0 >= seq.length) return;
  const int ntok = int(min(int64_t(p.tokens_per_tile), seq.length - t0));
  const int kv_head = blockIdx.z / p.head_chunks;
  const int64_t key_base = seq.batch * p.row_tokens + seq.start;  // flat row of the sequence's token 0
  const RowMap rows{key_base + t0, ntok, p.heads_per_tile, kv_head * p.G + int(blockIdx.z % p.head_chunks) * p.heads_per_tile,
                    (kv_head + 1) * p.G};
  attn::load_q_tile<T, Shape>(sm.q, p.q, rows, p.HQ, p.K);
  attn::cp_async_commit();

  // Each token's valid selections, sorted ascending, repeats dropped.
  for (int tt = threadIdx.x; tt < ntok; tt += Shape::kThreads) {
    const int t = t0 + tt;
    const int64_t flat = rows.tok0 + tt;
    const int n = p.counts ? min(max(p.counts[flat * p.H + kv_head], 0), p.S) : p.S;
    const int32_t* idx = p.indices + (flat * p.H + kv_head) * p.S;
    int* mine = ss.sel + tt * p.S;
    int count = 0;
    for (int j = 0; j < n; ++j) {
      const int c = idx[j];
      if (c < 0 || int64_t(c) * p.BS > t) continue;
      int pos = count;
      while (pos > 0 && mine[pos - 1] > c) --pos;
      if (pos > 0 && mine[pos - 1] == c) continue;
      for (int m = count; m > pos; --m) mine[m] = mine[m - 1];
      mine[pos] = c;
      ++count;
    }
    ss.sel_count[tt] = count;
  }
  attn::cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* sq_warp = sm.q + warp * 16 * Shape::kStride;
  WarpAttention<T, Shape> wa;
  wa.init(sq_warp);

  SelectedKeys<Shape> keys;
  keys.BS = p.BS;
  keys.len = int(seq.length);
  keys.last_token = t0 + ntok - 1;
  keys.blocks = ss.blocks;
  keys.blocks_per_tile = min(max(Shape::kBN / p.BS, 1), 32);
  keys.tiles_per_block = (p.BS + Shape::kBN - 1) / Shape::kBN;
  int64_t out_row[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + lane / 4 + 8 * rr;
    const bool ok = rows.valid(r);
    const int tt = ok ? rows.token(r) : 0;
    keys.row_any[rr] = !ok;
    keys.t_row[rr] = t0 + tt;
    keys.sel_row[rr] = ss.sel + tt * p.S;
    keys.sel_count[rr] = ok ? ss.sel_count[tt] : 0;
    keys.cursor[rr] = 0;
    keys.row_bits[rr] = 0;
    out_row[rr] = ok ? (rows.tok0 + tt) * p.HQ + rows.head(r) : -1;
  }

  // The union of the tile's blocks, one window of 32 * kThreads block numbers at a time, ascending.
  constexpr int kWindow = 32 * Shape::kThreads;
  const int last_block = keys.last_token / p.BS;
  const float scale_log2 = p.scale * attn::kLog2e;
  for (int win = 0; win <= last_block; win += kWindow) {
    ss.bitmap[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < ntok * p.S; i += Shape::kThreads) {
      const int tt = i / p.S, j = i % p.S;
      if (j >= ss.sel_count[tt]) continue;
      const int c = ss.sel[i] - win;
      if (c >= 0 && c < kWindow) atomicOr(&ss.bitmap[c / 32], 1u << (c % 32));
    }
    __syncthreads();
    // Ordered compaction: thread i owns bitmap word i; its blocks go after those of lower words.
    const uint32_t word = ss.bitmap[threadIdx.x];
    int incl = __popc(word);
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += other;
    }
    if (lane == 31) ss.warp_total[warp] = incl;
    __syncthreads();
    int before = incl - __popc(word), total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += ss.warp_total[w];
      total += ss.warp_total[w];
    }
    for (uint32_t rest = word; rest; rest &= rest - 1) ss.blocks[before++] = win + threadIdx.x * 32 + __ffs(rest) - 1;
    keys.num_blocks = total;
    __syncthreads();
    attn::attend_key_tiles<T, Shape>(wa, sm, sq_warp, keys, p.k, p.v, key_base, kv_head, p.H, p.K, p.V, scale_log2);
  }
  wa.store(p.o, p.lse, p.V, out_row);
}

// CUDA-core fallback: one warp per (token, query head) row.
template <typename T>
__global__ void __launch_bounds__(128) selected_attention_rows_kernel(const SelectedParams<T> p, int64_t num_rows) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= num_rows) return;
  const int64_t flat = row / p.HQ;  // b * T + t
  const int head = int(row % p.HQ), kv_head = head / p.G;
  const int32_t si = p.token_seq[flat];
  if (si < 0) return;
  const DeviceSequence seq = p.seqs[si];
  const int64_t key_base = seq.batch * p.row_tokens + seq.start;
  const int64_t t = flat - key_base;
  attn::RowAttention<T> ra;
  ra.init(p.q + row * p.K, p.K);
  const int n = p.counts ? min(max(p.counts[flat * p.H + kv_head], 0), p.S) : p.S;
  const int32_t* idx = p.indices + (flat * p.H + kv_head) * p.S;
  for (int j = 0; j < n; ++j) {
    const int c = idx[j];
    if (c < 0 || int64_t(c) * p.BS > t) continue;
    const int64_t end = min(int64_t(c + 1) * p.BS - 1, t);
    for (int64_t pos = int64_t(c) * p.BS; pos <= end; ++pos) {
      const int64_t kv = (key_base + pos) * p.H + kv_head;
      ra.add_key(p.k + kv * p.K, p.v + kv * p.V, p.K, p.V, p.scale);
    }
  }
  ra.store(p.o + row * p.V, p.lse + row, p.V);
}

}  // namespace

void selected_attention_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                cudaStream_t s) {
  if (L.B * L.T == 0 || L.HQ == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    SelectedParams<T> p{};
    p.q = static_cast<const T*>(q);
    p.k = static_cast<const T*>(k);
    p.v = static_cast<const T*>(v);
    p.o = static_cast<T*>(o_slc);
    p.lse = lse_slc;
    p.indices = block_indices;
    p.counts = block_counts;
    p.seqs = L.seqs;
    p.token_seq = L.token_seq;
    p.row_tokens = L.T;
    p.HQ = int(L.HQ), p.H = int(L.H), p.G = int(L.G()), p.K = int(L.K), p.V = int(L.V);
    p.S = L.block_count, p.BS = L.block_size;
    p.scale = L.scale;
    if constexpr (Elem<T>::kTensorCore) {
      if (attn::tensor_core_path(L, q, k, v, o_slc) && L.num_seqs > 0) {
        constexpr int kRows = 16 * kWarps;
        p.heads_per_tile = std::min(p.G, kRows);
        p.head_chunks = int(div_up(p.G, p.heads_per_tile));
        p.tokens_per_tile = kRows / p.heads_per_tile;
        const dim3 grid(unsigned(div_up(std::max<int64_t>(L.max_len, 1), p.tokens_per_tile)), unsigned(L.num_seqs),
                        unsigned(p.H * p.head_chunks));
        if (grid.y > 65535 || grid.z > 65535)
          throw CudaError("selected_attention_tc_kernel: too many sequences or heads for one launch");
        bool launched = false;
        attn::dispatch_head_dim(attn::head_dim_bucket(L.K, L.V), [&](auto dim) {
          constexpr int D = decltype(dim)::value;
          using Shape = TileShape<T, D, kWarps>;
          const size_t bytes =
              Shape::kTileBytes + SelectionSmem::bytes(p.tokens_per_tile, p.S, Shape::kThreads, kWarps);
          int device = 0, limit = 0;
          CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice");
          CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                     "cudaDeviceGetAttribute(max shared memory)");
          if (bytes > size_t(limit)) return;  // a huge S: the row kernel takes it
          CUDA_CHECK(cudaFuncSetAttribute(selected_attention_tc_kernel<T, D>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
                     "cudaFuncSetAttribute(selected_attention_tc_kernel)");
          selected_attention_tc_kernel<T, D><<<grid, Shape::kThreads, bytes, s>>>(p);
          check_launch("selected_attention_tc_kernel");
          launched = true;
        });
        if (launched) return;
      }
    }
    const int64_t rows = L.B * L.T * L.HQ;
    const int threads = 128;
    selected_attention_rows_kernel<T><<<unsigned(div_up(rows * 32, threads)), threads, 0, s>>>(p, rows);
    check_launch("selected_attention_rows_kernel");
  });
}

}  // namespace nsa::cuda
