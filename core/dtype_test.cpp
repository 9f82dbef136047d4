// Half and bfloat16 conversions against values worked out by hand (IEEE 754 binary16 / bfloat16, round to
// nearest, ties to even — what numpy's float16 cast and the hardware's cvt.rn do).
#include "core/dtype.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace nsa {
namespace {

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
const float kInf = std::numeric_limits<float>::infinity();

TEST(Half, DecodesHandPickedPatterns) {
  EXPECT_EQ(half_to_float(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(half_to_float(0x8000)));
  EXPECT_EQ(half_to_float(0x8000), 0.0f);
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0xC000), -2.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.25f + 0x155 / 4096.0f);  // 0.333251953125
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);                         // largest finite
  EXPECT_EQ(half_to_float(0x0400), std::ldexp(1.0f, -14));            // smallest normal
  EXPECT_EQ(half_to_float(0x03FF), std::ldexp(1023.0f, -24));         // largest subnormal
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));            // smallest subnormal
  EXPECT_EQ(half_to_float(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x7C00), kInf);
  EXPECT_EQ(half_to_float(0xFC00), -kInf);
  EXPECT_TRUE(std::isnan(half_to_float(0x7C01)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7E00)));
  EXPECT_TRUE(std::isnan(half_to_float(0xFE00)));
  EXPECT_TRUE(std::signbit(half_to_float(0xFE00)));
}

TEST(Half, EncodesExactValues) {
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);
  EXPECT_EQ(float_to_half(std::ldexp(1023.0f, -24)), 0x03FF);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(float_to_half(0.1f), 0x2E66);  // numpy: np.float16(0.1).view(np.uint16) == 0x2e66
}

TEST(Half, RoundsToNearestTiesToEven) {
  // Normal range: the ulp at 1 is 2^-10.
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3C00);                         // tie, 0x3C00 even
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);                     // tie, 0x3C02 even
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3C01);  // just above the tie
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) - std::ldexp(1.0f, -20)), 0x3C00);  // just below
  EXPECT_EQ(float_to_half(2049.0f), 0x6800);  // 2048 and 2050 are representable: tie -> 2048 (even)
  EXPECT_EQ(float_to_half(2051.0f), 0x6802);  // tie -> 2052 (even)
  EXPECT_EQ(float_to_half(-2051.0f), 0xE802);
  // Rounding up across a binade: the largest mantissa carries into the exponent.
  EXPECT_EQ(float_to_half(2.0f - std::ldexp(1.0f, -11)), 0x4000);  // halfway between 0x3BFF and 2: 2 is even
}

TEST(Half, RoundsSubnormalsTiesToEven) {
  const float tiny = std::ldexp(1.0f, -24);  // one subnormal step
  EXPECT_EQ(float_to_half(0.5f * tiny), 0x0000);            // tie between 0 and 1 -> 0
  EXPECT_EQ(float_to_half(-0.5f * tiny), 0x8000);
  EXPECT_EQ(float_to_half(0.5001f * tiny), 0x0001);
  EXPECT_EQ(float_to_half(1.5f * tiny), 0x0002);            // tie between 1 and 2 -> 2
  EXPECT_EQ(float_to_half(2.5f * tiny), 0x0002);            // tie between 2 and 3 -> 2
  EXPECT_EQ(float_to_half(1023.5f * tiny), 0x0400);         // tie between largest subnormal and smallest normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -30)), 0x0000);  // far below: flushes to zero by rounding
  EXPECT_EQ(float_to_half(from_bits(0x00000001)), 0x0000);  // float subnormal
}

TEST(Half, OverflowsToInfinityAtTheRoundingBoundary) {
  EXPECT_EQ(float_to_half(65519.0f), 0x7BFF);   // below the midpoint 65520
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);   // midpoint of 65504 and 65536 rounds to "even" = infinity
  EXPECT_EQ(float_to_half(-65520.0f), 0xFC00);
  EXPECT_EQ(float_to_half(1e10f), 0x7C00);
  EXPECT_EQ(float_to_half(kInf), 0x7C00);
  EXPECT_EQ(float_to_half(-kInf), 0xFC00);
}

TEST(Half, NanStaysNanAndQuiet) {
  const uint16_t pos = float_to_half(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(pos & 0x7C00, 0x7C00);
  EXPECT_NE(pos & 0x03FF, 0);
  EXPECT_NE(pos & 0x0200, 0);  // quiet bit
  const uint16_t neg = float_to_half(-std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(neg & 0x8000, 0x8000);
  EXPECT_NE(neg & 0x03FF, 0);
  // A signalling NaN whose payload lives only in the low float bits must not become infinity.
  const uint16_t snan = float_to_half(from_bits(0x7F800001));
  EXPECT_EQ(snan & 0x7C00, 0x7C00);
  EXPECT_NE(snan & 0x03FF, 0);
}

TEST(Half, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = half_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half(f), h) << "half 0x" << std::hex << h;
  }
}

// Nearest half by search over the sorted finite halves, ties to the even pattern: an implementation that
// shares nothing with float_to_half's exponent arithmetic.
uint16_t nearest_half_by_search(float x, const std::vector<std::pair<float, uint16_t>>& finite) {
  const float a = std::fabs(x);
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (a >= 65520.0f) return sign | 0x7C00;
  auto hi = std::lower_bound(finite.begin(), finite.end(), std::make_pair(a, uint16_t(0)));
  if (hi == finite.end()) return sign | 0x7BFF;  // between 65504 and the midpoint to infinity
  if (hi->first == a) return sign | hi->second;
  auto lo = hi - 1;
  const double dlo = double(a) - lo->first, dhi = double(hi->first) - a;
  if (dlo < dhi) return sign | lo->second;
  if (dhi < dlo) return sign | hi->second;
  return sign | ((lo->second & 1) ? hi->second : lo->second);
}

