// The CUDA backend, stage by stage, against the float64 reference evaluated on the same rounded inputs and on
// the backend's own upstream outputs (nsa-spec §5.2), so a failure names its stage.
#include "cuda/cuda_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <tuple>
#include <utility>

#include <cuda_runtime.h>

#include "core/errors.h"
#include "cuda/attention_sm90.h"
#include "reference/reference.h"
#include "reference/test_util.h"
#include "verify/check.h"

namespace nsa {
namespace {

using test::ProblemSpec;

#define SKIP_WITHOUT_DEVICE() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: the CUDA backend tests need a GPU"

// rel-L2 tolerance by dtype (nsa-spec §5.1); f64 inputs run in fp32 on the device.
double tolerance(DType t) {
  switch (t) {
    case DType::BF16: return 1.6e-2;
    case DType::F16: return 2e-3;
    default: return 1e-5;
  }
}

// Rounds every float input to `t`, as a fixture stored in that dtype would hold it.
Problem rounded(Problem p, DType t) {
  auto round_all = [&](std::vector<double>& v) {
    for (double& x : v) x = round_to(t, x);
  };
  round_all(p.q);
  round_all(p.k);
  round_all(p.v);
  for (auto* g : {&p.g_cmp, &p.g_slc, &p.g_swa, &p.d_o})
    if (*g) round_all(**g);
  p.input_dtype = t;
  return p;
}

// The verifier's own judgement of a tensor (compare_tensor: rel-L2, a zero-expected tensor by its rms error,
// non-finite values where the reference is finite fail), as a test expectation.
void expect_close(const std::vector<double>& actual, const std::vector<double>& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  TensorGeometry flat;
  flat.D = int64_t(actual.size());
  CompareRule rule;
  rule.tol = tol;
  const TensorCheck c = compare_tensor(what, "", expected, actual, flat, rule);
  EXPECT_TRUE(c.pass) << what << ": rel-L2 " << c.rel_l2 << " over tolerance " << tol << ", " << c.nonfinite
                      << " non-finite; worst at " << c.worst_where << " expected " << c.worst_expected << " got "
                      << c.worst_actual;
}

// Judges one top-k row by the verifier's tie-aware rule (judge_topk_row, nsa-spec §5.3), and asks beyond it that
// the slots come in score order up to `rtol`; returns "" when the row passes. `exact`: the set is the
// reference's. `fp32_tie`: the reference's S-th and (S+1)-th best scores differ by less than the fp32 sums'
// rounding (1e-5 relative), so either side of the boundary is as right as the other -- e.g. with the seed policy
// a lone visible block scores G up to rounding, as the forced current block does exactly.
std::string judge_row(const int32_t* chosen, int64_t S, const ref::BlockScores& sc, double rtol, bool& exact,
                      bool& fp32_tie) {
  const TopkRowVerdict v = judge_topk_row(chosen, S, sc, rtol, 1e-9);
  if (!v.valid) return v.reason;
  for (int64_t j = 1; j < S && chosen[j] != -1; ++j)
    if (sc.score[chosen[j]] > sc.score[chosen[j - 1]] * (1 + rtol) + 1e-9)
      return "slots " + std::to_string(j - 1) + " and " + std::to_string(j) + " are out of score order";
  exact = v.exact;
  std::vector<double> scores;
  for (std::size_t c = 0; c < sc.score.size(); ++c)
    if (sc.candidate[c] || sc.forced[c]) scores.push_back(sc.score[c]);
  fp32_tie = false;
  if (int64_t(scores.size()) > S) {
    std::nth_element(scores.begin(), scores.begin() + S, scores.end(), std::greater<double>());
    const double next = scores[S], s_S = *std::min_element(scores.begin(), scores.begin() + S);
    fp32_tie = s_S - next <= 1e-5 * std::abs(s_S);
  }
  return "";
}

struct Case {
  std::string name;
  ProblemSpec spec;
  DType dtype;
  bool with_counts = false;
  bool given_indices = false;
  bool sm90_kernels = true;  // false: the kernels an sm_80 GPU runs, on any device
  int64_t smem_limit = 0;    // > 0: their CTAs sized for a GPU of this much shared memory a CTA (with sm90_kernels off)
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }
std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

Case make_case(std::string name, DType dtype, int64_t B, int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V,
               int64_t BS, int64_t S, Policy policy, std::vector<int64_t> lengths = {}, int64_t W = 0) {
  Case c;
  c.name = std::move(name);
  c.dtype = dtype;
  c.spec.B = B;
  c.spec.T = T;
  c.spec.HQ = HQ;
  c.spec.H = H;
  c.spec.K = K;
  c.spec.V = V;
  c.spec.lengths = std::move(lengths);
  c.spec.config.block_size = BS;
  c.spec.config.block_count = S;
  c.spec.config.window = W;
  c.spec.config.policy = policy;
  c.spec.gate_swa = W > 0;
  c.spec.seed = std::hash<std::string>{}(c.name);
  return c;
}

// Random distinct blocks per row (some -1), valid per nsa-spec §2.4.
std::vector<int32_t> random_indices(const Layout& L, std::mt19937_64& rng) {
  const Dims& d = L.dims;
  std::vector<int32_t> idx(d.B * d.T * d.H * L.S(), -1);
  for (const Sequence& s : L.sequences) {
    const int64_t nb = ceil_div(s.length, L.BS());
    std::vector<int32_t> blocks(nb);
    std::iota(blocks.begin(), blocks.end(), 0);
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t h = 0; h < d.H; ++h) {
        std::shuffle(blocks.begin(), blocks.end(), rng);
        int32_t* row = idx.data() + ((s.batch * d.T + s.start + t) * d.H + h) * L.S();
        for (int64_t j = 0; j < L.S() && j < nb; ++j) row[j] = rng() % 5 == 0 ? -1 : blocks[j];
      }
  }
  return idx;
}

// Runs the backend on case `c` and checks every stage against the reference on the backend's own upstream.
void check_every_stage(const Case& c) {
  Problem p = rounded(test::random_problem(c.spec), c.dtype);
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  std::mt19937_64 rng(c.spec.seed + 7);
  if (c.with_counts) {
    p.block_counts = std::vector<int32_t>(d.B * d.T * d.H);
    for (int32_t& n : *p.block_counts) n = int32_t(rng() % (L.S() + 1));
  }
  if (c.given_indices) p.block_indices = random_indices(L, rng);

  const Outputs out = make_cuda_backend(c.sm90_kernels, c.smem_limit)->run(p, RunOptions{});
  const double tol = tolerance(c.dtype);
  const int64_t tokens = d.B * d.T, C = L.chunks;

  // Mean pooling, from the rounded k / v.
  std::vector<double> k_cmp(d.B * C * d.H * d.K), v_cmp(d.B * C * d.H * d.V);
  ref::mean_pool_forward(k_cmp.data(), v_cmp.data(), p.k.data(), p.v.data(), L);
  expect_close(out.k_cmp, k_cmp, tol, "k_cmp");
  expect_close(out.v_cmp, v_cmp, tol, "v_cmp");
  EXPECT_FALSE(test::all_zero(out.k_cmp));

  // Compressed attention, from the backend's k_cmp / v_cmp.
  std::vector<double> o_cmp(tokens * d.HQ * d.V), lse_cmp(tokens * d.HQ);
  ref::compressed_attention_forward(o_cmp.data(), lse_cmp.data(), p.q.data(), out.k_cmp.data(), out.v_cmp.data(), L);
  expect_close(out.o_cmp, o_cmp, tol, "o_cmp");
  expect_close(out.lse_cmp, lse_cmp, tol, "lse_cmp");

  // Top-k, from the backend's k_cmp and lse_cmp: tie-aware, and mostly exact. The scores are fp32 sums of
  // the same rounded logits, so near-ties are within fp32 rounding whatever the input dtype.
  ASSERT_EQ(out.block_indices.size(), std::size_t(tokens * d.H * L.S()));
  if (c.given_indices) {
    EXPECT_EQ(out.block_indices, *p.block_indices);
  } else {
    ref::BlockScores sc;
    int64_t clear_rows = 0, exact_rows = 0, tied_rows = 0;
    for (const Sequence& s : L.sequences)
      for (int64_t t = 0; t < s.length; ++t)
        for (int64_t h = 0; h < d.H; ++h) {
          ref::topk_scores(sc, s.batch, s.start + t, h, p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), L);
          bool exact = false, tied = false;
          const std::string why = judge_row(out.block_indices.data() + ((s.batch * d.T + s.start + t) * d.H + h) * L.S(),
                                            L.S(), sc, 1e-4, exact, tied);
          ASSERT_EQ(why, "") << "top-k row [" << s.batch << ", " << s.start + t << ", " << h << "]";
          tied_rows += tied;
          clear_rows += !tied;
          exact_rows += exact && !tied;
        }
    EXPECT_GE(exact_rows, clear_rows * 95 / 100)
        << exact_rows << " of " << clear_rows << " top-k rows without an fp32 tie at the S-th place match exactly ("
        << tied_rows << " rows tie there)";
  }

