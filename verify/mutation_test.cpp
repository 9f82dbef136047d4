// Mutation tests of check_candidate: the reference's own outputs pass, and each deliberately wrong candidate
// fails with the right first failing stage (nsa-spec §5.2), while genuine near-ties pass (§5.3).
#include <cmath>
#include <functional>
#include <random>

#include <gtest/gtest.h>

#include "core/errors.h"
#include "reference/reference.h"
#include "reference/test_util.h"
#include "verify/check.h"

namespace nsa {
namespace {

using Vec = std::vector<double>;

// B = 2, T = 100 (not a multiple of BS), G = 2, K != V, every branch gated, a window, and `do`.
test::ProblemSpec base_spec() {
  test::ProblemSpec s;
  s.B = 2;
  s.T = 100;
  s.HQ = 4;
  s.H = 2;
  s.K = 16;
  s.V = 12;
  s.config.block_size = 16;
  s.config.block_count = 3;
  s.config.window = 20;
  s.gate_swa = true;
  s.with_do = true;
  s.seed = 7;
  return s;
}

void round_all(Vec& x, DType t) {
  for (double& v : x) v = round_to(t, v);
}

// Outputs as a file of dtype `t` stores them.
Outputs stored_as(Outputs o, DType t) {
  for (Vec* x : {&o.k_cmp, &o.v_cmp, &o.o_cmp, &o.lse_cmp, &o.o_slc, &o.lse_slc, &o.o_swa, &o.lse_swa, &o.o, &o.dq, &o.dk,
                 &o.dv, &o.dg_cmp, &o.dg_slc, &o.dg_swa, &o.dk_cmp, &o.dv_cmp})
    round_all(*x, t);
  return o;
}

const double* ptr(const std::optional<Vec>& v) { return v ? v->data() : nullptr; }
const double* ptr(const Vec& v) { return v.empty() ? nullptr : v.data(); }

// Recomputes o from the candidate's own branches, so that only the mutated branch is wrong.
void regate(const Problem& p, Outputs& c) {
  ref::gate_forward(c.o.data(), ptr(c.o_cmp), ptr(c.o_slc), ptr(c.o_swa), ptr(p.g_cmp), ptr(p.g_slc), ptr(p.g_swa), p.layout);
}

CheckReport check(const Problem& p, const Outputs& cand, DType dtype = DType::F32, const CheckOptions& opt = {}) {
  return check_candidate(p, cand, dtype, opt);
}

std::string describe(const CheckReport& r) {
  std::ostringstream os;
  print_report(os, r);
  return os.str();
}

// Softmax attention of query head i of flat token tq (batch row b) over the key tokens `keys` of that row.
void attend(const Problem& p, int64_t b, int64_t tq, int64_t i, const std::vector<int64_t>& keys, double* o, double* lse) {
  const Dims& d = p.layout.dims;
  const int64_t h = i / d.G();
  std::fill(o, o + d.V, 0.0);
  *lse = 0;
  if (keys.empty()) return;
  Vec z(keys.size());
  for (std::size_t j = 0; j < keys.size(); ++j) {
    double dot = 0;
    for (int64_t x = 0; x < d.K; ++x)
      dot += p.q[((b * d.T + tq) * d.HQ + i) * d.K + x] * p.k[((b * d.T + keys[j]) * d.H + h) * d.K + x];
    z[j] = p.layout.scale() * dot;
  }
  const double m = *std::max_element(z.begin(), z.end());
  double sum = 0;
  for (double& x : z) sum += (x = std::exp(x - m));
  for (std::size_t j = 0; j < keys.size(); ++j)
    for (int64_t x = 0; x < d.V; ++x) o[x] += z[j] / sum * p.v[((b * d.T + keys[j]) * d.H + h) * d.V + x];
  *lse = m + std::log(sum);
}

// o [B, T, HQ, V] and lse [B, T, HQ] of attention over keys_of(sequence, position t, query head i).
using KeysOf = std::function<std::vector<int64_t>(const Sequence&, int64_t, int64_t)>;
std::pair<Vec, Vec> attention_over(const Problem& p, const KeysOf& keys_of) {
  const Dims& d = p.layout.dims;
  Vec o(d.B * d.T * d.HQ * d.V, 0), lse(d.B * d.T * d.HQ, 0);
  for (const Sequence& s : p.layout.sequences)
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t i = 0; i < d.HQ; ++i) {
        const int64_t row = (s.batch * d.T + s.start + t) * d.HQ + i;
        attend(p, s.batch, s.start + t, i, keys_of(s, t, i), &o[row * d.V], &lse[row]);
      }
  return {o, lse};
}

// Selected attention whose causal limit inside the current block is t + extra (the bug: extra = 1).
std::pair<Vec, Vec> selected_with_limit(const Problem& p, const std::vector<int32_t>& indices, int64_t extra) {
  const Layout& L = p.layout;
  return attention_over(p, [&](const Sequence& s, int64_t t, int64_t i) {
    std::vector<int64_t> keys;
    const int64_t h = i / L.dims.G();
    for (int64_t j = 0; j < L.S(); ++j) {
      const int64_t c = indices[((s.batch * L.dims.T + s.start + t) * L.dims.H + h) * L.S() + j];
      if (c < 0 || c * L.BS() > t) continue;
      const int64_t last = std::min({(c + 1) * L.BS() - 1, t + extra, s.length - 1});
      for (int64_t u = c * L.BS(); u <= last; ++u) keys.push_back(s.start + u);
    }
    return keys;
  });
}

// Sliding window over [t - W + 1, t + future] of the sequence, or of the whole batch row when `cross` is set.
std::pair<Vec, Vec> window_with(const Problem& p, int64_t future, bool cross) {
  const int64_t W = p.layout.config.window;
  return attention_over(p, [&](const Sequence& s, int64_t t, int64_t) {
    const int64_t lo = cross ? std::max<int64_t>(0, s.start + t - W + 1) : s.start + std::max<int64_t>(0, t - W + 1);
    const int64_t hi = s.start + std::min(t + future, s.length - 1);
    std::vector<int64_t> keys;
    for (int64_t u = lo; u <= hi; ++u) keys.push_back(u);
    return keys;
  });
}

class Mutation : public ::testing::Test {
 protected:
  void SetUp() override {
    p = test::random_problem(base_spec());
    reference = ref::run_reference(p);
    good = stored_as(reference, DType::F32);
  }
  // A candidate that used `indices` and is otherwise right.
  Outputs with_indices(const std::vector<int32_t>& indices) const {
    Problem frozen = p;
    frozen.block_indices = indices;
    Outputs c = stored_as(ref::run_reference(frozen), DType::F32);
    c.block_indices = indices;
    return c;
  }
  // The first (b, t, h) row and its scores for which `pick` returns true.
  template <typename Pick>
  int64_t find_row(Pick pick) const {
    const Dims& d = p.layout.dims;
    ref::BlockScores scores;
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t t = 0; t < d.T; ++t)
        for (int64_t h = 0; h < d.H; ++h) {
          ref::topk_scores(scores, b, t, h, p.q.data(), reference.k_cmp.data(), reference.lse_cmp.data(), p.layout);
          const int64_t row = (b * d.T + t) * d.H + h;
          if (pick(t, &reference.block_indices[row * p.layout.S()], scores)) return row;
        }
    return -1;
  }
  void expect_first_failure(const Outputs& cand, const std::string& stage) const {
    const CheckReport r = check(p, cand);
    EXPECT_FALSE(r.pass) << describe(r);
    EXPECT_EQ(r.first_failing_stage, stage) << describe(r);
  }

