// The CUDA sliding-window forward against the float64 reference on the same rounded inputs.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda/attention_sm90.h"
#include "cuda/attention_test_util.h"
#include "cuda/kernels.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::test {
namespace {

struct WindowCase {
  std::string name;
  DType dtype;
  int64_t B, T, HQ, H, K, V, W;
  std::vector<int64_t> lengths;  // varlen when non-empty
  bool wgmma;                    // whether Auto takes the warpgroup kernel on sm_90
};

std::ostream& operator<<(std::ostream& os, const WindowCase& c) { return os << c.name; }

class SlidingWindowCuda : public GpuParamTest<WindowCase> {};

TEST_P(SlidingWindowCuda, MatchesFloat64Reference) {
  const WindowCase& c = GetParam();
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    ProblemSpec spec;
    spec.B = c.B, spec.T = c.T, spec.HQ = c.HQ, spec.H = c.H, spec.K = c.K, spec.V = c.V;
    spec.lengths = c.lengths;
    spec.config.window = c.W;
    spec.seed = seed;
    Problem p = random_problem(spec);
    DeviceInputs in(p, c.dtype);  // rounds p.q/k/v to the kernel's dtype
    const Layout& L = p.layout;
    const Dims& d = L.dims;
    std::vector<double> ref_o(d.B * d.T * d.HQ * d.V), ref_lse(d.B * d.T * d.HQ);
    ref::sliding_window_forward(ref_o.data(), ref_lse.data(), p.q.data(), p.k.data(), p.v.data(), L);
    ASSERT_FALSE(all_zero(ref_o)) << "vacuous case: the reference output is all zero";
    if (on_sm90())
      EXPECT_EQ(cuda::sliding_window_sm90_fits(in.layout(), in.q(), in.k(), in.v()), c.wgmma)
          << "which kernel Auto takes";

    // Auto, the tile kernel, and the tile kernel on the sm_80 kernel set (an A100's shared memory: one K/V stage
    // where two would leave an SM one CTA).
    for (int run = 0; run < 3; ++run) {
      SCOPED_TRACE(run == 0 ? "Auto" : run == 1 ? "Tile" : "Tile, sm_80 kernel set");
      cuda::DeviceLayout layout = in.layout();
      layout.sm90_kernels = run < 2;
      DeviceAttentionOutputs out(L, c.dtype);
      cuda::sliding_window_forward(out.o.get(), static_cast<float*>(out.lse.get()), in.q(), in.k(), in.v(), layout,
                                   nullptr, run == 0 ? cuda::KernelChoice::Auto : cuda::KernelChoice::Tile);
      cuda_ok(cudaDeviceSynchronize(), "sliding_window_forward");
      expect_attention_close(out.o_host(), out.lse_host(), ref_o, ref_lse, c.dtype);
    }
  }
}

const DType bf16 = DType::BF16, f16 = DType::F16, f32 = DType::F32;

