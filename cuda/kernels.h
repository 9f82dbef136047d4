// Launchers of the CUDA kernels, one file per stage. Each takes the same arguments in the same order as its
// float64 twin in reference/reference.h (outputs, inputs, layout), plus a stream. Tensors are device
// pointers, token-major and contiguous as in core/problem.h; floating tensors are in L.dtype (bf16, fp16 or
// fp32), lse tensors are fp32, indices int32. Launchers check their launch and throw CudaError naming the
// kernel; they never synchronise the host.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace nsa::cuda {

enum class ElemType { F32, F16, BF16 };

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct DeviceSequence {
  int64_t batch, start, length, chunk_start;  // as nsa::Sequence
};

struct DeviceLayout {
  ElemType dtype = ElemType::BF16;
  int64_t B = 0, T = 0, HQ = 0, H = 0, K = 0, V = 0;
  int64_t C = 0;                           // pooled blocks per row
  int block_size = 64, block_count = 16, window = 0;
  float scale = 0;
  bool paper_policy = false;
  int num_seqs = 0;
  int64_t max_len = 0;                     // longest sequence
  const DeviceSequence* seqs = nullptr;    // device [num_seqs]
  const int32_t* token_seq = nullptr;      // device [B * T]: index into seqs of token (b, t)
  // false: the sm_90 kernels (wgmma, TMA) stand aside even on an sm_90 device, which then runs what an sm_80
  // GPU runs (tests cover both that way).
  bool sm90_kernels = true;
  // > 0: the sm_80 kernel set sizes its CTAs as on a GPU whose CTA may have at most this much shared memory
  // (and its SM this plus 1 KB; the device's own limits still bound both), e.g. 99 KB for an sm_86 / sm_89 GPU,
  // so that an A100 or H100 runs what such a GPU would (tests, with sm90_kernels false).
  int64_t smem_limit = 0;
  int64_t G() const { return HQ / H; }
};

// Shared memory a CTA may opt into and an SM holds (each resident CTA reserves 1 KB of it besides): how many
// CTAs of a kernel an SM holds, and so how the key-block backward stages its rows, follow from both.
struct SmemBudget {
  int64_t per_cta, per_sm;
};
constexpr SmemBudget kSm90Smem{227 * 1024, 228 * 1024};  // H100
constexpr SmemBudget kSm80Smem{163 * 1024, 164 * 1024};  // A100, A30
constexpr int64_t kSmemReservedPerCta = 1024;

// Whether an SM of `per_sm` bytes holds two CTAs of `bytes` each (each also reserving kSmemReservedPerCta).
constexpr bool two_ctas_fit(int64_t bytes, int64_t per_sm) { return 2 * (bytes + kSmemReservedPerCta) <= per_sm; }

// The budget a kernel's staging is reckoned on: the sm_90 one on a GPU with an H100's 228 KB an SM, otherwise
// the sm_80 one (an A100; GPUs with less take its choice too), which a device told to run the sm_80 kernel set
// takes as well, so that it runs what an A100 would, staging included. `per_cta` is the device's.
inline SmemBudget stage_budget(bool sm80_kernel_set, int64_t device_per_sm, int64_t per_cta) {
  const bool roomy = !sm80_kernel_set && device_per_sm >= kSm90Smem.per_sm;
  return {per_cta, roomy ? kSm90Smem.per_sm : kSm80Smem.per_sm};
}

// `budget` on a GPU whose CTA may have at most `limit` bytes (DeviceLayout::smem_limit; none when 0).
constexpr SmemBudget limit_budget(SmemBudget budget, int64_t limit) {
  if (limit <= 0) return budget;
  return {budget.per_cta < limit ? budget.per_cta : limit,
          budget.per_sm < limit + kSmemReservedPerCta ? budget.per_sm : limit + kSmemReservedPerCta};
}

// K/V stages of a forward tile kernel (attention_tile.cuh: 4 warps, which the registers let an SM hold twice) whose
// CTA takes bytes1 / bytes2 of shared memory with one / two stages, on an SM of `budget`: two where the SM then
// holds two CTAs, or where one stage would not buy the second either; one where it does; 0 where neither fits a
// CTA.
inline int tile_stages(int64_t bytes1, int64_t bytes2, SmemBudget budget) {
  if (bytes2 <= budget.per_cta && (two_ctas_fit(bytes2, budget.per_sm) || !two_ctas_fit(bytes1, budget.per_sm)))
    return 2;
  return bytes1 <= budget.per_cta ? 1 : 0;
}

