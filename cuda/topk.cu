// Top-k block selection (nsa-spec §2.3), seed and paper policies.
//
// The scores are the group's summed probabilities p = exp(z - lse_cmp) over pooled blocks. Each top-k kernel
// computes z as its compressed-attention twin does, in the same order, so the logits are the very ones that
// produced lse_cmp: the tile kernel with the warp tiles of compressed_attention.cu (warp_tile.cuh), the sm_90
// kernel (G = 2, 4, 8, 16) with the wgmma sequence of attention_sm90.cu. Where compressed attention takes its
// wgmma kernel but top-k the tile kernel (sm_90, G = 1, 32 or a multiple of 64), z differs from the pass that
// made lse_cmp by fp32 rounding only, which the tie-aware comparison absorbs. One CTA per (token tile, sequence, kv
// head) walks the pooled blocks in tiles of 64 and builds a shared [tokens x 64] score tile (sums over the
// group's heads).
//
// Selection: forced blocks (seed: cur, score G; paper: {0, cur-1, cur}, score 1) are always members -- they
// carry the highest possible score and win exact ties -- so only the S' = S - forced best ordinary blocks
// have to be found. Each token belongs to one warp, which keeps a private candidate buffer: a block enters
// when its score is above the token's threshold (the S'-th best score seen at the last compaction; a later
// block with an equal score loses on index). A full buffer is cut back to its S' best (warp_keep_best: exact
// ranks of the few entries above a lane-maxima bound, or a radix select on the score bits; scores are >= 0,
// so their bits order like the floats); entrants thin out as the threshold rises (at block n, about S' / n of
// the blocks enter), so most of the per-tile work is one compare and ballot per block. At the end the S' best
// are selected the same way, the forced blocks added, and the slots ordered by score descending, ties to the
// smaller block; -1 pads. At G = 16 the sm_90 kernel's warp holds its token's scores of a tile two per lane,
// straight from the head sums, and filters them there (filter_pair), with the buffer's count and threshold in
// registers; at G = 1 the tile kernel's quads of lanes do the same for 16 tokens of a warp at once (filter_quads).
#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/tma.cuh"
#include "cuda/warp_tile.cuh"
#include "cuda/wgmma.cuh"

namespace nsa::cuda {
namespace {

constexpr int kBN = tile::kBlockN;
// Row stride of the score tile: padded so that the 8 token rows one store instruction writes (G < 16) fall in
// different banks.
constexpr int kScoreStride = kBN + 4;
constexpr int kMaxPerLane = 8;   // candidate buffer entries per lane in a select
constexpr int kMaxCap = 32 * kMaxPerLane;
constexpr int kMaxS = kTopkMaxBlockCount;  // selected blocks per query: a filter pass appends up to 32 to S - 1
static_assert(kMaxS + 31 <= kMaxCap, "the candidate buffer holds S - 1 kept entries and a pass of 32");
constexpr unsigned kFull = 0xffffffffu;

struct TopkParams {
  DeviceLayout L;
  tile::Geometry geo;
  int G = 0;
  int k_padded = 0;
  float scale_log2 = 0;
  int stages = 1;  // K tile buffers, 1 to 3: with s > 1, s - 1 tiles' copies overlap this tile's math
  int cap = 0;     // candidate buffer entries per token, >= S + 31 (an appended 32-block chunk always fits)
};

template <typename T>
constexpr int warps_for() { return Elem<T>::kTensorCore ? 8 : 4; }

// Per token: its block, the end of its scored blocks (c < lim) and the ordinary blocks it keeps.
struct TokenInfo {
  int cur, lim, keep;
};

// Shared memory: Q tile, K tiles, score tile [tpt][kScoreStride], candidate buffers [tpt][cap] (score, block),
// and per token the buffer count, threshold and TokenInfo.
template <typename T>
int smem_bytes(int warps, int k_padded, int tpt, int stages, int cap) {
  const int ks = tile::smem_stride<T>(k_padded);
  return (16 * warps * ks + stages * kBN * ks) * int(sizeof(T)) + tpt * kScoreStride * 4 + tpt * cap * 8 +
         tpt * (8 + int(sizeof(TokenInfo)));
}

// Keeps the k best of the n entries (bs, bi) -- score descending, then block ascending -- in the first k slots
// and returns a score v with every kept score >= v >= every dropped one. Preconditions: 1 <= k < n <= kMaxCap,
// scores >= 0, blocks distinct; the whole warp calls it.
//
// Fast path (k <= 32): the k-th best of the 32 lanes' best entries is a lower bound of the k-th best entry
// (k lanes hold an entry at least that large), and usually few entries reach it. When at most kRankMax do,
// each survivor's exact rank among them is counted with broadcast reads -- independent loads, no chain of
// warp reductions -- and the kept survivors land in rank order, so v is exactly the k-th best. Otherwise
// (k > 32, or many entries tied at the bound) a radix select on the score bits finds v.
constexpr int kRankMax = 64;

struct KeepResult {
  float thr;    // every kept score >= thr >= every dropped one
  bool ranked;  // the kept entries are in rank order (score descending, then block ascending)
};

__device__ KeepResult warp_keep_best(float* bs, int* bi, int n, int k, int lane) {
  __syncwarp();  // the warp's appends are visible
  uint32_t u[kMaxPerLane];
  int id[kMaxPerLane];
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = j * 32 + lane;
    u[j] = e < n ? __float_as_uint(bs[e]) : 0u;
    id[j] = e < n ? bi[e] : 0;
  }
  if (k <= 32) {
    // Lane keys: best entry + 1, 0 for a lane without entries (scores are >= 0, so bit 31 is clear), sorted
    // descending across the lanes; min(n, 32) >= k lanes have entries, so the k-th key bounds the k-th entry.
    uint32_t key = 0;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j)
      if (j * 32 + lane < n) key = max(key, u[j] + 1u);
    uint32_t sorted_key = key;  // bitonic sort across the lanes, descending
#pragma unroll
    for (int size = 2; size <= 32; size *= 2)
#pragma unroll
      for (int stride = size / 2; stride > 0; stride /= 2) {
        const uint32_t other = __shfl_xor_sync(kFull, sorted_key, stride);
        const bool descending = (lane & size) == 0, lower = (lane & stride) == 0;
        sorted_key = lower == descending ? max(sorted_key, other) : min(sorted_key, other);
      }
    const uint32_t bound = __shfl_sync(kFull, sorted_key, k - 1) - 1u;
    int survivors = 0;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) survivors += j * 32 + lane < n && u[j] >= bound;
    const int m = int(__reduce_add_sync(kFull, unsigned(survivors)));
    if (m <= kRankMax) {
      __syncwarp();  // every entry is in registers: the survivors move to the front
      int base = 0;
#pragma unroll
      for (int j = 0; j < kMaxPerLane; ++j) {
        const bool survives = j * 32 + lane < n && u[j] >= bound;
        const unsigned mask = __ballot_sync(kFull, survives);
        if (survives) {
          const int pos = base + __popc(mask & ((1u << lane) - 1));
          bs[pos] = __uint_as_float(u[j]);
          bi[pos] = ~id[j];  // complemented for the ranking keys below; restored when written back
        }
        base += __popc(mask);
      }
      __syncwarp();
      // Ranking key: the score's bits high, the block's complement low, so that one unsigned 64-bit comparison
      // orders by score descending, then block ascending.
      auto rank_key = [](float score, int not_block) {
        return (uint64_t(__float_as_uint(score)) << 32) | uint32_t(not_block);
      };
      uint64_t sk[kRankMax / 32];
      int rank[kRankMax / 32];
#pragma unroll
      for (int i = 0; i < kRankMax / 32; ++i) {
        const int e = i * 32 + lane;
        sk[i] = e < m ? rank_key(bs[e], bi[e]) : 0u;
        rank[i] = 0;
      }
      for (int e = 0; e < m; ++e) {
        const uint64_t ke = rank_key(bs[e], bi[e]);
#pragma unroll
        for (int i = 0; i < kRankMax / 32; ++i) rank[i] += ke > sk[i];
      }
      __syncwarp();  // every read done before the slots are rewritten
      uint32_t v = 0;
#pragma unroll
      for (int i = 0; i < kRankMax / 32; ++i) {
        const bool kept = i * 32 + lane < m && rank[i] < k;
        const uint32_t su = uint32_t(sk[i] >> 32);
        if (kept) {
          bs[rank[i]] = __uint_as_float(su);
          bi[rank[i]] = ~int(uint32_t(sk[i]));
        }
        if (kept && rank[i] == k - 1) v = su;
      }
      v = __reduce_max_sync(kFull, v);
      __syncwarp();
      return {__uint_as_float(v), true};
    }
  }
  // Radix select: v = the largest bit pattern with at least k entries >= v, i.e. the k-th best score (bit 31
  // is the sign), found bit by bit below the bits that every entry shares; the search stops as soon as
  // exactly k entries are >= v, which already separates the kept from the dropped.
  uint32_t any = 0, all = ~0u;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j)
    if (j * 32 + lane < n) any |= u[j], all &= u[j];
  any = __reduce_or_sync(kFull, any);
  all = __reduce_and_sync(kFull, all);
  const int top = 31 - __clz(any ^ all);  // highest bit on which entries differ; -1: all equal
  uint32_t v = top < 0 ? all : all & ~((2u << top) - 1u);
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t t = v | (1u << bit);
    int c = 0;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) c += (j * 32 + lane < n && u[j] >= t);
    const int total = int(__reduce_add_sync(kFull, unsigned(c)));
    if (total >= k) v = t;
    if (total == k) break;
  }
  int gt = 0, eq = 0;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const bool valid = j * 32 + lane < n;
    gt += valid && u[j] > v;
    eq += valid && u[j] == v;
  }
  const int need = k - int(__reduce_add_sync(kFull, unsigned(gt)));
  const bool all_eq = int(__reduce_add_sync(kFull, unsigned(eq))) == need;
  bool keep[kMaxPerLane];
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const bool valid = j * 32 + lane < n;
    keep[j] = valid && (u[j] > v || (u[j] == v && all_eq));
    if (valid && u[j] == v && !all_eq) {
      // Exact tie across the cut: the smaller blocks stay.
      int rank = 0;
      for (int e = 0; e < n; ++e) rank += __float_as_uint(bs[e]) == v && bi[e] < id[j];
      keep[j] = rank < need;
    }
  }
  __syncwarp();  // every read done before the slots are rewritten
  int base = 0;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const unsigned mask = __ballot_sync(kFull, keep[j]);
    if (keep[j]) {
      const int pos = base + __popc(mask & ((1u << lane) - 1));
      bs[pos] = __uint_as_float(u[j]);
      bi[pos] = id[j];
    }
    base += __popc(mask);
  }
  __syncwarp();
  return {__uint_as_float(v), false};
}

