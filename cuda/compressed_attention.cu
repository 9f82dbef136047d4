// Compressed attention forward (nsa-spec §2.2): each query attends to the complete pooled blocks before it,
// NC(t) = floor((t + 1) / BS); o_cmp and lse_cmp (fp32). No visible block => o = 0, lse = 0.
//
// One CTA per (token tile, head chunk, sequence, kv head): its rows are the G heads of several tokens, so each
// pooled K/V tile loaded to shared memory serves the whole group (tile layout in warp_tile.cuh). q.k and p.v
// run on tensor cores (bf16/fp16: mma.m16n8k16, fp32 accumulate; fp32: three tf32 mma a product, Tf32x3) with an
// online softmax in base 2. Where that CTA would outgrow the device's shared memory (a GPU of 99 KB a CTA, sm_86 /
// sm_89: K = V = 256 in 16 bits, fp32 head dims above 128), it takes half of its warps (query rows); where even
// that does not fit (fp32 with K and V near 256 on 99 KB), the CUDA-core row kernel of attention_tile.cuh takes
// the problem (a warp a token and heads).
// Backward: for bf16/fp16 with K, V <= 128, tile by tile of 64 pooled blocks on tensor cores
// (key_block_backward.cuh); otherwise on CUDA cores, a warp per token and up to four heads of its group
// (attn::attention_backward), dk_cmp / dv_cmp by fp32 atomics.
#include <algorithm>
#include <optional>
#include <type_traits>

#include "cuda/attention_sm90.h"
#include "cuda/attention_tile.cuh"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/key_block_backward.cuh"
#include "cuda/warp_tile.cuh"

