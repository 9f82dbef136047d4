// Sliding-window attention forward (nsa-spec §2.5): token t (within its sequence) attends keys
// [max(0, t-W+1), t] (FlashAttention's window_size = (W-1, 0), causal); o and natural-log lse as in §2.4.
//
// On sm_90, bf16/fp16 with K and V in {64, 128} and G dividing 64 or a multiple of 64 run the warpgroup kernel
// of attention_sm90.cu instead. Tensor-core path (fp32 too, as three tf32 products): the tile machinery of
// attention_tile.cuh over the contiguous key range [max(0, t_first-W+1), t_last] of a CTA's tokens, in key tiles
// of kBN; rows mask keys outside their own window only on tiles that straddle a window edge. The CUDA-core row
// kernel takes what the tiles cannot: rows that are not 16-byte multiples, tiles beyond the device's shared memory.
//
// Backward: for bf16/fp16 with K, V <= 128, key block by key block on tensor cores (key_block_backward.cuh), the
// tokens of a block being those whose window reaches it; otherwise on CUDA cores, a warp per token and up to four
// heads of its group (attn::attention_backward), dk / dv by fp32 atomics.
//
// FLOPs: 2 * sum over query rows of (keys in the row's window) * (K + V).
#include <algorithm>

#include "cuda/attention_sm90.h"
#include "cuda/attention_tile.cuh"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/key_block_backward.cuh"

namespace nsa::cuda {
namespace {

using attn::RowMap;
using attn::TileShape;
using attn::TileSmem;
using attn::WarpAttention;

template <typename T>
struct WindowParams : attn::AttentionParams<T> {
  int W;
};

constexpr int kWarps = 4;

// The contiguous key tiles of a CTA and the per-row window masks.
template <typename Shape>
struct WindowKeys {
  static constexpr int kBN = Shape::kBN;
  static constexpr int kR = 2 * Shape::kMT;
  int first_key, last_key, W;
  int t_row[kR];
  bool row_any[kR];  // padding row: sees everything (its output is dropped)
  const int* cur_pos = nullptr;

  __device__ __forceinline__ int count() const { return (last_key - first_key + kBN) / kBN; }
  __device__ __forceinline__ void describe(int i, int* key_pos, int* key_slot) const {
    const int j = threadIdx.x;
    if (j >= kBN) return;
    const int pos = first_key + i * kBN + j;
    key_pos[j] = pos <= last_key ? pos : -1;
    key_slot[j] = 0;
  }
  __device__ __forceinline__ bool begin(int i, const int* key_pos, const int*) {
    cur_pos = key_pos;
    const int lo = first_key + i * kBN, hi = lo + kBN - 1;
    bool need = hi > last_key;
#pragma unroll
    for (int ri = 0; ri < kR; ++ri)
      if (!row_any[ri]) need |= hi > t_row[ri] || lo <= t_row[ri] - W;
    return need;
  }
  __device__ __forceinline__ bool valid(int ri, int col) const {
    if (row_any[ri]) return true;
    const int pos = cur_pos[col];
    return pos >= 0 && pos <= t_row[ri] && pos > t_row[ri] - W;
  }
};

template <typename T, int D, int kMT, int kStages>
__global__ void __launch_bounds__(32 * kWarps) sliding_window_tc_kernel(const WindowParams<T> p) {
  using Shape = TileShape<T, D, kWarps, kMT, kStages>;
  extern __shared__ __align__(16) unsigned char smem[];
  TileSmem<T, Shape> sm(smem);

  const DeviceSequence seq = p.seqs[blockIdx.y];
  const int t0 = blockIdx.x * p.tokens_per_tile;
  if (t0 >= seq.length) return;
  const int ntok = int(min(int64_t(p.tokens_per_tile), seq.length - t0));
  const int kv_head = blockIdx.z / p.head_chunks;
  const int64_t key_base = seq.batch * p.row_tokens + seq.start;
  const RowMap rows{key_base + t0, ntok, p.heads_per_tile,
                    kv_head * p.G + int(blockIdx.z % p.head_chunks) * p.heads_per_tile, (kv_head + 1) * p.G};
  attn::load_q_tile<T, Shape>(sm.q, p.q, rows, p.HQ, p.K);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const T* sq_warp = sm.q + warp * Shape::kWarpRows * Shape::kStride;
  using WA = WarpAttention<T, Shape>;
  WA wa;
  wa.init(sq_warp);

  WindowKeys<Shape> keys;
  keys.W = p.W;
  keys.last_key = t0 + ntok - 1;
  keys.first_key = max(0, t0 - p.W + 1);
#pragma unroll
  for (int ri = 0; ri < WA::kR; ++ri) {
    const int r = warp * Shape::kWarpRows + WA::warp_row(ri);
    const bool ok = rows.valid(r);
    keys.row_any[ri] = !ok;
    keys.t_row[ri] = t0 + (ok ? rows.token(r) : 0);
  }
  attn::attend_key_tiles<T, Shape>(wa, sm, sq_warp, keys, p.k, p.v, key_base, kv_head, p.H, p.K, p.V,
                                   p.scale * attn::kLog2e);
  wa.store(p.o, p.lse, p.V, p.HQ, rows, warp * Shape::kWarpRows);
}

// The keys of a query in the window: [max(0, t - W + 1), t] of its sequence, passed to `key` as rows of the
// [*, H, K] / [*, H, V] keys and values; for the forward's row kernel (attn::row_attention_kernel) and the backward
// (attention_backward's keys).
struct WindowRowKeys {
  static constexpr int kMaxRowHeads = 4;  // attn::row_heads
  int W, H;
  template <typename F>
  __device__ __forceinline__ void each(const QueryRow& r, F&& key) const {
    for (int64_t pos = r.t - W + 1 > 0 ? r.t - W + 1 : 0; pos <= r.t; ++pos) key((r.key_base + pos) * H + r.kv_head);
  }
};

// The key-block backward's work: key block i's tokens, [key0, min(length, key0 + BS + W - 1)) (those whose
// window reaches a key of the block), in ctas_per_block CTAs of tokens_per_cta.
struct WindowTokens {
  DeviceLayout L;
  int64_t W;  // clamped to the longest sequence
  int tokens_per_cta, ctas_per_block;
  __device__ __forceinline__ bool tile(int64_t cta, kbb::KeyTile& w) const {
    const int64_t length = kbb::locate_block(cta / ctas_per_block, L, w);
    w.first = w.key0 + cta % ctas_per_block * tokens_per_cta;
    const int64_t end = min(length, w.key0 + L.block_size + W - 1);
    if (w.first >= end) return false;
    w.ntok = int(min(int64_t(tokens_per_cta), end - w.first));
    return true;
  }
  __device__ __forceinline__ int64_t token(const kbb::KeyTile& w, int i) const { return w.first + i; }
  __device__ __forceinline__ bool sees(int64_t t, int64_t pos) const { return pos <= t && pos > t - W; }
};

}  // namespace

bool sliding_window_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k, const void* v) {
  return kbb::fits(L, L.block_size, q, k, v);
}

