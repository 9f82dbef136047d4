// Errors in what a user gave us. The CLI prints what() as one line and exits with code 2.
#pragma once
#include <stdexcept>
#include <string>

namespace nsa {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "<file>: <tensor>: <problem>", leaving out the parts that are empty.
inline std::string input_message(const std::string& file, const std::string& tensor, const std::string& problem) {
  std::string m;
  if (!file.empty()) m += file + ": ";
  if (!tensor.empty()) m += "tensor '" + tensor + "': ";
  return m + problem;
}
[[noreturn]] inline void fail_input(const std::string& file, const std::string& tensor, const std::string& problem) {
  throw InputError(input_message(file, tensor, problem));
}

}  // namespace nsa
