// Per-tensor metrics of nsa-spec §5.1: max_abs, max_rel, rel-L2, the worst element and NaN/Inf detection.
#include <cmath>
#include <limits>
#include <omp.h>

#include "core/errors.h"
#include "verify/check.h"

namespace nsa {
namespace {

std::string where(const TensorGeometry& g, int64_t flat) {
  const int64_t D = g.D ? g.D : 1;
  const int64_t d = flat % D;
  const int64_t head = (flat / D) % g.heads;
  int64_t row = (flat / D / g.heads) % g.rows;
  int64_t b = flat / D / g.heads / g.rows;
  if (g.sample) {  // compact: report the query row's own place
    const int64_t token = (*g.sample)[flat / D / g.heads];
    b = token / g.T;
    row = token % g.T;
  }
  std::string s = "[" + std::to_string(b) + ", " + std::to_string(row) + ", " + std::to_string(head);
  if (g.D) s += ", " + std::to_string(d);
  return s + "]";
}

bool lse_empty_value(double x) { return x == 0 || x == -std::numeric_limits<double>::infinity(); }

// One thread's share of the first pass.
struct Partial {
  double sum_d2 = 0, sum_e2 = 0, max_abs = 0;
  int64_t n = 0, nonfinite = 0, bad_expected = 0;
  int64_t worst = -1, first_nonfinite = -1;
};

}  // namespace

TensorCheck compare_tensor(const std::string& name, const std::string& stage, const std::vector<double>& expected,
                           const std::vector<double>& actual, const TensorGeometry& g, const CompareRule& rule) {
  if (expected.size() != actual.size())
    fail_input("", name, "candidate has " + std::to_string(actual.size()) + " elements, the reference " +
                             std::to_string(expected.size()));
  const int64_t per_row = g.heads * (g.D ? g.D : 1);
  const bool masked = rule.rows && !rule.rows->empty();
  const bool has_empty = rule.empty_rows && !rule.empty_rows->empty();
  const int64_t size = int64_t(expected.size());
  auto selected = [&](int64_t i) { return !masked || (*rule.rows)[i / per_row]; };
  // An lse of a row without keys may be 0 or -inf on either side.
  auto exempt = [&](int64_t i) { return has_empty && (*rule.empty_rows)[i] && lse_empty_value(expected[i]) && lse_empty_value(actual[i]); };

  Partial total;
#pragma omp parallel
  {
    Partial mine;
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < size; ++i) {
      if (!selected(i)) continue;
      ++mine.n;
      if (exempt(i)) continue;
      const double e = expected[i], a = actual[i];
      if (!std::isfinite(e)) {
        // Only reachable with non-finite inputs: the candidate must reproduce the same value.
        const bool same = (std::isnan(e) && std::isnan(a)) || e == a;
        if (!same) {
          ++mine.bad_expected;
          if (mine.first_nonfinite < 0) mine.first_nonfinite = i;
        }
        continue;
      }
      if (!std::isfinite(a)) {
        ++mine.nonfinite;
        if (mine.first_nonfinite < 0) mine.first_nonfinite = i;
        continue;
      }
      const double d = std::fabs(a - e);
      mine.sum_d2 += d * d;
      mine.sum_e2 += e * e;
      if (d > mine.max_abs || mine.worst < 0) {
        mine.max_abs = d;
        mine.worst = i;
      }
    }
#pragma omp critical
    {
      total.sum_d2 += mine.sum_d2;
      total.sum_e2 += mine.sum_e2;
      total.n += mine.n;
      total.nonfinite += mine.nonfinite;
      total.bad_expected += mine.bad_expected;
      // Ties go to the smaller index so that the report does not depend on the thread count.
      if (mine.worst >= 0 && (total.worst < 0 || mine.max_abs > total.max_abs ||
                              (mine.max_abs == total.max_abs && mine.worst < total.worst))) {
        total.max_abs = mine.max_abs;
        total.worst = mine.worst;
      }
      if (mine.first_nonfinite >= 0 && (total.first_nonfinite < 0 || mine.first_nonfinite < total.first_nonfinite))
        total.first_nonfinite = mine.first_nonfinite;
    }
  }

  TensorCheck c;
  c.name = name;
  c.stage = stage;
  c.tol = rule.tol;
  c.compared = total.n;
  c.nonfinite = total.nonfinite;
  c.max_abs = total.max_abs;
  const int64_t finite_n = total.n - total.nonfinite - total.bad_expected;
  // An expected tensor that is zero up to float64 rounding (e.g. the gradients of rows with a single key,
  // whose softmax weight is 1) has no scale of its own: its error is then taken in absolute terms, per element.
  const bool zero_expected = total.sum_e2 <= kZeroRms * kZeroRms * double(std::max<int64_t>(finite_n, 1));
  c.rel_l2 = zero_expected ? std::sqrt(total.sum_d2 / double(std::max<int64_t>(finite_n, 1)))
                           : std::sqrt(total.sum_d2 / total.sum_e2);
  // Relative errors are taken against max(|e|, rms(e)) so that elements near zero do not dominate.
  const double rms = finite_n > 0 ? std::sqrt(total.sum_e2 / double(finite_n)) : 0;
  double max_rel = 0;
  int64_t over = total.nonfinite + total.bad_expected;
#pragma omp parallel for schedule(static) reduction(max : max_rel) reduction(+ : over)
  for (int64_t i = 0; i < size; ++i) {
    if (!selected(i) || exempt(i)) continue;
    const double e = expected[i], a = actual[i];
    if (!std::isfinite(e) || !std::isfinite(a)) continue;
    const double d = std::fabs(a - e);
    const double denom = std::max(std::fabs(e), rms);
    const double rel = denom > 0 ? d / denom : d;
    max_rel = std::max(max_rel, rel);
    if (rel > rule.tol) ++over;
  }
  c.max_rel = max_rel;
  c.count_over = over;
  const int64_t shown = total.first_nonfinite >= 0 ? total.first_nonfinite : total.worst;
  if (shown >= 0) {
    c.worst_where = where(g, shown);
    c.worst_expected = expected[shown];
    c.worst_actual = actual[shown];
  }
  c.pass = c.rel_l2 <= rule.tol && total.nonfinite == 0 && total.bad_expected == 0;
  return c;
}

}  // namespace nsa