  Problem p;
  Outputs reference, good;
};

TEST_F(Mutation, ReferenceOutputsPass) {
  for (const Vec* x : {&reference.k_cmp, &reference.o_cmp, &reference.lse_cmp, &reference.o_slc, &reference.o_swa,
                       &reference.o, &reference.dq, &reference.dk, &reference.dv, &reference.dg_swa, &reference.dk_cmp})
    ASSERT_FALSE(test::all_zero(*x));
  const CheckReport r = check(p, good);
  EXPECT_TRUE(r.pass) << describe(r);
  EXPECT_EQ(r.tensors.size(), 17u);  // every float output and gradient
  ASSERT_TRUE(r.topk.has_value());
  EXPECT_EQ(r.topk->rows, p.layout.dims.B * p.layout.dims.T * p.layout.dims.H);
  EXPECT_EQ(r.topk->exact_rows, r.topk->rows);
  // The float64 outputs themselves pass the float64 tolerance.
  const CheckReport exact = check(p, reference, DType::F64);
  EXPECT_TRUE(exact.pass) << describe(exact);
}

TEST_F(Mutation, SelectedAttentionMaskOffByOneFails) {
  // The helper reproduces the reference without the bug, so the mutation is exactly the intended one.
  const auto [o_right, lse_right] = selected_with_limit(p, reference.block_indices, 0);
  ASSERT_LT(test::rel_l2(o_right, reference.o_slc), 1e-12);
  Outputs bad = good;
  std::tie(bad.o_slc, bad.lse_slc) = selected_with_limit(p, reference.block_indices, 1);
  regate(p, bad);
  expect_first_failure(bad, "selected_attention");
}

