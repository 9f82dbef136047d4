// Mean pooling (nsa-spec §2.1): k_cmp[c] / v_cmp[c] = mean of the keys / values of block c of a sequence, the
// last partial block averaged over its actual token count. Memory-bound: one CTA per (pooled block, kv head,
// batch row) reads the block's tokens once, threads striding over the K + V feature columns. Backward: each
// token's dk / dv gain its block's dk_cmp / dv_cmp over the block's token count, a thread per element.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace nsa::cuda {
namespace {

// Preconditions: grid (C, H, B); blocks past the last sequence's end return.
template <typename T>
__global__ void mean_pool_kernel(T* __restrict__ k_cmp,        // [B, C, H, K]
                                 T* __restrict__ v_cmp,        // [B, C, H, V]
                                 const T* __restrict__ k,      // [B, T, H, K]
                                 const T* __restrict__ v,      // [B, T, H, V]
                                 const DeviceLayout L) {
  const int64_t chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n = find_seq_of_chunk(L.seqs, L.num_seqs, b, chunk);
  const DeviceSequence seq = L.seqs[n];
  if (seq.batch != b) return;
  const int64_t block = chunk - seq.chunk_start;  // within the sequence
  const int64_t first = block * L.block_size;
  if (block < 0 || first >= seq.length) return;  // chunk past this row's blocks
  const int64_t count = min(int64_t(L.block_size), seq.length - first);
  const float inv = 1.f / float(count);
  const int64_t tok0 = b * L.T + seq.start + first;
  const int64_t out_row = (b * L.C + chunk) * L.H + h;
  for (int64_t d = threadIdx.x; d < L.K + L.V; d += blockDim.x) {
    const bool is_k = d < L.K;
    const int64_t dim = is_k ? L.K : L.V, col = is_k ? d : d - L.K;
    const T* src = (is_k ? k : v) + (tok0 * L.H + h) * dim + col;
    float sum = 0.f;
    for (int64_t i = 0; i < count; ++i) sum += Elem<T>::to_float(src[i * L.H * dim]);
    (is_k ? k_cmp : v_cmp)[out_row * dim + col] = Elem<T>::from_float(sum * inv);
  }
}

// One thread per element of dk and dv ([B, T, H, K] then [B, T, H, V]).
__global__ void mean_pool_backward_kernel(float* __restrict__ dk, float* __restrict__ dv,
                                          const float* __restrict__ dk_cmp, const float* __restrict__ dv_cmp,
                                          const DeviceLayout L) {
  const int64_t k_elems = L.B * L.T * L.H * L.K, n = k_elems + L.B * L.T * L.H * L.V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const bool is_k = i < k_elems;
    const int64_t dim = is_k ? L.K : L.V, e = is_k ? i : i - k_elems;
    const int64_t col = e % dim, h = e / dim % L.H, flat = e / dim / L.H;
    const int32_t si = L.token_seq[flat];
    if (si < 0) continue;
    const DeviceSequence seq = L.seqs[si];
    const int64_t t = flat - (seq.batch * L.T + seq.start);
    if (t < 0 || t >= seq.length) continue;
    const int64_t block = t / L.block_size, first = block * L.block_size;
    const float inv = 1.f / float(min(int64_t(L.block_size), seq.length - first));
    const int64_t src = ((seq.batch * L.C + seq.chunk_start + block) * L.H + h) * dim + col;
    (is_k ? dk : dv)[e] += (is_k ? dk_cmp : dv_cmp)[src] * inv;
  }
}

}  // namespace

void mean_pool_backward(float* dk, float* dv, const float* dk_cmp, const float* dv_cmp, const DeviceLayout& L,
                        cudaStream_t s) {
  const int64_t n = L.B * L.T * L.H * (L.K + L.V);
  if (n == 0 || L.num_seqs == 0) return;
  const int threads = 256;
  mean_pool_backward_kernel<<<unsigned(std::min<int64_t>(div_up(n, threads), 132 * 32)), threads, 0, s>>>(
      dk, dv, dk_cmp, dv_cmp, L);
  check_launch("mean_pool_backward_kernel");
}

void mean_pool_forward(void* k_cmp, void* v_cmp, const void* k, const void* v, const DeviceLayout& L, cudaStream_t s) {
  if (L.C == 0 || L.B == 0) return;
  dispatch_elem(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int threads = int(std::min<int64_t>(512, div_up(L.K + L.V, 32) * 32));
    const dim3 grid(unsigned(L.C), unsigned(L.H), unsigned(L.B));
    mean_pool_kernel<T><<<grid, threads, 0, s>>>(static_cast<T*>(k_cmp), static_cast<T*>(v_cmp),
                                                 static_cast<const T*>(k), static_cast<const T*>(v), L);
    check_launch("mean_pool_kernel");
  });
}

}  // namespace nsa::cuda
