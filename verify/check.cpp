// Stage-isolated comparison of a candidate with the float64 reference (nsa-spec §5.1, §5.2, §5.4).
//
// Each stage's expected output is the reference stage evaluated on the candidate's own upstream outputs, so a
// wrong stage is named rather than smeared over `o`. Top-k is the exception: its scores come from the
// reference's own k_cmp and lse_cmp, because the tie rule is about the true scores.
//
// Baseline-relative mode (FlashAttention's rule): the yardstick is the same stage-isolated reference with its
// inputs, its upstream and every stage output rounded to the candidate's dtype (computed in float64 in
// between). A tensor passes when its error is at most `baseline_factor` times the yardstick's error, or below a
// tenth of the plain tolerance: rounding only between stages, the yardstick can be exact (float64, exactly
// representable values) or smaller than the accumulated error of an honest kernel.
#include "verify/check.h"

#include <algorithm>
#include <omp.h>

#include "core/errors.h"
#include "verify/generator.h"

namespace nsa {

double Tolerances::for_dtype(DType t) const {
  switch (t) {
    case DType::F64: return f64;
    case DType::F16: return f16;
    case DType::BF16: return bf16;
    default: return f32;
  }
}

double TieTolerances::for_dtype(DType t) const {
  switch (t) {
    case DType::F64: return f64;
    case DType::F16: return f16;
    case DType::BF16: return bf16;
    default: return f32;
  }
}

const std::vector<std::string>& check_stages() {
  static const std::vector<std::string> stages{"mean_pool",      "compressed_attention", "topk",    "selected_attention",
                                               "sliding_window", "gating",               "backward"};
  return stages;
}

namespace {

using Vec = std::vector<double>;

// Rounds values to the candidate's dtype when computing the yardstick; the identity for the reference.
struct Precision {
  std::optional<DType> dtype;
  void apply(Vec& x) const {
    if (!dtype) return;
    const DType t = *dtype;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < int64_t(x.size()); ++i) x[i] = round_to(t, x[i]);
  }
  void apply(std::optional<Vec>& x) const {
    if (x) apply(*x);
  }
};

// What each candidate tensor is compared with.
struct Recomputed {
  Outputs expected;
  Vec lse_cmp_true;                   // lse_cmp from the reference's own k_cmp: the top-k scores use it
  std::vector<int32_t> used_indices;  // the selection the later stages were evaluated with
};

// The candidate's block indices with entries outside [-1, NB) replaced by -1: the top-k check reports them,
// and the later stages must not read outside the sequence.
std::vector<int32_t> in_range_indices(const std::vector<int32_t>& indices, const Layout& L) {
  std::vector<int32_t> out = indices;
  const int64_t H = L.dims.H, S = L.S();
  for (const Sequence& s : L.sequences) {
    const int64_t nb = ceil_div(s.length, L.BS());
    for (int64_t t = s.start; t < s.start + s.length; ++t)
      for (int64_t j = 0; j < H * S; ++j) {
        int32_t& c = out[(s.batch * L.dims.T + t) * H * S + j];
        if (c < -1 || c >= nb) c = -1;
      }
  }
  return out;
}

// `fixed_indices` (the yardstick's case) overrides the selection so that both computations use the same one.
// `o_slots` (compact candidates, Outputs::rows) makes the [B, T, HQ, V] outputs compact as the candidate's.
Recomputed recompute(const Problem& p, const Outputs& cand, const ref::RowMask& rows, const ref::RowSlots& o_slots,
                     const ref::RowSlots& q_slots, const Precision& rd, const std::vector<int32_t>* fixed_indices,
                     bool with_grads) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  const int64_t C = L.chunks, tokens = d.B * d.T;
  const int64_t o_rows = o_slots.empty() ? tokens : int64_t(cand.rows.size());  // rows of the [*, HQ, V] outputs
  Problem rounded;
  const Problem* in = &p;
  if (rd.dtype) {
    rounded = p;
    for (Vec* x : {&rounded.q, &rounded.k, &rounded.v}) rd.apply(*x);
    for (auto* x : {&rounded.g_cmp, &rounded.g_slc, &rounded.g_swa, &rounded.d_o}) rd.apply(*x);
    in = &rounded;
  }
  // The candidate's own upstream tensor when it has one (rounded for the yardstick), else `fallback`.
  auto upstream = [&](const Vec& own, const Vec& fallback, Vec& holder) -> const double* {
    if (own.empty()) return fallback.data();
    if (!rd.dtype) return own.data();
    holder = own;
    rd.apply(holder);
    return holder.data();
  };
  auto gate = [](const std::optional<Vec>& g) { return g ? g->data() : nullptr; };

