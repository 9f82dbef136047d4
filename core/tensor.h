// A host tensor as stored in a fixture: element type, shape and raw little-endian bytes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace nsa {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 200, 16, 32]"
int64_t numel(const Shape& s);

struct Tensor {
  DType dtype = DType::F32;
  Shape shape;
  std::vector<uint8_t> bytes;  // numel(shape) * dtype_size(dtype)

  int64_t numel() const { return nsa::numel(shape); }
  int64_t dim(int i) const { return shape.at(i); }
  int rank() const { return int(shape.size()); }

  // Values widened to double / int64 (exact for every stored type); at_f64: the element at flat index i.
  std::vector<double> to_f64() const;
  double at_f64(int64_t i) const;
  std::vector<int64_t> to_i64() const;

  static Tensor from_f64(const std::vector<double>& values, Shape shape, DType dtype);
  static Tensor from_i64(const std::vector<int64_t>& values, Shape shape, DType dtype);
  static Tensor from_i32(const std::vector<int32_t>& values, Shape shape);
};

}  // namespace nsa
