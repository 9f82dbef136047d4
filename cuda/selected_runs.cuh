// How Auto splits selected attention between the union walk and the streamed kernel: by runs of kRunTokens
// consecutive tokens of a sequence (a streamed CTA; a union tile of 128 rows lies inside one run when G is a
// multiple of 16). Both kernels are launched over the whole problem and evaluate the same predicate on the
// same run, so each token is taken by exactly one of them.
#pragma once
#include <cstdint>

namespace nsa::cuda {

constexpr int kRunTokens = 8;
// The union walk costs about one streamed item per 7 tokens' worth of rows and loads each distinct block of
// the run once; the streamed kernel loads one item per valid entry (H100, T = 64k, G = 16: 13.8 ms for runs
// sharing all 16 blocks against 16.6 ms streamed). So the union takes a run when distinct * 7 <= entries.
constexpr int kUnionShare = 7;

// Whether kv head `kv_head`'s valid selections over the run's `n` tokens (flat rows flat0.., positions
// t0..) are alike enough for the union walk. Every thread of the CTA must call it (it counts with
// __syncthreads_count); `scratch` is shared memory for n * S ints.
__device__ __forceinline__ bool run_selects_alike(const int32_t* indices, const int32_t* counts, int64_t flat0,
                                                  int64_t t0, int n, int H, int kv_head, int S, int BS,
                                                  int* scratch) {
  const int entries = n * S;
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int tt = i / S, j = i % S;
    const int64_t flat = flat0 + tt;
    const int cnt = counts ? min(max(counts[flat * H + kv_head], 0), S) : S;
    const int c = j < cnt ? indices[(flat * H + kv_head) * S + j] : -1;
    scratch[i] = c >= 0 && int64_t(c) * BS <= t0 + tt ? c : -1;
  }
  __syncthreads();
  // Entry i is distinct when no earlier entry holds its block. Every thread scans the same prefix, so each
  // read is a broadcast and the loop has no data-dependent exit.
  int valid = 0, distinct = 0;
  for (int i0 = 0; i0 < entries; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const int c = i < entries ? scratch[i] : -1;
    const int upto = min(i0 + int(blockDim.x), entries);
    bool seen = false;
#pragma unroll 8
    for (int x = 0; x < upto; ++x) seen |= (x < i) & (scratch[x] == c);
    valid += __syncthreads_count(c >= 0);
    distinct += __syncthreads_count(c >= 0 && !seen);
  }
  return valid > 0 && distinct * kUnionShare <= valid;
}

}  // namespace nsa::cuda
