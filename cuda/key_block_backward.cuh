// The tensor-core backward (nsa-spec §3) of the attention branches, key block by key block, as
// FlashAttention-2's dK/dV pass: a CTA holds one tile of 16, 32, 64 or 128 keys of one kv head in shared memory
// and streams through the queries that see it, 32 query rows (tokens x heads of the group) per step, two steps
// of Q / dO in flight (one where that keeps a second CTA an SM: staging). Per step and 16 keys, on mma.sync, a
// pair of warps computes
//   S^T = K Q^T, dP^T = V dO^T (16 keys x 32 rows), P^T = g exp(scale S^T - lse) (g the row's gate, or 1),
//   dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q (in registers for the whole CTA),
// then dS goes through shared memory and the warps split dQ = dS K by columns, added to dq by fp32 atomics (a
// query row meets the block once, other blocks add theirs). A block's dK / dV leave once per CTA by atomics
// (long query lists are split over several CTAs of `tokens_per_cta` tokens each, which also balances the
// work: block 0 is selected by every token). Rows are padded to the kernel_dims of K and V (up to 256). On sm_90,
// 64-key tiles with K and V in {64, 128} or K = 192 with V = 128 take the warpgroup version of the same CTA
// (key_block_backward_sm90.cuh).
//
// Which tokens see a block and which of its keys each sees is the branch's: a Source gives each CTA its
// KeyTile (`tile`), the tokens' positions (`token`) and the visibility rule (`sees`): selected attention (lists of
// the tokens that selected each block), the sliding window and compressed attention (ranges of tokens).
#pragma once
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "cuda/common.cuh"
#include "cuda/key_block_backward.h"
#include "cuda/key_block_backward_sm90.cuh"
#include "cuda/mma.cuh"
#include "cuda/warp_tile.cuh"

namespace nsa::cuda::kbb {

// kernel_dims as types, for the dispatch.
template <int K, int V>
struct StaticDims {
  static constexpr int k = K, v = V;
};

// The most shared memory a CTA of any GPU the build targets may have (sm_90: 227 KB).
constexpr size_t kMaxSmemPerCta = kSm90Smem.per_cta;

// fits_within on the current device.
inline bool fits(const DeviceLayout& L, int tile_keys, const void* q, const void* k, const void* v) {
  return fits_within(L, tile_keys, q, k, v, device_budget(L));
}

// Token block i of a launch's (kv head x block) numbering: kv head i / (B C), then block (i % (B C)) of the
// batch rows' pooled-block numbering (the sequences' chunk_start), whose BS keys are tokens of its sequence.
// Sets w's h, query_base, key_row0, key0 and nkeys; returns the sequence's length.
__device__ __forceinline__ int64_t locate_block(int64_t i, const DeviceLayout& L, KeyTile& w) {
  const int64_t blocks = L.B * L.C, block = i % blocks, b = block / L.C, chunk = block % L.C;
  const DeviceSequence seq = L.seqs[find_seq_of_chunk(L.seqs, L.num_seqs, b, chunk)];
  w.h = int(i / blocks);
  w.query_base = seq.batch * L.T + seq.start;
  w.key0 = (chunk - seq.chunk_start) * L.block_size;
  w.key_row0 = w.query_base + w.key0;
  w.nkeys = int(min(int64_t(L.block_size), seq.length - w.key0));
  return seq.length;
}

// delta[row] = do_x[row] . o_x[row] and do_x cast to T (the tensor-core operand), a warp per row.
template <typename T>
__global__ void prepare_rows_kernel(T* d_out_cast, float* delta, const float* d_out, const T* o, int64_t rows, int V) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float dot = 0.f;
  for (int d = lane; d < V; d += 32) {
    const float g = d_out[row * V + d];
    dot = fmaf(g, Elem<T>::to_float(o[row * V + d]), dot);
    d_out_cast[row * V + d] = Elem<T>::from_float(g);
  }
  dot = warp_sum(dot);
  if (lane == 0) delta[row] = dot;
}

