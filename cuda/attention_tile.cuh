// The tensor-core tile machinery shared by the selected-attention and sliding-window forward kernels.
//
// A CTA owns M = 16 * kMT * kWarps query rows: `tokens_per_tile` consecutive tokens of one sequence times
// `heads_per_tile` query heads of one kv group (row r = token r / heads_per_tile, head r % heads_per_tile),
// so one K/V tile in shared memory serves every query head of the group and several tokens at once; the
// tensor cores see a full 16-row operand whatever G is. Each warp owns kMT row tiles of 16 (kMT = 2 where
// the O accumulators fit: every K/V fragment read from shared memory then feeds two mma, and each warp has
// twice the independent work) and keeps its O accumulators and online-softmax state in registers
// (FlashAttention-2 style):
//   S = Q K^T (mma.sync m16n8k16, fp32 accumulators; Q and K fragments through ldmatrix),
//   mask, running max / sum in the log2 domain, P (bf16/fp16, straight from the S registers) times V
//   (V fragments through ldmatrix.trans), O rescaled when the max moves.
// K/V tiles of kBN keys are gathered row by row with cp.async (16-byte chunks, zero-filled outside the
// sequence) into two shared-memory stages, so the next tile loads while the current one is multiplied; or into
// one, where two stages would leave an SM one CTA (an A100 at D = 128): the other CTA's math then covers the
// copy (tile_stages).
// Rows are padded by 16 bytes, which makes the ldmatrix and cp.async accesses of 8 rows land in distinct banks.
//
// fp32 inputs run the same tiles (one row tile a warp, rows padded by 4 floats) with each product as three tf32
// mma (Tf32x3 in mma.cuh; fp32's precision, not tf32's), 8 keys or dims a k-step.
//
// The CUDA-core fallback (rows that are not a multiple of 16 bytes, CTAs beyond the device's shared memory) is
// HeadsAttention at the end: a warp per token and up to four heads of its group (eight for selected attention:
// row_heads), the same online softmax in fp32 with natural exponentials.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace nsa::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Query groups of at least this many heads take two 16-row tiles per warp (D = 64 or 128): a CTA of 128
// rows is 8 tokens x 16 heads at G = 16 and 32 tokens x 4 heads at G = 4, whose block selections (or
// windows) still nearly coincide. G = 1 keeps 64 rows: 128 consecutive tokens span two 64-token blocks,
// which widens the union of their selections. A knob for timing runs (-DNSA_TWO_ROW_TILES_MIN_G=1000
// turns two row tiles off).
#ifndef NSA_TWO_ROW_TILES_MIN_G
#define NSA_TWO_ROW_TILES_MIN_G 4
#endif
constexpr int kTwoRowTilesMinG = NSA_TWO_ROW_TILES_MIN_G;

// ---- compile-time shape of one kernel instance ----
// D: head-dim bucket (16..256; K, V <= D, the rest zero-filled); kMT 16-row tiles per warp; kBN keys per
// K/V tile; kStages K/V stages (1 or 2).
template <typename T, int D, int kWarps_, int kMT_ = 1, int kStages_ = 2>
struct TileShape {
  static constexpr int kD = D;
  static constexpr int kWarps = kWarps_;
  static constexpr int kMT = kMT_;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = 16 * kMT;
  static constexpr int kRows = kWarpRows * kWarps;  // M
  // Keys come 64 to a tile, 32 where D > 128 in 16 bits and D >= 64 in fp32 (whose P V holds the tile's P
  // fragments split in two: 32 registers at 32 keys).
  static constexpr int kBN = (sizeof(T) == 4 ? D >= 64 : D > 128) ? 32 : 64;
  // At D = 256, with two row tiles, or in fp32 (twice the fragments, each split in two), the Q fragments would
  // not fit beside O: they are re-read per k-step.
  static constexpr bool kQInRegs = D <= 128 && kMT == 1 && sizeof(T) == 2;
  static_assert(kMT == 1 || (kMT == 2 && D <= 128 && sizeof(T) == 2), "two row tiles per warp: 16 bits, D <= 128");
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kStride = D + kVec;    // elements; +16 bytes of padding per row
  static constexpr int kChunks = D / kVec;    // 16-byte chunks per row
  static constexpr int kQElems = kRows * kStride;
  static constexpr int kKVElems = kBN * kStride;
  // Q, the K stages, the V stages, then three slots of key positions (int) and block slots (int): the key
  // rows of tile i + 1 are described while tile i - 1 may still be read, which saves a barrier per tile.
  static constexpr size_t kTileBytes = sizeof(T) * (kQElems + 2 * kStages * kKVElems) + sizeof(int) * 6 * kBN;
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head-dim buckets are 16..256");
  static_assert(kStages == 1 || kStages == 2, "one or two K/V stages");
};

// Views of the tile part of dynamic shared memory. Stages are found by arithmetic, not through arrays of
// pointers, which a run-time stage index would put in local memory.
template <typename T, typename Shape>
struct TileSmem {
  T* q;
  T* kv;     // the K stages, then the V stages
  int* idx;  // key_pos slots 0..2, then key_slot slots 0..2
  __device__ explicit TileSmem(unsigned char* base) {
    q = reinterpret_cast<T*>(base);
    kv = q + Shape::kQElems;
    idx = reinterpret_cast<int*>(kv + 2 * Shape::kStages * Shape::kKVElems);
  }
  __device__ __forceinline__ T* k(int stage) const { return kv + stage * Shape::kKVElems; }
  __device__ __forceinline__ T* v(int stage) const { return kv + (Shape::kStages + stage) * Shape::kKVElems; }
  // Per key row: position within the sequence, or -1 when the row is padding.
  __device__ __forceinline__ int* key_pos(int slot) const { return idx + slot * Shape::kBN; }
  // Per key row: which block of the tile it came from (selected attention's bit index).
  __device__ __forceinline__ int* key_slot(int slot) const { return idx + (3 + slot) * Shape::kBN; }
};

