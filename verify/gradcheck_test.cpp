// gradcheck: the reference's gradients pass on the issue's shapes, and deliberately wrong gradients fail.
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "core/errors.h"
#include "reference/reference.h"
#include "reference/test_util.h"
#include "verify/gradcheck.h"

namespace nsa {
namespace {

using test::ProblemSpec;

ProblemSpec spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t BS, int64_t S, int64_t W = 0) {
  ProblemSpec s;
  s.T = T, s.HQ = HQ, s.H = H, s.K = K, s.V = V;
  s.config.block_size = BS, s.config.block_count = S, s.config.window = W;
  s.gate_cmp = s.gate_slc = s.gate_swa = true;
  s.with_do = true;
  return s;
}

Problem with_block_counts(Problem p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Dims& d = p.layout.dims;
  std::vector<int32_t> counts(d.B * d.T * d.H);
  for (int32_t& c : counts) c = int32_t(rng() % (p.layout.S() + 1));
  p.block_counts = counts;
  return p;
}

// The shapes the issue lists: varlen with an empty sequence, G = 1, G = 5, K != V, T not a multiple of BS,
// W > 0, block_counts; both policies.
std::vector<Problem> issue_shapes() {
  std::vector<Problem> v;
  ProblemSpec varlen = spec(0, 4, 2, 8, 8, 8, 3);
  varlen.lengths = {13, 0, 27};
  v.push_back(test::random_problem(varlen));
  v.push_back(test::random_problem(spec(37, 2, 2, 8, 8, 8, 3)));  // G = 1, T % BS != 0
  v.push_back(test::random_problem(spec(24, 5, 1, 6, 6, 4, 3)));  // G = 5
  v.push_back(test::random_problem(spec(30, 3, 1, 12, 5, 8, 2)));  // K != V
  v.push_back(test::random_problem(spec(33, 4, 2, 8, 8, 8, 3, 5)));  // W > 0
  v.push_back(with_block_counts(test::random_problem(spec(40, 4, 1, 8, 8, 8, 4, 3)), 3));
  ProblemSpec paper = spec(35, 4, 2, 8, 8, 4, 4);
  paper.B = 2;
  paper.config.policy = Policy::Paper;
  v.push_back(test::random_problem(paper));
  return v;
}

// The reference's outputs with one gradient altered.
class AlteredBackend : public Backend {
 public:
  explicit AlteredBackend(std::function<void(Outputs&)> alter) : alter_(std::move(alter)) {}
  std::string name() const override { return "altered"; }
  Outputs run(const Problem& p, const RunOptions& opt) override {
    Outputs out = ref::run_reference(p, opt);
    alter_(out);
    return out;
  }

