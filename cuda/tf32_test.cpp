// The tf32 split of the fp32 tile kernels (cuda/tf32.h), on the host: the bounds that make three tf32 products
// stand in for an fp32 product, against float64. No GPU needed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/tf32.h"

namespace nsa::test {
namespace {

using cuda::bits_float;
using cuda::tf32_split;

constexpr uint32_t kLowBits = 0x1fffu;  // the mantissa bits a tf32 operand drops

// Inputs of every sign and of magnitudes from 2^-max_exp to 2^max_exp, and values right at a tf32 rounding boundary.
// (Below ~2^-100 the remainder `small` would be subnormal and keep fewer bits: not an attention input's scale.)
std::vector<float> sample_floats(int n, uint64_t seed, double max_exp) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> mantissa(1.0, 2.0), exponent(-max_exp, max_exp);
  std::vector<float> xs;
  for (int i = 0; i < n; ++i) {
    const double x = mantissa(rng) * std::pow(2.0, std::floor(exponent(rng)));
    xs.push_back(float(rng() % 2 ? x : -x));
  }
  for (float base : {1.0f, 1.5f, -3.0f, 1e-20f})
    for (uint32_t low : {0x0fffu, 0x1000u, 0x1001u, 0x1fffu}) {
      const uint32_t b = (cuda::float_bits(base) & ~kLowBits) | low;
      xs.push_back(bits_float(b));
    }
  return xs;
}

// big and small are tf32 values; big is x to nearest (within half a tf32 ulp, 2^-11 relative); big + small is x to
// within 2^-22.
TEST(Tf32Split, BigAndSmallAreTf32AndSumToX) {
  for (float x : sample_floats(20000, 1, 100)) {
    uint32_t big, small;
    tf32_split(x, big, small);
    ASSERT_EQ(big & kLowBits, 0u) << x;
    ASSERT_EQ(small & kLowBits, 0u) << x;
    const double xd = x, bd = bits_float(big), sd = bits_float(small);
    ASSERT_LE(std::abs(xd - bd), std::ldexp(std::abs(xd), -11)) << x;
    ASSERT_LE(std::abs(xd - (bd + sd)), std::ldexp(std::abs(xd), -22)) << x;
  }
  uint32_t big, small;
  tf32_split(0.f, big, small);
  EXPECT_EQ(big, 0u);
  EXPECT_EQ(small, 0u);
}

// a b ~ a_big b_big + a_big b_small + a_small b_big (each tf32 product exact, as the tensor cores form it) to within
// 2^-20 |a b|, where the one product a_big b_big is off by more than 2^-13 on these inputs: the reason for three.
TEST(Tf32Split, ThreeProductsAreFp32Accurate) {
  const std::vector<float> as = sample_floats(5000, 2, 60), bs = sample_floats(5000, 3, 60);
  double worst_three = 0, worst_one = 0;
  for (size_t i = 0; i < as.size() && i < bs.size(); ++i) {
    const float a = as[i], b = bs[i];
    uint32_t ab, as_, bb, bs_;
    tf32_split(a, ab, as_);
    tf32_split(b, bb, bs_);
    const double a_big = bits_float(ab), a_small = bits_float(as_), b_big = bits_float(bb), b_small = bits_float(bs_);
    const double exact = double(a) * double(b);
    const double three = a_big * b_big + a_big * b_small + a_small * b_big;
    worst_three = std::max(worst_three, std::abs(three - exact) / std::abs(exact));
    worst_one = std::max(worst_one, std::abs(a_big * b_big - exact) / std::abs(exact));
  }
  EXPECT_LE(worst_three, std::ldexp(1.0, -20));
  EXPECT_GT(worst_one, std::ldexp(1.0, -13)) << "the sample never exercised tf32's rounding";
}

// A 256-long dot product of N(0, 1) values from three tf32 products a term stays within 1e-6 of the exact one
// (relative to the sum of |terms|), two orders of magnitude inside fp32's 1e-5 tolerance; one product a term
// does not.
TEST(Tf32Split, DotProductsStayWithinFp32Tolerance) {
  std::mt19937_64 rng(4);
  std::normal_distribution<float> normal(0.f, 1.f);
  double worst_three = 0, worst_one = 0;
  for (int trial = 0; trial < 200; ++trial) {
    double exact = 0, three = 0, one = 0, scale = 0;
    for (int d = 0; d < 256; ++d) {
      const float a = normal(rng), b = normal(rng);
      uint32_t ab, as_, bb, bs_;
      tf32_split(a, ab, as_);
      tf32_split(b, bb, bs_);
      const double a_big = bits_float(ab), a_small = bits_float(as_), b_big = bits_float(bb),
                   b_small = bits_float(bs_);
      exact += double(a) * double(b);
      scale += std::abs(double(a) * double(b));
      three += a_big * b_big + a_big * b_small + a_small * b_big;
      one += a_big * b_big;
    }
    worst_three = std::max(worst_three, std::abs(three - exact) / scale);
    worst_one = std::max(worst_one, std::abs(one - exact) / scale);
  }
  EXPECT_LE(worst_three, 1e-6);
  EXPECT_GT(worst_one, 1e-5);
}

}  // namespace
}  // namespace nsa::test
