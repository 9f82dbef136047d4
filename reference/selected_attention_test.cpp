#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "reference/attention_test_util.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

using test::ProblemSpec;

struct SelectedResult {
  std::vector<double> o, lse;
};

SelectedResult run_selected(const Problem& p, const std::vector<int32_t>& idx, const std::vector<int32_t>* counts = nullptr,
                            const RowMask& rows = {}) {
  const Dims& d = p.layout.dims;
  SelectedResult r{std::vector<double>(d.B * d.T * d.HQ * d.V, 0), std::vector<double>(d.B * d.T * d.HQ, 0)};
  selected_attention_forward(r.o.data(), r.lse.data(), p.q.data(), p.k.data(), p.v.data(), idx.data(),
                             counts ? counts->data() : nullptr, p.layout, rows);
  return r;
}

// The spec's rule written out directly: the first `count` entries, skipping -1 and blocks after t, the current
// block cut at t; then a plain softmax loop per query head.
SelectedResult naive_selected(const Problem& p, const std::vector<int32_t>& idx, const std::vector<int32_t>* counts = nullptr) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  SelectedResult r{std::vector<double>(d.B * d.T * d.HQ * d.V, 0), std::vector<double>(d.B * d.T * d.HQ, 0)};
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const int64_t token = s.batch * d.T + s.start + t;
      for (int64_t i = 0; i < d.HQ; ++i) {
        const int64_t h = i / d.G();
        const int64_t row = token * d.H + h;
        const int64_t count = counts ? (*counts)[row] : L.S();
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < count; ++j) {
          const int64_t c = idx[row * L.S() + j];
          if (c < 0) continue;
          for (int64_t pos = c * L.BS(); pos < (c + 1) * L.BS() && pos <= t; ++pos)
            keys.push_back(s.batch * d.T + s.start + pos);
        }
        test::naive_attention_row(&r.o[(token * d.HQ + i) * d.V], &r.lse[token * d.HQ + i], p.q, p.k, p.v, token, i, keys, L);
      }
    }
  return r;
}

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t BS, int64_t S, uint64_t seed = 1) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = V, s.seed = seed;
  s.config.block_size = BS;
  s.config.block_count = S;
  return s;
}

TEST(SelectedAttention, HandComputedTwoKeys) {
  // One head, K = V = 1, BS = 1, scale 1. Token 1 selects blocks {0, 1}: z = [q1*k0, q1*k1] = [0, ln 3], so
  // p = [1/4, 3/4], o = 4/4 + 3*8/4 = 7 and lse = ln(1 + 3) = ln 4. Token 0 sees only itself: o = 4, lse = 0.
  ProblemSpec s = spec(2, 1, 1, 1, 1, 1, 2);
  s.config.scale = 1;
  Problem p = test::random_problem(s);
  p.q = {5.0, 1.0};
  p.k = {0.0, std::log(3.0)};
  p.v = {4.0, 8.0};
  const std::vector<int32_t> idx = {0, -1, 0, 1};
  const SelectedResult r = run_selected(p, idx);
  EXPECT_DOUBLE_EQ(r.o[0], 4.0);
  EXPECT_DOUBLE_EQ(r.lse[0], 0.0);
  EXPECT_NEAR(r.o[1], 7.0, 1e-14);
  EXPECT_NEAR(r.lse[1], std::log(4.0), 1e-14);
}

void expect_matches_naive(const ProblemSpec& s, bool with_counts) {
  const Problem p = test::random_problem(s);
  std::mt19937_64 rng(s.seed + 100);
  const std::vector<int32_t> idx = test::random_block_indices(p.layout, rng);
  std::vector<int32_t> counts(p.layout.dims.B * p.layout.dims.T * p.layout.dims.H);
  for (int32_t& c : counts) c = int32_t(rng() % (p.layout.S() + 1));
  const std::vector<int32_t>* cp = with_counts ? &counts : nullptr;
  const SelectedResult got = run_selected(p, idx, cp), want = naive_selected(p, idx, cp);
  ASSERT_FALSE(test::all_zero(want.o));
  EXPECT_LT(test::rel_l2(got.o, want.o), 1e-13);
  EXPECT_LT(test::max_abs_diff(got.lse, want.lse), 1e-12);
}

