// Compressed attention (nsa-spec §2.2, §3): hand-computed rows, a naive loop on random shapes, empty rows,
// varlen, causality, row sampling, finite differences and thread-count determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "reference/attention_test_util.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

using test::ProblemSpec;

using CmpResult = test::CompressedRun;
using test::run_compressed;

// The same outputs from a plain per-row loop over the visible pooled blocks.
CmpResult naive_compressed(const Problem& p, const CmpResult& pooled) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  CmpResult r = pooled;
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const int64_t token = s.batch * d.T + s.start + t;
      std::vector<int64_t> blocks;
      for (int64_t c = 0; (c + 1) * L.BS() <= t + 1; ++c) blocks.push_back(s.batch * L.chunks + s.chunk_start + c);
      for (int64_t i = 0; i < d.HQ; ++i)
        test::naive_attention_row(&r.o_cmp[(token * d.HQ + i) * d.V], &r.lse_cmp[token * d.HQ + i], p.q, pooled.k_cmp,
                                  pooled.v_cmp, token, i, blocks, L);
    }
  return r;
}

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t BS, uint64_t seed = 1) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = V, s.seed = seed;
  s.config.block_size = BS;
  return s;
}

TEST(CompressedAttention, HandComputedRows) {
  // T = 4, BS = 2, K = V = 1, scale 1: k = [1, 1, 2, 2] -> k_cmp = [1, 2]; v = [0, 2, 4, 4] -> v_cmp = [1, 4].
  ProblemSpec s = spec(4, 1, 1, 1, 1, 2);
  s.config.scale = 1.0;
  Problem p = test::random_problem(s);
  p.k = {1, 1, 2, 2};
  p.v = {0, 2, 4, 4};
  p.q = {0.7, 0.5, -0.25, std::log(3.0)};
  const CmpResult r = run_compressed(p);
  EXPECT_EQ(r.k_cmp, (std::vector<double>{1, 2}));
  EXPECT_EQ(r.v_cmp, (std::vector<double>{1, 4}));
  // t = 0 sees no complete block.
  EXPECT_EQ(r.o_cmp[0], 0.0);
  EXPECT_EQ(r.lse_cmp[0], 0.0);
  // t = 1, 2 see block 0 only: o = v_cmp[0], lse = q * k_cmp[0].
  EXPECT_DOUBLE_EQ(r.o_cmp[1], 1.0);
  EXPECT_DOUBLE_EQ(r.lse_cmp[1], 0.5);
  EXPECT_DOUBLE_EQ(r.o_cmp[2], 1.0);
  EXPECT_DOUBLE_EQ(r.lse_cmp[2], -0.25);
  // t = 3 sees both: z = [ln 3, 2 ln 3] -> p = [1/4, 3/4], o = 1/4 + 3, lse = ln 12.
  EXPECT_NEAR(r.o_cmp[3], 3.25, 1e-15);
  EXPECT_NEAR(r.lse_cmp[3], std::log(12.0), 1e-15);
}

TEST(CompressedAttention, BlockSizeOneAtTOneAttendsToItsOwnToken) {
  Problem p = test::random_problem(spec(1, 3, 1, 5, 2, 1));
  const CmpResult r = run_compressed(p);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t e = 0; e < 2; ++e) EXPECT_DOUBLE_EQ(r.o_cmp[i * 2 + e], p.v[e]);
}

TEST(CompressedAttention, MatchesNaiveLoopWithGroupsAndUnevenDims) {
  // G = 3, K != V, T not a multiple of BS, two batch rows.
  ProblemSpec s = spec(23, 6, 2, 5, 3, 4, 7);
  s.B = 2;
  const Problem p = test::random_problem(s);
  const CmpResult r = run_compressed(p);
  const CmpResult e = naive_compressed(p, r);
  EXPECT_FALSE(test::all_zero(r.o_cmp));
  EXPECT_LT(test::max_abs_diff(r.o_cmp, e.o_cmp), 1e-13);
  EXPECT_LT(test::max_abs_diff(r.lse_cmp, e.lse_cmp), 1e-13);
}

TEST(CompressedAttention, MatchesNaiveLoopOnLongSequencesWithManyTiles) {
  // G = 1 gives tiles of 256 tokens; 700 tokens span three tiles per sequence and kv head.
  const Problem p = test::random_problem(spec(700, 2, 2, 8, 8, 16, 3));
  const CmpResult r = run_compressed(p);
  const CmpResult e = naive_compressed(p, r);
  EXPECT_LT(test::max_abs_diff(r.o_cmp, e.o_cmp), 1e-13);
  EXPECT_LT(test::max_abs_diff(r.lse_cmp, e.lse_cmp), 1e-12);
}

