#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <tuple>

#include "core/errors.h"
#include "reference/attention_test_util.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

using test::ProblemSpec;

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t BS, int64_t S, int64_t W,
                 uint64_t seed = 1) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = V, s.seed = seed;
  s.config.block_size = BS;
  s.config.block_count = S;
  s.config.window = W;
  s.gate_swa = W > 0;
  s.with_do = true;
  return s;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

TEST(Pipeline, FillsEveryOutputWithTheDocumentedShapes) {
  const Problem p = test::random_problem(spec(37, 6, 2, 5, 3, 8, 3, 5));
  const Outputs out = run_reference(p);
  const int64_t tokens = 37, C = 5;
  EXPECT_EQ(out.k_cmp.size(), size_t(C * 2 * 5));
  EXPECT_EQ(out.v_cmp.size(), size_t(C * 2 * 3));
  EXPECT_EQ(out.block_indices.size(), size_t(tokens * 2 * 3));
  for (const auto* o : {&out.o_cmp, &out.o_slc, &out.o_swa, &out.o}) {
    EXPECT_EQ(o->size(), size_t(tokens * 6 * 3));
    EXPECT_FALSE(test::all_zero(*o));
  }
  for (const auto* lse : {&out.lse_cmp, &out.lse_slc, &out.lse_swa}) EXPECT_EQ(lse->size(), size_t(tokens * 6));
  ASSERT_TRUE(out.has_grads);
  EXPECT_EQ(out.dq.size(), size_t(tokens * 6 * 5));
  EXPECT_EQ(out.dk.size(), size_t(tokens * 2 * 5));
  EXPECT_EQ(out.dv.size(), size_t(tokens * 2 * 3));
  EXPECT_EQ(out.dk_cmp.size(), out.k_cmp.size());
  EXPECT_EQ(out.dv_cmp.size(), out.v_cmp.size());
  for (const auto* g : {&out.dq, &out.dk, &out.dv, &out.dk_cmp, &out.dv_cmp, &out.dg_cmp, &out.dg_slc, &out.dg_swa})
    EXPECT_FALSE(test::all_zero(*g));
  EXPECT_EQ(out.dg_swa.size(), size_t(tokens * 6));
}

TEST(Pipeline, NoWindowNoSlidingOutputsAndOnlyPresentGatesGetGradients) {
  ProblemSpec s = spec(20, 2, 1, 4, 4, 4, 2, 0);
  s.gate_cmp = false;
  const Outputs out = run_reference(test::random_problem(s));
  EXPECT_TRUE(out.o_swa.empty());
  EXPECT_TRUE(out.lse_swa.empty());
  EXPECT_TRUE(out.dg_cmp.empty());
  EXPECT_TRUE(out.dg_swa.empty());
  EXPECT_EQ(out.dg_slc.size(), size_t(20 * 2));
  EXPECT_TRUE(test::all_zero(out.dk_cmp));  // the compressed branch is dropped, so nothing flows back into it
}

TEST(Pipeline, ForwardOnlyWhenAskedOrWithoutUpstreamGradient) {
  Problem p = test::random_problem(spec(20, 2, 1, 4, 4, 4, 2, 3));
  RunOptions forward_only;
  forward_only.backward = false;
  EXPECT_FALSE(run_reference(p, forward_only).has_grads);
  p.d_o.reset();
  const Outputs out = run_reference(p);
  EXPECT_FALSE(out.has_grads);
  EXPECT_TRUE(out.dq.empty());
}

TEST(Pipeline, GivenBlockIndicesAreUsedAndReturned) {
  Problem p = test::random_problem(spec(24, 2, 1, 4, 4, 4, 3, 0));
  std::vector<int32_t> idx(24 * 3, -1);
  for (int64_t t = 0; t < 24; ++t) idx[t * 3] = int32_t(t / 4);  // only the current block
  p.block_indices = idx;
  const Outputs out = run_reference(p);
  EXPECT_EQ(out.block_indices, idx);
  // Each token at the start of its block sees only itself.
  for (int64_t t = 0; t < 24; t += 4)
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t x = 0; x < 4; ++x) EXPECT_NEAR(out.o_slc[(t * 2 + i) * 4 + x], p.v[t * 4 + x], 1e-15);
}