TEST(SelectedAttention, MatchesNaiveLoopGroupOf16) { expect_matches_naive(spec(70, 16, 1, 8, 8, 8, 4), false); }
TEST(SelectedAttention, MatchesNaiveLoopSingleHeadGroups) { expect_matches_naive(spec(45, 2, 2, 5, 5, 4, 3, 2), false); }
TEST(SelectedAttention, MatchesNaiveLoopGroupOf3WithKNotV) { expect_matches_naive(spec(37, 6, 2, 7, 3, 5, 4, 3), false); }
TEST(SelectedAttention, MatchesNaiveLoopWithBlockCounts) { expect_matches_naive(spec(40, 4, 2, 4, 6, 4, 5, 4), true); }
TEST(SelectedAttention, MatchesNaiveLoopBatchOfTwo) {
  ProblemSpec s = spec(33, 3, 1, 4, 4, 8, 3, 5);
  s.B = 2;
  expect_matches_naive(s, false);
}
TEST(SelectedAttention, MatchesNaiveLoopVarlen) {
  ProblemSpec s = spec(0, 2, 1, 4, 3, 8, 3, 6);
  s.lengths = {19, 0, 5, 1, 30};  // an empty sequence, sequences shorter than BS, a one-token sequence
  expect_matches_naive(s, true);
}

TEST(SelectedAttention, SoftmaxWeightsSumToOne) {
  // With every value 1, o is the sum of the softmax weights.
  Problem p = test::random_problem(spec(50, 4, 2, 6, 3, 8, 3));
  std::fill(p.v.begin(), p.v.end(), 1.0);
  std::vector<int32_t> idx(50 * 2 * 3, -1);
  for (int64_t t = 0; t < 50; ++t)
    for (int64_t h = 0; h < 2; ++h) {
      idx[(t * 2 + h) * 3 + 1] = int32_t(t / 8);  // the current block, so no row is empty
      if (t >= 8) idx[(t * 2 + h) * 3 + 2] = int32_t((t + h) % (t / 8));
    }
  const SelectedResult r = run_selected(p, idx);
  for (double x : r.o) EXPECT_NEAR(x, 1.0, 1e-14);
}

TEST(SelectedAttention, CausalInsideTheCurrentBlock) {
  // Token 10 with BS 8 reads its own block 1 only up to itself: later tokens of block 1 must not matter.
  Problem p = test::random_problem(spec(16, 2, 1, 4, 4, 8, 2));
  std::vector<int32_t> sel(16 * 2, -1);
  for (int64_t t = 8; t < 16; ++t) sel[t * 2] = 1;
  const SelectedResult before = run_selected(p, sel);
  for (int64_t t = 11; t < 16; ++t)
    for (int64_t x = 0; x < 4; ++x) p.k[t * 4 + x] += 3.0, p.v[t * 4 + x] -= 5.0;
  const SelectedResult after = run_selected(p, sel);
  for (int64_t t = 8; t <= 10; ++t)
    for (int64_t x = 0; x < 2 * 4; ++x) EXPECT_EQ(before.o[t * 8 + x], after.o[t * 8 + x]) << "token " << t;
  EXPECT_NE(before.o[11 * 8], after.o[11 * 8]);  // a token does see its own changed key
  // Token 8 sees only itself: o = v[8].
  for (int64_t x = 0; x < 4; ++x) EXPECT_NEAR(after.o[8 * 8 + x], p.v[8 * 4 + x], 1e-14);
}

TEST(SelectedAttention, MinusOneAndFutureBlocksAreSkipped) {
  const Problem p = test::random_problem(spec(24, 2, 1, 4, 4, 4, 4));
  std::vector<int32_t> plain(24 * 4, -1), noisy(24 * 4, -1);
  for (int64_t t = 0; t < 24; ++t) {
    const int32_t cur = int32_t(t / 4);
    plain[t * 4] = cur;
    if (cur >= 1) plain[t * 4 + 1] = 0;
    // Same blocks with -1 in between and a future block (when one exists) in front.
    noisy[t * 4 + 0] = cur + 1 < 6 ? cur + 1 : -1;
    noisy[t * 4 + 1] = -1;
    noisy[t * 4 + 2] = cur;
    if (cur >= 1) noisy[t * 4 + 3] = 0;
  }
  const SelectedResult a = run_selected(p, plain), b = run_selected(p, noisy);
  EXPECT_LT(test::rel_l2(b.o, a.o), 1e-15);
  EXPECT_LT(test::max_abs_diff(b.lse, a.lse), 1e-14);
}