// One level of a reduce-scatter over lanes `lane` and `lane ^ offset`: of the 2 * kHalf values v[0..2 kHalf),
// the lane with the offset bit set keeps the upper half, the other the lower; each adds its partner's copy of
// the half it keeps, into v[0..kHalf).
template <int kHalf>
__device__ __forceinline__ void reduce_scatter_level(float* v, int lane, int offset) {
  const bool upper = lane & offset;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf], keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(kFull, send, offset);
  }
}

// Forced blocks of a token, ascending: seed {cur}; paper {0, cur-1, cur} without repeats.
__device__ __forceinline__ int forced_count(bool paper, int cur) { return paper ? min(cur + 1, 3) : 1; }
__device__ __forceinline__ int forced_block(bool paper, int cur, int i) {
  if (!paper) return cur;
  return i == 0 ? 0 : cur - (forced_count(paper, cur) - 1 - i);
}

// G = 16: sums the 16 heads (rows) of a warp's 16 x 64 probabilities (mma accumulator layout) by a
// reduce-scatter across lanes (each level sends half of what is left); each lane ends up with 2 of the 64
// column sums, those of columns head16_column(lane) and head16_column(lane) + 1.
__device__ __forceinline__ void head16_sums(const float (&s)[kBN / 8][4], float (&sum)[2], int lane) {
  static_assert(kBN == 64, "16 values per lane, 3 levels");
  float v[16];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[2 * j] = s[j][0] + s[j][2], v[2 * j + 1] = s[j][1] + s[j][3];
  reduce_scatter_level<8>(v, lane, 4);
  reduce_scatter_level<4>(v, lane, 8);
  reduce_scatter_level<2>(v, lane, 16);
  sum[0] = v[0], sum[1] = v[1];
}
// v[0..1] above are values 2 j + {0, 1} with j = 4 b0 + 2 b1 + b2 (b = lane bits 2, 3, 4): columns j * 8 + col0.
__device__ __forceinline__ int head16_column(int lane) {
  const int j = 4 * ((lane >> 2) & 1) + 2 * ((lane >> 3) & 1) + ((lane >> 4) & 1);
  return j * 8 + (lane % 4) * 2;
}

// Direct scores (G divides 16, one head chunk): a warp's 16 rows are whole tokens. Sums each token's heads of
// the warp's 16 x 64 probabilities (mma accumulator layout; tl[half] is the token of rows lane / 4 and
// lane / 4 + 8) and stores its 64 scores in the score tile.
__device__ __forceinline__ void store_head_sums(const float (&s)[kBN / 8][4], float* score, const int (&tl)[2], int G,
                                                int lane) {
  const int col0 = (lane % 4) * 2;
  if (G == 16) {
    float sum[2];
    head16_sums(s, sum, lane);
    *reinterpret_cast<float2*>(&score[tl[0] * kScoreStride + head16_column(lane)]) = make_float2(sum[0], sum[1]);
  } else {
    // G in {1, 2, 4, 8}: a token's heads are G consecutive row groups of 4 lanes.
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[j][e];
        for (int off = 4; off < 4 * G; off *= 2) v += __shfl_xor_sync(kFull, v, off);
        if ((lane / 4) % G == 0) score[tl[e / 2] * kScoreStride + col0 + j * 8 + (e & 1)] = v;
      }
  }
}

// A token's block, the end of its scored blocks (c < lim) and the ordinary blocks it keeps.
__device__ __forceinline__ TokenInfo token_info(int64_t t, int BS, int S, bool paper) {
  TokenInfo ti;
  ti.cur = int(t / BS);
  ti.lim = paper ? int((t + 1) / BS) : ti.cur;
  ti.keep = max(0, S - forced_count(paper, ti.cur));
  return ti;
}

// A token's candidate buffer in shared memory: `cap` (score, block) entries, their count and the threshold.
struct Candidates {
  float* score;
  int* block;
  int* count;
  float* thr;
};

