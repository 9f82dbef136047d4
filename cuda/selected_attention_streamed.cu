// Selected attention forward (nsa-spec §2.4), streamed with TMA on sm_90, for groups of 4, 8 or 16k query
// heads.
//
// The work comes in units: 8 consecutive tokens of one sequence and one 16-head chunk of a kv head's query
// group (G = 4, 8: the group's heads in the first G of 16 rows, the others discarded). A persistent CTA per
// SM takes units blockIdx.x, + gridDim.x, ... (a shared counter handing out units in order measured 2%
// slower), with three roles:
//  - a planner warp lists each token's valid selections as 64-key tiles (a block of BS = 64 is one tile,
//    BS = 128 two) and the unit's distinct tiles, each with the mask of the tokens that selected it, one unit
//    ahead (two plan buffers). On independent selections neighbouring tokens still share the current block
//    and, with few blocks to choose from, many others (T = 64k, G = 16, S = 16: ~20% of a unit's tiles are
//    repeats), and the kernel is bound by the L2's throughput for these gathers, so a repeat not loaded is
//    time saved; where tokens select alike (real models) a unit loads 16 tiles instead of 128;
//  - a producer thread copies each distinct tile (one tensor-map copy per 64-column box of K and V) into a
//    ring of shared-memory stages, counted on the stage's "full" mbarrier;
//  - eight consumer warps, one per token: a warp copies its token's Q rows into its own shared-memory slot,
//    waits only for the tiles its token selected, computes 16 query rows against the tile's 64 keys
//    (mma.sync, with a lazy online softmax whose reference max moves only by more than 2^8) and arrives on
//    the stage's "empty" mbarrier, on which the producer arrives for the warps that skip the tile; after its
//    token's last tile it writes the token's o and lse and, with the gate pass fused (GatedOutput), the
//    gated output from the other branches' rows (o_cmp, and o_swa with a window) loaded at the token's start.
// Shared-memory races among these roles are ruled out by the mbarriers and one release/acquire counter,
// which compute-sanitizer's racecheck does not model (it reports their hand-offs as hazards).
#include "cuda/selected_attention_streamed.h"

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/selected_runs.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace nsa::cuda {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kRunTokens = kConsumerWarps;  // tokens per work unit, one per consumer warp
// Two consumer warpgroups, then a warpgroup whose first warp produces and second plans (the other two exit):
// setmaxnreg moves registers between whole warpgroups, so the consumers get more than the 168 registers per
// thread that three warps per scheduler partition get at launch.
constexpr int kProducerWarp = kConsumerWarps, kPlannerWarp = kConsumerWarps + 1;
constexpr int kThreads = (kConsumerWarps + 4) * 32;
constexpr int kConsumerRegisters = 224, kProducerRegisters = 56;
// Keys per streamed tile: a compile-time knob for tuning.
#ifndef NSA_STREAMED_TILE_KEYS
#define NSA_STREAMED_TILE_KEYS 64
#endif
constexpr int kTileKeys = NSA_STREAMED_TILE_KEYS;
constexpr int kHeads = 16;                              // query heads per unit
constexpr int kBoxBytes = kTileKeys * 128;                 // the tile's key rows x 64 columns of 16-bit elements
constexpr int kTokenQBytes = kHeads * 128;                 // a token's 16 head rows x 64 columns

// Ring stages: as many as shared memory holds, up to this knob (one CTA per SM; at K = V = 128 a stage is
// 32 KB, and six fit beside 32 KB of Q).
#ifndef NSA_STREAMED_STAGES
#define NSA_STREAMED_STAGES 6
#endif
constexpr int kMaxStages = NSA_STREAMED_STAGES;
constexpr int kMinStages = 2;

// One stage: the K boxes, then the V boxes.
template <int KD, int VD>
struct Stage {
  static constexpr int kKBoxes = KD / 64, kVBoxes = VD / 64;
  static constexpr int kK = 0;
  static constexpr int kV = kKBoxes * kBoxBytes;
  static constexpr int kBytes = kV + kVBoxes * kBoxBytes;
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
  int rows;                  // query heads per unit: min(G, 16)
  int max_items;             // tiles per token: S * BS / kTileKeys
  int stages;                // ring stages
  int runs, seqs_n, units;   // units: runs (of kRunTokens tokens) x sequences x 16-head chunks, runs fastest
  float scale_log2;          // scale * log2(e): the softmax runs in base 2
  int32_t* path_counts;      // [3] or null
  RunSplit split;            // runs marked there are left to the union walk; alike null: no split
  // The gate pass fused (o_gated null: not): o_gated = g_slc * o_slc + g_cmp * o_cmp (+ g_swa * o_swa where
  // o_swa is not null), all [B, T, HQ(, V)].
  T* o_gated;
  const T* o_cmp;
  const T* g_cmp;
  const T* g_slc;
  const T* o_swa;
  const T* g_swa;
};

// A work unit: 8 tokens [t0, t0 + 8) of sequence `seq`, query heads [head0, head0 + 16) of kv head kv_head.
struct Unit {
  DeviceSequence seq;
  int64_t t0, key_base;  // key_base: the sequence's first row in [B * T]
  int ntok, kv_head, head0;
  template <typename P>
  __device__ Unit(const P& p, int u) {
    const int x = u % p.runs, rest = u / p.runs, y = rest % p.seqs_n, z = rest / p.seqs_n;
    const int chunks = p.G > kHeads ? p.G / kHeads : 1;
    seq = p.seqs[y];
    t0 = int64_t(x) * kRunTokens;
    ntok = int(seq.length - t0 < kRunTokens ? seq.length - t0 : kRunTokens);
    kv_head = z / chunks;
    head0 = kv_head * p.G + (z % chunks) * kHeads;
    key_base = seq.batch * p.row_tokens + seq.start;
  }
  template <typename P>
  __device__ bool taken(const P& p, int u) const {  // tokens to compute, not left to the union walk
    if (ntok <= 0) return false;
    return !p.split.alike || !p.split.alike[p.split.flag(u / p.runs % p.seqs_n, t0 / run_tokens(p.G), p.H, kv_head)];
  }
};

// A unit's plan, written by the planner warp into one of two buffers: the unit (-1: no more), its number of
// distinct tiles, per token its tile count, then the distinct tiles in the order they stream (first key,
// and the mask of the tokens that selected it).
struct Plan {
  int* base;
  int entries;  // kRunTokens * max_items
  __device__ int& unit() const { return base[0]; }
  __device__ int& tiles() const { return base[1]; }
  __device__ int* count() const { return base + 2; }
  __device__ int* tile() const { return base + 2 + kRunTokens; }
  __device__ int* mask() const { return tile() + entries; }
  __host__ __device__ static int ints(int entries) { return 2 + kRunTokens + 2 * entries; }
};

// Shared memory: per consumer warp its token's Q boxes, then the stages (1024-byte aligned, for the
// swizzle), the barriers (per stage full and empty; per consumer warp its Q copy; per plan buffer full and
// empty), the producer's issued-fill count, the planner's scratch (per token its tiles) and the two plan
// buffers.
struct StreamedSmem {
  unsigned char* q;  // warp w's token at w * q_bytes / kConsumerWarps: box b at b * kTokenQBytes
  unsigned char* stages;
  uint64_t* full;
  uint64_t* empty;
  uint64_t* q_full;      // [kConsumerWarps]
  uint64_t* plan_full;   // [2]
  uint64_t* plan_empty;  // [2]
  int* issued;
  int* items;  // [kRunTokens][max_items]
  int* plans;  // two plans
  int entries;
  __device__ Plan plan(int i) const { return Plan{plans + (i & 1) * Plan::ints(entries), entries}; }
  // Waits until plan i is written and returns its unit (-1: no more).
  __device__ int wait_plan(int i) const {
    mbar_wait(&plan_full[i & 1], (i >> 1) & 1);
    return plan(i).unit();
  }
  static size_t bytes(int q_bytes, int stage_bytes, int stages, int max_items) {
    const int entries = kRunTokens * max_items;
    return size_t(q_bytes) + size_t(stages) * stage_bytes + (2 * kMaxStages + kConsumerWarps + 4) * sizeof(uint64_t) +
           sizeof(int) * (1 + size_t(entries) + 2 * size_t(Plan::ints(entries)));
  }
  __device__ StreamedSmem(unsigned char* raw, int q_bytes, int stage_bytes, int stages, int max_items) {
    q = raw;
    this->stages = q + q_bytes;
    full = reinterpret_cast<uint64_t*>(this->stages + stages * stage_bytes);
    empty = full + kMaxStages;
    q_full = empty + kMaxStages;
    plan_full = q_full + kConsumerWarps;
    plan_empty = plan_full + 2;
    issued = reinterpret_cast<int*>(plan_empty + 2);
    items = issued + 1;
    entries = kRunTokens * max_items;
    plans = items + entries;
  }
};

// L2 hints: the gathered K/V tiles are kept (evict last), Q and the outputs, touched once, go first (a
// compile-time knob for measuring).
#ifndef NSA_STREAMED_L2_HINTS
#define NSA_STREAMED_L2_HINTS 1
#endif
constexpr bool kHints = NSA_STREAMED_L2_HINTS;
template <typename V>
__device__ __forceinline__ void store_out(V* at, V value) {
  if constexpr (kHints) __stcs(at, value);
  else *at = value;
}

// The gated output of one element pair, by the gate pass's arithmetic (gate_sum, on o_slc as stored).
template <typename T>
__device__ __forceinline__ uint32_t gated_pair(uint32_t slc, uint32_t cmp, uint32_t swa, float g_slc, float g_cmp,
                                               float g_swa) {
  const T* s = reinterpret_cast<const T*>(&slc);
  const T* c = reinterpret_cast<const T*>(&cmp);
  const T* w = reinterpret_cast<const T*>(&swa);
  auto f = [](T x) { return Elem<T>::to_float(x); };
  return MmaElem<T>::pack(gate_sum(f(s[0]), f(c[0]), f(w[0]), g_slc, g_cmp, g_swa),
                          gate_sum(f(s[1]), f(c[1]), f(w[1]), g_slc, g_cmp, g_swa));
}

// One consumer warp's token: its 16 query rows against whole 64-key tiles. Thread layout as the mma C
// fragment: rows g = lane / 4 and g + 8 (ri = 0, 1), columns 2 (lane % 4) + {0, 1} of each 8-wide tile.
// kWindow: the fused gate has a window branch (an instance of its own: its registers cost the others ~1%).
template <typename T, int KD, int VD, bool kWindow>
struct ConsumerState {
  using St = Stage<KD, VD>;
  float o[VD / 8][4];
  float ref[2], sum[2];  // reference max (base 2; -inf before any key) and this thread's partial row sums
  // With the gate pass fused: this thread's o_cmp (and o_swa) pairs and its rows' gates, loaded at the token's
  // start (without a window branch, swa = 0 and g_swa = 0 add exact zeros).
  uint32_t cmp[VD / 8][2], swa[kWindow ? VD / 8 : 1][2];
  float g_cmp[2], g_slc[2], g_swa[2];

  __device__ __forceinline__ void begin(const StreamedParams<T>& p, int64_t flat, int head0) {
#pragma unroll
    for (int n = 0; n < VD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    ref[0] = ref[1] = -INFINITY;
    sum[0] = sum[1] = 0.f;
    if (p.o_gated) {
      const int lane = threadIdx.x % 32;
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        if (lane / 4 + 8 * ri >= p.rows) continue;  // a head of the next group (G < 16): not written
        const int64_t row = flat * p.HQ + head0 + lane / 4 + 8 * ri;
        g_cmp[ri] = Elem<T>::to_float(p.g_cmp[row]);
        g_slc[ri] = Elem<T>::to_float(p.g_slc[row]);
        g_swa[ri] = kWindow ? Elem<T>::to_float(p.g_swa[row]) : 0.f;
        const uint32_t* src = reinterpret_cast<const uint32_t*>(p.o_cmp + row * VD + 2 * (lane % 4));
#pragma unroll
        for (int n = 0; n < VD / 8; ++n) cmp[n][ri] = src[4 * n];
        if constexpr (kWindow) {
          const uint32_t* src_swa = reinterpret_cast<const uint32_t*>(p.o_swa + row * VD + 2 * (lane % 4));
#pragma unroll
          for (int n = 0; n < VD / 8; ++n) swa[n][ri] = src_swa[4 * n];
        }
      }
    }
  }

  // The token's 16 rows (at `q_rows` in its first Q box) against one tile in `stage` whose first key is
  // `first_key`: S = Q K^T, the online softmax (keys after t masked) and O += P V.
  __device__ __forceinline__ void step(uint32_t q_rows, uint32_t stage, int first_key, int t, float scale_log2) {
    const int lane = threadIdx.x % 32, mi = lane >> 3;
    float x[kTileKeys / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < KD / 16; ++ks) {
      // A fragments: matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15) of the 16-column step.
      uint32_t qa[4];
      ldmatrix_x4(qa, q_rows + (ks >> 2) * kTokenQBytes + swizzle128(8 * (mi & 1) + (lane & 7), 2 * (ks & 3) + (mi >> 1)));
#pragma unroll
      for (int kg = 0; kg < kTileKeys / 16; ++kg) {
        // B fragments: matrices (keys 0-7 | 8-15 of the group) x (columns 0-7 | 8-15 of the step).
        uint32_t kb[4];
        ldmatrix_x4(kb, stage + St::kK + (ks >> 2) * kBoxBytes +
                            swizzle128(16 * kg + 8 * (mi >> 1) + (lane & 7), 2 * (ks & 3) + (mi & 1)));
        MmaElem<T>::mma(x[2 * kg], qa, kb[0], kb[1]);
        MmaElem<T>::mma(x[2 * kg + 1], qa, kb[2], kb[3]);
      }
    }
    const int key0 = first_key + 2 * (lane % 4);
    const bool edge = first_key + kTileKeys - 1 > t;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x[nt][e] *= scale_log2;
        if (edge && key0 + 8 * nt + (e & 1) > t) x[nt][e] = -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], x[nt][e]);
      }
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 1));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(~0u, mx[ri], 2));
    }
    // Lazy rescale: the reference moves only when a row's max passes it by 2^8 (p <= 256 otherwise).
    const bool need = mx[0] > ref[0] + kLazyRescaleLog2 || mx[1] > ref[1] + kLazyRescaleLog2;
    if (__any_sync(~0u, need)) {
      float alpha[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const float next = lazy_reference(ref[ri], mx[ri]);
        alpha[ri] = next == ref[ri] ? 1.f : exp2_ftz(ref[ri] - next);
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
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x[nt][e] = exp2_ftz(x[nt][e] - base[e >> 1]);
        sum[e >> 1] += x[nt][e];
      }
    // O += P V per 16-key step: P as the A fragment (row g | g + 8) x (keys 0-7 | 8-15), B fragments of V by
    // transposed ldmatrix, matrices (keys 0-7 | 8-15) x (columns 0-7 | 8-15).
#pragma unroll
    for (int kk = 0; kk < kTileKeys / 16; ++kk) {
      const uint32_t pa[4] = {MmaElem<T>::pack(x[2 * kk][0], x[2 * kk][1]), MmaElem<T>::pack(x[2 * kk][2], x[2 * kk][3]),
                              MmaElem<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                              MmaElem<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3])};
      const int vrow = 16 * kk + 8 * (mi & 1) + (lane & 7);