TEST(SelectedAttention, BlockCountsUseOnlyTheFirstEntries) {
  const Problem p = test::random_problem(spec(32, 2, 1, 4, 4, 4, 3));
  std::mt19937_64 rng(3);
  const std::vector<int32_t> idx = test::random_block_indices(p.layout, rng);
  std::vector<int32_t> counts(32), truncated = idx;
  for (int64_t t = 0; t < 32; ++t) {
    counts[t] = int32_t(t % 4);
    for (int64_t j = counts[t]; j < 3; ++j) truncated[t * 3 + j] = -1;
  }
  const SelectedResult a = run_selected(p, idx, &counts), b = run_selected(p, truncated);
  EXPECT_EQ(a.o, b.o);
  EXPECT_EQ(a.lse, b.lse);
  EXPECT_NE(a.o, run_selected(p, idx).o);
}

TEST(SelectedAttention, RowsWithoutKeysGiveZero) {
  const Problem p = test::random_problem(spec(12, 3, 1, 4, 5, 4, 2));
  std::vector<int32_t> idx(12 * 2, -1);
  idx[5 * 2 + 1] = 1;  // token 5 reads block 1; every other token reads nothing
  SelectedResult r{std::vector<double>(12 * 3 * 5, 99.0), std::vector<double>(12 * 3, 99.0)};
  selected_attention_forward(r.o.data(), r.lse.data(), p.q.data(), p.k.data(), p.v.data(), idx.data(), nullptr, p.layout);
  for (int64_t t = 0; t < 12; ++t)
    for (int64_t i = 0; i < 3; ++i) {
      if (t == 5) continue;
      EXPECT_EQ(r.lse[t * 3 + i], 0.0);
      for (int64_t x = 0; x < 5; ++x) EXPECT_EQ(r.o[(t * 3 + i) * 5 + x], 0.0);
    }
  EXPECT_NE(r.lse[5 * 3], 0.0);
}

TEST(SelectedAttention, SingleToken) {
  Problem p = test::random_problem(spec(1, 3, 1, 4, 2, 64, 16));
  std::vector<int32_t> idx(16, -1);
  idx[0] = 0;
  const SelectedResult r = run_selected(p, idx);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t x = 0; x < 2; ++x) EXPECT_NEAR(r.o[i * 2 + x], p.v[x], 1e-15);  // softmax over one key
}

TEST(SelectedAttention, VarlenEqualsSeparateRuns) {
  ProblemSpec s = spec(0, 4, 2, 4, 3, 4, 3, 9);
  s.lengths = {13, 0, 3, 22};
  const Problem packed = test::random_problem(s);
  std::mt19937_64 rng(11);
  const std::vector<int32_t> idx = test::random_block_indices(packed.layout, rng);
  const SelectedResult whole = run_selected(packed, idx);
  const Dims& d = packed.layout.dims;
  for (const Sequence& seq : packed.layout.sequences) {
    if (seq.length == 0) continue;
    ProblemSpec one = spec(seq.length, 4, 2, 4, 3, 4, 3);
    Problem alone = test::random_problem(one);
    auto slice = [&](const std::vector<double>& v, int64_t width) {
      return std::vector<double>(v.begin() + seq.start * width, v.begin() + (seq.start + seq.length) * width);
    };
    alone.q = slice(packed.q, d.HQ * d.K);
    alone.k = slice(packed.k, d.H * d.K);
    alone.v = slice(packed.v, d.H * d.V);
    const std::vector<int32_t> alone_idx(idx.begin() + seq.start * d.H * 3, idx.begin() + (seq.start + seq.length) * d.H * 3);
    const SelectedResult part = run_selected(alone, alone_idx);
    EXPECT_EQ(part.o, slice(whole.o, d.HQ * d.V)) << "sequence at " << seq.start;
    EXPECT_EQ(part.lse, slice(whole.lse, d.HQ)) << "sequence at " << seq.start;
  }
}