// Filter: appends the token's ordinary blocks of one pooled tile (row[i] scores block c0 + i) whose score is
// above its threshold, 32 at a time; a full buffer is first cut back to its `keep` best. The whole warp calls it.
__device__ __forceinline__ void filter_tile(const Candidates& cb, const float* row, int c0, const TokenInfo& ti,
                                            bool paper, int G, int cap, int lane) {
  int n = *cb.count;
  float thr = *cb.thr;
  // Paper policy: the mean over the group's heads. For a power-of-two G (every G of the sm_90 kernel) the
  // product with 1 / G is the exact quotient, without a division per score.
  const bool exact_inverse = (G & (G - 1)) == 0;
  const float inv_g = 1.f / float(G);
  for (int base = 0; base < kBN && c0 + base < ti.lim; base += 32) {
    if (n + 32 > cap) {
      thr = warp_keep_best(cb.score, cb.block, n, ti.keep, lane).thr;
      n = ti.keep;
    }
    const int i = base + lane, c = c0 + i;
    const bool ordinary = c < ti.lim && (!paper || (c != 0 && c != ti.cur - 1 && c != ti.cur));
    float value = 0.f;
    if (ordinary) value = !paper ? row[i] : exact_inverse ? row[i] * inv_g : row[i] / float(G);
    const bool enters = ordinary && value > thr;
    const unsigned mask = __ballot_sync(kFull, enters);
    if (enters) {
      const int pos = n + __popc(mask & ((1u << lane) - 1));
      cb.score[pos] = value;
      cb.block[pos] = c;
    }
    n += __popc(mask);
  }
  __syncwarp();
  if (lane == 0) {
    *cb.count = n;
    *cb.thr = thr;
  }
}

// warp_keep_best out of line, for a caller whose hot path it would otherwise crowd with its registers (inlined
// in the G = 16 filter, it made the sm_90 kernel spill).
[[maybe_unused]] __device__ __noinline__ KeepResult warp_keep_best_call(float* bs, int* bi, int n, int k, int lane) {
  return warp_keep_best(bs, bi, n, k, lane);
}

// A token's candidate buffer whose count and threshold live in (warp-uniform) registers: G = 16, where a warp
// owns one token and holds its scores of a tile two per lane (head16_sums).
struct RegisterCandidates {
  float* score;
  int* block;
  int n = 0;
  float thr = -INFINITY;
};

// filter_tile's rule on the two scores sum[] of blocks c and c + 1 (c = c0 + head16_column(lane)), a whole tile
// at a time: the tile's ordinary blocks above the threshold are appended, after cutting a buffer that cannot
// take them back to its `keep` best (keep + 64 <= cap, sm90_cap). The cut comes before the tile, so a threshold
// it sets only drops blocks after every block it kept, as an equal score must lose on index. Against
// filter_tile: no score tile in shared memory, no count or threshold reloaded per tile, no cut before a tile
// whose entrants fit, and usually two ballots and one branch per tile.
[[maybe_unused]] __device__ __forceinline__ void filter_pair(RegisterCandidates& cb, const float (&sum)[2], int c,
                                                             const TokenInfo& ti, bool paper, int cap, int lane) {
  bool ordinary[2], enters[2];
  float value[2];
  unsigned mask[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int b = c + i;
    ordinary[i] = b < ti.lim && (!paper || (b != 0 && b != ti.cur - 1 && b != ti.cur));
    value[i] = paper ? sum[i] * (1.f / 16) : sum[i];  // the mean over 16 heads, exactly
  }
  auto ballots = [&] {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      enters[i] = ordinary[i] && value[i] > cb.thr;
      mask[i] = __ballot_sync(kFull, enters[i]);
    }
    return __popc(mask[0]) + __popc(mask[1]);
  };
  int total = ballots();
  if (total == 0) return;
  if (cb.n + total > cap) {
    cb.thr = warp_keep_best_call(cb.score, cb.block, cb.n, ti.keep, lane).thr;
    cb.n = ti.keep;
    total = ballots();
  }
  // A lane's entrants go after those of the lanes below it, its block c before c + 1.
  const unsigned below = (1u << lane) - 1;
  int pos = cb.n + __popc(mask[0] & below) + __popc(mask[1] & below);
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (enters[i]) {
      cb.score[pos] = value[i];
      cb.block[pos] = c + i;
      ++pos;
    }
  cb.n += total;
}

// G = 1 in the tile kernel: a warp's 16 rows are 16 tokens, and the four lanes of a quad hold one token's 64
// scores of a tile, 16 each (mma accumulator layout: rows lane / 4 and lane / 4 + 8). Each quad filters its token
// in registers -- filter_pair's rule for 16 tokens at once, without the score tile or a pass per token: the
// token's count and threshold live in the quad's registers, a quad whose entrants would not fit has its buffer
// cut back to its `keep` best first (the whole warp, one such token at a time; keep + 64 <= cap), then every
// lane appends its entrants after those of the quad's lanes below it.
struct QuadCandidates {
  int n[2] = {0, 0};
  float thr[2] = {-INFINITY, -INFINITY};
};
__device__ __forceinline__ void filter_quads(QuadCandidates& qc, const float (&s)[kBN / 8][4], int c0,
                                             const int (&tl)[2], const TokenInfo (&ti)[2], bool paper,
                                             float* buf_score, int* buf_block, int cap, int lane) {
  const int q = lane % 4, col0 = c0 + q * 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    // This lane's entrants among its 16 scores of the token (bit 2 j + i: column col0 + 8 j + i), counted over
    // the quad: its offset among them and their total.
    auto count = [&](uint32_t& mask, int& before, int& total) {
      mask = 0;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int c = col0 + 8 * j + i;
          const bool ordinary = ti[half].keep > 0 && c < ti[half].lim &&
                                (!paper || (c != 0 && c != ti[half].cur - 1 && c != ti[half].cur));
          if (ordinary && s[j][2 * half + i] > qc.thr[half]) mask |= 1u << (2 * j + i);
        }
      const int own = __popc(mask);
      int incl = own;
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        const int other = __shfl_up_sync(kFull, incl, off, 4);
        if (q >= off) incl += other;
      }
      before = incl - own;
      total = __shfl_sync(kFull, incl, 3, 4);
    };
    uint32_t mask;
    int before, total;
    count(mask, before, total);
    // Quads (one bit each, lane 4k) whose entrants would overflow their buffer: cut back, one token at a time.
    unsigned full = __ballot_sync(kFull, q == 0 && qc.n[half] + total > cap);
    if (full) {
      while (full) {
        const int src = __ffs(full) - 1;
        full &= full - 1;
        const int t = __shfl_sync(kFull, tl[half], src), n = __shfl_sync(kFull, qc.n[half], src);
        const int keep = __shfl_sync(kFull, ti[half].keep, src);
        const float thr = warp_keep_best_call(buf_score + t * cap, buf_block + t * cap, n, keep, lane).thr;
        if (lane / 4 == src / 4) qc.thr[half] = thr, qc.n[half] = keep;
      }
      count(mask, before, total);
    }
    float* score = buf_score + tl[half] * cap;
    int* block = buf_block + tl[half] * cap;
    int pos = qc.n[half] + before;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (mask & (1u << (2 * j + i))) {
          score[pos] = s[j][2 * half + i];
          block[pos] = col0 + 8 * j + i;
          ++pos;
        }
    qc.n[half] += total;
  }
}