// A forward tile kernel's launch for a problem: 16-row tiles per warp (1 or 2), K/V stages (1 or 2; 0: no tile
// fits a CTA, the CUDA-core kernel takes the problem) and the CTA's shared memory.
struct TileChoice {
  int row_tiles = 0, stages = 0;
  int64_t bytes = 0;
};

// Whether 16-byte copies can read a problem's rows: rows of K and V elements are multiples of 16 bytes (K, V
// multiples of 8 in 16 bits, of 4 in fp32) and the tensors 16-byte aligned.
inline bool sixteen_byte_rows(const DeviceLayout& L, std::initializer_list<const void*> tensors) {
  const int64_t per_chunk = L.dtype == ElemType::F32 ? 4 : 8;
  if (L.K % per_chunk != 0 || L.V % per_chunk != 0) return false;
  for (const void* p : tensors)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Whether the 16-bit tensor-core kernels can read a problem's rows: bf16/fp16 and sixteen_byte_rows. The forward's
// tile kernels and the key-block backward both start from it.
inline bool tensor_core_rows(const DeviceLayout& L, std::initializer_list<const void*> tensors) {
  return L.dtype != ElemType::F32 && sixteen_byte_rows(L, tensors);
}

// The most blocks per query (S) that the CUDA top-k selects: each token's candidate buffer holds 256
// entries, S + 31 of which a filter pass needs.
constexpr int kTopkMaxBlockCount = 225;

void mean_pool_forward(void* k_cmp, void* v_cmp, const void* k, const void* v, const DeviceLayout& L, cudaStream_t s);
void compressed_attention_forward(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                                  const DeviceLayout& L, cudaStream_t s);
// Which kernel a stage with a warpgroup (sm_90) kernel runs: Auto takes the warpgroup kernel where it fits,
// else the mma.sync tile kernel, which Tile forces. For tests and benchmarks. Compressed attention and the
// sliding window: bf16/fp16, K and V in {64, 128} or K = 192 with V = 128, G dividing 64 or a multiple of 64
// (attention_sm90.cu); top-k: bf16/fp16, K in {64, 128, 192}, G in {2, 4, 8, 16} (topk.cu).
enum class KernelChoice { Auto = 0, Tile = 1 };
void compressed_attention_forward(void* o_cmp, float* lse_cmp, const void* q, const void* k_cmp, const void* v_cmp,
                                  const DeviceLayout& L, cudaStream_t s, KernelChoice choice);
// Shared memory a CTA of compressed attention's mma.sync tile kernel takes for L's dtype and head dims (8 warps
// for bf16 / fp16, 4 for fp32).
int compressed_tile_smem_bytes(const DeviceLayout& L);
// The warps a CTA of that kernel takes on an SM of `budget`: all, or half where the CTA would not fit; 0 where
// neither fits, and the CUDA-core row kernel runs instead.
int compressed_tile_warps(const DeviceLayout& L, SmemBudget budget);
void topk_forward(int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp, const DeviceLayout& L,
                  cudaStream_t s);
void topk_forward(int32_t* block_indices, const void* q, const void* k_cmp, const float* lse_cmp, const DeviceLayout& L,
                  cudaStream_t s, KernelChoice choice);
// Whether Auto runs top-k on its sm_90 kernel (topk.cu).
bool topk_sm90_fits(const DeviceLayout& L, const void* q, const void* k_cmp);
// The launch of top-k's tile kernel for L on an SM of `budget`: warps a CTA (8 for 16-bit inputs, 4 for fp32, fewer
// where the tokens' candidate buffers would not fit; 0 where none fits, and topk_forward throws), K stages and
// candidate-buffer entries per token, and the CTA's shared memory.
struct TopkTileConfig {
  int warps = 0, stages = 0, cap = 0, bytes = 0;
};
TopkTileConfig topk_tile_config(const DeviceLayout& L, SmemBudget budget);
// Empty where top-k can run L on the current device; else why not (neither the sm_90 kernel nor any launch of the
// tile kernel fits its shared memory: fp32 inputs with K = 256 and S >= 128 on a GPU of 99 KB a CTA).
std::string topk_shared_memory_shortfall(const DeviceLayout& L, const void* q, const void* k_cmp);
// Whether the streamed selected-attention kernel (selected_attention_streamed.cu) can take this problem: the
// sm_90 kernels allowed on a 9.x device, 16-bit elements, G in {4, 8} or a multiple of 16, BS a multiple of 64,
// K and V in {64, 128} or K = 192 with V = 128, S * BS / 64 at most 512, 16-byte aligned tensors.
bool selected_streamed_fits(const DeviceLayout& L, const void* q, const void* k, const void* v);
// block_counts may be null.
void selected_attention_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                cudaStream_t s);
// The union / per-token tile kernel selected attention launches for L on an SM of `budget` (attention_tile.cuh).
TileChoice selected_attention_tile(const DeviceLayout& L, SmemBudget budget);
// How selected attention walks a tile of tokens: the union of the tile's blocks, each 16-row group's own
// blocks, (sm_90, G in {4, 8} or a multiple of 16, BS a multiple of 64, K and V as selected_streamed_fits) the
// streamed TMA kernel, which loads each distinct block of a unit of 8 tokens once, or (sm_80, 16-bit elements, G
// in {1, 2, 4}, K and V in {64, 128}, BS a multiple of 16 up to 128) the block-major path, where each selected
// block gathers the queries that selected it and a merge combines each row's slots
// (selected_attention_blocks.cu). Auto takes the block-major path where it can, else the streamed kernel (at
// G <= 8 leaving the union the runs whose tokens select alike), else per tile whichever of the first two
// multiplies fewer keys; a forced path that cannot run falls back to Auto. For tests and benchmarks;
// path_counts (device [3], may be null) gains the number of CTAs that took the union / the per-token walk, and
// the units the streamed kernel computed (selected_streamed_unit_tokens() tokens x a 16-head chunk).
enum class SelectedPath { Auto = 0, Union = 1, PerToken = 2, Streamed = 3, Blocks = 4 };
void selected_attention_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                const int32_t* block_indices, const int32_t* block_counts, const DeviceLayout& L,
                                cudaStream_t s, SelectedPath path, int32_t* path_counts);
