// The key-block backward (key_block_backward.cuh) on sm_90a warpgroup MMAs, for 64-key tiles with K and V in
// {64, 128} or the NSA paper's heads (K = 192, V = 128): the same work per CTA (one key tile of one kv head, the
// tokens a Source gives it) with each 64-row step of queries on one consumer warpgroup. Per step, with the keys
// as the MMA's 64 rows:
//   S^T = K Q^T and dP^T = V dO^T (both operands in shared memory), P^T = g exp(scale S^T - lse) masked by the
//   Source (g the row's gate, or 1), dS^T = P^T (dP^T - delta) in registers;
//   dV += P^T dO and dK += dS^T Q with P^T / dS^T as register operands (the accumulators stay in registers for
//   the whole CTA);
//   dS^T to shared memory, then dQ = dS K, 64 columns at a time, added to dq by float4 atomics.
// Two consumer warpgroups take alternate steps, each with its own dK / dV (summed through shared memory at the
// end); a producer warpgroup gathers the steps' Q and dO rows with cp.async into 128-byte-swizzled stages
// (the tokens of a step are scattered, so there is no tensor-map box to copy) and signals a full mbarrier.
// compute-sanitizer racecheck does not model an mbarrier's completion by cp.async: it reports the consumers'
// reads of every stage as races with the copies that filled it (memcheck and synccheck are clean).
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/key_block_backward.h"
#include "cuda/mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace nsa::cuda::kbb {

namespace sm90 {

constexpr int kKeys = 64, kRows = 64;  // a tile's keys; query rows per step (two of the 32-row steps)
constexpr int kConsumers = 2;  // consumer warpgroups
constexpr int kThreads = 128 * (kConsumers + 1);
// setmaxnreg moves registers between whole warpgroups: the producer keeps few, each consumer holds dK and dV
// (64 keys x DK and x DV fp32 over 128 threads: 128 registers at 128 / 128, 160 at 192 / 128) plus two score
// tiles (64 x 64, or 64 x 32 parts of the step at K = 192).
// The producer's copies need few (one row lookup per step, addresses): it keeps 24 so that each consumer may hold
// 240 (at K = 128, 232 spilled 28 bytes in the compressed-attention instance).
constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
static_assert(kConsumers * kConsumerRegisters * 128 + kProducerRegisters * 128 <= 65536, "register file");

// Shared memory: K and V tiles, the stages (Q then dO, [64 rows][DK] and [64 rows][DV] as 64-column swizzled
// boxes), each consumer's dS^T box ([key][row]), per stage the rows' metadata, the CTA's token positions, the
// mbarriers. Four stages; three at K = 192 (four would pass 227 KB by 72 bytes).
template <int DK, int DV>
struct Smem {
  static constexpr int kStages = DK + DV > 256 ? 3 : 4;
  static constexpr int kTileK = (DK / 64) * kWgmmaBoxBytes, kTileV = (DV / 64) * kWgmmaBoxBytes;
  static constexpr int kK = 0, kV = kTileK, kStage0 = kTileK + kTileV, kStageBytes = kTileK + kTileV;
  static constexpr int kDs = kStage0 + kStages * kStageBytes;
  static constexpr int kMeta = kDs + kConsumers * kWgmmaBoxBytes;
  // Per stage: query row (flat token x HQ + head, -1 for padding) and token position as int64, lse, delta and
  // gate.
  static constexpr int kMetaBytes = kRows * (8 + 8 + 4 + 4 + 4);
  static constexpr int kTokens = kMeta + kStages * kMetaBytes;
  static constexpr int kBarriers = kTokens + kMaxTokensPerCta * 4;
  static constexpr int kBytes = kBarriers + (1 + 2 * kStages) * 8;  // K/V full, full[kStages], empty[kStages]
  // The end's exchange of dK and dV (fp32, [DK / 64] then [DV / 64] x [32][128 threads]) reuses the stages.
  static constexpr int kExchangeDv = (DK / 64) * 32 * 128;  // dV's offset in the area, in floats
  static_assert((DK / 64 + DV / 64) * 32 * 128 * 4 <= kStages * kStageBytes, "exchange area");
};

__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Row r of a 64-row step s: rows 0-31 are 32-row step 2s of the geometry, rows 32-63 step 2s + 1. Returns the
// query row (-1 for padding) and sets t, the token's position.
template <typename T>
__device__ __forceinline__ int64_t step_row(const StepGeometry& geo, const KeyTile& w, const Tensors<T>& g,
                                            const int32_t* token_s, int s, int r, int64_t& t) {
  int i, head;
  if (!step_slot(geo, 2 * s + r / kStepRows, r % kStepRows, w.ntok, g.G, i, head)) return -1;
  t = token_s[i];
  return (w.query_base + t) * g.HQ + int64_t(w.h) * g.G + head;
}

// The end's exchange of the two warpgroups' dK / dV through an area, thread-major (conflict-free).
template <int kBoxes>
__device__ __forceinline__ void stash(float* area, const float (&a)[kBoxes][32], int tid) {
#pragma unroll
  for (int b = 0; b < kBoxes; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) area[(b * 32 + i) * 128 + tid] = a[b][i];
}
template <int kBoxes>
__device__ __forceinline__ void add_stashed(float (&a)[kBoxes][32], const float* area, int tid) {
#pragma unroll
  for (int b = 0; b < kBoxes; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) a[b][i] += area[(b * 32 + i) * 128 + tid];
}
// A tile's dK or dV (accumulator layout, keys as rows) added to the [*, H, D] gradient, times `factor`.
struct KeyOut {
  const KeyTile& w;
  int H, lane, key_lo;
  template <int kBoxes>
  __device__ __forceinline__ void emit(float* out, const float (&a)[kBoxes][32], float factor) const {
    constexpr int D = kBoxes * 64;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key_lo + 8 * half;
      if (key >= w.nkeys) continue;
      const int64_t kv = (w.key_row0 + key) * H + w.h;
#pragma unroll
      for (int n = 0; n < 8 * kBoxes; ++n) {
        const int i = 4 * (n % 8) + 2 * half;
        atomic_add2(out + kv * D + 8 * n + 2 * (lane % 4), factor * a[n / 8][i], factor * a[n / 8][i + 1]);
      }
    }
  }
};