// The token's S' best ordinary blocks, its forced blocks, then the S slots by score descending, ties to the
// smaller block; -1 pads. The whole warp calls it.
__device__ __forceinline__ void write_selection(int32_t* out, const Candidates& cb, const TokenInfo& ti, bool paper,
                                                int G, int S, int lane) {
  float* bs = cb.score;
  int* bi = cb.block;
  const int n = *cb.count, k = min(ti.keep, n);
  const bool ranked = k > 0 && n > k && warp_keep_best(bs, bi, n, k, lane).ranked;
  const int nf = min(forced_count(paper, ti.cur), S);
  const float forced_score = paper ? 1.f : float(G);  // the highest possible score (see the top of the file)
  if (ranked) {
    // bs[0, k) are in rank order (k <= 32): the forced blocks (ascending, one score) merge in, each side
    // counting the entries of the other that go before it.
    const bool has = lane < k;
    const float si = has ? bs[lane] : 0.f;
    const int bi_i = has ? bi[lane] : 0;
    int slot = lane;
    for (int f = 0; f < nf; ++f) {
      const int fb = forced_block(paper, ti.cur, f);
      slot += forced_score > si || (forced_score == si && fb < bi_i);
      const unsigned ahead = __ballot_sync(kFull, has && (si > forced_score || (si == forced_score && bi_i < fb)));
      if (lane == f) out[f + __popc(ahead)] = fb;
    }
    if (has) out[slot] = bi_i;
    for (int j = k + nf + lane; j < S; j += 32) out[j] = -1;
    __syncwarp();
    return;
  }
  if (lane < nf) {
    bs[k + lane] = forced_score;
    bi[k + lane] = forced_block(paper, ti.cur, lane);
  }
  __syncwarp();
  const int m = k + nf;
  for (int i = lane; i < m; i += 32) {
    const float si = bs[i];
    const int bi_i = bi[i];
    int slot = 0;
    for (int j = 0; j < m; ++j) slot += bs[j] > si || (bs[j] == si && bi[j] < bi_i);
    out[slot] = bi_i;
  }
  for (int j = m + lane; j < S; j += 32) out[j] = -1;
  __syncwarp();
}

// Preconditions: K <= k_padded <= 256, S <= kMaxS, cap in [S + 31, kMaxCap], the grid is
// (geo.tiles_x / geo.head_chunks, num_seqs, H) with geo made for 16 * W rows.
template <typename T, int W, bool kQuads>
__global__ void __launch_bounds__(W * 32, 2)
    topk_kernel(int32_t* __restrict__ block_indices,  // [B, T, H, S]
                const T* __restrict__ q,              // [B, T, HQ, K]
                const T* __restrict__ k_cmp,          // [B, C, H, K]
                const float* __restrict__ lse_cmp,    // [B, T, HQ]
                const TopkParams P) {
  constexpr int ROWS = 16 * W;
  constexpr float kLog2e = 1.4426950408889634f;
  const DeviceLayout& L = P.L;
  const DeviceSequence seq = L.seqs[blockIdx.y];
  // One CTA covers every head chunk of its tokens. Late tokens score the most blocks: launched first, so that
  // the short CTAs fill the tail.
  const int64_t t0 = int64_t(gridDim.x - 1 - blockIdx.x) * P.geo.tpt;
  if (t0 >= seq.length) return;
  const int h = blockIdx.z, G = P.G, hpt = P.geo.hpt, tpt = P.geo.tpt, BS = L.block_size, S = L.block_count;
  const int cap = P.cap;
  const int64_t K = L.K, HQ = L.HQ, H = L.H;
  const bool paper = L.paper_policy;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ks = tile::smem_stride<T>(P.k_padded);
  T* Qs = reinterpret_cast<T*>(smem_raw);                              // [ROWS][ks]
  T* Ks0 = Qs + ROWS * ks;                                             // [stages][kBN][ks]
  float* score = reinterpret_cast<float*>(Ks0 + P.stages * kBN * ks);  // [tpt][kScoreStride]
  float* buf_score = score + tpt * kScoreStride;                       // [tpt][cap]
  int* buf_block = reinterpret_cast<int*>(buf_score + tpt * cap);      // [tpt][cap]
  int* buf_count = buf_block + tpt * cap;                              // [tpt]
  float* buf_thr = reinterpret_cast<float*>(buf_count + tpt);          // [tpt]
  TokenInfo* tok_info = reinterpret_cast<TokenInfo*>(buf_thr + tpt);  // [tpt]
  auto candidates = [&](int tl) {
    return Candidates{buf_score + tl * cap, buf_block + tl * cap, buf_count + tl, buf_thr + tl};
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tok_base = seq.batch * L.T + seq.start;
  const int64_t chunk_base = seq.batch * L.C + seq.chunk_start;
  const int64_t last_token = min(t0 + tpt, seq.length) - 1;
  const int nc_max = int((last_token + 1) / BS), lim_max = paper ? nc_max : int(last_token / BS);
  // Per token, once (the filter reads it every tile; a 64-bit division is dozens of instructions).
  for (int i = threadIdx.x; i < tpt; i += blockDim.x) {
    buf_count[i] = 0;
    buf_thr[i] = -INFINITY;
    tok_info[i] = token_info(t0 + i, BS, S, paper);
  }

  auto row_token = [&](int r) { return t0 + r / hpt; };
  auto load_q = [&](int hc) {
    tile::load_rows(Qs, ks, ROWS, int(K), P.k_padded, [&](int r) -> const T* {
      if (r / hpt >= tpt || row_token(r) >= seq.length || hc * hpt + r % hpt >= G) return nullptr;
      return q + ((tok_base + row_token(r)) * HQ + h * G + hc * hpt + r % hpt) * K;
    });
  };
  if (P.geo.head_chunks == 1 && lim_max > 0) load_q(0);  // its copies join the first tile's group
  // Issues the copies of pooled tile c0 (none past the CTA's last scored block) and commits them as one group.
  auto load_k = [&](int c0, int stage) {
    if (c0 < lim_max)
      tile::load_rows(Ks0 + stage * kBN * ks, ks, kBN, int(K), P.k_padded, [&](int r) -> const T* {
        return c0 + r < nc_max ? k_cmp + ((chunk_base + c0 + r) * H + h) * K : nullptr;
      });
    cp_async_commit();  // empty groups too, so that a fixed wait count finds tile `it`
  };
  if (lim_max > 0)
    for (int st = 0; st < P.stages - 1 || st == 0; ++st) load_k(st * kBN, st);

  const int row_a = warp * 16 + lane / 4, row_b = row_a + 8;
  // When a token's heads all sit in one warp (G divides 16, one head chunk), the warp sums them with shuffles
  // and stores every score of its tokens: no atomics, no zeroing. Otherwise heads of a token span warps or
  // chunks, and the rows add into a zeroed tile.
  const bool direct = P.geo.head_chunks == 1 && 16 % G == 0;

  // Per row of the warp: token in the tile, candidate limit (blocks c < limit are scored) and lse in base 2,
  // and the warp's largest limit. Read once when the tile has one head chunk, not per pooled tile.
  struct {
    int lim[2], tl[2], warp_lim;
    float lse2[2];
  } rows;
  auto set_rows = [&](int hc) {
    for (int half = 0; half < 2; ++half) {
      const int r = half ? row_b : row_a;
      const bool valid = r / hpt < tpt && row_token(r) < seq.length && hc * hpt + r % hpt < G;
      const int64_t t = row_token(r);
      rows.tl[half] = r / hpt;
      rows.lim[half] = valid ? (paper ? int((t + 1) / BS) : int(t / BS)) : 0;
      rows.lse2[half] = valid ? lse_cmp[(tok_base + t) * HQ + h * G + hc * hpt + r % hpt] * kLog2e : 0.f;
    }
    int m = max(rows.lim[0], rows.lim[1]);
    for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(kFull, m, off));
    rows.warp_lim = m;
  };
  if (P.geo.head_chunks == 1) set_rows(0);
  // kQuads (launched at G = 1 where a cut leaves room for a whole tile; an instance of its own, whose registers the
  // others keep): each quad filters its token in registers (filter_quads). Its rows' TokenInfo is computed here,
  // not read from tok_info, which other threads are still writing (no barrier yet).
  QuadCandidates qc;
  TokenInfo qti[2] = {};
  if (kQuads)
    for (int half = 0; half < 2; ++half)
      if (rows.tl[half] < tpt && t0 + rows.tl[half] < seq.length)
        qti[half] = token_info(t0 + rows.tl[half], BS, S, paper);

  for (int it = 0, c0 = 0; c0 < lim_max; ++it, c0 += kBN) {
    if (P.stages == 1 && it > 0) {
      __syncthreads();  // every warp is done with the buffer
      load_k(c0, 0);
    }
    // Tile `it` landed (the groups after it are the stages - 2 later tiles), then one barrier: tile `it` is
    // visible to every warp, and every warp is past tile it - 1 (its scores filtered, its buffer free for the
    // copy issued next).
    if (P.stages == 3) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    if (P.stages > 1) load_k(c0 + (P.stages - 1) * kBN, (it + P.stages - 1) % P.stages);
    const T* Ks = Ks0 + (it % P.stages) * kBN * ks;
    if (!direct)
      for (int i = threadIdx.x; i < tpt * kScoreStride; i += blockDim.x) score[i] = 0.f;

    for (int hc = 0; hc < P.geo.head_chunks; ++hc) {
      if (P.geo.head_chunks > 1) {
        __syncthreads();
        load_q(hc);
        cp_async_commit();
        cp_async_wait<0>();
      }
      if (!direct) __syncthreads();  // the zeroed score tile (and a new head chunk's Q) visible
      if (P.geo.head_chunks > 1) set_rows(hc);
      const int lim[2] = {rows.lim[0], rows.lim[1]}, tl[2] = {rows.tl[0], rows.tl[1]};
      const float lse2[2] = {rows.lse2[0], rows.lse2[1]};
      const int warp_lim = rows.warp_lim;
      if (c0 >= warp_lim) continue;

      float s[kBN / 8][4];
      tile::warp_scores<T, kBN>(s, Qs, Ks, ks, warp * 16, P.k_padded, lane);
      const int col0 = (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2, col = c0 + col0 + j * 8 + (e & 1);
          s[j][e] = col < lim[half] ? exp2_ftz(s[j][e] * P.scale_log2 - lse2[half]) : 0.f;
        }
      if (kQuads) {
        filter_quads(qc, s, c0, tl, qti, paper, buf_score, buf_block, cap, lane);
      } else if (direct) {
        store_head_sums(s, score, tl, G, lane);
      } else if (hpt % 16 == 0) {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = s[j][e] + s[j][e + 2];
            for (int off = 4; off < 32; off *= 2) v += __shfl_xor_sync(kFull, v, off);
            if (lane < 4 && c0 + col0 + j * 8 + e < lim[0])
              atomicAdd(&score[tl[0] * kScoreStride + col0 + j * 8 + e], v);
          }
      } else {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (s[j][e] != 0.f) atomicAdd(&score[tl[e / 2] * kScoreStride + col0 + j * 8 + (e & 1)], s[j][e]);
      }
    }
    if (kQuads) continue;
    // Direct scores: a warp filters the tokens whose rows it holds, so it only waits for its own stores.
    if (direct) __syncwarp();
    else __syncthreads();
    const int tl_first = direct ? warp * 16 / G : warp, tl_step = direct ? 1 : W;
    const int tl_end = direct ? min(tpt, (warp + 1) * 16 / G) : tpt;

    // Filter: each token's warp appends the ordinary blocks above its threshold, 32 at a time.
    for (int tl = tl_first; tl < tl_end; tl += tl_step) {
      const int64_t t = t0 + tl;
      if (t >= seq.length) break;
      const TokenInfo ti = tok_info[tl];
      if (c0 >= ti.lim || ti.keep == 0) continue;
      filter_tile(candidates(tl), score + tl * kScoreStride, c0, ti, paper, G, cap, lane);
    }
  }
  if (kQuads && lim_max > 0 && lane % 4 == 0)  // (past the tile loop's barriers, so after the counts' initialisation)
    for (int half = 0; half < 2; ++half)
      if (rows.tl[half] < tpt) buf_count[rows.tl[half]] = qc.n[half], buf_thr[rows.tl[half]] = qc.thr[half];
  cp_async_wait<0>();  // Q's copies when no tile ran
  __syncthreads();           // counts of tokens that no tile reached are initialised

  // The S' best ordinary blocks, the forced blocks, then the slots by score descending, ties to the smaller block.
  for (int tl = warp; tl < tpt; tl += W) {
    const int64_t t = t0 + tl;
    if (t >= seq.length) break;
    write_selection(block_indices + ((tok_base + t) * H + h) * S, candidates(tl), tok_info[tl], paper, G, S, lane);
  }
}

