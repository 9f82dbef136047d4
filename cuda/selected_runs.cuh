// How the selected-attention kernels read a token's selections, and how Auto splits selected attention at
// G < 16 between the union walk and the main kernel (the block-major path at G <= 4, the streamed kernel at
// G = 8): by runs of consecutive tokens of a sequence, 128 / G of them (8 when G is a multiple of 16), so that
// a union tile (64 or 128 rows of whole tokens) lies inside one run and a run holds whole streamed units of 8
// tokens. A small kernel marks each run once (RunSplit); the union kernel takes the marked runs and the main
// kernel the others, so each token is taken by exactly one.
#pragma once
#include <cstdint>

namespace nsa::cuda {

// The split, in device memory: alike[(seq * runs_per_seq + run) * H + kv_head] is 1 where that run's
// selections are alike (run_selects_alike).
struct RunSplit {
  uint8_t* alike;
  int runs_per_seq;
  // Index into `alike` of run `run` (tokens [run * run_tokens, ..)) of sequence `seq`, kv head `kv_head`.
  __host__ __device__ __forceinline__ int64_t flag(int64_t seq, int64_t run, int H, int kv_head) const {
    return (seq * runs_per_seq + run) * H + kv_head;
  }
};

// How many entries of block_indices[flat, kv_head, :] count: block_counts there clamped to [0, S], or S.
__device__ __forceinline__ int selection_count(const int32_t* counts, int64_t flat, int H, int kv_head, int S) {
  return counts ? min(max(counts[flat * H + kv_head], 0), S) : S;
}

__host__ __device__ __forceinline__ int run_tokens(int G) { return G % 16 == 0 ? 8 : 128 / G; }

// Shared memory that run_selects_alike needs: an open-addressing set of twice the run's entries (a power
// of two). Callers keep run * S <= kMaxRunEntries.
constexpr int kMaxRunEntries = 4096;
__host__ __device__ __forceinline__ int run_set_size(int entries) {
  int size = 64;
  while (size < 2 * entries) size *= 2;
  return size;
}

// Whether kv head `kv_head`'s valid selections over the run's `n` tokens (flat rows flat0.., positions
// t0..) are alike enough for the union walk: distinct blocks x n <= slack x valid entries. With slack 1 all
// the tokens select the same blocks (a token lists a block at most once, so only equality passes); beside the
// block-major path (G <= 4) the union keeps runs with up to `slack` times a token's blocks. At G = 4 the streamed
// kernel, which loads a block its unit's 8 tokens share once but multiplies 16-row tiles holding 4 useful
// rows, is the faster on anything less (H100, T = 32k, G = 4, independent selections: 6.73 ms with this rule,
// 7.16 with the union taking runs of distinct x 7 <= valid, 6.61 with the streamed kernel alone; runs of 64
// tokens sharing their blocks: 1.84-1.88 ms either rule, 4.21 ms streamed alone). Every thread of the CTA
// must call it (it counts with __syncthreads_count); `set` is shared memory for run_set_size(n * S) ints.
__device__ __forceinline__ bool run_selects_alike(const int32_t* indices, const int32_t* counts, int64_t flat0,
                                                  int64_t t0, int n, int H, int kv_head, int S, int BS, int slack,
                                                  int* set) {
  const int entries = n * S, size = run_set_size(entries);
  for (int i = threadIdx.x; i < size; i += blockDim.x) set[i] = -1;
  __syncthreads();
  // Each valid entry goes into the set; the thread whose insertion finds the slot empty counts a distinct
  // block, so the count does not depend on the order of insertions.
  int valid = 0, distinct = 0;
  for (int i0 = 0; i0 < entries; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    bool is_valid = false, first = false;
    if (i < entries) {
      const int tt = i / S, j = i % S;
      const int64_t flat = flat0 + tt;
      const int cnt = selection_count(counts, flat, H, kv_head, S);
      const int c = j < cnt ? indices[(flat * H + kv_head) * S + j] : -1;
      is_valid = c >= 0 && int64_t(c) * BS <= t0 + tt;
      if (is_valid) {
        for (uint32_t slot = (uint32_t(c) * 2654435761u) & uint32_t(size - 1);; slot = (slot + 1) & uint32_t(size - 1)) {
          const int prev = atomicCAS(&set[slot], -1, c);
          if (prev == -1) { first = true; break; }
          if (prev == c) break;
        }
      }
    }
    valid += __syncthreads_count(is_valid);
    distinct += __syncthreads_count(first);
  }
  return valid > 0 && distinct * n <= slack * valid;
}

}  // namespace nsa::cuda