template <typename T, int DK, int DV, typename Source>
__global__ void __launch_bounds__(kThreads, 1)
    key_block_backward_sm90_kernel(const Tensors<T> g, const Source src, const StepGeometry geo) {
#if NSA_HAS_WGMMA
  using Ly = Smem<DK, DV>;
  constexpr int kStages = Ly::kStages;
  extern __shared__ __align__(1024) unsigned char smem[];
  if (smem_addr(smem) & 1023) __trap();  // the swizzled tiles need the declared alignment
  KeyTile w;
  if (!src.tile(int64_t(blockIdx.x), w)) return;

  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + Ly::kBarriers);
  uint64_t* full = kv_full + 1;
  uint64_t* empty = full + kStages;
  int32_t* token_s = reinterpret_cast<int32_t*>(smem + Ly::kTokens);
  auto meta = [&](int stage) { return smem + Ly::kMeta + stage * Ly::kMetaBytes; };
  auto qrow_of = [&](int stage) { return reinterpret_cast<int64_t*>(meta(stage)); };
  auto t_of = [&](int stage) { return reinterpret_cast<int64_t*>(meta(stage)) + kRows; };
  auto lse_of = [&](int stage) { return reinterpret_cast<float*>(meta(stage) + 16 * kRows); };
  auto delta_of = [&](int stage) { return reinterpret_cast<float*>(meta(stage) + 20 * kRows); };
  auto gate_of = [&](int stage) { return reinterpret_cast<float*>(meta(stage) + 24 * kRows); };

  for (int i = threadIdx.x; i < w.ntok; i += blockDim.x) token_s[i] = int32_t(src.token(w, i));
  if (threadIdx.x == 0) {
    mbar_init(kv_full, 128);  // the producer threads' cp.async arrivals
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 2 * 128);  // each producer thread: its cp.async arrival and its metadata stores
      mbar_init(&empty[s], 4);       // the consuming warpgroup's warps
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int steps = ((w.ntok + geo.tpt - 1) / geo.tpt * geo.head_chunks + 1) / 2;

  if (threadIdx.x >= kConsumers * 128) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters));
    const int pt = threadIdx.x - kConsumers * 128;
    // A thread copies 16-byte chunk `part` of each 64-column box of rows row0, row0 + 16, ...: eight threads
    // fill a row's 128 bytes of a box, and a thread looks each of its rows up once whatever the width.
    const int part = pt % 8, row0 = pt / 8;
    auto copy_row = [&](unsigned char* tile, int r, const T* src, bool valid, int boxes) {  // !valid: zeros
      for (int b = 0; b < boxes; ++b)
        cp_async_16(tile + b * kWgmmaBoxBytes + int(swizzle128(r, part)), src + b * 64 + part * 8, valid);
    };
    for (int r = row0; r < kKeys; r += 16) {
      const bool valid = r < w.nkeys;
      const int64_t kv = (w.key_row0 + (valid ? r : 0)) * g.H + w.h;
      copy_row(smem + Ly::kK, r, g.k + kv * DK, valid, DK / 64);
      copy_row(smem + Ly::kV, r, g.v + kv * DV, valid, DV / 64);
    }
    cp_async_mbar_arrive(kv_full);
    for (int s = 0; s < steps; ++s) {
      const int stage = s % kStages;
      mbar_wait(&empty[stage], ((s / kStages) & 1) ^ 1);
      unsigned char* q_s = smem + Ly::kStage0 + stage * Ly::kStageBytes;
      if (pt < kRows) {  // the step's rows: one lookup each, for every producer thread's copies
        int64_t t = -1;
        const int64_t row = step_row(geo, w, g, token_s, s, pt, t);
        qrow_of(stage)[pt] = row;
        t_of(stage)[pt] = row >= 0 ? t : -1;
        if (row >= 0) {
          cp_async_4(lse_of(stage) + pt, g.lse + row);
          cp_async_4(delta_of(stage) + pt, g.delta + row);
          if (g.gate) cp_async_4(gate_of(stage) + pt, g.gate + row);
          else gate_of(stage)[pt] = 1.f;
        } else {
          lse_of(stage)[pt] = delta_of(stage)[pt] = gate_of(stage)[pt] = 0.f;
        }
      }
      // The rows are written; a stage's rows are rewritten only kStages steps on, after every producer thread
      // has passed this barrier again.
      named_sync(4, 128);
      const int64_t* rows = qrow_of(stage);
      for (int r = row0; r < kRows; r += 16) {
        const int64_t row = rows[r];
        const bool valid = row >= 0;
        copy_row(q_s, r, g.q + (valid ? row : 0) * DK, valid, DK / 64);
        copy_row(q_s + Ly::kTileK, r, g.d_out + (valid ? row : 0) * DV, valid, DV / 64);
      }
      cp_async_mbar_arrive(&full[stage]);
      mbar_arrive(&full[stage]);
    }
    return;
  }

  // Consumers. Accumulator element i of this thread: tile row (a key) warp * 16 + lane / 4 + 8 ((i / 2) % 2),
  // column 8 (i / 4) + 2 (lane % 4) + i % 2 (a query row of the step for S^T / dP^T, a column for dK / dV).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegisters));
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int key_lo = warp * 16 + lane / 4;
  constexpr int kBoxesK = DK / 64, kBoxesV = DV / 64;
  float dk[kBoxesK][32], dv[kBoxesV][32];
