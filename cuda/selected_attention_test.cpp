// The CUDA selected-attention forward against the float64 reference on the same rounded inputs.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "cuda/attention_test_util.h"
#include "cuda/kernels.h"
#include "cuda/selected_attention_blocks.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::test {
namespace {

struct SelectedCase {
  std::string name;
  DType dtype;
  int64_t B, T, HQ, H, K, V, BS, S;
  std::vector<int64_t> lengths;  // varlen when non-empty
  bool with_counts;
};

std::ostream& operator<<(std::ostream& os, const SelectedCase& c) { return os << c.name; }

struct SelectedRun {
  std::vector<double> o, lse, ref_o, ref_lse;
};

enum class Pattern { Mixed, Independent, SharedRuns };

SelectedRun run_selected(const SelectedCase& c, uint64_t seed, const ref::RowMask& rows = {},
                         cuda::SelectedPath path = cuda::SelectedPath::Auto, Pattern pattern = Pattern::Mixed,
                         std::vector<int32_t>* path_counts = nullptr, bool sm80_kernel_set = false) {
  ProblemSpec spec;
  spec.B = c.B, spec.T = c.T, spec.HQ = c.HQ, spec.H = c.H, spec.K = c.K, spec.V = c.V;
  spec.lengths = c.lengths;
  spec.config.block_size = c.BS;
  spec.config.block_count = c.S;
  spec.seed = seed;
  Problem p = random_problem(spec);
  DeviceInputs in(p, c.dtype);  // rounds p.q/k/v to the kernel's dtype
  const Layout& L = p.layout;
  std::mt19937_64 rng(seed * 7919 + 1);
  const std::vector<int32_t> idx = pattern == Pattern::Independent ? independent_block_indices(L, rng)
                                  : pattern == Pattern::SharedRuns  ? shared_run_block_indices(L, 64, rng)
                                                                    : mixed_block_indices(L, rng);
  const std::vector<int32_t> counts = c.with_counts ? random_block_counts(L, rng) : std::vector<int32_t>{};
  DeviceBytes d_idx(idx.size() * 4), d_counts(std::max<std::size_t>(counts.size(), 1) * 4);
  d_idx.upload(idx.data());
  if (c.with_counts) d_counts.upload(counts.data());

  DeviceAttentionOutputs out(L, c.dtype);
  DeviceBytes d_paths(3 * 4);
  const std::vector<int32_t> zeros(3, 0);
  d_paths.upload(zeros.data());
  cuda::DeviceLayout layout = in.layout();
  layout.sm90_kernels = !sm80_kernel_set;
  cuda::selected_attention_forward(out.o.get(), static_cast<float*>(out.lse.get()), in.q(), in.k(), in.v(),
                                   static_cast<const int32_t*>(d_idx.get()),
                                   c.with_counts ? static_cast<const int32_t*>(d_counts.get()) : nullptr, layout,
                                   nullptr, path, static_cast<int32_t*>(d_paths.get()));
  cuda_ok(cudaDeviceSynchronize(), "selected_attention_forward");
  if (path_counts) {
    path_counts->assign(3, 0);
    d_paths.download(path_counts->data());
  }

  SelectedRun r;
  r.o = out.o_host();
  r.lse = out.lse_host();
  const Dims& d = L.dims;
  r.ref_o.assign(d.B * d.T * d.HQ * d.V, 0.0);
  r.ref_lse.assign(d.B * d.T * d.HQ, 0.0);
  ref::selected_attention_forward(r.ref_o.data(), r.ref_lse.data(), p.q.data(), p.k.data(), p.v.data(), idx.data(),
                                  c.with_counts ? counts.data() : nullptr, L, rows);
  if (!rows.empty()) {  // compare the sampled rows only
    SelectedRun s;
    for (int64_t tok = 0; tok < d.B * d.T; ++tok) {
      if (!rows[tok]) continue;
      for (int64_t i = 0; i < d.HQ; ++i) {
        s.lse.push_back(r.lse[tok * d.HQ + i]);
        s.ref_lse.push_back(r.ref_lse[tok * d.HQ + i]);
        for (int64_t x = 0; x < d.V; ++x) {
          s.o.push_back(r.o[(tok * d.HQ + i) * d.V + x]);
          s.ref_o.push_back(r.ref_o[(tok * d.HQ + i) * d.V + x]);
        }
      }
    }
    return s;
  }
  return r;
}

void expect_close(const SelectedRun& r, DType dtype) {
  ASSERT_FALSE(all_zero(r.ref_o)) << "vacuous case: the reference output is all zero";
  expect_attention_close(r.o, r.lse, r.ref_o, r.ref_lse, dtype);
}

int compute_capability_major() {
  int device = 0, major = 0;
  cuda_ok(cudaGetDevice(&device), "cudaGetDevice");
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  return major;
}
bool d64_128(int64_t x) { return x == 64 || x == 128; }

// The rule the streamed (TMA) kernel is documented to follow: sm_90 or newer, 16-bit elements, G in {4, 8} or
// a multiple of 16, BS a multiple of 64, K and V in {64, 128}.
bool streamed_kernel_applies(const SelectedCase& c) {
  const int64_t G = c.HQ / c.H;
  return compute_capability_major() >= 9 && c.dtype != DType::F32 && (G % 16 == 0 || G == 4 || G == 8) && c.BS % 64 == 0 &&
         d64_128(c.K) && d64_128(c.V);
}

// The rule the block-major path is documented to follow (sm_80 or newer, 16-bit elements, G in {1, 2, 4},
// K and V in {64, 128}, BS a multiple of 16 up to 128; the test shapes keep its scratch small). Auto takes it
// there.
bool blocks_path_applies(const SelectedCase& c) {
  const int64_t G = c.HQ / c.H;
  return compute_capability_major() >= 8 && c.dtype != DType::F32 && (G == 1 || G == 2 || G == 4) && d64_128(c.K) && d64_128(c.V) &&
         c.BS % 16 == 0 && c.BS <= 128;
}

// The rule the union / per-token tile kernel is documented to follow: rows of 16-byte multiples (K and V multiples
// of 8 in 16 bits, of 4 in fp32); fp32 runs it on tensor cores as three tf32 products.
bool tile_kernel_applies(const SelectedCase& c) {
  const int64_t vec = c.dtype == DType::F32 ? 4 : 8;
  return c.K % vec == 0 && c.V % vec == 0;
}

class SelectedAttentionCuda : public GpuParamTest<SelectedCase> {};

TEST_P(SelectedAttentionCuda, MatchesFloat64Reference) {
  const SelectedCase& c = GetParam();
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    expect_close(run_selected(c, seed), c.dtype);
  }
}