TEST_F(Mutation, FutureTokenInTheWindowFails) {
  const auto [o_right, lse_right] = window_with(p, 0, false);
  ASSERT_LT(test::rel_l2(o_right, reference.o_swa), 1e-12);
  Outputs bad = good;
  std::tie(bad.o_swa, bad.lse_swa) = window_with(p, 1, false);
  regate(p, bad);
  expect_first_failure(bad, "sliding_window");
}

TEST_F(Mutation, LseCmpShiftedByOnePerMilleFails) {
  Outputs bad = good;
  for (double& x : bad.lse_cmp) x *= 1 + 1e-3;
  expect_first_failure(bad, "compressed_attention");
}

TEST_F(Mutation, OneRowOfOCmpPerturbedFails) {
  Outputs bad = good;
  const Dims& d = p.layout.dims;
  bad.o_cmp[((1 * d.T + 50) * d.HQ + 2) * d.V + 3] += 1e-3;
  const CheckReport r = check(p, bad);
  EXPECT_EQ(r.first_failing_stage, "compressed_attention") << describe(r);
  EXPECT_EQ(r.tensors[2].name, "o_cmp");
  EXPECT_EQ(r.tensors[2].worst_where, "[1, 50, 2, 3]");
}

TEST_F(Mutation, KCmpOfOneBlockWrongFailsAtMeanPool) {
  Outputs bad = good;
  bad.k_cmp[5] += 1e-2;
  expect_first_failure(bad, "mean_pool");
}

TEST_F(Mutation, BlockSwappedForAClearlyWorseOneFails) {
  const int64_t S = p.layout.S();
  int32_t worse = -1;
  const int64_t row = find_row([&](int64_t, const int32_t* chosen, const ref::BlockScores& s) {
    if (chosen[S - 1] < 0 || s.forced[chosen[S - 1]]) return false;
    double s_S = 1e300;
    for (int64_t j = 0; j < S; ++j) s_S = chosen[j] >= 0 ? std::min(s_S, s.score[chosen[j]]) : s_S;
    for (int64_t c = 0; c < int64_t(s.score.size()); ++c)
      if (s.candidate[c] && std::find(chosen, chosen + S, c) == chosen + S && s.score[c] < 0.5 * s_S) {
        worse = int32_t(c);
        return true;
      }
    return false;
  });
  ASSERT_GE(row, 0);
  std::vector<int32_t> indices = reference.block_indices;
  indices[row * S + S - 1] = worse;  // the last chosen block is never a forced one here
  const Outputs bad = with_indices(indices);
  const CheckReport r = check(p, bad);
  EXPECT_EQ(r.first_failing_stage, "topk") << describe(r);
  EXPECT_EQ(r.topk->bad_rows, 1);
  EXPECT_NE(r.topk->first_problem.find("below the S-th best"), std::string::npos) << r.topk->first_problem;
  // Later stages are checked on the candidate's own selection, so they pass.
  for (const TensorCheck& t : r.tensors) EXPECT_TRUE(t.pass) << t.name;
}

