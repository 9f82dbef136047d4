// Comparing a candidate's outputs with the float64 reference (nsa-spec §5.1–§5.4).
#pragma once
#include <cstdint>
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
  double tol = 0, max_abs = 0, max_rel = 0, rel_l2 = 0;
  double baseline_rel_l2 = -1;  // baseline-relative mode: the yardstick's error
  int64_t count_over = 0;       // elements whose |a - e| exceeds tol * max(|e|, rms(e))
  int64_t nonfinite = 0;        // NaN/Inf in the candidate where the expected value is finite
  std::string worst_where;      // "[b, t, head, d]"
  double worst_expected = 0, worst_actual = 0;
};

struct TopkCheck {
  int64_t rows = 0, exact_rows = 0, tie_rows = 0, bad_rows = 0;
  double max_rel_gap = 0;       // largest (s_S - s_b) / s_S over chosen blocks outside the reference set
  std::string first_problem;    // description of the first bad row
  bool pass = true;
};

struct CheckReport {
  std::string case_name;
  std::vector<TensorCheck> tensors;
  std::optional<TopkCheck> topk;
  std::string first_failing_stage;  // empty when everything passes
  bool pass = true;
};

// Checks `candidate` stage by stage against the reference recomputed from the problem's inputs and the
// candidate's own upstream outputs (k_cmp -> o_cmp/lse_cmp -> block_indices -> o_slc -> o, ...), so a wrong
// stage is named rather than smeared over `o`. Tensors the candidate lacks are not checked.
CheckReport check_candidate(const Problem& p, const Outputs& candidate, DType candidate_dtype, const CheckOptions& opt);

void print_report(std::ostream& os, const CheckReport& r);
nlohmann::json report_json(const std::vector<CheckReport>& reports);
std::string report_junit(const std::vector<CheckReport>& reports, const std::string& suite_name);

}  // namespace nsa
