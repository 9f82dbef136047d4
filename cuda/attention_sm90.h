// Compressed attention and the sliding window forward with warpgroup MMAs (sm_90a, attention_sm90.cu); the
// tile kernels of compressed_attention.cu and sliding_window.cu take every shape these do not.
#pragma once
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace nsa::cuda {

// Whether the warpgroup kernel can run this stage on the current device: bf16/fp16, K and V in {64, 128} or
// K = 192 with V = 128, G
// dividing 64 or a multiple of 64, keys to attend (pooled blocks; a window W > 0), 16-byte aligned tensors,
// int32 tensor-map coordinates, compute capability 9.x.
bool compressed_sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp);
bool sliding_window_sm90_fits(const DeviceLayout& L, const void* q, const void* k, const void* v);

// Same arguments and outputs as compressed_attention_forward / sliding_window_forward; precondition: the
// matching *_fits.
void compressed_attention_sm90(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                               const DeviceLayout& L, cudaStream_t s);
void sliding_window_sm90(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                         const DeviceLayout& L, cudaStream_t s);

}  // namespace nsa::cuda
