// run_reference: every NSA stage in order (nsa-spec §2), then the backward (§3) when the problem has `do`.
// Forward: mean pooling -> compressed attention -> top-k (or the given block_indices) -> selected attention
// -> sliding window (W > 0) -> gating. Backward: gating -> selected / sliding / compressed -> mean pooling.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "reference/group_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

const double* ptr(const std::optional<std::vector<double>>& v) { return v ? v->data() : nullptr; }
double* ptr_or_null(std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

}  // namespace

RowSlots q_slots_for(const Problem& p, const std::vector<int64_t>& sample) {
  if (p.q_rows.empty()) return {};
  if (sample.empty())
    throw std::invalid_argument("run_reference: the problem holds q for sampled rows only; a run over every row "
                                "(or a backward) needs all of it");
  RowSlots slots = sample_slots(p.q_rows, p.layout.dims.B * p.layout.dims.T);
  for (int64_t token : q_rows_read(p.layout, sample))
    if (slots[token] < 0)
      throw std::invalid_argument("run_reference: the problem holds q for " + std::to_string(p.q_rows.size()) +
                                  " rows, not row " + std::to_string(token) + " that this run reads");
  return slots;
}

std::vector<int64_t> q_rows_read(const Layout& L, const std::vector<int64_t>& sample) {
  const int64_t tokens = L.dims.B * L.dims.T;
  const RowMask sampled = sample_mask(sample, tokens);
  std::vector<uint8_t> read(sampled.begin(), sampled.end());
  for (const detail::GroupTile& tile : detail::make_tiles(L)) {
    if (tile.h != 0) continue;  // every kv head cuts its sequence alike
    const Sequence& s = L.sequences[tile.seq];
    const int64_t first = detail::flat_token(L, s, tile.t0), last = detail::flat_token(L, s, tile.t1);
    if (std::find(sampled.begin() + first, sampled.begin() + last, uint8_t(1)) != sampled.begin() + last)
      std::fill(read.begin() + first, read.begin() + last, uint8_t(1));
  }
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < tokens; ++i)
    if (read[i]) rows.push_back(i);
  return rows;
}

Outputs run_reference(const Problem& p, const RunOptions& opt) {
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  const int64_t tokens = d.B * d.T, C = L.chunks;
  const bool backward = p.has_backward() && opt.backward;
  const bool window = L.config.window > 0;
  // The backward needs every forward row, so a row sample only narrows a forward-only run; there the
  // [B, T, HQ, V] outputs hold only the sampled rows (Outputs::rows).
  const std::vector<int64_t> sample = sorted_sample(opt.rows, tokens);
  const RowMask forward_rows = backward ? RowMask{} : sample_mask(sample, tokens);
  const RowSlots o_slots = backward || sample.empty() ? RowSlots{} : sample_slots(sample, tokens);
  const RowSlots q_slots = q_slots_for(p, backward ? std::vector<int64_t>{} : sample);
  const int64_t o_rows = o_slots.empty() ? tokens : int64_t(sample.size());

  Outputs out;
  if (!o_slots.empty()) out.rows = sample;
  out.k_cmp.assign(d.B * C * d.H * d.K, 0);
  out.v_cmp.assign(d.B * C * d.H * d.V, 0);
  mean_pool_forward(out.k_cmp.data(), out.v_cmp.data(), p.k.data(), p.v.data(), L);

  out.o_cmp.assign(o_rows * d.HQ * d.V, 0);
  out.lse_cmp.assign(tokens * d.HQ, 0);
  compressed_attention_forward(out.o_cmp.data(), out.lse_cmp.data(), p.q.data(), out.k_cmp.data(), out.v_cmp.data(), L,
                               forward_rows, o_slots, q_slots);

  if (p.block_indices) {
    out.block_indices = *p.block_indices;
  } else {
    out.block_indices.assign(tokens * d.H * L.S(), -1);
    topk_forward(out.block_indices.data(), p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), L, forward_rows, q_slots);
  }
  const int32_t* counts = p.block_counts ? p.block_counts->data() : nullptr;

  out.o_slc.assign(o_rows * d.HQ * d.V, 0);
  out.lse_slc.assign(tokens * d.HQ, 0);
  selected_attention_forward(out.o_slc.data(), out.lse_slc.data(), p.q.data(), p.k.data(), p.v.data(),
                             out.block_indices.data(), counts, L, forward_rows, o_slots, q_slots);

  if (window) {
    out.o_swa.assign(o_rows * d.HQ * d.V, 0);
    out.lse_swa.assign(tokens * d.HQ, 0);
    sliding_window_forward(out.o_swa.data(), out.lse_swa.data(), p.q.data(), p.k.data(), p.v.data(), L, forward_rows,
                           o_slots, q_slots);
  }

  out.o.assign(o_rows * d.HQ * d.V, 0);
  gate_forward(out.o.data(), out.o_cmp.data(), out.o_slc.data(), ptr_or_null(out.o_swa), ptr(p.g_cmp), ptr(p.g_slc),
               ptr(p.g_swa), L, forward_rows, o_slots);
  if (!backward) return out;

  out.has_grads = true;
  out.dq.assign(tokens * d.HQ * d.K, 0);
  out.dk.assign(tokens * d.H * d.K, 0);
  out.dv.assign(tokens * d.H * d.V, 0);
  out.dk_cmp.assign(d.B * C * d.H * d.K, 0);
  out.dv_cmp.assign(d.B * C * d.H * d.V, 0);
  // A branch takes part in the backward only when its gate is present (and, for the window, W > 0).
  const bool cmp = p.g_cmp.has_value(), slc = p.g_slc.has_value(), swa = p.g_swa.has_value() && window;
  if (p.g_cmp) out.dg_cmp.assign(tokens * d.HQ, 0);
  if (p.g_slc) out.dg_slc.assign(tokens * d.HQ, 0);
  if (p.g_swa) out.dg_swa.assign(tokens * d.HQ, 0);
  std::vector<double> do_cmp(cmp ? tokens * d.HQ * d.V : 0), do_slc(slc ? tokens * d.HQ * d.V : 0),
      do_swa(swa ? tokens * d.HQ * d.V : 0);
  gate_backward(ptr_or_null(out.dg_cmp), ptr_or_null(out.dg_slc), ptr_or_null(out.dg_swa), ptr_or_null(do_cmp),
                ptr_or_null(do_slc), ptr_or_null(do_swa), p.d_o->data(), out.o_cmp.data(), out.o_slc.data(),
                ptr_or_null(out.o_swa), ptr(p.g_cmp), ptr(p.g_slc), swa ? ptr(p.g_swa) : nullptr, L);

  if (slc)
    selected_attention_backward(out.dq.data(), out.dk.data(), out.dv.data(), do_slc.data(), p.q.data(), p.k.data(),
                                p.v.data(), out.o_slc.data(), out.lse_slc.data(), out.block_indices.data(), counts, L);
  if (swa)
    sliding_window_backward(out.dq.data(), out.dk.data(), out.dv.data(), do_swa.data(), p.q.data(), p.k.data(),
                            p.v.data(), out.o_swa.data(), out.lse_swa.data(), L);
  if (cmp)
    compressed_attention_backward(out.dq.data(), out.dk_cmp.data(), out.dv_cmp.data(), do_cmp.data(), p.q.data(),
                                  out.k_cmp.data(), out.v_cmp.data(), out.o_cmp.data(), out.lse_cmp.data(), L);
  mean_pool_backward(out.dk.data(), out.dv.data(), out.dk_cmp.data(), out.dv_cmp.data(), L);
  return out;
}

}  // namespace nsa::ref
