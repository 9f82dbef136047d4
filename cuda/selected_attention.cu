// Selected attention forward (nsa-spec §2.4) and backward (§3).
//
// Token t (within its sequence), query head i, kv head h = i / G: the first n = block_counts[b,t,h] (or S)
// entries c of block_indices[b,t,h,:] with c >= 0 and c*BS <= t contribute keys [c*BS, min((c+1)*BS-1, t)];
// o = softmax(scale * q k^T) v over those keys, lse = log-sum-exp of the scaled logits; no keys => 0, 0.
//
// Tensor-core path (fp32 too, as three tf32 products): a CTA takes `tokens_per_tile` consecutive tokens of one
// sequence x `heads_per_tile` query heads of kv head h (attention_tile.cuh). It sorts each token's valid
// selections, forms the union of the tile's blocks in ascending order (a bitmap over a window of blocks,
// compacted by a prefix count), and walks the union in key tiles of kBN keys: one block per tile, several blocks
// per tile when BS < kBN, several tiles per block when BS > kBN. A row masks out the blocks its token did not
// select (found once per token and tile, by a cursor into the token's sorted list) and the keys after its own
// position; neighbouring tokens share most blocks, so little of the union is wasted.
//
// On sm_90, for G in {4, 8} or a multiple of 16, Auto gives the streamed TMA kernel
// (selected_attention_streamed.cu), which loads each distinct block of a unit of 8 tokens once, every token
// but, at G = 4 and 8, the runs whose tokens all select the same blocks (selected_runs.cuh), which stay here.
//
// Backward (nsa-spec §3, block_indices frozen): for bf16/fp16 with K, V <= 128, key block by key block on tensor
// cores (key_block_backward.cuh) over lists of the tokens that selected each block, built per call
// (selection_lists.cuh, as the block-major forward's: no host synchronisation); otherwise on CUDA cores, a warp
// per token and up to four heads of its group (attn::attention_backward), dk / dv by fp32 atomics.
//
// FLOPs (the count the benchmarks report, as the published NSA figures do): 2 * B * T * HQ * S * BS * (K + V),
// i.e. every query row multiplies S full blocks, QK^T and PV, ignoring causal truncation.
#include <algorithm>
#include <memory>
#include <optional>
#include <string>

#include "cuda/attention_tile.cuh"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/key_block_backward.cuh"
#include "cuda/selected_attention_blocks.h"
#include "cuda/selected_attention_streamed.h"
#include "cuda/selected_runs.cuh"
#include "cuda/selection_lists.cuh"

namespace nsa::cuda {
namespace {

using attn::RowMap;
using attn::TileShape;
using attn::TileSmem;
using attn::WarpAttention;

template <typename T>
struct SelectedParams : attn::AttentionParams<T> {
  const int32_t* indices;    // [B, T, H, S]
  const int32_t* counts;     // [B, T, H] or null
  int S, BS;
  int path;                  // 0 decide per CTA, 1 union, 2 per token, 3 union on the split's marked runs only
  int32_t* path_counts;      // [3] or null: CTAs that took the union / the per-token path (/ streamed)
  RunSplit split;            // path 3: the runs to take
  int run;                   // path 3: run_tokens(G)
};

// The per-token path takes a CTA when its row-keys times this margin are fewer than the union's (ties go to
// the union, whose key tiles serve the whole CTA). A timing knob: on an H200 (T = 32k, independent
// selections) G = 1 took 30.8 ms with 1 and 35.6 ms with 2; G = 4 and 16 moved by under 1.5%.
#ifndef NSA_PER_TOKEN_MARGIN
#define NSA_PER_TOKEN_MARGIN 1
#endif
// Key-tile stages of the per-token path. 3 (where a warp has two 16-row tiles: the second tile's Q in
// registers, a third stage in the warp's Q rows) measured 20% slower than 2 on an H200, so it is off.
#ifndef NSA_PER_TOKEN_STAGES
#define NSA_PER_TOKEN_STAGES 2
#endif

// Warps per CTA (16 or 32 query rows each). A compile-time knob for tuning: -DNSA_SELECTED_WARPS=8.
#ifndef NSA_SELECTED_WARPS
#define NSA_SELECTED_WARPS 4
#endif
constexpr int kWarps = NSA_SELECTED_WARPS;

// Shared memory past the tile, all int-sized: per token its raw selections (invalid ones cleared) and the
// sorted valid ones [tpt][S] each; per token the count and a cursor [tpt] each; per key tile (three
// slots, as the key rows) and token the bits of the tile's blocks the token selected [3][tpt]; the block
// bitmap (one word per thread); per-warp popcount totals; the ordered union of the current window. The
// struct itself lives in shared memory too (built by thread 0), so its pointers cost no registers.
struct SelectionSmem {
  int* raw;
  int* cursor;  // per token: next unmatched entry of its sorted list
  int* sel;
  int* sel_count;
  uint32_t* tok_bits;
  uint32_t* bitmap;
  int* warp_total;
  int* tile_blocks;  // per warp: blocks its 16-row tiles would walk on the per-token path
  int* blocks;
  static size_t bytes(int tpt, int S, int threads, int warps) {
    const size_t union_cap = std::min<size_t>(size_t(tpt) * S, size_t(threads) * 32);
    return sizeof(SelectionSmem) +
           sizeof(int) * (2 * size_t(tpt) * S + 5 * size_t(tpt) + threads + 2 * warps + union_cap);
  }
  __device__ void init(unsigned char* base, int tpt, int S, int threads, int warps) {
    raw = reinterpret_cast<int*>(base);
    sel = raw + tpt * S;
    sel_count = sel + tpt * S;
    cursor = sel_count + tpt;
    tok_bits = reinterpret_cast<uint32_t*>(cursor + tpt);
    bitmap = tok_bits + 3 * tpt;
    warp_total = reinterpret_cast<int*>(bitmap + threads);
    tile_blocks = warp_total + warps;
    blocks = tile_blocks + warps;
  }
};

// The key tiles of one window of the union, and the per-row masks (selected_attention_tc_kernel).
// Which of a tile's blocks each token selected is worked out once per token while the tile is described
// (thread tt < ntok walks token tt's sorted list with a cursor) and read by every row of the token. Little
// lives in registers here: the two-row-tile kernel needs nearly all of them for its accumulators.
template <typename Shape>
struct SelectedKeys {
  static constexpr int kBN = Shape::kBN;
  static constexpr int kR = 2 * Shape::kMT;
  const int* blocks;  // ascending union of this window
  int num_blocks, BS, last_token;
  const SelectionSmem* ss;
  int S, tpt, t0;
  // This thread's rows.
  int tok[kR];        // token within the tile; -1 for a padding row, which sees everything (output dropped)
  uint32_t bits[kR];  // the current tile's blocks the row's token selected