TEST(Pipeline, BlockCountsLimitTheSelection) {
  Problem p = test::random_problem(spec(40, 2, 1, 4, 4, 4, 4, 0));
  const Outputs all = run_reference(p);
  p.block_counts = std::vector<int32_t>(40, 1);
  const Outputs first_only = run_reference(p);
  EXPECT_EQ(first_only.block_indices, all.block_indices);
  p.block_indices = all.block_indices;
  for (int64_t t = 0; t < 40; ++t)
    for (int64_t j = 1; j < 4; ++j) (*p.block_indices)[t * 4 + j] = -1;
  p.block_counts.reset();
  const Outputs truncated = run_reference(p);
  EXPECT_TRUE(same_bytes(first_only.o_slc, truncated.o_slc));
  EXPECT_FALSE(same_bytes(first_only.o_slc, all.o_slc));
}

TEST(Pipeline, ZeroGateGivesZeroGradientsThroughItsBranch) {
  ProblemSpec s = spec(30, 4, 2, 4, 3, 4, 3, 6);
  Problem dropped = test::random_problem(s);
  Problem zero = dropped;
  dropped.g_slc.reset();
  std::fill(zero.g_slc->begin(), zero.g_slc->end(), 0.0);
  const Outputs a = run_reference(dropped), b = run_reference(zero);
  EXPECT_EQ(test::max_abs_diff(a.o, b.o), 0.0);
  EXPECT_EQ(test::max_abs_diff(a.dq, b.dq), 0.0);
  EXPECT_EQ(test::max_abs_diff(a.dk, b.dk), 0.0);
  EXPECT_EQ(test::max_abs_diff(a.dv, b.dv), 0.0);
  EXPECT_FALSE(test::all_zero(b.dg_slc));  // the zero gate itself still has a gradient
  for (const char* branch : {"cmp", "swa"}) {
    Problem z = test::random_problem(s);
    auto& gate = std::string(branch) == "cmp" ? z.g_cmp : z.g_swa;
    std::fill(gate->begin(), gate->end(), 0.0);
    Problem without = z;
    (std::string(branch) == "cmp" ? without.g_cmp : without.g_swa).reset();
    const Outputs with_zero = run_reference(z), with_none = run_reference(without);
    EXPECT_EQ(test::max_abs_diff(with_zero.dq, with_none.dq), 0.0) << branch;
    EXPECT_EQ(test::max_abs_diff(with_zero.dk, with_none.dk), 0.0) << branch;
    EXPECT_EQ(test::max_abs_diff(with_zero.dv, with_none.dv), 0.0) << branch;
  }
}

// The whole backward (gating, the three branches, mean pooling) against central differences of the whole
// forward, with the selection frozen as the spec says; loss = sum(do * o).
void expect_pipeline_gradients_match_finite_differences(ProblemSpec s) {
  test::ScopedThreads one_thread(1);  // hundreds of tiny runs: thread start-up would dominate
  Problem p = test::random_problem(s);
  p.block_indices = run_reference(p).block_indices;  // frozen
  const Outputs out = run_reference(p);
  RunOptions forward_only;
  forward_only.backward = false;
  auto loss = [&] { return test::dot(run_reference(p, forward_only).o, *p.d_o); };
  struct Input {
    const char* name;
    std::vector<double>* x;
    const std::vector<double>* grad;
  };
  std::vector<Input> inputs = {{"q", &p.q, &out.dq}, {"k", &p.k, &out.dk}, {"v", &p.v, &out.dv}};
  if (p.g_cmp) inputs.push_back({"g_cmp", &*p.g_cmp, &out.dg_cmp});
  if (p.g_slc) inputs.push_back({"g_slc", &*p.g_slc, &out.dg_slc});
  if (p.g_swa) inputs.push_back({"g_swa", &*p.g_swa, &out.dg_swa});
  for (const Input& in : inputs) {
    const std::vector<double> numeric = test::finite_difference(*in.x, loss);
    ASSERT_FALSE(test::all_zero(numeric)) << in.name;
    EXPECT_LT(test::rel_l2(*in.grad, numeric), 1e-8) << in.name;
  }
}

