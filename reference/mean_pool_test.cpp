// Mean pooling (nsa-spec §2.1) and its backward (§3): partial last blocks, varlen chunk offsets, and the
// gradient spread over each block's tokens.
#include <gtest/gtest.h>

#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

Layout layout(int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, int64_t BS, const std::vector<int64_t>& cu = {}) {
  Config c;
  c.block_size = BS;
  return Layout::make(Dims{B, T, H, H, K, V}, c, cu, "test");
}

TEST(MeanPool, PartialLastBlockAveragesItsRealTokens) {
  // T = 5, BS = 2, H = 1, K = V = 1: blocks {0, 1}, {2, 3}, {4}.
  const Layout L = layout(1, 5, 1, 1, 1, 2);
  const std::vector<double> k{1, 2, 3, 4, 5}, v{10, 0, -4, 4, 7};
  std::vector<double> k_cmp(3), v_cmp(3);
  mean_pool_forward(k_cmp.data(), v_cmp.data(), k.data(), v.data(), L);
  EXPECT_EQ(k_cmp, (std::vector<double>{1.5, 3.5, 5}));
  EXPECT_EQ(v_cmp, (std::vector<double>{5, 0, 7}));
}

TEST(MeanPool, KeepsHeadsAndDimsApartAndHandlesUnevenKV) {
  // B = 2, T = 3, H = 2, K = 2, V = 1, BS = 2: k[b, t, h, x] = 100 b + 10 t + 2 h + x.
  const Layout L = layout(2, 3, 2, 2, 1, 2);
  std::vector<double> k(2 * 3 * 2 * 2), v(2 * 3 * 2);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 3; ++t)
      for (int h = 0; h < 2; ++h) {
        for (int x = 0; x < 2; ++x) k[((b * 3 + t) * 2 + h) * 2 + x] = 100 * b + 10 * t + 2 * h + x;
        v[(b * 3 + t) * 2 + h] = -(100 * b + 10 * t + h);
      }
  std::vector<double> k_cmp(2 * 2 * 2 * 2), v_cmp(2 * 2 * 2);
  mean_pool_forward(k_cmp.data(), v_cmp.data(), k.data(), v.data(), L);
  for (int b = 0; b < 2; ++b)
    for (int h = 0; h < 2; ++h) {
      for (int x = 0; x < 2; ++x) {
        EXPECT_EQ(k_cmp[((b * 2 + 0) * 2 + h) * 2 + x], 100 * b + 5 + 2 * h + x);   // tokens 0, 1
        EXPECT_EQ(k_cmp[((b * 2 + 1) * 2 + h) * 2 + x], 100 * b + 20 + 2 * h + x);  // token 2 alone
      }
      EXPECT_EQ(v_cmp[(b * 2 + 0) * 2 + h], -(100 * b + 5 + h));
      EXPECT_EQ(v_cmp[(b * 2 + 1) * 2 + h], -(100 * b + 20 + h));
    }
}

TEST(MeanPool, VarlenPoolsEachSequenceAtItsChunkOffset) {
  // Sequences of 3, 0 and 4 tokens, BS = 2: chunks [0, 2) for the first, [2, 4) for the third.
  const Layout L = layout(1, 7, 1, 1, 1, 2, {0, 3, 3, 7});
  ASSERT_EQ(L.chunks, 4);
  const std::vector<double> k{1, 3, 5, 2, 4, 6, 9};
  std::vector<double> k_cmp(4, -1), v_cmp(4, -1);
  mean_pool_forward(k_cmp.data(), v_cmp.data(), k.data(), k.data(), L);
  EXPECT_EQ(k_cmp, (std::vector<double>{2, 5, 3, 7.5}));
  EXPECT_EQ(v_cmp, k_cmp);
}

TEST(MeanPool, BackwardSpreadsEachBlockGradientOverItsTokens) {
  const Layout L = layout(1, 5, 1, 1, 1, 2);
  const std::vector<double> dk_cmp{2, -4, 3}, dv_cmp{1, 1, 1};
  std::vector<double> dk(5, 1.0), dv(5, 0.0);  // dk starts at 1: the backward accumulates
  mean_pool_backward(dk.data(), dv.data(), dk_cmp.data(), dv_cmp.data(), L);
  EXPECT_EQ(dk, (std::vector<double>{2, 2, -1, -1, 4}));
  EXPECT_EQ(dv, (std::vector<double>{0.5, 0.5, 0.5, 0.5, 1}));
}

TEST(MeanPool, BackwardPreservesTheSumOfGradients) {
  // Each block's tokens receive n_c * (dk_cmp[c] / n_c): summed over tokens they give back dk_cmp (varlen,
  // an empty sequence, partial blocks, K != V).
  const Layout L = layout(1, 29, 2, 3, 2, 4, {0, 10, 10, 13, 29});
  std::mt19937_64 rng(5);
  const std::vector<double> dk_cmp = test::random_normal(L.chunks * 2 * 3, rng);
  const std::vector<double> dv_cmp = test::random_normal(L.chunks * 2 * 2, rng);
  std::vector<double> dk(29 * 2 * 3, 0), dv(29 * 2 * 2, 0);
  mean_pool_backward(dk.data(), dv.data(), dk_cmp.data(), dv_cmp.data(), L);
  for (const Sequence& s : L.sequences)
    for (int64_t c = 0; c < ceil_div(s.length, 4); ++c)
      for (int64_t e = 0; e < 2 * 3; ++e) {
        double sum = 0;
        for (int64_t t = c * 4; t < std::min((c + 1) * 4, s.length); ++t) sum += dk[(s.start + t) * 6 + e];
        EXPECT_NEAR(sum, dk_cmp[(s.chunk_start + c) * 6 + e], 1e-14);
      }
  double total_dv = 0, total_dv_cmp = 0;
  for (double x : dv) total_dv += x;
  for (double x : dv_cmp) total_dv_cmp += x;
  EXPECT_NEAR(total_dv, total_dv_cmp, 1e-13);
  EXPECT_FALSE(test::all_zero(dk));
}

TEST(MeanPool, BackwardIsTheTransposeOfForward) {
  // <pool(k), w> == <k, unpool(w)> for any k and w: the backward is the adjoint of the (linear) forward.
  const Layout L = layout(2, 11, 1, 3, 3, 3);
  std::mt19937_64 rng(8);
  const std::vector<double> k = test::random_normal(2 * 11 * 3, rng), w = test::random_normal(2 * L.chunks * 3, rng);
  std::vector<double> k_cmp(w.size()), v_cmp(w.size()), dk(k.size(), 0), dv(k.size(), 0);
  mean_pool_forward(k_cmp.data(), v_cmp.data(), k.data(), k.data(), L);
  mean_pool_backward(dk.data(), dv.data(), w.data(), w.data(), L);
  double lhs = 0, rhs = 0;
  for (std::size_t n = 0; n < w.size(); ++n) lhs += k_cmp[n] * w[n];
  for (std::size_t n = 0; n < k.size(); ++n) rhs += k[n] * dk[n];
  EXPECT_NEAR(lhs, rhs, 1e-12);
}

}  // namespace
}  // namespace nsa::ref
