// The CUDA compressed-attention forward, both kernels (the wgmma kernel of sm_90 and the mma.sync tile kernel),
// against the float64 reference on the same rounded pooled inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda/attention_test_util.h"
#include "cuda/common.cuh"
#include "cuda/attention_sm90.h"
#include "cuda/kernels.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::test {
namespace {

// The tile kernel's CTA (an sm_80 GPU's compressed attention) at the sizes an A100 gives: two of them an SM at
// K = V = 128 (164 KB an SM, 1 KB reserved a CTA; one CTA an SM had measured 1.25-1.45x slower, on an H100 held to
// it), one within a CTA's 163 KB at K = V = 256. Host arithmetic: no GPU needed.
TEST(CompressedAttentionTile, AnA100HoldsTwoCtasAtK128AndOneAt256) {
  cuda::DeviceLayout L;
  L.dtype = cuda::ElemType::BF16;
  L.K = L.V = 128;
  EXPECT_EQ(cuda::compressed_tile_smem_bytes(L), 69632) << "Q for 128 rows and one K / V tile of 64 keys";
  auto ctas_an_a100_holds = [&] {
    return cuda::kSm80Smem.per_sm / (cuda::compressed_tile_smem_bytes(L) + cuda::kSmemReservedPerCta);
  };
  EXPECT_GE(ctas_an_a100_holds(), 2);
  L.dtype = cuda::ElemType::F16;
  L.K = 96;
  EXPECT_GE(ctas_an_a100_holds(), 2);
  L.K = L.V = 256;
  EXPECT_LE(cuda::compressed_tile_smem_bytes(L), cuda::kSm80Smem.per_cta);
}

// On smaller GPUs the tile kernel takes fewer warps (16 query rows each) beside the same K / V tile of 64 pooled
// blocks, rows padded by 16 bytes, and the row kernel where half of them do not fit. A CTA of 99 KB (sm_86 /
// sm_89) holds all 8 warps at K = V = 128 in bf16, 4 at K = V = 256 (exactly 99 KB), all of fp32's 4 at K = V =
// 128 (exactly 99 KB too); fp32 at K = V = 256 takes 2 warps on an A100 (163 KB of its 163) and the row kernel on
// 99 KB.
TEST(CompressedAttentionTile, SmallerCtasTakeFewerWarps) {
  const cuda::SmemBudget a100 = cuda::kSm80Smem, sm86{99 * 1024, 100 * 1024};
  cuda::DeviceLayout L;
  L.dtype = cuda::ElemType::BF16;
  L.K = L.V = 128;
  EXPECT_EQ(cuda::compressed_tile_warps(L, sm86), 8);
  L.K = L.V = 256;
  EXPECT_EQ(cuda::compressed_tile_smem_bytes(L), (128 * 264 + 64 * (264 + 264)) * 2);
  EXPECT_EQ(cuda::compressed_tile_warps(L, a100), 8);
  EXPECT_EQ(cuda::compressed_tile_warps(L, sm86), 4) << (64 * 264 + 64 * (264 + 264)) * 2 << " bytes with 4";
  L.dtype = cuda::ElemType::F32;
  L.K = L.V = 128;
  EXPECT_EQ(cuda::compressed_tile_smem_bytes(L), (64 * 132 + 64 * (132 + 132)) * 4);
  EXPECT_EQ(cuda::compressed_tile_warps(L, sm86), 4);
  L.K = L.V = 256;
  EXPECT_EQ(cuda::compressed_tile_warps(L, sm86), 0) << "the row kernel";
  EXPECT_EQ(cuda::compressed_tile_warps(L, a100), 2) << (32 * 260 + 64 * 520) * 4 << " bytes with 2";
}

struct CompressedCase {
  std::string name;
  DType dtype;
  int64_t B, T, HQ, H, K, V, BS;
  std::vector<int64_t> lengths;  // varlen when non-empty
  bool wgmma;                    // whether Auto takes the wgmma kernel on sm_90
};

std::ostream& operator<<(std::ostream& os, const CompressedCase& c) { return os << c.name; }

// k_cmp / v_cmp of a problem, pooled in float64 from its (already rounded) k / v and rounded to `dtype`.
struct PooledInputs {
  PooledInputs(const Problem& p, DType dtype)
      : k(std::size_t(p.layout.dims.B * p.layout.chunks * p.layout.dims.H * p.layout.dims.K)),
        v(std::size_t(p.layout.dims.B * p.layout.chunks * p.layout.dims.H * p.layout.dims.V)),
        dtype(dtype),
        k_dev(k.size() * dtype_size(dtype)),
        v_dev(v.size() * dtype_size(dtype)) {
    ref::mean_pool_forward(k.data(), v.data(), p.k.data(), p.v.data(), p.layout);
    upload();
  }
  void upload() {
    round_in_place(k, dtype);
    round_in_place(v, dtype);
    k_dev.upload(pack(k, dtype).data());
    v_dev.upload(pack(v, dtype).data());
  }
  std::vector<double> k, v;
  DType dtype;
  DeviceBytes k_dev, v_dev;
};

struct Result {
  std::vector<double> o, lse;
};

Result run(const DeviceInputs& in, const PooledInputs& pooled, const Layout& L, cuda::KernelChoice choice) {
  DeviceAttentionOutputs out(L, in.dtype());
  cuda::compressed_attention_forward(out.o.get(), static_cast<float*>(out.lse.get()), in.q(), pooled.k_dev.get(),
                                     pooled.v_dev.get(), in.layout(), nullptr, choice);
  cuda_ok(cudaDeviceSynchronize(), "compressed_attention_forward");
  return {out.o_host(), out.lse_host()};
}

Result reference(const Problem& p, const PooledInputs& pooled) {
  const Dims& d = p.layout.dims;
  Result r{std::vector<double>(d.B * d.T * d.HQ * d.V), std::vector<double>(d.B * d.T * d.HQ)};
  ref::compressed_attention_forward(r.o.data(), r.lse.data(), p.q.data(), pooled.k.data(), pooled.v.data(), p.layout);
  return r;
}

class CompressedAttentionCuda : public GpuParamTest<CompressedCase> {};

TEST_P(CompressedAttentionCuda, BothKernelsMatchFloat64Reference) {
  const CompressedCase& c = GetParam();
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    ProblemSpec spec;
    spec.B = c.B, spec.T = c.T, spec.HQ = c.HQ, spec.H = c.H, spec.K = c.K, spec.V = c.V;
    spec.lengths = c.lengths;
    spec.config.block_size = c.BS;
    spec.seed = seed;
    Problem p = random_problem(spec);
    DeviceInputs in(p, c.dtype);  // rounds p.q/k/v to the kernel's dtype
    const PooledInputs pooled(p, c.dtype);
    if (on_sm90())
      EXPECT_EQ(cuda::compressed_sm90_fits(in.layout(), in.q(), pooled.k_dev.get(), pooled.v_dev.get()), c.wgmma)
          << "which kernel Auto takes";
    const Result want = reference(p, pooled);
    ASSERT_FALSE(all_zero(want.o)) << "vacuous case: the reference output is all zero";
    for (cuda::KernelChoice choice : {cuda::KernelChoice::Auto, cuda::KernelChoice::Tile}) {
      SCOPED_TRACE(choice == cuda::KernelChoice::Auto ? "Auto" : "Tile");
      const Result got = run(in, pooled, p.layout, choice);
      expect_attention_close(got.o, got.lse, want.o, want.lse, c.dtype);
    }
  }
}

