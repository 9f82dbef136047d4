// Compressed attention (nsa-spec §2.2) and the sliding window (§2.5) forward on sm_90a with warpgroup MMAs:
// both attend each query to a contiguous range of keys -- the pooled blocks [0, NC(t)), or the tokens
// [max(0, t - W + 1), t] -- so one kernel serves both. The math is that of the tile kernels
// (compressed_attention.cu, sliding_window.cu): the lazy reference max in base 2, o = 0 and lse = 0 for rows
// that see no key. bf16/fp16, K and V in {64, 128} or K = 192 with V = 128 (the NSA paper's heads), G dividing
// 64 or a multiple of 64.
//
// A CTA has a consumer warpgroup and a producer warpgroup. The consumer owns a 64-row tile whose rows are
// (token, head) pairs, heads fastest: 64 / G tokens of the whole group, or a 64-head chunk of one token. One
// producer thread loads the tile's Q with tensor-map copies, then streams the 64-key K/V tiles of the CTA's key
// range through a ring of stages on full/empty mbarriers. Per tile the consumer computes S = Q K^T (wgmma, both
// operands in shared memory), the softmax in registers, and O += P V (wgmma, P from registers, V read
// MN-major). The MMAs are asynchronous: tile j+1's scores and tile j's P V are in flight while tile j+1's
// softmax runs.
#include "cuda/attention_sm90.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace nsa::cuda {
namespace {

// One consumer warpgroup and one producer warpgroup per CTA, two CTAs per SM, so that one CTA's start and end
// (Q load, first scores, last P V, stores) overlap the other's steady state. (H100: two consumer warpgroups per
// CTA sharing each K/V stage, one CTA per SM, took 10-16% longer for compressed attention, 5-20% for the
// sliding window.) setmaxnreg moves registers between whole warpgroups: the producer drops to 40 and the
// consumer rises to what is left. (With a producer warp instead, ptxas capped the kernel at 168 registers and
// the consumers spilled.)
constexpr int kConsumerThreads = 128;
constexpr int kThreads = kConsumerThreads + 128;
constexpr int kCtasPerSm = 2;
constexpr int kProducerRegisters = 40, kConsumerRegisters = 216;
static_assert(kCtasPerSm * (kProducerRegisters * 128 + kConsumerRegisters * kConsumerThreads) <= 65536,
              "register file");
constexpr int kKeys = 64;                          // pooled blocks per tile
constexpr int kBoxBytes = kWgmmaBoxBytes;
#ifndef NSA_COMPRESSED_STAGES  // K/V tiles in flight: a compile-time knob for tuning
#define NSA_COMPRESSED_STAGES 3
#endif
constexpr int kDefaultStages = NSA_COMPRESSED_STAGES;
[[maybe_unused]] constexpr unsigned kFull = 0xffffffffu;

template <int KD, int VD>
struct SmemLayout {
  // Q first: KD / 64 boxes.
  static constexpr int kStage0 = (KD / 64) * kBoxBytes;
  static constexpr int kV = (KD / 64) * kBoxBytes;            // in a stage: the K boxes, then the V boxes
  static constexpr int kStageBytes = kV + (VD / 64) * kBoxBytes;
  // Two stages where three would leave one CTA an SM (K = 192: 104 KB against 144).
  static constexpr int kStages = KD + VD > 256 ? 2 : kDefaultStages;
  static constexpr int kBarriers = kStage0 + kStages * kStageBytes;
  static constexpr int kBytes = kBarriers + (1 + 2 * kStages) * 8;
};

template <typename T>
struct Sm90Params {
  T* o;                             // [B, T, HQ, V]
  float* lse;                       // [B, T, HQ]
  const DeviceSequence* seqs;
  int64_t row_tokens, row_chunks;   // L.T, L.C
  int HQ, G, BS, W;                 // W: the window (sliding-window kernel)
  int heads, tokens, chunks;        // a 64-row tile: heads x tokens; head chunks per group (G / heads)
  int heads_shift;                  // log2(heads): heads is a power of two (G divides 64, or heads = 64)
  float scale_log2;
};

// 64-row tile number `unit` of a sequence (head chunk fastest): its first token and first head in the group.
struct Unit {
  int64_t t0;
  int head0;
};
[[maybe_unused]] __device__ __forceinline__ Unit unit_of(int unit, int tokens, int heads, int chunks) {
  return {int64_t(unit / chunks) * tokens, (unit % chunks) * heads};
}

// The keys a token sees: pooled blocks [0, NC(t)) or, with kWindow, tokens [max(0, t - W + 1), t + 1).
// Positions are below 2^31 (shape_fits), so this is 32-bit arithmetic (a 64-bit division is dozens of
// instructions, and every thread computes these for its rows).
template <bool kWindow, typename T>
__device__ __forceinline__ int key_begin(int64_t t, const Sm90Params<T>& p) {
  return kWindow ? max(0, int(t) - p.W + 1) : 0;
}
template <bool kWindow, typename T>
__device__ __forceinline__ int key_end(int64_t t, const Sm90Params<T>& p) {
  return kWindow ? int(t) + 1 : (int(t) + 1) / p.BS;
}

template <typename T, int KD, int VD, bool kWindow>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    attention_sm90_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, const Sm90Params<T> p) {
#if NSA_HAS_WGMMA
  using Ly = SmemLayout<KD, VD>;
  extern __shared__ __align__(1024) unsigned char smem[];
  if (smem_addr(smem) & 1023) __trap();  // the swizzled tiles need the declared alignment
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Ly::kBarriers);
  const StageRing<Ly::kStages> ring{q_full + 1, q_full + 1 + Ly::kStages};

  const DeviceSequence seq = p.seqs[blockIdx.y];
  // Late tokens see the most keys: launch them first so that the short tiles fill the tail.
  const Unit u = unit_of(int(gridDim.x - 1 - blockIdx.x), p.tokens, p.heads, p.chunks);
  const int64_t first = u.t0, last = min(u.t0 + p.tokens, seq.length) - 1;  // the CTA's tokens
  if (first >= seq.length) return;
  // The CTA's keys: [key0, key_stop), the union of its rows' ranges; tile j holds keys key0 + 64 j ...
  const int key0 = key_begin<kWindow>(first, p), key_stop = key_end<kWindow>(last, p);
  const int tiles = (key_stop - key0 + kKeys - 1) / kKeys;
  const int h = blockIdx.z;
  const int64_t tok_base = seq.batch * p.row_tokens + seq.start;
  // Rows of the key tensor: the sequence's tokens, or its pooled blocks.
  const int64_t key_base = kWindow ? tok_base : seq.batch * p.row_chunks + seq.chunk_start;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    ring.init(kConsumerThreads / 32);
    mbar_init_fence();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumerThreads) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters));
    if (threadIdx.x == kConsumerThreads && tiles > 0) {
      mbar_arrive_expect_tx(q_full, (KD / 64) * kBoxBytes);
      for (int b = 0; b < KD / 64; ++b)
        tma_load_3d(smem + b * kBoxBytes, &map_q, b * 64, h * p.G + u.head0, int(tok_base + u.t0), q_full);
      for (int j = 0; j < tiles; ++j) {
        uint64_t* bar = ring.begin_fill(j, Ly::kStageBytes);
        unsigned char* stage = smem + Ly::kStage0 + ring.stage(j) * Ly::kStageBytes;
        const int c = int(key_base + key0 + int64_t(j) * kKeys);
        for (int b = 0; b < KD / 64; ++b) tma_load_3d(stage + b * kBoxBytes, &map_k, b * 64, h, c, bar);
        for (int b = 0; b < VD / 64; ++b) tma_load_3d(stage + Ly::kV + b * kBoxBytes, &map_v, b * 64, h, c, bar);
      }
    }
    return;
  }

  // Consumers. This thread holds rows r and r + 8 of its warp's 16 (the wgmma accumulator layout).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegisters));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t tok[2];
  int lo[2], hi[2];  // the row's keys [lo, hi); none past the sequence
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    tok[i] = u.t0 + (r >> p.heads_shift);
    const bool valid = tok[i] < seq.length;
    lo[i] = valid ? key_begin<kWindow>(tok[i], p) : 0;
    hi[i] = valid ? key_end<kWindow>(tok[i], p) : 0;
  }

  float o[VD / 64][32], s[32];
  uint32_t pf[4][4];  // P of the tile whose P V is next
