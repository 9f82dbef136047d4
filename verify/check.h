// Comparing a candidate's outputs with the float64 reference (nsa-spec §5.1–§5.4).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/problem.h"
#include "reference/reference.h"

namespace nsa {

// Default rel-L2 tolerances by the candidate's input dtype.
struct Tolerances {
  double f64 = 1e-12, f32 = 1e-5, f16 = 2e-3, bf16 = 1.6e-2;
  double for_dtype(DType t) const;
};

// Relative tie tolerance of the top-k rule by the candidate's dtype (atol = 1e-9 on the mean scale).
struct TieTolerances {
  double f64 = 1e-9, f32 = 1e-4, f16 = 1e-2, bf16 = 5e-2, atol = 1e-9;
  double for_dtype(DType t) const;
};

struct CheckOptions {
  Tolerances tol;
  TieTolerances tie;
  std::optional<double> rtol_override;  // one rel-L2 tolerance for every tensor
  bool baseline_relative = false;       // error <= factor x error of the reference run in the candidate's dtype
  double baseline_factor = 2.0;
  ref::RowMask rows;                    // row-sampled mode: only these query rows are compared
  int threads = 0;
};

struct TensorCheck {
  std::string name;   // e.g. "o_slc"
  std::string stage;  // e.g. "selected_attention"
  bool pass = true;
  // tol is the rel-L2 bound applied (baseline-relative mode: max(factor x baseline, plain tol / 10));
  // max_rel is the largest |a - e| / max(|e|, rms(e)), so that elements near zero do not dominate it.
  double tol = 0, max_abs = 0, max_rel = 0, rel_l2 = 0;
  double baseline_rel_l2 = -1;  // baseline-relative mode: the yardstick's error
  int64_t count_over = 0;       // elements whose |a - e| exceeds tol * max(|e|, rms(e))
  int64_t nonfinite = 0;        // NaN/Inf in the candidate where the expected value is finite
  std::string worst_where;      // "[b, t, head, d]"
  double worst_expected = 0, worst_actual = 0;
  int64_t compared = 0;         // elements compared (row-sampled mode compares fewer)
};

struct TopkCheck {
  int64_t rows = 0, exact_rows = 0, tie_rows = 0, bad_rows = 0;
  double max_rel_gap = 0;       // largest (s_S - s_b) / s_S over chosen blocks outside the reference set
  std::string first_problem;    // description of the first bad row
  bool pass = true;
  bool given = false;           // the problem gave block_indices: the candidate must repeat them exactly
};

struct CheckReport {
  std::string case_name;
  std::vector<TensorCheck> tensors;
  std::optional<TopkCheck> topk;
  std::string first_failing_stage;  // empty when everything passes
  bool pass = true;
  DType candidate_dtype = DType::F32;
  bool baseline_relative = false;
  int64_t sampled_rows = 0;         // row-sampled mode: query rows compared; 0 => every row
};

// Checks `candidate` stage by stage against the reference recomputed from the problem's inputs and the
// candidate's own upstream outputs (k_cmp -> o_cmp/lse_cmp -> block_indices -> o_slc -> o, ...), so a wrong
// stage is named rather than smeared over `o`. Tensors the candidate lacks are not checked.
CheckReport check_candidate(const Problem& p, const Outputs& candidate, DType candidate_dtype, const CheckOptions& opt);

void print_report(std::ostream& os, const CheckReport& r);
nlohmann::json report_json(const std::vector<CheckReport>& reports);
std::string report_junit(const std::vector<CheckReport>& reports, const std::string& suite_name);

// The pieces check_candidate is built from, public so that they can be tested on hand-made values.

// Stage names in pipeline order; "first failing stage" means first in this order.
const std::vector<std::string>& check_stages();

// How a flat element index maps to [b, row, head, d]: a tensor [B, rows, heads, D], or [B, rows, heads]
// when D == 0. rows is T for per-token tensors and C for pooled ones.
struct TensorGeometry {
  int64_t B = 1, rows = 1, heads = 1, D = 0;
  // A compact tensor of sampled rows (Outputs::rows): row r is query row (*sample)[r] = b * T + t.
  const std::vector<int64_t>* sample = nullptr;
  int64_t T = 0;
};

struct CompareRule {
  double tol = 0;
  const ref::RowMask* rows = nullptr;  // compare only rows b * rows + row marked here; null or empty => all
  // Elements (same indexing as the tensor) of lse rows with no visible key: 0 and -inf mean the same there.
  const std::vector<uint8_t>* empty_rows = nullptr;
};

// Below this root-mean-square an expected tensor counts as zero (float64 rounding of a mathematical zero), and
// compare_tensor's rel_l2 is the root-mean-square error itself.
constexpr double kZeroRms = 1e-12;

// The §5.1 metrics of one tensor. Throws InputError when the sizes differ.
TensorCheck compare_tensor(const std::string& name, const std::string& stage, const std::vector<double>& expected,
                           const std::vector<double>& actual, const TensorGeometry& g, const CompareRule& rule);

// The §5.3 verdict on one top-k row: `chosen` holds S entries, `scores` the reference's scores of the row.
struct TopkRowVerdict {
  bool valid = true;
  bool exact = false;       // same set as the reference's own top-S
  double max_rel_gap = 0;   // over chosen blocks outside the reference set
  std::string reason;       // why the row is invalid
};
TopkRowVerdict judge_topk_row(const int32_t* chosen, int64_t S, const ref::BlockScores& scores, double rtol, double atol);

// load_problem's q_rows_for in a row-sampled check of `count` rows drawn with `seed` (gen::sample_rows): it draws
// the sample into `sample` once the layout is known and returns the q rows a forward over it reads, so that only
// those are widened to float64.
std::function<std::vector<int64_t>(const Layout&)> sampled_q_rows(int64_t count, uint64_t seed,
                                                                  std::vector<int64_t>& sample);

// Applies judge_topk_row to every (token, kv head) row of `candidate` [B, T, H, S] (only rows in `rows` when
// it is non-empty), with scores from q and the reference's k_cmp and lse_cmp.
TopkCheck check_topk(const std::vector<int32_t>& candidate, const Problem& p, const double* k_cmp, const double* lse_cmp,
                     double rtol, double atol, const ref::RowMask& rows);

}  // namespace nsa