  Recomputed r;
  Outputs& e = r.expected;
  if (!o_slots.empty()) e.rows = cand.rows;
  e.k_cmp.assign(d.B * C * d.H * d.K, 0);
  e.v_cmp.assign(d.B * C * d.H * d.V, 0);
  ref::mean_pool_forward(e.k_cmp.data(), e.v_cmp.data(), in->k.data(), in->v.data(), L);
  rd.apply(e.k_cmp);
  rd.apply(e.v_cmp);

  Vec k_cmp_own, v_cmp_own;
  const double* k_cmp = upstream(cand.k_cmp, e.k_cmp, k_cmp_own);
  const double* v_cmp = upstream(cand.v_cmp, e.v_cmp, v_cmp_own);
  e.o_cmp.assign(o_rows * d.HQ * d.V, 0);
  e.lse_cmp.assign(tokens * d.HQ, 0);
  ref::compressed_attention_forward(e.o_cmp.data(), e.lse_cmp.data(), in->q.data(), k_cmp, v_cmp, L, rows, o_slots,
                                    q_slots);
  if (!rd.dtype) {
    if (cand.k_cmp.empty()) {
      r.lse_cmp_true = e.lse_cmp;  // lse depends on k_cmp only
    } else {
      r.lse_cmp_true.assign(e.lse_cmp.size(), 0);
      ref::compressed_attention_forward(nullptr, r.lse_cmp_true.data(), in->q.data(), e.k_cmp.data(), e.v_cmp.data(),
                                        L, rows, {}, q_slots);
    }
  }
  rd.apply(e.o_cmp);
  rd.apply(e.lse_cmp);

  if (fixed_indices) {
    r.used_indices = *fixed_indices;
  } else {
    if (p.block_indices) {
      e.block_indices = *p.block_indices;
    } else {
      e.block_indices.assign(tokens * d.H * L.S(), -1);
      ref::topk_forward(e.block_indices.data(), in->q.data(), e.k_cmp.data(), r.lse_cmp_true.data(), L, rows, q_slots);
    }
    r.used_indices = cand.block_indices.empty() ? e.block_indices : in_range_indices(cand.block_indices, L);
  }
  const int32_t* counts = p.block_counts ? p.block_counts->data() : nullptr;

  e.o_slc.assign(o_rows * d.HQ * d.V, 0);
  e.lse_slc.assign(tokens * d.HQ, 0);
  ref::selected_attention_forward(e.o_slc.data(), e.lse_slc.data(), in->q.data(), in->k.data(), in->v.data(),
                                  r.used_indices.data(), counts, L, rows, o_slots, q_slots);
  rd.apply(e.o_slc);
  rd.apply(e.lse_slc);

  if (L.config.window > 0) {
    e.o_swa.assign(o_rows * d.HQ * d.V, 0);
    e.lse_swa.assign(tokens * d.HQ, 0);
    ref::sliding_window_forward(e.o_swa.data(), e.lse_swa.data(), in->q.data(), in->k.data(), in->v.data(), L, rows,
                                o_slots, q_slots);
    rd.apply(e.o_swa);
    rd.apply(e.lse_swa);
  }

  Vec o_cmp_own, o_slc_own, o_swa_own;
  const double* o_cmp = upstream(cand.o_cmp, e.o_cmp, o_cmp_own);
  const double* o_slc = upstream(cand.o_slc, e.o_slc, o_slc_own);
  const double* o_swa = L.config.window > 0 ? upstream(cand.o_swa, e.o_swa, o_swa_own) : nullptr;
  e.o.assign(o_rows * d.HQ * d.V, 0);
  ref::gate_forward(e.o.data(), o_cmp, o_slc, o_swa, gate(in->g_cmp), gate(in->g_slc), gate(in->g_swa), L, rows,
                    o_slots);
  rd.apply(e.o);

  if (with_grads) {
    // The backward of the candidate's own selection.
    Problem frozen = *in;
    frozen.block_indices = r.used_indices;
    RunOptions run;
    run.backward = true;
    Outputs g = ref::run_reference(frozen, run);
    e.has_grads = true;
    for (auto field : {&Outputs::dq, &Outputs::dk, &Outputs::dv, &Outputs::dg_cmp, &Outputs::dg_slc, &Outputs::dg_swa,
                       &Outputs::dk_cmp, &Outputs::dv_cmp}) {
      e.*field = std::move(g.*field);
      rd.apply(e.*field);
    }
  }
  return r;
}

// Per element of an lse tensor [B, T, HQ]: whether the row has no key (0 and -inf then mean the same).
std::vector<uint8_t> empty_compressed_rows(const Layout& L) {
  const Dims& d = L.dims;
  std::vector<uint8_t> empty(d.B * d.T * d.HQ, 0);
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < std::min(s.length, L.BS() - 1); ++t)
      std::fill_n(empty.begin() + (s.batch * d.T + s.start + t) * d.HQ, d.HQ, 1);
  return empty;
}

