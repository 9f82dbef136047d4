// The safetensors file format: an 8-byte little-endian header length, a UTF-8 JSON header, raw data.
// The reader is as strict as the format's reference implementation (see nsa-spec §6): every problem is an
// InputError naming the file, the tensor and what is wrong.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace nsa {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<std::pair<std::string, Tensor>> tensors;  // in data-offset order

  const Tensor* find(const std::string& name) const;
  Tensor* find(const std::string& name) { return const_cast<Tensor*>(std::as_const(*this).find(name)); }
  bool has(const std::string& name) const { return find(name) != nullptr; }
  void set(const std::string& name, Tensor t);  // replaces a tensor of the same name
};

constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// `origin` names the source in error messages (usually the path).
SafetensorsFile parse_safetensors(const uint8_t* data, std::size_t size, const std::string& origin);
SafetensorsFile read_safetensors(const std::string& path);
// A whole file's bytes; InputError naming the path when it is missing, a directory or unreadable.
std::vector<uint8_t> read_file_bytes(const std::string& path);

std::vector<uint8_t> serialize_safetensors(const SafetensorsFile& file);
// Atomic: writes a temporary file beside `path`, then renames it over `path`.
void write_safetensors(const std::string& path, const SafetensorsFile& file);
void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace nsa