TEST(PipelineBackward, MatchesFiniteDifferences) {
  expect_pipeline_gradients_match_finite_differences(spec(11, 3, 1, 3, 2, 3, 2, 4, 41));
}
TEST(PipelineBackward, MatchesFiniteDifferencesVarlenGroupsOfTwo) {
  ProblemSpec s = spec(0, 4, 2, 2, 3, 3, 2, 2, 42);
  s.lengths = {7, 0, 1, 5};
  expect_pipeline_gradients_match_finite_differences(s);
}

TEST(Pipeline, BitIdenticalForAnyThreadCount) {
  ProblemSpec s = spec(0, 6, 2, 8, 5, 8, 4, 20, 51);
  s.lengths = {150, 0, 7, 93};
  const Problem p = test::random_problem(s);
  auto run = [&](int threads) {
    RunOptions opt;
    opt.threads = threads;
    test::ScopedThreads restore(omp_get_max_threads());
    return run_reference(p, opt);
  };
  const Outputs one = run(1), two = run(2);
  EXPECT_TRUE(same_bytes(one.block_indices, two.block_indices));
  for (auto [name, a, b] : {std::tuple<const char*, const std::vector<double>*, const std::vector<double>*>{
                                "k_cmp", &one.k_cmp, &two.k_cmp},
                            {"o_cmp", &one.o_cmp, &two.o_cmp}, {"lse_cmp", &one.lse_cmp, &two.lse_cmp},
                            {"o_slc", &one.o_slc, &two.o_slc}, {"lse_slc", &one.lse_slc, &two.lse_slc},
                            {"o_swa", &one.o_swa, &two.o_swa}, {"o", &one.o, &two.o}, {"dq", &one.dq, &two.dq},
                            {"dk", &one.dk, &two.dk}, {"dv", &one.dv, &two.dv}, {"dg_cmp", &one.dg_cmp, &two.dg_cmp},
                            {"dg_slc", &one.dg_slc, &two.dg_slc}, {"dg_swa", &one.dg_swa, &two.dg_swa},
                            {"dk_cmp", &one.dk_cmp, &two.dk_cmp}, {"dv_cmp", &one.dv_cmp, &two.dv_cmp}}) {
    EXPECT_FALSE(a->empty()) << name;
    EXPECT_TRUE(same_bytes(*a, *b)) << name << " differs between 1 and 2 threads";
  }
}

TEST(Pipeline, SampledRowsMatchTheFullForward) {
  Problem p = test::random_problem(spec(50, 4, 2, 4, 4, 8, 3, 6));
  RunOptions full_opt, sampled_opt;
  full_opt.backward = sampled_opt.backward = false;
  sampled_opt.rows = {31, 0, 49, 9, 31};  // unordered, one row twice
  const Outputs full = run_reference(p, full_opt), sampled = run_reference(p, sampled_opt);
  EXPECT_TRUE(same_bytes(full.k_cmp, sampled.k_cmp));  // pooling is never sampled
  // The [B, T, HQ, V] outputs are compact: the sample's rows, ascending.
  const std::vector<int64_t> rows{0, 9, 31, 49};
  EXPECT_EQ(sampled.rows, rows);
  EXPECT_TRUE(full.rows.empty());
  for (const std::vector<double>* x : {&sampled.o_cmp, &sampled.o_slc, &sampled.o_swa, &sampled.o})
    EXPECT_EQ(x->size(), 4u * 16);
  for (std::size_t r = 0; r < rows.size(); ++r)
    // Sampled rows may be computed in differently shaped tiles, so they agree to rounding, not bit for bit.
    for (int64_t x = 0; x < 4 * 4; ++x) {
      const int64_t at = rows[r] * 16 + x, compact = int64_t(r) * 16 + x;
      EXPECT_NEAR(sampled.o_cmp[compact], full.o_cmp[at], 1e-13) << "token " << rows[r];
      EXPECT_NEAR(sampled.o_slc[compact], full.o_slc[at], 1e-13) << "token " << rows[r];
      EXPECT_NEAR(sampled.o_swa[compact], full.o_swa[at], 1e-13) << "token " << rows[r];
      EXPECT_NEAR(sampled.o[compact], full.o[at], 1e-13) << "token " << rows[r];
    }
  // The other outputs stay full-size, written only on sampled rows.
  for (int64_t t = 0; t < 50; ++t) {
    const bool in = t == 0 || t == 9 || t == 31 || t == 49;
    for (int64_t i = 0; i < 4; ++i)
      EXPECT_NEAR(sampled.lse_slc[t * 4 + i], in ? full.lse_slc[t * 4 + i] : 0.0, in ? 1e-13 : 0.0) << "token " << t;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t j = 0; j < 3; ++j)
        EXPECT_EQ(sampled.block_indices[(t * 2 + h) * 3 + j], in ? full.block_indices[(t * 2 + h) * 3 + j] : -1);
  }
  EXPECT_FALSE(test::all_zero(sampled.o));
}