const DType bf16 = DType::BF16, f16 = DType::F16, f32 = DType::F32;

// The union / per-token tile kernel's launch on each GPU's shared memory (host arithmetic: no GPU needed): two K/V
// stages on an H100, one on an A100 where two would leave an SM one CTA (D = 128, either row tiling); none where
// the tokens' selection lists alone outgrow a CTA (the row kernel then takes the problem).
TEST(SelectedAttentionTile, StagesKeepTwoCtasAnSm) {
  const cuda::SmemBudget h100 = cuda::kSm90Smem, a100 = cuda::kSm80Smem;
  cuda::DeviceLayout L;
  L.dtype = cuda::ElemType::BF16;
  L.K = L.V = 128;
  L.HQ = 64;
  L.block_count = 16;
  for (int64_t H : {4, 64}) {  // G = 16 (two row tiles, 8 tokens a CTA), G = 1 (one, 64 tokens)
    SCOPED_TRACE("H " + std::to_string(H));
    L.H = H;
    const cuda::TileChoice on_h100 = cuda::selected_attention_tile(L, h100);
    const cuda::TileChoice on_a100 = cuda::selected_attention_tile(L, a100);
    EXPECT_EQ(on_h100.row_tiles, H == 4 ? 2 : 1);
    EXPECT_EQ(on_a100.row_tiles, on_h100.row_tiles);
    EXPECT_EQ(on_h100.stages, 2);
    EXPECT_EQ(on_a100.stages, 1);
    // One stage less is 2 x 64 keys x 136 elements of 2 bytes.
    EXPECT_EQ(on_h100.bytes - on_a100.bytes, 2 * 64 * 136 * 2);
    EXPECT_GE(h100.per_sm / (on_h100.bytes + cuda::kSmemReservedPerCta), 2);
    EXPECT_GE(a100.per_sm / (on_a100.bytes + cuda::kSmemReservedPerCta), 2);
  }
  // fp32: one 16-row tile a warp (64 rows: 4 tokens at G = 16), 32-key tiles of rows of K + 4 floats; two stages
  // on an H100, one on an A100, where two CTAs an SM then fit.
  L.dtype = cuda::ElemType::F32;
  L.H = 4;
  const cuda::TileChoice f32_h100 = cuda::selected_attention_tile(L, h100);
  const cuda::TileChoice f32_a100 = cuda::selected_attention_tile(L, a100);
  EXPECT_EQ(f32_h100.row_tiles, 1);
  EXPECT_EQ(f32_h100.stages, 2);
  EXPECT_EQ(f32_a100.stages, 1);
  EXPECT_EQ(f32_h100.bytes - f32_a100.bytes, 2 * 32 * 132 * 4);
  EXPECT_GE(h100.per_sm / (f32_h100.bytes + cuda::kSmemReservedPerCta), 2);
  EXPECT_GE(a100.per_sm / (f32_a100.bytes + cuda::kSmemReservedPerCta), 2);
  L.dtype = cuda::ElemType::BF16;
  L.H = 64;
  L.block_count = 1024;  // 64 tokens x 1024 entries, sorted and raw: 512 KB
  EXPECT_EQ(cuda::selected_attention_tile(L, h100).stages, 0);
  EXPECT_EQ(cuda::selected_attention_tile(L, a100).stages, 0);
  L.block_count = 16;
  L.H = 0;  // no kv head: no tile (and no division by zero)
  EXPECT_EQ(cuda::selected_attention_tile(L, h100).stages, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SelectedAttentionCuda,
    ::testing::Values(
        // name, dtype, B, T, HQ, H, K, V, BS, S, varlen lengths, block_counts
        SelectedCase{"bf16_G16_K128_BS64_S16", bf16, 2, 300, 32, 2, 128, 128, 64, 16, {}, false},
        SelectedCase{"bf16_G1_K64_V128_BS32_S16_counts", bf16, 1, 333, 2, 2, 64, 128, 32, 16, {}, true},
        SelectedCase{"bf16_G3_K16_BS16_S16", bf16, 2, 150, 6, 2, 16, 16, 16, 16, {}, false},
        SelectedCase{"bf16_G16_K256_BS128_S16", bf16, 1, 400, 16, 1, 256, 256, 128, 16, {}, true},
        SelectedCase{"bf16_G3_K32_V64_BS128_S1", bf16, 1, 260, 3, 1, 32, 64, 128, 1, {}, false},
        SelectedCase{"bf16_varlen_G16_BS64", bf16, 1, 0, 16, 1, 128, 128, 64, 16, {70, 0, 200, 13, 129}, true},
        SelectedCase{"bf16_varlen_G1_BS16", bf16, 1, 0, 1, 1, 64, 64, 16, 16, {0, 40, 7, 181}, false},
        SelectedCase{"bf16_varlen_G3_K256_BS32", bf16, 1, 0, 3, 1, 256, 256, 32, 16, {100, 0, 20}, true},
        SelectedCase{"bf16_G80_head_chunks", bf16, 1, 70, 80, 1, 64, 64, 32, 4, {}, false},
        // G >= 8 at D = 64 / 128 takes two 16-row tiles per warp: several blocks per key tile, several key
        // tiles per block, a group size that leaves padding rows, varlen.
        SelectedCase{"bf16_G8_K64_BS16_S16_two_row_tiles", bf16, 2, 200, 16, 2, 64, 64, 16, 16, {}, false},
        SelectedCase{"bf16_G12_K128_BS128_S4_two_row_tiles", bf16, 1, 260, 12, 1, 128, 128, 128, 4, {}, true},
        SelectedCase{"f16_varlen_G16_K64_V128_BS32_two_row_tiles", f16, 1, 0, 16, 1, 64, 128, 32, 16, {130, 0, 77}, true},
        SelectedCase{"bf16_K20_V12_row_kernel", bf16, 1, 100, 4, 2, 20, 12, 16, 8, {}, true},
        SelectedCase{"f16_G16_K128_BS64_S16", f16, 1, 300, 16, 1, 128, 128, 64, 16, {}, true},
        SelectedCase{"f16_G1_K64_V128_BS16_S16", f16, 1, 200, 3, 3, 64, 128, 16, 16, {}, false},
        SelectedCase{"f16_varlen_G3_K16_BS128", f16, 1, 0, 6, 2, 16, 16, 128, 16, {5, 0, 300}, true},
        SelectedCase{"f32_G16_K64_V128_BS64", f32, 1, 200, 16, 1, 64, 128, 64, 16, {}, true},
        SelectedCase{"f32_varlen_G3_K256_BS32_S1", f32, 1, 0, 3, 1, 256, 256, 32, 1, {90, 0, 20}, false},
        SelectedCase{"f32_G1_K16_BS16", f32, 2, 120, 2, 2, 16, 16, 16, 16, {}, true},
        SelectedCase{"f32_K18_V10_row_kernel", f32, 1, 100, 4, 2, 18, 10, 16, 8, {}, true},
        SelectedCase{"f32_varlen_G1_K128_V200_BS64_S121", f32, 1, 0, 1, 1, 128, 200, 64, 121, {700, 0, 300}, false}),
    [](const ::testing::TestParamInfo<SelectedCase>& info) { return info.param.name; });

// Both ways of walking a tile's blocks, forced and chosen per tile, on selections that differ from token to
// token (current block, earlier and later blocks, -1 entries, block_counts) and on independent ones.
class SelectedAttentionCudaPaths : public GpuParamTest<SelectedCase> {};

TEST_P(SelectedAttentionCudaPaths, EveryPathMatchesFloat64Reference) {
  const SelectedCase& c = GetParam();
  const bool streamed = streamed_kernel_applies(c), blocks = blocks_path_applies(c);
  for (cuda::SelectedPath path : {cuda::SelectedPath::Union, cuda::SelectedPath::PerToken, cuda::SelectedPath::Streamed,
                                  cuda::SelectedPath::Blocks, cuda::SelectedPath::Auto})
    for (Pattern pattern : {Pattern::Mixed, Pattern::Independent}) {
      SCOPED_TRACE("path " + std::to_string(int(path)) + ", pattern " + std::to_string(int(pattern)));
      std::vector<int32_t> ctas;
      expect_close(run_selected(c, 4, {}, path, pattern, &ctas), c.dtype);
      // Blocks (and Auto) takes the block-major path where it applies, which counts no CTA (Auto
      // leaves the runs that select alike to the union walk); where it does not, Blocks is Auto. Streamed takes the streamed kernel exactly where it applies, Auto there the
      // streamed kernel or, for runs of tokens that select alike (early tokens see few blocks), the union walk;
      // the others never do.
      const bool block_major =
          blocks && (path == cuda::SelectedPath::Blocks || path == cuda::SelectedPath::Auto);
      const cuda::SelectedPath taken = path == cuda::SelectedPath::Blocks ? cuda::SelectedPath::Auto : path;
      if (block_major && path == cuda::SelectedPath::Blocks) {
        EXPECT_EQ(ctas[0] + ctas[1] + ctas[2], 0);
      } else if (block_major) {
        EXPECT_EQ(ctas[1] + ctas[2], 0);
      } else if (streamed && taken == cuda::SelectedPath::Streamed) {
        EXPECT_GT(ctas[2], 0);
        EXPECT_EQ(ctas[0] + ctas[1], 0);
      } else if (streamed && taken == cuda::SelectedPath::Auto) {
        EXPECT_GT(ctas[0] + ctas[2], 0);
        EXPECT_EQ(ctas[1], 0);
      } else {
        EXPECT_EQ(ctas[2], 0);
        EXPECT_GT(ctas[0] + ctas[1], 0);
      }
    }
  // The union and per-token walks on the sm_80 kernel set, which reckons on an A100's shared memory: one K/V
  // stage where two would leave an SM one CTA (D = 128, D = 256).
  for (cuda::SelectedPath path : {cuda::SelectedPath::Union, cuda::SelectedPath::PerToken}) {
    SCOPED_TRACE("sm_80 kernel set, path " + std::to_string(int(path)));
    std::vector<int32_t> ctas;
    expect_close(run_selected(c, 5, {}, path, Pattern::Independent, &ctas, true), c.dtype);
    if (tile_kernel_applies(c)) EXPECT_GT(ctas[0] + ctas[1], 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SelectedAttentionCudaPaths,
    ::testing::Values(
        // name, dtype, B, T, HQ, H, K, V, BS, S, varlen lengths, block_counts
        SelectedCase{"bf16_G16_K128_BS64_S16", bf16, 1, 1100, 16, 1, 128, 128, 64, 16, {}, false},
        SelectedCase{"bf16_G16_K128_V64_BS32_S8_counts", bf16, 2, 333, 32, 2, 128, 64, 32, 8, {}, true},
        SelectedCase{"bf16_G4_K128_BS64_S16", bf16, 1, 900, 8, 2, 128, 128, 64, 16, {}, false},
        SelectedCase{"bf16_G3_K64_V32_BS16_S16_counts", bf16, 2, 250, 6, 2, 64, 32, 16, 16, {}, true},
        SelectedCase{"bf16_G1_K64_BS16_S8", bf16, 1, 300, 3, 3, 64, 64, 16, 8, {}, false},
        SelectedCase{"bf16_G1_K128_V64_BS128_S4_counts", bf16, 1, 700, 2, 2, 128, 64, 128, 4, {}, true},
        SelectedCase{"bf16_G24_K64_BS48_S6", bf16, 1, 260, 24, 1, 64, 64, 48, 6, {}, false},
        SelectedCase{"f16_varlen_G16_K64_V128_BS32", f16, 1, 0, 16, 1, 64, 128, 32, 16, {130, 0, 77, 301}, true},
        SelectedCase{"bf16_varlen_G1_BS16", bf16, 1, 0, 1, 1, 32, 32, 16, 16, {0, 40, 7, 181}, true},
        SelectedCase{"bf16_varlen_G3_K128_BS64", bf16, 1, 0, 3, 1, 128, 128, 64, 8, {100, 0, 20, 513}, false},
        // A partial 16-head chunk with two key tiles per block; K != V; more than 32 entries per token.
        SelectedCase{"bf16_G24_K64_BS128_S6_counts", bf16, 2, 333, 48, 2, 64, 64, 128, 6, {}, true},
        SelectedCase{"f16_varlen_G16_K64_V128_BS64", f16, 1, 0, 16, 1, 64, 128, 64, 16, {130, 0, 77, 301}, true},
        SelectedCase{"bf16_G32_K32_V48_BS64_S40", bf16, 1, 2500, 32, 1, 32, 48, 64, 40, {}, false},
        // Streamed kernel: two 16-head chunks with two 64-key tiles per block, K != V; short sequences
        // (CTAs of fewer tokens than their tile, empty sequences); K = V = 64 in fp16.
        SelectedCase{"bf16_G32_K128_V64_BS128_S8_counts", bf16, 2, 333, 64, 2, 128, 64, 128, 8, {}, true},
        SelectedCase{"bf16_varlen_G16_K64_BS64_short", bf16, 1, 0, 32, 2, 64, 64, 64, 16, {5, 0, 8, 9, 300}, false},
        SelectedCase{"f16_G16_K64_BS64_S16", f16, 2, 200, 16, 1, 64, 64, 64, 16, {}, false},
        // Streamed kernel at G = 8 and 4 (16-row tiles holding one group, runs of 16 and 32 tokens).
        SelectedCase{"bf16_varlen_G8_K64_V128_BS128_S6_counts", bf16, 1, 0, 16, 2, 64, 128, 128, 6, {100, 0, 37, 250}, true},
        SelectedCase{"f16_G4_K128_BS64_S16", f16, 1, 700, 16, 4, 128, 128, 64, 16, {}, false},
        // Block-major path: G = 2 varlen with block_counts and an empty sequence, K != V; G = 1 at B = 2.
        SelectedCase{"bf16_varlen_G2_K64_V128_BS32_counts", bf16, 1, 0, 4, 2, 64, 128, 32, 16, {300, 0, 9, 450}, true},
        SelectedCase{"f16_G1_K128_BS64_S16", f16, 2, 400, 2, 2, 128, 128, 64, 16, {}, false},
        // fp32: the union walk's 32-key tiles at K = 128 (two, four per block of 64, 128), 64-key tiles holding
        // four blocks at K = 32, BS = 16; the per-token walk's 16-key tiles (one stage a warp).
        SelectedCase{"f32_G16_K128_BS64_S16", f32, 1, 700, 16, 1, 128, 128, 64, 16, {}, false},
        SelectedCase{"f32_varlen_G3_K128_V64_BS128_S4_counts", f32, 1, 0, 6, 2, 128, 64, 128, 4, {300, 0, 9, 450}, true},
        SelectedCase{"f32_G1_K32_BS16_S16", f32, 2, 300, 2, 2, 32, 32, 16, 16, {}, false},
        SelectedCase{"f32_G16_K192_V128_BS64_S8_counts", f32, 1, 500, 16, 1, 192, 128, 64, 8, {}, true}),
    [](const ::testing::TestParamInfo<SelectedCase>& info) { return info.param.name; });

// Auto's CTA counts per path on `c` for selections shared by aligned runs of 64 tokens and for independent
// ones, each run checked against the reference on every `row_step`-th token.
struct AutoPaths {
  std::vector<int32_t> shared, independent;
};
AutoPaths auto_paths(const SelectedCase& c, uint64_t seed, int64_t row_step) {
  ref::RowMask rows(c.T, 0);
  for (int64_t t = 0; t < c.T; t += row_step) rows[t] = 1;
  AutoPaths a;
  expect_close(run_selected(c, seed, rows, cuda::SelectedPath::Auto, Pattern::SharedRuns, &a.shared), c.dtype);
  expect_close(run_selected(c, seed, rows, cuda::SelectedPath::Auto, Pattern::Independent, &a.independent), c.dtype);
  return a;
}

// Where the streamed kernel does not apply, Auto keeps the union per tile when neighbouring tokens select
// alike and walks each token's own blocks when they do not (K = V = 96 keeps G = 16 off the streamed kernel;
// fp32 takes neither the streamed kernel nor the block-major path).
TEST(SelectedAttentionCudaDecision, FollowsHowMuchNeighboursShare) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  for (DType dtype : {DType::BF16, DType::F32})
  for (int64_t G : {16, 4, 1}) {
    SCOPED_TRACE(std::string(dtype == DType::F32 ? "fp32" : "bf16") + ", G " + std::to_string(G));
    const SelectedCase c{"decision", dtype, 1, 8192, G, 1, 96, 96, 64, 16, {}, false};
    const auto [shared, independent] = auto_paths(c, 6, 97);
    EXPECT_GT(shared[0], 0);
    EXPECT_EQ(shared[1], 0) << "runs of 64 tokens share their blocks: every tile should walk the union";
    // At G = 16 a tile's 8 tokens choose S of few blocks early on, which overlap; past ~40 blocks they hardly
    // do. Smaller groups put more tokens in a tile, whose union covers most of an 8k history anyway.
    if (G == 16)
      EXPECT_GT(independent[1], 2 * independent[0]) << "union tiles " << independent[0] << ", per-token tiles "
                                                    << independent[1];
  }
}

// Where the streamed kernel applies, Auto gives it every run of tokens at G a multiple of 16 (it loads a tile
// that a unit's tokens share once); at G = 8 the union walk takes the runs that select alike, at G = 4 the
// union walk and the block-major path (which counts no CTA).
TEST(SelectedAttentionCudaDecision, AutoLeavesAlikeRunsToTheUnionBelowSixteenHeads) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  for (int64_t HQ : {32, 16, 8}) {  // G = 16 (runs of 8 tokens), G = 8 (runs of 16), G = 4 (runs of 32)
    SCOPED_TRACE("HQ " + std::to_string(HQ));
    const SelectedCase c{"split", DType::BF16, 1, 8192, HQ, 2, 128, 128, 64, 16, {}, false};
    if (!streamed_kernel_applies(c)) GTEST_SKIP() << "the streamed kernel needs sm_90";
    const auto [shared, independent] = auto_paths(c, 7, 89);
    EXPECT_EQ(shared[1] + independent[1], 0);
    if (HQ == 8) {
      EXPECT_GT(shared[0], 0);
      EXPECT_EQ(shared[2] + independent[2], 0) << "G = 4 takes the union or the block-major path";
    } else if (HQ == 32) {
      // Every unit of tokens and one kv head, once: 8192 / unit x 2.
      const int units = 8192 / cuda::selected_streamed_unit_tokens() * 2;
      EXPECT_EQ(shared[0] + independent[0], 0) << "the union walk ran at G = 16";
      EXPECT_EQ(shared[2], units);
      EXPECT_EQ(independent[2], units);
    } else {
      EXPECT_GT(shared[0], 0);
      EXPECT_EQ(shared[2], 0) << "runs of 64 tokens share their blocks: every run should take the union";
      // Independent selections: the union keeps the early runs that select alike, the streamed kernel the others.
      EXPECT_GT(independent[2], 0);
    }
  }
}

// Auto on a varlen batch, every row compared (the outputs start poisoned): at G = 4 and 1 the union kernel on
// its side stream and the block-major path must together write each token once, with the runs' marks indexed by sequence (early runs, with few blocks to choose from,
// select alike; later ones do not); at G = 16 the streamed kernel's units cross no sequence.
TEST(SelectedAttentionCudaDecision, SplitWritesEveryRowOnce) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  for (int64_t HQ : {32, 8, 2}) {  // G = 16 (runs of 8 tokens), G = 4 (runs of 32), G = 1 (runs of 128)
    SCOPED_TRACE("HQ " + std::to_string(HQ));
    const SelectedCase c{"split_varlen", DType::BF16, 1, 0, HQ, 2, 128, 64, 64, 16, {1500, 0, 9, 2100, 70}, true};
    if (HQ == 32 ? !streamed_kernel_applies(c) : !blocks_path_applies(c))
      GTEST_SKIP() << "the streamed kernel needs sm_90, the block-major path sm_80";
    std::vector<int32_t> ctas;
    expect_close(run_selected(c, 9, {}, cuda::SelectedPath::Auto, Pattern::Independent, &ctas), c.dtype);
    if (HQ == 32) EXPECT_EQ(ctas[0], 0) << "the union walk ran at G = 16";
    else EXPECT_GT(ctas[0], 0) << "no run took the union";
    if (HQ == 32) EXPECT_GT(ctas[2], 0) << "no run took the streamed kernel";
    else EXPECT_EQ(ctas[1] + ctas[2], 0) << "G = 4 and 1 take the union or the block-major path";
  }
}

