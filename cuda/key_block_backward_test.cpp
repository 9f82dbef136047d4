// The key-block backward's geometry and the problems it takes (host code: runs without a GPU). The GPU tests
// check its gradients; these pin what the kernel assumes of its geometry.
#include "cuda/key_block_backward.h"

#include <gtest/gtest.h>

#include <set>
#include <utility>

namespace nsa::cuda::kbb {
namespace {

// Every (token, head) of a CTA's tokens meets exactly one row of one step, within the steps the kernel runs
// (ceil(ntok / tpt) x head_chunks), and no padding row names one.
TEST(KeyBlockGeometry, StepsCoverEveryTokenAndHeadOnce) {
  for (int G = 1; G <= 80; ++G)
    for (int steps_per_cta : {kStepsPerCta, 2 * kStepsPerCta, 4 * kStepsPerCta, 8 * kStepsPerCta}) {
      const StepGeometry geo = step_geometry(G, steps_per_cta);
      ASSERT_LE(geo.hpt, 16) << "G " << G << ": a token's heads must stay in one m16 tile";
      ASSERT_LE(geo.hpt * geo.tpt, kStepRows) << "G " << G;
      ASSERT_GE(geo.tokens_per_cta, 1) << "G " << G;
      ASSERT_LE(geo.tokens_per_cta, kMaxTokensPerCta) << "G " << G << ": the staged token positions overflow";
      for (int ntok : {1, 3, geo.tpt, geo.tokens_per_cta}) {
        const int steps = (ntok + geo.tpt - 1) / geo.tpt * geo.head_chunks;
        std::set<std::pair<int, int>> seen;
        for (int s = 0; s < steps; ++s)
          for (int r = 0; r < kStepRows; ++r) {
            int i = -1, head = -1;
            if (!step_slot(geo, s, r, ntok, G, i, head)) continue;
            ASSERT_TRUE(i >= 0 && i < ntok && head >= 0 && head < G) << "G " << G << " step " << s << " row " << r;
            ASSERT_TRUE(seen.insert({i, head}).second) << "G " << G << ": token " << i << " head " << head << " twice";
          }
        EXPECT_EQ(seen.size(), std::size_t(ntok) * std::size_t(G)) << "G " << G << ", " << ntok << " tokens";
      }
    }
}

TEST(KeyBlockGeometry, SixteenHeadsFillAStepWithTwoTokens) {
  const StepGeometry geo = step_geometry(16);
  EXPECT_EQ(geo.hpt, 16);
  EXPECT_EQ(geo.tpt, 2);
  EXPECT_EQ(geo.head_chunks, 1);
  EXPECT_EQ(geo.tokens_per_cta, 64);
  const StepGeometry one = step_geometry(1);
  EXPECT_EQ(one.tpt, kStepRows);
  EXPECT_EQ(one.tokens_per_cta, kMaxTokensPerCta);
}

TEST(KeyBlockGeometry, TakesHalfPrecisionHeadDimsUpTo128) {
  alignas(16) static unsigned char buffer[64];
  const void* p = buffer;
  DeviceLayout L;
  L.dtype = ElemType::BF16;
  L.K = L.V = 128;
  L.max_len = 65536;
  EXPECT_TRUE(fits(L, 64, p, p, p));
  for (int tile : {16, 32, 128}) EXPECT_TRUE(fits(L, tile, p, p, p)) << tile;
  for (int tile : {8, 48, 256}) EXPECT_FALSE(fits(L, tile, p, p, p)) << tile;
  L.dtype = ElemType::F16;
  EXPECT_TRUE(fits(L, 64, p, p, p));
  L.dtype = ElemType::F32;
  EXPECT_FALSE(fits(L, 64, p, p, p)) << "fp32 keeps the CUDA-core kernels";
  L.dtype = ElemType::BF16;
  L.K = 136;
  EXPECT_FALSE(fits(L, 64, p, p, p)) << "dK in registers: K <= 128";
  L.K = 40;
  L.V = 12;
  EXPECT_FALSE(fits(L, 64, p, p, p)) << "rows of 16-byte copies: V % 8 == 0";
  L.V = 24;
  EXPECT_TRUE(fits(L, 64, p, p, p));
  EXPECT_FALSE(fits(L, 64, buffer + 8, p, p)) << "q not 16-byte aligned";
  L.max_len = int64_t(1) << 31;
  EXPECT_FALSE(fits(L, 64, p, p, p)) << "token positions are int32";
}

}  // namespace
}  // namespace nsa::cuda::kbb
