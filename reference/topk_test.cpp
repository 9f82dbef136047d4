// Top-k selection and importance scores (nsa-spec §2.3): orders set by hand through the keys, both policies'
// forced blocks, ties, padding, the per-head mean scale, varlen, causality and row sampling.
#include <gtest/gtest.h>

#include <cmath>

#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

using test::ProblemSpec;

struct TopkRun : test::CompressedRun {
  std::vector<int32_t> indices;
};

TopkRun run_topk(const Problem& p, const RowMask& rows = {}) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  TopkRun r;
  static_cast<test::CompressedRun&>(r) = test::run_compressed(p);
  r.indices.assign(d.B * d.T * d.H * L.S(), -7);  // -7: "not written"
  topk_forward(r.indices.data(), p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), L, rows);
  return r;
}

std::vector<int32_t> row_of(const TopkRun& r, const Layout& L, int64_t token, int64_t h) {
  const int64_t S = L.S();
  const auto first = r.indices.begin() + (token * L.dims.H + h) * S;
  return std::vector<int32_t>(first, first + S);
}

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t BS, int64_t S, Policy policy, uint64_t seed = 1) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = 2, s.seed = seed;
  s.config.block_size = BS;
  s.config.block_count = S;
  s.config.policy = policy;
  return s;
}

// BS = 1, K = 1, q = 1, scale 1: z_c = k_c, so the blocks before the current one rank as their keys do.
Problem ranked_keys(Policy policy, int64_t S) {
  ProblemSpec s = spec(6, 1, 1, 1, 1, S, policy);
  s.config.scale = 1.0;
  Problem p = test::random_problem(s);
  p.q.assign(6, 1.0);
  p.k = {0.0, 3.0, 1.0, 2.0, -1.0, 5.0};
  return p;
}

TEST(TopK, SeedPicksCurrentBlockThenHighestScores) {
  const Problem p = ranked_keys(Policy::Seed, 4);
  const TopkRun r = run_topk(p);
  // t = 5: current block 5 first, then blocks 0..4 by key: 1 (3.0), 3 (2.0), 2 (1.0).
  EXPECT_EQ(row_of(r, p.layout, 5, 0), (std::vector<int32_t>{5, 1, 3, 2}));
  // t = 4: current block 4, then 1, 3, 2.
  EXPECT_EQ(row_of(r, p.layout, 4, 0), (std::vector<int32_t>{4, 1, 3, 2}));
}

TEST(TopK, PaperForcesInitialCurrentAndPreviousBlocks) {
  const Problem p = ranked_keys(Policy::Paper, 5);
  const TopkRun r = run_topk(p);
  // t = 5: forced {0, 4, 5} tie at score 1 (smaller index first) although blocks 0 and 4 have the lowest keys;
  // then 1 and 3 by key.
  EXPECT_EQ(row_of(r, p.layout, 5, 0), (std::vector<int32_t>{0, 4, 5, 1, 3}));
  // t = 1: forced {0, 1}; nothing else exists.
  EXPECT_EQ(row_of(r, p.layout, 1, 0), (std::vector<int32_t>{0, 1, -1, -1, -1}));
}

TEST(TopK, PadsWithMinusOneWhenFewerCandidates) {
  for (Policy policy : {Policy::Seed, Policy::Paper}) {
    const Problem p = test::random_problem(spec(9, 2, 1, 3, 4, 4, policy));
    const TopkRun r = run_topk(p);
    EXPECT_EQ(row_of(r, p.layout, 0, 0), (std::vector<int32_t>{0, -1, -1, -1}));
    EXPECT_EQ(row_of(r, p.layout, 3, 0), (std::vector<int32_t>{0, -1, -1, -1}));
    // t = 5: block 1 is current and block 0 the only visible one, so p = 1 for every head: block 0 ties with
    // the forced block (seed: sum G, paper: 1) and comes first.
    EXPECT_EQ(row_of(r, p.layout, 5, 0), (std::vector<int32_t>{0, 1, -1, -1}));
    // t = 8 (T not a multiple of BS): current block 2 is partial; three candidates.
    const std::vector<int32_t> last = row_of(r, p.layout, 8, 0);
    EXPECT_EQ(last[3], -1);
    EXPECT_EQ(std::count(last.begin(), last.end(), 2), 1);
  }
}