  // Selected attention, from the backend's block_indices.
  const int32_t* counts = p.block_counts ? p.block_counts->data() : nullptr;
  std::vector<double> o_slc(tokens * d.HQ * d.V), lse_slc(tokens * d.HQ);
  ref::selected_attention_forward(o_slc.data(), lse_slc.data(), p.q.data(), p.k.data(), p.v.data(),
                                  out.block_indices.data(), counts, L);
  expect_close(out.o_slc, o_slc, tol, "o_slc");
  expect_close(out.lse_slc, lse_slc, tol, "lse_slc");

  if (L.config.window > 0) {
    std::vector<double> o_swa(tokens * d.HQ * d.V), lse_swa(tokens * d.HQ);
    ref::sliding_window_forward(o_swa.data(), lse_swa.data(), p.q.data(), p.k.data(), p.v.data(), L);
    expect_close(out.o_swa, o_swa, tol, "o_swa");
    expect_close(out.lse_swa, lse_swa, tol, "lse_swa");
  } else {
    EXPECT_TRUE(out.o_swa.empty());
  }

  // Gating, from the backend's branch outputs.
  auto gate = [](const std::optional<std::vector<double>>& g) { return g ? g->data() : nullptr; };
  std::vector<double> o(tokens * d.HQ * d.V);
  ref::gate_forward(o.data(), out.o_cmp.data(), out.o_slc.data(), out.o_swa.empty() ? nullptr : out.o_swa.data(),
                    gate(p.g_cmp), gate(p.g_slc), gate(p.g_swa), L);
  expect_close(out.o, o, tol, "o");
  // o is all 0 only where each gated branch is (e.g. g_cmp alone, and no sequence has a complete block).
  EXPECT_EQ(test::all_zero(out.o), test::all_zero(o));
  EXPECT_FALSE(out.has_grads);
}

class CudaBackendStages : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackendStages, EveryStageMatchesTheReferenceOnItsOwnUpstream) {
  SKIP_WITHOUT_DEVICE();
  check_every_stage(GetParam());
}

const Policy kSeed = Policy::Seed, kPaper = Policy::Paper;

