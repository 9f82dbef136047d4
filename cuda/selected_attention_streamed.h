// The streamed selected-attention kernel (sm_90, TMA): see selected_attention_streamed.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/kernels.h"
#include "cuda/selected_runs.cuh"

namespace nsa::cuda {

// Same arguments as selected_attention_forward; path_counts (device [3], may be null) gains in its third
// slot the work units computed (selected_streamed_unit_tokens() tokens x one 16-head chunk of a kv head's
// group). With a split (selected_runs.cuh), the runs of tokens it marks as selecting alike are left to the
// union walk. With `gated` it also writes the gated output of the tokens it computes (every token where there
// is no split and G is a multiple of 16). Call only where selected_streamed_fits.
void selected_attention_streamed(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                 const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                 cudaStream_t s, int32_t* path_counts, const RunSplit* split,
                                 const GatedOutput* gated = nullptr);

// CTAs of the streamed kernel resident per SM for this problem (shared memory and registers); for benchmarks.
int selected_streamed_ctas_per_sm(const DeviceLayout& L);

}  // namespace nsa::cuda