TEST(TopK, TiesBreakToLowerIndex) {
  // q = 0 makes every visible block equally likely: all non-forced scores tie.
  for (Policy policy : {Policy::Seed, Policy::Paper}) {
    ProblemSpec s = spec(16, 3, 1, 4, 2, 4, policy);
    Problem p = test::random_problem(s);
    std::fill(p.q.begin(), p.q.end(), 0.0);
    const TopkRun r = run_topk(p);
    // t = 14: current block 7, blocks 0..6 visible with p = 1/7 each.
    const std::vector<int32_t> expect =
        policy == Policy::Seed ? std::vector<int32_t>{7, 0, 1, 2} : std::vector<int32_t>{0, 6, 7, 1};
    EXPECT_EQ(row_of(r, p.layout, 14, 0), expect) << policy_name(policy);
  }
}

TEST(TopK, ForcedCurrentBlockWinsTieWithLoneVisibleBlock) {
  // Seed policy, S = 1, BS = 4: for t in [4, 6] block 0 is the only visible block, so every head puts all its
  // probability on it and its score is exactly G, the forced score of the current block 1. "Always chosen"
  // means the current block wins that tie even though block 0 has the smaller index.
  ProblemSpec s = spec(8, 3, 1, 4, 4, 1, Policy::Seed);
  const Problem p = test::random_problem(s);
  const TopkRun r = run_topk(p);
  for (int64_t t = 4; t <= 6; ++t) EXPECT_EQ(row_of(r, p.layout, t, 0), (std::vector<int32_t>{1})) << "t = " << t;
  EXPECT_EQ(row_of(r, p.layout, 7, 0), (std::vector<int32_t>{1}));
  EXPECT_EQ(row_of(r, p.layout, 2, 0), (std::vector<int32_t>{0}));
}

TEST(TopK, GroupOfThreeSumsProbabilitiesOverItsHeads) {
  // BS = 1, K = 1, scale 1, G = 3: z_{i,c} = q_i k_c. Head 0 prefers block 0 strongly, heads 1 and 2 mildly
  // prefer block 1, so the sum picks block 0 while two of three heads would vote for block 1.
  ProblemSpec s = spec(3, 3, 1, 1, 1, 2, Policy::Seed);
  s.config.scale = 1.0;
  Problem p = test::random_problem(s);
  p.k = {1.0, -1.0, 0.0};
  p.q.assign(9, 0.0);
  const double q2[3] = {5.0, -0.2, -0.2};  // token 2's three heads
  std::copy(q2, q2 + 3, p.q.begin() + 6);
  const TopkRun r = run_topk(p);
  EXPECT_EQ(row_of(r, p.layout, 2, 0), (std::vector<int32_t>{2, 0}));

  // The scores on the mean scale, computed here from the definition.
  BlockScores sc;
  topk_scores(sc, 0, 2, 0, p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), p.layout);
  double expect[2] = {0, 0};
  for (int i = 0; i < 3; ++i) {
    const double z0 = q2[i] * 1.0, z1 = q2[i] * -1.0, z2 = 0.0;
    const double lse = std::log(std::exp(z0) + std::exp(z1) + std::exp(z2));
    EXPECT_NEAR(r.lse_cmp[2 * 3 + i], lse, 1e-14);
    expect[0] += std::exp(z0 - lse) / 3;
    expect[1] += std::exp(z1 - lse) / 3;
  }
  ASSERT_EQ(sc.score.size(), 3u);
  EXPECT_NEAR(sc.score[0], expect[0], 1e-15);
  EXPECT_NEAR(sc.score[1], expect[1], 1e-15);
  EXPECT_EQ(sc.score[2], 1.0);
  EXPECT_EQ(sc.forced, (std::vector<uint8_t>{0, 0, 1}));
  EXPECT_EQ(sc.candidate, (std::vector<uint8_t>{1, 1, 1}));
}

