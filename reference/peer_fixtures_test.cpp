// A second opinion on the reference: fixtures computed in float32 by an independent PyTorch implementation
// (paper policy, no window; see fixtures/peer/README.md). Both runs must agree to about 1e-6 rel-L2 and pick
// the same block sets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>

#include "core/safetensors.h"
#include "reference/reference.h"
#include "reference/test_util.h"

namespace nsa::ref {
namespace {

const char* const kOutputNames[] = {"k_cmp", "v_cmp", "o_cmp", "lse_cmp", "block_indices", "o_slc", "lse_slc",
                                    "o_swa", "lse_swa", "o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa",
                                    "dk_cmp", "dv_cmp"};
constexpr double kTolerance = 1e-6;  // float32 peer against float64 reference

struct PeerCase {
  SafetensorsFile file;  // inputs and the peer's outputs
  std::string path;
};

PeerCase read_peer(const std::string& name) {
  const std::string path = std::string(NSA_SOURCE_DIR) + "/fixtures/peer/" + name;
  return {read_safetensors(path), path};
}

// The file with every output removed, so load_problem sees inputs only; `keep` outputs stay (as inputs).
SafetensorsFile inputs_of(const SafetensorsFile& file, const std::set<std::string>& keep = {}) {
  SafetensorsFile in = file;
  auto is_output = [&](const std::pair<std::string, Tensor>& t) {
    return !keep.count(t.first) && std::find(std::begin(kOutputNames), std::end(kOutputNames), t.first) != std::end(kOutputNames);
  };
  in.tensors.erase(std::remove_if(in.tensors.begin(), in.tensors.end(), is_output), in.tensors.end());
  return in;
}

// The peer writes lse_cmp = -inf where no compressed block is visible; the reference writes 0 (both allowed).
std::vector<double> lse_with_zero_for_empty_rows(std::vector<double> lse) {
  for (double& x : lse)
    if (std::isinf(x) && x < 0) x = 0;
  return lse;
}

void expect_close(const char* name, const std::vector<double>& got, const std::vector<double>& peer, const std::string& path) {
  ASSERT_FALSE(peer.empty()) << path << " has no " << name;
  ASSERT_FALSE(test::all_zero(peer)) << name;
  const double err = test::rel_l2(got, peer);
  EXPECT_LT(err, kTolerance) << path << ": " << name << " rel-L2 " << err;
  std::printf("  %-8s rel-L2 %.3g\n", name, err);
}

// Per (token, kv head) row: the same set of blocks (order free, -1 padding ignored). A differing row must be
// a near-tie: every block the peer chose scores within float32 rounding of the S-th best reference score.
void expect_same_block_sets(const std::vector<int32_t>& got, const std::vector<int32_t>& peer, const Problem& p,
                            const Outputs& out, const std::string& path) {
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  ASSERT_EQ(got.size(), peer.size());
  int64_t rows = 0, differing = 0;
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t h = 0; h < d.H; ++h, ++rows) {
        const int64_t row = (s.batch * d.T + s.start + t) * d.H + h;
        std::set<int32_t> mine, theirs;
        for (int64_t j = 0; j < L.S(); ++j) {
          if (got[row * L.S() + j] >= 0) mine.insert(got[row * L.S() + j]);
          if (peer[row * L.S() + j] >= 0) theirs.insert(peer[row * L.S() + j]);
        }
        if (mine == theirs) continue;
        ++differing;
        BlockScores scores;
        topk_scores(scores, s.batch, s.start + t, h, p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), L);
        std::vector<double> chosen;
        for (int32_t c : mine) chosen.push_back(scores.score[c]);
        std::sort(chosen.begin(), chosen.end());
        const double s_S = chosen.empty() ? 0 : chosen.front();  // the weakest block the reference kept
        for (int32_t c : theirs)
          EXPECT_GE(scores.score[c], s_S * (1 - 1e-4) - 1e-9)
              << path << ": token " << s.start + t << " head " << h << " peer block " << c << " is not a near-tie";
        std::printf("  near-tie at token %lld head %lld\n", (long long)(s.start + t), (long long)h);
      }
  std::printf("  block sets: %lld of %lld rows identical\n", (long long)(rows - differing), (long long)rows);
}

void expect_agrees_with_peer(const std::string& name) {
  const PeerCase peer_case = read_peer(name);
  const std::string& path = peer_case.path;
  std::printf("%s\n", name.c_str());

  // Forward and backward from the inputs alone, top-k included.
  const Problem p = load_problem(inputs_of(peer_case.file), path);
  ASSERT_TRUE(p.has_backward());
  ASSERT_EQ(p.layout.config.policy, Policy::Paper);
  const Outputs peer = outputs_from_file(peer_case.file, p, path);
  const Outputs got = run_reference(p);
  expect_close("k_cmp", got.k_cmp, peer.k_cmp, path);
  expect_close("v_cmp", got.v_cmp, peer.v_cmp, path);
  expect_close("o_cmp", got.o_cmp, peer.o_cmp, path);
  expect_close("lse_cmp", got.lse_cmp, lse_with_zero_for_empty_rows(peer.lse_cmp), path);
  expect_same_block_sets(got.block_indices, peer.block_indices, p, got, path);

  // Everything downstream of the selection on the peer's own blocks, so a near-tie cannot blur the comparison.
  const Problem on_peer_blocks = load_problem(inputs_of(peer_case.file, {"block_indices"}), path);
  ASSERT_TRUE(on_peer_blocks.block_indices.has_value());
  const Outputs downstream = run_reference(on_peer_blocks);
  expect_close("o", downstream.o, peer.o, path);
  expect_close("dq", downstream.dq, peer.dq, path);
  expect_close("dk", downstream.dk, peer.dk, path);
  expect_close("dv", downstream.dv, peer.dv, path);
  expect_close("dg_cmp", downstream.dg_cmp, peer.dg_cmp, path);
  expect_close("dg_slc", downstream.dg_slc, peer.dg_slc, path);
}

TEST(PeerFixtures, FixedLengthTNotAMultipleOfBlockSize) { expect_agrees_with_peer("naive_fixed_b2_t200.safetensors"); }
TEST(PeerFixtures, VarlenWithOneTokenSequenceAndOddHeadDim) { expect_agrees_with_peer("naive_varlen_len1_k24.safetensors"); }

}  // namespace
}  // namespace nsa::ref
