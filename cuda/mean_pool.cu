// Mean pooling (nsa-spec §2.1): k_cmp[c] / v_cmp[c] = mean of the keys / values of block c of a sequence, the
// last partial block averaged over its actual token count. Memory-bound: one CTA per (pooled block, kv head,
// batch row) reads the block's tokens once, threads striding over the K + V feature columns.
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

}  // namespace

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
