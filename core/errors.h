// Errors in what a user gave us. The CLI prints what() as one line and exits with code 2.
#pragma once
#include <stdexcept>
#include <string>

namespace nsa {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "<file>: <tensor>: <problem>", leaving out the parts that are empty. Names come from untrusted files, so
// control characters are escaped (\xNN) to keep the message on one line.
inline std::string input_message(const std::string& file, const std::string& tensor, const std::string& problem) {
  std::string m;
  if (!file.empty()) m += file + ": ";
  if (!tensor.empty()) m += "tensor '" + tensor + "': ";
  m += problem;
  std::string out;
  for (const char c : m) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u != 0x7f) {
      out += c;
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += {'\\', 'x', kHex[u >> 4], kHex[u & 15]};
    }
  }
  return out;
}
[[noreturn]] inline void fail_input(const std::string& file, const std::string& tensor, const std::string& problem) {
  throw InputError(input_message(file, tensor, problem));
}

}  // namespace nsa