// What both tensor-core attention kernels take (selected attention and the sliding window add their own
// fields): the tensors, the sequences, the sizes, and the tile geometry chosen at launch. Passed by value.
template <typename T>
struct AttentionParams {
  const T* q;                // [B, T, HQ, K]
  const T* k;                // [B, T, H, K]
  const T* v;                // [B, T, H, V]
  T* o;                      // [B, T, HQ, V]
  float* lse;                // [B, T, HQ]
  const DeviceSequence* seqs;
  const int32_t* token_seq;  // [B * T]
  int64_t row_tokens;        // T: tokens per batch row
  int HQ, H, G, K, V;
  float scale;               // natural
  int heads_per_tile, tokens_per_tile, head_chunks;

  // Tensors, sequences and sizes from the launcher's arguments.
  void set_inputs(const void* q_, const void* k_, const void* v_, void* o_, float* lse_, const DeviceLayout& L) {
    q = static_cast<const T*>(q_);
    k = static_cast<const T*>(k_);
    v = static_cast<const T*>(v_);
    o = static_cast<T*>(o_);
    lse = lse_;
    seqs = L.seqs;
    token_seq = L.token_seq;
    row_tokens = L.T;
    HQ = int(L.HQ), H = int(L.H), G = int(L.G()), K = int(L.K), V = int(L.V);
    scale = L.scale;
  }
  // The tile geometry for CTAs of `rows` query rows and the grid (token tiles of the longest sequence,
  // sequences, kv heads x head chunks); a grid too large for one launch throws, naming `kernel`.
  dim3 set_tiles(int rows, const DeviceLayout& L, const char* kernel) {
    heads_per_tile = G < rows ? G : rows;
    head_chunks = int(div_up(G, heads_per_tile));
    tokens_per_tile = rows / heads_per_tile;
    const dim3 grid(unsigned(div_up(L.max_len > 1 ? L.max_len : 1, tokens_per_tile)), unsigned(L.num_seqs),
                    unsigned(H * head_chunks));
    if (grid.y > 65535 || grid.z > 65535)
      throw CudaError(std::string(kernel) + ": too many sequences or heads for one launch");
    return grid;
  }
};

// Where a CTA's query rows live: row r is token tok0 + r / heads_per_tile (flat b*T + t), query head
// h0 + r % heads_per_tile; rows past `ntok` tokens or at heads >= head_end are padding.
struct RowMap {
  int64_t tok0;
  int ntok, heads_per_tile, h0, head_end;
  __device__ __forceinline__ bool valid(int r) const {
    return r / heads_per_tile < ntok && h0 + r % heads_per_tile < head_end;
  }
  __device__ __forceinline__ int token(int r) const { return r / heads_per_tile; }
  __device__ __forceinline__ int head(int r) const { return h0 + r % heads_per_tile; }
};

// Issues the cp.async copies of the Q tile (padding rows and dims past K are zeros). q: [.., HQ, K].
template <typename T, typename Shape>
__device__ __forceinline__ void load_q_tile(T* sq, const T* q, const RowMap& rows, int HQ, int K) {
  for (int i = threadIdx.x; i < Shape::kRows * Shape::kChunks; i += Shape::kThreads) {
    const int r = i / Shape::kChunks, ch = i % Shape::kChunks;
    const int col = ch * Shape::kVec;
    const bool valid = rows.valid(r) && col < K;
    const T* src = valid ? q + ((rows.tok0 + rows.token(r)) * HQ + rows.head(r)) * int64_t(K) + col : q;
    cp_async_16(sq + r * Shape::kStride + col, src, valid);
  }
}

// Issues the cp.async gather of one K/V tile: key row j is sequence position key_pos[j] (< 0 => zeros) of
// the sequence starting at flat token `key_base`, kv head `head`. k: [.., H, K], v: [.., H, V].
template <typename T, typename Shape>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, const int* key_pos, const T* k, const T* v,
                                             int64_t key_base, int head, int H, int K, int V) {
  for (int i = threadIdx.x; i < Shape::kBN * Shape::kChunks; i += Shape::kThreads) {
    const int j = i / Shape::kChunks, col = i % Shape::kChunks * Shape::kVec;
    const int pos = key_pos[j];
    const int64_t row = (key_base + pos) * H + head;
    const bool k_ok = pos >= 0 && col < K, v_ok = pos >= 0 && col < V;
    cp_async_16(sk + j * Shape::kStride + col, k_ok ? k + row * K + col : k, k_ok);
    cp_async_16(sv + j * Shape::kStride + col, v_ok ? v + row * V + col : v, v_ok);
  }
}