std::vector<uint8_t> empty_selected_rows(const Layout& L, const std::vector<int32_t>& indices, const Problem& p) {
  const Dims& d = L.dims;
  const int64_t S = L.S(), G = d.G();
  std::vector<uint8_t> empty(d.B * d.T * d.HQ, 0);
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const int64_t flat = s.batch * d.T + s.start + t;
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t n = p.block_counts ? (*p.block_counts)[flat * d.H + h] : S;
        bool any_key = false;
        for (int64_t j = 0; j < n && !any_key; ++j) {
          const int64_t c = indices[(flat * d.H + h) * S + j];
          any_key = c >= 0 && c * L.BS() <= t;
        }
        if (!any_key) std::fill_n(empty.begin() + flat * d.HQ + h * G, G, 1);
      }
    }
  return empty;
}

// A problem that gave block_indices skips top-k: the candidate must repeat them.
TopkCheck given_indices_check(const std::vector<int32_t>& candidate, const std::vector<int32_t>& given, const Layout& L,
                              const ref::RowMask& rows) {
  TopkCheck c;
  c.given = true;
  const int64_t T = L.dims.T, H = L.dims.H, S = L.S();
  for (const Sequence& s : L.sequences)
    for (int64_t t = s.start; t < s.start + s.length; ++t) {
      const int64_t flat = s.batch * T + t;
      if (!rows.empty() && !rows[flat]) continue;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = (flat * H + h) * S;
        ++c.rows;
        if (std::equal(candidate.begin() + at, candidate.begin() + at + S, given.begin() + at)) {
          ++c.exact_rows;
        } else if (c.bad_rows++ == 0) {
          c.first_problem = "[" + std::to_string(s.batch) + ", " + std::to_string(t) + ", " + std::to_string(h) +
                            "]: differs from the given block_indices";
        }
      }
    }
  c.pass = c.bad_rows == 0;
  return c;
}

}  // namespace

