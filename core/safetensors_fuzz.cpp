// libFuzzer target: the safetensors reader and the problem loader on arbitrary bytes. Rejecting input with
// InputError is the expected outcome; any other exception, a crash or a sanitizer report is a finding.
//
// Each input is tried twice: as a file exactly as given, and — when it starts with '{' — as "header JSON up to
// its last '}', then the data section" with the 8-byte length prefix computed here. The second reading lets
// mutations of the JSON reach the offset, shape and problem checks instead of dying on a stale length prefix.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/errors.h"
#include "core/problem.h"
#include "core/safetensors.h"

namespace {

void exercise(const uint8_t* data, std::size_t size) {
  try {
    const nsa::SafetensorsFile file = nsa::parse_safetensors(data, size, "fuzz.safetensors");
    // Whatever parses must serialise to a file that parses again to the same tensors.
    const std::vector<uint8_t> again = nsa::serialize_safetensors(file);
    const nsa::SafetensorsFile reread = nsa::parse_safetensors(again.data(), again.size(), "reserialised");
    if (reread.tensors.size() != file.tensors.size() || reread.metadata != file.metadata) __builtin_trap();
    for (std::size_t i = 0; i < file.tensors.size(); ++i) {
      const nsa::Tensor* t = reread.find(file.tensors[i].first);
      if (!t || t->bytes != file.tensors[i].second.bytes || t->shape != file.tensors[i].second.shape) __builtin_trap();
    }
    const nsa::Problem problem = nsa::load_problem(file, "fuzz.safetensors");
    // A loaded problem must write back out (in its own layout) and load again.
    const nsa::SafetensorsFile written = nsa::problem_to_file(problem);
    const std::vector<uint8_t> bytes = nsa::serialize_safetensors(written);
    nsa::load_problem(nsa::parse_safetensors(bytes.data(), bytes.size(), "rewritten"), "rewritten");
  } catch (const nsa::InputError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  exercise(data, size);
  if (size > 0 && data[0] == '{') {
    std::size_t header_len = size;
    while (header_len > 0 && data[header_len - 1] != '}') --header_len;
    std::vector<uint8_t> file(8 + size);
    for (int i = 0; i < 8; ++i) file[i] = uint8_t(uint64_t(header_len) >> (8 * i));
    std::memcpy(file.data() + 8, data, size);
    exercise(file.data(), file.size());
  }
  return 0;
}