TEST_F(Mutation, FutureBlockChosenFails) {
  const int64_t S = p.layout.S(), BS = p.layout.BS();
  const int64_t row = find_row([&](int64_t t, const int32_t* chosen, const ref::BlockScores& s) {
    return t / BS + 1 < int64_t(s.score.size()) && chosen[S - 1] == -1;
  });
  ASSERT_GE(row, 0);
  const int64_t t = (row / p.layout.dims.H) % p.layout.dims.T;
  std::vector<int32_t> indices = reference.block_indices;
  *std::find(&indices[row * S], &indices[row * S + S], -1) = int32_t(t / BS + 1);  // the first padding slot
  const CheckReport r = check(p, with_indices(indices));
  EXPECT_EQ(r.first_failing_stage, "topk") << describe(r);
  EXPECT_NE(r.topk->first_problem.find("not a candidate"), std::string::npos) << r.topk->first_problem;
}

TEST_F(Mutation, ForcedBlockMissingFails) {
  const int64_t S = p.layout.S(), BS = p.layout.BS();
  int32_t replacement = -1;
  const int64_t row = find_row([&](int64_t t, const int32_t* chosen, const ref::BlockScores& s) {
    for (int64_t c = 0; c < int64_t(s.score.size()); ++c)
      if (s.candidate[c] && !s.forced[c] && std::find(chosen, chosen + S, c) == chosen + S) {
        replacement = int32_t(c);
        return true;
      }
    return false;
  });
  ASSERT_GE(row, 0);
  const int64_t t = (row / p.layout.dims.H) % p.layout.dims.T;
  std::vector<int32_t> indices = reference.block_indices;
  int32_t* chosen = &indices[row * S];
  *std::find(chosen, chosen + S, int32_t(t / BS)) = replacement;  // seed policy: the current block is forced
  const CheckReport r = check(p, with_indices(indices));
  EXPECT_EQ(r.first_failing_stage, "topk") << describe(r);
  EXPECT_NE(r.topk->first_problem.find("forced block"), std::string::npos) << r.topk->first_problem;
}

TEST_F(Mutation, DkScaledByOnePercentFails) {
  Outputs bad = good;
  for (double& x : bad.dk) x *= 1.01;
  expect_first_failure(bad, "backward");
}

TEST_F(Mutation, NaNInOneOutputFails) {
  Outputs bad = good;
  bad.o[17] = std::nan("");
  const CheckReport r = check(p, bad);
  EXPECT_EQ(r.first_failing_stage, "gating") << describe(r);
  EXPECT_EQ(r.tensors[8].name, "o");
  EXPECT_EQ(r.tensors[8].nonfinite, 1);
}

TEST(MutationVarlen, CrossingASequenceBoundaryFails) {
  test::ProblemSpec s = base_spec();
  s.lengths = {37, 0, 50, 29};
  s.config.window = 24;
  const Problem p = test::random_problem(s);
  const Outputs reference = ref::run_reference(p);
  Outputs good = stored_as(reference, DType::F32);
  const CheckReport ok = check(p, good);
  EXPECT_TRUE(ok.pass) << describe(ok);

  const auto [o_right, lse_right] = window_with(p, 0, false);
  ASSERT_LT(test::rel_l2(o_right, reference.o_swa), 1e-12);
  Outputs bad = good;
  std::tie(bad.o_swa, bad.lse_swa) = window_with(p, 0, true);  // the first tokens of a sequence see the one before
  regate(p, bad);
  const CheckReport r = check(p, bad);
  EXPECT_EQ(r.first_failing_stage, "sliding_window") << describe(r);
}