TEST(SelectedAttention, SampledRowsMatchFullRunAndLeaveOthersUntouched) {
  const Problem p = test::random_problem(spec(30, 4, 2, 4, 4, 4, 3));
  std::mt19937_64 rng(5);
  const std::vector<int32_t> idx = test::random_block_indices(p.layout, rng);
  RowMask rows(30, 0);
  rows[3] = rows[17] = rows[29] = 1;
  const SelectedResult full = run_selected(p, idx), sampled = run_selected(p, idx, nullptr, rows);
  for (int64_t t = 0; t < 30; ++t)
    for (int64_t x = 0; x < 4 * 4; ++x) EXPECT_EQ(sampled.o[t * 16 + x], rows[t] ? full.o[t * 16 + x] : 0.0);
}

// Backward: loss = sum(do * o_slc); gradients of q, k, v against central differences of the forward.
void expect_backward_matches_finite_differences(ProblemSpec s, bool with_counts) {
  s.with_do = true;
  test::ScopedThreads one_thread(1);  // hundreds of tiny runs: thread start-up would dominate
  Problem p = test::random_problem(s);
  std::mt19937_64 rng(s.seed + 7);
  const std::vector<int32_t> idx = test::random_block_indices(p.layout, rng);
  std::vector<int32_t> counts(p.layout.dims.B * p.layout.dims.T * p.layout.dims.H);
  for (int32_t& c : counts) c = int32_t(rng() % (p.layout.S() + 1));
  const std::vector<int32_t>* cp = with_counts ? &counts : nullptr;
  const Dims& d = p.layout.dims;
  const SelectedResult fwd = run_selected(p, idx, cp);
  std::vector<double> dq(p.q.size(), 0), dk(p.k.size(), 0), dv(p.v.size(), 0);
  selected_attention_backward(dq.data(), dk.data(), dv.data(), p.d_o->data(), p.q.data(), p.k.data(), p.v.data(),
                              fwd.o.data(), fwd.lse.data(), idx.data(), cp ? cp->data() : nullptr, p.layout);
  auto loss = [&] { return test::dot(run_selected(p, idx, cp).o, *p.d_o); };
  for (auto [name, x, g] : {std::tuple<const char*, std::vector<double>*, std::vector<double>*>{"dq", &p.q, &dq},
                            {"dk", &p.k, &dk}, {"dv", &p.v, &dv}}) {
    const std::vector<double> numeric = test::finite_difference(*x, loss);
    ASSERT_FALSE(test::all_zero(numeric)) << name;
    EXPECT_LT(test::rel_l2(*g, numeric), 1e-8) << name << " (B=" << d.B << " T=" << d.T << ")";
  }
}

TEST(SelectedAttentionBackward, MatchesFiniteDifferences) {
  expect_backward_matches_finite_differences(spec(13, 3, 1, 3, 2, 3, 3, 21), false);
}
TEST(SelectedAttentionBackward, MatchesFiniteDifferencesGroupsOfTwoWithCounts) {
  expect_backward_matches_finite_differences(spec(11, 4, 2, 2, 3, 2, 4, 22), true);
}
TEST(SelectedAttentionBackward, MatchesFiniteDifferencesVarlen) {
  ProblemSpec s = spec(0, 2, 1, 3, 2, 4, 2, 23);
  s.lengths = {6, 0, 1, 9};
  expect_backward_matches_finite_differences(s, false);
}

TEST(SelectedAttentionBackward, BitIdenticalForAnyThreadCount) {
  ProblemSpec s = spec(200, 6, 2, 8, 5, 8, 4, 31);
  s.with_do = true;
  const Problem p = test::random_problem(s);
  std::mt19937_64 rng(1);
  const std::vector<int32_t> idx = test::random_block_indices(p.layout, rng);
  const SelectedResult fwd = run_selected(p, idx);
  auto grads = [&](int threads) {
    test::ScopedThreads scoped(threads);
    std::vector<double> g(p.q.size() + p.k.size() + p.v.size(), 0);
    selected_attention_backward(g.data(), g.data() + p.q.size(), g.data() + p.q.size() + p.k.size(), p.d_o->data(),
                                p.q.data(), p.k.data(), p.v.data(), fwd.o.data(), fwd.lse.data(), idx.data(), nullptr,
                                p.layout);
    return g;
  };
  const std::vector<double> one = grads(1);
  ASSERT_FALSE(test::all_zero(one));
  EXPECT_EQ(one, grads(2));
  EXPECT_EQ(one, grads(3));
}

}  // namespace
}  // namespace nsa::ref
