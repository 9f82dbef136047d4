// CUDA top-k on inputs whose scores tie exactly, where the device must match the float64 reference slot for
// slot, padding included.
// * Zero queries: every logit is 0, so every visible block of a token has the same probability bit for bit
//   (on the device and in the reference), and the selection is decided by the tie rules alone -- forced
//   blocks first for membership (seed, S = 1: a lone visible block scores exactly G, as the forced current
//   block does), then the smaller block. Shapes cover S = 1..225, G = 1/3/4/8/16/160, BS = 16..128, T = 1, a
//   varlen batch with an empty sequence, and enough blocks per token to overflow the candidate buffers.
// * Integer levels: queries and block keys (constant over a block, so the pooled keys are exact) of small
//   integers, K = 64 (scale 1/8 exact) and the heads of a group alike, so logits are exact multiples of 1/8:
//   blocks with equal dot products tie exactly, and unequal ones differ by a factor of e^(1/8) or more, far
//   beyond rounding. The cut of the S best then often falls inside a group of tied blocks, among distinct
//   scores -- the common case of the candidate compaction, not only its all-equal extreme.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention_test_util.h"
#include "cuda/cuda_backend.h"
#include "cuda/kernels.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa {
namespace {

struct TieCase {
  std::string name;
  Policy policy;
  int64_t HQ, H, S, BS, T;
  std::vector<int64_t> lengths;
  DType dtype = DType::BF16;
  int64_t K = 32;
  bool integer_levels = false;  // else zero queries
  int64_t smem_limit = 0;       // > 0: the sm_80 kernel set, its CTAs held to this much shared memory
};

std::ostream& operator<<(std::ostream& os, const TieCase& c) { return os << c.name; }

class CudaTopkTies : public ::testing::TestWithParam<TieCase> {};

TEST_P(CudaTopkTies, SelectsByTheTieRulesExactly) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: the CUDA backend tests need a GPU";
  const TieCase& c = GetParam();
  test::ProblemSpec s;
  s.T = c.T;
  s.HQ = c.HQ;
  s.H = c.H;
  s.K = c.K;
  s.V = 16;
  s.lengths = c.lengths;
  s.config.block_size = c.BS;
  s.config.block_count = c.S;
  s.config.policy = c.policy;
  s.seed = std::hash<std::string>{}(c.name);
  Problem p = test::random_problem(s);
  if (c.integer_levels) {
    // Entries in {-2, ..., 2}: per token and kv head one query for the group's heads, per block and kv head
    // one key (fixed length only).
    std::mt19937_64 rng(s.seed);
    std::uniform_int_distribution<int> level(-2, 2);
    const int64_t blocks = (c.T + c.BS - 1) / c.BS, G = c.HQ / c.H;
    std::vector<double> block_keys(std::size_t(blocks * c.H * c.K));
    for (double& x : block_keys) x = level(rng);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t d = 0; d < c.K; ++d) {
          const double qd = level(rng);
          for (int64_t i = 0; i < G; ++i) p.q[std::size_t(((t * c.HQ) + h * G + i) * c.K + d)] = qd;
          p.k[std::size_t((t * c.H + h) * c.K + d)] = block_keys[std::size_t(((t / c.BS) * c.H + h) * c.K + d)];
        }
  } else {
    std::fill(p.q.begin(), p.q.end(), 0.0);
  }
  for (double& x : p.k) x = round_to(c.dtype, x);
  for (double& x : p.v) x = round_to(c.dtype, x);
  p.input_dtype = c.dtype;
  const Outputs out = make_cuda_backend(c.smem_limit == 0, c.smem_limit)->run(p, RunOptions{});
  const Layout& L = p.layout;
  std::vector<int32_t> expected(L.dims.B * L.dims.T * L.dims.H * L.S(), -2);
  ref::topk_forward(expected.data(), p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), L);
  // The one near-tie of integer levels: in the seed policy a token with one complete block before its own
  // (t in [BS, 2 BS - 1)) scores that block sum_i exp(z - lse_cmp) = G up to the rounding of lse_cmp, against
  // the forced block's exact G, so only the order of the two may differ: those rows are compared as sets.
  auto settle = [&](std::vector<int32_t> idx) {
    if (c.integer_levels && c.policy == Policy::Seed)
      for (int64_t t = c.BS; t < std::min(2 * c.BS - 1, c.T); ++t)
        for (int64_t h = 0; h < c.H; ++h) {
          auto row = idx.begin() + (t * c.H + h) * c.S;
          std::sort(row, row + c.S);
        }
    return idx;
  };
  expected = settle(expected);
  const std::vector<int32_t> backend = settle(out.block_indices);
  ASSERT_EQ(backend.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const int64_t row = int64_t(i) / L.S();
    ASSERT_EQ(backend[i], expected[i])
        << c.name << ": token " << row / L.dims.H << ", kv head " << row % L.dims.H << ", slot " << i % L.S();
  }
  // Each top-k kernel on its own, from the backend's k_cmp and lse_cmp: the same slots.
  test::DeviceInputs in(p, c.dtype);
  test::DeviceBytes k_cmp(out.k_cmp.size() * dtype_size(c.dtype)), lse(out.lse_cmp.size() * sizeof(float)),
      indices(expected.size() * sizeof(int32_t));
  k_cmp.upload(test::pack(out.k_cmp, c.dtype).data());
  const std::vector<float> lse_host(out.lse_cmp.begin(), out.lse_cmp.end());
  lse.upload(lse_host.data());
  for (cuda::KernelChoice choice : {cuda::KernelChoice::Auto, cuda::KernelChoice::Tile}) {
    SCOPED_TRACE(choice == cuda::KernelChoice::Auto ? "Auto" : "Tile");
    indices.poison();
    cuda::topk_forward(static_cast<int32_t*>(indices.get()), in.q(), k_cmp.get(), static_cast<const float*>(lse.get()),
                       in.layout(), nullptr, choice);
    test::cuda_ok(cudaDeviceSynchronize(), "topk_forward");
    std::vector<int32_t> got(expected.size());
    indices.download(got.data());
    EXPECT_EQ(settle(got), expected);
  }
  // Not vacuous: some row fills all S slots with real blocks.
  bool full_row = false;
  for (std::size_t r = 0; r + L.S() <= expected.size(); r += L.S())
    full_row |= *std::min_element(expected.begin() + r, expected.begin() + r + L.S()) >= 0;
  EXPECT_TRUE(full_row || L.dims.T < c.BS * c.S);
}

