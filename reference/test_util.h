// Helpers shared by the reference tests: a seeded random Problem builder and error norms.
// Header-only so each test file can include it without touching the build.
#pragma once
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/problem.h"
#include "reference/reference.h"

namespace nsa::test {

// What a random problem looks like. `lengths` non-empty => varlen (B is then 1, T = sum of lengths).
struct ProblemSpec {
  int64_t B = 1, T = 16, HQ = 2, H = 1, K = 4, V = 4;
  std::vector<int64_t> lengths;  // varlen sequence lengths, zeros allowed
  Config config{};               // block_size, block_count, window, scale (0 => 1/sqrt(K)), policy
  bool gate_cmp = true, gate_slc = true, gate_swa = false;
  bool with_do = false;          // adds an upstream gradient `do`
  uint64_t seed = 1;
};

inline std::vector<double> random_normal(std::size_t n, std::mt19937_64& rng, double stddev = 1.0) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

inline std::vector<double> random_uniform(std::size_t n, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

// A float64 problem with normal q/k/v, gates in (0, 1) and, if asked, a normal `do`.
inline Problem random_problem(const ProblemSpec& s) {
  Problem p;
  Dims d{s.B, s.T, s.HQ, s.H, s.K, s.V};
  std::vector<int64_t> cu;
  if (!s.lengths.empty()) {
    d.B = 1;
    d.T = 0;
    cu.push_back(0);
    for (int64_t len : s.lengths) cu.push_back(d.T += len);
  }
  p.layout = Layout::make(d, s.config, cu, "test");
  p.cu_seqlens = cu;
  p.input_dtype = DType::F64;
  std::mt19937_64 rng(s.seed);
  const std::size_t tokens = std::size_t(d.B * d.T);
  p.q = random_normal(tokens * d.HQ * d.K, rng);
  p.k = random_normal(tokens * d.H * d.K, rng);
  p.v = random_normal(tokens * d.H * d.V, rng);
  if (s.gate_cmp) p.g_cmp = random_uniform(tokens * d.HQ, rng, 0.05, 0.95);
  if (s.gate_slc) p.g_slc = random_uniform(tokens * d.HQ, rng, 0.05, 0.95);
  if (s.gate_swa) p.g_swa = random_uniform(tokens * d.HQ, rng, 0.05, 0.95);
  if (s.with_do) p.d_o = random_normal(tokens * d.HQ * d.V, rng);
  return p;
}

// ||a - e||_2 / ||e||_2 (or ||a||_2 when e is all zero).
inline double rel_l2(const std::vector<double>& a, const std::vector<double>& e) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size() && i < e.size(); ++i) {
    num += (a[i] - e[i]) * (a[i] - e[i]);
    den += e[i] * e[i];
  }
  if (a.size() != e.size()) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& e) {
  if (a.size() != e.size()) return INFINITY;
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - e[i]));
  return m;
}

inline bool all_zero(const std::vector<double>& a) {
  for (double x : a)
    if (x != 0) return false;
  return true;
}

// Sets the OpenMP thread count for a scope and restores the previous one.
class ScopedThreads {
 public:
  explicit ScopedThreads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ScopedThreads() { omp_set_num_threads(saved_); }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int saved_;
};

// Mean pooling then compressed attention, as the pipeline runs them.
struct CompressedRun {
  std::vector<double> k_cmp, v_cmp, o_cmp, lse_cmp;
};
inline CompressedRun run_compressed(const Problem& p, const ref::RowMask& rows = {}) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  CompressedRun r;
  r.k_cmp.assign(d.B * L.chunks * d.H * d.K, 0);
  r.v_cmp.assign(d.B * L.chunks * d.H * d.V, 0);
  ref::mean_pool_forward(r.k_cmp.data(), r.v_cmp.data(), p.k.data(), p.v.data(), L);
  r.o_cmp.assign(d.B * d.T * d.HQ * d.V, 0);
  r.lse_cmp.assign(d.B * d.T * d.HQ, 0);
  ref::compressed_attention_forward(r.o_cmp.data(), r.lse_cmp.data(), p.q.data(), r.k_cmp.data(), r.v_cmp.data(), L,
                                    rows);
  return r;
}

}  // namespace nsa::test
