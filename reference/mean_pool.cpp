// Mean pooling of keys and values into one row per block of BS tokens (nsa-spec §2.1) and its backward (§3).
// Every token belongs to exactly one block, so both directions parallelise over (sequence, block) with no
// shared writes.
#include <algorithm>
#include <vector>

#include "reference/reference.h"

namespace nsa::ref {
namespace {

struct BlockRef {
  const Sequence* seq;
  int64_t block;  // within the sequence
};

std::vector<BlockRef> all_blocks(const Layout& L) {
  std::vector<BlockRef> blocks;
  for (const Sequence& s : L.sequences)
    for (int64_t c = 0; c < ceil_div(s.length, L.BS()); ++c) blocks.push_back({&s, c});
  return blocks;
}

// First token (flat b * T + t) of a block, and its token count (the last block may be partial).
int64_t first_token(const Layout& L, const BlockRef& r) { return r.seq->batch * L.dims.T + r.seq->start + r.block * L.BS(); }
int64_t token_count(const Layout& L, const BlockRef& r) {
  return std::min(L.BS(), r.seq->length - r.block * L.BS());
}
int64_t chunk_row(const Layout& L, const BlockRef& r) { return r.seq->batch * L.chunks + r.seq->chunk_start + r.block; }

// x_cmp[c, h, :] = mean of x[tokens of c, h, :]; D is the trailing dim (K or V).
void pool(double* x_cmp, const double* x, const Layout& L, const BlockRef& r, int64_t D) {
  const int64_t H = L.dims.H, n = token_count(L, r), t0 = first_token(L, r);
  double* out = x_cmp + chunk_row(L, r) * H * D;
  std::fill(out, out + H * D, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const double* in = x + (t0 + j) * H * D;
    for (int64_t e = 0; e < H * D; ++e) out[e] += in[e];
  }
  const double inv = 1.0 / double(n);
  for (int64_t e = 0; e < H * D; ++e) out[e] *= inv;
}

// dx[tokens of c, h, :] += dx_cmp[c, h, :] / n_c.
void unpool(double* dx, const double* dx_cmp, const Layout& L, const BlockRef& r, int64_t D) {
  const int64_t H = L.dims.H, n = token_count(L, r), t0 = first_token(L, r);
  const double* in = dx_cmp + chunk_row(L, r) * H * D;
  const double inv = 1.0 / double(n);
  for (int64_t j = 0; j < n; ++j) {
    double* out = dx + (t0 + j) * H * D;
    for (int64_t e = 0; e < H * D; ++e) out[e] += in[e] * inv;
  }
}

}  // namespace

void mean_pool_forward(double* k_cmp, double* v_cmp, const double* k, const double* v, const Layout& L) {
  const std::vector<BlockRef> blocks = all_blocks(L);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < int64_t(blocks.size()); ++i) {
    pool(k_cmp, k, L, blocks[i], L.dims.K);
    pool(v_cmp, v, L, blocks[i], L.dims.V);
  }
}

void mean_pool_backward(double* dk, double* dv, const double* dk_cmp, const double* dv_cmp, const Layout& L) {
  const std::vector<BlockRef> blocks = all_blocks(L);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < int64_t(blocks.size()); ++i) {
    unpool(dk, dk_cmp, L, blocks[i], L.dims.K);
    unpool(dv, dv_cmp, L, blocks[i], L.dims.V);
  }
}

}  // namespace nsa::ref