#pragma unroll
  for (int b = 0; b < kBoxesK; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[b][i] = 0.f;
#pragma unroll
  for (int b = 0; b < kBoxesV; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) dv[b][i] = 0.f;
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = g.scale * kLog2e;
  const uint32_t k_addr = smem_addr(smem + Ly::kK), v_addr = smem_addr(smem + Ly::kV);
  unsigned char* ds_box = smem + Ly::kDs + wg * kWgmmaBoxBytes;
  const uint32_t ds_addr = smem_addr(ds_box);
  mbar_wait(kv_full, 0);

  for (int s = wg; s < steps; s += kConsumers) {
    const int stage = s % kStages;
    mbar_wait(&full[stage], (s / kStages) & 1);
    fence_proxy_async_smem();  // the rows came through the generic proxy (cp.async); the MMAs read them async
    const uint32_t q_addr = smem_addr(smem + Ly::kStage0 + stage * Ly::kStageBytes), o_addr = q_addr + Ly::kTileK;
    const int64_t* t_s = t_of(stage);
    const float* lse_s = lse_of(stage);
    const float* delta_s = delta_of(stage);
    const float* gate_s = gate_of(stage);
    // The step's 64 rows in parts of kN (two of 32 at K = 192, so that the score tiles fit beside dK and dV):
    // S^T and dP^T; P^T and dS^T as A operands (16 rows of the step per k-step), packed as they are formed so
    // that the fp32 tiles die as they go; dV += P^T dO, dK += dS^T Q (B is the part's rows (K) x DV / DK
    // columns, MN-major, one box per 64 columns); dS^T to this warpgroup's box, [key][row], the pair (row,
    // row + 1) of a key one 4-byte store.
    constexpr int kParts = DK > 128 ? 2 : 1, kN = 64 / kParts, kSteps = kN / 16;
#pragma unroll
    for (int h = 0; h < kParts; ++h) {
      float st[kN / 2], dp[kN / 2];
      wgmma_scores<T, DK, kN>(st, k_addr, q_addr + h * kN * 128);  // S^T
      wgmma_scores<T, DV, kN>(dp, v_addr, o_addr + h * kN * 128);  // dP^T
      uint32_t pf[kSteps][4], dsf[kSteps][4];
      wgmma_wait<0>();
      fence_registers(st);
      fence_registers(dp);
#pragma unroll
      for (int i = 0; i < kN / 2; i += 2) {
        float p[2], ds[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key_lo + 8 * ((i / 2) % 2), r = h * kN + 8 * (i / 4) + 2 * (lane % 4) + e;
          const int64_t t = t_s[r];
          const bool on = key < w.nkeys && t >= 0 && src.sees(t, w.key0 + key);
          p[e] = on ? gate_s[r] * exp2_ftz(st[i + e] * scale_log2 - lse_s[r] * kLog2e) : 0.f;
          ds[e] = p[e] * (dp[i + e] - delta_s[r]);
        }
        pf[i / 8][(i % 8) / 2] = MmaElem<T>::pack(p[0], p[1]);
        dsf[i / 8][(i % 8) / 2] = MmaElem<T>::pack(ds[0], ds[1]);
      }
      {
        const uint64_t o_desc = wgmma_desc(o_addr), q_desc = wgmma_desc(q_addr);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
          const uint32_t rows = (h * kSteps + kk) * 2048;  // the k-step's 16 rows of every box
#pragma unroll
          for (int b = 0; b < (kBoxesK > kBoxesV ? kBoxesK : kBoxesV); ++b) {
            if (b < kBoxesV) wgmma_rs<T>(dv[b], pf[kk], wgmma_desc_step(o_desc, b * kWgmmaBoxBytes + rows));
            if (b < kBoxesK) wgmma_rs<T>(dk[b], dsf[kk], wgmma_desc_step(q_desc, b * kWgmmaBoxBytes + rows));
          }
        }
        wgmma_commit();
      }
      // The previous step's dQ MMAs have read the box (every warp waited for them before this barrier).
      if (h == 0) named_sync(1 + wg, 128);
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = key_lo + 8 * (i % 2), row = 8 * (2 * (h * kSteps + kk) + i / 2) + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(ds_box + swizzle128(key, row / 8) + (row % 8) * 2) = dsf[kk][i];
        }
    }
    fence_proxy_async_smem();
    named_sync(1 + wg, 128);

    // dQ = dS K, 64 columns at a time: A = dS (rows x keys) from the [key][row] box, B = K (keys x columns).
    const int64_t* qrow_s = qrow_of(stage);
    const bool odd = lane & 1;
    const int64_t my_row = qrow_s[warp * 16 + lane / 4 + (odd ? 8 : 0)];
