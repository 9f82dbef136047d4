// The geometry of the key-block backward (key_block_backward.cuh), shared by the kernel and the host: how a
// step's query rows map to (token, head of the group), how many tokens a CTA takes, and which problems the
// kernel takes.
#pragma once
#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace nsa::cuda::kbb {

constexpr int kStepRows = 32;  // query rows per step: two m16 tiles of dQ, four n8 groups of S^T
constexpr int kRowGroups = kStepRows / 8;
constexpr int kStepsPerCta = 32;
constexpr int kMaxTokensPerCta = kStepsPerCta * kStepRows;  // the CTA's token positions staged in shared memory

// A step's rows are tpt tokens x hpt heads of the group (hpt <= 16, so that a token's heads never straddle an
// m16 tile), head_chunks steps per group of tokens when G > 16; a CTA takes tokens_per_cta tokens, about
// steps_per_cta steps' worth and at most kMaxTokensPerCta. Branches pass more steps where the GPU stays full:
// fewer CTAs then load K / V tiles and add dK / dV rows (compressed attention's CTAs all add into the same few).
struct StepGeometry {
  int hpt, tpt, head_chunks, tokens_per_cta;
};
inline StepGeometry step_geometry(int64_t G, int steps_per_cta = kStepsPerCta) {
  StepGeometry s;
  s.hpt = int(G < 16 ? G : 16);
  s.tpt = kStepRows / s.hpt;
  s.head_chunks = int((G + s.hpt - 1) / s.hpt);
  s.tokens_per_cta = std::min(kMaxTokensPerCta, std::max(1, steps_per_cta * s.tpt / s.head_chunks));
  return s;
}

// Row r of step s of a CTA with ntok tokens: the token's index i in the CTA and the head within the group;
// false for a padding row.
__host__ __device__ inline bool step_slot(const StepGeometry& geo, int s, int r, int ntok, int G, int& i, int& head) {
  const int group = s / geo.head_chunks, chunk = s % geo.head_chunks;
  i = group * geo.tpt + r / geo.hpt;
  head = chunk * geo.hpt + r % geo.hpt;
  return r < geo.tpt * geo.hpt && i < ntok && head < G;
}

// One CTA's work: keys [key0, key0 + nkeys) of a sequence (positions as `sees` takes them; rows key_row0 + r of
// the [*, H, K] key tensor) for kv head h, and ntok query tokens from `first` (a list offset or a position; the
// Source reads it).
struct KeyTile {
  int64_t query_base;  // flat token of the sequence's first token (its batch row x T + start)
  int64_t key_row0, key0, first;
  int nkeys, ntok, h;
};

// The tensors of one branch's backward. d_out is the upstream gradient in the input type and delta its row-wise
// dot with the branch's output: either do_x = g_x do, cast (PreparedRows), with no gate, or do itself with the
// rows' gates g_x, which scale the probabilities (BranchGrad's gated form).
template <typename T>
struct Tensors {
  float *dq, *dk, *dv;
  const T *q, *k, *v, *d_out;
  const float *lse, *delta;
  const float* gate;  // per query row, the branch's gate scaling its probabilities (BranchGrad); null: 1
  int64_t HQ;
  int H, G, K, V;
  float scale;
};

// Head dims the kernel takes: dK / dV stay in registers for the whole CTA, 128 fp32 a thread at 256.
constexpr int kMaxDim = 256;

// The kernel's head dims (rows are zero-padded to them): K and V up to 128 both round up to the larger's 32, 64
// or 128; above that, the NSA paper's heads (K <= 192, V <= 128) have an instance of their own, which multiplies
// no padding columns of V; the rest take 256 for both.
struct Dims {
  int k, v;
};
constexpr Dims kernel_dims(int64_t K, int64_t V) {
  const int64_t d = K > V ? K : V;
  if (d <= 32) return {32, 32};
  if (d <= 64) return {64, 64};
  if (d <= 128) return {128, 128};
  if (K <= 192 && V <= 128) return {192, 128};
  return {256, 256};
}

// Steps of Q / dO rows in shared memory: three (two in flight while one is computed); two where rows above 256
// elements (K + V) in three would leave room for only one CTA of two or four warps an SM (16- and 32-key tiles).
constexpr int row_stages(Dims d, int tile_keys) { return d.k + d.v > 256 && tile_keys < 64 ? 2 : 3; }

// Shared memory of key_block_backward_kernel for Dims d and tile_keys with 2-byte elements (the kernel's Smem
// checks that it agrees): K, V, the stages' Q and dO rows (each padded by 16 bytes), dS, the P^T fragments, the
// stages' row metadata and the CTA's token positions.
constexpr int64_t smem_bytes(Dims d, int tile_keys) {
  const int64_t row = (d.k + 8) + (d.v + 8), stages = row_stages(d, tile_keys);
  return 2 * (tile_keys * row + stages * kStepRows * row + kStepRows * (tile_keys + 8)) +
         (tile_keys / 16) * 32 * 4 * kRowGroups * 4 + stages * kStepRows * (2 * 8 + 3 * 4) + kMaxTokensPerCta * 4;
}

// Whether the kernel takes a branch with tiles of `tile_keys` keys on a device whose CTAs may have `smem_limit`
// bytes of shared memory: the tensor-core rows of the forward's tile kernels (tensor_core_rows), K and V up to
// kMaxDim, 16 to 128 keys a tile, positions that fit int32. (At K or V above 128, 128-key tiles need more than
// an H100's 227 KB, and 64-key tiles more than an A100's 163 KB.)
inline bool fits_within(const DeviceLayout& L, int tile_keys, const void* q, const void* k, const void* v,
                        int64_t smem_limit) {
  if (!(tile_keys == 16 || tile_keys == 32 || tile_keys == 64 || tile_keys == 128)) return false;
  return tensor_core_rows(L, {q, k, v}) && L.K <= kMaxDim && L.V <= kMaxDim && L.max_len < (int64_t(1) << 31) &&
         smem_bytes(kernel_dims(L.K, L.V), tile_keys) <= smem_limit;
}

}  // namespace nsa::cuda::kbb