// ---- sm_90: the scores by asynchronous wgmma ----
// For bf16/fp16, K in {64, 128, 192} and G in {2, 4, 8, 16}. A CTA's rows are whole tokens, 64 / G per warpgroup of
// 64 rows (three warpgroups, or one at G = 16, below; two measured 35% slower at 64k, G = 16), 16 / G per
// warp: each warp sums its tokens' heads, stores their score rows, filters them in turn and writes their
// selections itself, with no CTA-wide barrier. Against the tile kernel (H100, T = 32k): G = 2 1.24 ms against
// 1.52 (128-entry buffers), G = 4 0.98 against 1.03, G = 8 3.14 against 3.45. A producer warp (at G = 16,
// thread 0 of the warpgroup) loads Q once and streams the pooled K tiles through a ring of stages (TMA,
// mbarriers). A warpgroup issues tile j+1's S = Q K^T (wgmma_scores, the compressed-attention kernel's very
// sequence, so the logits are the ones that produced lse_cmp) before it turns tile j into scores and filters
// them.
#ifndef NSA_TOPK_SM90_MIN_G  // a compile-time knob for tuning: the smallest G (a divisor of 16) taken here
#define NSA_TOPK_SM90_MIN_G 2  // G = 1 (a 48-entry buffer fits): 4.60 ms against the tile kernel's 3.30 (T=32k)
#endif
constexpr int kSm90MinG = NSA_TOPK_SM90_MIN_G;
#ifndef NSA_TOPK_SELF_FED  // a compile-time knob: 0 gives G = 16 the producer warp back (three CTAs per SM)
#define NSA_TOPK_SELF_FED 1
#endif
// Consumer warpgroups per CTA (kWG): three, one CTA per SM; or, at G = 16, one, several CTAs per SM, so that one
// CTA's start and end (Q load, the selections) overlap the others' tiles (H100, G = 16, three CTAs against one
// of three warpgroups: 0.172 -> 0.161 ms at 8k, 1.14 -> 1.08 at 32k), four since the CTA feeds its own ring
// (64k 2.57-2.70 -> 2.21-2.38 ms, before the filter's fix). At G = 2, 4, 8 a CTA of one warpgroup holds
// 32 / 16 / 8 tokens' buffers, so that fewer fit: 36-41% slower (T = 32k).
template <int kWG>
struct Sm90Shape {
  // G = 16 (kWG = 1): the warpgroup feeds its own ring (thread 0 issues the copies), so that four CTAs of 128
  // threads fit the register file at 128 registers each (a producer warp leaves room for three).
  static constexpr bool kSelfFed = kWG == 1 && NSA_TOPK_SELF_FED;
  static constexpr int kConsumers = kWG * 128;
  static constexpr int kThreads = kConsumers + (kSelfFed ? 0 : 32);  // else the last warp produces
  static constexpr int kRows = kWG * 64;
  static constexpr int kCtasPerSm = kWG == 1 ? (kSelfFed ? 4 : 3) : 1;
  static constexpr int kStages = kSelfFed ? 2 : 3;  // K tiles in flight; four CTAs leave room for two each
  static constexpr bool kScoreTile = kWG != 1;      // G = 16 filters from registers
};
// Candidate buffer entries per token where they fit: the most warp_keep_best takes (H100, 64k: 3.47 ms; 128
// entries 3.67, 64 entries 4.39 -- a smaller buffer compacts more often). G = 2 fits 128 (sm90_cap).
constexpr int kSm90Cap = kMaxCap;