CheckReport check_candidate(const Problem& p, const Outputs& cand, DType candidate_dtype, const CheckOptions& opt) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  const ref::RowMask& rows = opt.rows;
  if (!rows.empty() && int64_t(rows.size()) != d.B * d.T)
    throw std::invalid_argument("row mask has " + std::to_string(rows.size()) + " entries, expected B * T = " +
                                std::to_string(d.B * d.T));

  // Tensors fed to later stages must have their full size (the comparison checks the others).
  const int64_t tokens = d.B * d.T, C = L.chunks;
  auto require_size = [](const char* name, std::size_t have, int64_t want) {
    if (have != 0 && int64_t(have) != want)
      fail_input("", name, "candidate has " + std::to_string(have) + " elements, expected " + std::to_string(want));
  };
  require_size("k_cmp", cand.k_cmp.size(), d.B * C * d.H * d.K);
  require_size("v_cmp", cand.v_cmp.size(), d.B * C * d.H * d.V);
  require_size("block_indices", cand.block_indices.size(), tokens * d.H * L.S());
  // The rows this check samples (ascending; none: every row). A compact candidate (Outputs::rows) must hold
  // exactly those.
  std::vector<int64_t> sample;
  for (int64_t r = 0; r < int64_t(rows.size()); ++r)
    if (rows[r]) sample.push_back(r);
  const bool compact = !cand.rows.empty();
  if (compact && sample != cand.rows)
    fail_input("", "o", "the candidate's " + std::to_string(cand.rows.size()) + " compact rows are not the " +
                            std::to_string(sample.size()) + " rows this check samples");
  const ref::RowSlots o_slots = compact ? sample_slots(cand.rows, tokens) : ref::RowSlots{};
  const int64_t o_rows = compact ? int64_t(cand.rows.size()) : tokens;
  for (const auto& [name, x] : {std::pair<const char*, const Vec*>{"o_cmp", &cand.o_cmp}, {"o_slc", &cand.o_slc}, {"o_swa", &cand.o_swa}})
    require_size(name, x->size(), o_rows * d.HQ * d.V);

  CheckReport rep;
  rep.candidate_dtype = candidate_dtype;
  rep.baseline_relative = opt.baseline_relative;
  rep.sampled_rows = int64_t(sample.size());
  // Row-sampled mode checks forward tensors only.
  const bool with_grads = rows.empty() && p.has_backward() && cand.has_grads;
  // A problem loaded with q for sampled rows only (Problem::q_rows) must hold every row this check reads.
  ref::RowSlots q_slots;
  try {
    q_slots = ref::q_slots_for(p, sample);
  } catch (const std::invalid_argument& e) {
    fail_input("", "q", e.what());
  }
  const Recomputed ref = recompute(p, cand, rows, o_slots, q_slots, Precision{}, nullptr, with_grads);
  std::optional<Recomputed> yard;
  if (opt.baseline_relative)
    yard = recompute(p, cand, rows, o_slots, q_slots, Precision{candidate_dtype}, &ref.used_indices, with_grads);

  const double tol = opt.rtol_override.value_or(opt.tol.for_dtype(candidate_dtype));
  const std::vector<uint8_t> empty_cmp = empty_compressed_rows(L);
  const std::vector<uint8_t> empty_slc = empty_selected_rows(L, ref.used_indices, p);
  const TensorGeometry pooled_k{d.B, L.chunks, d.H, d.K}, pooled_v{d.B, L.chunks, d.H, d.V};
  const TensorGeometry out_q{d.B, d.T, d.HQ, d.K}, out_v{d.B, d.T, d.HQ, d.V}, per_head{d.B, d.T, d.HQ, 0};
  const TensorGeometry kv_k{d.B, d.T, d.H, d.K}, kv_v{d.B, d.T, d.H, d.V};
  // The [*, HQ, V] outputs: compact ones hold only sampled rows, so every row of theirs is compared.
  TensorGeometry out_o = out_v;
  if (compact) out_o = TensorGeometry{1, o_rows, d.HQ, d.V, &cand.rows, d.T};

  auto compare = [&](const char* name, const char* stage, std::vector<double> Outputs::*field, const TensorGeometry& g,
                     bool per_token, const std::vector<uint8_t>* empty = nullptr) {
    const Vec& actual = cand.*field;
    const Vec& expected = ref.expected.*field;
    if (actual.empty() || expected.empty()) return;
    CompareRule rule;
    rule.tol = tol;
    rule.rows = per_token ? &rows : nullptr;
    rule.empty_rows = empty;
    double baseline = -1;
    if (yard) {
      baseline = compare_tensor(name, stage, expected, yard->expected.*field, g, rule).rel_l2;
      rule.tol = std::max(opt.baseline_factor * baseline, tol / 10);
    }
    TensorCheck c = compare_tensor(name, stage, expected, actual, g, rule);
    c.baseline_rel_l2 = baseline;
    rep.tensors.push_back(std::move(c));
  };

  compare("k_cmp", "mean_pool", &Outputs::k_cmp, pooled_k, false);
  compare("v_cmp", "mean_pool", &Outputs::v_cmp, pooled_v, false);
  compare("o_cmp", "compressed_attention", &Outputs::o_cmp, out_o, !compact);
  compare("lse_cmp", "compressed_attention", &Outputs::lse_cmp, per_head, true, &empty_cmp);
  if (!cand.block_indices.empty()) {
    if (p.block_indices)
      rep.topk = given_indices_check(cand.block_indices, *p.block_indices, L, rows);
    else
      rep.topk = check_topk(cand.block_indices, p, ref.expected.k_cmp.data(), ref.lse_cmp_true.data(),
                            opt.tie.for_dtype(candidate_dtype), opt.tie.atol, rows);
  }
  compare("o_slc", "selected_attention", &Outputs::o_slc, out_o, !compact);
  compare("lse_slc", "selected_attention", &Outputs::lse_slc, per_head, true, &empty_slc);
  compare("o_swa", "sliding_window", &Outputs::o_swa, out_o, !compact);
  compare("lse_swa", "sliding_window", &Outputs::lse_swa, per_head, true);
  compare("o", "gating", &Outputs::o, out_o, !compact);
  compare("dq", "backward", &Outputs::dq, out_q, true);
  compare("dk", "backward", &Outputs::dk, kv_k, true);
  compare("dv", "backward", &Outputs::dv, kv_v, true);
  compare("dg_cmp", "backward", &Outputs::dg_cmp, per_head, true);
  compare("dg_slc", "backward", &Outputs::dg_slc, per_head, true);
  compare("dg_swa", "backward", &Outputs::dg_swa, per_head, true);
  compare("dk_cmp", "backward", &Outputs::dk_cmp, pooled_k, false);
  compare("dv_cmp", "backward", &Outputs::dv_cmp, pooled_v, false);
  if (rep.tensors.empty() && !rep.topk) throw InputError("the candidate holds none of the output tensors that can be checked");

  for (const std::string& stage : check_stages()) {
    bool failed = stage == "topk" && rep.topk && !rep.topk->pass;
    for (const TensorCheck& t : rep.tensors) failed = failed || (t.stage == stage && !t.pass);
    if (failed) {
      rep.first_failing_stage = stage;
      break;
    }
  }
  rep.pass = rep.first_failing_stage.empty();
  return rep;
}

std::function<std::vector<int64_t>(const Layout&)> sampled_q_rows(int64_t count, uint64_t seed,
                                                                  std::vector<int64_t>& sample) {
  return [count, seed, &sample](const Layout& L) {
    sample = gen::sample_rows(L.dims.B * L.dims.T, count, seed);
    return ref::q_rows_read(L, sample);
  };
}

}  // namespace nsa
