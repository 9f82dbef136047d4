// The one interface through which the verifier runs an implementation. A new backend (another GPU, a user's
// kernel) implements it and registers itself in verify/backends.cpp; nothing else changes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/problem.h"

namespace nsa {

struct RunOptions {
  int threads = 0;                // CPU threads; 0 => OpenMP's default
  bool backward = true;           // compute gradients when the problem has `do`
  // Forward only on these flat query tokens (b * T + t); empty => all rows. A forward-only run returns its
  // [B, T, HQ, V] outputs compact (Outputs::rows).
  std::vector<int64_t> rows;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // The precision the backend computes in for inputs stored as `input`; the checker's tolerances follow it.
  virtual DType compute_dtype(DType input) const { return input; }
  // Whether a row-sampled run reads all of q as stored (Problem::q_stored: a backend that computes every row);
  // the caller may release q_stored before run() where it does not.
  virtual bool reads_stored_q() const { return true; }
  // Computes every stage of `p`: forward, and backward when p.has_backward() && opt.backward.
  // Throws InputError for problems the backend cannot take (e.g. K > 256 on CUDA).
  virtual Outputs run(const Problem& p, const RunOptions& opt) = 0;
};

}  // namespace nsa