namespace nsa::cuda {
namespace {

constexpr int kBN = tile::kBlockN;

// The keys of a query, for the forward's row kernel and the backward: the complete pooled blocks c < NC(t) of its
// sequence, passed to `key` as rows of the [B, C, H, *] pooled keys and values.
struct PooledBlockKeys {
  static constexpr int kMaxRowHeads = 4;  // attn::row_heads (eight not measured here)
  int64_t BS, C, H;
  template <typename F>
  __device__ __forceinline__ void each(const QueryRow& r, F&& key) const {
    const int64_t visible = (r.t + 1) / BS, first = r.seq.batch * C + r.seq.chunk_start;
    for (int64_t c = 0; c < visible; ++c) key((first + c) * H + r.kv_head);
  }
};

struct CompressedParams {
  DeviceLayout L;
  tile::Geometry geo;
  int G = 0;
  int k_padded = 0;       // K rounded up to 16
  float scale_log2 = 0;   // scale * log2(e)
};

template <typename T>
constexpr int warps_for() { return Elem<T>::kTensorCore ? 8 : 4; }

// K rounded up to the tile kernel's 16-column k-steps.
int padded_k(const DeviceLayout& L) { return int(div_up(L.K, 16) * 16); }

// f(T, VP) for the tile kernel's instance of L: its element type and V's accumulator columns (64, 128 or 256).
template <typename F>
void dispatch_tile(const DeviceLayout& L, F&& f) {
  dispatch_elem(L.dtype, [&](auto tag) {
    if (L.V <= 64) f(tag, std::integral_constant<int, 64>{});
    else if (L.V <= 128) f(tag, std::integral_constant<int, 128>{});
    else f(tag, std::integral_constant<int, 256>{});
  });
}

// One K/V tile in shared memory, copied while no warp computes: with two CTAs an SM the other CTA's math covers
// the copy. A second buffer (the next tile's copy under this tile's math) measured no faster on an H100 (T=64k,
// HQ=64, H=4, K=V=128: 6.66-6.67 ms against 6.56-6.61), and at K = V = 128 its 102 KB CTA is one an SM on an
// A100 (9.62 ms, an H100 held to that) and at 256 more than an A100's CTA may have.
template <typename T, int VP>
int smem_bytes(int warps, int k_padded) {
  const int ks = tile::smem_stride<T>(k_padded), vs = tile::smem_stride<T>(VP);
  return (16 * warps * ks + kBN * (ks + vs)) * int(sizeof(T));
}

// The most warps a CTA, warps_for<T>() or half of it (fewer query rows beside the same K/V tile: a GPU of 99 KB a
// CTA holds K = V = 256 in 16 bits with 4, an A100 fp32 at K = V = 256 with 2), whose CTA fits `per_cta` bytes; 0
// where neither does.
template <typename T, int VP>
int tile_warps(int k_padded, int64_t per_cta) {
  for (int warps = warps_for<T>(); warps >= warps_for<T>() / 2; warps /= 2)
    if (smem_bytes<T, VP>(warps, k_padded) <= per_cta) return warps;
  return 0;
}

// Preconditions: K <= k_padded <= 256, V <= VP, G >= 1, the grid is (geo.tiles_x, num_seqs, H).
// Two CTAs per SM where the accumulators allow it (VP <= 128): a CTA waiting at a barrier or on its next
// tile's copy leaves the tensor cores to the other.
template <typename T, int VP, int W>
__global__ void __launch_bounds__(W * 32, VP <= 128 ? 2 : 1)
    compressed_attention_kernel(T* __restrict__ o_cmp,             // [B, T, HQ, V]
                                float* __restrict__ lse_cmp,       // [B, T, HQ]
                                const T* __restrict__ q,           // [B, T, HQ, K]
                                const T* __restrict__ k_cmp,       // [B, C, H, K]
                                const T* __restrict__ v_cmp,       // [B, C, H, V]
                                const CompressedParams P) {
  constexpr int ROWS = 16 * W;
  const DeviceLayout& L = P.L;
  const DeviceSequence seq = L.seqs[blockIdx.y];
  // Late tokens see the most blocks: launch them first so the short tiles fill the tail.
  const int bx = gridDim.x - 1 - blockIdx.x;
  const int tile_idx = bx / P.geo.head_chunks, hc = bx % P.geo.head_chunks;
  const int64_t t0 = int64_t(tile_idx) * P.geo.tpt;
  if (t0 >= seq.length) return;
  const int h = blockIdx.z, G = P.G, hpt = P.geo.hpt, BS = L.block_size;
  const int64_t K = L.K, V = L.V, HQ = L.HQ, H = L.H;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ks = tile::smem_stride<T>(P.k_padded), vs = tile::smem_stride<T>(VP);
  T* Qs = reinterpret_cast<T*>(smem_raw);     // [ROWS][ks]
  T* Ks = Qs + ROWS * ks;                     // [kBN][ks]
  T* Vs = Ks + kBN * ks;                      // [kBN][vs]

  // Row r of the tile is token t0 + r / hpt, query head h * G + hc * hpt + r % hpt.
  auto row_token = [&](int r) { return t0 + r / hpt; };
  auto row_valid = [&](int r) {
    return r / hpt < P.geo.tpt && row_token(r) < seq.length && hc * hpt + r % hpt < G;
  };
  const int64_t tok_base = seq.batch * L.T + seq.start;  // flat token of the sequence's first position
  tile::load_rows(Qs, ks, ROWS, int(K), P.k_padded, [&](int r) -> const T* {
    if (!row_valid(r)) return nullptr;
    return q + ((tok_base + row_token(r)) * HQ + h * G + hc * hpt + r % hpt) * K;
  });

  const int64_t last_token = min(t0 + P.geo.tpt, seq.length) - 1;
  const int nc_max = int((last_token + 1) / BS);
  const int64_t chunk_base = seq.batch * L.C + seq.chunk_start;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_a = warp * 16 + lane / 4, row_b = row_a + 8;
  const int nc_a = row_valid(row_a) ? int((row_token(row_a) + 1) / BS) : 0;
  const int nc_b = row_valid(row_b) ? int((row_token(row_b) + 1) / BS) : 0;
  // Rows are ordered by token, so the warp's last valid row sees the most blocks.
  int warp_nc = max(nc_a, nc_b);
  for (int off = 16; off > 0; off /= 2) warp_nc = max(warp_nc, __shfl_xor_sync(0xffffffffu, warp_nc, off));

  float o[VP / 8][4];
#pragma unroll
  for (int j = 0; j < VP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  // Issues the copies of pooled tile `c0`.
  auto load_tile = [&](int c0) {
    auto pooled = [&](const T* base, int64_t dim) {
      return [=](int r) -> const T* { return c0 + r < nc_max ? base + ((chunk_base + c0 + r) * H + h) * dim : nullptr; };
    };
    tile::load_rows(Ks, ks, kBN, int(K), P.k_padded, pooled(k_cmp, K));
    tile::load_rows(Vs, vs, kBN, int(V), VP, pooled(v_cmp, V));
    cp_async_commit();
  };
  if (nc_max > 0) load_tile(0);
  for (int c0 = 0; c0 < nc_max; c0 += kBN) {
    if (c0 > 0) {
      __syncthreads();  // every warp is done with the previous tile
      load_tile(c0);
    }
    cp_async_wait<0>();  // the tile (and Q) landed: the only copies in flight
    __syncthreads();     // ... for every warp
    if (c0 >= warp_nc) continue;

    float s[kBN / 8][4];
    tile::warp_scores<T, kBN>(s, Qs, Ks, ks, warp * 16, P.k_padded, lane);
    const int col0 = c0 + (lane % 4) * 2;
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = col0 + j * 8 + (e & 1);
        const bool visible = col < (e < 2 ? nc_a : nc_b);
        s[j][e] = visible ? s[j][e] * P.scale_log2 : -INFINITY;
        if (e < 2) mx_a = fmaxf(mx_a, s[j][e]);
        else mx_b = fmaxf(mx_b, s[j][e]);
      }
    for (int off = 1; off < 4; off *= 2) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    const float new_a = lazy_reference(m_a, mx_a), new_b = lazy_reference(m_b, mx_b);
    // A row with nothing visible yet keeps a finite reference so that exp2 gives 0, not NaN.
    const float ref_a = new_a == -INFINITY ? 0.f : new_a, ref_b = new_b == -INFINITY ? 0.f : new_b;
    const float alpha_a = new_a == m_a ? 1.f : exp2_ftz(m_a - ref_a), alpha_b = new_b == m_b ? 1.f : exp2_ftz(m_b - ref_b);
    m_a = new_a;
    m_b = new_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      s[j][0] = exp2_ftz(s[j][0] - ref_a);
      s[j][1] = exp2_ftz(s[j][1] - ref_a);
      s[j][2] = exp2_ftz(s[j][2] - ref_b);
      s[j][3] = exp2_ftz(s[j][3] - ref_b);
      sum_a += s[j][0] + s[j][1];
      sum_b += s[j][2] + s[j][3];
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    // Rescale only when some row's reference moved (lazy_reference): O is VP / 2 registers.
    if (!__all_sync(0xffffffffu, alpha_a == 1.f && alpha_b == 1.f)) {
#pragma unroll
      for (int j = 0; j < VP / 8; ++j) {
        o[j][0] *= alpha_a;
        o[j][1] *= alpha_a;
        o[j][2] *= alpha_b;
        o[j][3] *= alpha_b;
      }
    }
    tile::warp_pv<T, kBN, VP>(o, s, Vs, vs, lane);
  }

  cp_async_wait<0>();  // Q's copies when no block is visible

  for (int off = 1; off < 4; off *= 2) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  constexpr float kLn2 = 0.693147180559945309f;
  const float inv_a = nc_a > 0 ? 1.f / l_a : 0.f, inv_b = nc_b > 0 ? 1.f / l_b : 0.f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? row_b : row_a;
    if (!row_valid(r)) continue;
    const int64_t row_off = (tok_base + row_token(r)) * HQ + h * G + hc * hpt + r % hpt;
    const float inv = half ? inv_b : inv_a;
    T* out = o_cmp + row_off * V;
#pragma unroll
    for (int j = 0; j < VP / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      if (col < V) out[col] = Elem<T>::from_float(o[j][2 * half] * inv);
      if (col + 1 < V) out[col + 1] = Elem<T>::from_float(o[j][2 * half + 1] * inv);
    }
    if (lane % 4 == 0) {
      const int nc = half ? nc_b : nc_a;
      const float m = half ? m_b : m_a, l = half ? l_b : l_a;
      lse_cmp[row_off] = nc > 0 ? (m + log2f(l)) * kLn2 : 0.f;
    }
  }
}

template <typename T, int VP, int W>
void launch(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp, const DeviceLayout& L,
            cudaStream_t s) {
  CompressedParams P;
  P.L = L;
  P.G = int(L.HQ / L.H);
  P.geo = tile::make_geometry(P.G, 16 * W, L.max_len);
  P.k_padded = padded_k(L);
  P.scale_log2 = L.scale * 1.4426950408889634f;
  if (P.geo.tiles_x == 0 || L.num_seqs == 0) return;
  const int bytes = smem_bytes<T, VP>(W, P.k_padded);
  auto kernel = compressed_attention_kernel<T, VP, W>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute(compressed_attention_kernel)");
  const dim3 grid(P.geo.tiles_x, L.num_seqs, unsigned(L.H));
  kernel<<<grid, W * 32, bytes, s>>>(static_cast<T*>(o_cmp), lse_cmp, static_cast<const T*>(q),
                                     static_cast<const T*>(k_cmp), static_cast<const T*>(v_cmp), P);
  check_launch("compressed_attention_kernel");
}

// launch<T, VP, warps> for warps in {W, W / 2}.
template <typename T, int VP, int W>
void launch_warps(int warps, void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                  const DeviceLayout& L, cudaStream_t s) {
  if constexpr (W > warps_for<T>() / 2)
    if (warps < W) return launch_warps<T, VP, W / 2>(warps, o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s);
  launch<T, VP, W>(o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s);
}

// The key-block backward's work: tiles of kTileKeys pooled blocks of a sequence, each with the tokens that see
// one of its blocks, [(c0 + 1) BS - 1, length), in chunks of tokens_per_cta positions; a CTA of the grid (kv
// head, sequence, token chunk, tile) with no such tokens returns at once. Tiles vary fastest, so that the CTAs
// running together share their tokens' q, do and dq rows in L2.
struct PooledTiles {
  static constexpr int kTileKeys = 64;
  DeviceLayout L;
  int64_t tiles, chunks;  // per sequence, at most
  int tokens_per_cta;
  __device__ __forceinline__ bool tile(int64_t cta, kbb::KeyTile& w) const {
    const int64_t tile = cta % tiles, chunk = cta / tiles % chunks, rest = cta / tiles / chunks;
    const DeviceSequence seq = L.seqs[rest % L.num_seqs];
    w.h = int(rest / L.num_seqs);
    w.key0 = tile * kTileKeys;
    const int64_t complete = seq.length / L.block_size;
    w.first = max(chunk * tokens_per_cta, (w.key0 + 1) * L.block_size - 1);
    const int64_t end = min((chunk + 1) * tokens_per_cta, seq.length);
    if (w.key0 >= complete || w.first >= end) return false;
    w.nkeys = int(min(int64_t(kTileKeys), complete - w.key0));
    w.ntok = int(end - w.first);
    w.query_base = seq.batch * L.T + seq.start;
    w.key_row0 = seq.batch * L.C + seq.chunk_start + w.key0;
    return true;
  }
  __device__ __forceinline__ int64_t token(const kbb::KeyTile& w, int i) const { return w.first + i; }
  __device__ __forceinline__ bool sees(int64_t t, int64_t c) const { return (c + 1) * L.block_size <= t + 1; }
};

// The key-block backward's work on this problem; none where the tensor-core path does not apply.
struct PooledPlan {
  PooledTiles src;
  kbb::StepGeometry geo;
  int64_t ctas;
};
std::optional<PooledPlan> pooled_plan(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp) {
  if (!kbb::fits(L, PooledTiles::kTileKeys, q, k_cmp, v_cmp)) return std::nullopt;
  // Every token chunk adds into the same few pooled dK / dV rows, so long sequences take up to eight times the
  // base steps a CTA (H100, 64k tokens: 16.0 ms at 1x, 14.2 at 4x, 12.3 at 8x); short ones keep the CTAs that
  // fill the GPU (8k: 0.67 ms at 1x, 0.71 at 4x).
  const int steps = kbb::kStepsPerCta * int(std::clamp<int64_t>(L.max_len / 8192, 1, 8));
  const kbb::StepGeometry geo = kbb::step_geometry(L.G(), steps);
  const int64_t max_len = std::max<int64_t>(L.max_len, 1);
  const PooledTiles src{L, div_up(max_len / L.block_size, PooledTiles::kTileKeys), div_up(max_len, geo.tokens_per_cta),
                        geo.tokens_per_cta};
  const int64_t ctas = L.H * L.num_seqs * src.tiles * src.chunks;
  if (ctas >= (int64_t(1) << 31)) return std::nullopt;
  return PooledPlan{src, geo, ctas};
}

}  // namespace

