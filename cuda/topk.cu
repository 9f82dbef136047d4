// Top-k block selection (nsa-spec §2.3), seed and paper policies.
//
// The scores are the group's summed probabilities p = exp(z - lse_cmp) over pooled blocks, with z computed by
// the same warp tiles, in the same order, as the compressed-attention pass (warp_tile.cuh), so they come from
// the very logits that produced lse_cmp. One CTA per (token tile, head chunk, sequence, kv head) walks the
// pooled blocks in tiles of 64: the warps add each head's p into a shared [tokens x 64] score tile, then one
// warp per token merges the tile into that token's running top-S list. Blocks arrive in increasing index, so
// a new block enters only when it beats the current S-th best; the list and the few entrants are ranked by
// score, then forced before not forced (a forced block is always chosen, also when an ordinary block ties
// with it exactly, e.g. the only visible block of a group, p = 1 per head), then the smaller index. The
// output slots are the chosen blocks by score descending, ties to the smaller index.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/warp_tile.cuh"

namespace nsa::cuda {
namespace {

constexpr int kBN = tile::kBlockN;
constexpr int kMaxS = 64;  // selected blocks per query the list buffers hold

struct TopkParams {
  DeviceLayout L;
  tile::Geometry geo;
  int G = 0;
  int k_padded = 0;
  float scale_log2 = 0;
  int stages = 1;  // K tiles in flight: 2 when shared memory allows (the next tile's copy overlaps this one's math)
};

template <typename T>
constexpr int warps_for() { return Elem<T>::kTensorCore ? 8 : 4; }

// Shared memory: Q tile, K tile, score tile [tpt][kBN], lists [tpt][S] (score, index) + counts, and one merge
// scratch of S + kBN entries per warp.
template <typename T>
int smem_bytes(int k_padded, int tpt, int S, int stages) {
  constexpr int W = warps_for<T>();
  const int ks = tile::smem_stride<T>(k_padded);
  int bytes = (16 * W * ks + stages * kBN * ks) * int(sizeof(T));
  bytes += tpt * kBN * 4 + tpt * S * 8 + tpt * 4 + W * (S + kBN) * 8;
  return bytes;
}

// List entries hold the block index with kForcedBit set for forced blocks.
constexpr int kForcedBit = 1 << 30;
__device__ __forceinline__ int block_of(int key) { return key & (kForcedBit - 1); }

// Membership order: higher score, then forced, then the smaller block.
__device__ __forceinline__ bool beats(float sa, int ka, float sb, int kb) {
  if (sa != sb) return sa > sb;
  const bool fa = ka & kForcedBit, fb = kb & kForcedBit;
  if (fa != fb) return fa;
  return block_of(ka) < block_of(kb);
}
// Output order: higher score, then the smaller block.
__device__ __forceinline__ bool precedes(float sa, int ka, float sb, int kb) {
  return sa > sb || (sa == sb && block_of(ka) < block_of(kb));
}

template <typename T>
__global__ void __launch_bounds__(warps_for<T>() * 32)
    topk_kernel(int32_t* __restrict__ block_indices,  // [B, T, H, S]
                const T* __restrict__ q,              // [B, T, HQ, K]
                const T* __restrict__ k_cmp,          // [B, C, H, K]
                const float* __restrict__ lse_cmp,    // [B, T, HQ]
                const TopkParams P) {
  constexpr int W = warps_for<T>(), ROWS = 16 * W;
  constexpr float kLog2e = 1.4426950408889634f;
  const DeviceLayout& L = P.L;
  const DeviceSequence seq = L.seqs[blockIdx.y];
  const int64_t t0 = int64_t(blockIdx.x) * P.geo.tpt;  // one CTA covers every head chunk of its tokens
  if (t0 >= seq.length) return;
  const int h = blockIdx.z, G = P.G, hpt = P.geo.hpt, tpt = P.geo.tpt, BS = L.block_size, S = L.block_count;
  const int64_t K = L.K, HQ = L.HQ, H = L.H;
  const bool paper = L.paper_policy;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ks = tile::smem_stride<T>(P.k_padded);
  T* Qs = reinterpret_cast<T*>(smem_raw);                      // [ROWS][ks]
  T* Ks0 = Qs + ROWS * ks;                                     // [stages][kBN][ks]
  float* score = reinterpret_cast<float*>(Ks0 + P.stages * kBN * ks);  // [tpt][kBN]
  float* list_score = score + tpt * kBN;                       // [tpt][S]
  int* list_idx = reinterpret_cast<int*>(list_score + tpt * S);  // [tpt][S]
  int* list_count = list_idx + tpt * S;                        // [tpt]
  float* scratch_score = reinterpret_cast<float*>(list_count + tpt);  // [W][S + kBN]
  int* scratch_idx = reinterpret_cast<int*>(scratch_score + W * (S + kBN));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tok_base = seq.batch * L.T + seq.start;
  const int64_t chunk_base = seq.batch * L.C + seq.chunk_start;
  const int64_t last_token = min(t0 + tpt, seq.length) - 1;
  const int nc_max = int((last_token + 1) / BS), cur_max = int(last_token / BS);
  for (int i = threadIdx.x; i < tpt; i += blockDim.x) list_count[i] = 0;

  auto row_token = [&](int r) { return t0 + r / hpt; };
  auto load_q = [&](int hc) {
    tile::load_rows(Qs, ks, ROWS, int(K), P.k_padded, [&](int r) -> const T* {
      if (r / hpt >= tpt || row_token(r) >= seq.length || hc * hpt + r % hpt >= G) return nullptr;
      return q + ((tok_base + row_token(r)) * HQ + h * G + hc * hpt + r % hpt) * K;
    });
  };
  if (P.geo.head_chunks == 1) load_q(0);  // its copies join the first tile's group
  auto load_k = [&](int c0, int stage) {
    tile::load_rows(Ks0 + stage * kBN * ks, ks, kBN, int(K), P.k_padded, [&](int r) -> const T* {
      return c0 + r < nc_max ? k_cmp + ((chunk_base + c0 + r) * H + h) * K : nullptr;
    });
    tile::cp_async_commit();
  };
  load_k(0, 0);

  const int row_a = warp * 16 + lane / 4, row_b = row_a + 8;
  // With hpt a multiple of 16 all 16 rows of a warp are heads of one token and the warp can add its rows up
  // before touching shared memory.
  const bool warp_one_token = hpt % 16 == 0;

  for (int it = 0, c0 = 0; c0 <= cur_max; ++it, c0 += kBN) {
    __syncthreads();  // previous tile merged, its K buffer free
    if (P.stages == 1) {
      if (it > 0) load_k(c0, 0);
      tile::cp_async_wait<0>();
    } else if (c0 + kBN <= cur_max) {
      load_k(c0 + kBN, (it + 1) % 2);
      tile::cp_async_wait<1>();
    } else {
      tile::cp_async_wait<0>();
    }
    const T* Ks = Ks0 + (it % P.stages) * kBN * ks;
    for (int i = threadIdx.x; i < tpt * kBN; i += blockDim.x) score[i] = 0.f;

    for (int hc = 0; hc < P.geo.head_chunks; ++hc) {
      if (P.geo.head_chunks > 1) {
        __syncthreads();
        load_q(hc);
        tile::cp_async_commit();
        tile::cp_async_wait<0>();
      }
      __syncthreads();
      // Per row: token, candidate limit (blocks c < limit are scored; forced ones are set at the merge) and lse.
      int lim[2];
      float lse2[2];
      int tl[2];
      for (int half = 0; half < 2; ++half) {
        const int r = half ? row_b : row_a;
        const bool valid = r / hpt < tpt && row_token(r) < seq.length && hc * hpt + r % hpt < G;
        tl[half] = r / hpt;
        lim[half] = 0;
        lse2[half] = 0.f;
        if (valid) {
          const int64_t t = row_token(r);
          lim[half] = paper ? int((t + 1) / BS) : int(t / BS);
          lse2[half] = lse_cmp[(tok_base + t) * HQ + h * G + hc * hpt + r % hpt] * kLog2e;
        }
      }
      int warp_lim = max(lim[0], lim[1]);
      for (int off = 16; off > 0; off /= 2) warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, off));
      if (c0 >= warp_lim) continue;

      float s[kBN / 8][4];
      tile::warp_scores<T, kBN>(s, Qs, Ks, ks, warp * 16, P.k_padded, lane);
      const int col0 = (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2, col = c0 + col0 + j * 8 + (e & 1);
          s[j][e] = col < lim[half] ? exp2f(s[j][e] * P.scale_log2 - lse2[half]) : 0.f;
        }
      if (warp_one_token) {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = s[j][e] + s[j][e + 2];
            for (int off = 4; off < 32; off *= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane < 4 && c0 + col0 + j * 8 + e < lim[0]) atomicAdd(&score[tl[0] * kBN + col0 + j * 8 + e], v);
          }
      } else {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (s[j][e] != 0.f) atomicAdd(&score[tl[e / 2] * kBN + col0 + j * 8 + (e & 1)], s[j][e]);
      }
    }
    __syncthreads();

