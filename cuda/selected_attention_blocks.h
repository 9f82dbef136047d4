// The block-major selected-attention path for small query groups: see selected_attention_blocks.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace nsa::cuda {

struct RunSplit;  // selected_runs.cuh

// Whether the block-major path can take this problem: 16-bit elements, G in {1, 2, 4}, K and V in {64, 128},
// BS a multiple of 16 up to 128.
bool selected_blocks_fits(const DeviceLayout& L);

// Same arguments as selected_attention_forward. With a split (selected_runs.cuh), the runs of tokens it marks
// as selecting alike are left to the union walk. It works through windows of tokens whose partial results fit
// `window_bytes` (0: 1 GiB; at least one token per window). Call only where selected_blocks_fits.
void selected_attention_blocks(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                               const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                               cudaStream_t s, const RunSplit* split, size_t window_bytes = 0);

}  // namespace nsa::cuda