// One warp's 16 * kMT query rows: Q fragments (when they fit), the O accumulators and the online-softmax
// state. Thread layout (mma C fragment): in row tile m the lane holds rows g = lane / 4 and g + 8, and
// columns 2 * (lane % 4) + {0, 1} of every 8-wide n-tile. A thread's rows are numbered ri = 2 * m + rr
// (rr = 0 for g, 1 for g + 8); warp_row(ri) is the row within the warp's 16 * kMT.
// fp32 inputs run the same tiles on tensor cores as three tf32 products (Tf32x3: m16n8k8, whose accumulator
// layout is m16n8k16's), so the masks, the softmax and the stores are shared.
template <typename T, typename Shape>
struct WarpAttention {
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int kBN = Shape::kBN;
  static constexpr int kMT = Shape::kMT;
  static constexpr int kR = 2 * kMT;  // rows per thread
  static constexpr int kKStep = kTf32 ? 8 : 16;  // the mma's k
  static constexpr int kKSteps = Shape::kD / kKStep;
  static constexpr int kSTiles = kBN / 8;
  static constexpr int kOTiles = Shape::kD / 8;

  float o[kMT][kOTiles][4];
  float row_max[kR];  // running max of the scaled logits, log2 domain
  float row_sum[kR];  // this thread's part of the running sum (reduced over the quad at the end)
  uint32_t qf[Shape::kQInRegs ? kKSteps : 1][4];

  __device__ __forceinline__ static int warp_row(int ri) {
    return (ri / 2) * 16 + (threadIdx.x % 32) / 4 + 8 * (ri % 2);
  }
  // ldmatrix's row address for the A fragment of row tile m, k-step ks: matrices (rows 0-7, k low half),
  // (rows 8-15, low), (rows 0-7, high), (rows 8-15, high). In fp32 a matrix row is 4 elements, and lane i
  // receives element i % 4 of row i / 4: the tf32 A layout.
  __device__ __forceinline__ static const T* q_frag_addr(const T* sq_warp, int m, int ks) {
    const int lane = threadIdx.x % 32;
    return sq_warp + (m * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * Shape::kStride + ks * kKStep +
           (lane / 16) * (kKStep / 2);
  }

  // Clears O and the softmax state; the Q fragments stay.
  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.f;
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) row_max[ri] = -INFINITY, row_sum[ri] = 0.f;
  }

  // Call once the Q tile is in shared memory (after a barrier).
  __device__ __forceinline__ void init(const T* sq_warp) {
    reset();
    if constexpr (Shape::kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(qf[ks], q_frag_addr(sq_warp, 0, ks));
    }
  }

  // One K/V tile. `mask.valid(ri, col)` says whether the thread's row ri may see key column col; it is
  // consulted only when `need_mask` (warp-uniform) is set. scale_log2 = scale * log2(e).
  template <typename Mask>
  __device__ __forceinline__ void step(const T* sq_warp, const T* sk, const T* sv, float scale_log2, bool need_mask,
                                       const Mask& mask) {
    const int lane = threadIdx.x % 32;
    float s[kMT][kSTiles][4];
    if constexpr (kTf32) scores_tf32(s, sq_warp, sk);
    else scores_16bit(s, sq_warp, sk);

    // Scale into the log2 domain, mask.
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[m][n][e] *= scale_log2;
          if (need_mask && !mask.valid(2 * m + e / 2, n * 8 + 2 * (lane % 4) + (e % 2))) s[m][n][e] = -INFINITY;
        }

    // Online softmax per row.
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int ri = 2 * m + rr;
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) mx = fmaxf(mx, fmaxf(s[m][n][2 * rr], s[m][n][2 * rr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[ri], mx);
        // A row that has seen no key yet keeps max -inf; subtracting 0 then keeps every p at exactly 0.
        const float base = new_max == -INFINITY ? 0.f : new_max;
        const float alpha = exp2_ftz(row_max[ri] - base);
        row_max[ri] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) {
          s[m][n][2 * rr] = exp2_ftz(s[m][n][2 * rr] - base);
          s[m][n][2 * rr + 1] = exp2_ftz(s[m][n][2 * rr + 1] - base);
          sum += s[m][n][2 * rr] + s[m][n][2 * rr + 1];
        }
        row_sum[ri] = row_sum[ri] * alpha + sum;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          o[m][n][2 * rr] *= alpha;
          o[m][n][2 * rr + 1] *= alpha;
        }
      }

    if constexpr (kTf32) add_pv_tf32(s, sv);
    else add_pv_16bit(s, sv);
  }

  // S = Q K^T for the tile's keys (16-bit elements).
  __device__ __forceinline__ void scores_16bit(float (&s)[kMT][kSTiles][4], const T* sq_warp, const T* sk) const {
    const int lane = threadIdx.x % 32;
    // S = Q K^T accumulates over the k-steps; with few accumulator tiles (16-key tiles of the per-token path)
    // each would be one chain of dependent mma, so the k-steps are spread over kSplit partial sums, added at
    // the end, to keep 8 independent chains in flight.
    constexpr int kChains = kMT * kSTiles;
    constexpr int kSplit = kChains >= 8 ? 1 : (8 / kChains < kKSteps ? 8 / kChains : kKSteps);
    float acc[kSplit][kMT][kSTiles][4];
#pragma unroll
    for (int p = 0; p < kSplit; ++p)
#pragma unroll
      for (int m = 0; m < kMT; ++m)
#pragma unroll
        for (int n = 0; n < kSTiles; ++n) acc[p][m][n][0] = acc[p][m][n][1] = acc[p][m][n][2] = acc[p][m][n][3] = 0.f;

    // Each K fragment feeds every row tile.
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        if constexpr (Shape::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[m][i] = qf[ks][i];
        } else {
          ldmatrix_x4(a[m], q_frag_addr(sq_warp, m, ks));
        }
      }
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, sk + (np * 16 + (lane % 8) + (lane / 16) * 8) * Shape::kStride + ks * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          MmaElem<T>::mma(acc[ks % kSplit][m][2 * np], a[m], b[0], b[1]);
          MmaElem<T>::mma(acc[ks % kSplit][m][2 * np + 1], a[m], b[2], b[3]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[m][n][e] = acc[0][m][n][e];
#pragma unroll
          for (int p = 1; p < kSplit; ++p) s[m][n][e] += acc[p][m][n][e];
        }
  }

  // S = Q K^T for the tile's keys (fp32, Tf32x3), k-steps of 8. The K fragments come by ldmatrix as in 16 bits:
  // a matrix of 8 keys x 4 fp32 elements gives lane i key i / 4, element i % 4, the tf32 B layout. The big x big
  // products and the cross terms accumulate apart (two chains a tile), added at the end.
  __device__ __forceinline__ void scores_tf32(float (&s)[kMT][kSTiles][4], const T* sq_warp, const T* sk) const {
    const int lane = threadIdx.x % 32;
    float cross[kMT][kSTiles][4];
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] = cross[m][n][e] = 0.f;
    const T* k_row = sk + ((lane % 8) + (lane / 16) * 8) * Shape::kStride + ((lane / 8) % 2) * 4;