#pragma unroll
      for (int dt = 0; dt < VD / 16; ++dt) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, stage + St::kV + (dt >> 2) * kBoxBytes + swizzle128(vrow, 2 * (dt & 3) + (mi >> 1)));
        MmaElem<T>::mma(o[2 * dt], pa, vb[0], vb[1]);
        MmaElem<T>::mma(o[2 * dt + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // Writes the token's 16 rows of o and lse (rows past the group's G heads are not written), and of the
  // gated output when it is fused.
  __device__ __forceinline__ void finish(const StreamedParams<T>& p, int64_t flat, int head0) {
    const int lane = threadIdx.x % 32, g = lane / 4;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float total = sum[ri];
      total += __shfl_xor_sync(~0u, total, 1);
      total += __shfl_xor_sync(~0u, total, 2);
      if (g + 8 * ri >= p.rows) continue;  // a head of the next group (G < 16)
      const int64_t row = flat * p.HQ + head0 + g + 8 * ri;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      const int64_t at = row * VD + 2 * (lane % 4);
#pragma unroll
      for (int n = 0; n < VD / 8; ++n) {
        const uint32_t slc = MmaElem<T>::pack(o[n][2 * ri] * inv, o[n][2 * ri + 1] * inv);
        store_out(reinterpret_cast<uint32_t*>(p.o + at + 8 * n), slc);
        if (p.o_gated) {
          uint32_t window_pair = 0;
          if constexpr (kWindow) window_pair = swa[n][ri];
          store_out(reinterpret_cast<uint32_t*>(p.o_gated + at + 8 * n),
                    gated_pair<T>(slc, cmp[n][ri], window_pair, g_slc[ri], g_cmp[ri], g_swa[ri]));
        }
      }
      if (lane % 4 == 0) store_out(p.lse + row, total > 0.f ? (ref[ri] + log2f(total)) * 0.69314718055994531f : 0.f);
    }
  }
};

