// Compressed attention forward with warpgroup MMAs (sm_90a); compressed_attention.cu takes every shape this
// kernel does not.
#pragma once
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace nsa::cuda {

// Whether the wgmma kernel can run this problem on the current device: bf16/fp16, K and V in {64, 128}, G
// dividing 64 or a multiple of 64, at least one pooled block, 16-byte aligned tensors, compute capability 9.x.
bool compressed_sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp);

// Same arguments and outputs as compressed_attention_forward; precondition: compressed_sm90_fits.
void compressed_attention_sm90(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                               const DeviceLayout& L, cudaStream_t s);

}  // namespace nsa::cuda
