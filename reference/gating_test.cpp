#include <gtest/gtest.h>

#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

// B = 1, T = 2, HQ = 1, V = 2 with small integers, so every expected value is exact.
Layout tiny_layout() { return Layout::make(Dims{1, 2, 1, 1, 2, 2}, Config{}, {}); }

const std::vector<double> o_cmp = {1, 2, 3, 4}, o_slc = {10, 20, 30, 40}, o_swa = {100, 200, 300, 400};
const std::vector<double> g_cmp = {0.5, 2}, g_slc = {1, 0.25}, g_swa = {3, -1};

TEST(Gating, SumsTheGatedBranches) {
  const Layout L = tiny_layout();
  std::vector<double> o(4, -1);
  gate_forward(o.data(), o_cmp.data(), o_slc.data(), o_swa.data(), g_cmp.data(), g_slc.data(), g_swa.data(), L);
  // token 0: 1*10 + 0.5*1 + 3*100 ; token 1: 0.25*30 + 2*3 - 300
  EXPECT_EQ(o, (std::vector<double>{310.5, 621, -286.5, -382}));
}

TEST(Gating, MissingGateDropsItsBranch) {
  const Layout L = tiny_layout();
  std::vector<double> o(4, -1);
  gate_forward(o.data(), o_cmp.data(), o_slc.data(), o_swa.data(), nullptr, g_slc.data(), nullptr, L);
  EXPECT_EQ(o, (std::vector<double>{10, 20, 7.5, 10}));
  gate_forward(o.data(), o_cmp.data(), o_slc.data(), o_swa.data(), nullptr, nullptr, nullptr, L);
  EXPECT_EQ(o, (std::vector<double>{0, 0, 0, 0}));
}

TEST(Gating, MissingBranchIsDroppedEvenWithAGate) {
  const Layout L = tiny_layout();
  std::vector<double> o(4, -1);
  gate_forward(o.data(), o_cmp.data(), o_slc.data(), nullptr, g_cmp.data(), g_slc.data(), g_swa.data(), L);
  EXPECT_EQ(o, (std::vector<double>{10.5, 21, 13.5, 18}));
}

TEST(Gating, SampledRowsOnlyTouchThoseRows) {
  const Layout L = tiny_layout();
  std::vector<double> o(4, -1);
  gate_forward(o.data(), o_cmp.data(), o_slc.data(), o_swa.data(), g_cmp.data(), g_slc.data(), g_swa.data(), L,
               RowMask{0, 1});
  EXPECT_EQ(o, (std::vector<double>{-1, -1, -286.5, -382}));
}

TEST(GatingBackward, GateGradientsAndGatedUpstream) {
  const Layout L = tiny_layout();
  const std::vector<double> d_o = {1, -1, 2, 0.5};
  std::vector<double> dg_cmp(2, 1), dg_slc(2, 0), dg_swa(2, 0);  // dg_cmp starts at 1: gradients accumulate
  std::vector<double> do_cmp(4, -9), do_slc(4, -9), do_swa(4, -9);
  gate_backward(dg_cmp.data(), dg_slc.data(), dg_swa.data(), do_cmp.data(), do_slc.data(), do_swa.data(), d_o.data(),
                o_cmp.data(), o_slc.data(), o_swa.data(), g_cmp.data(), g_slc.data(), g_swa.data(), L);
  EXPECT_EQ(dg_cmp, (std::vector<double>{1 + (1 - 2), 1 + (6 + 2)}));
  EXPECT_EQ(dg_slc, (std::vector<double>{10 - 20, 60 + 20}));
  EXPECT_EQ(dg_swa, (std::vector<double>{100 - 200, 600 + 200}));
  EXPECT_EQ(do_cmp, (std::vector<double>{0.5, -0.5, 4, 1}));
  EXPECT_EQ(do_slc, (std::vector<double>{1, -1, 0.5, 0.125}));
  EXPECT_EQ(do_swa, (std::vector<double>{3, -3, -2, -0.5}));
}

TEST(GatingBackward, MissingGateSkipsItsBranch) {
  const Layout L = tiny_layout();
  const std::vector<double> d_o = {1, -1, 2, 0.5};
  std::vector<double> dg_slc(2, 0), do_slc(4, -9);
  gate_backward(nullptr, dg_slc.data(), nullptr, nullptr, do_slc.data(), nullptr, d_o.data(), o_cmp.data(), o_slc.data(),
                o_swa.data(), nullptr, g_slc.data(), nullptr, L);
  EXPECT_EQ(dg_slc, (std::vector<double>{-10, 80}));
  EXPECT_EQ(do_slc, (std::vector<double>{1, -1, 0.5, 0.125}));
}

TEST(GatingBackward, ZeroGateGivesZeroUpstreamForItsBranch) {
  const Layout L = tiny_layout();
  const std::vector<double> d_o = {1, -1, 2, 0.5}, zero = {0, 0};
  std::vector<double> dg(2, 0), d_branch(4, -9);
  gate_backward(nullptr, dg.data(), nullptr, nullptr, d_branch.data(), nullptr, d_o.data(), o_cmp.data(), o_slc.data(),
                o_swa.data(), nullptr, zero.data(), nullptr, L);
  EXPECT_TRUE(test::all_zero(d_branch));
  EXPECT_EQ(dg, (std::vector<double>{-10, 80}));  // the gate itself still gets its gradient
}

}  // namespace
}  // namespace nsa::ref