// A measurement knob: 1 streams every tile and computes nothing, which times the gather alone (the floor of
// this kernel's design; the outputs are left unwritten).
#ifndef NSA_STREAMED_GATHER_ONLY
#define NSA_STREAMED_GATHER_ONLY 0
#endif
constexpr bool kGatherOnly = NSA_STREAMED_GATHER_ONLY;

// The planner warp: for each unit of this CTA (those left to the union walk skipped), per token a slot per
// tile of each selection (-1 where the entry is not valid: c < 0 or tile start > t), then the distinct tiles
// in round-robin order over the tokens' slots (entry e is token e % 8's slot e / 8), so that consecutive
// tiles mostly belong to different warps. An entry leads when no earlier entry has its tile; the leader
// collects the mask of the tokens that selected it. A token with no tile gets o = 0, lse = 0 here (and its
// gated output, when fused). It plans a unit ahead of the producer and the consumers (two plan buffers).
template <typename T, int VD>
__device__ void plan_units(const StreamedParams<T>& p, const StreamedSmem& sm) {
  const int lane = threadIdx.x % 32, entries = kRunTokens * p.max_items;
  int i = 0;
  for (int u = blockIdx.x;; u += gridDim.x, ++i) {
    while (u < p.units && !Unit(p, u).taken(p, u)) u += gridDim.x;
    const Plan plan = sm.plan(i);
    mbar_wait(&sm.plan_empty[i & 1], ((i >> 1) & 1) ^ 1);
    if (u >= p.units) {
      if (lane == 0) {
        plan.unit() = -1;
        mbar_arrive(&sm.plan_full[i & 1]);
      }
      return;
    }
    const Unit w(p, u);
    // Every token's list has a slot per tile of each selection (max_items), -1 where the entry is not valid;
    // all the warp's index loads are independent. The counts are zeroed here and summed after the dedup.
    if (lane < kRunTokens) plan.count()[lane] = 0;
    __syncwarp();
    const int per_block = p.BS / kTileKeys;
    for (int e = lane; e < entries; e += 32) {
      const int tk = e % kRunTokens, pos = e / kRunTokens, j = pos / per_block;
      const int64_t t = w.t0 + tk, flat = w.key_base + t;
      int key = -1;
      if (tk < w.ntok && j < selection_count(p.counts, flat, p.H, w.kv_head, p.S)) {
        const int c = p.indices[(flat * p.H + w.kv_head) * p.S + j];
        const int64_t first = int64_t(c) * p.BS + (pos % per_block) * kTileKeys;
        if (c >= 0 && first <= t) key = int(first);
      }
      sm.items[tk * p.max_items + pos] = key;
    }
    __syncwarp();
    for (int e = lane; e < entries; e += 32) {
      const int tk = e % kRunTokens, pos = e / kRunTokens;
      const int key = sm.items[tk * p.max_items + pos];
      int mask = 0;
      bool lead = key >= 0;
      if (key >= 0)
        for (int other = 0; other < kRunTokens; ++other) {
          const int* list = sm.items + other * p.max_items;
          for (int k = 0; k < p.max_items; ++k)
            if (list[k] == key) {
              mask |= 1 << other;
              if (k * kRunTokens + other < e) lead = false;
            }
        }
      plan.tile()[e] = lead ? key : -1;
      plan.mask()[e] = mask;
    }
    __syncwarp();
    int n = 0;  // compaction in place (a leader only moves to an earlier slot)
    for (int e0 = 0; e0 < entries; e0 += 32) {
      const int e = e0 + lane;
      const int key = e < entries ? plan.tile()[e] : -1, mask = e < entries ? plan.mask()[e] : 0;
      const unsigned votes = __ballot_sync(~0u, key >= 0);
      if (key >= 0) {
        const int at = n + __popc(votes & ((1u << lane) - 1));
        plan.tile()[at] = key;
        plan.mask()[at] = mask;
      }
      n += __popc(votes);
    }
    __syncwarp();
    // A token's count is its bits in the masks (a block it listed twice, invalid input, counts once).
    for (int j = lane; j < n; j += 32)
      for (unsigned m = unsigned(plan.mask()[j]); m; m &= m - 1) atomicAdd(&plan.count()[__ffs(m) - 1], 1);
    __syncwarp();
    for (int tk = 0; tk < w.ntok; ++tk)
      if (plan.count()[tk] == 0) {
        const int64_t flat = w.key_base + w.t0 + tk;
        for (int k = lane; k < p.rows * VD; k += 32) {
          const int64_t row = flat * p.HQ + w.head0 + k / VD, at = row * VD + k % VD;
          p.o[at] = Elem<T>::from_float(0.f);
          if (p.o_gated)  // the gate pass's arithmetic on o_slc = 0
            p.o_gated[at] = Elem<T>::from_float(
                gate_sum(0.f, Elem<T>::to_float(p.o_cmp[at]), p.o_swa ? Elem<T>::to_float(p.o_swa[at]) : 0.f,
                         Elem<T>::to_float(p.g_slc[row]), Elem<T>::to_float(p.g_cmp[row]),
                         p.o_swa ? Elem<T>::to_float(p.g_swa[row]) : 0.f));
        }
        if (lane < p.rows) p.lse[flat * p.HQ + w.head0 + lane] = 0.f;
      }
    if (lane == 0) {
      plan.unit() = u;
      plan.tiles() = n;
      if (p.path_counts) atomicAdd(p.path_counts + 2, 1);
      mbar_arrive(&sm.plan_full[i & 1]);
    }
    __syncwarp();
  }
}

