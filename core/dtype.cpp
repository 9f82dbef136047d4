#include "core/dtype.h"

#include <cmath>
#include <stdexcept>

namespace nsa {

namespace {
struct DTypeInfo { DType type; const char* name; const char* flag; std::size_t size; };
constexpr DTypeInfo kInfo[] = {
    {DType::F64, "F64", "f64", 8}, {DType::F32, "F32", "f32", 4}, {DType::F16, "F16", "f16", 2},
    {DType::BF16, "BF16", "bf16", 2}, {DType::I32, "I32", "i32", 4}, {DType::I64, "I64", "i64", 8},
};
const DTypeInfo& info(DType t) {
  for (const auto& i : kInfo)
    if (i.type == t) return i;
  throw std::logic_error("unknown dtype");
}
}  // namespace

DType dtype_from_name(const std::string& name) {
  for (const auto& i : kInfo)
    if (name == i.name) return i.type;
  throw std::invalid_argument("unsupported dtype '" + name + "'");
}
DType dtype_from_flag(const std::string& flag) {
  for (const auto& i : kInfo)
    if (flag == i.flag || flag == i.name) return i.type;
  throw std::invalid_argument("unknown dtype '" + flag + "' (expected f64, f32, f16 or bf16)");
}
const char* dtype_name(DType t) { return info(t).name; }
const char* dtype_flag(DType t) { return info(t).flag; }
std::size_t dtype_size(DType t) { return info(t).size; }

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  float magnitude;
  if (exp == 0) magnitude = std::ldexp(float(mant), -24);               // zero and subnormals
  else if (exp == 31) magnitude = mant ? NAN : INFINITY;
  else magnitude = std::ldexp(float(mant | 0x400), exp - 25);
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;                               // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {                                       // subnormal: multiples of 2^-24
    const float q = std::nearbyint(a * 16777216.0f);                     // ties to even (default mode)
    return sign | uint16_t(q);
  }
  int e;
  const float m = std::frexp(a, &e);                                     // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(std::ldexp(m, 11));                           // 11 significant bits
  if (q == 2048.0f) { q = 1024.0f; ++e; }
  return sign | uint16_t(((e + 14) << 10) | (uint32_t(q) - 1024));
}

double round_to(DType t, double x) {
  switch (t) {
    case DType::F64: return x;
    case DType::F32: return double(float(x));
    case DType::F16: return double(half_to_float(float_to_half(float(x))));
    case DType::BF16: return double(bf16_to_float(float_to_bf16(float(x))));
    default: return std::nearbyint(x);
  }
}

}  // namespace nsa