#pragma unroll 2
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a_big[kMT][4], a_small[kMT][4];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        uint32_t a[4];
        ldmatrix_x4(a, q_frag_addr(sq_warp, m, ks));
#pragma unroll
        for (int i = 0; i < 4; ++i) Tf32x3::split(a[i], a_big[m][i], a_small[m][i]);
      }
      uint32_t b_big[kSTiles][2], b_small[kSTiles][2];
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_row + np * 16 * Shape::kStride + ks * 8);
#pragma unroll
        for (int i = 0; i < 4; ++i) Tf32x3::split(b[i], b_big[2 * np + i / 2][i % 2], b_small[2 * np + i / 2][i % 2]);
      }
#pragma unroll
      for (int m = 0; m < kMT; ++m) Tf32x3::mma3(s[m], cross[m], a_big[m], a_small[m], b_big, b_small);
    }
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] += cross[m][n][e];
  }

  // O += P V (fp32, Tf32x3), k-steps of 8 keys. The S fragment of n-tile kk is the A fragment of keys taken in
  // the order 0, 2, 4, 6, 1, 3, 5, 7 (a0..a3 = p[g][2t], p[g+8][2t], p[g][2t+1], p[g+8][2t+1], t = lane % 4), so
  // B's rows follow that order: lane reads V rows 2t and 2t + 1 at column g = lane / 4 of each 8-column tile, two
  // plain loads (ldmatrix would transpose 16-bit halves), in distinct banks (rows kStride = D + 4 apart).
  // The tensor cores add into an accumulator rounding towards zero, so a chain of mma over every key of a row
  // (thousands at S = 121, BS = 64) drifts by ~1e-4; each tile's products are summed apart (12 mma at 32 keys)
  // and added to O by a rounded fp32 add.
  __device__ __forceinline__ void add_pv_tf32(const float (&s)[kMT][kSTiles][4], const T* sv) {
    const int lane = threadIdx.x % 32;
    uint32_t a_big[kMT][kSTiles][4], a_small[kMT][kSTiles][4];
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int kk = 0; kk < kSTiles; ++kk) {
        const float a[4] = {s[m][kk][0], s[m][kk][2], s[m][kk][1], s[m][kk][3]};
#pragma unroll
        for (int i = 0; i < 4; ++i) tf32_split(a[i], a_big[m][kk][i], a_small[m][kk][i]);
      }
    const T* v_col = sv + 2 * (lane % 4) * Shape::kStride + lane / 4;
    // kN 8-column tiles at a time: kN chains in flight, kN x 4 registers of partial sums.
    constexpr int kN = kOTiles < 4 ? kOTiles : 4;
#pragma unroll
    for (int n0 = 0; n0 < kOTiles; n0 += kN) {
      float part[kMT][kN][4];
#pragma unroll
      for (int m = 0; m < kMT; ++m)
#pragma unroll
        for (int j = 0; j < kN; ++j) part[m][j][0] = part[m][j][1] = part[m][j][2] = part[m][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kSTiles; ++kk) {
        uint32_t b_big[kN][2], b_small[kN][2];
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          const T* v_rows = v_col + kk * 8 * Shape::kStride + (n0 + j) * 8;
          tf32_split(v_rows[0], b_big[j][0], b_small[j][0]);
          tf32_split(v_rows[Shape::kStride], b_big[j][1], b_small[j][1]);
        }
#pragma unroll
        for (int m = 0; m < kMT; ++m) Tf32x3::mma3(part[m], part[m], a_big[m][kk], a_small[m][kk], b_big, b_small);
      }
#pragma unroll
      for (int m = 0; m < kMT; ++m)
