// Dense softmax-attention tiles shared by the selected-attention and sliding-window references.
// A tile is a row-major Eigen view with an explicit row stride, so a run of tokens of one kv head
// (stride H * K in a token-major tensor) is used in place, without a copy.
// These run inside OpenMP parallel regions: Eigen stays single-threaded there, and every call writes only
// the rows its caller owns, so results do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "core/problem.h"

namespace nsa::ref::tiles {

using Index = Eigen::Index;
using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Tile = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
using ConstTile = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;
using Scores = Eigen::Map<RowMatrix>;
// Scratch memory. Eigen's vectorised reductions peel elements until the data is aligned, so the summation
// order depends on the buffer's alignment: every scratch buffer is aligned alike, which keeps results
// bit-identical from run to run and thread to thread.
using Buffer = std::vector<double, Eigen::aligned_allocator<double>>;

inline Tile tile(double* data, Index rows, Index cols, Index row_stride) {
  return Tile(data, rows, cols, Eigen::OuterStride<>(row_stride));
}
inline ConstTile const_tile(const double* data, Index rows, Index cols, Index row_stride) {
  return ConstTile(data, rows, cols, Eigen::OuterStride<>(row_stride));
}

// Per-thread scratch that only grows, so steady-state work allocates nothing. Products are formed here and
// then copied or added to the caller's rows with plain loops: Eigen's small-product kernels order their sums
// by the destination's alignment, and this keeps results independent of where the caller's arrays sit.
struct Workspace {
  Buffer p, ds, out_a, out_b;
  static double* at_least(Buffer& b, Index n) {
    if (Index(b.size()) < n) b.resize(n);
    return b.data();
  }
};

inline void copy_rows(Tile dst, const Scores& src) {
  for (Index r = 0; r < src.rows(); ++r)
    for (Index c = 0; c < src.cols(); ++c) dst(r, c) = src(r, c);
}
inline void add_rows(Tile dst, const Scores& src) {
  for (Index r = 0; r < src.rows(); ++r)
    for (Index c = 0; c < src.cols(); ++c) dst(r, c) += src(r, c);
}

// o [G, V] = softmax(scale * q keys^T) values and lse [G] for G query rows q [G, K] over n keys [n, K].
// No keys => o = 0 and lse = 0.
inline void attend_forward(Tile o, double* lse, const ConstTile& q, const ConstTile& keys, const ConstTile& values,
                           double scale, Workspace& ws) {
  const Index G = q.rows(), n = keys.rows();
  if (n == 0) {
    o.setZero();
    std::fill(lse, lse + G, 0.0);
    return;
  }
  Scores p(Workspace::at_least(ws.p, G * n), G, n);
  p.noalias() = scale * (q * keys.transpose());
  for (Index g = 0; g < G; ++g) {
    auto row = p.row(g);
    const double max = row.maxCoeff();
    row = (row.array() - max).exp().matrix();
    const double sum = row.sum();
    row /= sum;
    lse[g] = max + std::log(sum);
  }
  Scores out(Workspace::at_least(ws.out_a, G * values.cols()), G, values.cols());
  out.noalias() = p * values;
  copy_rows(o, out);
}

// The query side of the backward for G query rows over n keys (all visible):
// p = exp(scale q keys^T - lse), ds = p * (do values^T - delta), dq [G, K] += scale * ds keys.
inline void attend_backward_queries(Tile dq, const ConstTile& q, const ConstTile& d_o, const double* lse,
                                    const double* delta, const ConstTile& keys, const ConstTile& values, double scale,
                                    Workspace& ws) {
  const Index G = q.rows(), n = keys.rows();
  if (n == 0) return;
  Scores p(Workspace::at_least(ws.p, G * n), G, n), ds(Workspace::at_least(ws.ds, G * n), G, n);
  p.noalias() = scale * (q * keys.transpose());
  p.array().colwise() -= Eigen::Map<const Eigen::ArrayXd>(lse, G);
  p = p.array().exp().matrix();
  ds.noalias() = d_o * values.transpose();
  ds.array().colwise() -= Eigen::Map<const Eigen::ArrayXd>(delta, G);
  ds.array() *= p.array();
  Scores dq_part(Workspace::at_least(ws.out_a, G * keys.cols()), G, keys.cols());
  dq_part.noalias() = scale * (ds * keys);
  add_rows(dq, dq_part);
}

// The key side of the backward for m query rows q [m, K] (with their do [m, V], lse, delta) against n keys,
// query row r seeing key columns [visible_begin[r], visible_end[r]):
// dk [n, K] += scale * ds^T q, dv [n, V] += p^T do.
inline void attend_backward_keys(Tile dk, Tile dv, const ConstTile& q, const ConstTile& d_o, const double* lse,
                                 const double* delta, const Index* visible_begin, const Index* visible_end,
                                 const ConstTile& keys, const ConstTile& values, double scale, Workspace& ws) {
  const Index m = q.rows(), n = keys.rows();
  if (m == 0 || n == 0) return;
  Scores p(Workspace::at_least(ws.p, m * n), m, n), ds(Workspace::at_least(ws.ds, m * n), m, n);
  p.noalias() = scale * (q * keys.transpose());
  for (Index r = 0; r < m; ++r) {
    const Index begin = std::clamp<Index>(visible_begin[r], 0, n);
    const Index end = std::clamp<Index>(visible_end[r], begin, n);
    auto row = p.row(r);
    row.head(begin).setZero();
    row.segment(begin, end - begin) = (row.segment(begin, end - begin).array() - lse[r]).exp().matrix();
    row.tail(n - end).setZero();
  }
  ds.noalias() = d_o * values.transpose();
  ds.array().colwise() -= Eigen::Map<const Eigen::ArrayXd>(delta, m);
  ds.array() *= p.array();
  Scores dk_part(Workspace::at_least(ws.out_a, n * q.cols()), n, q.cols());
  Scores dv_part(Workspace::at_least(ws.out_b, n * d_o.cols()), n, d_o.cols());
  dk_part.noalias() = scale * (ds.transpose() * q);
  dv_part.noalias() = p.transpose() * d_o;
  add_rows(dk, dk_part);
  add_rows(dv, dv_part);
}

// delta [rows, heads] = sum_v do * o: the softmax backward's correction term, one per query row and head.
inline std::vector<double> row_deltas(const double* d_o, const double* o, int64_t rows, int64_t V) {
  std::vector<double> delta(rows);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t x = 0; x < V; ++x) sum += d_o[r * V + x] * o[r * V + x];
    delta[r] = sum;
  }
  return delta;
}