  // BS <= kBN: blocks gathered into one tile (<= 32, one mask bit each); BS > kBN: tiles one block spans.
  __device__ __forceinline__ int blocks_per_tile() const { return min(max(kBN / BS, 1), 32); }
  __device__ __forceinline__ int tiles_per_block() const { return (BS + kBN - 1) / kBN; }
  // Tile i: its first block, block count and key count.
  __device__ __forceinline__ void tile(int i, int& first_block, int& nb, int& keys) const {
    if (BS <= kBN) {
      first_block = i * blocks_per_tile();
      nb = min(blocks_per_tile(), num_blocks - first_block);
      keys = nb * BS;
    } else {
      first_block = i / tiles_per_block();
      nb = 1;
      keys = min(kBN, BS - (i % tiles_per_block()) * kBN);
    }
  }
  __device__ __forceinline__ int count() const {
    return BS <= kBN ? (num_blocks + blocks_per_tile() - 1) / blocks_per_tile() : num_blocks * tiles_per_block();
  }
  __device__ __forceinline__ void describe(int i, int* key_pos, int* key_slot) {
    const int j = threadIdx.x;
    if (j < kBN) {
      int pos = -1, slot = 0;
      if (BS <= kBN) {
        const int b = j / BS;
        if (b < blocks_per_tile() && i * blocks_per_tile() + b < num_blocks) {
          pos = blocks[i * blocks_per_tile() + b] * BS + j % BS;
          slot = b;
        }
      } else {
        const int off = (i % tiles_per_block()) * kBN + j;
        if (off < BS) pos = blocks[i / tiles_per_block()] * BS + off;
      }
      // Keys past the tile's last token are seen by no row: skip their load.
      key_pos[j] = pos <= last_token ? pos : -1;
      key_slot[j] = slot;
    }
    if (j <= last_token - t0) {  // a token of the tile
      int first_block, nb, keys;
      tile(i, first_block, nb, keys);
      const int* mine = ss->sel + j * S;
      const int n = ss->sel_count[j];
      int cursor = ss->cursor[j];
      uint32_t b = 0;
      // The union and each list ascend, so the cursor only moves forward (across windows too); it stops on
      // a match, as the next tile may be another part of the same block.
      for (int x = 0; x < nb; ++x) {
        const int c = blocks[first_block + x];
        while (cursor < n && mine[cursor] < c) ++cursor;
        if (cursor < n && mine[cursor] == c) b |= 1u << x;
      }
      ss->cursor[j] = cursor;
      ss->tok_bits[(i % 3) * tpt + j] = b;
    }
  }
  __device__ __forceinline__ bool begin(int i, const int* key_pos, const int* key_slot) {
    cur_pos = key_pos;
    cur_slot = key_slot;
    int first_block, nb, keys;
    tile(i, first_block, nb, keys);
    const int last_pos = key_pos[0] < 0 ? INT_MAX : key_pos[0] + keys - 1;  // only meaningful when contiguous
    const uint32_t all = nb == 32 ? 0xffffffffu : (1u << nb) - 1;
    const uint32_t* tb = ss->tok_bits + (i % 3) * tpt;
    bool need = false;
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
      if (tok[ri] < 0) continue;
      bits[ri] = tb[tok[ri]];
      need |= bits[ri] != all || t0 + tok[ri] < last_pos;
    }
    // Partial tiles hold zero rows that must not count as keys; blocks of one tile are contiguous only
    // when it holds one block.
    return need || keys < kBN || nb > 1 || key_pos[kBN - 1] < 0;
  }
  __device__ __forceinline__ bool valid(int ri, int col) const {
    if (tok[ri] < 0) return true;
    const int pos = cur_pos[col];
    return pos >= 0 && pos <= t0 + tok[ri] && ((bits[ri] >> cur_slot[col]) & 1u);
  }
  const int* cur_pos = nullptr;  // the tile being multiplied (set by begin)
  const int* cur_slot = nullptr;
};

// ---- per-token path ----
// One warp's 16-row tile walking its own key tiles: the shape WarpAttention sees (kBN keys per tile).
template <typename T, int D, int BN>
struct WarpTileShape {
  static constexpr int kD = D;
  static constexpr int kMT = 1;
  static constexpr int kBN = BN;
  static constexpr int kVec = 16 / int(sizeof(T));
  static constexpr int kStride = D + kVec;  // as the CTA tile's rows, so Q is read in place
  static constexpr int kChunks = D / kVec;
  static constexpr int kKVElems = BN * kStride;
  static constexpr bool kQInRegs = D <= 128 && sizeof(T) == 2;
};

// A key tile of the per-token path: keys [base, base + nkeys) of one block, and which of the 16-row tile's
// tokens selected that block.
struct TokenTile {
  int base, nkeys;
  uint32_t bits;
};

// The mask of a 16-row tile's rows for one key tile: the row's token selected the block and the key is not
// after it. Row ri of the thread is token tok[ri] of the 16-row tile (-1: padding, sees everything).
struct TokenTileMask {
  int tok[2], pos[2];  // token within the 16-row tile, its position in the sequence
  TokenTile tile;
  __device__ __forceinline__ bool valid(int ri, int col) const {
    if (tok[ri] < 0) return true;
    return col < tile.nkeys && tile.base + col <= pos[ri] && ((tile.bits >> tok[ri]) & 1u);
  }
};

// The ascending union of the sorted block lists of `nt` (<= 32) consecutive tokens of the CTA: lane l < nt
// keeps a cursor into token first_tok + l's list; each step takes the smallest head and the lanes holding it.
struct TokenMerge {
  const int* list;
  int n, cursor;
  __device__ __forceinline__ void init(const SelectionSmem& ss, int S, int first_tok, int nt) {
    const int lane = threadIdx.x % 32;
    list = ss.sel + (first_tok + lane) * S;
    n = lane < nt ? ss.sel_count[first_tok + lane] : 0;
    cursor = 0;
  }
  // The next block (warp-uniform) and the bits of the tokens that selected it; false at the end.
  __device__ __forceinline__ bool next(int& block, uint32_t& bits) {
    const int head = cursor < n ? list[cursor] : INT_MAX;
    block = __reduce_min_sync(0xffffffffu, head);
    if (block == INT_MAX) return false;
    bits = __ballot_sync(0xffffffffu, head == block);
    // A repeated entry (invalid input) is taken once, as the union path does.
    while (cursor < n && list[cursor] == block) ++cursor;
    return true;
  }
};

// Rows [r0, r0 + 16) of the CTA tile: the first and last token they hold (last < first: none).
__device__ __forceinline__ void tile_tokens(const RowMap& rows, int r0, int& first, int& last) {
  first = r0 / rows.heads_per_tile;
  last = min((r0 + 15) / rows.heads_per_tile, rows.ntok - 1);
}

// Blocks the per-token path would walk for this warp's 16-row tiles (lane 0's count is exact; all lanes
// return it).
template <int kWarpRows>
__device__ __forceinline__ int per_token_blocks(const SelectionSmem& ss, const RowMap& rows, int S, int warp) {
  int total = 0;
  for (int m = 0; m < kWarpRows / 16; ++m) {
    int first, last;
    tile_tokens(rows, warp * kWarpRows + m * 16, first, last);
    if (last < first) continue;
    TokenMerge merge;
    merge.init(ss, S, first, last - first + 1);
    int c;
    uint32_t bits;
    while (merge.next(c, bits)) ++total;
  }
  return total;
}

// The per-token path for one warp: each of its 16-row tiles (rows r0..r0+15 of the CTA tile) walks the
// merged blocks of its tokens in key tiles of BN keys, and writes its rows. No barrier with other warps.
// Stages: the warp's slice of the CTA's K/V stages holds kSliceStages (K and V of BN keys each: two, or one where
// the CTA has one, or in fp32, whose CTA stages hold half the keys); with NSA_PER_TOKEN_STAGES=3, two slice stages
// and two 16-row tiles of BN = 16, the second tile's Q fragments are kept in registers and the warp's Q rows hold a
// third.
template <typename T, typename Shape, int BN, int kSliceStages>
__device__ __forceinline__ void per_token_walk(const SelectedParams<T>& p, const SelectionSmem& ss, const RowMap& rows,
                                            T* sq, T* skv, int warp, int t0, int64_t key_base, int kv_head) {
  using WS = WarpTileShape<T, Shape::kD, BN>;
  using WA = WarpAttention<T, WS>;
  constexpr int kTiles = Shape::kWarpRows / 16;
  constexpr int kStages = kSliceStages == 1 ? 1
                          : NSA_PER_TOKEN_STAGES >= 3 && kTiles == 2 && Shape::kWarpRows == 2 * BN ? 3
                                                                                                   : 2;
  static_assert(WS::kQInRegs || kStages < 3, "a third stage in the warp's Q rows needs Q in registers");
  const int lane = threadIdx.x % 32;
  const float scale_log2 = p.scale * attn::kLog2e;
  const int BS = p.BS;
  T* const sq_warp = sq + warp * Shape::kWarpRows * Shape::kStride;
  // Slot i holds BN key rows: 2 * kSliceStages in the K/V slice, then (three stages) two in the warp's Q rows.
  constexpr int kSliceSlots = 2 * kSliceStages;
  auto slot = [&](int i) -> T* {
    return i < kSliceSlots ? skv + i * WS::kKVElems : sq_warp + (i - kSliceSlots) * WS::kKVElems;
  };

  WA wa;
  uint32_t q_next[kStages == 3 ? WA::kKSteps : 1][4];  // the second 16-row tile's Q fragments (three stages)
  wa.init(sq_warp);
  if constexpr (kStages == 3) {
#pragma unroll
    for (int ks = 0; ks < WA::kKSteps; ++ks)
      ldmatrix_x4(q_next[ks], WA::q_frag_addr(sq_warp + 16 * Shape::kStride, 0, ks));
    __syncwarp();  // every lane's Q reads are done before key rows land there
  }
  for (int m = 0; m < kTiles; ++m) {
    const int r0 = warp * Shape::kWarpRows + m * 16;
    const T* sq_tile = sq_warp + m * 16 * Shape::kStride;  // read per step where Q is not in registers
    int first, last;
    tile_tokens(rows, r0, first, last);
    if (last < first) continue;
    if (m > 0) {
      if constexpr (kStages == 3) {
        wa.reset();
#pragma unroll
        for (int ks = 0; ks < WA::kKSteps; ++ks)
#pragma unroll
          for (int x = 0; x < 4; ++x) wa.qf[ks][x] = q_next[ks][x];
      } else {
        wa.init(sq_warp + m * 16 * Shape::kStride);
      }
    }
    const int nt = last - first + 1;
    const int last_pos = t0 + last;  // no key after the tile's last token is seen
    TokenTileMask mask;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = r0 + WA::warp_row(ri);
      mask.tok[ri] = rows.valid(r) ? rows.token(r) - first : -1;
      mask.pos[ri] = t0 + rows.token(r);
    }
    const uint32_t all_bits = nt == 32 ? 0xffffffffu : (1u << nt) - 1;

    TokenMerge merge;
    merge.init(ss, p.S, first, nt);
    int block = 0, sub = 0, nsub = 0;
    uint32_t bits = 0;
    // The next key tile: the rest of the current block (up to the tile's last token), then the next block.
    auto next_tile = [&](TokenTile& d) -> bool {
      if (sub == nsub) {
        if (!merge.next(block, bits)) return false;
        sub = 0;
        nsub = (min(BS, last_pos - block * BS + 1) + BN - 1) / BN;
      }
      d.base = block * BS + sub * BN;
      d.nkeys = min(BN, min(BS - sub * BN, last_pos - d.base + 1));
      d.bits = bits;
      ++sub;
      return true;
    };
    // Lane l copies chunk l % kRowChunks (and every 32nd after it, where a row has more than 32: fp32 at D = 256)
    // of key rows l / kRowChunks + x * kRowsPerPass: the chunks are fixed per lane, so each pass only steps two
    // pointers (the address arithmetic was a large share of the walk's instructions).
    constexpr int kRowChunks = WS::kChunks < 32 ? WS::kChunks : 32;
    constexpr int kLaneChunks = WS::kChunks / kRowChunks;
    constexpr int kRowsPerPass = 32 / kRowChunks;
    constexpr int kChunkStride = 32 * WS::kVec;  // elements between a lane's chunks of one row
    const int j0 = lane / kRowChunks, col = lane % kRowChunks * WS::kVec;
    const int64_t k_step = int64_t(kRowsPerPass) * p.H * p.K, v_step = int64_t(kRowsPerPass) * p.H * p.V;
    auto load = [&](const TokenTile& d, int stage) {
      T* sk = slot(2 * stage) + j0 * WS::kStride + col;
      T* sv = slot(2 * stage + 1) + j0 * WS::kStride + col;
      const int64_t row0 = (key_base + d.base + j0) * p.H + kv_head;
      const T* gk = p.k + row0 * p.K + col;
      const T* gv = p.v + row0 * p.V + col;
#pragma unroll
      for (int x = 0; x < BN / kRowsPerPass; ++x) {
        const bool in = j0 + x * kRowsPerPass < d.nkeys;
#pragma unroll
        for (int c = 0; c < kLaneChunks; ++c) {
          const int off = c * kChunkStride;
          const bool k_ok = in && col + off < p.K, v_ok = in && col + off < p.V;
          cp_async_16(sk + x * kRowsPerPass * WS::kStride + off, k_ok ? gk + off : p.k, k_ok);
          cp_async_16(sv + x * kRowsPerPass * WS::kStride + off, v_ok ? gv + off : p.v, v_ok);
        }
        gk += k_step;
        gv += v_step;
      }
    };
    // Tile d in `stage`, landed: the warp multiplies it.
    auto multiply = [&](const TokenTile& d, int stage) {
      __syncwarp();
      mask.tile = d;
      // Warp-uniform: a partial tile, keys after the first token, or a block some token did not select.
      const bool need = d.nkeys < BN || d.base + BN - 1 > t0 + first || d.bits != all_bits;
      wa.step(sq_tile, slot(2 * stage), slot(2 * stage + 1), scale_log2, need, mask);
      __syncwarp();
    };
    if constexpr (kStages == 1) {
      TokenTile d;
      while (next_tile(d)) {
        load(d, 0);
        cp_async_commit();
        cp_async_wait<0>();
        multiply(d, 0);
      }
    } else {
      // d[0] is multiplied while d[1..] load; every stage gets a commit group, possibly empty.
      TokenTile d[kStages];
      bool have[kStages];
#pragma unroll
      for (int s = 0; s + 1 < kStages; ++s) {
        have[s] = next_tile(d[s]);
        if (have[s]) load(d[s], s);
        cp_async_commit();
      }
      int stage = 0;
      while (have[0]) {
        have[kStages - 1] = next_tile(d[kStages - 1]);
        // That stage was last read before the __syncwarp closing the previous iteration.
        if (have[kStages - 1]) load(d[kStages - 1], (stage + kStages - 1) % kStages);
        cp_async_commit();
        cp_async_wait<kStages - 1>();
        multiply(d[0], stage);
#pragma unroll
        for (int s = 0; s + 1 < kStages; ++s) d[s] = d[s + 1], have[s] = have[s + 1];
        stage = stage + 1 == kStages ? 0 : stage + 1;
      }
    }
    cp_async_wait<0>();
    __syncwarp();
    wa.store(p.o, p.lse, p.V, p.HQ, rows, r0);
  }
}