#pragma unroll
    for (int b = 0; b < kBoxesK; ++b) {
      float dq[32];
      const uint64_t a_desc = wgmma_desc(ds_addr), b_desc = wgmma_desc(k_addr + b * kWgmmaBoxBytes);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss_mn<T>(dq, wgmma_desc_step(a_desc, kk * 2048), wgmma_desc_step(b_desc, kk * 2048), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(dq);
      if (b == kBoxesK - 1) {
        fence_registers(dv);
        fence_registers(dk);
        if (lane == 0) mbar_arrive(&empty[stage]);  // every MMA reading the stage is complete
      }
      // Lane pairs swap halves so that each lane adds four consecutive columns of one row: the even lane row
      // lane / 4, the odd lane row lane / 4 + 8, columns from the even lane's.
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float* c = dq + 4 * n;
        const float give0 = odd ? c[0] : c[2], give1 = odd ? c[1] : c[3];
        const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
        const int col = b * 64 + n * 8 + (lane % 4 - (odd ? 1 : 0)) * 2;
        const float4 add = odd ? make_float4(got0, got1, c[2], c[3]) : make_float4(c[0], c[1], got0, got1);
        if (my_row >= 0)
          atomic_add4(g.dq + my_row * DK + col,
                      make_float4(g.scale * add.x, g.scale * add.y, g.scale * add.z, g.scale * add.w));
      }
    }
  }

  // The two warpgroups' dK and dV meet in the (now idle) stages: warpgroup 0 hands over dK and writes dV,
  // warpgroup 1 hands over dV and writes dK.
  named_sync(3, kConsumers * 128);
  float* exchange = reinterpret_cast<float*>(smem + Ly::kStage0);
  if (wg == 0) stash(exchange, dk, tid);
  else stash(exchange + Ly::kExchangeDv, dv, tid);
  named_sync(3, kConsumers * 128);
  const KeyOut o{w, g.H, lane, key_lo};
  if (wg == 0) {
    add_stashed(dv, exchange + Ly::kExchangeDv, tid);
    o.emit(g.dv, dv, 1.f);
  } else {
    add_stashed(dk, exchange, tid);
    o.emit(g.dk, dk, g.scale);
  }
