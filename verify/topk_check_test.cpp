// The tie-aware top-k rule (nsa-spec §5.3) on rows whose reference scores are written by hand.
#include <gtest/gtest.h>

#include "verify/check.h"

namespace nsa {
namespace {

constexpr double kRtol = 1e-4, kAtol = 1e-9;

// Six blocks: 0..4 may be chosen, 5 is a future block; 4 (the current block) is forced.
// The reference's top 3 is {4, 0, 2}; the 3rd best score is 0.25.
ref::BlockScores six_blocks() {
  ref::BlockScores s;
  s.score = {0.30, 0.10, 0.25, 0.05, 1.0, 0.0};
  s.candidate = {1, 1, 1, 1, 1, 0};
  s.forced = {0, 0, 0, 0, 1, 0};
  return s;
}

TopkRowVerdict judge(std::vector<int32_t> chosen, const ref::BlockScores& s, double rtol = kRtol) {
  return judge_topk_row(chosen.data(), int64_t(chosen.size()), s, rtol, kAtol);
}

TEST(TopkRule, ReferenceSetPassesInAnyOrder) {
  for (const auto& row : {std::vector<int32_t>{4, 0, 2}, std::vector<int32_t>{0, 2, 4}}) {
    const TopkRowVerdict v = judge(row, six_blocks());
    EXPECT_TRUE(v.valid) << v.reason;
    EXPECT_TRUE(v.exact);
    EXPECT_EQ(v.max_rel_gap, 0);
  }
}

TEST(TopkRule, NearTieSwapPassesAndReportsItsGap) {
  ref::BlockScores s = six_blocks();
  s.score[1] = 0.25 * (1 - 1e-6);  // block 1 is a near-tie of block 2, the 3rd best
  const TopkRowVerdict v = judge({4, 0, 1}, s);
  EXPECT_TRUE(v.valid) << v.reason;
  EXPECT_FALSE(v.exact);
  EXPECT_NEAR(v.max_rel_gap, 1e-6, 1e-12);
}

TEST(TopkRule, ForcedBlockWinsAnExactTieForTheReferenceSet) {
  // Seed policy at S = 1: a lone visible block scores exactly the forced score of the current block. The
  // reference admits the forced block, so choosing it is an exact match, and dropping it is invalid.
  ref::BlockScores s;
  s.score = {1.0, 1.0};
  s.candidate = {1, 1};
  s.forced = {0, 1};
  const TopkRowVerdict forced = judge({1}, s);
  EXPECT_TRUE(forced.valid) << forced.reason;
  EXPECT_TRUE(forced.exact);
  EXPECT_FALSE(judge({0}, s).valid);
}

TEST(TopkRule, ExactTieBrokenTheOtherWayPasses) {
  ref::BlockScores s = six_blocks();
  s.score[1] = 0.25;  // the reference breaks the tie towards block 1, the candidate took block 2
  const TopkRowVerdict v = judge({4, 0, 2}, s);
  EXPECT_TRUE(v.valid) << v.reason;
  EXPECT_FALSE(v.exact);
}

TEST(TopkRule, SwapForAClearlyWorseBlockFails) {
  const TopkRowVerdict v = judge({4, 0, 1}, six_blocks());  // 0.10 against 0.25
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("block 1 has score 0.1"), std::string::npos) << v.reason;
}

TEST(TopkRule, ToleranceIsRelativeToTheSthBestScore) {
  // At long sequences scores are tiny: a 10% gap must fail although it is far below any absolute tolerance
  // that would fit short sequences.
  ref::BlockScores s = six_blocks();
  s.score = {3e-6, 0.9e-6, 1e-6, 0.5e-6, 1.0, 0.0};
  EXPECT_FALSE(judge({4, 0, 1}, s).valid);
  // The same gap passes with a 20% relative tolerance.
  EXPECT_TRUE(judge({4, 0, 1}, s, 0.2).valid);
}

TEST(TopkRule, FutureBlockFails) {
  const TopkRowVerdict v = judge({4, 0, 5}, six_blocks());
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("not a candidate"), std::string::npos) << v.reason;
}

TEST(TopkRule, MissingForcedBlockFails) {
  const TopkRowVerdict v = judge({0, 2, 1}, six_blocks());
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("forced block 4 is missing"), std::string::npos) << v.reason;
}

TEST(TopkRule, DuplicateBlockFails) {
  const TopkRowVerdict v = judge({4, 0, 0}, six_blocks());
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("chosen twice"), std::string::npos) << v.reason;
}

TEST(TopkRule, OutOfRangeBlockFails) {
  for (int32_t bad : {6, 9, -2}) {
    const TopkRowVerdict v = judge({4, 0, bad}, six_blocks());
    EXPECT_FALSE(v.valid) << bad;
    EXPECT_NE(v.reason.find("outside [-1, 6)"), std::string::npos) << v.reason;
  }
}

TEST(TopkRule, PaddingWhileCandidatesRemainFails) {
  const TopkRowVerdict v = judge({4, 0, -1}, six_blocks());
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("2 blocks chosen, expected min(S, candidates) = 3"), std::string::npos) << v.reason;
}

TEST(TopkRule, PaddingOnlyAtTheEnd) {
  ref::BlockScores s;
  s.score = {0.4, 1.0, 0.0};
  s.candidate = {1, 1, 0};
  s.forced = {0, 1, 0};
  EXPECT_TRUE(judge({1, 0, -1, -1}, s).valid);
  EXPECT_TRUE(judge({1, 0, -1, -1}, s).exact);
  const TopkRowVerdict v = judge({1, -1, 0, -1}, s);
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("follows -1 padding"), std::string::npos) << v.reason;
  // With fewer candidates than S every candidate must be chosen, whatever its score.
  EXPECT_FALSE(judge({1, -1, -1, -1}, s).valid);
}

TEST(TopkRule, MoreForcedBlocksThanSlotsAdmitOnlyForcedBlocks) {
  // Paper policy with S = 2: blocks 0, 2 and 3 are forced (score 1), block 1 is visible.
  ref::BlockScores s;
  s.score = {1.0, 0.9, 1.0, 1.0};
  s.candidate = {1, 1, 1, 1};
  s.forced = {1, 0, 1, 1};
  EXPECT_TRUE(judge({0, 2}, s).valid);
  EXPECT_TRUE(judge({0, 2}, s).exact);
  EXPECT_TRUE(judge({3, 2}, s).valid);  // a tie among forced blocks
  const TopkRowVerdict v = judge({0, 1}, s);
  EXPECT_FALSE(v.valid);
  EXPECT_NE(v.reason.find("forced blocks fill"), std::string::npos) << v.reason;
}

}  // namespace
}  // namespace nsa
