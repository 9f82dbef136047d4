// CUDA top-k on inputs whose scores tie exactly: with q = 0 every logit is 0, so every visible block of a
// token has the same probability bit for bit (on the device and in the float64 reference), and the selection
// is decided by the tie rules alone -- forced blocks first for membership (seed, S = 1: a lone visible block
// scores exactly G, as the forced current block does), then the smaller block. The device must then match the
// reference slot for slot, padding included. Shapes cover S = 1..64, G = 1/3/4/8/16/160, BS = 16..128, T = 1,
// a varlen batch with an empty sequence, and enough blocks per token to overflow the candidate buffers.
#include <gtest/gtest.h>

#include <algorithm>
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
};

std::ostream& operator<<(std::ostream& os, const TieCase& c) { return os << c.name; }

class CudaTopkTies : public ::testing::TestWithParam<TieCase> {};

TEST_P(CudaTopkTies, ZeroQueriesSelectByTheTieRulesExactly) {
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
  std::fill(p.q.begin(), p.q.end(), 0.0);
  for (double& x : p.k) x = round_to(c.dtype, x);
  for (double& x : p.v) x = round_to(c.dtype, x);
  p.input_dtype = c.dtype;
  const Outputs out = make_cuda_backend()->run(p, RunOptions{});
  const Layout& L = p.layout;
  std::vector<int32_t> expected(L.dims.B * L.dims.T * L.dims.H * L.S(), -2);
  ref::topk_forward(expected.data(), p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), L);
  ASSERT_EQ(out.block_indices.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const int64_t row = int64_t(i) / L.S();
    ASSERT_EQ(out.block_indices[i], expected[i])
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
    EXPECT_EQ(got, expected);
  }
  // Not vacuous: some row fills all S slots with real blocks.
  bool full_row = false;
  for (std::size_t r = 0; r + L.S() <= expected.size(); r += L.S())
    full_row |= *std::min_element(expected.begin() + r, expected.begin() + r + L.S()) >= 0;
  EXPECT_TRUE(full_row || L.dims.T < c.BS * c.S);
}

const Policy kSeed = Policy::Seed, kPaper = Policy::Paper;

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
        // The largest S, on each kernel.
        TieCase{"seed_S225_G16_K64_BS16", kSeed, 16, 1, 225, 16, 4000, {}, DType::BF16, 64},
        TieCase{"paper_S225_G1_BS16", kPaper, 1, 1, 225, 16, 4000, {}}),
    [](const ::testing::TestParamInfo<TieCase>& info) { return info.param.name; });

}  // namespace
}  // namespace nsa