#pragma unroll
  for (int b = 0; b < VD / 64; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[b][i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const uint32_t q_addr = smem_addr(smem);
  auto stage_addr = [&](int j) { return smem_addr(smem + Ly::kStage0 + ring.stage(j) * Ly::kStageBytes); };
  // S = Q K^T of tile j, once its copies have landed.
  auto issue_scores = [&](int j) {
    ring.wait_full(j);
    wgmma_scores<T, KD>(s, q_addr, stage_addr(j));
  };
  // O += P V of tile j: 16 keys (two 8-row groups of V) per k-step, one 64-column box of V per MMA.
  auto issue_pv = [&](int j) {
    const uint64_t v_desc = wgmma_desc(stage_addr(j) + Ly::kV);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int b = 0; b < VD / 64; ++b) wgmma_rs<T>(o[b], pf[kk], wgmma_desc_step(v_desc, b * kBoxBytes + kk * 2048));
    wgmma_commit();
  };
  // Tile j's logits (the accumulators, only read) -> probabilities x relative to each row's reference, and the
  // factor alpha by which O must be rescaled. Only a tile reaching past the visible blocks of one of this
  // thread's rows needs the mask; on the others (with a positive scale, the max of the scaled logits being the
  // scaled max) a probability is one FMA and one exp2.
  float x[32];
  auto softmax = [&](int j, float (&alpha)[2]) {
    const float sc = p.scale_log2;
    const int tile0 = key0 + j * kKeys;
    const bool masked = tile0 < max(lo[0], lo[1]) || tile0 + kKeys > min(hi[0], hi[1]) || sc < 0.f;
    float mx[2] = {-INFINITY, -INFINITY};
    if (masked) {
      const int col0 = tile0 + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int half = (i / 2) % 2, col = col0 + 8 * (i / 4) + (i % 2);
        x[i] = col >= lo[half] && col < hi[half] ? s[i] * sc : -INFINITY;
        mx[half] = fmaxf(mx[half], x[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], s[i]);
      mx[0] *= sc, mx[1] *= sc;
    }
    float ref[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      for (int off = 1; off < 4; off *= 2) mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], off));
      const float next = lazy_reference(m[half], mx[half]);
      // A row with nothing visible yet keeps a finite reference so that exp2 gives 0, not NaN.
      ref[half] = next == -INFINITY ? 0.f : next;
      alpha[half] = next == m[half] ? 1.f : exp2_ftz(m[half] - ref[half]);
      m[half] = next;
    }
    if (masked) {
#pragma unroll
      for (int i = 0; i < 32; ++i) x[i] = exp2_ftz(x[i] - ref[(i / 2) % 2]);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) x[i] = exp2_ftz(fmaf(s[i], sc, -ref[(i / 2) % 2]));
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) sum[(i / 2) % 2] += x[i];
    l[0] = l[0] * alpha[0] + sum[0];
    l[1] = l[1] * alpha[1] + sum[1];
  };
  // x -> P, the A fragments of P V (16 keys per k-step).
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pf[kk][i] = MmaElem<T>::pack(x[8 * kk + 2 * i], x[8 * kk + 2 * i + 1]);
  };
  // Keys at or past key_stop are visible to no row here and get P = 0, but a non-finite V there would still
  // turn 0 * inf into NaN, so the last tile's rows past key_stop are zeroed (the whole warpgroup reads them).
  auto zero_invisible_values = [&](int j) {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
    unsigned char* v = smem + Ly::kStage0 + ring.stage(j) * Ly::kStageBytes + Ly::kV;
    const int first = key_stop - key0 - j * kKeys, per_box = (kKeys - first) * 8;  // 16-byte chunks per box
    for (int i = threadIdx.x; i < per_box * (VD / 64); i += kConsumerThreads)
      *reinterpret_cast<uint4*>(v + (i / per_box) * kBoxBytes + first * 128 + (i % per_box) * 16) =
          make_uint4(0, 0, 0, 0);
    fence_proxy_async_smem();  // the generic writes before the MMA's async-proxy reads
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
  };
  // Per tile j (its P ready): tile j+1's scores and tile j's P V are issued, in that order; once the scores
  // are in, their softmax runs while P V is still on the tensor cores; then both are waited for, the stage is
  // released, O rescaled and the next P packed, so accumulators and P are only touched once their MMA is
  // complete. The last tile is peeled off: ptxas serialises every wgmma of a kernel whose issue or wait
  // depends on a branch inside the loop.
  if (tiles > 0) {
    mbar_wait(q_full, 0);
    issue_scores(0);
    wgmma_wait<0>();
    fence_registers(s);
    float alpha[2];
    softmax(0, alpha);  // O is still 0: nothing to rescale
    pack_p();
  }
  for (int j = 0; j + 1 < tiles; ++j) {
    issue_scores(j + 1);
    issue_pv(j);
    wgmma_wait<1>();
    fence_registers(s);
    float alpha[2];
    softmax(j + 1, alpha);
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(pf);
    if (lane == 0) ring.release(j);
    if (alpha[0] != 1.f || alpha[1] != 1.f) {
#pragma unroll
      for (int b = 0; b < VD / 64; ++b)
#pragma unroll
        for (int i = 0; i < 32; ++i) o[b][i] *= alpha[(i / 2) % 2];
    }
    pack_p();
  }
  if (tiles > 0) {
    if (key0 + tiles * kKeys > key_stop) zero_invisible_values(tiles - 1);
    issue_pv(tiles - 1);
  }
  wgmma_wait<0>();
  fence_registers(o);

  constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    for (int off = 1; off < 4; off *= 2) l[half] += __shfl_xor_sync(kFull, l[half], off);
    if (tok[half] >= seq.length) continue;
    const int r = warp * 16 + lane / 4 + 8 * half;
    const int64_t row = (tok_base + tok[half]) * p.HQ + h * p.G + u.head0 + (r & (p.heads - 1));
    const bool seen = hi[half] > lo[half];
    const float inv = seen ? 1.f / l[half] : 0.f;
    T* out = p.o + row * VD + 2 * (lane % 4);