// Many selections per token (S = 96): the unit plans no longer leave room for six ring stages, and the streamed
// kernel runs with five (a stage count that does not divide the fills evenly); every 11th token compared.
TEST(SelectedAttentionCudaStreamed, ManySelectionsLeaveFewerRingStages) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  const SelectedCase c{"many_selections", DType::BF16, 1, 6600, 16, 1, 128, 128, 64, 96, {}, false};
  if (!streamed_kernel_applies(c)) GTEST_SKIP() << "the streamed kernel needs sm_90";
  ref::RowMask rows(c.T, 0);
  for (int64_t t = 0; t < c.T; t += 11) rows[t] = 1;
  for (Pattern pattern : {Pattern::Mixed, Pattern::Independent}) {
    SCOPED_TRACE("pattern " + std::to_string(int(pattern)));
    std::vector<int32_t> ctas;
    expect_close(run_selected(c, 12, rows, cuda::SelectedPath::Streamed, pattern, &ctas), c.dtype);
    const int unit = cuda::selected_streamed_unit_tokens();
    EXPECT_EQ(ctas[2], (c.T + unit - 1) / unit) << "every unit of " << unit << " tokens, once";
  }
}

// At BS = 16 a tile's union of 70000-token selections spans more than one 4096-block bitmap window.
TEST(SelectedAttentionCudaLong, UnionSpanningSeveralBitmapWindows) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  const SelectedCase c{"long", DType::BF16, 1, 70000, 1, 1, 16, 16, 16, 16, {}, false};
  ref::RowMask rows(c.T, 0);
  std::mt19937_64 rng(5);
  for (int n = 0; n < 400; ++n) rows[rng() % c.T] = 1;
  expect_close(run_selected(c, 3, rows), c.dtype);
}