// Scores of the warp's 16 keys (rows key0.. of As) against a step's 32 rows (Bs): S^T = K Q^T or dP^T = V dO^T,
// k over D columns (four independent mma chains, one per 8-row group).
template <typename T, int D, int kStride>
__device__ __forceinline__ void key_scores(float (&out)[kRowGroups][4], const T* As, const T* Bs, int key0,
                                           int lane) {
#pragma unroll
  for (int j = 0; j < kRowGroups; ++j) out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.f;
  // A: the keys, rows key0 + lane % 16, k half lane / 16. B: two 8-row groups of the step's rows per ldmatrix.
  const uint32_t a = smem_addr(As + (key0 + lane % 16) * kStride + (lane / 16) * 8);
  const uint32_t b = smem_addr(Bs + ((lane / 16) * 8 + lane % 8) * kStride + ((lane / 8) % 2) * 8);
#pragma unroll
  for (int kc = 0; kc < D; kc += 16) {
    uint32_t af[4];
    ldmatrix_x4(af, a + kc * int(sizeof(T)));
#pragma unroll
    for (int rg = 0; rg < kRowGroups; rg += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (rg * 8 * kStride + kc) * int(sizeof(T)));
      MmaElem<T>::mma(out[rg], af, bf[0], bf[1]);
      MmaElem<T>::mma(out[rg + 1], af, bf[2], bf[3]);
    }
  }
}