// Consecutive tokens per work unit of the streamed kernel (what its path_counts slot counts).
int selected_streamed_unit_tokens();
// The gate pass (gate_forward) fused into selected attention: o = g_slc * o_slc + g_cmp * o_cmp (+ g_swa *
// o_swa with a window branch, computed before), by gate_forward's arithmetic. The other branches' rows and the
// gates are read where each token's rows are computed, so the fused kernel saves the pass's second read of
// o_slc and its launch.
struct GatedOutput {
  void* o;            // [B, T, HQ, V]
  const void* o_cmp;  // [B, T, HQ, V]
  const void* g_cmp;  // [B, T, HQ]
  const void* g_slc;  // [B, T, HQ]
  const void* o_swa = nullptr;  // [B, T, HQ, V], or null: no window branch
  const void* g_swa = nullptr;  // [B, T, HQ], with o_swa
};
// Selected attention (Auto) that also writes `gated` where one kernel computes every token (sm_90, G a multiple
// of 16, the streamed kernel); returns whether it did, else the caller runs gate_forward.
bool selected_attention_gated_forward(void* o_slc, float* lse_slc, const void* q, const void* k, const void* v,
                                      const int32_t* block_indices, const int32_t* block_counts,
                                      const DeviceLayout& L, cudaStream_t s, const GatedOutput& gated);
void sliding_window_forward(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                            const DeviceLayout& L, cudaStream_t s);
void sliding_window_forward(void* o_swa, float* lse_swa, const void* q, const void* k, const void* v,
                            const DeviceLayout& L, cudaStream_t s, KernelChoice choice);
// The sliding window's mma.sync tile kernel for L on an SM of `budget` (attention_tile.cuh).
TileChoice sliding_window_tile(const DeviceLayout& L, SmemBudget budget);
// Null gates (or branches) drop their branch. Gates are in L.dtype.
void gate_forward(void* o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp, const void* g_slc,
                  const void* g_swa, const DeviceLayout& L, cudaStream_t s);