std::vector<Case> hand_picked_cases() {
  return {
        make_case("G16_bf16_BS16_seed", DType::BF16, 2, 203, 16, 1, 64, 32, 16, 4, kSeed),
        make_case("G3_f16_K40_BS32_paper", DType::F16, 1, 301, 6, 2, 40, 24, 32, 3, kPaper),
        make_case("G1_f32_BS64_seed", DType::F32, 2, 257, 4, 4, 32, 64, 64, 2, kSeed),
        make_case("varlen_empty_bf16_BS16_window", DType::BF16, 1, 0, 32, 2, 64, 64, 16, 8, kPaper,
                  {100, 0, 257, 1, 130}, 40),
        make_case("G4_bf16_BS128_paper", DType::BF16, 1, 700, 8, 2, 128, 128, 128, 4, kPaper),
        make_case("K256_V256_bf16", DType::BF16, 1, 150, 4, 1, 256, 256, 16, 6, kSeed),
        make_case("V200_f16_G5", DType::F16, 1, 190, 10, 2, 96, 200, 16, 5, kSeed),
        make_case("G80_f32_head_chunks", DType::F32, 1, 90, 80, 1, 16, 16, 16, 3, kPaper),
        make_case("G144_bf16_head_chunks", DType::BF16, 1, 70, 144, 1, 32, 16, 16, 2, kSeed),
        make_case("f64_runs_in_fp32_varlen_G1", DType::F64, 1, 0, 3, 3, 24, 8, 16, 3, kSeed, {33, 17, 0, 64}),
        make_case("T_below_BS_f16", DType::F16, 2, 11, 4, 2, 16, 16, 16, 2, kPaper),
        make_case("many_blocks_bf16_S16", DType::BF16, 1, 2100, 16, 1, 64, 64, 16, 16, kSeed),
        // Head dims that are not a multiple of a 16-byte vector (the gate pass then goes element by element).
        make_case("odd_dims_f32_K12_V5_G3", DType::F32, 1, 30, 3, 1, 12, 5, 8, 2, kSeed),
        make_case("odd_dims_bf16_K6_V6_G5_window", DType::BF16, 1, 44, 5, 1, 6, 6, 4, 3, kPaper, {}, 7),
        // Top-k: S = 1 and 64, candidate buffers that overflow (G = 1, and G = 16 past 256 blocks), long keys
        // with few heads (half the warps per CTA), T = 1.
        make_case("topk_S1_G1_bf16_BS32", DType::BF16, 1, 400, 2, 2, 32, 16, 32, 1, kSeed),
        make_case("topk_S64_G16_bf16_BS16_paper", DType::BF16, 1, 4500, 16, 1, 32, 16, 16, 64, kPaper),
        make_case("topk_S64_G1_bf16_K256", DType::BF16, 1, 1300, 1, 1, 256, 16, 16, 64, kSeed),
        make_case("topk_S16_G1_f16_overflow", DType::F16, 1, 3000, 2, 2, 32, 16, 16, 16, kSeed),
        make_case("topk_G3_bf16_BS128", DType::BF16, 1, 900, 3, 1, 64, 32, 128, 4, kSeed),
        make_case("topk_T1_bf16", DType::BF16, 1, 1, 4, 1, 32, 16, 64, 16, kSeed),
        // The largest S: the candidate buffers keep S - 1 entries, and compact every pass (wgmma kernel at
        // G = 16, K = 64; tile kernel at G = 1).
        make_case("topk_S225_G16_bf16_K64_BS16", DType::BF16, 1, 4600, 16, 1, 64, 16, 16, 225, kSeed),
        make_case("topk_S128_G1_f16_BS16_paper", DType::F16, 1, 3000, 2, 2, 32, 16, 16, 128, kPaper),
        // The streamed selected-attention kernel (sm_90: G a multiple of 16, BS 64 or 128, K and V in {64, 128}).
        make_case("streamed_G16_bf16_BS64_window", DType::BF16, 2, 300, 16, 1, 128, 64, 64, 4, kSeed, {}, 40),
        [] {
          Case c = make_case("streamed_G32_f16_BS128_varlen_counts", DType::F16, 1, 0, 64, 2, 64, 128, 128, 3, kPaper,
                             {200, 0, 77, 130});
          c.with_counts = true;
          return c;
        }(),
        [] {
          Case c = make_case("block_counts_bf16_G16", DType::BF16, 1, 300, 16, 1, 64, 64, 32, 4, kSeed);
          c.with_counts = true;
          return c;
        }(),
        [] {
          Case c = make_case("given_indices_f16_varlen", DType::F16, 1, 0, 8, 2, 32, 48, 16, 3, kSeed, {0, 77, 150});
          c.given_indices = true;
          return c;
        }(),
        // The NSA paper's heads (K = 192, V = 128) on the sm_90 kernels of every forward stage (G = 16 and, varlen,
        // G = 4 with the paper policy) and on the key-block backward's 256-wide rows.
        make_case("paper_heads_K192_V128_G16_bf16_window", DType::BF16, 1, 330, 16, 1, 192, 128, 64, 4, kSeed, {}, 70),
        make_case("paper_heads_K192_V128_G4_f16_varlen", DType::F16, 1, 0, 8, 2, 192, 128, 64, 3, kPaper,
                  {200, 0, 140})};
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaBackendStages, ::testing::ValuesIn(hand_picked_cases()), case_name);

constexpr int64_t kSm86Smem = 99 * 1024;  // a CTA's shared memory on sm_86 / sm_89 GPUs