TEST(Half, RandomFloatsRoundToTheNearestHalf) {
  std::vector<std::pair<float, uint16_t>> finite;
  for (uint32_t h = 0; h < 0x7C00; ++h) finite.emplace_back(std::ldexp(float(h & 0x3FF) + ((h >> 10) ? 1024.0f : 0.0f),
                                                                       std::max(int(h >> 10), 1) - 25),
                                                             uint16_t(h));
  ASSERT_EQ(finite[0x3C00].first, 1.0f);
  ASSERT_EQ(finite[0x7BFF].first, 65504.0f);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-27.0f, 17.0f);
  std::uniform_real_distribution<float> sign(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = std::copysign(std::exp2(exponent(rng)), sign(rng));
    ASSERT_EQ(float_to_half(x), nearest_half_by_search(x, finite)) << "x = " << x;
  }
}

TEST(BFloat16, DecodesAndEncodesExactValues) {
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xC000), -2.0f);
  EXPECT_EQ(bf16_to_float(0x7F7F), from_bits(0x7F7F0000));  // largest finite, ~3.3895e38
  EXPECT_EQ(bf16_to_float(0x0001), from_bits(0x00010000));  // smallest subnormal
  EXPECT_EQ(bf16_to_float(0x7F80), kInf);
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FC0)));
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(kInf), 0x7F80);
  EXPECT_EQ(float_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(float_to_bf16(0.1f), 0x3DCD);  // 0.1f = 0x3DCCCCCD rounds up
}

TEST(BFloat16, RoundsToNearestTiesToEven) {
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);  // 1 + 2^-8: tie -> 0x3F80 (even)
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);  // tie -> 0x3F82 (even)
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);  // above the tie
  EXPECT_EQ(float_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // below the tie
  EXPECT_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);  // subnormal tie -> 0
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // subnormal tie -> 2
  EXPECT_EQ(float_to_bf16(from_bits(0x807FFFFF)), 0x8080);  // largest negative subnormal rounds to -2^-126
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F7FFF)), 0x7F7F);  // stays finite
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7F8000)), 0x7F80);  // tie at the top rounds to infinity (even)
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
}

TEST(BFloat16, NanStaysNanWhateverItsPayload) {
  for (uint32_t bits : {0x7FC00000u, 0x7F800001u, 0x7FFFFFFFu, 0xFF800001u, 0x7F80FFFFu}) {
    const uint16_t b = float_to_bf16(from_bits(bits));
    EXPECT_EQ(b & 0x7F80, 0x7F80) << std::hex << bits;
    EXPECT_NE(b & 0x007F, 0) << std::hex << bits;  // not infinity
    EXPECT_EQ(b & 0x8000, (bits >> 16) & 0x8000) << std::hex << bits;
  }
}

TEST(BFloat16, EveryBFloat16RoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), h) << "bf16 0x" << std::hex << h;
  }
}

TEST(RoundTo, RoundsToEachStorageType) {
  EXPECT_EQ(round_to(DType::F64, 0.1), 0.1);
  EXPECT_EQ(round_to(DType::F32, 0.1), double(0.1f));
  EXPECT_EQ(round_to(DType::F16, 0.1), 0.0999755859375);    // 0x2E66
  EXPECT_EQ(round_to(DType::BF16, 0.1), 0.10009765625);     // 0x3DCD
  EXPECT_EQ(round_to(DType::F16, 1e6), double(kInf));
  EXPECT_EQ(round_to(DType::I32, 2.5), 2.0);                // integers: ties to even too
  EXPECT_EQ(round_to(DType::I64, -3.5), -4.0);
}

// round_to(F16/BF16, x) rounds x to float32 first, then to 16 bits — the same path as the fixture generator
// and its Python twin (np.float32(x).astype(np.float16)). numpy's direct float64 -> float16 cast can differ
// when the float32 step lands exactly on a 16-bit halfway point; this pins the two-step behaviour.
TEST(RoundTo, GoesThroughFloat32) {
  const double x = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // just above the half tie at 1 + 2^-11
  EXPECT_EQ(double(float(x)), 1.0 + std::ldexp(1.0, -11));              // float32 drops the 2^-40
  EXPECT_EQ(round_to(DType::F16, x), 1.0);                              // then the tie goes to even
  const double y = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  EXPECT_EQ(round_to(DType::BF16, y), 1.0);
}

TEST(DTypeNames, AcceptOnlyTheSafetensorsSpelling) {
  EXPECT_EQ(dtype_from_name("BF16"), DType::BF16);
  EXPECT_EQ(dtype_from_name("I64"), DType::I64);
  EXPECT_THROW(dtype_from_name("bf16"), std::invalid_argument);
  EXPECT_THROW(dtype_from_name("F8_E4M3"), std::invalid_argument);
  EXPECT_THROW(dtype_from_name(""), std::invalid_argument);
  EXPECT_EQ(dtype_from_flag("f16"), DType::F16);
  EXPECT_THROW(dtype_from_flag("float"), std::invalid_argument);
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64}) {
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
    EXPECT_EQ(dtype_from_flag(dtype_flag(t)), t);
  }
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
}

}  // namespace
}  // namespace nsa
