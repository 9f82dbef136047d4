#include "verify/backends.h"

#include "core/errors.h"
#include "reference/reference.h"
#ifdef NSA_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace nsa {

std::vector<std::string> backend_names() {
#ifdef NSA_HAVE_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return std::make_unique<ref::ReferenceBackend>();
  if (name == "cuda") {
#ifdef NSA_HAVE_CUDA
    return make_cuda_backend();
#else
    throw InputError("backend 'cuda' is not available: this nsa-verify was built without a CUDA compiler");
#endif
  }
  throw InputError("unknown backend '" + name + "' (expected cpu or cuda)");
}

}  // namespace nsa