TEST(CompressedAttention, SoftmaxWeightsSumToOne) {
  // With every value equal to 1 each pooled value is 1, so o = sum_c p_c for rows that see a block.
  Problem p = test::random_problem(spec(19, 3, 1, 4, 1, 3));
  std::fill(p.v.begin(), p.v.end(), 1.0);
  const CmpResult r = run_compressed(p);
  for (int64_t t = 0; t < 19; ++t)
    for (int64_t i = 0; i < 3; ++i) EXPECT_NEAR(r.o_cmp[t * 3 + i], (t + 1) / 3 > 0 ? 1.0 : 0.0, 1e-15) << "t=" << t;
}

TEST(CompressedAttention, RowsWithoutCompleteBlockGiveZero) {
  // T < BS: no row sees a complete block.
  const Problem p = test::random_problem(spec(5, 2, 1, 4, 4, 8));
  const CmpResult r = run_compressed(p);
  EXPECT_FALSE(test::all_zero(r.k_cmp));
  EXPECT_TRUE(test::all_zero(r.o_cmp));
  EXPECT_TRUE(test::all_zero(r.lse_cmp));
}

TEST(CompressedAttention, VarlenEqualsSeparateRuns) {
  ProblemSpec s = spec(0, 4, 2, 4, 3, 3, 11);
  s.lengths = {10, 0, 7, 1, 14};
  const Problem whole = test::random_problem(s);
  const CmpResult r = run_compressed(whole);
  const Dims& d = whole.layout.dims;
  int64_t start = 0;
  for (int64_t len : s.lengths) {
    Problem part = test::random_problem(spec(len, 4, 2, 4, 3, 3));
    part.q.assign(whole.q.begin() + start * d.HQ * d.K, whole.q.begin() + (start + len) * d.HQ * d.K);
    part.k.assign(whole.k.begin() + start * d.H * d.K, whole.k.begin() + (start + len) * d.H * d.K);
    part.v.assign(whole.v.begin() + start * d.H * d.V, whole.v.begin() + (start + len) * d.H * d.V);
    const CmpResult alone = run_compressed(part);
    const std::vector<double> o(r.o_cmp.begin() + start * d.HQ * d.V, r.o_cmp.begin() + (start + len) * d.HQ * d.V);
    const std::vector<double> lse(r.lse_cmp.begin() + start * d.HQ, r.lse_cmp.begin() + (start + len) * d.HQ);
    EXPECT_EQ(o, alone.o_cmp) << "sequence at " << start;
    EXPECT_EQ(lse, alone.lse_cmp) << "sequence at " << start;
    start += len;
  }
}

TEST(CompressedAttention, FutureTokensChangeNothing) {
  const int64_t T = 30, last = 16;  // rows <= 16 must not see tokens >= 17
  Problem p = test::random_problem(spec(T, 2, 1, 4, 4, 4, 5));
  const CmpResult before = run_compressed(p);
  for (std::size_t n = (last + 1) * 4; n < p.k.size(); ++n) p.k[n] += 3.0, p.v[n] -= 2.0;
  const CmpResult after = run_compressed(p);
  for (int64_t n = 0; n < (last + 1) * 2 * 4; ++n) ASSERT_EQ(before.o_cmp[n], after.o_cmp[n]) << n;
  EXPECT_NE(before.o_cmp.back(), after.o_cmp.back());
}

TEST(CompressedAttention, RowSampleWritesOnlyThoseRowsBitIdentically) {
  const Problem p = test::random_problem(spec(40, 4, 2, 4, 4, 4, 9));
  const CmpResult full = run_compressed(p);
  RowMask rows(40, 0);
  rows[3] = rows[17] = rows[39] = 1;
  const CmpResult some = run_compressed(p, rows);
  const Dims& d = p.layout.dims;
  for (int64_t t = 0; t < 40; ++t)
    for (int64_t i = 0; i < d.HQ; ++i) {
      const double lse = some.lse_cmp[t * d.HQ + i];
      // Sampled rows are bit-identical to the full run; the others stay untouched.
      EXPECT_EQ(lse, rows[t] ? full.lse_cmp[t * d.HQ + i] : 0.0) << "t=" << t;
      for (int64_t e = 0; e < d.V; ++e)
        EXPECT_EQ(some.o_cmp[(t * d.HQ + i) * d.V + e], rows[t] ? full.o_cmp[(t * d.HQ + i) * d.V + e] : 0.0) << "t=" << t;
    }
  EXPECT_NE(some.lse_cmp[39 * d.HQ], 0.0);
}

TEST(CompressedAttention, WithoutOutputItWritesTheSameLse) {
  ProblemSpec s = spec(0, 6, 2, 5, 3, 4, 21);  // G = 3, varlen with an empty sequence
  s.lengths = {23, 0, 9};
  const Problem p = test::random_problem(s);
  const CmpResult full = run_compressed(p);
  std::vector<double> lse(full.lse_cmp.size(), -7.0);
  compressed_attention_forward(nullptr, lse.data(), p.q.data(), full.k_cmp.data(), full.v_cmp.data(), p.layout);
  EXPECT_EQ(lse, full.lse_cmp);
}

