// The registry of backends the verifier can run: "cpu" (the float64 reference) and "cuda" when built.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace nsa {

std::vector<std::string> backend_names();
// Throws InputError naming the backend when it is unknown or not built in.
std::unique_ptr<Backend> make_backend(const std::string& name);

}  // namespace nsa
