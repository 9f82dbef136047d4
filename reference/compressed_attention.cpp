// Compressed attention (nsa-spec §2.2) and its backward (§3): every query head attends to the pooled blocks
// its token has completed, NC(t) = floor((t + 1) / BS). Per (sequence, kv head, query tile) the scores of the
// G query heads of the group are one GEMM against the sequence's pooled keys, masked causally row by row.
//
// Backward runs in two passes so that every gradient element has one owner and a fixed summation order
// (bit-identical for any thread count): pass 1 owns dq by query tile; pass 2 owns dk_cmp/dv_cmp by tile of
// pooled blocks and walks the queries that see them in a fixed order.
#include <cmath>
#include <vector>

#include "reference/group_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

using detail::ConstMatrixMap;
using detail::ConstStridedMap;
using detail::GroupTile;
using detail::MatrixMap;
using detail::RowMatrix;

// Pooled blocks per tile of the dk_cmp/dv_cmp pass.
constexpr int64_t kBlockTile = 16;

int64_t visible_blocks(int64_t t, int64_t BS) { return (t + 1) / BS; }

// Turns scores z (row r = position index * G + head) over blocks [c0, c0 + cols) into probabilities
// p = exp(z - lse), zero where a block is not visible to the row's token.
void probabilities(MatrixMap& z, const std::vector<int64_t>& positions, int64_t G, int64_t c0, const double* lse,
                   int64_t BS) {
  detail::clear_upper_vector_state();
  for (int64_t r = 0; r < z.rows(); ++r) {
    const int64_t nc = visible_blocks(positions[r / G], BS);
    for (int64_t c = 0; c < z.cols(); ++c) z(r, c) = c0 + c < nc ? std::exp(z(r, c) - lse[r]) : 0.0;
  }
}

// Row-wise softmax of z over the visible blocks [0, NC(t)), in place; writes each row's log-sum-exp
// (0 for rows that see no block, whose probabilities are all zero).
void softmax_rows(MatrixMap& z, std::vector<double>& lse, const std::vector<int64_t>& positions, int64_t G, int64_t BS) {
  lse.assign(z.rows(), 0.0);
  detail::clear_upper_vector_state();
  for (int64_t r = 0; r < z.rows(); ++r) {
    const int64_t nc = visible_blocks(positions[r / G], BS);
    double* row = &z(r, 0);
    if (nc == 0) {
      std::fill(row, row + z.cols(), 0.0);
      continue;
    }
    const double m = *std::max_element(row, row + nc);
    double sum = 0;
    for (int64_t c = 0; c < nc; ++c) sum += (row[c] = std::exp(row[c] - m));
    const double inv = 1.0 / sum;
    for (int64_t c = 0; c < nc; ++c) row[c] *= inv;
    std::fill(row + nc, row + z.cols(), 0.0);
    lse[r] = m + std::log(sum);
  }
}

// delta_r = do_r . o_r for every row of a gathered tile.
void row_dots(std::vector<double>& delta, const std::vector<double>& d_o, const std::vector<double>& o, int64_t rows,
              int64_t V) {
  delta.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t e = 0; e < V; ++e) s += d_o[r * V + e] * o[r * V + e];
    delta[r] = s;
  }
}

// Per-thread scratch, grown as needed and reused across tiles.
struct Scratch {
  std::vector<int64_t> positions;
  std::vector<double> q, d_o, o, lse, delta, z, dp, out;
};

}  // namespace

void compressed_attention_forward(double* o_cmp, double* lse_cmp, const double* q, const double* k_cmp,
                                  const double* v_cmp, const Layout& L, const RowMask& rows, const RowSlots& o_slots,
                                  const RowSlots& q_slots) {
  const Dims& d = L.dims;
  const int64_t G = d.G(), BS = L.BS();
  detail::for_each_tile<Scratch>(L, rows, [&](Scratch& s, const GroupTile& tile, const Sequence& seq) {
    const int64_t n = int64_t(s.positions.size()) * G;
    const int64_t nc = visible_blocks(s.positions.back(), BS);
    detail::gather_group(s.q, q, L, seq, tile.h, d.K, s.positions, q_slots);
    s.z.resize(n * nc);
    s.out.resize(o_cmp ? n * d.V : 0);
    MatrixMap z(s.z.data(), n, nc);
    MatrixMap out(s.out.data(), o_cmp ? n : 0, d.V);
    const ConstMatrixMap qm(s.q.data(), n, d.K);
    const ConstStridedMap kc = detail::sequence_blocks(k_cmp, L, seq, tile.h, d.K, 0, nc);
    z.noalias() = L.scale() * (qm * kc.transpose());
    softmax_rows(z, s.lse, s.positions, G, BS);
    if (o_cmp) out.noalias() = z * detail::sequence_blocks(v_cmp, L, seq, tile.h, d.V, 0, nc);  // no block: o = 0
    for (int64_t r = 0; r < n; ++r) {
      const int64_t t = s.positions[r / G], i = r % G;
      if (!detail::row_selected(rows, L, seq, t)) continue;
      const int64_t o_row = output_row(o_slots, detail::flat_token(L, seq, t));
      if (o_cmp) std::copy(&out(r, 0), &out(r, 0) + d.V, o_cmp + (o_row * d.HQ + tile.h * G + i) * d.V);
      lse_cmp[detail::head_offset(L, seq, t, tile.h, i, 1)] = s.lse[r];
    }
  });
}