template <typename T, int D, int kMT, int kStages>
__global__ void __launch_bounds__(32 * kWarps) selected_attention_tc_kernel(const SelectedParams<T> p) {
  using Shape = TileShape<T, D, kWarps, kMT, kStages>;
  using WA = WarpAttention<T, Shape>;
  static_assert(Shape::kRows <= Shape::kThreads, "a thread per token describes the token's blocks");
  extern __shared__ __align__(16) unsigned char smem[];
  // Beside the streamed kernel (path 3): only the runs the split marks. (Resident CTAs taking the marked runs'
  // tiles in turn, instead of a grid whose other CTAs exit here, measured 11-20% slower where the union takes
  // most runs, H100: the loop made the two-row tiles spill more.)
  if (p.path == 3 &&
      !p.split.alike[p.split.flag(blockIdx.y, blockIdx.x * p.tokens_per_tile / p.run, p.H, blockIdx.z / p.head_chunks)])
    return;
  TileSmem<T, Shape> sm(smem);
  SelectionSmem* ss_shared = reinterpret_cast<SelectionSmem*>(smem + Shape::kTileBytes);
  SelectionSmem ss;
  ss.init(smem + Shape::kTileBytes + sizeof(SelectionSmem), p.tokens_per_tile, p.S, Shape::kThreads, kWarps);
  if (threadIdx.x == 0) *ss_shared = ss;

  const DeviceSequence seq = p.seqs[blockIdx.y];
  const int t0 = blockIdx.x * p.tokens_per_tile;
  if (t0 >= seq.length) return;
  const int ntok = int(min(int64_t(p.tokens_per_tile), seq.length - t0));
  const int kv_head = blockIdx.z / p.head_chunks;
  const int64_t key_base = seq.batch * p.row_tokens + seq.start;  // flat row of the sequence's token 0
  const RowMap rows{key_base + t0, ntok, p.heads_per_tile, kv_head * p.G + int(blockIdx.z % p.head_chunks) * p.heads_per_tile,
                    (kv_head + 1) * p.G};
  attn::load_q_tile<T, Shape>(sm.q, p.q, rows, p.HQ, p.K);
  cp_async_commit();

  // Each token's valid selections, sorted ascending: one thread per entry, which reads the entries coalesced
  // and places its own by rank (value, then position), while Q loads. A repeated block (invalid input) just
  // appears twice: the union and the per-token cursor take it once.
  const int S = p.S, nsel = ntok * S;
  for (int i = threadIdx.x; i < nsel; i += Shape::kThreads) {
    const int tt = i / S, j = i % S;
    const int64_t flat = rows.tok0 + tt;
    const int n = selection_count(p.counts, flat, p.H, kv_head, S);
    const int c = j < n ? p.indices[(flat * p.H + kv_head) * S + j] : -1;
    ss.raw[i] = c >= 0 && int64_t(c) * p.BS <= t0 + tt ? c : -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nsel; i += Shape::kThreads) {
    const int tt = i / S, j = i % S;
    const int* row = ss.raw + tt * S;
    const int c = row[j];
    int rank = 0, count = 0;
    for (int x = 0; x < S; ++x) {
      const int e = row[x];
      rank += e >= 0 && (e < c || (e == c && x < j));
      count += e >= 0;
    }
    if (c >= 0) ss.sel[tt * S + rank] = c;
    if (j == 0) ss.sel_count[tt] = count, ss.cursor[tt] = 0;
  }
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int last_token = t0 + ntok - 1;

  // The union of the tile's blocks, one window of 32 * kThreads block numbers at a time, ascending: writes
  // the window's blocks to ss.blocks and returns their count (all threads).
  constexpr int kWindow = 32 * Shape::kThreads;
  const int last_block = last_token / p.BS;
  auto build_window = [&](int win) -> int {
    ss.bitmap[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < nsel; i += Shape::kThreads) {
      const int tt = i / S, j = i % S;
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
    __syncthreads();
    return total;
  };

  // Union or per-token path, the same for the whole CTA. A warp's slice of the K/V stages holds kSliceStages
  // stages of K and V of 16 keys each: as many as the CTA has in 16 bits (64-key tiles), half in fp32 (32-key
  // tiles: one, or none where the CTA has one stage). In 16 bits D <= 128 (Q in registers); fp32 reads Q from
  // shared memory at any D.
  constexpr int kTokenBN = 16;
  constexpr int kSliceStages = Shape::kStages * Shape::kBN / kWarps / kTokenBN;
  constexpr bool kPerTokenPath = kSliceStages >= 1 && (Shape::kD <= 128 || sizeof(T) == 4);
  bool per_token = false;
  int built_total = -1;  // the union's size when its only window is already in ss.blocks
  if constexpr (kPerTokenPath) {
    if (p.path == 2) {
      per_token = true;
    } else if (p.path == 0) {
      const int mine = per_token_blocks<Shape::kWarpRows>(ss, rows, S, warp);
      if (lane == 0) ss.tile_blocks[warp] = mine;
      int union_blocks = 0;
      for (int win = 0; win <= last_block; win += kWindow) union_blocks += build_window(win);  // barriers publish tile_blocks
      if (last_block < kWindow) built_total = union_blocks;
      int tile_sum = 0;
      for (int w = 0; w < kWarps; ++w) tile_sum += ss.tile_blocks[w];
      per_token = int64_t(tile_sum) * 16 * NSA_PER_TOKEN_MARGIN < int64_t(union_blocks) * Shape::kRows;
    }
  }
  if (p.path_counts && threadIdx.x == 0) atomicAdd(&p.path_counts[per_token ? 1 : 0], 1);
  if constexpr (kPerTokenPath) {
    if (per_token) {
      using WS = WarpTileShape<T, Shape::kD, kTokenBN>;
      per_token_walk<T, Shape, kTokenBN, kSliceStages>(p, ss, rows, sm.q, sm.kv + warp * 2 * kSliceStages * WS::kKVElems,
                                                       warp, t0, key_base, kv_head);
      return;
    }
  }

  const T* sq_warp = sm.q + warp * Shape::kWarpRows * Shape::kStride;
  WA wa;
  wa.init(sq_warp);

  SelectedKeys<Shape> keys;
  keys.BS = p.BS;
  keys.last_token = last_token;
  keys.blocks = ss.blocks;
  keys.ss = ss_shared;
  keys.S = S;
  keys.tpt = p.tokens_per_tile;
  keys.t0 = t0;
#pragma unroll
  for (int ri = 0; ri < WA::kR; ++ri) {
    const int r = warp * Shape::kWarpRows + WA::warp_row(ri);
    keys.tok[ri] = rows.valid(r) ? rows.token(r) : -1;
    keys.bits[ri] = 0;
  }

  const float scale_log2 = p.scale * attn::kLog2e;
  for (int win = 0; win <= last_block; win += kWindow) {
    keys.num_blocks = built_total >= 0 ? built_total : build_window(win);
    attn::attend_key_tiles<T, Shape>(wa, sm, sq_warp, keys, p.k, p.v, key_base, kv_head, p.H, p.K, p.V, scale_log2);
  }
  wa.store(p.o, p.lse, p.V, p.HQ, rows, warp * Shape::kWarpRows);
}

// Marks the runs that select alike, one CTA per run and kv head: a small kernel with many CTAs per SM, where
// the union and streamed kernels (one or two CTAs per SM) would each evaluate the predicate on every run.
__global__ void __launch_bounds__(128) classify_runs_kernel(RunSplit split, const int32_t* indices,
                                                            const int32_t* counts, const DeviceSequence* seqs,
                                                            int64_t row_tokens, int run, int H, int S, int BS,
                                                            int slack) {
  extern __shared__ int run_set[];
  const DeviceSequence seq = seqs[blockIdx.y];
  const int64_t t0 = int64_t(blockIdx.x) * run;
  const int kv_head = int(blockIdx.z);
  const int64_t flag = split.flag(blockIdx.y, blockIdx.x, H, kv_head);
  bool alike = false;
  if (t0 < seq.length) {
    const int n = int(min(int64_t(run), seq.length - t0));
    alike = run_selects_alike(indices, counts, seq.batch * row_tokens + seq.start + t0, t0, n, H, kv_head, S, BS,
                              slack, run_set);
  }
  if (threadIdx.x == 0) split.alike[flag] = alike;
}

// run_selects_alike's slack where the block-major path takes the other runs: the union walk keeps runs of up to
// twice a token's blocks, such as 128-token runs (G = 1) made of two 64-token groups that each select alike
// (H100, T = 32k: 2.43 ms with the union on them, 5.87 with the block-major path alone).
constexpr int kBlocksUnionSlack = 2;

// Device memory of a RunSplit, freed in stream order.
struct RunSplitMemory {
  RunSplit split{};
  std::optional<StreamScratch> flags;
};

// Allocates and fills the split of the problem's runs for Auto (run_selects_alike's slack); false where its grid
// would not launch.
bool build_run_split(RunSplitMemory& mem, const int32_t* indices, const int32_t* counts, const DeviceLayout& L,
                     int slack, cudaStream_t s) {
  const int G = int(L.G()), run = run_tokens(G), S = L.block_count;
  const int64_t runs_per_seq = div_up(L.max_len, run);
  const int64_t flags = runs_per_seq * L.num_seqs * L.H;
  if (flags == 0 || runs_per_seq > 0x7fffffff || L.num_seqs > 65535 || L.H > 65535) return false;
  if (int64_t(run) * S > kMaxRunEntries) return false;  // run_selects_alike's shared set
  mem.flags.emplace(size_t(flags), s, "cudaMallocAsync(selected attention run split)");
  mem.split.alike = mem.flags->as<uint8_t>();
  mem.split.runs_per_seq = int(runs_per_seq);
  const dim3 grid(unsigned(runs_per_seq), unsigned(L.num_seqs), unsigned(L.H));
  classify_runs_kernel<<<grid, 128, run_set_size(run * S) * sizeof(int), s>>>(
      mem.split, indices, counts, L.seqs, L.T, run, int(L.H), S, L.block_size, slack);
  check_launch("classify_runs_kernel");
  return true;
}

// The keys of a query in selected attention: those of its valid selections (the first block_counts entries,
// c >= 0, c * BS <= t; a block's keys up to t), passed to `key` as rows of the [*, H, K] / [*, H, V] keys and
// values; for the forward's row kernel and the backward (as attention_backward's keys).
struct SelectionKeys {
  static constexpr int kMaxRowHeads = 8;  // attn::row_heads
  const int32_t* indices;  // [B, T, H, S]
  const int32_t* counts;   // [B, T, H] or null
  int H, S, BS;
  template <typename F>
  __device__ __forceinline__ void each(const QueryRow& r, F&& key) const {
    const int n = selection_count(counts, r.flat, H, r.kv_head, S);
    const int32_t* idx = indices + (r.flat * H + r.kv_head) * S;
    for (int j = 0; j < n; ++j) {
      const int c = idx[j];
      if (c < 0 || int64_t(c) * BS > r.t) continue;
      const int64_t end = min(int64_t(c + 1) * BS - 1, r.t);
      for (int64_t pos = int64_t(c) * BS; pos <= end; ++pos) key((r.key_base + pos) * H + r.kv_head);
    }
  }
};

// The union / per-token tile kernel for L within `budget`. Beside the streamed or block-major kernel (`run` > 0:
// the union takes the runs of `run` tokens the split marks) only tiles that lie inside one run can launch.
TileChoice selected_tile(const DeviceLayout& L, SmemBudget budget, int run) {
  // A CTA of `rows` query rows: its tokens' selection lists, or more than any CTA holds where its tokens would
  // straddle two runs.
  return attn::choose_tile<kWarps>(L, budget, [&](int rows) -> int64_t {
    const int tokens = rows / int(std::min<int64_t>(L.G(), rows));
    if (run > 0 && run % tokens != 0) return int64_t(1) << 40;
    return int64_t(SelectionSmem::bytes(tokens, L.block_count, 32 * kWarps, kWarps));
  });
}

// selected_attention_forward, and with `gated` the gated output too where the streamed kernel takes every token
// (no split); returns whether it wrote it.
bool selected_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                      const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L, cudaStream_t s,
                      SelectedPath path, int32_t* path_counts, const GatedOutput* gated) {
  if (L.B * L.T == 0 || L.HQ == 0) return false;
  // Small groups (G <= 4, or Blocks forced): the block-major path, each selected block serving full 16-row tiles
  // of the queries that selected it. Where the streamed kernel applies, Auto gives it every run of tokens, but
  // at G = 4 and 8 (whose 16-row tiles there hold G useful rows) those selecting alike. Beside either (Auto),
  // the union walk takes the runs that select alike (kernel path 3) on a side stream; if the union kernel
  // cannot launch, the main kernel takes all. At G a multiple of 16 the streamed kernel loads a tile its run's
  // tokens share once, and beats the union walk on them too.
  const bool blocks =
      (path == SelectedPath::Blocks || (path == SelectedPath::Auto && L.G() <= 4)) && selected_blocks_fits(L);
  if (path == SelectedPath::Blocks && !blocks) path = SelectedPath::Auto;  // a forced path that cannot run
  const bool streamed =
      !blocks && (path == SelectedPath::Auto || path == SelectedPath::Streamed) && selected_streamed_fits(L, q, k, v);
  const bool main_kernel = blocks || streamed;
  const int kernel_path = main_kernel ? 3 : path == SelectedPath::Streamed ? 0 : int(path);
  RunSplitMemory split;
  std::unique_ptr<SideStream> side;  // path 3: the union's few tiles run beside the main kernel
  bool union_launched = false;
  const bool split_runs = path == SelectedPath::Auto && (blocks || L.G() % 16 != 0);
  if (!main_kernel || split_runs) dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    SelectedParams<T> p{};
    p.set_inputs(q, k, v, o_slc, lse_slc, L);
    p.indices = block_indices;
    p.counts = block_counts;
    p.S = L.block_count, p.BS = L.block_size;
    p.path = kernel_path;
    p.path_counts = path_counts;
    p.run = run_tokens(p.G);
    if (attn::tensor_core_path(L, q, k, v, o_slc) && L.num_seqs > 0) {
      bool launched = false;
      const TileChoice tile = selected_tile(L, device_budget(L), kernel_path == 3 ? p.run : 0);
      auto launch = [&](auto dim, auto mt, auto stages) {
        constexpr int D = decltype(dim)::value, kMT = decltype(mt)::value, kStages = decltype(stages)::value;
        using Shape = TileShape<T, D, kWarps, kMT, kStages>;
        const dim3 grid = p.set_tiles(Shape::kRows, L, "selected_attention_tc_kernel");
        const auto kernel = selected_attention_tc_kernel<T, D, kMT, kStages>;
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(tile.bytes)),
                   "cudaFuncSetAttribute(selected_attention_tc_kernel)");
        cudaStream_t stream = s;
        if (kernel_path == 3) {  // the union takes the runs the split marks, on a side stream
          if (!build_run_split(split, block_indices, block_counts, L, blocks ? kBlocksUnionSlack : 1, s)) return;
          p.split = split.split;
          side = std::make_unique<SideStream>(s);
          stream = side->get();
        }
        kernel<<<grid, Shape::kThreads, tile.bytes, stream>>>(p);
        check_launch("selected_attention_tc_kernel");
        launched = true;
      };
      if (tile.stages)
        attn::dispatch_head_dim(attn::head_dim_bucket(L.K, L.V), [&](auto dim) {
          attn::dispatch_tile<T, decltype(dim)::value>(tile, [&](auto mt, auto stages) { launch(dim, mt, stages); });
        });
      union_launched = launched;
      if (launched) return;
    }
    if (main_kernel) return;
    attn::launch_row_attention(p, SelectionKeys{p.indices, p.counts, p.H, p.S, p.BS}, L, s,
                               "row_attention_kernel (selected attention)");
  });
  const bool fuse_gate = gated && streamed && !split_runs;
  if (streamed)
    selected_attention_streamed(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s, path_counts,
                                union_launched ? &split.split : nullptr, fuse_gate ? gated : nullptr);
  if (blocks)
    selected_attention_blocks(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s,
                              union_launched ? &split.split : nullptr);
  if (side) side->join();  // before the split's memory is freed on s
  return fuse_gate;
}