#endif
}

}  // namespace sm90

// Whether the sm_90 kernel takes a branch with tiles of `tile_keys` keys (beside fits(), which the caller has
// checked): 64-key tiles, K and V in {64, 128} (the forward's sm_90 head dims) or the NSA paper's heads (K = 192,
// V = 128), an sm_90 device with the shared memory.
inline bool sm90_fits(const DeviceLayout& L, int tile_keys) {
  if (tile_keys != sm90::kKeys || !sm90_kernels_run(L) || !sm90_forward_head_dims(L)) return false;
  return (paper_heads(L) ? sm90::Smem<192, 128>::kBytes : sm90::Smem<128, 128>::kBytes) <=
         device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(max shared memory)");
}

template <typename T, typename Source>
void launch_sm90(const Tensors<T>& g, const Source& src, int64_t ctas, const StepGeometry& geo, const DeviceLayout& L,
                 cudaStream_t s, const char* name) {
  auto go = [&](auto kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), name);
    kernel<<<unsigned(ctas), sm90::kThreads, bytes, s>>>(g, src, geo);
  };
  auto with_dims = [&](auto k, auto v) {
    constexpr int DK = decltype(k)::value, DV = decltype(v)::value;
    go(sm90::key_block_backward_sm90_kernel<T, DK, DV, Source>, sm90::Smem<DK, DV>::kBytes);
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (L.K == 192) with_dims(std::integral_constant<int, 192>{}, D128{});
  else if (L.K == 128 && L.V == 128) with_dims(D128{}, D128{});
  else if (L.K == 128) with_dims(D128{}, D64{});
  else if (L.V == 128) with_dims(D64{}, D128{});
  else with_dims(D64{}, D64{});
}

}  // namespace nsa::cuda::kbb