template <typename T, int KD, int VD, bool kWindow>
__global__ void __launch_bounds__(kThreads, 1) selected_streamed_kernel(const __grid_constant__ CUtensorMap map_q,
                                                                     const __grid_constant__ CUtensorMap map_k,
                                                                     const __grid_constant__ CUtensorMap map_v,
                                                                     const StreamedParams<T> p) {
#if NSA_HAS_WGMMA
  using St = Stage<KD, VD>;
  constexpr int kQTokenBytes = St::kKBoxes * kTokenQBytes;  // a consumer warp's Q slot: its token's rows
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  if (smem_addr(smem_raw) & 1023) __trap();  // the swizzled addressing below needs the declared alignment
  const StreamedSmem sm(smem_raw, kConsumerWarps * kQTokenBytes, St::kBytes, p.stages, p.max_items);
  StageRing<0> ring{sm.full, sm.empty};
  ring.count = p.stages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    ring.init(kConsumerWarps);
    for (int w = 0; w < kConsumerWarps; ++w) mbar_init(&sm.q_full[w], 1);
    for (int b = 0; b < 2; ++b) mbar_init(&sm.plan_full[b], 1), mbar_init(&sm.plan_empty[b], kConsumerWarps + 1);
    mbar_init_fence();
    *sm.issued = 0;
  }
  __syncthreads();

  if (warp >= kConsumerWarps) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters));
    if (warp == kPlannerWarp) plan_units<T, VD>(p, sm);
    if (warp != kProducerWarp || lane != 0) return;
    const uint64_t keep = kHints ? l2_policy<L2Evict::Last>() : l2_policy<L2Evict::Normal>();
    for (int i = 0, it = 0;; ++i) {
      const int u = sm.wait_plan(i);
      if (u < 0) return;
      const Plan plan = sm.plan(i);
      const Unit w(p, u);
      for (int j = 0; j < plan.tiles(); ++j, ++it) {
        uint64_t* bar = ring.begin_fill(it, St::kBytes);
        unsigned char* st = sm.stages + ring.stage(it) * St::kBytes;
        const int row = int(w.key_base + plan.tile()[j]);
#pragma unroll
        for (int b = 0; b < St::kKBoxes; ++b)
          tma_load_3d(st + St::kK + b * kBoxBytes, &map_k, 64 * b, w.kv_head, row, bar, keep);
#pragma unroll
        for (int b = 0; b < St::kVBoxes; ++b)
          tma_load_3d(st + St::kV + b * kBoxBytes, &map_v, 64 * b, w.kv_head, row, bar, keep);
        const int readers = __popc(plan.mask()[j]);
        if (readers < kConsumerWarps) ring.release_for(it, kConsumerWarps - readers);
        store_release(sm.issued, it + 1);
      }
      mbar_arrive(&sm.plan_empty[i & 1]);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegisters));

  // Consumers: warp tk owns token tk of each unit and waits only for the tiles its token selected. Fill
  // `it`'s "full" barrier is in that fill's phase once the producer has issued it (its parity alone could
  // also match a fill a ring's length earlier).
  const int tk = warp;
  const unsigned bit = 1u << tk;
  unsigned char* q_slot = sm.q + tk * kQTokenBytes;
  const uint64_t once = kHints ? l2_policy<L2Evict::First>() : l2_policy<L2Evict::Normal>();
  ConsumerState<T, KD, VD, kWindow> cs;
  for (int i = 0, first_fill = 0, q_copies = 0;; ++i) {
    const int u = sm.wait_plan(i);
    if (u < 0) return;
    const Plan plan = sm.plan(i);
    const Unit w(p, u);
    const int tiles = plan.tiles(), t = int(w.t0) + tk;
    int left = plan.count()[tk];  // this token's tiles still to compute
    if (!kGatherOnly && left > 0) {
      // The token's Q rows into the warp's own slot, whose reads for the previous unit are done (the proxy fence
      // orders them before the copy's writes).
      if (lane == 0) {
        fence_proxy_async_smem();
        mbar_arrive_expect_tx(&sm.q_full[tk], kQTokenBytes);
#pragma unroll
        for (int b = 0; b < St::kKBoxes; ++b)
          tma_load_3d(q_slot + b * kTokenQBytes, &map_q, 64 * b, w.head0, int(w.key_base + t), &sm.q_full[tk], once);
      }
      cs.begin(p, w.key_base + t, w.head0);
      mbar_wait(&sm.q_full[tk], q_copies & 1);
      ++q_copies;
    }
    for (int j = 0; left > 0 && j < tiles; ++j) {
      if (!(plan.mask()[j] & bit)) continue;
      const int it = first_fill + j;
      while (load_acquire(sm.issued) <= it) __nanosleep(200);  // polling less often measured 1-3% faster
      ring.wait_full(it);
      if constexpr (!kGatherOnly) {
        cs.step(smem_addr(q_slot), smem_addr(sm.stages + ring.stage(it) * St::kBytes), plan.tile()[j], t, p.scale_log2);
        if (left == 1) cs.finish(p, w.key_base + t, w.head0);
      }
      --left;
      __syncwarp();
      if (lane == 0) ring.release(it);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&sm.plan_empty[i & 1]);
    first_fill += tiles;
  }