// Barrier `id` over `threads` threads (whole warps), orders their shared-memory accesses. Not `.aligned`: the
// two warps of a pair reach it from different branches. (With bar.arrive on the producer's side, racecheck
// reported hazards across the CTA-wide barriers; with bar.sync, the `.aligned` form, synccheck objected to the
// two instructions.)
__device__ __forceinline__ void pair_sync(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared memory of key_block_backward_kernel<T, DK, DV, kKeyWarps, kStages, kPInDs>.
template <typename T, int DK, int DV, int kKeyWarps, int kStages, bool kPInDs>
struct Smem {
  // The rows of a step are gathered from L2 (a selected block's tokens are scattered): kStages steps in flight.
  static constexpr int kKeys = 16 * kKeyWarps;
  static constexpr int kStrideK = tile::smem_stride<T>(DK), kStrideV = tile::smem_stride<T>(DV);
  static constexpr int kDsStride = tile::smem_stride<T>(kKeys);
  // K [kKeys][kStrideK], V [kKeys][kStrideV]; Q [kStages][kStepRows][kStrideK], dO [kStages][kStepRows][kStrideV];
  // dS [kStepRows][kDsStride]; then, unless P^T goes through dS, P^T fragments [kKeyWarps][32 lanes][4 kRowGroups];
  // per stage and row: the query row (flat token x HQ + head, -1 for none), its token's position, lse, delta and
  // gate; the CTA's token positions.
  static constexpr int kQRowElems = kStepRows * kStrideK, kORowElems = kStepRows * kStrideV;
  static constexpr size_t kElems = size_t(kKeys) * (kStrideK + kStrideV) +
                                   size_t(kStages) * (kQRowElems + kORowElems) + kStepRows * size_t(kDsStride);
  static constexpr int kFragFloats = kPInDs ? 0 : kKeyWarps * 32 * 4 * kRowGroups;
  static constexpr size_t kBytes = kElems * sizeof(T) + kFragFloats * sizeof(float) +
                                   kStages * kStepRows * (2 * sizeof(int64_t) + 3 * sizeof(float)) +
                                   kMaxTokensPerCta * sizeof(int32_t);
  static_assert(sizeof(T) != 2 || int64_t(kBytes) == smem_bytes(Dims{DK, DV}, kKeys, Staging{kStages, kPInDs}),
                "fits_within's size of this layout");
};

// Two warps per 16 keys (kKeyWarps x 16 keys a tile): per step the P warp of a key group computes S^T, the
// probabilities P^T (masked by the Source) and dV += P^T dO; the dS warp computes dP^T, takes P^T through
// shared memory (fp32 fragments; or with kPInDs the group's columns of dS in fp16, P <= 1, each lane reading back
// the very elements it then overwrites with dS), dS^T = P^T (dP^T - delta) and dK += dS^T Q. Each keeps one
// [16 x DV] or [16 x DK] accumulator, so with 64 keys or more a tile and head dims up to 128 a thread needs at
// most 128 registers and an SM holds 16 warps (H100: one warp per 16 keys holding both needed 255 and ran 8
// warps); smaller tiles keep two CTAs an SM and their registers. Above 128 the accumulator alone takes 96
// (K = 192) or 128 registers and shared memory holds one or two CTAs an SM anyway.
template <typename T, int DK, int DV, int kKeyWarps, int kStages, bool kPInDs, typename Source>
__global__ void __launch_bounds__(64 * kKeyWarps, DK > 128 ? 1 : kKeyWarps >= 4 ? 8 / kKeyWarps : 2)
    key_block_backward_kernel(const Tensors<T> g, const Source src, const StepGeometry geo) {
  using Layout = Smem<T, DK, DV, kKeyWarps, kStages, kPInDs>;
  constexpr int kAccCols = DK > DV ? DK : DV;
  constexpr int kKeys = Layout::kKeys, kStrideK = Layout::kStrideK, kStrideV = Layout::kStrideV;
  constexpr int kDsStride = Layout::kDsStride;
  constexpr int kWarps = 2 * kKeyWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kKeys * kStrideK;
  T* Qs = Vs + kKeys * kStrideV;                 // [kStages][kStepRows][kStrideK]
  T* Os = Qs + kStages * Layout::kQRowElems;     // dO: [kStages][kStepRows][kStrideV]
  T* dSs = Os + kStages * Layout::kORowElems;    // [kStepRows][kDsStride]
  __half* const p_ds = reinterpret_cast<__half*>(dSs);  // kPInDs: P^T in dS's place
  float* Ps = reinterpret_cast<float*>(dSs + kStepRows * kDsStride);  // [kKeyWarps][32][4 kRowGroups]
  int64_t* qrow_s = reinterpret_cast<int64_t*>(Ps + Layout::kFragFloats);  // [kStages][kStepRows]
  int64_t* t_s = qrow_s + kStages * kStepRows;
  float* lse_s = reinterpret_cast<float*>(t_s + kStages * kStepRows);
  float* delta_s = lse_s + kStages * kStepRows;
  float* gate_s = delta_s + kStages * kStepRows;
  int32_t* token_s = reinterpret_cast<int32_t*>(gate_s + kStages * kStepRows);  // [kMaxTokensPerCta]

  KeyTile w;
  if (!src.tile(int64_t(blockIdx.x), w)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool p_warp = warp < kKeyWarps;
  const int key_group = warp % kKeyWarps;
  // The tokens' positions up front: a step's row mapping then waits on no global load.
  for (int i = threadIdx.x; i < w.ntok; i += blockDim.x) token_s[i] = int32_t(src.token(w, i));
  __syncthreads();
  const int K = g.K, V = g.V;

  auto key_row = [&](int r) -> int64_t { return (w.key_row0 + r) * g.H + w.h; };
  tile::load_rows(Ks, kStrideK, kKeys, K, DK, [&](int r) { return r < w.nkeys ? g.k + key_row(r) * K : nullptr; });
  tile::load_rows(Vs, kStrideV, kKeys, V, DV, [&](int r) { return r < w.nkeys ? g.v + key_row(r) * V : nullptr; });

  // Row r of step s: its query row (or -1) and its token's position in the sequence.
  auto step_row = [&](int s, int r, int64_t& t) -> int64_t {
    int i, head;
    if (!step_slot(geo, s, r, w.ntok, g.G, i, head)) return -1;
    t = token_s[i];
    return (w.query_base + t) * g.HQ + int64_t(w.h) * g.G + head;
  };
  auto load_step = [&](int s, int buf) {
    if (threadIdx.x < kStepRows) {
      const int r = buf * kStepRows + threadIdx.x;
      int64_t t = -1;
      const int64_t row = step_row(s, threadIdx.x, t);
      qrow_s[r] = row;
      t_s[r] = row >= 0 ? t : -1;
      if (row >= 0) {
        cp_async_4(lse_s + r, g.lse + row);
        cp_async_4(delta_s + r, g.delta + row);
        if (g.gate) cp_async_4(gate_s + r, g.gate + row);
        else gate_s[r] = 1.f;
      } else {
        lse_s[r] = delta_s[r] = gate_s[r] = 0.f;
      }
    }
    T* const q_dst = Qs + buf * Layout::kQRowElems;
    T* const o_dst = Os + buf * Layout::kORowElems;
    if constexpr (DK + DV > 256) {
      // Wide rows: Q and dO of a row in one pass, one lookup for both (H100, 8k backward: K = 192, V = 128 on
      // --no-sm90-kernels with W = 512 15.77 -> 15.14 ms; K = V = 256 12.81 -> 12.54). At K = V = 128 the one
      // pass measured 3-4% slower than two (8.71-8.74 -> 8.96-9.08 ms), so narrower rows keep two.
      tile::load_row_pairs(tile::RowTile<T>{q_dst, kStrideK, K, DK}, tile::RowTile<T>{o_dst, kStrideV, V, DV},
                           kStepRows, [&](int r, const T*& q, const T*& o) {
                             int64_t t;
                             const int64_t row = step_row(s, r, t);
                             q = row >= 0 ? g.q + row * K : nullptr;
                             o = row >= 0 ? g.d_out + row * V : nullptr;
                           });
    } else {
      // Row r of step s in a [rows][width] tensor (null for a padding row).
      auto rows_of = [&](const T* base, int width) {
        return [&, base, width](int r) -> const T* {
          int64_t t;
          const int64_t row = step_row(s, r, t);
          return row >= 0 ? base + row * width : nullptr;
        };
      };
      tile::load_rows(q_dst, kStrideK, kStepRows, K, DK, rows_of(g.q, K));
      tile::load_rows(o_dst, kStrideV, kStepRows, V, DV, rows_of(g.d_out, V));
    }
    cp_async_commit();
  };

  float acc_kv[kAccCols / 8][4];  // the P warp's dV (its first DV columns), the dS warp's dK (unscaled)
  auto& acc_dv = reinterpret_cast<float(&)[DV / 8][4]>(acc_kv);
  auto& acc_dk = reinterpret_cast<float(&)[DK / 8][4]>(acc_kv);
#pragma unroll
  for (int j = 0; j < kAccCols / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_kv[j][e] = 0.f;

  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = g.scale * kLog2e;
  const int steps = (w.ntok + geo.tpt - 1) / geo.tpt * geo.head_chunks;
  // This lane's P^T fragment, shared by the key group's pair.
  float4* p_frag = reinterpret_cast<float4*>(Ps) + (key_group * 32 + lane) * kRowGroups;
  // One cp.async group per step (empty past the last), so that waiting for all but the newest kStages - 2
  // groups means step s is in; the K / V copies join step 0's group.
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_step(s, s);
    else cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    const int buf = s % kStages;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step s's rows are in; every warp is past step s - 1 (its stage, P^T and dS are free)
    if (s + kStages - 1 < steps) load_step(s + kStages - 1, (s + kStages - 1) % kStages);
    else cp_async_commit();
    const T* Qb = Qs + buf * Layout::kQRowElems;
    const T* Ob = Os + buf * Layout::kORowElems;
    const float* delta_b = delta_s + buf * kStepRows;

    // Fragment element (j, e): key key_group * 16 + lane / 4 (+ 8 for e >= 2), row j * 8 + (lane % 4) * 2 + e % 2.
    float f[kRowGroups][4];
    if (p_warp) {
      key_scores<T, DK, kStrideK>(f, Ks, Qb, key_group * 16, lane);  // S^T
#pragma unroll
      for (int j = 0; j < kRowGroups; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_group * 16 + lane / 4 + (e >= 2 ? 8 : 0), r = j * 8 + (lane % 4) * 2 + (e & 1);
          const int64_t t = t_s[buf * kStepRows + r];
          const bool on = key < w.nkeys && t >= 0 && src.sees(t, w.key0 + key);
          const int m = buf * kStepRows + r;
          f[j][e] = on ? gate_s[m] * exp2_ftz(f[j][e] * scale_log2 - lse_s[m] * kLog2e) : 0.f;
          if constexpr (kPInDs) p_ds[r * kDsStride + key] = __float2half_rn(f[j][e]);
        }
      if constexpr (!kPInDs) {
#pragma unroll
        for (int j = 0; j < kRowGroups; ++j) p_frag[j] = make_float4(f[j][0], f[j][1], f[j][2], f[j][3]);
      }
      pair_sync(1 + key_group, 64);
      tile::warp_pv<T, kStepRows, DV>(acc_dv, f, Ob, kStrideV, lane);  // dV += P^T dO
    } else {
      key_scores<T, DV, kStrideV>(f, Vs, Ob, key_group * 16, lane);  // dP^T
      pair_sync(1 + key_group, 64);
#pragma unroll
      for (int j = 0; j < kRowGroups; ++j) {
        float p[4];
        if constexpr (!kPInDs) {
          const float4 pj = p_frag[j];
          p[0] = pj.x, p[1] = pj.y, p[2] = pj.z, p[3] = pj.w;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_group * 16 + lane / 4 + (e >= 2 ? 8 : 0), r = j * 8 + (lane % 4) * 2 + (e & 1);
          if constexpr (kPInDs) p[e] = __half2float(p_ds[r * kDsStride + key]);
          f[j][e] = p[e] * (f[j][e] - delta_b[r]);
          dSs[r * kDsStride + key] = Elem<T>::from_float(f[j][e]);
        }
      }
      tile::warp_pv<T, kStepRows, DK>(acc_dk, f, Qb, kStrideK, lane);  // dK += dS^T Q
    }
    __syncthreads();  // dS complete

    // dq[rows, 16-column groups warp, warp + kWarps, ...] += scale dS K for both 16-row tiles, the mma chains
    // interleaved; at most four column groups at a time (two warps: DK = 256 eight groups, 192 six, in chunks of
    // four or three), so that their accumulators fit beside dK / dV.
    constexpr int kGroupsAll = (DK / 16 + kWarps - 1) / kWarps;
    constexpr int kGroups = kGroupsAll <= 4 ? kGroupsAll : kGroupsAll % 4 == 0 ? 4 : 3;
    static_assert(kGroupsAll % kGroups == 0, "whole chunks of column groups");
    const uint32_t a_row = smem_addr(dSs + (lane % 16) * kDsStride + (lane / 16) * 8);
    const uint32_t b_row = smem_addr(Ks + (lane % 16) * kStrideK + (lane / 16) * 8);
#pragma unroll 1
    for (int g0 = 0; g0 < kGroupsAll; g0 += kGroups) {
      float acc[kGroups][2][2][4] = {};  // [column group][row tile][8-column half][fragment]
#pragma unroll
      for (int kc = 0; kc < kKeys; kc += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt], a_row + (mt * 16 * kDsStride + kc) * int(sizeof(T)));
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi) {
          const int col0 = (warp + (g0 + gi) * kWarps) * 16;
          if (col0 >= K) break;
          uint32_t b[4];
          ldmatrix_x4_trans(b, b_row + (kc * kStrideK + col0) * int(sizeof(T)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            MmaElem<T>::mma(acc[gi][mt][0], a[mt], b[0], b[1]);
            MmaElem<T>::mma(acc[gi][mt][1], a[mt], b[2], b[3]);
          }
        }
      }
      // Lane pairs swap halves so that each lane adds four consecutive columns of one row: the even lane row
      // lane / 4, the odd lane row lane / 4 + 8 (of each row tile), columns from the even lane's.
      const bool odd = lane & 1;
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        const int col0 = (warp + (g0 + gi) * kWarps) * 16;
        if (col0 >= K) break;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int64_t row = qrow_s[buf * kStepRows + mt * 16 + lane / 4 + (odd ? 8 : 0)];
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const float* c = acc[gi][mt][n];
            const float give0 = odd ? c[0] : c[2], give1 = odd ? c[1] : c[3];
            const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
            const int col = col0 + n * 8 + (lane % 4 - (odd ? 1 : 0)) * 2;
            const float4 add = odd ? make_float4(got0, got1, c[2], c[3]) : make_float4(c[0], c[1], got0, got1);
            if (row >= 0 && col < K)
              atomic_add4(g.dq + row * K + col, make_float4(g.scale * add.x, g.scale * add.y, g.scale * add.z,
                                                            g.scale * add.w));
          }
        }
      }
    }
  }

  // The tile's dV (P warps) or dK (dS warps): keys key_group * 16 + lane / 4 (+ 8), columns j * 8 + (lane % 4) * 2.
  float* out = p_warp ? g.dv : g.dk;
  const int cols = p_warp ? V : K;
  const float factor = p_warp ? 1.f : g.scale;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key_group * 16 + lane / 4 + half * 8;
    if (key >= w.nkeys) continue;
    const int64_t kv = key_row(key);
