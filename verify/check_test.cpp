// The per-tensor metrics of nsa-spec §5.1 on hand-made values, and the reports built from them.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "core/errors.h"
#include "reference/test_util.h"
#include "verify/check.h"

namespace nsa {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

CompareRule rule_with_tol(double tol) {
  CompareRule r;
  r.tol = tol;
  return r;
}

TEST(CompareTensor, RelL2MaxAbsAndWorstOnHandMadeVectors) {
  // ||e|| = 5, a - e = (0, 0.5): rel-L2 0.1; worst element 1 with relative error 0.5 / 4.
  const TensorCheck c = compare_tensor("o", "gating", {3, 4}, {3, 4.5}, {1, 1, 2, 0}, rule_with_tol(0.11));
  EXPECT_TRUE(c.pass);
  EXPECT_DOUBLE_EQ(c.rel_l2, 0.1);
  EXPECT_DOUBLE_EQ(c.max_abs, 0.5);
  EXPECT_DOUBLE_EQ(c.max_rel, 0.125);
  EXPECT_EQ(c.count_over, 1);
  EXPECT_EQ(c.compared, 2);
  EXPECT_EQ(c.worst_where, "[0, 0, 1]");
  EXPECT_EQ(c.worst_expected, 4);
  EXPECT_EQ(c.worst_actual, 4.5);
}

TEST(CompareTensor, FailsWhenRelL2ExceedsTolerance) {
  const TensorCheck c = compare_tensor("o", "gating", {3, 4}, {3, 4.5}, {1, 1, 2, 0}, rule_with_tol(0.09));
  EXPECT_FALSE(c.pass);
  EXPECT_DOUBLE_EQ(c.rel_l2, 0.1);
}

TEST(CompareTensor, AllZeroExpectedUsesTheAbsoluteNorm) {
  const TensorCheck c = compare_tensor("o_cmp", "compressed_attention", {0, 0}, {3e-13, 4e-13}, {1, 1, 2, 0}, rule_with_tol(1e-12));
  EXPECT_NEAR(c.rel_l2, 5e-13 / std::sqrt(2.0), 1e-27);  // the root-mean-square error
  EXPECT_TRUE(c.pass);
  const TensorCheck big = compare_tensor("o_cmp", "compressed_attention", {0, 0}, {3e-3, 4e-3}, {1, 1, 2, 0}, rule_with_tol(1e-12));
  EXPECT_FALSE(big.pass);
}

TEST(CompareTensor, WorstIndexIsPrintedAsBatchTokenHeadDim) {
  // [B=2, T=3, heads=2, D=4]; element (1, 2, 0, 3) is flat ((1 * 3 + 2) * 2 + 0) * 4 + 3 = 43.
  std::vector<double> e(48), a(48);
  for (int i = 0; i < 48; ++i) e[i] = a[i] = 1 + 0.01 * i;
  a[43] += 0.25;
  a[7] += 0.125;
  const TensorCheck c = compare_tensor("o_slc", "selected_attention", e, a, {2, 3, 2, 4}, rule_with_tol(1e-5));
  EXPECT_FALSE(c.pass);
  EXPECT_EQ(c.worst_where, "[1, 2, 0, 3]");
  EXPECT_DOUBLE_EQ(c.worst_expected, e[43]);
  EXPECT_DOUBLE_EQ(c.worst_actual, e[43] + 0.25);
  EXPECT_EQ(c.count_over, 2);
}

// A gradient that is zero up to float64 rounding (a row with a single key: its weight is 1, ds = 0) has no scale;
// its error counts in absolute terms, per element: exact zeros and fp32-sized noise pass, O(tol) errors fail.
TEST(CompareTensor, AnExpectedZeroIsComparedInAbsoluteTerms) {
  std::vector<double> e(16), exact(16, 0.0), noise(16), off(16, 0.0);
  for (int i = 0; i < 16; ++i) {
    e[i] = (i % 3 - 1) * 1e-16;
    noise[i] = (i % 2 ? 1 : -1) * 3e-8;
  }
  off[4] = 1e-3;
  const CompareRule rule = rule_with_tol(1e-5);
  const TensorCheck c0 = compare_tensor("dq", "backward", e, exact, {1, 4, 1, 4}, rule);
  EXPECT_TRUE(c0.pass);
  EXPECT_LT(c0.rel_l2, 1e-15);
  EXPECT_TRUE(compare_tensor("dq", "backward", e, noise, {1, 4, 1, 4}, rule).pass);
  const TensorCheck c2 = compare_tensor("dq", "backward", e, off, {1, 4, 1, 4}, rule);
  EXPECT_FALSE(c2.pass);
  EXPECT_NEAR(c2.rel_l2, 1e-3 / 4, 1e-9);  // rms of the error over 16 elements
  // Just above the zero threshold the rule is relative again: the same noise is then far over tolerance.
  std::vector<double> small(16, 1e-11);
  EXPECT_FALSE(compare_tensor("dq", "backward", small, noise, {1, 4, 1, 4}, rule).pass);
}

TEST(CompareTensor, NaNInTheCandidateFailsWhateverTheTolerance) {
  std::vector<double> e(12, 1.0), a = e;
  a[5] = kNaN;
  const TensorCheck c = compare_tensor("lse_slc", "selected_attention", e, a, {1, 4, 3, 0}, rule_with_tol(1e9));
  EXPECT_FALSE(c.pass);
  EXPECT_EQ(c.nonfinite, 1);
  EXPECT_EQ(c.worst_where, "[0, 1, 2]");
  EXPECT_TRUE(std::isnan(c.worst_actual));
  EXPECT_EQ(c.rel_l2, 0);  // the finite elements agree: the NaN alone fails the tensor
}

TEST(CompareTensor, InfInTheCandidateFails) {
  std::vector<double> e(6, 2.0), a = e;
  a[0] = kInf;
  const TensorCheck c = compare_tensor("dq", "backward", e, a, {1, 3, 2, 0}, rule_with_tol(1));
  EXPECT_FALSE(c.pass);
  EXPECT_EQ(c.nonfinite, 1);
}

TEST(CompareTensor, LseOfEmptyRowsMayBeZeroOrMinusInfOnEitherSide) {
  const std::vector<uint8_t> empty{1, 1, 0};
  CompareRule r = rule_with_tol(1e-12);
  r.empty_rows = &empty;
  EXPECT_TRUE(compare_tensor("lse_cmp", "compressed_attention", {0, -kInf, 1.5}, {-kInf, 0, 1.5}, {1, 3, 1, 0}, r).pass);
  EXPECT_TRUE(compare_tensor("lse_cmp", "compressed_attention", {0, 0, 1.5}, {0, 0, 1.5}, {1, 3, 1, 0}, r).pass);
  // Only rows without keys are exempt, and only for the values 0 and -inf.
  EXPECT_FALSE(compare_tensor("lse_cmp", "compressed_attention", {0, 0, 1.5}, {0, 0, -kInf}, {1, 3, 1, 0}, r).pass);
  EXPECT_FALSE(compare_tensor("lse_cmp", "compressed_attention", {0, 0, 1.5}, {0.5, 0, 1.5}, {1, 3, 1, 0}, r).pass);
  EXPECT_FALSE(compare_tensor("lse_cmp", "compressed_attention", {0, 0, 1.5}, {kNaN, 0, 1.5}, {1, 3, 1, 0}, r).pass);
  // Without the exemption -inf is a non-finite value where a finite one was expected.
  EXPECT_FALSE(compare_tensor("lse_cmp", "compressed_attention", {0, 0, 1.5}, {-kInf, 0, 1.5}, {1, 3, 1, 0},
                              rule_with_tol(1e-12)).pass);
}

TEST(CompareTensor, RowMaskComparesOnlyTheSampledRows) {
  // [B=1, T=4, heads=1, D=2]; row 2 is wrong.
  const std::vector<double> e{1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<double> a = e;
  a[4] = 50;
  const ref::RowMask without_row2{1, 1, 0, 1}, with_row2{0, 0, 1, 0};
  CompareRule r = rule_with_tol(1e-12);
  r.rows = &without_row2;
  const TensorCheck skip = compare_tensor("o", "gating", e, a, {1, 4, 1, 2}, r);
  EXPECT_TRUE(skip.pass);
  EXPECT_EQ(skip.compared, 6);
  r.rows = &with_row2;
  const TensorCheck hit = compare_tensor("o", "gating", e, a, {1, 4, 1, 2}, r);
  EXPECT_FALSE(hit.pass);
  EXPECT_EQ(hit.compared, 2);
  EXPECT_EQ(hit.worst_where, "[0, 2, 0, 0]");
}

TEST(CompareTensor, SizeMismatchIsAnInputError) {
  EXPECT_THROW(compare_tensor("o", "gating", {1, 2, 3}, {1, 2}, {1, 3, 1, 0}, rule_with_tol(1)), InputError);
}

TEST(CheckCandidate, WrongSizedUpstreamTensorIsAnInputError) {
  const Problem p = test::random_problem({});
  Outputs cand;
  cand.o_slc.assign(7, 0.0);
  EXPECT_THROW(check_candidate(p, cand, DType::F32, {}), InputError);
  cand = Outputs{};
  cand.block_indices.assign(3, 0);
  EXPECT_THROW(check_candidate(p, cand, DType::F32, {}), InputError);
}

TEST(CheckTolerances, DefaultsFollowTheSpec) {
  const Tolerances t;
  EXPECT_EQ(t.for_dtype(DType::F64), 1e-12);
  EXPECT_EQ(t.for_dtype(DType::F32), 1e-5);
  EXPECT_EQ(t.for_dtype(DType::F16), 2e-3);
  EXPECT_EQ(t.for_dtype(DType::BF16), 1.6e-2);
  const TieTolerances tie;
  EXPECT_EQ(tie.for_dtype(DType::F64), 1e-9);
  EXPECT_EQ(tie.for_dtype(DType::F32), 1e-4);
  EXPECT_EQ(tie.for_dtype(DType::F16), 1e-2);
  EXPECT_EQ(tie.for_dtype(DType::BF16), 5e-2);
  EXPECT_EQ(tie.atol, 1e-9);
}

// A report with one failing tensor, as check_candidate would make it.
CheckReport failing_report() {
  CheckReport r;
  r.case_name = "case<1>";
  r.candidate_dtype = DType::BF16;
  std::vector<double> e{1, 2, 3, 4}, a = e;
  a[3] = kNaN;
  r.tensors.push_back(compare_tensor("k_cmp", "mean_pool", e, e, {1, 2, 2, 0}, rule_with_tol(1e-2)));
  r.tensors.push_back(compare_tensor("o_slc", "selected_attention", e, a, {1, 2, 2, 0}, rule_with_tol(1e-2)));
  TopkCheck t;
  t.rows = 10;
  t.exact_rows = 9;
  t.tie_rows = 1;
  t.max_rel_gap = 2e-5;
  r.topk = t;
  r.first_failing_stage = "selected_attention";
  r.pass = false;
  return r;
}

TEST(CheckReports, TableNamesTheFirstFailingStageAndTensor) {
  std::ostringstream os;
  print_report(os, failing_report());
  const std::string text = os.str();
  EXPECT_NE(text.find("k_cmp"), std::string::npos);
  EXPECT_NE(text.find("exact set 90.00%, tie rows 1, bad rows 0"), std::string::npos) << text;
  EXPECT_NE(text.find("FAIL (1 NaN/Inf)"), std::string::npos) << text;
  EXPECT_NE(text.find("FAIL: first failing stage: selected_attention: o_slc"), std::string::npos) << text;
  EXPECT_NE(text.find("[0, 1, 1]"), std::string::npos) << text;
}

TEST(CheckReports, JsonHoldsEveryMetricAndSpellsNaN) {
  const nlohmann::json j = report_json({failing_report()});
  EXPECT_FALSE(j["pass"].get<bool>());
  const auto& c = j["cases"][0];
  EXPECT_EQ(c["first_failing_stage"], "selected_attention");
  EXPECT_EQ(c["candidate_dtype"], "bf16");
  ASSERT_EQ(c["tensors"].size(), 2u);
  EXPECT_EQ(c["tensors"][1]["name"], "o_slc");
  EXPECT_EQ(c["tensors"][1]["nonfinite"], 1);
  EXPECT_EQ(c["tensors"][1]["worst"]["actual"], "nan");
  EXPECT_EQ(c["tensors"][1]["worst"]["index"], "[0, 1, 1]");
  EXPECT_TRUE(c["tensors"][0]["baseline_rel_l2"].is_null());
  EXPECT_EQ(c["topk"]["tie_rows"], 1);
  EXPECT_DOUBLE_EQ(c["topk"]["max_rel_gap"].get<double>(), 2e-5);
}

TEST(CheckReports, JUnitHasOneTestcasePerCaseAndEscapesNames) {
  CheckReport ok;
  ok.case_name = "fine";
  const std::string xml = report_junit({ok, failing_report()}, "suite & co");
  EXPECT_NE(xml.find("<testsuite name=\"suite &amp; co\" tests=\"2\" failures=\"1\""), std::string::npos) << xml;
  EXPECT_NE(xml.find("<testcase classname=\"suite &amp; co\" name=\"fine\"/>"), std::string::npos) << xml;
  EXPECT_NE(xml.find("name=\"case&lt;1&gt;\""), std::string::npos) << xml;
  EXPECT_NE(xml.find("<failure message=\"first failing stage: selected_attention: o_slc"), std::string::npos) << xml;
  EXPECT_EQ(xml.find("case<1>"), std::string::npos);
}

}  // namespace
}  // namespace nsa