// The key-block backward's work: the tokens that selected each (token window, kv head, sequence, block) bucket
// (selection_lists.cuh), a chunk of up to tokens_per_cta of them per CTA.
struct SelectionLists {
  EntryLists e;
  const int* offsets;
  const int* chunk_offsets;
  const int2* list;  // (flat token, slot)
  __device__ __forceinline__ bool tile(int64_t cta, kbb::KeyTile& w) const {
    if (cta >= chunk_offsets[e.buckets]) return false;
    const int64_t b = chunk_bucket(chunk_offsets, e.buckets, cta);
    int si, block;
    e.locate(b, si, block, w.h);
    const DeviceSequence seq = e.L.seqs[si];
    w.query_base = seq.batch * e.L.T + seq.start;
    w.key0 = int64_t(block) * e.BS;
    w.key_row0 = w.query_base + w.key0;
    w.nkeys = int(min(int64_t(e.BS), seq.length - w.key0));
    w.first = offsets[b] + (cta - chunk_offsets[b]) * e.per_chunk;
    w.ntok = int(min(int64_t(e.per_chunk), offsets[b + 1] - w.first));
    return true;
  }
  __device__ __forceinline__ int64_t token(const kbb::KeyTile& w, int i) const {
    return list[w.first + i].x - w.query_base;
  }
  __device__ __forceinline__ bool sees(int64_t t, int64_t pos) const { return pos <= t; }
};