// The sm_80 kernel set with its CTAs held to a smaller GPU's shared memory (DeviceLayout::smem_limit): the shapes
// where a stage leaves its usual launch -- compressed attention's tile kernel with fewer warps (its 8-warp CTA
// needs 132 KB at K = V = 256 in bf16, its 4-warp one 115 KB at K = V = 128 in fp32) or its row kernel (fp32 at
// K = V = 256), top-k's tile kernel with fewer warps (its candidate buffers at G = 1 with S = 64 outgrow 99 KB,
// with S = 225 an A100's 163 KB), and the window's and selected attention's tiles chosen for 99 KB.
std::vector<Case> small_smem_cases() {
  auto limited = [](Case c, int64_t limit) {
    c.sm90_kernels = false;
    c.smem_limit = limit;
    return c;
  };
  return {
      limited(make_case("smem99_bf16_K256_V256_G2_window", DType::BF16, 1, 300, 4, 2, 256, 256, 32, 4, kSeed, {}, 40),
              kSm86Smem),
      limited(make_case("smem99_f32_K128_V128_G4_varlen", DType::F32, 1, 0, 8, 2, 128, 128, 32, 3, kPaper,
                        {200, 0, 130}),
              kSm86Smem),
      limited(make_case("smem99_f32_K256_V256_G2_window", DType::F32, 1, 200, 4, 2, 256, 256, 16, 4, kSeed, {}, 30),
              kSm86Smem),
      limited(make_case("smem99_bf16_G1_K128_S64_BS16", DType::BF16, 1, 1400, 2, 2, 128, 64, 16, 64, kSeed),
              kSm86Smem),
      limited(make_case("smem99_f16_G1_K192_V128_S128_BS16_window", DType::F16, 1, 2200, 1, 1, 192, 128, 16, 128,
                        kPaper, {}, 100),
              kSm86Smem),
      limited(make_case("smem163_bf16_G1_K128_S225_BS16", DType::BF16, 1, 3700, 1, 1, 128, 64, 16, 225, kSeed),
              cuda::kSm80Smem.per_cta)};
}
INSTANTIATE_TEST_SUITE_P(SmallSharedMemory, CudaBackendStages, ::testing::ValuesIn(small_smem_cases()), case_name);

// Where no launch of top-k's tile kernel fits (fp32, K = 256, S = 128 on a 99 KB GPU: one warp's 16 tokens
// and one K tile already take 108 KB), the run stops with an input error (exit 2) that names the stage, the shape
// and the limit, before any kernel runs; with the block indices given (no top-k) the shape runs.
TEST(CudaBackend, TopkBeyondTheGpusSharedMemoryIsAnError) {
  SKIP_WITHOUT_DEVICE();
  ProblemSpec s;
  s.T = 64;
  s.HQ = s.H = 1;
  s.K = 256;
  s.V = 16;
  s.config.block_size = 16;
  s.config.block_count = 128;
  Problem p = test::random_problem(s);
  try {
    make_cuda_backend(false, kSm86Smem)->run(p, RunOptions{});
    FAIL() << "expected an InputError";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("top-k of fp32 inputs with K = 256, S = 128 and G = 1"), std::string::npos) << what;
    EXPECT_NE(what.find(std::to_string(kSm86Smem) + " bytes"), std::string::npos) << what;
  }
  std::mt19937_64 rng(3);
  p.block_indices = random_indices(p.layout, rng);
  const Outputs out = make_cuda_backend(false, kSm86Smem)->run(p, RunOptions{});
  EXPECT_EQ(out.block_indices, *p.block_indices);
}

// Shapes drawn at random (a fixed seed, so a failure reproduces by name): every dtype, G from 1 to 64, K != V
// from 16 to 256, block sizes off the fast paths' {16, 32, 64, 128} too, both policies, windows, scales other
// than 1/sqrt(K) (one negative), fixed-length batches and varlen batches with empty sequences, block_counts,
// given indices and missing gates. Biased towards the sm_90 kernels' conditions (K, V in {64, 128}; G a
// multiple of 16) so that each path meets shapes nobody picked for it. Sizes stay small enough for the float64
// reference.
std::vector<Case> random_cases(int n) {
  std::mt19937_64 rng(20261127);
  auto pick = [&](std::initializer_list<int64_t> xs) { return *(xs.begin() + rng() % xs.size()); };
  auto below = [&](int64_t n) { return int64_t(rng() % uint64_t(n)); };
  std::vector<Case> cases;
  for (int i = 0; i < n; ++i) {
    const DType dtype = std::vector<DType>{DType::BF16, DType::BF16, DType::F16, DType::F32}[below(4)];
    const int64_t H = pick({1, 1, 2, 3});
    const int64_t G = pick({1, 2, 3, 4, 5, 8, 16, 16, 16, 32, 48, 64});
    const int64_t K = pick({16, 40, 64, 64, 128, 128, 128, 256}), V = pick({16, 64, 64, 128, 128, 96, 200});
    const int64_t BS = pick({16, 16, 32, 64, 64, 128, 8, 48});
    // Now and then S up to the CUDA top-k's limit (at G = 16, past S = 177 top-k leaves the sm_90 kernel).
    const int64_t S = below(10) == 0   ? 65 + below(cuda::kTopkMaxBlockCount - 64)
                      : below(4) == 0 ? 17 + below(48)
                                      : 1 + below(16);
    const Policy policy = below(2) ? Policy::Seed : Policy::Paper;
    const int64_t W = below(3) == 0 ? 1 + below(300) : 0;
    // Tokens x query heads bounded so that each case's reference takes well under a second.
    const int64_t budget = std::max<int64_t>(40, 24000 / (G * H));
    std::vector<int64_t> lengths;
    int64_t B = 1, T = 0;
    if (below(2)) {
      for (int64_t n = 1 + below(5); n > 0; --n) lengths.push_back(below(4) == 0 ? 0 : 1 + below(budget / 2));
    } else {
      B = 1 + below(2);
      T = 1 + below(budget / B);
    }
    std::ostringstream name;
    name << "r" << i << "_" << dtype_name(dtype) << "_G" << G << "_H" << H << "_K" << K << "_V" << V << "_BS" << BS
         << "_S" << S << (policy == Policy::Paper ? "_paper" : "_seed") << "_W" << W
         << (lengths.empty() ? "_B" + std::to_string(B) + "_T" + std::to_string(T) : "_varlen");
    Case c = make_case(name.str(), dtype, B, T, G * H, H, K, V, BS, S, policy, lengths, W);
    if (below(5) == 0) c.spec.config.scale = below(2) ? 0.03 : -0.05;
    c.with_counts = below(4) == 0;
    // Given indices only where some sequence is longer than a block: elsewhere they select nothing to attend.
    const int64_t longest = lengths.empty() ? T : *std::max_element(lengths.begin(), lengths.end());
    c.given_indices = below(5) == 0 && longest > BS;
    if (c.given_indices) c.name += "_indices";
    if (c.with_counts) c.name += "_counts";
    if (c.spec.config.scale != 0) c.name += "_scale";
    if (longest == 0) c.spec.lengths.push_back(1 + below(40));  // at least one token
    // Gates: a missing one drops its branch (in the fused gate path, too); g_cmp or g_slc always stays.
    c.spec.gate_cmp = below(6) != 0;
    c.spec.gate_slc = below(6) != 0 || !c.spec.gate_cmp;
    c.spec.gate_swa = W > 0 && below(4) != 0;
    if (!c.spec.gate_cmp || !c.spec.gate_slc || (W > 0 && !c.spec.gate_swa))
      c.name += std::string("_gates") + (c.spec.gate_cmp ? "C" : "") + (c.spec.gate_slc ? "S" : "") +
                (c.spec.gate_swa ? "W" : "");
    cases.push_back(std::move(c));
  }
  return cases;
}