#endif
}

int max_items(const DeviceLayout& L) { return L.block_count * (L.block_size / kTileKeys); }

size_t smem_bytes(const DeviceLayout& L, int stages) {
  return StreamedSmem::bytes(int(L.K / 64) * kRunTokens * kTokenQBytes, int(L.K / 64 + L.V / 64) * kBoxBytes, stages,
                             max_items(L));
}

// The most ring stages (up to kMaxStages) whose shared memory the device allows one CTA; 0 below kMinStages.
int ring_stages(const DeviceLayout& L) {
  const size_t limit =
      size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(max shared memory)"));
  for (int stages = kMaxStages; stages >= kMinStages; --stages)
    if (smem_bytes(L, stages) <= limit) return stages;
  return 0;
}

// Calls f with the kernel instance for L's K and V (and a gate fused with a window branch).
template <typename T, bool kWindow = false, typename F>
void with_kernel(const DeviceLayout& L, F&& f) {
  if (L.K == 192) f(selected_streamed_kernel<T, 192, 128, kWindow>);
  else if (L.K == 128 && L.V == 128) f(selected_streamed_kernel<T, 128, 128, kWindow>);
  else if (L.K == 128) f(selected_streamed_kernel<T, 128, 64, kWindow>);
  else if (L.V == 128) f(selected_streamed_kernel<T, 64, 128, kWindow>);
  else f(selected_streamed_kernel<T, 64, 64, kWindow>);
}

}  // namespace