#pragma unroll
    for (int b = 0; b < VD / 64; ++b)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        *reinterpret_cast<uint32_t*>(out + b * 64 + 8 * i) =
            MmaElem<T>::pack(o[b][4 * i + 2 * half] * inv, o[b][4 * i + 2 * half + 1] * inv);
    // l >= 1 (the row's largest weight is at least 2^0 against the lazy reference): the approximate log2 is
    // within 2^-22 there.
    if (lane % 4 == 0) p.lse[row] = seen ? (m[half] + __log2f(l[half])) * kLn2 : 0.f;
  }
#endif
}

template <typename T, bool kWindow, typename F>
void with_kernel(const DeviceLayout& L, F&& f) {
  if (L.K == 192) f(attention_sm90_kernel<T, 192, 128, kWindow>, SmemLayout<192, 128>::kBytes);
  else if (L.K == 128 && L.V == 128) f(attention_sm90_kernel<T, 128, 128, kWindow>, SmemLayout<128, 128>::kBytes);
  else if (L.K == 128) f(attention_sm90_kernel<T, 128, 64, kWindow>, SmemLayout<128, 64>::kBytes);
  else if (L.V == 128) f(attention_sm90_kernel<T, 64, 128, kWindow>, SmemLayout<64, 128>::kBytes);
  else f(attention_sm90_kernel<T, 64, 64, kWindow>, SmemLayout<64, 64>::kBytes);
}