#pragma unroll
        for (int j = 0; j < kN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[m][n0 + j][e] += part[m][j][e];
    }
  }

  // O += P V (16-bit elements).
  __device__ __forceinline__ void add_pv_16bit(const float (&s)[kMT][kSTiles][4], const T* sv) {
    const int lane = threadIdx.x % 32;
    // O += P V: the C fragments of two adjacent S n-tiles are exactly the A fragment of a 16-key k-step;
    // each V fragment feeds every row tile.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        a[m][0] = MmaElem<T>::pack(s[m][2 * kk][0], s[m][2 * kk][1]);
        a[m][1] = MmaElem<T>::pack(s[m][2 * kk][2], s[m][2 * kk][3]);
        a[m][2] = MmaElem<T>::pack(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
        a[m][3] = MmaElem<T>::pack(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
      }
#pragma unroll
      for (int vp = 0; vp < kOTiles / 2; ++vp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sv + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * Shape::kStride + vp * 16 +
                                 (lane / 16) * 8);
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          MmaElem<T>::mma(o[m][2 * vp], a[m], b[0], b[1]);
          MmaElem<T>::mma(o[m][2 * vp + 1], a[m], b[2], b[3]);
        }
      }
    }
  }

  // Normalises and writes the thread's rows: the warp's rows start at row0 of the CTA tile described by `rows`;
  // padding rows are skipped. out: [.., HQ, V] in T; lse fp32, natural log. Rows that saw no key get o = 0 and
  // lse = 0.
  __device__ __forceinline__ void store(T* out, float* lse, int V, int HQ, const RowMap& rows, int row0) {
    int64_t out_row[kR];
#pragma unroll
    for (int ri = 0; ri < kR; ++ri) {
      const int r = row0 + warp_row(ri);
      out_row[ri] = rows.valid(r) ? (rows.tok0 + rows.token(r)) * HQ + rows.head(r) : -1;
    }
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int ri = 2 * m + rr;
        float sum = row_sum[ri];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (out_row[ri] < 0) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* dst = out + out_row[ri] * V;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          const int col = n * 8 + 2 * (lane % 4);
          if (col >= V) continue;  // V is a multiple of 16 bytes on this path, so col + 1 < V too
          const float lo = o[m][n][2 * rr] * inv, hi = o[m][n][2 * rr + 1] * inv;
          if constexpr (kTf32) *reinterpret_cast<float2*>(dst + col) = make_float2(lo, hi);
          else *reinterpret_cast<uint32_t*>(dst + col) = MmaElem<T>::pack(lo, hi);
        }
        if (lane % 4 == 0) lse[out_row[ri]] = sum > 0.f ? (row_max[ri] + log2f(sum)) * kLn2 : 0.f;
      }
  }
};

// The key-tile loop both tensor-core kernels run. `keys` describes the tiles:
//   int count() const;                                  number of key tiles
//   void describe(int i, int* key_pos, int* key_slot);  threads < kBN write key row threadIdx.x of tile i; any
//        other per-tile state goes in slot i % 3 too (written while tile i - 2's may still be read)
//   bool begin(int i, const int* key_pos, const int* key_slot);  per thread, before tile i is multiplied:
//        prepares valid(ri, col) and returns whether this thread's rows need masking at all
//   bool valid(int ri, int col) const;                  row ri of the thread (WarpAttention's numbering)
// Q must already be in shared memory and `wa` initialised.
template <typename T, typename Shape, typename Keys>
__device__ __forceinline__ void attend_key_tiles(WarpAttention<T, Shape>& wa, TileSmem<T, Shape>& sm, const T* sq_warp,
                                                 Keys& keys, const T* k, const T* v, int64_t key_base, int kv_head,
                                                 int H, int K, int V, float scale_log2) {
  const int n = keys.count();
  if (n == 0) return;
  keys.describe(0, sm.key_pos(0), sm.key_slot(0));
  __syncthreads();
  if constexpr (Shape::kStages == 2) {
    load_kv_tile<T, Shape>(sm.k(0), sm.v(0), sm.key_pos(0), k, v, key_base, kv_head, H, K, V);
    cp_async_commit();
  }
  for (int i = 0; i < n; ++i) {
    if constexpr (Shape::kStages == 2) {
      if (i + 1 < n) keys.describe(i + 1, sm.key_pos((i + 1) % 3), sm.key_slot((i + 1) % 3));
      // Tile i - 1 is multiplied by every warp and tile i + 1's description is written.
      __syncthreads();
      if (i + 1 < n)
        load_kv_tile<T, Shape>(sm.k((i + 1) % 2), sm.v((i + 1) % 2), sm.key_pos((i + 1) % 3), k, v, key_base, kv_head,
                               H, K, V);
      cp_async_commit();  // possibly empty, so that wait<1> below always means "tile i has landed"
      cp_async_wait<1>();
    } else {
      // One stage: tile i loads once every warp has multiplied tile i - 1 (and tile i's description is
      // written); tile i + 1 is described meanwhile.
      if (i > 0) __syncthreads();
      load_kv_tile<T, Shape>(sm.k(0), sm.v(0), sm.key_pos(i % 3), k, v, key_base, kv_head, H, K, V);
      cp_async_commit();
      if (i + 1 < n) keys.describe(i + 1, sm.key_pos((i + 1) % 3), sm.key_slot((i + 1) % 3));
      cp_async_wait<0>();
    }
    __syncthreads();
    const bool need_mask = keys.begin(i, sm.key_pos(i % 3), sm.key_slot(i % 3));
    wa.step(sq_warp, sm.k(i % Shape::kStages), sm.v(i % Shape::kStages), scale_log2,
            __any_sync(0xffffffffu, need_mask), keys);
  }
  cp_async_wait<0>();
  __syncthreads();  // the caller may reuse shared memory
}