bool compressed_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp) {
  return pooled_plan(L, q, k_cmp, v_cmp).has_value();
}

void compressed_attention_backward(float* dq, float* dk_cmp, float* dv_cmp, BranchGrad do_cmp, const void* q,
                                   const void* k_cmp, const void* v_cmp, const void* o_cmp, const float* lse_cmp,
                                   const DeviceLayout& L, cudaStream_t s) {
  if (const std::optional<PooledPlan> plan = pooled_plan(L, q, k_cmp, v_cmp)) {
    if (L.B * L.T * L.HQ == 0 || L.num_seqs == 0) return;
    const kbb::PreparedRows rows(L, do_cmp, o_cmp, s);
    kbb::launch<PooledTiles::kTileKeys>(dq, dk_cmp, dv_cmp, rows, q, k_cmp, v_cmp, lse_cmp, plan->src,
                                        PooledTiles::kTileKeys, plan->ctas, plan->geo, L, s,
                                        "key_block_backward_kernel (compressed attention)");
    return;
  }
  const PooledBlockKeys keys{L.block_size, L.C, L.H};
  const char* name = "attention_backward_kernel (compressed attention)";
  attn::attention_backward(dq, dk_cmp, dv_cmp, fp32_grad(do_cmp, name), q, k_cmp, v_cmp, o_cmp, lse_cmp, keys, L, s,
                           name);
}