TEST(MutationNearTie, SwappingBlocksWhoseScoresTieTo1e12Passes) {
  test::ProblemSpec s = base_spec();
  s.B = 1;
  s.config.block_count = 2;  // the current block plus the best other one: a tie decides the second
  Problem p = test::random_problem(s);
  const Dims& d = p.layout.dims;
  const int64_t BS = p.layout.BS();
  // Block 1's keys repeat block 0's, one element moved by 1e-12 relative: their scores agree to ~1e-13.
  for (int64_t t = 0; t < BS; ++t)
    for (int64_t x = 0; x < d.H * d.K; ++x) p.k[(BS + t) * d.H * d.K + x] = p.k[t * d.H * d.K + x];
  p.k[BS * d.H * d.K] *= 1 + 1e-12;
  const Outputs reference = ref::run_reference(p);

  std::vector<int32_t> swapped = reference.block_indices;
  int64_t swaps = 0;
  for (int64_t row = 0; row < d.T * d.H; ++row) {
    if (row / d.H < 2 * BS) continue;  // blocks 0 and 1 are both visible from block 2 on
    int32_t* chosen = &swapped[row * 2];
    const bool has0 = chosen[0] == 0 || chosen[1] == 0, has1 = chosen[0] == 1 || chosen[1] == 1;
    if (has0 == has1) continue;
    for (int j = 0; j < 2; ++j)
      if (chosen[j] == 0 || chosen[j] == 1) chosen[j] = 1 - chosen[j];
    ++swaps;
  }
  ASSERT_GT(swaps, 0);
  Problem frozen = p;
  frozen.block_indices = swapped;
  Outputs cand = stored_as(ref::run_reference(frozen), DType::F32);
  cand.block_indices = swapped;
  // The swap changes the selected branch: a check against the reference's own selection would fail.
  ASSERT_GT(test::rel_l2(cand.o_slc, reference.o_slc), 1e-3);

  const CheckReport r = check(p, cand);
  EXPECT_TRUE(r.pass) << describe(r);
  EXPECT_EQ(r.topk->tie_rows, swaps);
  EXPECT_EQ(r.topk->exact_rows, d.T * d.H - swaps);
  EXPECT_LT(r.topk->max_rel_gap, 1e-10);
}

TEST(MutationPolicies, ReferenceOutputsPassWithPaperPolicyOddGroupsAndGivenIndices) {
  test::ProblemSpec s = base_spec();
  s.HQ = 3;
  s.H = 1;
  s.config.policy = Policy::Paper;
  s.config.window = 0;
  Problem p = test::random_problem(s);
  const CheckReport paper = check(p, stored_as(ref::run_reference(p), DType::F32));
  EXPECT_TRUE(paper.pass) << describe(paper);

  // Given indices: the candidate must repeat them; one changed entry is a top-k failure.
  Outputs first = ref::run_reference(p);
  std::vector<int32_t> given = first.block_indices;
  std::reverse(given.end() - p.layout.S(), given.end());  // the last row: still a valid set, in another order
  p.block_indices = given;
  const Outputs cand = stored_as(ref::run_reference(p), DType::F32);
  const CheckReport ok = check(p, cand);
  EXPECT_TRUE(ok.pass) << describe(ok);
  EXPECT_TRUE(ok.topk->given);
  Outputs changed = cand;
  changed.block_indices = first.block_indices;
  const CheckReport bad = check(p, changed);
  EXPECT_EQ(bad.first_failing_stage, "topk") << describe(bad);
}

TEST_F(Mutation, RowSampledModeComparesOnlySampledForwardRows) {
  const Dims& d = p.layout.dims;
  CheckOptions opt;
  opt.rows.assign(d.B * d.T, 0);
  for (int64_t r : {3, 40, 99, 150, 181}) opt.rows[r] = 1;
  Outputs bad = good;
  bad.o_slc[(60 * d.HQ + 1) * d.V] += 1;  // row 60: not sampled
  for (double& x : bad.dk) x *= 1.01;     // gradients are not checked in row-sampled mode
  regate(p, bad);
  const CheckReport r = check(p, bad, DType::F32, opt);
  EXPECT_TRUE(r.pass) << describe(r);
  EXPECT_EQ(r.sampled_rows, 5);
  EXPECT_EQ(r.topk->rows, 5 * d.H);
  for (const TensorCheck& t : r.tensors) EXPECT_NE(t.stage, "backward") << t.name;

  bad.o_slc[(150 * d.HQ + 1) * d.V] += 1;  // row 150 is sampled
  regate(p, bad);
  const CheckReport hit = check(p, bad, DType::F32, opt);
  EXPECT_EQ(hit.first_failing_stage, "selected_attention") << describe(hit);
}