// loss = sum(do * o_cmp) as a function of q, k_cmp, v_cmp.
double cmp_loss(const Problem& p, const std::vector<double>& k_cmp, const std::vector<double>& v_cmp,
                const std::vector<double>& d_o) {
  const Dims& d = p.layout.dims;
  std::vector<double> o(d.B * d.T * d.HQ * d.V), lse(d.B * d.T * d.HQ);
  compressed_attention_forward(o.data(), lse.data(), p.q.data(), k_cmp.data(), v_cmp.data(), p.layout);
  return test::dot(o, d_o);
}

TEST(CompressedAttention, BackwardMatchesFiniteDifferences) {
  ProblemSpec s = spec(0, 3, 1, 3, 2, 2, 13);  // G = 3, K != V, varlen with an empty sequence
  s.lengths = {7, 0, 5};
  s.with_do = true;
  Problem p = test::random_problem(s);
  CmpResult r = run_compressed(p);
  const Dims& d = p.layout.dims;
  const std::vector<double>& d_o = *p.d_o;
  std::vector<double> dq(p.q.size(), 0), dk_cmp(r.k_cmp.size(), 0), dv_cmp(r.v_cmp.size(), 0);
  compressed_attention_backward(dq.data(), dk_cmp.data(), dv_cmp.data(), d_o.data(), p.q.data(), r.k_cmp.data(),
                                r.v_cmp.data(), r.o_cmp.data(), r.lse_cmp.data(), p.layout);
  auto loss = [&] { return cmp_loss(p, r.k_cmp, r.v_cmp, d_o); };
  const std::vector<double> fq = test::finite_difference(p.q, loss);
  const std::vector<double> fk = test::finite_difference(r.k_cmp, loss);
  const std::vector<double> fv = test::finite_difference(r.v_cmp, loss);
  EXPECT_FALSE(test::all_zero(dq));
  EXPECT_FALSE(test::all_zero(dk_cmp));
  EXPECT_LT(test::max_abs_diff(dq, fq), 1e-8);
  EXPECT_LT(test::max_abs_diff(dk_cmp, fk), 1e-8);
  EXPECT_LT(test::max_abs_diff(dv_cmp, fv), 1e-8);
  // The partial last block of each sequence is never visible, so it gets no gradient.
  EXPECT_EQ(dk_cmp[3 * d.H * d.K], 0.0);
}

TEST(CompressedAttention, BackwardAccumulatesIntoItsOutputs) {
  ProblemSpec s = spec(9, 2, 1, 2, 2, 2, 4);
  s.with_do = true;
  const Problem p = test::random_problem(s);
  const CmpResult r = run_compressed(p);
  auto backward = [&](double start) {
    std::vector<double> dq(p.q.size(), start), dk(r.k_cmp.size(), start), dv(r.v_cmp.size(), start);
    compressed_attention_backward(dq.data(), dk.data(), dv.data(), p.d_o->data(), p.q.data(), r.k_cmp.data(),
                                  r.v_cmp.data(), r.o_cmp.data(), r.lse_cmp.data(), p.layout);
    dq.insert(dq.end(), dk.begin(), dk.end());
    dq.insert(dq.end(), dv.begin(), dv.end());
    return dq;
  };
  const std::vector<double> from_zero = backward(0.0), from_one = backward(1.0);
  for (std::size_t n = 0; n < from_zero.size(); ++n) EXPECT_NEAR(from_one[n], from_zero[n] + 1.0, 1e-14);
}

TEST(CompressedAttention, ForwardAndBackwardAreBitIdenticalForOneAndTwoThreads) {
  // Several query tiles and block tiles per (sequence, kv head), G = 5.
  ProblemSpec s = spec(0, 5, 1, 6, 4, 2, 21);
  s.lengths = {300, 0, 77};
  s.with_do = true;
  const Problem p = test::random_problem(s);
  auto run = [&](int threads) {
    test::ScopedThreads scoped(threads);
    CmpResult r = run_compressed(p);
    std::vector<double> dq(p.q.size(), 0), dk(r.k_cmp.size(), 0), dv(r.v_cmp.size(), 0);
    compressed_attention_backward(dq.data(), dk.data(), dv.data(), p.d_o->data(), p.q.data(), r.k_cmp.data(),
                                  r.v_cmp.data(), r.o_cmp.data(), r.lse_cmp.data(), p.layout);
    std::vector<double> all = r.o_cmp;
    for (const auto* part : {&r.lse_cmp, &dq, &dk, &dv}) all.insert(all.end(), part->begin(), part->end());
    return all;
  };
  const std::vector<double> one = run(1), two = run(2);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(std::memcmp(one.data(), two.data(), one.size() * sizeof(double)), 0);
}

}  // namespace
}  // namespace nsa::ref