// ---- CUDA-core fallback: a warp per token and up to kHeads heads of its group ----
// The forward of up to kHeads query heads of one token that share a kv head, on CUDA cores, one warp: lane l holds
// dims l, l + 32, ... of q and of the outputs (K, V <= 256 => at most 8 each); each key's k and v rows are read
// once for the heads together, each head keeping its own online softmax in fp32 with natural exponentials.
template <typename T, int kHeads>
struct HeadsAttention {
  float q[kHeads][8], o[kHeads][8];
  float row_max[kHeads], row_sum[kHeads];
  int count = 0;

  // Rows q_rows .. q_rows + (heads - 1) K of q [*, K]; heads <= kHeads.
  __device__ __forceinline__ void init(const T* q_rows, int heads, int K) {
    const int lane = threadIdx.x % 32;
    count = heads;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      row_max[h] = -INFINITY;
      row_sum[h] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        q[h][i] = h < heads && d < K ? Elem<T>::to_float(q_rows[h * K + d]) : 0.f;
        o[h][i] = 0.f;
      }
    }
  }
  // Adds one key; every lane of the warp calls it with the same key.
  __device__ __forceinline__ void add_key(const T* k_row, const T* v_row, int K, int V, float scale) {
    const int lane = threadIdx.x % 32;
    float k[8], v[8], dot[kHeads];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      k[i] = d < K ? Elem<T>::to_float(k_row[d]) : 0.f;
      v[i] = d < V ? Elem<T>::to_float(v_row[d]) : 0.f;
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      dot[h] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot[h] = fmaf(q[h][i], k[i], dot[h]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], off);
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const float z = dot[h] * scale;
      const float new_max = fmaxf(row_max[h], z);
      const float alpha = expf(row_max[h] - new_max), p = expf(z - new_max);
      row_max[h] = new_max;
      row_sum[h] = row_sum[h] * alpha + p;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[h][i] = o[h][i] * alpha + p * v[i];
    }
  }
  // Rows o_rows [*, V] and lse_rows [*] of the init's heads; a head that saw no key gets o = 0, lse = 0.
  __device__ __forceinline__ void store(T* o_rows, float* lse_rows, int V) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      if (h >= count) break;
      const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < V) o_rows[h * V + d] = Elem<T>::from_float(o[h][i] * inv);
      }
      if (lane == 0) lse_rows[h] = row_sum[h] > 0.f ? row_max[h] + logf(row_sum[h]) : 0.f;
    }
  }
};

// The backward (nsa-spec §3) of up to kHeads query heads of one token that share a kv head, on CUDA cores, one
// warp (lanes as in HeadsAttention): per head delta = do_x . o_x; per key j and head h, p = exp(scale q_h.k_j -
// lse_h), ds = p (do_h . v_j - delta_h), dq_h += scale ds k_j (in registers); dk_j += scale sum_h ds q_h and
// dv_j += sum_h p do_h go out by one fp32 atomic per element for the heads together (other tokens share the key).
// kHeads = grad_heads(G): 4 for groups of 4 or more (4x fewer atomics; H100, the whole backward at T = 8k, G = 16:
// 166 ms against 206 with a warp per row), else 1 (G = 1: the four heads' registers made a warp per row 2x
// slower). Prefetching the rows of the key two ahead to L1 measured slower (G = 16: 202 ms).
__host__ __device__ constexpr int grad_heads(int64_t G) { return G >= 4 ? 4 : 1; }

// The warp's heads: query heads [head0, head0 + count) of token `flat`, count <= kHeads.
template <int kHeads>
struct GradHeads {
  int64_t flat;
  int head0, count;
  // Warp w of a launch over (token, kv head, chunk of kHeads heads of its group), chunks fastest.
  __device__ __forceinline__ GradHeads(const DeviceLayout& L, int64_t w) {
    const int G = int(L.HQ / L.H), chunks = (G + kHeads - 1) / kHeads;
    const int chunk = int(w % chunks), kv_head = int(w / chunks % L.H);
    flat = w / chunks / L.H;
    head0 = kv_head * G + chunk * kHeads;
    count = min(kHeads, G - chunk * kHeads);
  }
  __device__ __forceinline__ int64_t row0(const DeviceLayout& L) const { return flat * L.HQ + head0; }
};
// Warps of a launch over every GradHeads<kHeads> of L.
__host__ __device__ inline int64_t grad_warps(const DeviceLayout& L, int kHeads) {
  const int64_t G = L.HQ / L.H;
  return L.B * L.T * L.H * ((G + kHeads - 1) / kHeads);
}

// This thread's warp of a launch over grad_warps(L, kHeads): its first query row (flat token x HQ + head), how
// many heads it takes, and the token's place; false past the end or for a padding token.
template <int kHeads>
__device__ __forceinline__ bool find_grad_rows(const DeviceLayout& L, int64_t& row, int& count, QueryRow& r) {
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (w >= grad_warps(L, kHeads)) return false;
  const GradHeads<kHeads> heads(L, w);
  row = heads.row0(L);
  count = heads.count;
  return r.find(L, row);
}

// Blocks of 128 threads for a launch over grad_warps(L, kHeads); more than one launch takes throws, naming `name`.
inline unsigned heads_blocks(const DeviceLayout& L, int kHeads, const char* name) {
  const int64_t blocks = div_up(grad_warps(L, kHeads) * 32, 128);
  if (blocks >= (int64_t(1) << 31)) throw CudaError(std::string(name) + ": too many rows for one launch");
  return unsigned(blocks);
}

// Calls f(std::integral_constant<int, grad_heads(G)>{}), for a backward kernel's instance.
template <typename F>
void with_grad_heads(const DeviceLayout& L, F&& f) {
  if (grad_heads(L.HQ / L.H) == 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 1>{});
}

