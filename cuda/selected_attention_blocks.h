// The block-major selected-attention path for small query groups: see selected_attention_blocks.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/kernels.h"
#include "cuda/selected_runs.cuh"

namespace nsa::cuda {

// Whether the block-major path can take this problem: 16-bit elements, G in {1, 2, 4}, K and V in {64, 128},
// BS a multiple of 16 up to 128, and partial results (B T H S entries x G x V elements) within 4 GiB.
bool selected_blocks_fits(const DeviceLayout& L);

// Same arguments as selected_attention_forward. With a split (selected_runs.cuh), the runs of tokens it marks
// as selecting alike are left to the union walk. Call only where selected_blocks_fits.
void selected_attention_blocks(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                               const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                               cudaStream_t s, const RunSplit* split);

}  // namespace nsa::cuda