// A problem holding q for the rows a sampled forward reads only (Problem::q_rows, q_rows_read) computes the
// sample bit for bit as the problem with all of q does; asked for more rows, or a backward, it refuses.
TEST(Pipeline, CompactQueryRowsGiveTheSameSampledForward) {
  Problem whole = test::random_problem(spec(300, 8, 2, 4, 4, 8, 3, 6));  // G = 4: tiles of 64 tokens
  whole.d_o.reset();
  RunOptions opt;
  opt.rows = {250, 3, 130};
  const std::vector<int64_t> read = q_rows_read(whole.layout, {3, 130, 250});
  // Each sampled token's whole tile of queries, nothing else: [0, 64), [128, 192), [192, 256).
  std::vector<int64_t> tiles;
  for (int64_t t = 0; t < 64; ++t) tiles.push_back(t);
  for (int64_t t = 128; t < 256; ++t) tiles.push_back(t);
  EXPECT_EQ(read, tiles);
  Problem compact = whole;
  compact.q_rows = read;
  compact.q.clear();
  const int64_t row = 8 * 4;  // HQ * K
  for (int64_t t : read) compact.q.insert(compact.q.end(), whole.q.begin() + t * row, whole.q.begin() + (t + 1) * row);
  const Outputs a = run_reference(whole, opt), b = run_reference(compact, opt);
  for (const auto& [name, x, y] : {std::tuple{"o_cmp", &a.o_cmp, &b.o_cmp}, {"lse_cmp", &a.lse_cmp, &b.lse_cmp},
                                   {"o_slc", &a.o_slc, &b.o_slc}, {"lse_slc", &a.lse_slc, &b.lse_slc},
                                   {"o_swa", &a.o_swa, &b.o_swa}, {"o", &a.o, &b.o}}) {
    EXPECT_FALSE(x->empty()) << name;
    EXPECT_TRUE(same_bytes(*x, *y)) << name;
  }
  EXPECT_EQ(a.block_indices, b.block_indices);
  opt.rows = {3, 70};  // 70's tile is not loaded
  EXPECT_THROW(run_reference(compact, opt), std::invalid_argument);
  opt.rows.clear();
  EXPECT_THROW(run_reference(compact, opt), std::invalid_argument);
}

TEST(Pipeline, BackwardIgnoresTheRowSample) {
  const Problem p = test::random_problem(spec(30, 2, 1, 4, 4, 4, 2, 3));
  RunOptions sampled;
  sampled.rows = {3};
  const Outputs a = run_reference(p), b = run_reference(p, sampled);
  EXPECT_TRUE(same_bytes(a.o, b.o));
  EXPECT_TRUE(same_bytes(a.dq, b.dq));
}

TEST(Pipeline, SampledRowOutsideTheProblemIsAnInputError) {
  const Problem p = test::random_problem(spec(10, 2, 1, 4, 4, 4, 2, 0));
  RunOptions opt;
  opt.backward = false;
  opt.rows = {10};
  EXPECT_THROW(run_reference(p, opt), InputError);
}

}  // namespace
}  // namespace nsa::ref
