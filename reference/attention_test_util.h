// Test helpers for the attention stages: a naive one-row softmax attention written as plain loops (the
// independent yardstick for the Eigen tiles), random valid block selections, and central finite differences.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "core/problem.h"

namespace nsa::test {

// Softmax attention of query head i of token `token` (flat b * T + t) over the listed key tokens (flat),
// written to o_row [V] and *lse. No keys => zeros.
inline void naive_attention_row(double* o_row, double* lse, const std::vector<double>& q, const std::vector<double>& k,
                                const std::vector<double>& v, int64_t token, int64_t i,
                                const std::vector<int64_t>& key_tokens, const Layout& L) {
  const Dims& d = L.dims;
  const int64_t h = i / d.G();
  std::fill(o_row, o_row + d.V, 0.0);
  *lse = 0;
  if (key_tokens.empty()) return;
  std::vector<double> z;
  for (int64_t j : key_tokens) {
    double dot = 0;
    for (int64_t x = 0; x < d.K; ++x) dot += q[(token * d.HQ + i) * d.K + x] * k[(j * d.H + h) * d.K + x];
    z.push_back(L.scale() * dot);
  }
  const double max = *std::max_element(z.begin(), z.end());
  double sum = 0;
  for (double zj : z) sum += std::exp(zj - max);
  for (std::size_t n = 0; n < key_tokens.size(); ++n) {
    const double p = std::exp(z[n] - max) / sum;
    for (int64_t x = 0; x < d.V; ++x) o_row[x] += p * v[(key_tokens[n] * d.H + h) * d.V + x];
  }
  *lse = max + std::log(sum);
}

// A random valid selection [B, T, H, S] for every token: distinct blocks of the token's sequence (some of
// them future blocks, which the stage must skip), padded with -1 at random places.
inline std::vector<int32_t> random_block_indices(const Layout& L, std::mt19937_64& rng) {
  const Dims& d = L.dims;
  const int64_t S = L.S();
  std::vector<int32_t> idx(d.B * d.T * d.H * S, -1);
  for (const Sequence& s : L.sequences) {
    const int64_t NB = ceil_div(s.length, L.BS());
    std::vector<int32_t> blocks(NB);
    for (int64_t c = 0; c < NB; ++c) blocks[c] = int32_t(c);
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t h = 0; h < d.H; ++h) {
        std::shuffle(blocks.begin(), blocks.end(), rng);
        int32_t* row = &idx[(((s.batch * d.T) + s.start + t) * d.H + h) * S];
        int64_t used = 0;
        for (int64_t j = 0; j < S; ++j)
          row[j] = (rng() % 4 == 0 || used >= NB) ? -1 : blocks[used++];
      }
  }
  return idx;
}

// Central differences of `loss` with respect to every element of `x` (restored afterwards).
inline std::vector<double> finite_difference(std::vector<double>& x, const std::function<double()>& loss,
                                             double step = 1e-5) {
  std::vector<double> grad(x.size());
  for (std::size_t n = 0; n < x.size(); ++n) {
    const double saved = x[n];
    x[n] = saved + step;
    const double up = loss();
    x[n] = saved - step;
    const double down = loss();
    x[n] = saved;
    grad[n] = (up - down) / (2 * step);
  }
  return grad;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t n = 0; n < a.size(); ++n) s += a[n] * b[n];
  return s;
}

}  // namespace nsa::test