void sliding_window_backward(float* dq, float* dk, float* dv, BranchGrad do_swa, const void* q, const void* k,
                             const void* v, const void* o_swa, const float* lse_swa, const DeviceLayout& L,
                             cudaStream_t s) {
  if (L.window <= 0) return;
  if (sliding_window_backward_takes_gated(L, q, k, v)) {
    if (L.B * L.T * L.HQ == 0 || L.num_seqs == 0) return;
    // Twice the base steps a CTA (H100, 8k, W=512: 2.03 ms at 1x, 1.74-1.81 at 2x, 2.24 at 4x, where a block's
    // window is left with three CTAs).
    const kbb::StepGeometry geo = kbb::step_geometry(L.G(), 2 * kbb::kStepsPerCta);
    const int64_t W = std::min<int64_t>(L.window, std::max<int64_t>(L.max_len, 1));
    const int ctas_per_block = int(div_up(L.block_size + W - 1, geo.tokens_per_cta));
    const WindowTokens src{L, W, geo.tokens_per_cta, ctas_per_block};
    const kbb::PreparedRows rows(L, do_swa, o_swa, s);
    kbb::launch(dq, dk, dv, rows, q, k, v, lse_swa, src, L.block_size, L.H * L.B * L.C * ctas_per_block, geo, L,
                s, "key_block_backward_kernel (sliding window)");
    return;
  }
  const WindowRowKeys keys{L.window, int(L.H)};
  const char* name = "attention_backward_kernel (sliding window)";
  attn::attention_backward(dq, dk, dv, fp32_grad(do_swa, name), q, k, v, o_swa, lse_swa, keys, L, s, name);
}

void sliding_window_forward(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                            const DeviceLayout& L, cudaStream_t s) {
  sliding_window_forward(o_swa, lse_swa, q, k, v, L, s, KernelChoice::Auto);
}

void sliding_window_forward(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                            const DeviceLayout& L, cudaStream_t s, KernelChoice choice) {
  if (L.window <= 0 || L.B * L.T == 0 || L.HQ == 0) return;
  if (choice == KernelChoice::Auto && sliding_window_sm90_fits(L, q, k, v)) {
    sliding_window_sm90(o_swa, lse_swa, q, k, v, L, s);
    return;
  }
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    WindowParams<T> p{};
    p.set_inputs(q, k, v, o_swa, lse_swa, L);
    // A window longer than any sequence is the plain causal one; clamping keeps t - W + 1 in int range.
    p.W = int(std::min<int64_t>(L.window, std::max<int64_t>(L.max_len, 1)));
    const TileChoice tile = attn::tensor_core_path(L, q, k, v, o_swa) && L.num_seqs > 0
                                ? sliding_window_tile(L, device_budget(L))
                                : TileChoice{};
    if (tile.stages) {
      auto launch = [&](auto dim, auto mt, auto stages) {
        constexpr int D = decltype(dim)::value, kMT = decltype(mt)::value, kStages = decltype(stages)::value;
        using Shape = TileShape<T, D, kWarps, kMT, kStages>;
        const auto kernel = sliding_window_tc_kernel<T, D, kMT, kStages>;
        const dim3 grid = p.set_tiles(Shape::kRows, L, "sliding_window_tc_kernel");
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(tile.bytes)),
                   "cudaFuncSetAttribute(sliding_window_tc_kernel)");
        kernel<<<grid, Shape::kThreads, tile.bytes, s>>>(p);
        check_launch("sliding_window_tc_kernel");
      };
      attn::dispatch_head_dim(attn::head_dim_bucket(L.K, L.V), [&](auto dim) {
        attn::dispatch_tile<T, decltype(dim)::value>(tile, [&](auto mt, auto stages) { launch(dim, mt, stages); });
      });
      return;
    }
    attn::launch_row_attention(p, WindowRowKeys{p.W, p.H}, L, s, "row_attention_kernel (sliding window)");
  });
}

TileChoice sliding_window_tile(const DeviceLayout& L, SmemBudget budget) {
  return attn::choose_tile<kWarps>(L, budget, [](int) { return int64_t(0); });
}

}  // namespace nsa::cuda
