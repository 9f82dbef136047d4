#include <gtest/gtest.h>

#include <cmath>

#include "reference/attention_test_util.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

using test::ProblemSpec;

struct WindowResult {
  std::vector<double> o, lse;
};

WindowResult run_window(const Problem& p, const RowMask& rows = {}) {
  const Dims& d = p.layout.dims;
  WindowResult r{std::vector<double>(d.B * d.T * d.HQ * d.V, 0), std::vector<double>(d.B * d.T * d.HQ, 0)};
  sliding_window_forward(r.o.data(), r.lse.data(), p.q.data(), p.k.data(), p.v.data(), p.layout, rows);
  return r;
}

// Keys [max(0, t - W + 1), t] of the token's own sequence, through a plain softmax loop; W = 0 => full causal.
WindowResult naive_window(const Problem& p, int64_t W) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  WindowResult r{std::vector<double>(d.B * d.T * d.HQ * d.V, 0), std::vector<double>(d.B * d.T * d.HQ, 0)};
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const int64_t token = s.batch * d.T + s.start + t;
      std::vector<int64_t> keys;
      for (int64_t j = (W > 0 ? std::max<int64_t>(0, t - W + 1) : 0); j <= t; ++j) keys.push_back(s.batch * d.T + s.start + j);
      for (int64_t i = 0; i < d.HQ; ++i)
        test::naive_attention_row(&r.o[(token * d.HQ + i) * d.V], &r.lse[token * d.HQ + i], p.q, p.k, p.v, token, i, keys, L);
    }
  return r;
}

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t W, uint64_t seed = 1) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = V, s.seed = seed;
  s.config.block_size = 4;
  s.config.window = W;
  return s;
}

void expect_matches_naive(const ProblemSpec& s) {
  const Problem p = test::random_problem(s);
  const WindowResult got = run_window(p), want = naive_window(p, s.config.window);
  ASSERT_FALSE(test::all_zero(want.o));
  EXPECT_LT(test::rel_l2(got.o, want.o), 1e-13);
  EXPECT_LT(test::max_abs_diff(got.lse, want.lse), 1e-12);
}

TEST(SlidingWindow, HandComputedWindowOfTwo) {
  // One head, K = V = 1, scale 1, W = 2. Token 2 sees tokens 1 and 2: z = [q2 k1, q2 k2] = [ln 2, 0], so
  // p = [2/3, 1/3], o = 2/3 * 6 + 1/3 * 3 = 5, lse = ln 3. Token 0's key (v = 100) is outside the window.
  ProblemSpec s = spec(3, 1, 1, 1, 1, 2);
  s.config.scale = 1;
  Problem p = test::random_problem(s);
  p.q = {0.0, 0.0, 1.0};
  p.k = {50.0, std::log(2.0), 0.0};
  p.v = {100.0, 6.0, 3.0};
  const WindowResult r = run_window(p);
  EXPECT_NEAR(r.o[2], 5.0, 1e-14);
  EXPECT_NEAR(r.lse[2], std::log(3.0), 1e-14);
  EXPECT_DOUBLE_EQ(r.o[0], 100.0);  // token 0 sees itself only
  EXPECT_NEAR(r.o[1], 53.0, 1e-14);  // q1 = 0: equal weights over tokens 0 and 1
}

TEST(SlidingWindow, MatchesNaiveLoopGroupOf16) { expect_matches_naive(spec(90, 16, 1, 8, 8, 13)); }
TEST(SlidingWindow, MatchesNaiveLoopSingleHeadGroups) { expect_matches_naive(spec(50, 3, 3, 5, 5, 7, 2)); }
TEST(SlidingWindow, MatchesNaiveLoopGroupOf3WithKNotV) { expect_matches_naive(spec(41, 6, 2, 7, 3, 64, 3)); }
TEST(SlidingWindow, MatchesNaiveLoopBatchOfTwo) {
  ProblemSpec s = spec(23, 2, 1, 4, 4, 5, 4);
  s.B = 2;
  expect_matches_naive(s);
}
TEST(SlidingWindow, MatchesNaiveLoopVarlen) {
  ProblemSpec s = spec(0, 4, 2, 4, 3, 6, 5);
  s.lengths = {17, 0, 3, 1, 40};
  expect_matches_naive(s);
}

TEST(SlidingWindow, WindowOfOneGivesTheTokensOwnValue) {
  const Problem p = test::random_problem(spec(20, 4, 2, 3, 5, 1));
  const WindowResult r = run_window(p);
  const Dims& d = p.layout.dims;
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t i = 0; i < d.HQ; ++i) {
      const int64_t h = i / d.G();
      for (int64_t x = 0; x < d.V; ++x) EXPECT_NEAR(r.o[(t * d.HQ + i) * d.V + x], p.v[(t * d.H + h) * d.V + x], 1e-15);
      double z = 0;
      for (int64_t x = 0; x < d.K; ++x) z += p.q[(t * d.HQ + i) * d.K + x] * p.k[(t * d.H + h) * d.K + x];
      EXPECT_NEAR(r.lse[t * d.HQ + i], p.layout.scale() * z, 1e-14);
    }
}