const DType bf16 = DType::BF16, f16 = DType::F16, f32 = DType::F32;

INSTANTIATE_TEST_SUITE_P(
    Shapes, CompressedAttentionCuda,
    ::testing::Values(
        // name, dtype, B, T, HQ, H, K, V, BS, varlen lengths, wgmma on sm_90
        // G = 16: 4 tokens per warpgroup tile; 131 blocks: three 64-block tiles, the last partial.
        CompressedCase{"bf16_G16_K128_V128_three_tiles", bf16, 2, 2100, 32, 2, 128, 128, 16, {}, true},
        CompressedCase{"f16_G4_K64_V128_BS32", f16, 1, 1500, 8, 2, 64, 128, 32, {}, true},
        CompressedCase{"bf16_G1_K128_V64_BS16", bf16, 1, 1300, 2, 2, 128, 64, 16, {}, true},
        // G = 64: one token per tile; G = 128: two 64-head chunks of one token.
        CompressedCase{"bf16_G64_K64_V64", bf16, 1, 700, 64, 1, 64, 64, 16, {}, true},
        CompressedCase{"f16_G128_K128_V64_head_chunks", f16, 1, 300, 128, 1, 128, 64, 16, {}, true},
        // Varlen: empty sequences, one shorter than a block, tiles straddling sequence ends.
        CompressedCase{"bf16_varlen_G8_K128", bf16, 1, 0, 16, 2, 128, 128, 16, {700, 0, 9, 1100, 0, 65}, true},
        CompressedCase{"f16_varlen_G2_K64_BS64", f16, 1, 0, 4, 2, 64, 64, 64, {300, 4200, 0, 130}, true},
        // Shapes only the tile kernel takes.
        CompressedCase{"bf16_G3_K128", bf16, 1, 600, 6, 2, 128, 128, 16, {}, false},
        CompressedCase{"bf16_G16_K96_V128", bf16, 1, 600, 16, 1, 96, 128, 16, {}, false},
        CompressedCase{"f32_G16_K128", f32, 1, 600, 16, 1, 128, 128, 16, {}, false}),
    [](const ::testing::TestParamInfo<CompressedCase>& info) { return info.param.name; });

