// The key-block backward's geometry and the problems it takes (host code: runs without a GPU). The GPU tests
// check its gradients; these pin what the kernel assumes of its geometry.
#include "cuda/key_block_backward.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
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

TEST(KeyBlockGeometry, TakesHalfPrecisionHeadDimsUpTo256WhereTheTileFitsSharedMemory) {
  alignas(16) static unsigned char buffer[64];
  const void* p = buffer;
  constexpr SmemBudget kH100 = kSm90Smem, kA100 = kSm80Smem;
  DeviceLayout L;
  L.dtype = ElemType::BF16;
  L.K = L.V = 128;
  L.max_len = 65536;
  for (int tile : {16, 32, 64, 128}) {
    EXPECT_TRUE(fits_within(L, tile, p, p, p, kH100)) << tile;
    EXPECT_TRUE(fits_within(L, tile, p, p, p, kA100)) << tile;
  }
  for (int tile : {8, 48, 256}) EXPECT_FALSE(fits_within(L, tile, p, p, p, kH100)) << tile;
  L.dtype = ElemType::F16;
  EXPECT_TRUE(fits_within(L, 64, p, p, p, kH100));
  L.dtype = ElemType::F32;
  EXPECT_FALSE(fits_within(L, 64, p, p, p, kH100)) << "fp32 keeps the CUDA-core kernels";
  L.dtype = ElemType::BF16;
  // Past 128 the rows are 256 wide: 64-key tiles take 184 KB (an H100's CTA, not an A100's), 128-key tiles more
  // than either.
  L.K = 136;
  EXPECT_TRUE(fits_within(L, 64, p, p, p, kH100));
  L.K = 256;
  L.V = 200;
  for (int tile : {16, 32, 64}) EXPECT_TRUE(fits_within(L, tile, p, p, p, kH100)) << tile;
  EXPECT_FALSE(fits_within(L, 128, p, p, p, kH100));
  EXPECT_FALSE(fits_within(L, 64, p, p, p, kA100));
  EXPECT_TRUE(fits_within(L, 32, p, p, p, kA100));
  EXPECT_EQ(smem_bytes(Dims{256, 256}, 64, Staging{3, false}), 188544)
      << "K, V and three stages of 32 Q and dO rows, 264 elements wide";
  // The NSA paper's heads: rows of 192 and 128 (127104 bytes with 64-key tiles, an A100's CTA holds them).
  L.K = 192;
  L.V = 128;
  EXPECT_EQ(kernel_dims(L.K, L.V).k, 192);
  EXPECT_EQ(kernel_dims(L.K, L.V).v, 128);
  EXPECT_EQ(smem_bytes(kernel_dims(L.K, L.V), 64, Staging{3, false}), 127104);
  EXPECT_TRUE(fits_within(L, 64, p, p, p, kA100));
  EXPECT_EQ(kernel_dims(136, 24).k, 192) << "K <= 192 and V <= 128";
  EXPECT_EQ(kernel_dims(200, 64).k, 256);
  EXPECT_EQ(kernel_dims(96, 200).v, 256);
  EXPECT_EQ(kernel_dims(128, 96).k, 128);
  EXPECT_EQ(kernel_dims(40, 64).v, 64);
  L.K = 264;
  EXPECT_FALSE(fits_within(L, 16, p, p, p, kH100)) << "dK in registers: K <= 256";
  L.K = 40;
  L.V = 12;
  EXPECT_FALSE(fits_within(L, 64, p, p, p, kH100)) << "rows of 16-byte copies: V % 8 == 0";
  L.V = 24;
  EXPECT_TRUE(fits_within(L, 64, p, p, p, kH100));
  EXPECT_FALSE(fits_within(L, 64, buffer + 8, p, p, kH100)) << "q not 16-byte aligned";
  L.max_len = int64_t(1) << 31;
  EXPECT_FALSE(fits_within(L, 64, p, p, p, kH100)) << "token positions are int32";
}

// How many CTAs of `bytes` an SM of `budget` holds by shared memory.
int64_t ctas_per_sm(int64_t bytes, SmemBudget budget) { return budget.per_sm / (bytes + kSmemReservedPerCta); }