// Shared memory: Q boxes, K stages, mbarriers, then the score tile, candidate buffers, counts, thresholds and
// token info of the CTA's tokens (as in smem_bytes).
template <int KD, int kWG>
struct Sm90Layout {
  static constexpr int kStageBytes = (KD / 64) * kWgmmaBoxBytes;
  static constexpr int kStage0 = kWG * kStageBytes;
  static constexpr int kBarriers = kStage0 + Sm90Shape<kWG>::kStages * kStageBytes;
  static constexpr int kTokens = kBarriers + (1 + 2 * Sm90Shape<kWG>::kStages) * 8;
  static constexpr int score_floats(int tpt) { return Sm90Shape<kWG>::kScoreTile ? tpt * kScoreStride : 0; }
  static int bytes(int tpt, int cap) {
    return kTokens + score_floats(tpt) * 4 + tpt * cap * 8 + tpt * (8 + int(sizeof(TokenInfo)));
  }
};

template <typename T, int KD, int kWG>
__global__ void __launch_bounds__(Sm90Shape<kWG>::kThreads, Sm90Shape<kWG>::kCtasPerSm)
    topk_sm90_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                     int32_t* __restrict__ block_indices,  // [B, T, H, S]
                     const float* __restrict__ lse_cmp,    // [B, T, HQ]
                     const TopkParams P) {
#if NSA_HAS_WGMMA
  using Ly = Sm90Layout<KD, kWG>;
  constexpr int kSm90Consumers = Sm90Shape<kWG>::kConsumers, kSm90Rows = Sm90Shape<kWG>::kRows;
  constexpr float kLog2e = 1.4426950408889634f;
  const DeviceLayout& L = P.L;
  const DeviceSequence seq = L.seqs[blockIdx.y];
  // One warpgroup per CTA is G = 16's shape (launch_sm90): G is then known here, a warp's 16 rows are one
  // token, and only that case's paths compile.
  constexpr bool kTokenPerWarp = kWG == 1;
  const int G = kTokenPerWarp ? 16 : P.G, tpt = kSm90Rows / G, BS = L.block_size, S = L.block_count, cap = P.cap;
  // Late tokens score the most blocks: launch them first so that the short CTAs fill the tail.
  const int64_t t0 = int64_t(gridDim.x - 1 - blockIdx.x) * tpt;
  if (t0 >= seq.length) return;
  const int h = blockIdx.z;
  const bool paper = L.paper_policy;

  extern __shared__ __align__(1024) unsigned char smem[];
  if (smem_addr(smem) & 1023) __trap();  // the swizzled tiles need the declared alignment
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Ly::kBarriers);
  constexpr int kSm90Stages = Sm90Shape<kWG>::kStages;
  constexpr bool kSelfFed = Sm90Shape<kWG>::kSelfFed;
  const StageRing<kSm90Stages> ring{q_full + 1, q_full + 1 + kSm90Stages};
  float* score = reinterpret_cast<float*>(smem + Ly::kTokens);    // [tpt][kScoreStride], where used
  float* buf_score = score + Ly::score_floats(tpt);                // [tpt][cap]
  int* buf_block = reinterpret_cast<int*>(buf_score + tpt * cap);  // [tpt][cap]
  int* buf_count = buf_block + tpt * cap;                          // [tpt]
  float* buf_thr = reinterpret_cast<float*>(buf_count + tpt);      // [tpt]
  TokenInfo* tok_info = reinterpret_cast<TokenInfo*>(buf_thr + tpt);
  auto candidates = [&](int tl) {
    return Candidates{buf_score + tl * cap, buf_block + tl * cap, buf_count + tl, buf_thr + tl};
  };

  const int64_t tok_base = seq.batch * L.T + seq.start;
  const int64_t chunk_base = seq.batch * L.C + seq.chunk_start;
  const int64_t last_token = min(t0 + tpt, seq.length) - 1;
  const int lim_max = paper ? int((last_token + 1) / BS) : int(last_token / BS);
  const int tiles = __shfl_sync(kFull, (lim_max + kBN - 1) / kBN, 0);  // warp-uniform, as `wg` below
  for (int i = threadIdx.x; i < tpt; i += blockDim.x) {
    buf_count[i] = 0;
    buf_thr[i] = -INFINITY;
    tok_info[i] = token_info(t0 + i, BS, S, paper);
  }
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    ring.init(kSm90Consumers / 32);
    mbar_init_fence();
  }
  __syncthreads();

  // K tile j into its stage, once the stage is free.
  auto fill = [&](int j) {
    uint64_t* bar = ring.begin_fill(j, Ly::kStageBytes);
    for (int b = 0; b < KD / 64; ++b)
      tma_load_3d(smem + Ly::kStage0 + ring.stage(j) * Ly::kStageBytes + b * kWgmmaBoxBytes, &map_k, b * 64, h,
                  int(chunk_base + int64_t(j) * kBN), bar);
  };
  // The Q tiles, then the first K tiles: the producer warp streams them all; thread 0 of a self-fed CTA the
  // first kSm90Stages, and the rest as the stages free up (step below).
  const int feeder = kSelfFed ? 0 : kSm90Consumers;
  if (threadIdx.x == feeder && tiles > 0) {
    mbar_arrive_expect_tx(q_full, kWG * Ly::kStageBytes);
    for (int w = 0; w < kWG; ++w)
      for (int b = 0; b < KD / 64; ++b)
        tma_load_3d(smem + (w * (KD / 64) + b) * kWgmmaBoxBytes, &map_q, b * 64, h * G,
                    int(tok_base + t0 + w * (64 / G)), q_full);
    for (int j = 0; j < (kSelfFed ? min(tiles, kSm90Stages) : tiles); ++j) fill(j);
  }
  if (threadIdx.x >= kSm90Consumers) return;  // the producer

  // Consumers: this thread's rows lane / 4 and lane / 4 + 8 of its warp's 16 (the accumulator layout).
  // The warpgroup index broadcast from lane 0 is known to be warp-uniform, so the wgmma descriptors built from
  // it stay in uniform registers (else each costs an R2UR move).
  const int wg = __shfl_sync(kFull, threadIdx.x / 128, 0), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int tl[2], lim[2];
  float lse2[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + lane / 4 + 8 * half;  // row in the CTA: token r / G, head r % G
    tl[half] = r / G;
    const int64_t t = t0 + tl[half];
    const bool valid = t < seq.length;
    lim[half] = valid ? tok_info[tl[half]].lim : 0;
    lse2[half] = valid ? lse_cmp[(tok_base + t) * L.HQ + h * G + r % G] * kLog2e : 0.f;
  }
  int warp_lim = max(lim[0], lim[1]);
  for (int off = 16; off > 0; off /= 2) warp_lim = max(warp_lim, __shfl_xor_sync(kFull, warp_lim, off));
  const int tl_first = warp * 16 / G, tl_end = min(tpt, (warp + 1) * 16 / G);

  // G = 16: the warp's one token filters from registers (RegisterCandidates), in its slot of the buffers.
  const TokenInfo warp_ti = tok_info[tl_first];
  const bool warp_token_filters = kTokenPerWarp && t0 + tl_first < seq.length && warp_ti.keep > 0;
  RegisterCandidates reg_cands{buf_score + tl_first * cap, buf_block + tl_first * cap};

  const uint32_t q_addr = smem_addr(smem + wg * Ly::kStageBytes);
  auto issue_scores = [&](int j, float (&s)[32]) {
    ring.wait_full(j);
    wgmma_scores<T, KD>(s, q_addr, smem_addr(smem + Ly::kStage0 + ring.stage(j) * Ly::kStageBytes));
  };
  // Tile j's logits (complete) -> the warp's tokens' scores -> their filters, while tile j+1's run.
  auto step = [&](int j, float (&s)[32], float (&next)[32]) {
    if (lane == 0) ring.release(j);  // S of tile j is done with its K stage
    if (j + 1 < tiles) issue_scores(j + 1, next);
    // Every warp has issued tile j + 1's MMA, so every warp has released tile j: its stage is free at once.
    if (kSelfFed && threadIdx.x == 0 && j + kSm90Stages < tiles) fill(j + kSm90Stages);
    const int c0 = j * kBN;
    if (c0 < warp_lim) {
      float p[kBN / 8][4];
      if (c0 + kBN <= min(lim[0], lim[1])) {  // both rows score the whole tile
#pragma unroll
        for (int i = 0; i < 32; ++i) p[i / 4][i % 4] = exp2_ftz(s[i] * P.scale_log2 - lse2[(i / 2) % 2]);
      } else {
        const int col0 = c0 + (lane % 4) * 2;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int half = (i / 2) % 2, col = col0 + 8 * (i / 4) + (i % 2);
          p[i / 4][i % 4] = col < lim[half] ? exp2_ftz(s[i] * P.scale_log2 - lse2[half]) : 0.f;
        }
      }
      if constexpr (kTokenPerWarp) {
        float sum[2];
        head16_sums(p, sum, lane);
        if (warp_token_filters && c0 < warp_ti.lim)
          filter_pair(reg_cands, sum, c0 + head16_column(lane), warp_ti, paper, cap, lane);
      } else {
        store_head_sums(p, score, tl, G, lane);
        __syncwarp();
        for (int k = tl_first; k < tl_end; ++k) {
          const TokenInfo ti = tok_info[k];
          if (t0 + k >= seq.length) break;
          if (c0 >= ti.lim || ti.keep == 0) continue;
          filter_tile(candidates(k), score + k * kScoreStride, c0, ti, paper, G, cap, lane);
        }
      }
    }
    wgmma_wait<0>();
    fence_registers(next);
  };

  float s_even[32], s_odd[32];
  if (tiles > 0) {
    mbar_wait(q_full, 0);
    issue_scores(0, s_even);
    wgmma_wait<0>();
    fence_registers(s_even);
  }
  for (int j = 0; j < tiles; j += 2) {
    step(j, s_even, s_odd);
    if (j + 1 < tiles) step(j + 1, s_odd, s_even);
  }
  if (kTokenPerWarp && lane == 0) buf_count[tl_first] = reg_cands.n;  // write_selection reads the count only
  __syncwarp();
  for (int k = tl_first; k < tl_end && t0 + k < seq.length; ++k)
    write_selection(block_indices + ((tok_base + t0 + k) * L.H + h) * S, candidates(k), tok_info[k], paper, G, S,
                    lane);