class CudaBackendRandomShapes : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackendRandomShapes, EveryStageMatchesTheReferenceOnItsOwnUpstream) {
  SKIP_WITHOUT_DEVICE();
  check_every_stage(GetParam());
}

std::vector<Case> without_sm90_kernels(std::vector<Case> cases) {
  for (Case& c : cases) c.sm90_kernels = false;
  return cases;
}

// The same shapes twice: as the device runs them, and (on an sm_90 device) with the kernels an sm_80 GPU runs.
INSTANTIATE_TEST_SUITE_P(Random, CudaBackendRandomShapes, ::testing::ValuesIn(random_cases(128)), case_name);
INSTANTIATE_TEST_SUITE_P(RandomPortable, CudaBackendRandomShapes,
                         ::testing::ValuesIn(without_sm90_kernels(random_cases(128))), case_name);

// DeviceLayout::sm90_kernels = false moves each stage that has an sm_90 kernel off it, on a shape every one of
// them takes otherwise (what the RandomPortable instances rely on).
TEST(CudaBackend, Sm90KernelsStandAsideWhenTheLayoutSaysSo) {
  SKIP_WITHOUT_DEVICE();
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "no sm_90 device: the sm_90 kernels never run here";
  cuda::DeviceLayout L;
  L.dtype = cuda::ElemType::BF16;
  L.B = 1, L.T = 4096, L.HQ = 64, L.H = 4, L.K = 128, L.V = 128, L.C = 64;
  L.block_size = 64, L.block_count = 16, L.window = 512;
  L.num_seqs = 1, L.max_len = 4096;
  const void* aligned = reinterpret_cast<const void*>(uintptr_t(256));  // only the alignment is read
  EXPECT_TRUE(cuda::compressed_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::sliding_window_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::selected_streamed_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::topk_sm90_fits(L, aligned, aligned));
  // The NSA paper's heads have sm_90 kernels too (the hand-picked paper_heads cases check their outputs).
  L.K = 192;
  EXPECT_TRUE(cuda::compressed_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::sliding_window_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::selected_streamed_fits(L, aligned, aligned, aligned));
  EXPECT_TRUE(cuda::topk_sm90_fits(L, aligned, aligned));
  L.V = 64;
  EXPECT_FALSE(cuda::compressed_sm90_fits(L, aligned, aligned, aligned)) << "K = 192 only with V = 128";
  EXPECT_FALSE(cuda::selected_streamed_fits(L, aligned, aligned, aligned));
  L.K = 128, L.V = 128;
  L.sm90_kernels = false;
  EXPECT_FALSE(cuda::compressed_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_FALSE(cuda::sliding_window_sm90_fits(L, aligned, aligned, aligned));
  EXPECT_FALSE(cuda::selected_streamed_fits(L, aligned, aligned, aligned));
  EXPECT_FALSE(cuda::topk_sm90_fits(L, aligned, aligned));
}

// Logits built to be distinct by a wide margin: every token of block c has the key 0.5 * e_c, so k_cmp[c] is
// exact in bf16, and one query head (G = 1, score = its own probability) orders the blocks by
// q . e_c = 0.25 * ((7 c) mod 11), distinct for c < 11. The selection must then equal the reference's slot
// for slot, padding included.
TEST(CudaTopk, DistinctScoresGiveTheReferenceOrderExactly) {
  SKIP_WITHOUT_DEVICE();
  for (Policy policy : {Policy::Seed, Policy::Paper}) {
    ProblemSpec s;
    s.T = 170;
    s.HQ = 1;
    s.H = 1;
    s.K = 16;
    s.V = 16;
    s.config.block_size = 16;
    s.config.block_count = 4;
    s.config.policy = policy;
    Problem p = test::random_problem(s);
    std::fill(p.k.begin(), p.k.end(), 0.0);
    for (int64_t t = 0; t < s.T; ++t) p.k[t * s.K + t / 16] = 0.5;
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t k = 0; k < s.K; ++k) p.q[t * s.K + k] = 0.25 * double((k * 7) % 11);
    p = rounded(p, DType::BF16);
    const Outputs out = make_cuda_backend()->run(p, RunOptions{});
    for (int64_t c = 0; c < p.layout.chunks; ++c)
      for (int64_t k = 0; k < s.K; ++k) ASSERT_EQ(out.k_cmp[c * s.K + k], k == c ? 0.5 : 0.0) << c << " " << k;
    std::vector<int32_t> expected(s.T * s.config.block_count, -2);
    ref::topk_forward(expected.data(), p.q.data(), out.k_cmp.data(), out.lse_cmp.data(), p.layout);
    EXPECT_EQ(out.block_indices, expected) << policy_name(policy);
    // Not vacuous: late tokens choose S real blocks.
    EXPECT_GE(*std::min_element(out.block_indices.end() - 4, out.block_indices.end()), 0);
  }
}