int compressed_tile_smem_bytes(const DeviceLayout& L) {
  int bytes = 0;
  dispatch_tile(L, [&](auto tag, auto vp) {
    using T = decltype(tag);
    bytes = smem_bytes<T, decltype(vp)::value>(warps_for<T>(), padded_k(L));
  });
  return bytes;
}

int compressed_tile_warps(const DeviceLayout& L, SmemBudget budget) {
  int warps = 0;
  dispatch_tile(L, [&](auto tag, auto vp) {
    warps = tile_warps<decltype(tag), decltype(vp)::value>(padded_k(L), budget.per_cta);
  });
  return warps;
}

void compressed_attention_forward(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                                  const DeviceLayout& L, cudaStream_t s) {
  compressed_attention_forward(o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s, KernelChoice::Auto);
}

void compressed_attention_forward(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                                  const DeviceLayout& L, cudaStream_t s, KernelChoice choice) {
  if (choice == KernelChoice::Auto && compressed_sm90_fits(L, q, k_cmp, v_cmp)) {
    compressed_attention_sm90(o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s);
    return;
  }
  if (const int warps = compressed_tile_warps(L, device_budget(L))) {
    dispatch_tile(L, [&](auto tag, auto vp) {
      using T = decltype(tag);
      launch_warps<T, decltype(vp)::value, warps_for<T>()>(warps, o_cmp, lse_cmp, q, k_cmp, v_cmp, L, s);
    });
    return;
  }
  dispatch_elem(L.dtype, [&](auto tag) {
    attn::AttentionParams<decltype(tag)> p{};
    p.set_inputs(q, k_cmp, v_cmp, o_cmp, lse_cmp, L);
    attn::launch_row_attention(p, PooledBlockKeys{L.block_size, L.C, L.H}, L, s,
                               "row_attention_kernel (compressed attention)");
  });
}

}  // namespace nsa::cuda