    // Merge: one warp per token.
    float* sc_s = scratch_score + warp * (S + kBN);
    int* sc_i = scratch_idx + warp * (S + kBN);
    for (int tl = warp; tl < tpt; tl += W) {
      const int64_t t = t0 + tl;
      if (t >= seq.length) break;
      const int cur = int(t / BS), nc = int((t + 1) / BS);
      if (c0 > cur) continue;
      const int count = list_count[tl];
      const float thr = count == S ? list_score[tl * S + S - 1] : -INFINITY;
      const int thr_key = count == S ? list_idx[tl * S + S - 1] : 0;
      int entered = 0;
      for (int base = 0; base < kBN; base += 32) {
        const int i = base + lane, c = c0 + i;
        bool cand = false, forced = false;
        float value = 0.f;
        if (paper) {
          forced = c == 0 || c == cur || (cur >= 1 && c == cur - 1);
          cand = forced || c < nc;
          value = forced ? 1.f : score[tl * kBN + i] / float(G);
        } else {
          forced = c == cur;
          cand = c <= cur;
          value = forced ? float(G) : score[tl * kBN + i];
        }
        const int key = c | (forced ? kForcedBit : 0);
        const bool enters = cand && (count < S || beats(value, key, thr, thr_key));
        const unsigned mask = __ballot_sync(0xffffffffu, enters);
        if (enters) {
          const int pos = count + entered + __popc(mask & ((1u << lane) - 1));
          sc_s[pos] = value;
          sc_i[pos] = key;
        }
        entered += __popc(mask);
      }
      if (entered == 0) continue;
      for (int i = lane; i < count; i += 32) {
        sc_s[i] = list_score[tl * S + i];
        sc_i[i] = list_idx[tl * S + i];
      }
      __syncwarp();
      const int m = count + entered;
      for (int i = lane; i < m; i += 32) {
        int rank = 0;
        for (int j = 0; j < m; ++j) rank += beats(sc_s[j], sc_i[j], sc_s[i], sc_i[i]);
        if (rank < S) {
          list_score[tl * S + rank] = sc_s[i];
          list_idx[tl * S + rank] = sc_i[i];
        }
      }
      if (lane == 0) list_count[tl] = min(m, S);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int tl = warp; tl < tpt; tl += W) {
    const int64_t t = t0 + tl;
    if (t >= seq.length) break;
    const int count = list_count[tl];
    int32_t* out = block_indices + ((tok_base + t) * H + h) * S;
    const float* ls = list_score + tl * S;
    const int* li = list_idx + tl * S;
    for (int i = lane; i < count; i += 32) {
      int slot = 0;
      for (int j = 0; j < count; ++j) slot += precedes(ls[j], li[j], ls[i], li[i]);
      out[slot] = block_of(li[i]);
    }
    for (int j = count + lane; j < S; j += 32) out[j] = -1;
  }
}

}  // namespace