// A unit of parallel work: tokens [t_begin, t_end) of one sequence and one kv head.
struct TokenTask {
  int64_t sequence, t_begin, t_end, kv_head;
};

// Every sequence cut into tiles of `tile_tokens` tokens, times every kv head.
inline std::vector<TokenTask> token_tasks(const Layout& L, int64_t tile_tokens) {
  std::vector<TokenTask> tasks;
  for (int64_t s = 0; s < int64_t(L.sequences.size()); ++s)
    for (int64_t t0 = 0; t0 < L.sequences[s].length; t0 += tile_tokens)
      for (int64_t h = 0; h < L.dims.H; ++h)
        tasks.push_back({s, t0, std::min(t0 + tile_tokens, L.sequences[s].length), h});
  return tasks;
}

inline int64_t longest_sequence(const Layout& L) {
  int64_t longest = 0;
  for (const Sequence& s : L.sequences) longest = std::max(longest, s.length);
  return longest;
}

// Runs visit(state, seq, t, h) for every token t of every sequence and every kv head h: the query side of
// the forward and of the backward. Tasks of `tile_tokens` tokens are spread over the threads (dynamic
// schedule); each thread makes its own scratch state with make_state().
template <typename MakeState, typename Visit>
void for_each_query_group(const Layout& L, int64_t tile_tokens, MakeState&& make_state, Visit&& visit) {
  const std::vector<TokenTask> tasks = token_tasks(L, tile_tokens);
#pragma omp parallel
  {
    auto state = make_state();
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(tasks.size()); ++i) {
      const TokenTask& task = tasks[i];
      const Sequence& seq = L.sequences[task.sequence];
      for (int64_t t = task.t_begin; t < task.t_end; ++t) visit(state, seq, t, task.kv_head);
    }
  }
}

// Query rows gathered per backward key tile: enough rows to keep the GEMMs efficient, bounded scratch.
inline int64_t query_tokens_per_chunk(int64_t G) { return std::max<int64_t>(1, 512 / G); }

// The key side of a backward: the query rows that read one key tile, gathered up to `chunk_tokens` tokens at a
// time. Per token, the G query heads of the tile's kv head with their q, do, lse and delta (all [B*T*HQ, ...]
// token-major), and the key columns of the tile each row sees.
class QueryChunk {
 public:
  QueryChunk(int64_t chunk_tokens, const Dims& d, const double* q, const double* d_o, const double* lse,
             const double* delta)
      : G_(d.G()), K_(d.K), V_(d.V), q_(q), do_(d_o), lse_(lse), delta_(delta), q_rows_(chunk_tokens * G_ * K_),
        do_rows_(chunk_tokens * G_ * V_), lse_rows_(chunk_tokens * G_), delta_rows_(chunk_tokens * G_),
        visible_begin_(chunk_tokens * G_), visible_end_(chunk_tokens * G_) {}

  // Token j of the chunk: the G query rows from head0 on, each seeing key columns [begin, end) of the tile
  // (clamped to the tile by attend_backward_keys).
  void set_token(int64_t j, int64_t head0, Index begin, Index end) {
    std::memcpy(&q_rows_[j * G_ * K_], q_ + head0 * K_, sizeof(double) * G_ * K_);
    std::memcpy(&do_rows_[j * G_ * V_], do_ + head0 * V_, sizeof(double) * G_ * V_);
    for (int64_t g = 0; g < G_; ++g) {
      lse_rows_[j * G_ + g] = lse_[head0 + g];
      delta_rows_[j * G_ + g] = delta_[head0 + g];
      visible_begin_[j * G_ + g] = begin;
      visible_end_[j * G_ + g] = end;
    }
  }

  // dk, dv [n, ...] of the key tile += the contribution of the chunk's first `tokens` tokens.
  void backward_keys(Tile dk, Tile dv, const ConstTile& keys, const ConstTile& values, int64_t tokens, double scale,
                     Workspace& ws) const {
    const Index m = tokens * G_;
    attend_backward_keys(dk, dv, const_tile(q_rows_.data(), m, K_, K_), const_tile(do_rows_.data(), m, V_, V_),
                         lse_rows_.data(), delta_rows_.data(), visible_begin_.data(), visible_end_.data(), keys, values,
                         scale, ws);
  }

 private:
  int64_t G_, K_, V_;
  const double *q_, *do_, *lse_, *delta_;
  Buffer q_rows_, do_rows_;
  std::vector<double> lse_rows_, delta_rows_;
  std::vector<Index> visible_begin_, visible_end_;
};

}  // namespace nsa::ref::tiles