// Three steps of rows in flight with P^T in fragments of its own, unless a leaner staging keeps a second CTA an SM
// which that would not (and the registers allow two), then the first of two stages, two with P^T in dS; rows
// above 256 elements with small tiles always two stages.
TEST(KeyBlockGeometry, StagingKeepsASecondCtaAnSmWhereItCan) {
  const Staging three{3, false}, two{2, false}, two_p_in_ds{2, true};
  for (SmemBudget budget : {kSm90Smem, kSm80Smem})
    for (Dims d : {Dims{32, 32}, Dims{64, 64}, Dims{128, 128}, Dims{192, 128}, Dims{256, 256}})
      for (int keys : {16, 32, 64, 128}) {
        const Staging st = staging(d, keys, budget.per_sm);
        auto ctas = [&](Staging s) { return ctas_per_sm(smem_bytes(d, keys, s), budget); };
        const std::string what = "K " + std::to_string(d.k) + ", V " + std::to_string(d.v) + ", " +
                                 std::to_string(keys) + " keys, " + std::to_string(budget.per_sm) + " bytes an SM";
        if (d.k + d.v > 256 && keys < 64) {
          EXPECT_EQ(st.stages, 2) << what;
          EXPECT_FALSE(st.p_in_ds) << what;
        } else if (st.stages == 3) {
          EXPECT_FALSE(st.p_in_ds) << what;
          EXPECT_TRUE(ctas(three) >= 2 || ctas(two_p_in_ds) < 2 || !two_ctas_by_registers(d, keys)) << what;
        } else {
          EXPECT_EQ(st.stages, 2) << what;
          EXPECT_TRUE(two_ctas_by_registers(d, keys)) << what;
          EXPECT_LT(ctas(three), 2) << what;
          EXPECT_GE(ctas(st), 2) << what;
          if (st.p_in_ds) EXPECT_LT(ctas(two), 2) << what;
        }
      }
  auto on = [](SmemBudget b, Dims d, int keys) { return staging(d, keys, b.per_sm); };
  EXPECT_EQ(on(kSm90Smem, Dims{128, 128}, 64).stages, 3);
  EXPECT_EQ(smem_bytes(Dims{128, 128}, 64, three), 106624);
  EXPECT_EQ(smem_bytes(Dims{128, 128}, 64, two), 88320);
  EXPECT_EQ(smem_bytes(Dims{128, 128}, 64, two_p_in_ds), 80128);
  EXPECT_EQ(on(kSm80Smem, Dims{128, 128}, 64).stages, 2) << "an A100 holds two CTAs of 80128 bytes, one of 88320";
  EXPECT_TRUE(on(kSm80Smem, Dims{128, 128}, 64).p_in_ds);
  EXPECT_EQ(on(kSm80Smem, Dims{128, 128}, 32).stages, 2);
  EXPECT_FALSE(on(kSm80Smem, Dims{128, 128}, 32).p_in_ds);
  EXPECT_EQ(on(kSm90Smem, Dims{256, 256}, 32).stages, 2);
  EXPECT_EQ(on(kSm90Smem, Dims{256, 256}, 64).stages, 3) << "one CTA of 256 threads at up to 255 registers";
  EXPECT_EQ(on(kSm90Smem, Dims{192, 128}, 32).stages, 2);
  EXPECT_EQ(on(kSm80Smem, Dims{192, 128}, 32).stages, 2);
}

// The budget follows the device's shared memory and the kernel set: an sm_90 device told to run the sm_80 kernels
// reckons as an A100, and so does any GPU with less than an H100's 228 KB an SM.
TEST(KeyBlockGeometry, TheSm80KernelSetAndSmallerGpusTakeAnA100sBudget) {
  EXPECT_EQ(stage_budget(false, kSm90Smem.per_sm, kSm90Smem.per_cta).per_sm, kSm90Smem.per_sm);
  EXPECT_EQ(stage_budget(true, kSm90Smem.per_sm, kSm90Smem.per_cta).per_sm, kSm80Smem.per_sm);
  EXPECT_EQ(stage_budget(true, kSm90Smem.per_sm, kSm90Smem.per_cta).per_cta, kSm90Smem.per_cta);
  EXPECT_EQ(stage_budget(false, kSm80Smem.per_sm, kSm80Smem.per_cta).per_sm, kSm80Smem.per_sm);
  EXPECT_EQ(stage_budget(false, 100 * 1024, 99 * 1024).per_sm, kSm80Smem.per_sm);
  // A GPU with 100 KB an SM (sm_86, sm_89) now fits the K = V = 128 CTA with 64-key tiles (78 KB in 99 KB).
  alignas(16) static unsigned char buffer[16];
  DeviceLayout L;
  L.dtype = ElemType::BF16;
  L.K = L.V = 128;
  L.max_len = 4096;
  EXPECT_TRUE(fits_within(L, 64, buffer, buffer, buffer, stage_budget(false, 100 * 1024, 99 * 1024)));
}

}  // namespace
}  // namespace nsa::cuda::kbb