#pragma unroll
    for (int j = 0; j < kAccCols / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      if (col < cols)
        atomic_add2(out + kv * cols + col, factor * acc_kv[j][2 * half], factor * acc_kv[j][2 * half + 1]);
    }
  }
}

// The kernels' upstream rows (Tensors): do with the gates and deltas gate_backward wrote (a gated BranchGrad), or
// do_x cast to the input type with its deltas, formed here from the fp32 gradient in stream-ordered scratch
// memory.
struct PreparedRows {
  std::optional<StreamScratch> d_out_cast, delta_rows;
  const void* d_out = nullptr;
  const float* delta = nullptr;
  const float* gate = nullptr;
  PreparedRows(const DeviceLayout& L, const BranchGrad& grad, const void* o, cudaStream_t s) {
    if (grad.d_out) {
      d_out = grad.d_out, delta = grad.delta, gate = grad.gate;
      return;
    }
    const int64_t rows = L.B * L.T * L.HQ;
    d_out_cast.emplace(size_t(rows * L.V) * (L.dtype == ElemType::F32 ? 4 : 2), s, "cudaMallocAsync(do cast)");
    delta_rows.emplace(size_t(rows) * sizeof(float), s, "cudaMallocAsync(delta)");
    d_out = d_out_cast->as<void>(), delta = delta_rows->as<float>();
    if (rows == 0) return;
    dispatch_elem(L.dtype, [&](auto tag) {
      using T = decltype(tag);
      prepare_rows_kernel<T><<<unsigned(div_up(rows * 32, 256)), 256, 0, s>>>(
          d_out_cast->as<T>(), delta_rows->as<float>(), grad.f32, static_cast<const T*>(o), rows, int(L.V));
    });
    check_launch("prepare_rows_kernel");
  }
};