void compressed_attention_backward(double* dq, double* dk_cmp, double* dv_cmp, const double* do_cmp, const double* q,
                                   const double* k_cmp, const double* v_cmp, const double* o_cmp,
                                   const double* lse_cmp, const Layout& L) {
  const Dims& d = L.dims;
  const int64_t G = d.G(), BS = L.BS();
  const double scale = L.scale();

  // Gathers a tile's q, do, o, lse and delta; returns its row count.
  auto gather = [&](Scratch& s, const Sequence& seq, int64_t h) {
    detail::gather_group(s.q, q, L, seq, h, d.K, s.positions);
    detail::gather_group(s.d_o, do_cmp, L, seq, h, d.V, s.positions);
    detail::gather_group(s.o, o_cmp, L, seq, h, d.V, s.positions);
    detail::gather_group(s.lse, lse_cmp, L, seq, h, 1, s.positions);
    const int64_t n = int64_t(s.positions.size()) * G;
    row_dots(s.delta, s.d_o, s.o, n, d.V);
    return n;
  };
  // p and ds = p * (do . v - delta) of the gathered rows over blocks [c0, c0 + cols); z ends holding p, dp holds ds.
  auto probabilities_and_ds = [&](Scratch& s, const Sequence& seq, int64_t h, int64_t n, int64_t c0, int64_t cols) {
    s.z.resize(n * cols);
    s.dp.resize(n * cols);
    MatrixMap p(s.z.data(), n, cols), ds(s.dp.data(), n, cols);
    const ConstMatrixMap qm(s.q.data(), n, d.K), dom(s.d_o.data(), n, d.V);
    p.noalias() = scale * (qm * detail::sequence_blocks(k_cmp, L, seq, h, d.K, c0, cols).transpose());
    probabilities(p, s.positions, G, c0, s.lse.data(), BS);
    ds.noalias() = dom * detail::sequence_blocks(v_cmp, L, seq, h, d.V, c0, cols).transpose();
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < cols; ++c) ds(r, c) = p(r, c) * (ds(r, c) - s.delta[r]);
  };

  // Pass 1: dq, owned by query tile.
  detail::for_each_tile<Scratch>(L, {}, [&](Scratch& s, const GroupTile& tile, const Sequence& seq) {
    const int64_t nc = visible_blocks(s.positions.back(), BS);
    if (nc == 0) return;
    const int64_t n = gather(s, seq, tile.h);
    probabilities_and_ds(s, seq, tile.h, n, 0, nc);
    s.out.resize(n * d.K);
    MatrixMap dqm(s.out.data(), n, d.K);
    dqm.noalias() = scale * (ConstMatrixMap(s.dp.data(), n, nc) * detail::sequence_blocks(k_cmp, L, seq, tile.h, d.K, 0, nc));
    for (int64_t r = 0; r < n; ++r) {
      double* dst = dq + detail::head_offset(L, seq, s.positions[r / G], tile.h, r % G, d.K);
      for (int64_t e = 0; e < d.K; ++e) dst[e] += dqm(r, e);
    }
  });

  // Pass 2: dk_cmp / dv_cmp, owned by tile of pooled blocks; the queries that see a block are visited in
  // position order, in tiles of a fixed size.
  struct BlockTile {
    int64_t seq, h, c0, c1;
  };
  std::vector<BlockTile> block_tiles;
  for (int64_t sn = 0; sn < int64_t(L.sequences.size()); ++sn)
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t c0 = 0; c0 < L.sequences[sn].length / BS; c0 += kBlockTile)  // incomplete blocks get no gradient
        block_tiles.push_back({sn, h, c0, std::min(c0 + kBlockTile, L.sequences[sn].length / BS)});
  const int64_t step = detail::tile_tokens(L);
#pragma omp parallel
  {
    Scratch s;
    RowMatrix dk_acc, dv_acc;
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < int64_t(block_tiles.size()); ++w) {
      const BlockTile& bt = block_tiles[w];
      const Sequence& seq = L.sequences[bt.seq];
      const int64_t cols = bt.c1 - bt.c0;
      dk_acc.setZero(cols, d.K);
      dv_acc.setZero(cols, d.V);
      // The first query that sees block c0 is the last token of that block.
      for (int64_t t0 = (bt.c0 + 1) * BS - 1; t0 < seq.length; t0 += step) {
        s.positions.clear();
        for (int64_t t = t0; t < std::min(t0 + step, seq.length); ++t) s.positions.push_back(t);
        const int64_t n = gather(s, seq, bt.h);
        probabilities_and_ds(s, seq, bt.h, n, bt.c0, cols);
        const ConstMatrixMap p(s.z.data(), n, cols), ds(s.dp.data(), n, cols);
        dk_acc.noalias() += scale * (ds.transpose() * ConstMatrixMap(s.q.data(), n, d.K));
        dv_acc.noalias() += p.transpose() * ConstMatrixMap(s.d_o.data(), n, d.V);
      }
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t row = (seq.batch * L.chunks + seq.chunk_start + bt.c0 + c) * d.H + bt.h;
        for (int64_t e = 0; e < d.K; ++e) dk_cmp[row * d.K + e] += dk_acc(c, e);
        for (int64_t e = 0; e < d.V; ++e) dv_cmp[row * d.V + e] += dv_acc(c, e);
      }
    }
  }
}

}  // namespace nsa::ref