// Backward (nsa-spec §3): the twins of the reference's backward functions, same argument order. Gradients
// are fp32 device tensors that the launchers accumulate into (+=), as the reference does; do_cmp / do_slc /
// do_swa are the gated upstream gradients (gate_backward writes them, or their rows' gates and deltas;
// BranchGrad); the other tensors are the forward's inputs and outputs in L.dtype (lse fp32). The attention
// branches: bf16/fp16 with K, V <= 256 on tensor cores, key block by key block, where the tile fits shared
// memory (key_block_backward.cuh; on sm_90 with 64-key tiles and K and V in {64, 128} or K = 192 with V = 128
// key_block_backward_sm90.cuh); otherwise CUDA cores, a warp per token and up to four heads of its group; dk / dv
// / dq by atomics.

// A branch's gated upstream gradient do_x = g_x do: fp32 [B, T, HQ, V], or, for a branch whose backward takes
// the tensor-core path (*_backward_takes_gated), left unformed: do itself (L.dtype) with the rows' gates g_x and
// deltas delta[row] = do[row] . o_x[row] (fp32). That path scales the probabilities by the row's gate instead
// (P' = g_x P: g_x P (dP - delta_x) = P' (do . v - delta) is the gated dS, P'^T do the gated dV), so no pass
// writes do_x and none reads it back.
struct BranchGrad {
  const float* f32 = nullptr;
  const void* d_out = nullptr;
  const float* gate = nullptr;
  const float* delta = nullptr;
  BranchGrad(const float* f) : f32(f) {}  // NOLINT: the fp32 form is the plain one
  BranchGrad(const void* d, const float* g, const float* dl) : d_out(d), gate(g), delta(dl) {}
};
// Where gate_backward writes a gated branch's rows: the rows' gates as fp32, then their deltas (two floats a row;
// the pipeline allocates that much for such a branch).
inline BranchGrad gated_layout(float* buffer, const void* d_out, const DeviceLayout& L) {
  return BranchGrad(d_out, buffer, buffer + L.B * L.T * L.HQ);
}
// Which branches gate_backward leaves gated (gated_layout) instead of writing do_x in fp32.
struct GatedBranches {
  bool cmp = false, slc = false, swa = false;
};
// Whether each branch's backward takes the tensor-core path on these tensors (then it takes a gated BranchGrad).
bool compressed_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k_cmp, const void* v_cmp);
bool selected_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k, const void* v);
bool sliding_window_backward_takes_gated(const DeviceLayout& L, const void* q, const void* k, const void* v);

void mean_pool_backward(float* dk, float* dv, const float* dk_cmp, const float* dv_cmp, const DeviceLayout& L,
                        cudaStream_t s);
void compressed_attention_backward(float* dq, float* dk_cmp, float* dv_cmp, BranchGrad do_cmp, const void* q,
                                   const void* k_cmp, const void* v_cmp, const void* o_cmp, const float* lse_cmp,
                                   const DeviceLayout& L, cudaStream_t s);
void selected_attention_backward(float* dq, float* dk, float* dv, BranchGrad do_slc, const void* q, const void* k,
                                 const void* v, const void* o_slc, const float* lse_slc, const int32_t* block_indices,
                                 const int32_t* block_counts, const DeviceLayout& L, cudaStream_t s);
void sliding_window_backward(float* dq, float* dk, float* dv, BranchGrad do_swa, const void* q, const void* k,
                             const void* v, const void* o_swa, const float* lse_swa, const DeviceLayout& L,
                             cudaStream_t s);
// A branch whose gate, output or gradient pointers are null is skipped; a branch named in `gated` gets its gates
// and deltas in gated_layout (do_x is not formed).
void gate_backward(float* dg_cmp, float* dg_slc, float* dg_swa, float* do_cmp, float* do_slc, float* do_swa,
                   const void* d_o, const void* o_cmp, const void* o_slc, const void* o_swa, const void* g_cmp,
                   const void* g_slc, const void* g_swa, const DeviceLayout& L, cudaStream_t s,
                   GatedBranches gated = {});

// Fills n elements of `dst` (type t) with pseudo-random values from a counter-based hash of (seed, index):
// normal(0, 1) when `normal`, else uniform in [lo, hi). For benchmarks; not the fixture generator.
void fill_random(void* dst, int64_t n, ElemType t, uint64_t seed, bool normal, float lo, float hi, cudaStream_t s);

}  // namespace nsa::cuda