#endif
}

// Whether topk_sm90_kernel may run this problem: bf16/fp16, K in {64, 128, 192}, G in {2, 4, 8, 16}, pooled blocks to
// score, int32 tensor-map coordinates, 16-byte aligned tensors, the sm_90 kernels allowed on a 9.x device
// (sm90_kernels_run); the candidate buffer's shared memory is the other condition (sm90_cap > 0).
bool sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp) {
  const int64_t G = L.G();
  if (L.dtype == ElemType::F32 || L.H == 0 || L.B * L.C == 0) return false;
  if ((L.K != 64 && L.K != 128 && L.K != 192) || 16 % G != 0 || G < kSm90MinG) return false;
  if (L.B * L.T + L.max_len + Sm90Shape<3>::kRows >= (int64_t(1) << 31) || L.B * L.C + kBN >= (int64_t(1) << 31))
    return false;
  if (L.num_seqs > 65535 || L.H > 65535) return false;
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k_cmp)) % 16) return false;
  return sm90_kernels_run(L);
}

// Shared memory of the sm_90 kernel for K up to KD, G and a buffer of `cap` entries per token.
template <int KD>
int layout_bytes(int G, int cap) {
  return G == 16 ? Sm90Layout<KD, 1>::bytes(Sm90Shape<1>::kRows / G, cap)
                 : Sm90Layout<KD, 3>::bytes(Sm90Shape<3>::kRows / G, cap);
}

// The sm_90 kernel's candidate buffer: the largest multiple of 16 up to kSm90Cap whose layout fits (small
// groups have many tokens per CTA), at least S + 31 entries; 0 when none fits.
int sm90_cap(const DeviceLayout& L) {
  const int G = int(L.G()), optin =
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(max shared memory)");
  if (G < 1 || 16 % G != 0) return 0;
  // G = 16 appends a whole tile after a cut (filter_pair), the others 32 blocks (filter_tile).
  const int min_cap = int(div_up(L.block_count + (G == 16 ? 63 : 31), 16) * 16);
  // G = 16: the kernel of one warpgroup, kCtasPerSm CTAs per SM (each also reserves 1 KB): at most 240 entries,
  // so S <= 177 (a larger S goes to the tile kernel).
  // K = 192 (Q and K tiles of three boxes): two CTAs an SM.
  const int per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, "cudaDeviceGetAttribute(smem)");
  const int ctas = L.K > 128 ? 2 : Sm90Shape<1>::kCtasPerSm;
  const int limit = G == 16 ? std::min(optin, per_sm / ctas - 1024) : optin;
  for (int cap = kSm90Cap; cap >= min_cap; cap -= 16) {
    const int bytes = L.K > 128 ? layout_bytes<192>(G, cap) : layout_bytes<128>(G, cap);
    if (bytes <= limit) return cap;
  }
  return 0;
}