void topk_forward(int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp, const DeviceLayout& L,
                  cudaStream_t s) {
  if (L.block_count > kMaxS) throw CudaError("topk_forward: block_count > " + std::to_string(kMaxS));
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = warps_for<T>();
    TopkParams P;
    P.L = L;
    P.G = int(L.HQ / L.H);
    P.geo = tile::make_geometry(P.G, 16 * W, L.max_len);
    P.k_padded = int(div_up(L.K, 16) * 16);
    P.scale_log2 = L.scale * 1.4426950408889634f;
    if (P.geo.tiles_x == 0 || L.num_seqs == 0) return;
    int device = 0, smem_optin = 0;
    CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice(topk)");
    CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(topk)");
    P.stages = smem_bytes<T>(P.k_padded, P.geo.tpt, L.block_count, 2) <= smem_optin ? 2 : 1;
    const int bytes = smem_bytes<T>(P.k_padded, P.geo.tpt, L.block_count, P.stages);
    CUDA_CHECK(cudaFuncSetAttribute(topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute(topk_kernel)");
    const dim3 grid(unsigned(P.geo.tiles_x / P.geo.head_chunks), L.num_seqs, unsigned(L.H));
    topk_kernel<T><<<grid, W * 32, bytes, s>>>(block_indices, static_cast<const T*>(q),
                                               static_cast<const T*>(k_cmp), lse_cmp, P);
    check_launch("topk_kernel");
  });
}

}  // namespace nsa::cuda
