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

// How a CTA stages its rows: `stages` steps of Q / dO rows in shared memory, and whether the P warps hand P^T to
// the dS warps in fp16 within dS's own tile (p_in_ds) or as fp32 fragments of their own (2 KB per 16 keys).
struct Staging {
  int stages;
  bool p_in_ds;
};

// Shared memory of key_block_backward_kernel for Dims d, tile_keys and staging `st`, 2-byte elements (the
// kernel's Smem checks that it agrees): K, V, the stages' Q and dO rows (each padded by 16 bytes), dS, the P^T
// fragments unless P^T goes through dS, the stages' row metadata and the CTA's token positions.
constexpr int64_t smem_bytes(Dims d, int tile_keys, Staging st) {
  const int64_t row = (d.k + 8) + (d.v + 8);
  return 2 * (tile_keys * row + st.stages * kStepRows * row + kStepRows * (tile_keys + 8)) +
         (st.p_in_ds ? 0 : (tile_keys / 16) * 32 * 4 * kRowGroups * 4) + st.stages * kStepRows * (2 * 8 + 3 * 4) +
         kMaxTokensPerCta * 4;
}

// Two CTAs an SM where the registers allow them: tiles of up to 64 keys at rows up to 128 (the launch bounds ask
// for two), up to 32 keys above (128 threads of up to 255 registers each).
constexpr bool two_ctas_by_registers(Dims d, int tile_keys) {
  return tile_keys <= 32 || (tile_keys == 64 && d.k <= 128);
}

// Three stages with P^T in fragments, unless an SM of `per_sm` bytes would then hold one CTA where the registers
// allow two: then the first of two stages, two with P^T in dS, that keeps two. Rows above 256 elements (K + V)
// with 16- or 32-key tiles always take two (K = V = 256 on an H100 for two CTAs; at K = 192, V = 128, where three
// also fit two, two measured 1-2% faster). An A100 (164 KB) takes two stages at K = V = 128 with 32-key tiles
// and two with P^T in dS with 64-key tiles, whose three stages it holds once: whole backward 1.31-1.39x slower
// than with the two CTAs (measured on an H100 held to the A100's occupancy; on the H100 itself the two-stage
// P^T in dS is 4-5% slower than three stages).
constexpr Staging staging(Dims d, int tile_keys, int64_t per_sm) {
  const Staging roomiest{3, false}, lean{2, false}, leanest{2, true};
  if (d.k + d.v > 256 && tile_keys < 64) return lean;
  auto two_fit = [&](Staging st) { return two_ctas_fit(smem_bytes(d, tile_keys, st), per_sm); };
  if (!two_ctas_by_registers(d, tile_keys) || two_fit(roomiest)) return roomiest;
  return two_fit(lean) ? lean : two_fit(leanest) ? leanest : roomiest;
}

// Whether the kernel takes a branch with tiles of `tile_keys` keys within `budget`: the tensor-core rows of the
// forward's tile kernels (tensor_core_rows), K and V up to kMaxDim, 16 to 128 keys a tile, positions that fit
// int32, and the CTA's shared memory. (At K or V above 128, 128-key tiles need more than an H100's 227 KB, and
// 64-key tiles more than an A100's 163 KB.)
inline bool fits_within(const DeviceLayout& L, int tile_keys, const void* q, const void* k, const void* v,
                        SmemBudget budget) {
  if (!(tile_keys == 16 || tile_keys == 32 || tile_keys == 64 || tile_keys == 128)) return false;
  const Dims d = kernel_dims(L.K, L.V);
  return tensor_core_rows(L, {q, k, v}) && L.K <= kMaxDim && L.V <= kMaxDim && L.max_len < (int64_t(1) << 31) &&
         smem_bytes(d, tile_keys, staging(d, tile_keys, budget.per_sm)) <= budget.per_cta;
}

}  // namespace nsa::cuda::kbb