// A row whose entries are all -1, all after the token or cut to zero by block_counts sees no key.
TEST(SelectedAttentionCudaEmpty, RowsWithoutKeysGiveZero) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  for (DType dtype : {DType::BF16, DType::F32})
  for (int64_t BS : {32, 64})  // BS = 64 in bf16: the streamed kernel, where it applies
  for (int64_t HQ : {16, 1}) {  // G = 1 in bf16: the block-major path
    ProblemSpec spec;
    spec.T = 100, spec.HQ = HQ, spec.H = 1, spec.K = 64, spec.V = 64;
    spec.config.block_size = BS, spec.config.block_count = 4;
    Problem p = random_problem(spec);
    DeviceInputs in(p, dtype);
    std::vector<int32_t> idx(100 * 4, -1);
    for (int t = 0; t < 100; ++t) idx[t * 4 + 1] = int32_t(t / BS + 1);  // always a future block
    DeviceBytes d_idx(idx.size() * 4);
    d_idx.upload(idx.data());
    DeviceAttentionOutputs out(p.layout, dtype);
    cuda::selected_attention_forward(out.o.get(), static_cast<float*>(out.lse.get()), in.q(), in.k(), in.v(),
                                     static_cast<const int32_t*>(d_idx.get()), nullptr, in.layout(), nullptr);
    cuda_ok(cudaDeviceSynchronize(), "selected_attention_forward");
    const std::vector<double> o = out.o_host(), lse = out.lse_host();
    for (double x : o) ASSERT_EQ(x, 0.0);
    for (double x : lse) ASSERT_EQ(x, 0.0);
  }
}

