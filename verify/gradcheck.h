// Gradient check (nsa-spec §3, §5 `gradcheck`): a backend's analytic gradients against float64 central
// differences of the reference, for every differentiable input (q, k, v and the gates present).
//
// The loss is L = sum(do * o). Top-k is not differentiable, so the block selection is frozen first: the
// reference's block_indices (or the problem's given ones) become an input of every evaluation.
//
// Error measure, per input X with analytic gradient a = dL/dX:
// * directional (any shape): for a random unit direction u, n = (L(X + h u) - L(X - h u)) / 2h is compared
//   with a . u, err = |a . u - n| / max(|n|, |a . u|, rms(a)); rms(a) is the typical size of a . u for a
//   random unit u, so a derivative that happens to be near zero is judged on the gradient's scale.
// * elementwise (tiny shapes): n_j = (L(X + h e_j) - L(X - h e_j)) / 2h against a_j,
//   err = max_j |a_j - n_j| / max(|n_j|, |a_j|, rms(a)).
// An input passes when err <= bound. With the default step h = 1e-5 (inputs of unit scale, rounding error
// ~eps / h ~ 1e-11, truncation ~h^2 ~ 1e-10) the float64 reference scores about 1e-9 or better; the default
// bound 1e-7 leaves a margin of 100x while a wrong gradient term scores 1e-3 or worse.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/backend.h"
#include "core/problem.h"

namespace nsa {

struct GradcheckOptions {
  double step = 1e-5;        // h
  bool elementwise = false;  // every element (tiny shapes only) instead of random directions
  int directions = 3;        // random directions per input (directional mode)
  uint64_t seed = 0;         // directions' seed
  double bound = 1e-7;       // pass when the max relative error is at most this
};

// The default bound for a backend: 1e-7 for the float64 reference; float32 kernels need a looser one.
double default_gradcheck_bound(const std::string& backend_name);

struct GradcheckInput {
  std::string name;         // "q", "k", "v", "g_cmp", "g_slc", "g_swa"
  int64_t checks = 0;       // elements or directions compared
  double max_rel_error = 0;
  double bound = 0;
  bool pass = true;
  std::string worst_where;  // "element 17" or "direction 2"
  double worst_analytic = 0, worst_numeric = 0;
};

struct GradcheckReport {
  std::string case_name, backend;
  bool elementwise = false;
  double step = 0;
  std::vector<GradcheckInput> inputs;
  bool pass = true;
};

// Checks `backend`'s gradients of `p` (which must hold `do`) against central differences of the reference.
// Throws InputError when the problem has no `do` or the backend returns no gradients.
GradcheckReport gradcheck(const Problem& p, Backend& backend, const GradcheckOptions& opt);

// The problem with its block selection frozen: `block_indices` set from the reference when not given.
Problem freeze_block_indices(const Problem& p);

void print_gradcheck(std::ostream& os, const GradcheckReport& r);
nlohmann::json gradcheck_json(const std::vector<GradcheckReport>& reports);

}  // namespace nsa