template <typename T>
void launch_sm90(TopkParams P, int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp,
                 cudaStream_t s) {
  const DeviceLayout& L = P.L;
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const CUtensorMap map_q =
      make_tensor_map_3d(q, bf16, L.K, L.HQ, uint64_t(L.B * L.T), 64, P.G, 64 / P.G, "topk_sm90_kernel(q)");
  const CUtensorMap map_k =
      make_tensor_map_3d(k_cmp, bf16, L.K, L.H, uint64_t(L.B * L.C), 64, 1, kBN, "topk_sm90_kernel(k_cmp)");
  auto launch = [&](auto wg) {
    constexpr int kWG = decltype(wg)::value;
    const int tpt = Sm90Shape<kWG>::kRows / P.G;
    const dim3 grid(unsigned(div_up(L.max_len, tpt)), unsigned(L.num_seqs), unsigned(L.H));
    auto run = [&](auto kernel, int bytes) {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                 "cudaFuncSetAttribute(topk_sm90_kernel)");
      kernel<<<grid, Sm90Shape<kWG>::kThreads, bytes, s>>>(map_q, map_k, block_indices, lse_cmp, P);
      check_launch("topk_sm90_kernel");
    };
    if (L.K == 192) run(topk_sm90_kernel<T, 192, kWG>, Sm90Layout<192, kWG>::bytes(tpt, P.cap));
    else if (L.K == 128) run(topk_sm90_kernel<T, 128, kWG>, Sm90Layout<128, kWG>::bytes(tpt, P.cap));
    else run(topk_sm90_kernel<T, 64, kWG>, Sm90Layout<64, kWG>::bytes(tpt, P.cap));
  };
  if (P.G == 16) launch(std::integral_constant<int, 1>{});
  else launch(std::integral_constant<int, 3>{});
}

// The largest candidate buffer that fits `limit` bytes, trying 3 K stages (only with a buffer of at least
// 128 entries: a small one compacts often), then 2, then 1; none when even S + 31 entries do not fit.
template <typename T>
TopkTileConfig fit(int warps, int k_padded, int tpt, int S, int64_t limit) {
  const int min_cap = int(div_up(S + 31, 32) * 32);
  auto config = [&](int stages, int cap) {
    const int bytes = smem_bytes<T>(warps, k_padded, tpt, stages, cap);
    return bytes <= limit ? TopkTileConfig{warps, stages, cap, bytes} : TopkTileConfig{};
  };
  for (int cap = kMaxCap; cap >= std::max(min_cap, 128); cap -= 32)
    if (const TopkTileConfig c = config(3, cap); c.warps) return c;
  for (int stages = 2; stages >= 1; --stages)
    for (int cap = kMaxCap; cap >= min_cap; cap -= 32)
      if (const TopkTileConfig c = config(stages, cap); c.warps) return c;
  return {};
}

template <typename T, int W>
void launch(TopkParams P, int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp,
            cudaStream_t s) {
  const int bytes = smem_bytes<T>(W, P.k_padded, P.geo.tpt, P.stages, P.cap);
  const dim3 grid(unsigned(P.geo.tiles_x / P.geo.head_chunks), P.L.num_seqs, unsigned(P.L.H));
  auto go = [&](auto kernel) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute(topk_kernel)");
    kernel<<<grid, W * 32, bytes, s>>>(block_indices, static_cast<const T*>(q), static_cast<const T*>(k_cmp),
                                       lse_cmp, P);
  };
  // G = 1 filters in registers (filter_quads) where a cut leaves room for a whole tile's entrants.
  if (P.G == 1 && P.geo.head_chunks == 1 && P.cap >= P.L.block_count + kBN) go(topk_kernel<T, W, true>);
  else go(topk_kernel<T, W, false>);
  check_launch("topk_kernel");
}

// Why no launch of the tile kernel fits `budget`, for an error message.
std::string no_launch_fits(const DeviceLayout& L, SmemBudget budget) {
  const char* dtype = L.dtype == ElemType::F32 ? "fp32" : L.dtype == ElemType::F16 ? "fp16" : "bf16";
  return std::string("top-k of ") + dtype + " inputs with K = " + std::to_string(L.K) + ", S = " +
         std::to_string(L.block_count) + " and G = " + std::to_string(L.G()) +
         " needs more shared memory a CTA than this GPU's " + std::to_string(budget.per_cta) + " bytes";
}

// launch<T, warps> for warps in {W, W / 2, ..., 1}.
template <typename T, int W>
void launch_warps(int warps, const TopkParams& P, int32_t* block_indices, const void* q, const void* k_cmp,
                  const float* lse_cmp, cudaStream_t s) {
  if constexpr (W > 1)
    if (warps < W) return launch_warps<T, W / 2>(warps, P, block_indices, q, k_cmp, lse_cmp, s);
  launch<T, W>(P, block_indices, q, k_cmp, lse_cmp, s);
}

}  // namespace

bool topk_sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp) {
  return sm90_fits(L, q, k_cmp) && sm90_cap(L) > 0;
}

void topk_forward(int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp, const DeviceLayout& L,
                  cudaStream_t s) {
  topk_forward(block_indices, q, k_cmp, lse_cmp, L, s, KernelChoice::Auto);
}

void topk_forward(int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp, const DeviceLayout& L,
                  cudaStream_t s, KernelChoice choice) {
  if (L.block_count > kMaxS) throw CudaError("topk_forward: block_count > " + std::to_string(kMaxS));
  if (L.num_seqs == 0 || L.max_len == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = warps_for<T>();
    TopkParams P;
    P.L = L;
    P.G = int(L.HQ / L.H);
    P.k_padded = int(div_up(L.K, 16) * 16);
    P.scale_log2 = L.scale * 1.4426950408889634f;
    if constexpr (Elem<T>::kTensorCore) {
      const int cap = sm90_cap(L);
      if (choice == KernelChoice::Auto && cap > 0 && sm90_fits(L, q, k_cmp)) {
        P.cap = cap;
        launch_sm90<T>(P, block_indices, q, k_cmp, lse_cmp, s);
        return;
      }
    }
    const SmemBudget budget = device_budget(L);
    const TopkTileConfig c = topk_tile_config(L, budget);
    if (c.warps == 0) throw CudaError("topk_forward: " + no_launch_fits(L, budget));
    P.geo = tile::make_geometry(P.G, 16 * c.warps, L.max_len);
    P.stages = c.stages;
    P.cap = c.cap;
    launch_warps<T, W>(c.warps, P, block_indices, q, k_cmp, lse_cmp, s);
  });
}

TopkTileConfig topk_tile_config(const DeviceLayout& L, SmemBudget budget) {
  TopkTileConfig c;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t G = L.G();
    const int k_padded = int(div_up(L.K, 16) * 16), S = L.block_count;
    auto tokens = [&](int warps) { return tile::make_geometry(G, 16 * warps, L.max_len).tpt; };
    // Two CTAs per SM where they fit (each also reserves 1 KB), else one with the largest buffer; with few
    // heads, long keys and many blocks per query, fewer warps (fewer tokens per CTA, each with its buffer).
    constexpr int W = warps_for<T>();
    c = fit<T>(W, k_padded, tokens(W), S, budget.per_sm / 2 - kSmemReservedPerCta);
    for (int warps = W; c.warps == 0 && warps >= 1; warps /= 2)
      c = fit<T>(warps, k_padded, tokens(warps), S, budget.per_cta);
  });
  return c;
}

std::string topk_shared_memory_shortfall(const DeviceLayout& L, const void* q, const void* k_cmp) {
  if (L.num_seqs == 0 || L.max_len == 0 || topk_sm90_fits(L, q, k_cmp)) return "";
  const SmemBudget budget = device_budget(L);
  return topk_tile_config(L, budget).warps > 0 ? "" : no_launch_fits(L, budget);
}

}  // namespace nsa::cuda