// The tile kernel's launch on each GPU's shared memory (host arithmetic: no GPU needed). Its 4 warps' registers
// let an SM hold two CTAs; two K/V stages keep them on an H100 (228 KB an SM), one stage buys the second on an
// A100 (164 KB) at D >= 128. On a GPU of 100 KB an SM (99 KB a CTA) two stages of K = V = 128 with two row tiles
// (104 KB) would not fit a CTA at all.
TEST(SlidingWindowTile, StagesKeepTwoCtasAnSm) {
  const cuda::SmemBudget h100 = cuda::kSm90Smem, a100 = cuda::kSm80Smem, sm86{99 * 1024, 100 * 1024};
  cuda::DeviceLayout L;
  L.dtype = cuda::ElemType::BF16;
  L.K = L.V = 128;
  L.HQ = 64, L.H = 4;  // G = 16: two 16-row tiles a warp, 128 rows a CTA
  cuda::TileChoice t = cuda::sliding_window_tile(L, h100);
  EXPECT_EQ(t.row_tiles, 2);
  EXPECT_EQ(t.stages, 2);
  // Q: 128 rows of 136 elements; K and V: 2 stages of 64 keys; 6 x 64 ints of key positions and slots.
  EXPECT_EQ(t.bytes, 2 * (128 * 136 + 4 * 64 * 136) + 4 * 6 * 64);
  t = cuda::sliding_window_tile(L, a100);
  EXPECT_EQ(t.row_tiles, 2);
  EXPECT_EQ(t.stages, 1);
  EXPECT_EQ(t.bytes, 2 * (128 * 136 + 2 * 64 * 136) + 4 * 6 * 64);
  t = cuda::sliding_window_tile(L, sm86);
  EXPECT_EQ(t.row_tiles, 2);
  EXPECT_EQ(t.stages, 1);
  for (int64_t H : {4, 64})  // G = 16 and 1 (one row tile)
    for (int64_t D : {64, 128, 256})
      for (cuda::SmemBudget b : {h100, a100, sm86}) {
        SCOPED_TRACE("H " + std::to_string(H) + ", D " + std::to_string(D) + ", per SM " + std::to_string(b.per_sm));
        L.H = H, L.K = L.V = D;
        t = cuda::sliding_window_tile(L, b);
        EXPECT_EQ(t.row_tiles, H == 4 && D <= 128 ? 2 : 1);
        EXPECT_LE(t.bytes, b.per_cta);
        if (b.per_sm != sm86.per_sm) EXPECT_GE(b.per_sm / (t.bytes + cuda::kSmemReservedPerCta), 2);
        if (b.per_sm == h100.per_sm) EXPECT_EQ(t.stages, 2);
        if (b.per_sm == a100.per_sm) EXPECT_EQ(t.stages, D == 64 ? 2 : 1);
      }
  L.H = 0;  // no kv head: no tile (and no division by zero)
  EXPECT_EQ(cuda::sliding_window_tile(L, h100).stages, 0);
  // fp32 (three tf32 products a tile): one 16-row tile a warp, 32 keys a tile. Two stages on an H100; on an A100
  // one at D >= 128, where two would leave an SM one CTA; on a GPU of 99 KB a CTA one where two would leave it one
  // CTA (D = 64) or not fit (128), and no tile at 256 (Q and one stage take 130 KB): the row kernel.
  L.dtype = cuda::ElemType::F32;
  L.H = 4;
  const int64_t dims[3] = {64, 128, 256};
  const cuda::SmemBudget budgets[3] = {h100, a100, sm86};
  const int stages[3][3] = {{2, 2, 2}, {2, 1, 1}, {1, 1, 0}};  // [budget][D]
  for (int bi = 0; bi < 3; ++bi)
    for (int di = 0; di < 3; ++di) {
      const int64_t D = dims[di];
      SCOPED_TRACE("fp32, D " + std::to_string(D) + ", per SM " + std::to_string(budgets[bi].per_sm));
      L.K = L.V = D;
      t = cuda::sliding_window_tile(L, budgets[bi]);
      EXPECT_EQ(t.stages, stages[bi][di]);
      if (t.stages == 0) continue;
      EXPECT_EQ(t.row_tiles, 1);
      // Q: 64 rows; K and V: `keys` rows a stage; rows of D + 4 floats; 6 x `keys` ints of positions and slots.
      const int64_t keys = 32, stride = D + 4;
      EXPECT_EQ(t.bytes, 4 * (64 * stride + 2 * t.stages * keys * stride) + 4 * 6 * keys);
      EXPECT_LE(t.bytes, budgets[bi].per_cta);
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SlidingWindowCuda,
    ::testing::Values(
        // name, dtype, B, T, HQ, H, K, V, W, varlen lengths, warpgroup kernel on sm_90
        WindowCase{"bf16_G16_K128_W64", bf16, 2, 300, 32, 2, 128, 128, 64, {}, true},
        WindowCase{"bf16_G1_K64_V128_W100", bf16, 1, 333, 2, 2, 64, 128, 100, {}, true},
        // G >= 8 at D = 64 / 128: two 16-row tiles per warp in the tile kernel.
        WindowCase{"bf16_G8_K64_W200_two_row_tiles", bf16, 1, 300, 16, 2, 64, 64, 200, {}, true},
        WindowCase{"f16_varlen_G12_K128_W70_two_row_tiles", f16, 1, 0, 12, 1, 128, 128, 70, {90, 0, 41}, false},
        WindowCase{"bf16_G3_K16_W1", bf16, 1, 150, 6, 2, 16, 16, 1, {}, false},
        WindowCase{"bf16_G16_K256_W_longer_than_T", bf16, 1, 200, 16, 1, 256, 256, 1000, {}, false},
        WindowCase{"bf16_varlen_G3_W37", bf16, 1, 0, 3, 1, 32, 64, 37, {70, 0, 200, 13}, false},
        WindowCase{"bf16_K20_V12_row_kernel", bf16, 1, 100, 4, 2, 20, 12, 30, {}, false},
        WindowCase{"f16_G16_K128_W128", f16, 1, 300, 16, 1, 128, 128, 128, {}, true},
        WindowCase{"f16_varlen_G1_K16_W16", f16, 1, 0, 2, 2, 16, 16, 16, {5, 0, 150}, false},
        WindowCase{"f32_G3_K64_V128_W50", f32, 1, 120, 3, 1, 64, 128, 50, {}, false},
        WindowCase{"f32_varlen_G16_K256_W500", f32, 1, 0, 16, 1, 256, 256, 500, {90, 0, 20}, false},
        WindowCase{"f32_G16_K128_W200", f32, 1, 600, 32, 2, 128, 128, 200, {}, false},
        WindowCase{"f32_G1_K32_V16_W1", f32, 1, 150, 2, 2, 32, 16, 1, {}, false},
        WindowCase{"f32_varlen_G1_K128_V200_W229", f32, 1, 0, 1, 1, 128, 200, 229, {700, 0, 300}, false},
        WindowCase{"f32_G1_K256_W229", f32, 1, 500, 1, 1, 256, 256, 229, {}, false},
        WindowCase{"f32_G1_K128_V200_W229", f32, 1, 500, 1, 1, 128, 200, 229, {}, false},
        WindowCase{"f32_G16_K128_V200_W229", f32, 1, 200, 16, 1, 128, 200, 229, {}, false},
        WindowCase{"f32_K18_V10_row_kernel", f32, 1, 100, 4, 2, 18, 10, 30, {}, false},
        // The warpgroup kernel: windows of 1, of more than a tile, longer than the sequence; G = 4 / 64 / 128;
        // varlen with empty and short sequences; fp16.
        WindowCase{"bf16_G16_K128_W1", bf16, 1, 200, 16, 1, 128, 128, 1, {}, true},
        WindowCase{"bf16_G4_K128_V64_W512", bf16, 1, 1500, 8, 2, 128, 64, 512, {}, true},
        WindowCase{"f16_varlen_G16_K64_V128_W300", f16, 1, 0, 32, 2, 64, 128, 300, {700, 0, 9, 1100, 65}, true},
        WindowCase{"bf16_G64_K64_W97", bf16, 1, 400, 64, 1, 64, 64, 97, {}, true},
        WindowCase{"bf16_G128_K128_W5000", bf16, 1, 300, 128, 1, 128, 128, 5000, {}, true}),
    [](const ::testing::TestParamInfo<WindowCase>& info) { return info.param.name; });

}  // namespace
}  // namespace nsa::test
