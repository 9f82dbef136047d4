// nsa-verify gradcheck: a backend's analytic gradients against float64 central differences of the reference,
// with the block selection frozen, on a fixture, a named small shape, or shape flags.
#include <cstdio>
#include <iostream>
#include <omp.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/backends.h"
#include "verify/cli/commands.h"
#include "verify/generator.h"
#include "verify/gradcheck.h"

namespace nsa::cli {
namespace {

struct GradcheckArgs {
  std::string input;
  std::string backend = "cpu";
  std::string preset;
  ShapeFlags shape;
  bool block_counts = false;
  ConfigOverrides overrides;
  bool elementwise = false;
  uint64_t seed = 0;
  double step = 1e-5;
  int directions = 3;
  std::optional<double> bound;
  std::string json;
  int threads = 0;
};

struct NamedShape {
  const char* name;
  const char* description;
  gen::GenSpec spec;
};

gen::GenSpec small_spec(int64_t T, int64_t HQ, int64_t H, int64_t K, int64_t V, int64_t BS, int64_t S, int64_t W = 0) {
  gen::GenSpec s;
  s.seqlen = T, s.heads_q = HQ, s.heads_kv = H, s.dim_k = K, s.dim_v = V;
  s.config.block_size = BS, s.config.block_count = S, s.config.window = W;
  s.dtype = DType::F64;
  s.with_grads = true;
  return s;
}

// The shapes the issue asks for, each small enough (T <= 40) for an elementwise check.
const std::vector<NamedShape>& shapes() {
  static const std::vector<NamedShape> all = [] {
    std::vector<NamedShape> v;
    gen::GenSpec varlen = small_spec(0, 4, 2, 8, 8, 8, 3);
    varlen.varlen = std::vector<int64_t>{13, 0, 27};
    v.push_back({"varlen", "varlen 13,0,27 (an empty sequence), G=2, BS=8, S=3", varlen});
    v.push_back({"g1", "G=1 (HQ=H=2), T=37 not a multiple of BS=8, S=3", small_spec(37, 2, 2, 8, 8, 8, 3)});
    v.push_back({"g5", "G=5, T=24, BS=4, S=3", small_spec(24, 5, 1, 6, 6, 4, 3)});
    v.push_back({"kv", "K=12 != V=5, G=3, T=30, BS=8, S=2", small_spec(30, 3, 1, 12, 5, 8, 2)});
    v.push_back({"window", "sliding window W=5, G=2, T=33, BS=8, S=3", small_spec(33, 4, 2, 8, 8, 8, 3, 5)});
    gen::GenSpec counts = small_spec(40, 4, 1, 8, 8, 8, 4, 3);
    counts.block_counts = true;
    v.push_back({"counts", "per-query block_counts, G=4, T=40, BS=8, S=4, W=3", counts});
    gen::GenSpec paper = small_spec(35, 4, 2, 8, 8, 4, 4);
    paper.config.policy = Policy::Paper;
    paper.batch = 2;
    v.push_back({"paper", "paper policy, B=2, T=35, BS=4, S=4", paper});
    return v;
  }();
  return all;
}

bool has_shape_flags(const GradcheckArgs& a) {
  return a.shape.any() || a.block_counts;
}

// Shape flags over a small default (T=40, HQ=4, H=2, K=8, V=8, BS=8, S=3), all gates, float64 inputs.
gen::GenSpec flag_defaults() { return small_spec(40, 4, 2, 8, 8, 8, 3); }

gen::GenSpec spec_from_flags(const GradcheckArgs& a) {
  gen::GenSpec s = flag_defaults();
  a.shape.apply(s);
  s.block_counts = a.block_counts;
  return s;
}

struct NamedProblem {
  std::string name;
  Problem problem;
};

std::vector<NamedProblem> problems_from(const GradcheckArgs& a) {
  std::vector<NamedProblem> out;
  if (!a.input.empty()) {
    if (!a.preset.empty() || has_shape_flags(a)) throw InputError("gradcheck: -i FILE excludes --preset and shape flags");
    Problem p = load_problem(read_safetensors(a.input), a.input, a.overrides);
    if (!p.has_backward()) {
      // A fixture without `do`: draw one from the generator's "do" stream with --seed.
      const Dims& d = p.layout.dims;
      std::vector<double> d_o(d.B * d.T * d.HQ * d.V);
      for (std::size_t i = 0; i < d_o.size(); ++i) d_o[i] = gen::normal_sample(a.seed, gen::stream_id("do"), i);
      p.d_o = std::move(d_o);
    }
    out.push_back({a.input, std::move(p)});
    return out;
  }
  auto make = [&](const std::string& name, gen::GenSpec s) {
    apply_config_flags(s.config, a.overrides);
    s.seed = a.seed;
    out.push_back({name, gen::generate_problem(s)});
  };
  if (has_shape_flags(a)) {
    if (!a.preset.empty()) throw InputError("gradcheck: --preset excludes shape flags");
    make("custom", spec_from_flags(a));
    return out;
  }
  for (const NamedShape& s : shapes())
    if (a.preset.empty() || a.preset == "all" || a.preset == s.name) make(s.name, s.spec);
  return out;
}

void write_text(const std::string& path, const std::string& text) {
  write_file_atomic(path, std::vector<uint8_t>(text.begin(), text.end()));
}

int run_gradcheck(const GradcheckArgs& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  if (!(a.step > 0)) throw InputError("gradcheck: --step must be positive");
  if (a.directions < 1) throw InputError("gradcheck: --directions must be at least 1");
  auto backend = make_backend(a.backend);
  GradcheckOptions opt;
  opt.step = a.step;
  opt.elementwise = a.elementwise;
  opt.directions = a.directions;
  opt.seed = a.seed;
  opt.bound = a.bound ? *a.bound : default_gradcheck_bound(a.backend);
  std::vector<GradcheckReport> reports;
  bool pass = true;
  for (NamedProblem& np : problems_from(a)) {
    GradcheckReport r = gradcheck(np.problem, *backend, opt);
    r.case_name = np.name;
    print_gradcheck(std::cout, r);
    pass = pass && r.pass;
    reports.push_back(std::move(r));
  }
  std::cout << "gradcheck: " << reports.size() << (reports.size() == 1 ? " case, " : " cases, ")
            << (pass ? "all inputs within bound" : "FAILED") << std::endl;
  if (!a.json.empty()) write_text(a.json, gradcheck_json(reports).dump(2) + "\n");
  return pass ? 0 : 1;
}

}  // namespace

void setup_gradcheck(CLI::App& app) {
  auto args = std::make_shared<GradcheckArgs>();
  CLI::App* cmd = app.add_subcommand(
      "gradcheck", "check a backend's gradients of q, k, v and the gates against float64 finite differences");
  std::string footer =
      "Loss sum(do * o), block selection frozen. Per input: the max relative error of the analytic gradient against "
      "central differences (random unit directions, or every element with --elementwise); PASS when at most the "
      "bound (default 1e-7 for cpu, 1e-3 for other backends).\n"
      "Examples:\n"
      "  nsa-verify gradcheck                            (every named shape below, random directions)\n"
      "  nsa-verify gradcheck --preset g5 --elementwise\n"
      "  nsa-verify gradcheck --varlen 9,0,20 --heads-q 6 --heads-kv 2 --dim-k 8 --dim-v 4 --block-size 4 --window 3\n"
      "  nsa-verify gradcheck -i case.safetensors --backend cuda --json grad.json\n"
      "Named shapes (--preset; 'all' = every one, the default):\n";
  std::vector<std::string> names{"all"};
  for (const NamedShape& s : shapes()) {
    footer += std::string("  ") + s.name + ": " + s.description + "\n";
    names.push_back(s.name);
  }
  cmd->footer(footer);
  cmd->add_option("-i,--input", args->input, "fixture to check (a random `do` from --seed is added when it has none)");
  cmd->add_option("--backend", args->backend, "backend whose gradients are checked: cpu or cuda");
  cmd->add_option("--preset", args->preset, "named small shape (see below)")->check(CLI::IsMember(names));
  add_shape_flags(*cmd, args->shape, flag_defaults());
  cmd->add_flag("--block-counts", args->block_counts, "random per-query block counts in [0, S]");
  add_config_flags(*cmd, args->overrides);
  cmd->add_flag("--elementwise", args->elementwise, "difference every element (tiny shapes) instead of random directions");
  cmd->add_option("--directions", args->directions, "random directions per input (default 3)");
  cmd->add_option("--step", args->step, "finite-difference step h (default 1e-5)");
  cmd->add_option("--bound", args->bound, "pass bound on the max relative error (default 1e-7 cpu, 1e-3 otherwise)");
  cmd->add_option("--seed", args->seed, "seed of the inputs and the directions (default 0)");
  cmd->add_option("--json", args->json, "write the per-input errors as JSON to this file");
  cmd->add_option("--threads", args->threads, "CPU threads (default: all)");
  cmd->callback([args] { g_exit_code = run_gradcheck(*args); });
}

}  // namespace nsa::cli
