// The tie-aware top-k rule of nsa-spec §5.3: a candidate's selection may differ from the reference's only among
// blocks whose reference scores are within a relative tolerance of the S-th best.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <omp.h>

#include "core/errors.h"
#include "verify/check.h"

namespace nsa {

TopkRowVerdict judge_topk_row(const int32_t* chosen, int64_t S, const ref::BlockScores& scores, double rtol, double atol) {
  TopkRowVerdict v;
  const int64_t nb = int64_t(scores.score.size());
  auto is_candidate = [&](int64_t c) { return scores.candidate[c] || scores.forced[c]; };
  auto invalid = [&](std::string why) {
    v.valid = false;
    v.reason = std::move(why);
    return v;
  };

  // The reference's own choice, admitted in the reference's order.
  std::vector<int64_t> ranked;
  for (int64_t c = 0; c < nb; ++c)
    if (is_candidate(c)) ranked.push_back(c);
  std::sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t b) {
    return ref::topk_admits_before(scores.score[a], scores.forced[a], a, scores.score[b], scores.forced[b], b);
  });
  const int64_t n_candidates = int64_t(ranked.size());
  const int64_t expected_count = std::min(S, n_candidates);
  std::vector<uint8_t> in_reference(nb, 0), in_chosen(nb, 0);
  for (int64_t j = 0; j < expected_count; ++j) in_reference[ranked[j]] = 1;

  int64_t count = 0;
  bool padding = false;
  for (int64_t j = 0; j < S; ++j) {
    const int64_t c = chosen[j];
    if (c == -1) {
      padding = true;
      continue;
    }
    if (c < -1 || c >= nb)
      return invalid("block " + std::to_string(c) + " at slot " + std::to_string(j) + " is outside [-1, " + std::to_string(nb) + ")");
    if (padding) return invalid("block " + std::to_string(c) + " at slot " + std::to_string(j) + " follows -1 padding");
    if (in_chosen[c]) return invalid("block " + std::to_string(c) + " is chosen twice");
    if (!is_candidate(c)) return invalid("block " + std::to_string(c) + " is not a candidate (a future or incomplete block)");
    in_chosen[c] = 1;
    ++count;
  }
  if (count != expected_count)
    return invalid(std::to_string(count) + " blocks chosen, expected min(S, candidates) = " + std::to_string(expected_count));

  std::vector<int64_t> forced;
  for (int64_t c = 0; c < nb; ++c)
    if (scores.forced[c]) forced.push_back(c);
  if (int64_t(forced.size()) <= S) {
    for (int64_t c : forced)
      if (!in_chosen[c]) return invalid("forced block " + std::to_string(c) + " is missing");
  } else {
    for (int64_t c = 0; c < nb; ++c)
      if (in_chosen[c] && !scores.forced[c])
        return invalid("block " + std::to_string(c) + " chosen while forced blocks fill all " + std::to_string(S) + " slots");
  }

  // With at most S candidates every one is chosen (checked above); otherwise compare with the S-th best score.
  if (n_candidates > S) {
    const double s_S = scores.score[ranked[S - 1]];
    const double floor = s_S * (1 - rtol) - atol;
    for (int64_t c = 0; c < nb; ++c) {
      if (!in_chosen[c] || in_reference[c]) continue;
      const double s = scores.score[c];
      const double gap = s_S != 0 ? (s_S - s) / std::fabs(s_S) : s_S - s;
      v.max_rel_gap = std::max(v.max_rel_gap, gap);
      if (!(s >= floor)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "block %lld has score %.9g, below the S-th best %.9g (relative gap %.3g > rtol %.3g)",
                      (long long)c, s, s_S, gap, rtol);
        return invalid(buf);
      }
    }
  }
  v.exact = in_chosen == in_reference;
  return v;
}

TopkCheck check_topk(const std::vector<int32_t>& candidate, const Problem& p, const double* k_cmp, const double* lse_cmp,
                     double rtol, double atol, const ref::RowMask& rows) {
  const Layout& L = p.layout;
  const int64_t T = L.dims.T, H = L.dims.H, S = L.S();
  // The flat tokens (b * T + t) to judge; each is judged once per kv head.
  std::vector<int64_t> tokens;
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const int64_t flat = s.batch * T + s.start + t;
      if (rows.empty() || rows[flat]) tokens.push_back(flat);
    }
  const int64_t n_rows = int64_t(tokens.size()) * H;
  std::vector<TopkRowVerdict> verdicts(n_rows);
  // A compact q (Problem::q_rows) must hold every row judged.
  const ref::RowSlots q_slots = p.q_rows.empty() ? ref::RowSlots{} : sample_slots(p.q_rows, L.dims.B * T);
  for (int64_t flat : tokens)
    if (!q_slots.empty() && q_slots[flat] < 0)
      fail_input("", "q", "the problem holds q for " + std::to_string(p.q_rows.size()) + " rows, not row " +
                              std::to_string(flat) + " of the top-k check");
#pragma omp parallel
  {
    ref::BlockScores scores;
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t flat = tokens[r / H], h = r % H;
      ref::topk_scores(scores, flat / T, flat % T, h, p.q.data(), k_cmp, lse_cmp, L, q_slots);
      verdicts[r] = judge_topk_row(candidate.data() + (flat * H + h) * S, S, scores, rtol, atol);
    }
  }

  TopkCheck c;
  c.rows = n_rows;
  for (int64_t r = 0; r < n_rows; ++r) {
    const TopkRowVerdict& v = verdicts[r];
    c.max_rel_gap = std::max(c.max_rel_gap, v.max_rel_gap);
    if (!v.valid) {
      if (c.bad_rows++ == 0) {
        const int64_t flat = tokens[r / H];
        c.first_problem = "[" + std::to_string(flat / T) + ", " + std::to_string(flat % T) + ", " + std::to_string(r % H) +
                          "]: " + v.reason;
      }
    } else if (v.exact) {
      ++c.exact_rows;
    } else {
      ++c.tie_rows;
    }
  }
  c.pass = c.bad_rows == 0;
  return c;
}

}  // namespace nsa