TEST(CudaBackend, RejectsHeadDimensionsOver256) {
  ProblemSpec s;
  s.K = 260;
  s.V = 8;
  const Problem p = test::random_problem(s);
  // Validation happens before any device work, so it holds without a GPU too.
  cuda::PipelineOptions opt;
  EXPECT_THROW(cuda::validate_layout(p.layout, opt), InputError);
  s.K = 8;
  s.V = 300;
  EXPECT_THROW(cuda::validate_layout(test::random_problem(s).layout, opt), InputError);
  s.V = 256;
  EXPECT_NO_THROW(cuda::validate_layout(test::random_problem(s).layout, opt));
}

TEST(CudaBackend, RejectsBlockCountsOverTheTopkLimitUnlessIndicesAreGiven) {
  ProblemSpec s;
  s.T = 16;
  s.config.block_count = cuda::kTopkMaxBlockCount;
  cuda::PipelineOptions opt;
  EXPECT_NO_THROW(cuda::validate_layout(test::random_problem(s).layout, opt));
  s.config.block_count = cuda::kTopkMaxBlockCount + 1;
  const Layout L = test::random_problem(s).layout;
  EXPECT_THROW(cuda::validate_layout(L, opt), InputError);
  opt.given_indices = true;  // top-k does not run
  EXPECT_NO_THROW(cuda::validate_layout(L, opt));
}

// A row sample downloads only the sampled rows of the [B, T, HQ, V] outputs (Outputs::rows), the same bytes as
// the full download's rows; everything else is downloaded whole.
TEST(CudaBackend, RowSampleDownloadsThoseRowsOfTheOutputs) {
  SKIP_WITHOUT_DEVICE();
  ProblemSpec s;
  s.lengths = {90, 0, 41};
  s.HQ = 8, s.H = 2, s.K = 64, s.V = 32;
  s.config.block_size = 16;
  s.config.block_count = 3;
  s.config.window = 20;
  s.gate_swa = true;
  s.seed = 12;
  const Problem p = rounded(test::random_problem(s), DType::BF16);
  cuda::PipelineOptions po;
  po.dtype = cuda::ElemType::BF16;
  po.gate_swa = true;
  cuda::CudaPipeline pipe(p.layout, po);
  pipe.upload(p);
  pipe.forward();
  const std::vector<int64_t> rows = sorted_sample({130, 0, 77, 89, 90}, 131);
  const Outputs full = pipe.download(), some = pipe.download(rows);
  EXPECT_EQ(some.rows, rows);
  const int64_t width = s.HQ * s.V;
  for (auto field : {&Outputs::o_cmp, &Outputs::o_slc, &Outputs::o_swa, &Outputs::o}) {
    ASSERT_EQ((some.*field).size(), rows.size() * width);
    for (std::size_t r = 0; r < rows.size(); ++r)
      for (int64_t x = 0; x < width; ++x)
        ASSERT_EQ((some.*field)[r * width + x], (full.*field)[rows[r] * width + x]) << "row " << rows[r];
  }
  EXPECT_EQ(some.lse_slc, full.lse_slc);
  EXPECT_EQ(some.block_indices, full.block_indices);
  EXPECT_FALSE(test::all_zero(some.o));
}

// A problem holding q for sampled rows only (Problem::q_rows) uploads all of q from its stored bytes
// (Problem::q_stored): the same outputs, bit for bit, as from the widened q, for a 16-bit and an f64 file.
TEST(CudaBackend, StoredQueryBytesGiveTheSameOutputs) {
  SKIP_WITHOUT_DEVICE();
  for (const DType dtype : {DType::BF16, DType::F64}) {
    ProblemSpec s;
    s.lengths = {300, 0, 141};
    s.HQ = 32, s.H = 2, s.K = 64, s.V = 64;
    s.config.block_size = 64;
    s.config.block_count = 4;
    s.seed = 13;
    const Problem p = rounded(test::random_problem(s), dtype);
    const int64_t tokens = p.layout.dims.B * p.layout.dims.T, row = s.HQ * s.K;
    Problem cp = p;
    cp.q_stored = Tensor::from_f64(p.q, {p.layout.dims.B, p.layout.dims.T, s.HQ, s.K}, dtype);
    cp.q_rows = {0, 1, 2, 299, 440};
    cp.q.clear();
    for (int64_t t : cp.q_rows) cp.q.insert(cp.q.end(), p.q.begin() + t * row, p.q.begin() + (t + 1) * row);
    RunOptions opt;
    opt.rows = {1, 299, 440};
    const Outputs a = make_cuda_backend()->run(p, opt), b = make_cuda_backend()->run(cp, opt);
    EXPECT_EQ(a.rows, b.rows);
    for (auto field :
         {&Outputs::k_cmp, &Outputs::o_cmp, &Outputs::lse_cmp, &Outputs::o_slc, &Outputs::lse_slc, &Outputs::o}) {
      EXPECT_FALSE((a.*field).empty());
      EXPECT_EQ(a.*field, b.*field) << dtype_name(dtype);
    }
    EXPECT_EQ(a.block_indices, b.block_indices) << dtype_name(dtype);
    EXPECT_EQ(int64_t(a.lse_cmp.size()), tokens * s.HQ);
  }
}