// The block-major path through many windows of tokens (each window's partial results capped at 37 tokens'
// worth, so windows cut sequences and runs) writes the very bytes it writes in one window, and both match the
// float64 reference: varlen with an empty and a 9-token sequence, block_counts, G = 2, K != V.
TEST(SelectedAttentionCudaBlocks, TokenWindowsWriteTheSameBytes) {
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  const SelectedCase c{"windows", DType::BF16, 1, 0, 4, 2, 64, 128, 32, 8, {300, 0, 9, 451}, true};
  if (!blocks_path_applies(c)) GTEST_SKIP() << "the block-major path needs sm_80";
  ProblemSpec spec;
  spec.B = c.B, spec.T = c.T, spec.HQ = c.HQ, spec.H = c.H, spec.K = c.K, spec.V = c.V;
  spec.lengths = c.lengths;
  spec.config.block_size = c.BS, spec.config.block_count = c.S;
  spec.seed = 21;
  Problem p = random_problem(spec);
  DeviceInputs in(p, c.dtype);
  const Layout& L = p.layout;
  std::mt19937_64 rng(22);
  const std::vector<int32_t> idx = mixed_block_indices(L, rng), counts = random_block_counts(L, rng);
  DeviceBytes d_idx(idx.size() * 4), d_counts(counts.size() * 4);
  d_idx.upload(idx.data());
  d_counts.upload(counts.data());
  DeviceAttentionOutputs one(L, c.dtype), many(L, c.dtype);
  const size_t token_bytes = size_t(c.H * c.S * (c.HQ / c.H) * c.V * 2);
  for (auto [out, window_bytes] : {std::pair{&one, size_t(0)}, std::pair{&many, 37 * token_bytes}})
    cuda::selected_attention_blocks(out->o.get(), static_cast<float*>(out->lse.get()), in.q(), in.k(), in.v(),
                                    static_cast<const int32_t*>(d_idx.get()),
                                    static_cast<const int32_t*>(d_counts.get()), in.layout(), nullptr, nullptr,
                                    window_bytes);
  cuda_ok(cudaDeviceSynchronize(), "selected_attention_blocks");
  auto bytes = [](const DeviceBytes& d) {
    std::vector<uint8_t> b(d.bytes());
    d.download(b.data());
    return b;
  };
  EXPECT_EQ(bytes(many.o), bytes(one.o)) << "o differs between one window and many";
  EXPECT_EQ(bytes(many.lse), bytes(one.lse)) << "lse differs between one window and many";
  const Dims& d = L.dims;
  std::vector<double> ref_o(d.B * d.T * d.HQ * d.V), ref_lse(d.B * d.T * d.HQ);
  ref::selected_attention_forward(ref_o.data(), ref_lse.data(), p.q.data(), p.k.data(), p.v.data(), idx.data(),
                                  counts.data(), L);
  ASSERT_FALSE(all_zero(ref_o)) << "vacuous case";
  expect_attention_close(many.o_host(), many.lse_host(), ref_o, ref_lse, c.dtype);
}

}  // namespace
}  // namespace nsa::test
