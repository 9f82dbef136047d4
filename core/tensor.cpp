#include "core/tensor.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace nsa {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

namespace {
template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void store(uint8_t* p, T v) { std::memcpy(p, &v, sizeof(T)); }

double load_as_double(DType t, const uint8_t* p) {
  switch (t) {
    case DType::F64: return load<double>(p);
    case DType::F32: return load<float>(p);
    case DType::F16: return half_to_float(load<uint16_t>(p));
    case DType::BF16: return bf16_to_float(load<uint16_t>(p));
    case DType::I32: return load<int32_t>(p);
    case DType::I64: return double(load<int64_t>(p));
  }
  return 0;
}
}  // namespace

std::vector<double> Tensor::to_f64() const {
  const int64_t n = numel();
  const std::size_t es = dtype_size(dtype);
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = load_as_double(dtype, bytes.data() + i * es);
  return out;
}

double Tensor::at_f64(int64_t i) const { return load_as_double(dtype, bytes.data() + i * dtype_size(dtype)); }

std::vector<int64_t> Tensor::to_i64() const {
  const int64_t n = numel();
  std::vector<int64_t> out(n);
  if (dtype == DType::I64) {
    for (int64_t i = 0; i < n; ++i) out[i] = load<int64_t>(bytes.data() + 8 * i);
  } else if (dtype == DType::I32) {
    for (int64_t i = 0; i < n; ++i) out[i] = load<int32_t>(bytes.data() + 4 * i);
  } else {
    throw std::invalid_argument(std::string("expected an integer tensor, got ") + dtype_name(dtype));
  }
  return out;
}

Tensor Tensor::from_f64(const std::vector<double>& values, Shape shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  if (int64_t(values.size()) != t.numel()) throw std::logic_error("from_f64: size does not match shape");
  const std::size_t es = dtype_size(dtype);
  t.bytes.resize(values.size() * es);
  uint8_t* p = t.bytes.data();
  for (std::size_t i = 0; i < values.size(); ++i, p += es) {
    const double x = values[i];
    switch (dtype) {
      case DType::F64: store<double>(p, x); break;
      case DType::F32: store<float>(p, float(x)); break;
      case DType::F16: store<uint16_t>(p, float_to_half(float(x))); break;
      case DType::BF16: store<uint16_t>(p, float_to_bf16(float(x))); break;
      case DType::I32: store<int32_t>(p, int32_t(x)); break;
      case DType::I64: store<int64_t>(p, int64_t(x)); break;
    }
  }
  return t;
}

Tensor Tensor::from_i64(const std::vector<int64_t>& values, Shape shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  if (int64_t(values.size()) != t.numel()) throw std::logic_error("from_i64: size does not match shape");
  if (dtype != DType::I32 && dtype != DType::I64) throw std::logic_error("from_i64: integer dtype expected");
  const std::size_t es = dtype_size(dtype);
  t.bytes.resize(values.size() * es);
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::I32) store<int32_t>(t.bytes.data() + 4 * i, int32_t(values[i]));
    else store<int64_t>(t.bytes.data() + 8 * i, values[i]);
  }
  return t;
}

Tensor Tensor::from_i32(const std::vector<int32_t>& values, Shape shape) {
  return from_i64(std::vector<int64_t>(values.begin(), values.end()), std::move(shape), DType::I32);
}

}  // namespace nsa