 private:
  std::function<void(Outputs&)> alter_;
};

const GradcheckInput& input_named(const GradcheckReport& r, const std::string& name) {
  for (const GradcheckInput& in : r.inputs)
    if (in.name == name) return in;
  throw std::runtime_error("no input " + name);
}

TEST(Gradcheck, ReferencePassesOnEveryIssueShapeInRandomDirections) {
  ref::ReferenceBackend cpu;
  GradcheckOptions opt;
  opt.directions = 2;
  for (const Problem& p : issue_shapes()) {
    const GradcheckReport r = gradcheck(p, cpu, opt);
    ASSERT_EQ(r.inputs.size(), 6u);
    for (const GradcheckInput& in : r.inputs) {
      EXPECT_EQ(in.checks, 2);
      EXPECT_LE(in.max_rel_error, 1e-7) << in.name << " T=" << p.layout.dims.T;
    }
    EXPECT_TRUE(r.pass);
  }
}

TEST(Gradcheck, ReferencePassesElementwiseOnTinyShapes) {
  ref::ReferenceBackend cpu;
  GradcheckOptions opt;
  opt.elementwise = true;
  ProblemSpec varlen = spec(0, 3, 1, 3, 2, 2, 2, 2);  // G = 3, K != V, W > 0, varlen with an empty sequence
  varlen.lengths = {5, 0, 6};
  for (const Problem& p : {test::random_problem(varlen), with_block_counts(test::random_problem(spec(9, 2, 2, 2, 3, 4, 2)), 7)}) {
    const GradcheckReport r = gradcheck(p, cpu, opt);
    EXPECT_EQ(input_named(r, "q").checks, int64_t(p.q.size()));
    EXPECT_EQ(input_named(r, "v").checks, int64_t(p.v.size()));
    for (const GradcheckInput& in : r.inputs) EXPECT_LE(in.max_rel_error, 1e-7) << in.name;
    EXPECT_TRUE(r.pass);
  }
}

TEST(Gradcheck, SlightlyWrongValueGradientFails) {
  AlteredBackend wrong([](Outputs& o) {
    for (double& x : o.dv) x *= 1.0001;
  });
  const GradcheckReport r = gradcheck(issue_shapes()[2], wrong, GradcheckOptions{});
  EXPECT_FALSE(r.pass);
  EXPECT_FALSE(input_named(r, "v").pass);
  EXPECT_GT(input_named(r, "v").max_rel_error, 5e-5);
  EXPECT_TRUE(input_named(r, "q").pass);
  EXPECT_TRUE(input_named(r, "k").pass);
}

TEST(Gradcheck, OneWrongElementFailsElementwise) {
  AlteredBackend wrong([](Outputs& o) { o.dk[5] += 1e-4; });
  GradcheckOptions opt;
  opt.elementwise = true;
  const GradcheckReport r = gradcheck(test::random_problem(spec(9, 2, 1, 2, 2, 2, 2)), wrong, opt);
  const GradcheckInput& k = input_named(r, "k");
  EXPECT_FALSE(k.pass);
  EXPECT_EQ(k.worst_where, "element 5");
  EXPECT_TRUE(input_named(r, "q").pass);
}

TEST(Gradcheck, MissingGateGradientFails) {
  AlteredBackend wrong([](Outputs& o) { o.dg_slc.clear(); });
  const GradcheckReport r = gradcheck(issue_shapes()[1], wrong, GradcheckOptions{});
  EXPECT_FALSE(input_named(r, "g_slc").pass);
  EXPECT_FALSE(r.pass);
}

TEST(Gradcheck, ChecksOnlyTheGatesPresent) {
  ProblemSpec s = spec(12, 2, 1, 4, 4, 4, 2);
  s.gate_swa = false;
  s.gate_cmp = false;
  ref::ReferenceBackend cpu;
  const GradcheckReport r = gradcheck(test::random_problem(s), cpu, GradcheckOptions{});
  std::vector<std::string> names;
  for (const GradcheckInput& in : r.inputs) names.push_back(in.name);
  EXPECT_EQ(names, (std::vector<std::string>{"q", "k", "v", "g_slc"}));
}

TEST(Gradcheck, FreezesTheReferenceSelectionAndKeepsAGivenOne) {
  const Problem p = test::random_problem(spec(20, 4, 2, 4, 4, 4, 2));
  const Problem frozen = freeze_block_indices(p);
  ASSERT_TRUE(frozen.block_indices.has_value());
  EXPECT_EQ(*frozen.block_indices, ref::run_reference(p).block_indices);
  Problem given = p;
  given.block_indices = std::vector<int32_t>(20 * 2 * 2, -1);
  EXPECT_EQ(*freeze_block_indices(given).block_indices, *given.block_indices);
}

TEST(Gradcheck, ProblemWithoutUpstreamGradientIsAnInputError) {
  ProblemSpec s = spec(8, 2, 1, 4, 4, 4, 2);
  s.with_do = false;
  ref::ReferenceBackend cpu;
  EXPECT_THROW(gradcheck(test::random_problem(s), cpu, GradcheckOptions{}), InputError);
}

TEST(Gradcheck, BackendWithoutGradientsIsAnInputError) {
  AlteredBackend forward_only([](Outputs& o) { o.has_grads = false; });
  EXPECT_THROW(gradcheck(test::random_problem(spec(8, 2, 1, 4, 4, 4, 2)), forward_only, GradcheckOptions{}), InputError);
}

TEST(Gradcheck, JsonListsEveryInput) {
  ref::ReferenceBackend cpu;
  GradcheckReport r = gradcheck(test::random_problem(spec(10, 2, 1, 4, 4, 4, 2)), cpu, GradcheckOptions{});
  r.case_name = "tiny";
  const nlohmann::json j = gradcheck_json({r});
  EXPECT_TRUE(j["pass"].get<bool>());
  ASSERT_EQ(j["cases"].size(), 1u);
  EXPECT_EQ(j["cases"][0]["case"], "tiny");
  EXPECT_EQ(j["cases"][0]["inputs"].size(), r.inputs.size());
  EXPECT_EQ(j["cases"][0]["inputs"][0]["input"], "q");
}

}  // namespace
}  // namespace nsa