// Heads a warp of the forward's row kernel: 8 for groups of 8 or more where the keys allow it (Keys::kMaxRowHeads),
// 4 for groups of 4 or more, else 1. Eight heads' q and o rows take 128 registers a thread: for the selected
// blocks' keys a gain, for the window's contiguous keys a loss (H200, fp32, T = 8k, HQ = 64, H = 4, W = 512,
// against four: selected 50.8 -> 43.3 ms, window 21.8 -> 23.6).
__host__ __device__ constexpr int row_heads(int64_t G, int max_heads) {
  return G >= 8 && max_heads >= 8 ? 8 : G >= 4 ? 4 : 1;
}

// A forward on CUDA cores, a warp per token and kHeads = row_heads(G, Keys::kMaxRowHeads) heads of its group
// (GradHeads' warps), each key read once for them, over the keys `keys.each(row, key)` names as rows of p.k / p.v
// ([*, K] / [*, V]); tokens outside every sequence are left as they are.
template <typename T, int kHeads, typename Keys>
__global__ void __launch_bounds__(128) row_attention_kernel(const AttentionParams<T> p, const Keys keys,
                                                            const DeviceLayout L) {
  int64_t row;
  int count;
  QueryRow r;
  if (!find_grad_rows<kHeads>(L, row, count, r)) return;
  HeadsAttention<T, kHeads> heads;
  heads.init(p.q + row * p.K, count, p.K);
  keys.each(r, [&](int64_t kv) { heads.add_key(p.k + kv * p.K, p.v + kv * p.V, p.K, p.V, p.scale); });
  heads.store(p.o + row * p.V, p.lse + row, p.V);
}

// Launches row_attention_kernel over every token and group of heads of L; `name` names it in errors.
template <typename T, typename Keys>
void launch_row_attention(const AttentionParams<T>& p, const Keys& keys, const DeviceLayout& L, cudaStream_t s,
                          const char* name) {
  if (L.B * L.T * L.HQ == 0 || L.num_seqs == 0) return;
  auto launch = [&](auto heads) {
    constexpr int kHeads = decltype(heads)::value;
    row_attention_kernel<T, kHeads, Keys><<<heads_blocks(L, kHeads, name), 128, 0, s>>>(p, keys, L);
  };
  switch (row_heads(L.G(), Keys::kMaxRowHeads)) {
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: launch(std::integral_constant<int, 1>{}); break;
  }
  check_launch(name);
}

template <typename T, int kHeads>
struct HeadsAttentionGrad {
  float q[kHeads][8], d_out[kHeads][8], dq[kHeads][8];
  float lse[kHeads], delta[kHeads];
  int count = 0;

  // Rows row0 .. row0 + count - 1 of q [*, K], do_x [*, V] (fp32), o_x [*, V] and lse [*].
  __device__ __forceinline__ void init(const T* q_rows, const float* do_rows, const T* o_rows, const float* lse_rows,
                                       int heads, int K, int V) {
    const int lane = threadIdx.x % 32;
    count = heads;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const bool on = h < heads;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        q[h][i] = on && d < K ? Elem<T>::to_float(q_rows[h * K + d]) : 0.f;
        d_out[h][i] = on && d < V ? do_rows[h * V + d] : 0.f;
        dq[h][i] = 0.f;
        if (on && d < V) dot = fmaf(d_out[h][i], Elem<T>::to_float(o_rows[h * V + d]), dot);
      }
      delta[h] = warp_sum(dot);
      lse[h] = on ? lse_rows[h] : 0.f;
    }
  }
  // Adds one key; every lane of the warp calls it with the same key.
  __device__ __forceinline__ void add_key(const T* k_row, const T* v_row, float* dk_row, float* dv_row, int K, int V,
                                          float scale) {
    const int lane = threadIdx.x % 32;
    float k[8], v[8], qk[kHeads], dp[kHeads];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      k[i] = d < K ? Elem<T>::to_float(k_row[d]) : 0.f;
      v[i] = d < V ? Elem<T>::to_float(v_row[d]) : 0.f;
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      qk[h] = dp[h] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) qk[h] = fmaf(q[h][i], k[i], qk[h]), dp[h] = fmaf(d_out[h][i], v[i], dp[h]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        qk[h] += __shfl_xor_sync(0xffffffffu, qk[h], off);
        dp[h] += __shfl_xor_sync(0xffffffffu, dp[h], off);
      }
    float dk[8] = {}, dv[8] = {};
    bool any = false;  // the same on every lane
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const float p = h < count ? expf(qk[h] * scale - lse[h]) : 0.f;
      if (p == 0.f) continue;  // the head adds nothing for this key
      any = true;
      const float ds = p * (dp[h] - delta[h]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        dq[h][i] = fmaf(scale * ds, k[i], dq[h][i]);
        dk[i] = fmaf(scale * ds, q[h][i], dk[i]);
        dv[i] = fmaf(p, d_out[h][i], dv[i]);
      }
    }
    if (!any) return;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      if (d < K) atomicAdd(dk_row + d, dk[i]);
      if (d < V) atomicAdd(dv_row + d, dv[i]);
    }
  }
  // dq rows row0 .. += the heads' dq (a row belongs to one warp of a launch).
  __device__ __forceinline__ void store(float* dq_rows, int K) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int h = 0; h < kHeads; ++h)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (h < count && d < K) dq_rows[h * K + d] += dq[h][i];
      }
  }
};