// Where the forward fuses the gate pass into selected attention (sm_90, G a multiple of 16), its gated output is
// bit-identical to the separate pass on the same branch outputs, with and without a window branch; tokens with no
// selection (block_counts 0) included. At G = 4 the forward runs the pass itself.
TEST(CudaBackend, FusedGateMatchesTheGatePassBitForBit) {
  SKIP_WITHOUT_DEVICE();
  struct Shape {
    int64_t HQ, W;
  };
  for (Shape shape : {Shape{32, 0}, Shape{32, 40}, Shape{8, 0}}) {
    SCOPED_TRACE("HQ " + std::to_string(shape.HQ) + ", W " + std::to_string(shape.W));
    ProblemSpec s;
    s.lengths = {300, 0, 77, 190};
    s.HQ = shape.HQ, s.H = 2, s.K = 128, s.V = 64;
    s.config.block_size = 64;
    s.config.block_count = 4;
    s.config.window = shape.W;
    s.gate_swa = shape.W > 0;
    s.seed = 31;
    Problem p = rounded(test::random_problem(s), DType::BF16);
    std::mt19937_64 rng(5);
    p.block_counts = std::vector<int32_t>(p.layout.dims.B * p.layout.dims.T * s.H);
    for (int32_t& n : *p.block_counts) n = int32_t(rng() % 5);
    cuda::PipelineOptions po;
    po.dtype = cuda::ElemType::BF16;
    po.block_counts = true;
    po.gate_swa = s.gate_swa;
    cuda::CudaPipeline pipe(p.layout, po);
    pipe.upload(p);
    pipe.forward();
    const Outputs fused = pipe.download();
    pipe.run(cuda::Stage::Gate);
    const Outputs apart = pipe.download();
    int device = 0, major = 0;
    ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
    ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
    if (shape.HQ == 8) EXPECT_FALSE(pipe.gate_fused()) << "G = 4: the streamed kernel does not take every token";
    else EXPECT_EQ(pipe.gate_fused(), major >= 9) << "G = 16 on sm_90: the streamed kernel takes every token";
    ASSERT_EQ(fused.o.size(), apart.o.size());
    for (std::size_t i = 0; i < fused.o.size(); ++i) ASSERT_EQ(fused.o[i], apart.o[i]) << "element " << i;
    EXPECT_FALSE(test::all_zero(fused.o));
  }
}

// The gated form of the branch gradients (do with the rows' gates and deltas, what the tensor-core branches take,
// the pipeline's default) and the fp32 ones each branch casts itself (the stage functions' plain form): both
// against the float64 reference's gradients, on the same block indices. Gates of both signs and zero: the gated
// form scales the probabilities by the gate, so a negative or zero one must come out as the reference's.
TEST(CudaBackend, GatedAndFp32BranchGradientsMatchTheReference) {
  SKIP_WITHOUT_DEVICE();
  ProblemSpec s;
  s.lengths = {300, 0, 77, 190};
  s.HQ = 32, s.H = 2, s.K = 128, s.V = 128;
  s.config.block_size = 64;
  s.config.block_count = 4;
  s.config.window = 64;
  s.gate_swa = true;
  s.with_do = true;
  s.seed = 37;
  Problem p = rounded(test::random_problem(s), DType::BF16);
  for (std::optional<std::vector<double>>* gate : {&p.g_cmp, &p.g_slc, &p.g_swa})
    for (std::size_t r = 0; r < (*gate)->size(); ++r) {
      double& g = (**gate)[r];
      g = r % 5 == 0 ? 0.0 : r % 3 == 0 ? -g : g;  // rounded values stay exact
    }
  auto grads = [&](bool gated) {
    cuda::PipelineOptions po;
    po.dtype = cuda::ElemType::BF16;
    po.gate_swa = true;
    po.backward = true;
    po.gated_branch_grads = gated;
    cuda::CudaPipeline pipe(p.layout, po);
    pipe.upload(p);
    pipe.forward();
    pipe.backward();
    return pipe.download();
  };
  const Outputs gated = grads(true), plain = grads(false);
  ASSERT_TRUE(gated.has_grads && plain.has_grads);
  ASSERT_EQ(gated.block_indices, plain.block_indices);
  Problem frozen = p;
  frozen.block_indices = gated.block_indices;
  RunOptions run;
  run.backward = true;
  const Outputs ref = ref::run_reference(frozen, run);
  const double tol = tolerance(DType::BF16);
  using Field = std::vector<double> Outputs::*;
  const std::pair<const char*, Field> fields[] = {{"dq", &Outputs::dq},         {"dk", &Outputs::dk},
                                                  {"dv", &Outputs::dv},         {"dk_cmp", &Outputs::dk_cmp},
                                                  {"dv_cmp", &Outputs::dv_cmp}, {"dg_cmp", &Outputs::dg_cmp},
                                                  {"dg_slc", &Outputs::dg_slc}, {"dg_swa", &Outputs::dg_swa}};
  for (const auto& [name, field] : fields) {
    ASSERT_FALSE((ref.*field).empty()) << name;
    expect_close(gated.*field, ref.*field, tol, std::string(name) + " (gated)");
    expect_close(plain.*field, ref.*field, tol, std::string(name) + " (fp32)");
  }
}

// The backward (nsa-spec §3) against the float64 reference's on the same rounded inputs, `do` included, and on
// the backend's own block_indices (frozen, as the spec's backward is), so that a top-k near-tie cannot move a
// gradient. Every gradient the problem's gates call for must come back, and no other.
void check_backward(const Case& c) {
  ProblemSpec spec = c.spec;
  spec.with_do = true;
  Problem p = rounded(test::random_problem(spec), c.dtype);
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  std::mt19937_64 rng(spec.seed + 7);
  if (c.with_counts) {
    p.block_counts = std::vector<int32_t>(d.B * d.T * d.H);
    for (int32_t& n : *p.block_counts) n = int32_t(rng() % (L.S() + 1));
  }
  if (c.given_indices) p.block_indices = random_indices(L, rng);

  RunOptions run;
  run.backward = true;
  const Outputs out = make_cuda_backend(c.sm90_kernels, c.smem_limit)->run(p, run);
  ASSERT_TRUE(out.has_grads);
  Problem frozen = p;
  frozen.block_indices = out.block_indices;
  const Outputs ref = ref::run_reference(frozen, run);
  const double tol = tolerance(c.dtype);
  expect_close(out.dq, ref.dq, tol, "dq");
  expect_close(out.dk, ref.dk, tol, "dk");
  expect_close(out.dv, ref.dv, tol, "dv");
  expect_close(out.dk_cmp, ref.dk_cmp, tol, "dk_cmp");
  expect_close(out.dv_cmp, ref.dv_cmp, tol, "dv_cmp");
  for (auto [name, field, gate] : {std::tuple{"dg_cmp", &Outputs::dg_cmp, &p.g_cmp},
                                   std::tuple{"dg_slc", &Outputs::dg_slc, &p.g_slc},
                                   std::tuple{"dg_swa", &Outputs::dg_swa, &p.g_swa}}) {
    EXPECT_EQ((out.*field).empty(), !gate->has_value()) << name;
    if (gate->has_value()) expect_close(out.*field, ref.*field, tol, name);
  }
  EXPECT_FALSE(test::all_zero(out.dq) && !test::all_zero(ref.dq)) << "dq all zero";
}