TEST(SlidingWindow, WindowCoveringTheSequenceIsFullCausalAttention) {
  for (int64_t W : {30, 31, 1000}) {
    const Problem p = test::random_problem(spec(30, 4, 2, 4, 4, W, 6));
    const WindowResult got = run_window(p), causal = naive_window(p, 0);
    EXPECT_LT(test::rel_l2(got.o, causal.o), 1e-13) << "W = " << W;
    EXPECT_LT(test::max_abs_diff(got.lse, causal.lse), 1e-12) << "W = " << W;
  }
}

TEST(SlidingWindow, SingleToken) {
  const Problem p = test::random_problem(spec(1, 2, 1, 4, 3, 8));
  const WindowResult r = run_window(p);
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t x = 0; x < 3; ++x) EXPECT_NEAR(r.o[i * 3 + x], p.v[x], 1e-15);
}

TEST(SlidingWindow, NoWindowLeavesOutputsUntouched) {
  const Problem p = test::random_problem(spec(10, 2, 1, 4, 3, 0));
  std::vector<double> o(10 * 2 * 3, 7.0), lse(10 * 2, 7.0);
  sliding_window_forward(o.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), p.layout);
  for (double x : o) EXPECT_EQ(x, 7.0);
  for (double x : lse) EXPECT_EQ(x, 7.0);
}

TEST(SlidingWindow, VarlenEqualsSeparateRuns) {
  ProblemSpec s = spec(0, 2, 1, 4, 3, 5, 8);
  s.lengths = {9, 0, 2, 14};
  const Problem packed = test::random_problem(s);
  const WindowResult whole = run_window(packed);
  const Dims& d = packed.layout.dims;
  for (const Sequence& seq : packed.layout.sequences) {
    if (seq.length == 0) continue;
    Problem alone = test::random_problem(spec(seq.length, 2, 1, 4, 3, 5));
    auto slice = [&](const std::vector<double>& v, int64_t width) {
      return std::vector<double>(v.begin() + seq.start * width, v.begin() + (seq.start + seq.length) * width);
    };
    alone.q = slice(packed.q, d.HQ * d.K);
    alone.k = slice(packed.k, d.H * d.K);
    alone.v = slice(packed.v, d.H * d.V);
    const WindowResult part = run_window(alone);
    EXPECT_LT(test::rel_l2(part.o, slice(whole.o, d.HQ * d.V)), 1e-15) << "sequence at " << seq.start;
    EXPECT_LT(test::max_abs_diff(part.lse, slice(whole.lse, d.HQ)), 1e-15) << "sequence at " << seq.start;
  }
}

// Backward: loss = sum(do * o_swa); gradients of q, k, v against central differences of the forward.
void expect_backward_matches_finite_differences(ProblemSpec s) {
  s.with_do = true;
  test::ScopedThreads one_thread(1);  // hundreds of tiny runs: thread start-up would dominate
  Problem p = test::random_problem(s);
  const WindowResult fwd = run_window(p);
  std::vector<double> dq(p.q.size(), 0), dk(p.k.size(), 0), dv(p.v.size(), 0);
  sliding_window_backward(dq.data(), dk.data(), dv.data(), p.d_o->data(), p.q.data(), p.k.data(), p.v.data(),
                          fwd.o.data(), fwd.lse.data(), p.layout);
  auto loss = [&] { return test::dot(run_window(p).o, *p.d_o); };
  for (auto [name, x, g] : {std::tuple<const char*, std::vector<double>*, std::vector<double>*>{"dq", &p.q, &dq},
                            {"dk", &p.k, &dk}, {"dv", &p.v, &dv}}) {
    const std::vector<double> numeric = test::finite_difference(*x, loss);
    ASSERT_FALSE(test::all_zero(numeric)) << name;
    EXPECT_LT(test::rel_l2(*g, numeric), 1e-8) << name;
  }
}

TEST(SlidingWindowBackward, MatchesFiniteDifferences) { expect_backward_matches_finite_differences(spec(12, 3, 1, 3, 2, 4, 21)); }
TEST(SlidingWindowBackward, MatchesFiniteDifferencesGroupsOfTwoWideWindow) {
  expect_backward_matches_finite_differences(spec(9, 4, 2, 2, 3, 50, 22));
}
TEST(SlidingWindowBackward, MatchesFiniteDifferencesVarlen) {
  ProblemSpec s = spec(0, 2, 1, 3, 2, 3, 23);
  s.lengths = {5, 0, 1, 8};
  expect_backward_matches_finite_differences(s);
}

TEST(SlidingWindowBackward, BitIdenticalForAnyThreadCount) {
  ProblemSpec s = spec(300, 6, 2, 8, 5, 70, 31);
  s.with_do = true;
  const Problem p = test::random_problem(s);
  const WindowResult fwd = run_window(p);
  auto grads = [&](int threads) {
    test::ScopedThreads scoped(threads);
    std::vector<double> g(p.q.size() + p.k.size() + p.v.size(), 0);
    sliding_window_backward(g.data(), g.data() + p.q.size(), g.data() + p.q.size() + p.k.size(), p.d_o->data(),
                            p.q.data(), p.k.data(), p.v.data(), fwd.o.data(), fwd.lse.data(), p.layout);
    return g;
  };
  const std::vector<double> one = grads(1);
  ASSERT_FALSE(test::all_zero(one));
  EXPECT_EQ(one, grads(2));
  EXPECT_EQ(one, grads(3));
}

}  // namespace
}  // namespace nsa::ref