// The conditions both stages share; `key_rows` is the key tensor's rows (B * C pooled blocks or B * T tokens).
bool shape_fits(const DeviceLayout& L, const void* q, const void* k, const void* v, int64_t key_rows) {
  if (L.dtype == ElemType::F32 || L.H == 0 || L.num_seqs == 0 || key_rows == 0) return false;
  if (!sm90_forward_head_dims(L)) return false;
  const int64_t G = L.G();
  if (64 % G != 0 && G % 64 != 0) return false;
  // Tensor-map coordinates are int32, and a tile may start up to 64 rows past the end.
  if (L.B * L.T + L.max_len + 64 >= (int64_t(1) << 31) || key_rows + kKeys >= (int64_t(1) << 31)) return false;
  if (L.HQ >= (int64_t(1) << 31) || L.num_seqs > 65535 || L.H > 65535) return false;
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16)
    return false;
  if (!sm90_kernels_run(L)) return false;
  return (paper_heads(L) ? SmemLayout<192, 128>::kBytes : SmemLayout<128, 128>::kBytes) <=
         device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(max shared memory)");
}

template <bool kWindow>
void launch(void* o, float* lse, const void* q, const void* k, const void* v, const DeviceLayout& L,
            cudaStream_t s) {
  const char* name = kWindow ? "attention_sm90_kernel(window)" : "attention_sm90_kernel(compressed)";
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (Elem<T>::kTensorCore) {
      Sm90Params<T> p{};
      p.o = static_cast<T*>(o);
      p.lse = lse;
      p.seqs = L.seqs;
      p.row_tokens = L.T, p.row_chunks = L.C;
      p.HQ = int(L.HQ), p.G = int(L.G()), p.BS = L.block_size;
      // A window longer than any sequence is the plain causal one; clamping keeps t - W + 1 in int range.
      p.W = int(std::min<int64_t>(L.window, std::max<int64_t>(L.max_len, 1)));
      p.heads = int(std::min<int64_t>(L.G(), 64));
      p.tokens = 64 / p.heads;
      p.chunks = p.G / p.heads;
      while ((1 << p.heads_shift) < p.heads) ++p.heads_shift;
      p.scale_log2 = L.scale * 1.4426950408889634f;
      const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
      const uint64_t key_rows = uint64_t(kWindow ? L.B * L.T : L.B * L.C);
      const CUtensorMap map_q =
          make_tensor_map_3d(q, bf16, L.K, L.HQ, uint64_t(L.B * L.T), 64, p.heads, p.tokens, name);
      const CUtensorMap map_k = make_tensor_map_3d(k, bf16, L.K, L.H, key_rows, 64, 1, kKeys, name);
      const CUtensorMap map_v = make_tensor_map_3d(v, bf16, L.V, L.H, key_rows, 64, 1, kKeys, name);
      const int64_t units = div_up(L.max_len, p.tokens) * p.chunks;
      const dim3 grid(unsigned(units), unsigned(L.num_seqs), unsigned(L.H));
      if (grid.x == 0) return;
      with_kernel<T, kWindow>(L, [&](auto kernel, int bytes) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), name);
        kernel<<<grid, kThreads, bytes, s>>>(map_q, map_k, map_v, p);
        check_launch(name);
      });
    }
  });
}

}  // namespace

bool compressed_sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp) {
  return shape_fits(L, q, k_cmp, v_cmp, L.B * L.C);
}

bool sliding_window_sm90_fits(const DeviceLayout& L, const void* q, const void* k, const void* v) {
  return L.window > 0 && shape_fits(L, q, k, v, L.B * L.T);
}

void compressed_attention_sm90(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                               const DeviceLayout& L, cudaStream_t s) {
  launch<false>(o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s);
}

void sliding_window_sm90(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                         const DeviceLayout& L, cudaStream_t s) {
  launch<true>(o_swa, lse_swa, q, k, v, L, s);
}

}  // namespace nsa::cuda
