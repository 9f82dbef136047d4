// The float64 CPU reference of every NSA stage (nsa-spec §2, §3). One file per stage; every function takes
// outputs first, then inputs, then the layout, in the same order as its CUDA twin in cuda/.
// Shapes follow core/problem.h (token-major, contiguous). Forward functions assign their outputs;
// backward functions accumulate (+=) into theirs.
// `rows` (flat query tokens b * T + t; empty => all) restricts a forward stage to a sample of query rows,
// which is what makes row-sampled verification of 64k-token sequences cheap: given k_cmp/v_cmp, every
// forward stage is local to its query row. Rows not sampled are left untouched. With `o_slots` (B * T entries,
// sample_slots in core/problem.h) the [B, T, HQ, V] tensors o_cmp, o_slc, o_swa and o are compact instead:
// query row r is row o_slots[r] of a [sample, HQ, V] tensor (Outputs::rows), so a sample of a long sequence
// needs no full-size output. With `q_slots` (the same form) q is compact too: query row r is row q_slots[r] of
// a [n, HQ, K] tensor (Problem::q_rows), which must hold every row the stage reads (q_rows_read).
#pragma once
#include <cstdint>
#include <vector>

#include "core/backend.h"
#include "core/problem.h"

namespace nsa::ref {

using RowMask = std::vector<uint8_t>;   // size B * T, or empty for every row
using RowSlots = std::vector<int64_t>;  // size B * T (-1: not sampled), or empty for full-size outputs
// The row of flat query token `token` in a [*, HQ, V] output: itself, or its compact row.
inline int64_t output_row(const RowSlots& o_slots, int64_t token) { return o_slots.empty() ? token : o_slots[token]; }
// The query tokens (ascending) whose q rows a forward over the tokens `sample` reads: compressed attention and
// top-k compute a sampled row inside its whole tile of queries (so that it comes out bit-identical to a full
// run), the other stages read the row alone.
std::vector<int64_t> q_rows_read(const Layout& L, const std::vector<int64_t>& sample);
// The q_slots of p's compact q (none when q is whole), after checking that it holds every row a forward over
// the tokens `sample` (empty: every token, as a backward needs) reads; throws std::invalid_argument otherwise.
RowSlots q_slots_for(const Problem& p, const std::vector<int64_t>& sample);

// mean_pool.cpp — k_cmp [B, C, H, K], v_cmp [B, C, H, V] from k [B, T, H, K], v [B, T, H, V].
void mean_pool_forward(double* k_cmp, double* v_cmp, const double* k, const double* v, const Layout& L);
// dk/dv [B, T, H, *] += dk_cmp[c] / n_c for each token of block c.
void mean_pool_backward(double* dk, double* dv, const double* dk_cmp, const double* dv_cmp, const Layout& L);

// compressed_attention.cpp — o_cmp [B, T, HQ, V], lse_cmp [B, T, HQ]; o_cmp may be null (lse only).
void compressed_attention_forward(double* o_cmp, double* lse_cmp, const double* q, const double* k_cmp,
                                  const double* v_cmp, const Layout& L, const RowMask& rows = {},
                                  const RowSlots& o_slots = {}, const RowSlots& q_slots = {});
// do_cmp [B, T, HQ, V] is already gated. dq [B,T,HQ,K], dk_cmp [B,C,H,K], dv_cmp [B,C,H,V] accumulate.
void compressed_attention_backward(double* dq, double* dk_cmp, double* dv_cmp, const double* do_cmp, const double* q,
                                   const double* k_cmp, const double* v_cmp, const double* o_cmp,
                                   const double* lse_cmp, const Layout& L);

// topk.cpp — block_indices [B, T, H, S] (int32, -1 padded), by L.config.policy.
void topk_forward(int32_t* block_indices, const double* q, const double* k_cmp, const double* lse_cmp,
                  const Layout& L, const RowMask& rows = {}, const RowSlots& q_slots = {});
// The importance scores of one (batch row b, token t within the row, kv head h) on the per-head mean scale
// (seed policy: score / G), one entry per block of the token's sequence. candidate[c] says whether block c
// may be chosen; forced[c] whether it must be. Used by the tie-aware check (nsa-spec §5.3).
struct BlockScores {
  std::vector<double> score;
  std::vector<uint8_t> candidate, forced;
};
// The order in which top-k admits blocks: score descending; on an exact tie a forced block first (with the
// seed policy a lone visible block scores exactly G, the forced score), then the smaller index.
inline bool topk_admits_before(double score_a, bool forced_a, int64_t a, double score_b, bool forced_b, int64_t b) {
  if (score_a != score_b) return score_a > score_b;
  if (forced_a != forced_b) return forced_a;
  return a < b;
}
void topk_scores(BlockScores& out, int64_t b, int64_t t, int64_t h, const double* q, const double* k_cmp,
                 const double* lse_cmp, const Layout& L, const RowSlots& q_slots = {});

// selected_attention.cpp — o_slc [B, T, HQ, V], lse_slc [B, T, HQ]. block_counts [B, T, H] may be null.
void selected_attention_forward(double* o_slc, double* lse_slc, const double* q, const double* k, const double* v,
                                const int32_t* block_indices, const int32_t* block_counts, const Layout& L,
                                const RowMask& rows = {}, const RowSlots& o_slots = {},
                                const RowSlots& q_slots = {});
void selected_attention_backward(double* dq, double* dk, double* dv, const double* do_slc, const double* q,
                                 const double* k, const double* v, const double* o_slc, const double* lse_slc,
                                 const int32_t* block_indices, const int32_t* block_counts, const Layout& L);

// sliding_window.cpp — o_swa [B, T, HQ, V], lse_swa [B, T, HQ]; keys [max(0, t-W+1), t].
void sliding_window_forward(double* o_swa, double* lse_swa, const double* q, const double* k, const double* v,
                            const Layout& L, const RowMask& rows = {}, const RowSlots& o_slots = {},
                            const RowSlots& q_slots = {});
void sliding_window_backward(double* dq, double* dk, double* dv, const double* do_swa, const double* q,
                             const double* k, const double* v, const double* o_swa, const double* lse_swa,
                             const Layout& L);

// gating.cpp — o [B, T, HQ, V] = sum of gated branches; a null gate (or null branch) drops the branch.
void gate_forward(double* o, const double* o_cmp, const double* o_slc, const double* o_swa, const double* g_cmp,
                  const double* g_slc, const double* g_swa, const Layout& L, const RowMask& rows = {},
                  const RowSlots& o_slots = {});
// do_x = g_x * do (written, [B, T, HQ, V]); dg_x [B, T, HQ] accumulate. Null gate => that branch is skipped.
void gate_backward(double* dg_cmp, double* dg_slc, double* dg_swa, double* do_cmp, double* do_slc, double* do_swa,
                   const double* d_o, const double* o_cmp, const double* o_slc, const double* o_swa,
                   const double* g_cmp, const double* g_slc, const double* g_swa, const Layout& L);

// pipeline.cpp — every stage in order, with the backward when the problem has `do`.
Outputs run_reference(const Problem& p, const RunOptions& opt = {});

class ReferenceBackend : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  bool reads_stored_q() const override { return false; }  // a sampled forward reads the widened q rows only
  Outputs run(const Problem& p, const RunOptions& opt) override { return run_reference(p, opt); }
};

}  // namespace nsa::ref