// The candidate as a row-sampled backend returns it: [B, T, HQ, V] outputs holding only `rows` (ascending).
Outputs compact(const Outputs& full, const std::vector<int64_t>& rows, int64_t row_size) {
  Outputs c = full;
  c.rows = rows;
  for (Vec* x : {&c.o_cmp, &c.o_slc, &c.o_swa, &c.o}) {
    if (x->empty()) continue;
    Vec kept;
    for (int64_t r : rows) kept.insert(kept.end(), x->begin() + r * row_size, x->begin() + (r + 1) * row_size);
    *x = std::move(kept);
  }
  return c;
}

TEST_F(Mutation, CompactRowSampledCandidateIsCheckedOnItsRows) {
  const Dims& d = p.layout.dims;
  const std::vector<int64_t> rows{3, 40, 99, 150, 181};
  CheckOptions opt;
  opt.rows.assign(d.B * d.T, 0);
  for (int64_t r : rows) opt.rows[r] = 1;
  const CheckReport ok = check(p, compact(good, rows, d.HQ * d.V), DType::F32, opt);
  EXPECT_TRUE(ok.pass) << describe(ok);
  for (const TensorCheck& t : ok.tensors)
    if (t.name == "o_slc") EXPECT_EQ(t.compared, int64_t(rows.size()) * d.HQ * d.V);

  Outputs bad = good;
  bad.o_slc[(150 * d.HQ + 1) * d.V + 2] += 1;  // row 150 (compact row 3), head 1, column 2
  regate(p, bad);
  const CheckReport hit = check(p, compact(bad, rows, d.HQ * d.V), DType::F32, opt);
  EXPECT_EQ(hit.first_failing_stage, "selected_attention") << describe(hit);
  bool named = false;
  for (const TensorCheck& t : hit.tensors)
    if (t.name == "o_slc") named = t.worst_where == "[" + std::to_string(150 / d.T) + ", " + std::to_string(150 % d.T) + ", 1, 2]";
  EXPECT_TRUE(named) << describe(hit);

  // Compact rows other than the check's sample cannot be compared.
  EXPECT_THROW(check(p, compact(good, {3, 40, 99, 150}, d.HQ * d.V), DType::F32, opt), InputError);
}

// The same check on a problem holding q for the sample's rows only (Problem::q_rows): the same verdicts and
// metrics, and a mutated sampled row still caught; a sample reaching rows q lacks is bad input.
TEST_F(Mutation, CompactQueryRowsCheckAlike) {
  const Dims& d = p.layout.dims;
  const std::vector<int64_t> rows{3, 40, 99};  // batch row 0 (G = 2: one tile of queries per batch row)
  CheckOptions opt;
  opt.rows.assign(d.B * d.T, 0);
  for (int64_t r : rows) opt.rows[r] = 1;
  Problem cq = p;
  cq.d_o.reset();
  cq.q_rows = ref::q_rows_read(p.layout, rows);
  cq.q.clear();
  for (int64_t t : cq.q_rows) cq.q.insert(cq.q.end(), p.q.begin() + t * d.HQ * d.K, p.q.begin() + (t + 1) * d.HQ * d.K);
  ASSERT_LT(cq.q_rows.size(), std::size_t(d.B * d.T));
  const Outputs cand = compact(good, rows, d.HQ * d.V);
  const CheckReport whole = check(p, cand, DType::F32, opt), part = check(cq, cand, DType::F32, opt);
  EXPECT_TRUE(part.pass) << describe(part);
  ASSERT_EQ(part.tensors.size(), whole.tensors.size());
  for (std::size_t i = 0; i < part.tensors.size(); ++i) {
    EXPECT_EQ(part.tensors[i].name, whole.tensors[i].name);
    EXPECT_EQ(part.tensors[i].rel_l2, whole.tensors[i].rel_l2) << part.tensors[i].name;
  }
  EXPECT_EQ(part.topk->exact_rows, whole.topk->exact_rows);

  Outputs bad = good;
  bad.o_cmp[(99 * d.HQ + 2) * d.V] += 1;
  regate(p, bad);
  const CheckReport hit = check(cq, compact(bad, rows, d.HQ * d.V), DType::F32, opt);
  EXPECT_EQ(hit.first_failing_stage, "compressed_attention") << describe(hit);

  opt.rows[150] = 1;  // batch row 1, whose q cq does not hold
  std::vector<int64_t> more = rows;
  more.push_back(150);
  EXPECT_THROW(check(cq, compact(good, more, d.HQ * d.V), DType::F32, opt), InputError);
}