// Whether the tensor-core backward over the lists of the tokens that selected each block applies.
bool key_blocks_fit(const DeviceLayout& L, const void* q, const void* k, const void* v) {
  const int64_t entries = L.B * L.T * L.H * L.block_count;
  return kbb::fits(L, L.block_size, q, k, v) && entries < (int64_t(1) << 31) && L.B * L.T < (int64_t(1) << 31);
}

// The tensor-core backward over those lists; false (nothing done) where it does not apply.
bool selected_backward_key_blocks(float* dq, float* dk, float* dv, const BranchGrad& do_slc, const void* q,
                                  const void* k, const void* v, const void* o_slc, const float* lse_slc,
                                  const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                  cudaStream_t s) {
  if (!key_blocks_fit(L, q, k, v)) return false;
  const int64_t entries = L.B * L.T * L.H * L.block_count;
  if (entries == 0 || L.num_seqs == 0) return true;
  // Four times the base steps a CTA: fewer CTAs load a K / V tile and add dK / dV rows (H100, 8k: 3.32 ms at 1x,
  // 3.10 at 2x, 3.00 at 4x).
  const kbb::StepGeometry geo = kbb::step_geometry(L.G(), 4 * kbb::kStepsPerCta);
  // Token windows whose query rows of one kv head (q, do and the fp32 dq, G rows a token) fill about two thirds
  // of an H100's L2: a window's 16 or so CTAs per token then find the rows that an earlier one brought in.
  const int64_t row_bytes = L.G() * (6 * L.K + 2 * L.V);
  const int64_t window_tokens = std::max<int64_t>(256, (int64_t(32) << 20) / std::max<int64_t>(row_bytes, 1));
  const EntryLists e = EntryLists::of(block_indices, block_counts, L, geo.tokens_per_cta, window_tokens);
  const size_t ints = size_t(e.buckets + 1) * sizeof(int);
  EntryListArrays a{};
  a.scan_bytes = entry_list_scan_bytes(e.buckets, s);
  StreamScratch counts(ints, s, "cudaMallocAsync(selection lists)"), fill(ints, s, "cudaMallocAsync(selection lists)"),
      offsets(ints, s, "cudaMallocAsync(selection lists)"), chunk_offsets(ints, s, "cudaMallocAsync(selection lists)"),
      list(size_t(entries) * sizeof(int2), s, "cudaMallocAsync(selection lists)"),
      scan(a.scan_bytes, s, "cudaMallocAsync(selection list scan)");
  a.counts = counts.as<int>(), a.fill = fill.as<int>(), a.offsets = offsets.as<int>();
  a.chunk_offsets = chunk_offsets.as<int>(), a.list = list.as<int2>(), a.scan_tmp = scan.as<void>();
  build_entry_lists(e, SkipNone{}, a, s, "selected attention backward");

  const kbb::PreparedRows rows(L, do_slc, o_slc, s);
  const SelectionLists src{e, a.offsets, a.chunk_offsets, a.list};
  // Each bucket has at most entries / tokens_per_cta full chunks in all, plus one partial chunk.
  kbb::launch(dq, dk, dv, rows, q, k, v, lse_slc, src, L.block_size, entries / geo.tokens_per_cta + e.buckets, geo,
              L, s, "key_block_backward_kernel (selected attention)");
  return true;
}

}  // namespace