TEST(TopK, ScoresOnMeanScaleSumToOnePlusForced) {
  // A token inside (not at the end of) its block sees exactly the blocks before the current one, whose
  // mean probabilities sum to 1; the forced current block adds 1 (seed), the paper's extra forced blocks
  // replace their probability by 1.
  const Problem p = test::random_problem(spec(37, 4, 2, 5, 4, 16, Policy::Seed, 17));
  const TopkRun r = run_topk(p);
  for (int64_t h = 0; h < 2; ++h) {
    BlockScores sc;
    topk_scores(sc, 0, 33, h, p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), p.layout);
    ASSERT_EQ(sc.score.size(), 10u);  // ceil(37 / 4)
    double sum = 0;
    for (double x : sc.score) sum += x;
    EXPECT_NEAR(sum, 2.0, 1e-14);
    for (int64_t c = 0; c < 10; ++c) {
      EXPECT_EQ(sc.candidate[c], c <= 8) << c;
      EXPECT_EQ(sc.forced[c], c == 8) << c;
      if (c > 8) EXPECT_EQ(sc.score[c], 0.0);
    }
  }
}

TEST(TopK, PaperScoresForceFirstCurrentAndPrevious) {
  const Problem p = test::random_problem(spec(37, 2, 1, 5, 4, 16, Policy::Paper, 17));
  const TopkRun r = run_topk(p);
  BlockScores sc;
  topk_scores(sc, 0, 33, 0, p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), p.layout);
  EXPECT_EQ(sc.forced, (std::vector<uint8_t>{1, 0, 0, 0, 0, 0, 0, 1, 1, 0}));
  EXPECT_EQ(sc.score[0], 1.0);
  EXPECT_EQ(sc.score[7], 1.0);
  EXPECT_EQ(sc.score[8], 1.0);
  for (int64_t c = 1; c < 7; ++c) EXPECT_LT(sc.score[c], 1.0);
}

TEST(TopK, SelectionAgreesWithScores) {
  // Every chosen block outscores (or ties at a larger index) every candidate left out, for G = 1 and G = 3.
  for (int64_t HQ : {2, 6})
    for (Policy policy : {Policy::Seed, Policy::Paper}) {
      const Problem p = test::random_problem(spec(45, HQ, 2, 3, 3, 4, policy, 23));
      const TopkRun r = run_topk(p);
      for (int64_t t = 0; t < 45; ++t)
        for (int64_t h = 0; h < 2; ++h) {
          BlockScores sc;
          topk_scores(sc, 0, t, h, p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), p.layout);
          const std::vector<int32_t> row = row_of(r, p.layout, t, h);
          std::vector<uint8_t> chosen(sc.score.size(), 0);
          for (int32_t c : row)
            if (c >= 0) chosen[c] = 1;
          for (std::size_t c = 0; c < sc.score.size(); ++c) {
            if (sc.forced[c]) EXPECT_TRUE(chosen[c]) << "forced block " << c << " missing at t=" << t;
            if (chosen[c]) EXPECT_TRUE(sc.candidate[c]);
            if (!chosen[c] && sc.candidate[c])
              for (int32_t b : row)
                if (b >= 0) EXPECT_GE(sc.score[b] * (1 + 1e-12), sc.score[c]) << "t=" << t << " block " << c;
          }
        }
    }
}

TEST(TopK, VarlenNumbersBlocksWithinEachSequence) {
  ProblemSpec s = spec(0, 2, 1, 3, 2, 3, Policy::Seed, 31);
  s.lengths = {5, 0, 9};
  const Problem whole = test::random_problem(s);
  const TopkRun r = run_topk(whole);
  int64_t start = 0;
  for (int64_t len : s.lengths) {
    Problem part = test::random_problem(spec(len, 2, 1, 3, 2, 3, Policy::Seed));
    part.q.assign(whole.q.begin() + start * 2 * 3, whole.q.begin() + (start + len) * 2 * 3);
    part.k.assign(whole.k.begin() + start * 3, whole.k.begin() + (start + len) * 3);
    part.v.assign(whole.v.begin() + start * 2, whole.v.begin() + (start + len) * 2);
    const TopkRun alone = run_topk(part);
    const std::vector<int32_t> mine(r.indices.begin() + start * 3, r.indices.begin() + (start + len) * 3);
    EXPECT_EQ(mine, alone.indices) << "sequence at " << start;
    start += len;
  }
  // The second sequence's first token chooses its own block 0.
  EXPECT_EQ(row_of(r, whole.layout, 5, 0), (std::vector<int32_t>{0, -1, -1}));
}

