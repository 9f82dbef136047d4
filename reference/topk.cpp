// Importance scores and top-k block selection (nsa-spec §2.3). The scores of a token come from the
// compressed attention's probabilities p_{i,c} = exp(z_{i,c} - lse_cmp_i), summed over the G query heads of
// its kv head; group_scores() is the one place that turns a group's scaled scores into block scores, used by
// both topk_forward (a GEMM per query tile) and topk_scores (one token).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "reference/group_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

using detail::ConstMatrixMap;
using detail::GroupTile;
using detail::MatrixMap;

bool is_forced(int64_t c, int64_t cur, Policy policy) {
  if (c == cur) return true;
  return policy == Policy::Paper && (c == 0 || c == cur - 1);
}

// Scores of the candidate blocks [0, cur] of one token on the policy's selection scale: seed => sum over the
// group's heads (the current block forced to G), paper => mean over the heads (forced blocks set to 1).
// z [G, ldz] holds scale * q_i . k_cmp[c] for c < cur; lse [G] is the token's lse_cmp.
void group_scores(double* score, const double* z, int64_t ldz, const double* lse, int64_t G, int64_t cur, Policy policy) {
  detail::clear_upper_vector_state();
  for (int64_t c = 0; c < cur; ++c) {
    double sum = 0;
    for (int64_t i = 0; i < G; ++i) sum += std::exp(z[i * ldz + c] - lse[i]);
    score[c] = sum;
  }
  if (policy == Policy::Seed) {
    score[cur] = double(G);
    return;
  }
  for (int64_t c = 0; c <= cur; ++c) score[c] = is_forced(c, cur, policy) ? 1.0 : score[c] / double(G);
}

// The S best of the candidates [0, cur] (admitted by topk_admits_before, so a forced block wins an exact
// tie), then ordered by score descending with ties to the smaller block; -1 pads.
void select_top(int32_t* out, int64_t S, const double* score, int64_t cur, Policy policy, std::vector<int32_t>& order) {
  const int64_t n = cur + 1, k = std::min(S, n);
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return topk_admits_before(score[a], is_forced(a, cur, policy), a, score[b], is_forced(b, cur, policy), b);
  });
  std::sort(order.begin(), order.begin() + k, [score](int32_t a, int32_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a < b;
  });
  std::copy(order.begin(), order.begin() + k, out);
  std::fill(out + k, out + S, -1);
}

}  // namespace

void topk_forward(int32_t* block_indices, const double* q, const double* k_cmp, const double* lse_cmp, const Layout& L,
                  const RowMask& rows, const RowSlots& q_slots) {
  const Dims& d = L.dims;
  const int64_t G = d.G(), BS = L.BS(), S = L.S();
  struct Scratch {
    std::vector<int64_t> positions;
    std::vector<double> qs, lse, z, score;
    std::vector<int32_t> order;
  };
  detail::for_each_tile<Scratch>(L, rows, [&](Scratch& s, const GroupTile& tile, const Sequence& seq) {
    auto& [positions, qs, lse, z, score, order] = s;
    const int64_t n = int64_t(positions.size()) * G;
    const int64_t cols = positions.back() / BS;  // scores are needed for blocks before the current one only
    detail::gather_group(lse, lse_cmp, L, seq, tile.h, 1, positions);
    z.resize(n * cols);
    if (cols > 0) {
      detail::gather_group(qs, q, L, seq, tile.h, d.K, positions, q_slots);
      MatrixMap(z.data(), n, cols).noalias() =
          L.scale() * (ConstMatrixMap(qs.data(), n, d.K) * detail::sequence_blocks(k_cmp, L, seq, tile.h, d.K, 0, cols).transpose());
    }
    score.resize(cols + 1);
    for (std::size_t p = 0; p < positions.size(); ++p) {
      const int64_t t = positions[p], cur = t / BS;
      if (!detail::row_selected(rows, L, seq, t)) continue;
      group_scores(score.data(), z.data() + p * G * cols, cols, lse.data() + p * G, G, cur, L.config.policy);
      int32_t* out = block_indices + (detail::flat_token(L, seq, t) * d.H + tile.h) * S;
      select_top(out, S, score.data(), cur, L.config.policy, order);
    }
  });
}

void topk_scores(BlockScores& out, int64_t b, int64_t t, int64_t h, const double* q, const double* k_cmp,
                 const double* lse_cmp, const Layout& L, const RowSlots& q_slots) {
  const Dims& d = L.dims;
  if (b < 0 || b >= d.B || t < 0 || t >= d.T || h < 0 || h >= d.H)
    throw std::out_of_range("topk_scores: (b, t, h) = (" + std::to_string(b) + ", " + std::to_string(t) + ", " +
                            std::to_string(h) + ") is outside the problem");
  const Sequence* seq = nullptr;
  for (const Sequence& s : L.sequences)
    if (s.batch == b && t >= s.start && t < s.start + s.length) seq = &s;
  const int64_t G = d.G(), BS = L.BS();
  const int64_t pos = t - seq->start, cur = pos / BS, blocks = ceil_div(seq->length, BS);

  const std::vector<int64_t> positions{pos};
  std::vector<double> qs, lse, z(G * cur);
  detail::gather_group(lse, lse_cmp, L, *seq, h, 1, positions);
  if (cur > 0) {
    detail::gather_group(qs, q, L, *seq, h, d.K, positions, q_slots);
    MatrixMap(z.data(), G, cur).noalias() =
        L.scale() * (ConstMatrixMap(qs.data(), G, d.K) * detail::sequence_blocks(k_cmp, L, *seq, h, d.K, 0, cur).transpose());
  }
  out.score.assign(blocks, 0.0);
  out.candidate.assign(blocks, 0);
  out.forced.assign(blocks, 0);
  group_scores(out.score.data(), z.data(), cur, lse.data(), G, cur, L.config.policy);
  // The check compares on the per-head mean scale; the seed policy selects on the sum over the group.
  if (L.config.policy == Policy::Seed)
    for (int64_t c = 0; c <= cur; ++c) out.score[c] /= double(G);
  for (int64_t c = 0; c <= cur; ++c) {
    out.candidate[c] = 1;
    out.forced[c] = is_forced(c, cur, L.config.policy);
  }
}

}  // namespace nsa::ref