bool selected_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k, const void* v) {
  return key_blocks_fit(L, q, k, v);
}

void selected_attention_backward(float* dq, float* dk, float* dv, BranchGrad do_slc, const void* q, const void* k,
                                 const void* v, const void* o_slc, const float* lse_slc, const int32_t* block_indices,
                                 const int32_t* block_counts, const DeviceLayout& L, cudaStream_t s) {
  if (selected_backward_key_blocks(dq, dk, dv, do_slc, q, k, v, o_slc, lse_slc, block_indices, block_counts, L, s))
    return;
  const SelectionKeys keys{block_indices, block_counts, int(L.H), L.block_count, L.block_size};
  const char* name = "attention_backward_kernel (selected attention)";
  attn::attention_backward(dq, dk, dv, fp32_grad(do_slc, name), q, k, v, o_slc, lse_slc, keys, L, s, name);
}

void selected_attention_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                cudaStream_t s) {
  selected_forward(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s, SelectedPath::Auto, nullptr, nullptr);
}

void selected_attention_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                cudaStream_t s, SelectedPath path, int32_t* path_counts) {
  selected_forward(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s, path, path_counts, nullptr);
}

bool selected_attention_gated_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                      const int32_t* block_indices, const int32_t* block_counts,
                                      const DeviceLayout& L, cudaStream_t s, const GatedOutput& gated) {
  return selected_forward(o_slc, lse_slc, q, k, v, block_indices, block_counts, L, s, SelectedPath::Auto, nullptr,
                          &gated);
}

TileChoice selected_attention_tile(const DeviceLayout& L, SmemBudget budget) { return selected_tile(L, budget, 0); }

}  // namespace nsa::cuda