TEST(TopK, VarlenScoresCoverOnlyTheTokensOwnSequence) {
  ProblemSpec s = spec(0, 3, 1, 4, 2, 8, Policy::Paper, 37);
  s.lengths = {6, 0, 11};
  const Problem p = test::random_problem(s);
  const TopkRun r = run_topk(p);
  // Token 14 of the row is position 8 of the third sequence: 6 blocks there, current block 4.
  BlockScores sc;
  topk_scores(sc, 0, 14, 0, p.q.data(), r.k_cmp.data(), r.lse_cmp.data(), p.layout);
  EXPECT_EQ(sc.candidate, (std::vector<uint8_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_EQ(sc.forced, (std::vector<uint8_t>{1, 0, 0, 1, 1, 0}));
  // Position 8 sees blocks 0..3 (NC = 4); on the mean scale the non-forced ones are plain probabilities.
  EXPECT_GT(sc.score[1], 0.0);
  EXPECT_LT(sc.score[1] + sc.score[2], 1.0);
  // The chosen row: the three forced blocks (ties at 1, by index), then blocks 1 and 2 by score, padding.
  const std::vector<int32_t> expect = sc.score[1] >= sc.score[2] ? std::vector<int32_t>{0, 3, 4, 1, 2, -1, -1, -1}
                                                                   : std::vector<int32_t>{0, 3, 4, 2, 1, -1, -1, -1};
  EXPECT_EQ(row_of(r, p.layout, 14, 0), expect);
}

TEST(TopK, SameSelectionForOneAndTwoThreads) {
  const Problem p = test::random_problem(spec(300, 4, 2, 5, 4, 6, Policy::Seed, 47));
  std::vector<int32_t> one, two;
  {
    test::ScopedThreads scoped(1);
    one = run_topk(p).indices;
  }
  {
    test::ScopedThreads scoped(2);
    two = run_topk(p).indices;
  }
  EXPECT_EQ(one, two);
}

TEST(TopK, FutureTokensChangeNothing) {
  Problem p = test::random_problem(spec(24, 4, 2, 3, 3, 4, Policy::Seed, 41));
  const TopkRun before = run_topk(p);
  const int64_t last = 13;
  for (std::size_t n = (last + 1) * 2 * 3; n < p.k.size(); ++n) p.k[n] = -p.k[n] * 2;
  const TopkRun after = run_topk(p);
  const std::vector<int32_t> a(before.indices.begin(), before.indices.begin() + (last + 1) * 2 * 4);
  const std::vector<int32_t> b(after.indices.begin(), after.indices.begin() + (last + 1) * 2 * 4);
  EXPECT_EQ(a, b);
}

TEST(TopK, RowSampleWritesOnlySampledRows) {
  const Problem p = test::random_problem(spec(20, 2, 1, 3, 2, 3, Policy::Paper, 43));
  const TopkRun full = run_topk(p);
  RowMask rows(20, 0);
  rows[0] = rows[11] = rows[19] = 1;
  const TopkRun some = run_topk(p, rows);
  for (int64_t t = 0; t < 20; ++t) {
    const std::vector<int32_t> row = row_of(some, p.layout, t, 0);
    if (rows[t])
      EXPECT_EQ(row, row_of(full, p.layout, t, 0)) << t;
    else
      EXPECT_EQ(row, (std::vector<int32_t>{-7, -7, -7})) << t;
  }
}

TEST(TopK, SingleTokenChoosesItsOwnBlock) {
  const Problem p = test::random_problem(spec(1, 1, 1, 2, 64, 2, Policy::Paper));
  const TopkRun r = run_topk(p);
  EXPECT_EQ(r.indices, (std::vector<int32_t>{0, -1}));
}

}  // namespace
}  // namespace nsa::ref