// The tensors of one attention branch's backward: fp32 gradients accumulated into, the branch's gated upstream
// gradient (fp32) and the forward's inputs and outputs.
template <typename T>
struct BackwardTensors {
  float *dq, *dk, *dv;
  const float* d_out;
  const T *q, *k, *v, *o;
  const float* lse;
};

// The backward of one attention branch: a warp per token and kHeads heads of its group, over the keys that
// `keys.each(r, f)` passes to f as rows of the branch's [*, H, K] / [*, H, V] key and value tensors.
template <typename T, int kHeads, typename Keys>
__global__ void __launch_bounds__(128) attention_backward_kernel(const BackwardTensors<T> g, const Keys keys,
                                                                 const DeviceLayout L) {
  int64_t row;
  int count;
  QueryRow r;
  if (!find_grad_rows<kHeads>(L, row, count, r)) return;
  HeadsAttentionGrad<T, kHeads> grad;
  const int K = int(L.K), V = int(L.V);
  grad.init(g.q + row * K, g.d_out + row * V, g.o + row * V, g.lse + row, count, K, V);
  keys.each(r, [&](int64_t kv) {
    grad.add_key(g.k + kv * K, g.v + kv * V, g.dk + kv * K, g.dv + kv * V, K, V, L.scale);
  });
  grad.store(g.dq + row * K, K);
}

// Launches attention_backward_kernel over every token and group of heads of L; `name` names it in errors.
template <typename Keys>
void attention_backward(float* dq, float* dk, float* dv, const float* d_out, const void* q, const void* k,
                        const void* v, const void* o, const float* lse, const Keys& keys, const DeviceLayout& L,
                        cudaStream_t s, const char* name) {
  if (L.B * L.T * L.HQ == 0 || L.num_seqs == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    const BackwardTensors<T> g{dq, dk, dv, d_out, static_cast<const T*>(q), static_cast<const T*>(k),
                          static_cast<const T*>(v), static_cast<const T*>(o), lse};
    with_grad_heads(L, [&](auto heads) {
      constexpr int kHeads = decltype(heads)::value;
      attention_backward_kernel<T, kHeads, Keys><<<heads_blocks(L, kHeads, name), 128, 0, s>>>(g, keys, L);
    });
    check_launch(name);
  });
}

// Whether the tile kernels take a problem (any dtype: fp32 as three tf32 products): sixteen_byte_rows for its
// four tensors.
inline bool tensor_core_path(const DeviceLayout& L, const void* q, const void* k, const void* v, const void* o) {
  return sixteen_byte_rows(L, {q, k, v, o});
}

// The head-dim bucket: the smallest of 16, 32, 64, 128, 256 holding both K and V.
inline int head_dim_bucket(int64_t K, int64_t V) {
  const int64_t d = K > V ? K : V;
  int b = 16;
  while (b < d) b *= 2;
  return b;
}

// Calls f(std::integral_constant<int, D>{}) for the bucket D.
template <typename F>
void dispatch_head_dim(int bucket, F&& f) {
  switch (bucket) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{}); break;
  }
}

// The tile kernel's launch for L on an SM of `budget`: two 16-row tiles per warp where G >= kTwoRowTilesMinG (16-bit
// elements, D = 64 / 128 only) and some stage count fits, else one; the stages by tile_stages. `extra(rows)` is
// what the kernel adds to the tile's shared memory for CTAs of `rows` query rows.
template <int kWarps, typename Extra>
TileChoice choose_tile(const DeviceLayout& L, SmemBudget budget, Extra&& extra) {
  TileChoice choice;
  if (L.H <= 0 || L.HQ < L.H) return choice;
  const bool two_row_tiles = L.G() >= kTwoRowTilesMinG;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(head_dim_bucket(L.K, L.V), [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      auto with = [&](auto mt) {
        constexpr int kMT = decltype(mt)::value;
        using One = TileShape<T, D, kWarps, kMT, 1>;
        using Two = TileShape<T, D, kWarps, kMT, 2>;
        const int64_t more = extra(Two::kRows);
        const int64_t bytes1 = int64_t(One::kTileBytes) + more, bytes2 = int64_t(Two::kTileBytes) + more;
        TileChoice c;
        c.stages = tile_stages(bytes1, bytes2, budget);
        c.row_tiles = c.stages ? kMT : 0;
        c.bytes = c.stages == 2 ? bytes2 : c.stages == 1 ? bytes1 : 0;
        return c;
      };
      if constexpr ((D == 64 || D == 128) && sizeof(T) == 2) {
        if (two_row_tiles) {
          choice = with(std::integral_constant<int, 2>{});
          if (choice.stages) return;
        }
      }
      choice = with(std::integral_constant<int, 1>{});
    });
  });
  return choice;
}

// Calls f(kMT, kStages) (integral constants) for a choice of choose_tile with stages > 0 for elements T, bucket D.
template <typename T, int D, typename F>
void dispatch_tile(const TileChoice& c, F&& f) {
  auto by_stages = [&](auto mt) {
    if (c.stages == 1) return f(mt, std::integral_constant<int, 1>{});
    f(mt, std::integral_constant<int, 2>{});
  };
  if constexpr ((D == 64 || D == 128) && sizeof(T) == 2) {
    if (c.row_tiles == 2) return by_stages(std::integral_constant<int, 2>{});
  }
  by_stages(std::integral_constant<int, 1>{});
}

}  // namespace nsa::cuda::attn
