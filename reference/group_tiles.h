// Internal to reference/: how compressed attention and top-k cut their work into (sequence, kv head,
// query-tile) items and gather a tile's queries into one contiguous matrix, so that the scores of every query
// head of a group against the pooled keys are one Eigen GEMM.
// A tile's composition never depends on the thread count, which keeps every result bit-identical for any
// number of threads.
#pragma once
#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE  // parallelism is ours: OpenMP over tiles, Eigen single-threaded inside
#endif
#include <Eigen/Dense>

#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include "reference/reference.h"

namespace nsa::ref::detail {

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix>;
using ConstMatrixMap = Eigen::Map<const RowMatrix>;
using ConstStridedMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

// Call before a loop of libm calls (std::exp, std::log) that follows vectorised code: with the upper halves of
// the vector registers left dirty, every legacy-SSE instruction inside libm pays a transition penalty on Intel
// cores, which made the top-k scores over ten times slower at -O3.
inline void clear_upper_vector_state() {
#ifdef __AVX__
  _mm256_zeroupper();
#endif
}

// About this many query rows (tokens x G) per tile: large enough for an efficient GEMM, small enough for
// the per-thread scratch to stay in cache.
inline int64_t tile_tokens(const Layout& L) { return std::max<int64_t>(1, 256 / std::max<int64_t>(1, L.dims.G())); }

struct GroupTile {
  int64_t seq;     // index into L.sequences
  int64_t h;       // kv head
  int64_t t0, t1;  // tokens [t0, t1) within the sequence
};

inline std::vector<GroupTile> make_tiles(const Layout& L) {
  const int64_t step = tile_tokens(L);
  std::vector<GroupTile> tiles;
  for (int64_t n = 0; n < int64_t(L.sequences.size()); ++n)
    for (int64_t h = 0; h < L.dims.H; ++h)
      for (int64_t t0 = 0; t0 < L.sequences[n].length; t0 += step)
        tiles.push_back({n, h, t0, std::min(t0 + step, L.sequences[n].length)});
  return tiles;
}

// Runs body(scratch, tile, sequence) over the tiles of L in parallel (dynamic schedule) with one Scratch per
// thread; scratch.positions holds the tile's positions (tile_positions), and tiles `rows` leaves out are skipped.
template <typename Scratch, typename Body>
void for_each_tile(const Layout& L, const RowMask& rows, Body&& body);

// Flat query token (b * T + t) of position `t` of sequence `s`.
inline int64_t flat_token(const Layout& L, const Sequence& s, int64_t t) { return s.batch * L.dims.T + s.start + t; }

// Every position of the tile when `rows` selects any of them (or is empty), else none. A sampled row is
// computed inside its whole tile so that it goes through exactly the same GEMM as in a full run and comes out
// bit-identical; only the selected rows are written (see row_selected).
inline void tile_positions(std::vector<int64_t>& out, const Layout& L, const GroupTile& tile, const RowMask& rows) {
  out.clear();
  const Sequence& s = L.sequences[tile.seq];
  bool any = rows.empty();
  for (int64_t t = tile.t0; t < tile.t1 && !any; ++t) any = rows[flat_token(L, s, t)] != 0;
  if (!any) return;
  for (int64_t t = tile.t0; t < tile.t1; ++t) out.push_back(t);
}

inline bool row_selected(const RowMask& rows, const Layout& L, const Sequence& s, int64_t t) {
  return rows.empty() || rows[flat_token(L, s, t)] != 0;
}

// The pooled rows [count, D] of sequence `s`, kv head h, from x_cmp [B, C, H, D] (row stride H * D).
inline ConstStridedMap sequence_blocks(const double* x_cmp, const Layout& L, const Sequence& s, int64_t h, int64_t D,
                                       int64_t first, int64_t count) {
  const double* base = x_cmp + ((s.batch * L.chunks + s.chunk_start + first) * L.dims.H + h) * D;
  return ConstStridedMap(base, count, D, Eigen::OuterStride<>(L.dims.H * D));
}

// Offset of (position t, query head h * G + i) in a [B, T, HQ, D] tensor, D = 1 for [B, T, HQ].
inline int64_t head_offset(const Layout& L, const Sequence& s, int64_t t, int64_t h, int64_t i, int64_t D) {
  return (flat_token(L, s, t) * L.dims.HQ + h * L.dims.G() + i) * D;
}

// out [positions.size() * G, D]: row p * G + i is query head h * G + i at positions[p], from x [B, T, HQ, D] --
// or, with `slots`, from a compact x whose row slots[token] holds flat token `token` (q_slots in reference.h).
inline void gather_group(std::vector<double>& out, const double* x, const Layout& L, const Sequence& s, int64_t h,
                         int64_t D, const std::vector<int64_t>& positions, const RowSlots& slots = {}) {
  const int64_t G = L.dims.G(), width = G * D;
  out.resize(positions.size() * width);
  for (std::size_t p = 0; p < positions.size(); ++p) {
    const int64_t row = output_row(slots, flat_token(L, s, positions[p]));
    const double* src = x + (row * L.dims.HQ + h * G) * D;
    std::copy(src, src + width, out.data() + p * width);
  }
}

template <typename Scratch, typename Body>
void for_each_tile(const Layout& L, const RowMask& rows, Body&& body) {
  const std::vector<GroupTile> tiles = make_tiles(L);
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < int64_t(tiles.size()); ++w) {
      tile_positions(scratch.positions, L, tiles[w], rows);
      if (!scratch.positions.empty()) body(scratch, tiles[w], L.sequences[tiles[w].seq]);
    }
  }
}

}  // namespace nsa::ref::detail