// A non-finite value in a pooled block that a CTA loads but none of its rows can see must not reach them (their
// P is 0, but 0 * inf is NaN on the tensor cores). With v_cmp of the second sequence's first block infinite,
// the first sequence's last tile spans that block; every row of the first sequence still matches the reference.
TEST(CompressedAttentionCuda, NonFiniteValuesOfTheNextSequenceDoNotLeak) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  for (DType dtype : {bf16, f16}) {
    ProblemSpec spec;
    spec.HQ = 16, spec.H = 1, spec.K = 128, spec.V = 128;
    spec.lengths = {1000, 700};
    spec.config.block_size = 16;
    Problem p = random_problem(spec);
    DeviceInputs in(p, dtype);
    PooledInputs pooled(p, dtype);
    const Layout& L = p.layout;
    const Dims& d = L.dims;
    const Sequence& first = L.sequences.at(0);
    const int64_t infinite_block = L.sequences.at(1).chunk_start;
    for (int64_t x = 0; x < d.V; ++x) pooled.v[infinite_block * d.V + x] = std::numeric_limits<double>::infinity();
    pooled.upload();
    const Result want = reference(p, pooled);
    const auto first_rows = [&](const std::vector<double>& o) {
      return std::vector<double>(o.begin() + first.start * d.HQ * d.V,
                                 o.begin() + (first.start + first.length) * d.HQ * d.V);
    };
    for (cuda::KernelChoice choice : {cuda::KernelChoice::Auto, cuda::KernelChoice::Tile}) {
      SCOPED_TRACE(choice == cuda::KernelChoice::Auto ? "Auto" : "Tile");
      const Result got = run(in, pooled, L, choice);
      ASSERT_TRUE(all_finite(first_rows(got.o))) << "the first sequence's output is not finite";
      EXPECT_LE(rel_l2(first_rows(got.o), first_rows(want.o)), output_tolerance(dtype));
    }
  }
}

}  // namespace
}  // namespace nsa::test
