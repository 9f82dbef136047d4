// libFuzzer target: the safetensors reader and the problem loader on arbitrary bytes. Rejecting input with
// InputError is the expected outcome; any other exception, a crash or a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>

#include "core/errors.h"
#include "core/problem.h"
#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  try {
    const nsa::SafetensorsFile file = nsa::parse_safetensors(data, size, "fuzz.safetensors");
    // Whatever parses must serialise to a file that parses again to the same tensors.
    const std::vector<uint8_t> again = nsa::serialize_safetensors(file);
    const nsa::SafetensorsFile reread = nsa::parse_safetensors(again.data(), again.size(), "reserialised");
    if (reread.tensors.size() != file.tensors.size() || reread.metadata != file.metadata) __builtin_trap();
    const nsa::Problem problem = nsa::load_problem(file, "fuzz.safetensors");
    // A loaded problem must write back out (in its own layout) and load again.
    const nsa::SafetensorsFile written = nsa::problem_to_file(problem);
    const std::vector<uint8_t> bytes = nsa::serialize_safetensors(written);
    nsa::load_problem(nsa::parse_safetensors(bytes.data(), bytes.size(), "rewritten"), "rewritten");
  } catch (const nsa::InputError&) {
  }
  return 0;
}