// Launches key_block_backward_kernel, or on sm_90 where it fits its warpgroup version
// (key_block_backward_sm90.cuh), with tiles of `tile_keys` keys over `ctas` CTAs (those past the Source's work
// return at once); `name` names it in errors. The caller has checked fits(L, tile_keys, ...). A branch
// whose tiles have one size names it as kFixedTileKeys: only that kernel is built.
template <int kFixedTileKeys = 0, typename Source>
void launch(float* dq, float* dk, float* dv, const PreparedRows& rows, const void* q, const void* k, const void* v,
            const float* lse, const Source& src, int tile_keys, int64_t ctas, const StepGeometry& geo,
            const DeviceLayout& L, cudaStream_t s, const char* name) {
  if (ctas == 0) return;
  if (ctas >= (int64_t(1) << 31)) throw CudaError(std::string(name) + ": too many key blocks for one launch");
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore) {
      const Tensors<T> g{dq, dk, dv, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                         static_cast<const T*>(rows.d_out), lse, rows.delta, rows.gate, L.HQ, int(L.H),
                         int(L.HQ / L.H), int(L.K), int(L.V), L.scale};
      if (sm90_fits(L, tile_keys)) {
        launch_sm90(g, src, ctas, geo, L, s, name);
        return;
      }
      const Dims d = kernel_dims(L.K, L.V);
      const Staging st = staging(d, tile_keys, device_budget(L).per_sm);
      auto go = [&](auto dims, auto warps) {
        constexpr int DK = decltype(dims)::k, DV = decltype(dims)::v, kKeyWarps = decltype(warps)::value;
        // The stagings an H100's or an A100's budget choose; only those are built.
        constexpr Staging kSm90 = staging(Dims{DK, DV}, 16 * kKeyWarps, kSm90Smem.per_sm);
        constexpr Staging kSm80 = staging(Dims{DK, DV}, 16 * kKeyWarps, kSm80Smem.per_sm);
        auto with_staging = [&](auto stages, auto p_in_ds) {
          constexpr int kStages = decltype(stages)::value;
          constexpr bool kPInDs = decltype(p_in_ds)::value;
          constexpr size_t bytes = Smem<T, DK, DV, kKeyWarps, kStages, kPInDs>::kBytes;
          // 128-key tiles with rows above 128 need more shared memory than any GPU's CTA has: fits_within
          // turned them away.
          if constexpr (bytes <= kMaxSmemPerCta) {
            auto kernel = key_block_backward_kernel<T, DK, DV, kKeyWarps, kStages, kPInDs, Source>;
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), name);
            kernel<<<unsigned(ctas), 64 * kKeyWarps, bytes, s>>>(g, src, geo);
          } else {
            throw CudaError(std::string(name) + ": no key-block kernel for these head dims and tile");
          }
        };
        if (st.stages == kSm80.stages && st.p_in_ds == kSm80.p_in_ds)
          with_staging(std::integral_constant<int, kSm80.stages>{}, std::bool_constant<kSm80.p_in_ds>{});
        else
          with_staging(std::integral_constant<int, kSm90.stages>{}, std::bool_constant<kSm90.p_in_ds>{});
      };
      auto with_warps = [&](auto dims) {
        if constexpr (kFixedTileKeys != 0) {
          static_assert(kFixedTileKeys % 16 == 0 && kFixedTileKeys <= 128, "tiles of 16 to 128 keys");
          go(dims, std::integral_constant<int, kFixedTileKeys / 16>{});
        } else {
          switch (tile_keys) {
            case 16: go(dims, std::integral_constant<int, 1>{}); break;
            case 32: go(dims, std::integral_constant<int, 2>{}); break;
            case 64: go(dims, std::integral_constant<int, 4>{}); break;
            default: go(dims, std::integral_constant<int, 8>{}); break;
          }
        }
      };
      if (d.k == 32) with_warps(StaticDims<32, 32>{});
      else if (d.k == 64) with_warps(StaticDims<64, 64>{});
      else if (d.k == 128) with_warps(StaticDims<128, 128>{});
      else if (d.k == 192) with_warps(StaticDims<192, 128>{});
      else with_warps(StaticDims<256, 256>{});
    }
  });
  check_launch(name);
}

}  // namespace nsa::cuda::kbb
