// Element types of fixture tensors and the conversions between them.
// Half and bfloat16 conversions round to nearest even, as the hardware does.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace nsa {

enum class DType { F64, F32, F16, BF16, I32, I64 };

// The safetensors spelling ("F64", "BF16", ...). Throws std::invalid_argument for unknown names.
DType dtype_from_name(const std::string& name);
const char* dtype_name(DType t);
// Short CLI spelling: f64 f32 f16 bf16 i32 i64.
DType dtype_from_flag(const std::string& flag);
const char* dtype_flag(DType t);
std::size_t dtype_size(DType t);
inline bool is_float(DType t) { return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16; }

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// Rounds a double to the nearest value representable in `t` (the identity for F64).
double round_to(DType t, double x);

}  // namespace nsa