// A bf16 candidate built like a bf16 kernel: every stage's output rounded to bf16, with the next stage
// computed from the rounded one, plus `noise` relative error before each rounding.
Outputs bf16_pipeline(const Problem& p, double noise, uint64_t seed) {
  const Layout& L = p.layout;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(-1, 1);
  auto finish = [&](Vec& x) {
    for (double& v : x) v = round_to(DType::BF16, v * (1 + noise * unit(rng)));
  };
  const Outputs ref_out = ref::run_reference(p);
  Outputs c;
  c.k_cmp.assign(ref_out.k_cmp.size(), 0);
  c.v_cmp.assign(ref_out.v_cmp.size(), 0);
  ref::mean_pool_forward(c.k_cmp.data(), c.v_cmp.data(), p.k.data(), p.v.data(), L);
  finish(c.k_cmp);
  finish(c.v_cmp);
  c.o_cmp.assign(ref_out.o_cmp.size(), 0);
  c.lse_cmp.assign(ref_out.lse_cmp.size(), 0);
  ref::compressed_attention_forward(c.o_cmp.data(), c.lse_cmp.data(), p.q.data(), c.k_cmp.data(), c.v_cmp.data(), L);
  finish(c.o_cmp);
  finish(c.lse_cmp);
  c.block_indices = ref_out.block_indices;
  c.o_slc.assign(ref_out.o_slc.size(), 0);
  c.lse_slc.assign(ref_out.lse_slc.size(), 0);
  ref::selected_attention_forward(c.o_slc.data(), c.lse_slc.data(), p.q.data(), p.k.data(), p.v.data(),
                                  c.block_indices.data(), nullptr, L);
  finish(c.o_slc);
  finish(c.lse_slc);
  c.o_swa.assign(ref_out.o_swa.size(), 0);
  c.lse_swa.assign(ref_out.lse_swa.size(), 0);
  ref::sliding_window_forward(c.o_swa.data(), c.lse_swa.data(), p.q.data(), p.k.data(), p.v.data(), L);
  finish(c.o_swa);
  finish(c.lse_swa);
  c.o.assign(ref_out.o.size(), 0);
  regate(p, c);
  finish(c.o);
  return c;
}

TEST(MutationBaselineRelative, JudgesAgainstTheReferenceInTheCandidatesPrecision) {
  Problem p = test::random_problem(base_spec());
  for (Vec* x : {&p.q, &p.k, &p.v}) round_all(*x, DType::BF16);
  for (auto* g : {&p.g_cmp, &p.g_slc, &p.g_swa}) round_all(**g, DType::BF16);
  p.input_dtype = DType::BF16;
  p.d_o.reset();
  CheckOptions baseline;
  baseline.baseline_relative = true;

  // Kernel-like: half a rounding of extra error per stage.
  const Outputs kernel = bf16_pipeline(p, 0x1p-10, 1);
  const CheckReport ok = check(p, kernel, DType::BF16, baseline);
  EXPECT_TRUE(ok.pass) << describe(ok);
  for (const TensorCheck& t : ok.tensors) EXPECT_GT(t.baseline_rel_l2, 0) << t.name;

  // A selected branch several times worse than bf16 rounding: within the plain bf16 tolerance, not within 2x
  // the baseline.
  Outputs sloppy = kernel;
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<double> unit(-1, 1);
  for (double& v : sloppy.o_slc) v = round_to(DType::BF16, v * (1 + 1.2e-2 * unit(rng)));
  regate(p, sloppy);
  round_all(sloppy.o, DType::BF16);
  const CheckReport plain = check(p, sloppy, DType::BF16);
  EXPECT_TRUE(plain.pass) << describe(plain);
  const CheckReport strict = check(p, sloppy, DType::BF16, baseline);
  EXPECT_EQ(strict.first_failing_stage, "selected_attention") << describe(strict);
}

}  // namespace
}  // namespace nsa