int selected_streamed_unit_tokens() { return kRunTokens; }

int selected_streamed_ctas_per_sm(const DeviceLayout& L) {
  int ctas = 0;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore) {
      with_kernel<T>(L, [&](auto kernel) {
        const int bytes = int(smem_bytes(L, ring_stages(L)));
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
  if (!sm90_forward_head_dims(L)) return false;  // (the paper's heads: 48 KB of Q leave four stages)
  if (L.B * L.T >= (int64_t(1) << 31) || L.num_seqs == 0) return false;
  if (int64_t(kRunTokens) * max_items(L) > kMaxRunEntries) return false;
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16) return false;
  if (!sm90_kernels_run(L)) return false;
  return ring_stages(L) > 0;
}

void selected_attention_streamed(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                 const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                 cudaStream_t s, int32_t* path_counts, const RunSplit* split,
                                 const GatedOutput* gated) {
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
      p.max_items = max_items(L);
      p.scale_log2 = L.scale * 1.4426950408889634f;
      p.path_counts = path_counts;
      if (split) p.split = *split;
      if (gated) {
        p.o_gated = static_cast<T*>(gated->o);
        p.o_cmp = static_cast<const T*>(gated->o_cmp);
        p.g_cmp = static_cast<const T*>(gated->g_cmp);
        p.g_slc = static_cast<const T*>(gated->g_slc);
        p.o_swa = static_cast<const T*>(gated->o_swa);
        p.g_swa = static_cast<const T*>(gated->g_swa);
      }
      const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
      const uint64_t rows = uint64_t(L.B * L.T);
      const CUtensorMap map_q = make_tensor_map_3d(q, bf16, L.K, L.HQ, rows, 64, kHeads, 1, "selected_streamed_kernel(q)");
      const CUtensorMap map_k = make_tensor_map_3d(k, bf16, L.K, L.H, rows, 64, 1, kTileKeys, "selected_streamed_kernel(k)");
      const CUtensorMap map_v = make_tensor_map_3d(v, bf16, L.V, L.H, rows, 64, 1, kTileKeys, "selected_streamed_kernel(v)");
      // A persistent grid, one CTA per SM, over the units (runs fastest, so that the units in flight share
      // a kv head's keys in L2).
      const int64_t units = div_up(L.max_len, kRunTokens) * L.num_seqs * L.H * std::max<int64_t>(L.G() / kHeads, 1);
      if (units >= (int64_t(1) << 31)) throw CudaError("selected_streamed_kernel: too many tokens or heads for one launch");
      if (units == 0) return;
      p.runs = int(div_up(L.max_len, kRunTokens)), p.seqs_n = int(L.num_seqs), p.units = int(units);
      p.stages = ring_stages(L);
      const int sms = device_attribute(cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute(multiprocessor count)");
      const dim3 grid(unsigned(std::min<int64_t>(units, sms)));
      const size_t bytes = smem_bytes(L, p.stages);
      auto launch = [&](auto kernel) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
                   "cudaFuncSetAttribute(selected_streamed_kernel)");
        kernel<<<grid, kThreads, bytes, s>>>(map_q, map_k, map_v, p);
        check_launch("selected_streamed_kernel");
      };
      if (p.o_gated && p.o_swa) with_kernel<T, true>(L, launch);
      else with_kernel<T>(L, launch);
    }
  });
}

}  // namespace nsa::cuda