class CudaBackendBackward : public ::testing::TestWithParam<Case> {};

TEST_P(CudaBackendBackward, GradientsMatchTheReference) {
  SKIP_WITHOUT_DEVICE();
  check_backward(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaBackendBackward, ::testing::ValuesIn(hand_picked_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Random, CudaBackendBackward, ::testing::ValuesIn(random_cases(48)), case_name);
INSTANTIATE_TEST_SUITE_P(SmallSharedMemory, CudaBackendBackward, ::testing::ValuesIn(small_smem_cases()), case_name);

// The sm_90 key-block backward's conditions (64-key tiles, K and V in {64, 128}, bf16 / fp16) across G (a step of 64
// rows holds 64 / G tokens, or a chunk of a token's heads), partial last blocks, varlen batches with empty
// sequences, windows, block_counts and given indices; each case also runs on the sm_80 kernels.
std::vector<Case> sm90_backward_cases() {
  std::vector<Case> cases = {
      make_case("sm90bwd_G16_bf16_K128", DType::BF16, 1, 517, 32, 2, 128, 128, 64, 4, kSeed),
      make_case("sm90bwd_G1_bf16_K64_window", DType::BF16, 2, 300, 3, 3, 64, 64, 64, 3, kPaper, {}, 100),
      make_case("sm90bwd_G2_f16_K128_varlen", DType::F16, 1, 0, 4, 2, 128, 128, 64, 3, kSeed, {130, 0, 64, 1, 257}),
      make_case("sm90bwd_G3_bf16_K64_paper", DType::BF16, 1, 450, 3, 1, 64, 64, 64, 5, kPaper),
      make_case("sm90bwd_G5_f16_K64_window", DType::F16, 1, 333, 10, 2, 64, 64, 64, 2, kSeed, {}, 70),
      make_case("sm90bwd_G32_bf16_K128_window", DType::BF16, 1, 260, 32, 1, 128, 128, 64, 3, kPaper, {}, 64),
      make_case("sm90bwd_G80_bf16_K64", DType::BF16, 1, 140, 80, 1, 64, 64, 64, 2, kSeed),
      // K != V (the rows of one operand one box, of the other two).
      make_case("sm90bwd_G4_bf16_K64_V128_window", DType::BF16, 1, 300, 8, 2, 64, 128, 64, 3, kSeed, {}, 64),
      make_case("sm90bwd_G16_f16_K128_V64_varlen", DType::F16, 1, 0, 16, 1, 128, 64, 64, 4, kSeed, {200, 0, 77, 130}),
      // The NSA paper's heads: K = 192 (three boxes of Q and K, 24 chunks a row), V = 128.
      make_case("sm90bwd_G8_f16_K192_V128_varlen_window", DType::F16, 1, 0, 16, 2, 192, 128, 64, 3, kSeed,
                {190, 0, 66, 300}, 50),
      // 32-key tiles stay on the mma.sync kernel: at K = V = 128 three stages of rows on an H100, two on an A100
      // (the _sm80 twins reckon as one; with 64-key tiles above, two with P^T in dS), two for the paper's heads.
      make_case("sm90bwd_G4_bf16_K128_BS32_window", DType::BF16, 1, 300, 8, 2, 128, 128, 32, 4, kSeed, {}, 40),
      make_case("sm90bwd_G16_bf16_K192_V128_BS32_window", DType::BF16, 1, 300, 16, 1, 192, 128, 32, 4, kSeed, {}, 40),
      [] {
        Case c = make_case("sm90bwd_G16_f16_K64_counts_varlen", DType::F16, 1, 0, 16, 1, 64, 64, 64, 4, kSeed,
                           {200, 0, 77, 130});
        c.with_counts = true;
        return c;
      }(),
      [] {
        Case c = make_case("sm90bwd_G4_bf16_K128_given", DType::BF16, 1, 0, 8, 2, 128, 128, 64, 3, kSeed, {190, 65});
        c.given_indices = true;
        return c;
      }()};
  for (size_t i = 0, n = cases.size(); i < n; ++i) {
    Case c = cases[i];
    c.name += "_sm80";
    c.sm90_kernels = false;
    cases.push_back(c);
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(Sm90KeyBlocks, CudaBackendBackward, ::testing::ValuesIn(sm90_backward_cases()), case_name);

// With `do`, a row sample does not narrow the run: the backward needs every forward row (as the reference's).
TEST(CudaBackend, BackwardIgnoresARowSample) {
  SKIP_WITHOUT_DEVICE();
  ProblemSpec s;
  s.T = 70;
  s.HQ = 4;
  s.K = s.V = 16;
  s.config.block_size = 16;
  s.config.block_count = 2;
  s.with_do = true;
  const Problem p = rounded(test::random_problem(s), DType::F32);
  RunOptions run;
  run.backward = true;
  run.rows = {3, 40};
  const Outputs out = make_cuda_backend()->run(p, run);
  EXPECT_TRUE(out.has_grads);
  EXPECT_TRUE(out.rows.empty());
  EXPECT_EQ(out.o.size(), std::size_t(s.T * s.HQ * s.V));
  EXPECT_EQ(out.dq.size(), std::size_t(s.T * s.HQ * s.K));
  // Without asking for the backward, the problem's `do` is ignored.
  run.backward = false;
  const Outputs fwd = make_cuda_backend()->run(p, run);
  EXPECT_FALSE(fwd.has_grads);
  EXPECT_TRUE(fwd.dq.empty());
  EXPECT_EQ(fwd.rows, run.rows);
}

}  // namespace
}  // namespace nsa