const Policy kSeed = Policy::Seed, kPaper = Policy::Paper;
constexpr int64_t kSm86 = 99 * 1024;  // a CTA's shared memory on sm_86 / sm_89 GPUs

// Top-k's tile kernel on GPUs with less shared memory than an H100 (host arithmetic: no GPU needed): where the
// candidate buffers of 16 x warps tokens would not fit, a CTA takes fewer warps, so that every shape below finds
// a launch within an A100's 163 KB a CTA, and within 99 KB (sm_86 / sm_89) every shape but fp32 inputs with
// K = 256 and at least 128 blocks a query (one warp's 16 tokens and one fp32 K tile are 108 KB there).
TEST(CudaTopkTile, FewerWarpsWhereTheBuffersOutgrowTheCta) {
  const cuda::SmemBudget a100 = cuda::kSm80Smem, sm86{kSm86, kSm86 + cuda::kSmemReservedPerCta};
  cuda::DeviceLayout L;
  L.H = 1;
  L.max_len = 65536;
  int fewer_warps = 0;
  for (cuda::ElemType dtype : {cuda::ElemType::BF16, cuda::ElemType::F16, cuda::ElemType::F32})
    for (int64_t K : {16, 64, 128, 192, 256})
      for (int64_t G : {1, 2, 3, 4, 8, 16, 32})
        for (int S : {1, 16, 64, 128, 225})
          for (const cuda::SmemBudget& budget : {a100, sm86}) {
            L.dtype = dtype, L.K = K, L.HQ = G, L.block_count = S;
            const std::string what = "dtype " + std::to_string(int(dtype)) + ", K " + std::to_string(K) + ", G " +
                                     std::to_string(G) + ", S " + std::to_string(S) + ", CTA " +
                                     std::to_string(budget.per_cta);
            const cuda::TopkTileConfig c = cuda::topk_tile_config(L, budget);
            const bool fp32_k256_long = dtype == cuda::ElemType::F32 && K == 256 && S >= 128;
            if (c.warps == 0) {
              EXPECT_TRUE(budget.per_cta == kSm86 && fp32_k256_long) << "no launch: " << what;
              continue;
            }
            EXPECT_LE(c.bytes, budget.per_cta) << what;
            EXPECT_GE(c.cap, S + 31) << what << ": a filter pass appends up to 32 blocks to S - 1 kept";
            EXPECT_TRUE(c.stages >= 1 && c.stages <= 3) << what;
            fewer_warps += c.warps < (dtype == cuda::ElemType::F32 ? 4 : 8);
          }
  EXPECT_GT(fewer_warps, 0);
  // The shapes that had no launch with at most one halving of the warps: G = 1, S = 225 on an A100 (K = 128) and
  // S = 64 on 99 KB; and the production shape keeps its 8 warps and two CTAs an SM on an A100.
  L.dtype = cuda::ElemType::BF16, L.K = 128, L.HQ = 1, L.block_count = 225;
  EXPECT_EQ(cuda::topk_tile_config(L, a100).warps, 2);
  L.block_count = 64;
  EXPECT_EQ(cuda::topk_tile_config(L, sm86).warps, 2);
  L.HQ = 16, L.block_count = 16;
  const cuda::TopkTileConfig production = cuda::topk_tile_config(L, a100);
  EXPECT_EQ(production.warps, 8);
  EXPECT_TRUE(cuda::two_ctas_fit(production.bytes, a100.per_sm));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaTopkTies,
    ::testing::Values(
        TieCase{"seed_S1_G1_BS16", kSeed, 2, 2, 1, 16, 300, {}},
        TieCase{"seed_S1_G16_BS32", kSeed, 16, 1, 1, 32, 300, {}},
        TieCase{"paper_S1_G3_BS16", kPaper, 6, 2, 1, 16, 200, {}},
        TieCase{"paper_S2_G1_BS16", kPaper, 1, 1, 2, 16, 100, {}},
        TieCase{"seed_S16_G3_BS64", kSeed, 3, 1, 16, 64, 1100, {}},
        TieCase{"paper_S16_G16_BS128", kPaper, 16, 1, 16, 128, 2200, {}},
        TieCase{"seed_S16_G1_BS16_overflow", kSeed, 2, 2, 16, 16, 3000, {}},
        TieCase{"seed_S64_G1_BS16_overflow", kSeed, 1, 1, 64, 16, 2500, {}},
        TieCase{"paper_S64_G16_BS16_overflow", kPaper, 16, 1, 64, 16, 5000, {}},
        TieCase{"seed_S64_G1_K256_half_warps", kSeed, 1, 1, 64, 16, 1300, {}, DType::BF16, 256},
        TieCase{"seed_S16_G1_f32_overflow", kSeed, 1, 1, 16, 16, 3000, {}, DType::F32},
        TieCase{"varlen_empty_G3_S4_BS16", kSeed, 3, 1, 4, 16, 0, {1, 0, 300, 17, 0}},
        TieCase{"paper_varlen_empty_G1_S3_BS32", kPaper, 2, 2, 3, 32, 0, {0, 130, 1, 97}},
        TieCase{"T1_G1_S16_BS64", kSeed, 1, 1, 16, 64, 1, {}},
        // Three K stages with the production key width; G = 8 and 4: a warp filters several tokens it scored.
        TieCase{"seed_S16_G16_K128_overflow", kSeed, 16, 1, 16, 16, 3000, {}, DType::BF16, 128},
        TieCase{"paper_S8_G8_BS16_overflow", kPaper, 16, 2, 8, 16, 2000, {}},
        TieCase{"seed_S16_G4_BS16_K128", kSeed, 8, 2, 16, 16, 1500, {}, DType::BF16, 128},
        // Two head chunks: Q reloaded per chunk while later K tiles are in flight.
        TieCase{"paper_S16_G160_head_chunks", kPaper, 160, 1, 16, 16, 600, {}},
        // K = 64 / 128 (G = 4, 8, 16: the wgmma kernel on sm_90), a varlen batch, overflowing buffers.
        TieCase{"seed_S16_G16_K64_BS64", kSeed, 16, 1, 16, 64, 3000, {}, DType::BF16, 64},
        TieCase{"paper_varlen_S16_G16_K128_f16", kPaper, 32, 2, 16, 16, 0, {900, 0, 3, 2000}, DType::F16, 128},
        TieCase{"paper_varlen_S8_G8_K64", kPaper, 16, 2, 8, 16, 0, {700, 0, 5, 1300}, DType::F16, 64},
        TieCase{"paper_S64_G4_K128_f16_overflow", kPaper, 8, 2, 64, 16, 4000, {}, DType::F16, 128},
        // The largest S, on each kernel: 225 on the tile kernel (at G = 16 too, since the sm_90 kernel's
        // 240-entry buffers hold S + 63 only up to S = 177), 177 on the sm_90 kernel at G = 16, where a
        // compaction also takes the radix select (paper S = 64 keeps 61).
        TieCase{"seed_S225_G16_K64_BS16", kSeed, 16, 1, 225, 16, 4000, {}, DType::BF16, 64},
        TieCase{"paper_S225_G1_BS16", kPaper, 1, 1, 225, 16, 4000, {}},
        TieCase{"seed_S177_G16_K128_BS16", kSeed, 16, 1, 177, 16, 4000, {}, DType::BF16, 128},
        // The sm_90 kernel at G = 16 cutting its buffer back inside a tile (375 blocks): exact ties at the cut.
        TieCase{"seed_S16_G16_K64_BS16_cut_in_tile", kSeed, 16, 1, 16, 16, 6000, {}, DType::BF16, 64},
        TieCase{"paper_S64_G16_K64_BS16_overflow", kPaper, 16, 1, 64, 16, 5000, {}, DType::BF16, 64},
        // Integer levels (K = 64): ties inside the ranking. The compaction ranks exactly when it keeps at most
        // 32 blocks (seed S = 33 keeps 32) and otherwise takes its radix select (paper S = 40 keeps 37).
        TieCase{"levels_seed_S16_G1_BS16", kSeed, 2, 2, 16, 16, 3000, {}, DType::BF16, 64, true},
        TieCase{"levels_paper_S16_G1_BS64", kPaper, 1, 1, 16, 64, 8192, {}, DType::BF16, 64, true},
        TieCase{"levels_seed_S33_G2_BS16", kSeed, 4, 2, 33, 16, 3000, {}, DType::F16, 64, true},
        TieCase{"levels_paper_S40_G1_BS16", kPaper, 2, 2, 40, 16, 3000, {}, DType::BF16, 64, true},
        TieCase{"levels_paper_S32_G4_BS16", kPaper, 8, 2, 32, 16, 3000, {}, DType::BF16, 64, true},
        TieCase{"levels_seed_S16_G16_BS64", kSeed, 32, 2, 16, 64, 8192, {}, DType::BF16, 64, true},
        TieCase{"levels_paper_S48_G16_BS16", kPaper, 32, 2, 48, 16, 4000, {}, DType::BF16, 64, true},
        TieCase{"levels_seed_S8_G8_BS32_f32", kSeed, 8, 1, 8, 32, 3000, {}, DType::F32, 64, true},
        // The tile kernel with fewer warps, where a smaller GPU's shared memory holds fewer tokens' buffers:
        // 99 KB a CTA (sm_86 / sm_89) at G = 1, S = 64, K = 128 and in fp32; an A100's 163 KB at S = 225.
        TieCase{"seed_S64_G1_K128_smem99_overflow", kSeed, 1, 1, 64, 16, 2500, {}, DType::BF16, 128, false, kSm86},
        TieCase{"levels_paper_S40_G1_f32_K64_smem99", kPaper, 2, 2, 40, 16, 3000, {}, DType::F32, 64, true, kSm86},
        TieCase{"paper_S225_G1_K128_smem163", kPaper, 1, 1, 225, 16, 4000, {}, DType::BF16, 128, false,
                cuda::kSm80Smem.per_cta}),
    [](const ::testing::TestParamInfo<TieCase>& info) { return info.param.name; });

}  // namespace
}  // namespace nsa
