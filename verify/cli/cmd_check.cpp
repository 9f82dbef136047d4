// nsa-verify check: compare a candidate's outputs with the float64 reference, stage by stage (nsa-spec §5.1–§5.4).
#include <cmath>
#include <iostream>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/check.h"
#include "verify/cli/commands.h"
#include "verify/generator.h"
#include "verify/suite.h"

namespace nsa::cli {
namespace {

struct CheckArgs {
  std::string expected, actual, json, junit;
  std::optional<double> rtol;
  bool baseline_relative = false;
  double baseline_factor = 2.0;
  int64_t sample_rows = 0;
  uint64_t seed = 0;
  int threads = 0;
  bool allow_nonfinite = false;
  ConfigOverrides overrides;
};

void write_text(const std::string& path, const std::string& text) {
  write_file_atomic(path, std::vector<uint8_t>(text.begin(), text.end()));
}

// The candidate must have been computed with the configuration in use: a mismatch would otherwise show up as
// a wrong stage.
void require_same_config(const SafetensorsFile& actual, const std::string& origin, const Config& c) {
  auto differs = [&](const char* key, const std::string& mine) {
    auto it = actual.metadata.find(key);
    if (it == actual.metadata.end()) return;
    bool same = it->second == mine;
    if (!same && std::string(key) == "nsa.scale") {
      try {
        same = std::fabs(std::stod(it->second) - c.scale) <= 1e-12 * std::fabs(c.scale);
      } catch (const std::exception&) {
      }
    }
    if (!same)
      fail_input(origin, "", "metadata " + std::string(key) + " = " + it->second + " differs from the configuration in use (" +
                                 mine + "); pass the matching config flag");
  };
  differs("nsa.block_size", std::to_string(c.block_size));
  differs("nsa.block_count", std::to_string(c.block_count));
  differs("nsa.window_size", std::to_string(c.window));
  differs("nsa.policy", policy_name(c.policy));
  differs("nsa.scale", std::to_string(c.scale));
}

int run_check(const CheckArgs& a) {
  const SafetensorsFile expected_file = read_safetensors(a.expected);
  const SafetensorsFile actual_file = read_safetensors(a.actual);
  // The expected file may hold reference outputs; the reference is recomputed, so only its inputs count.
  // Row-sampled: q is widened for the rows the sample's forward reads only (Problem::q_rows).
  std::vector<int64_t> sample;
  Problem p = load_problem(suite::inputs_only(expected_file), a.expected, a.overrides, a.allow_nonfinite,
                           a.sample_rows > 0 ? sampled_q_rows(a.sample_rows, a.seed, sample) : nullptr);
  p.q_stored = Tensor{};  // no backend runs here: the check reads the widened q rows only
  require_same_config(actual_file, a.actual, p.layout.config);

  // The candidate's file may use the other layout; only the layout matters for reading its outputs.
  Problem shape_only;
  shape_only.layout = p.layout;
  auto layout = actual_file.metadata.find("nsa.layout");
  shape_only.head_first = layout != actual_file.metadata.end() && layout->second == "bhtd";
  const Outputs candidate = outputs_from_file(actual_file, shape_only, a.actual);

  // The candidate's precision: what `run` recorded (a backend may compute f64 inputs in f32), else that of the
  // inputs it computed from.
  const Tensor* q = actual_file.find("q");
  DType candidate_dtype = q && is_float(q->dtype) ? q->dtype : p.input_dtype;
  if (auto it = actual_file.metadata.find("nsa.compute_dtype"); it != actual_file.metadata.end()) {
    try {
      candidate_dtype = dtype_from_flag(it->second);
    } catch (const std::invalid_argument& e) {
      fail_input(a.actual, "", std::string("metadata nsa.compute_dtype: ") + e.what());
    }
  }

  CheckOptions opt;
  opt.rtol_override = a.rtol;
  opt.baseline_relative = a.baseline_relative;
  opt.baseline_factor = a.baseline_factor;
  opt.threads = a.threads;
  if (a.sample_rows > 0) opt.rows = sample_mask(sample, p.layout.dims.B * p.layout.dims.T);
  CheckReport report = check_candidate(p, candidate, candidate_dtype, opt);
  report.case_name = a.actual;
  print_report(std::cout, report);
  if (!a.json.empty()) write_text(a.json, report_json({report}).dump(2) + "\n");
  if (!a.junit.empty()) write_text(a.junit, report_junit({report}, "nsa-verify check"));
  return report.pass ? 0 : 1;
}

}  // namespace

void setup_check(CLI::App& app) {
  auto args = std::make_shared<CheckArgs>();
  CLI::App* cmd = app.add_subcommand("check", "compare a candidate's outputs with the float64 reference, stage by stage");
  cmd->footer(
      "The reference is recomputed from the inputs in --expected; each stage is checked on the candidate's own\n"
      "upstream outputs, and the first failing stage is named. block_indices are checked by the tie-aware rule.\n"
      "Exit status: 0 every check passes, 1 a comparison failed, 2 bad input.\n"
      "Examples:\n"
      "  nsa-verify run --backend cuda -i case.safetensors -o out.safetensors\n"
      "  nsa-verify check --expected case.safetensors --actual out.safetensors --junit check.xml\n"
      "  nsa-verify check --expected case.safetensors --actual out.safetensors --baseline-relative\n"
      "  nsa-verify check --expected long.safetensors --actual out.safetensors --sample-rows 256 --seed 7 --json check.json");
  cmd->add_option("--expected", args->expected, "fixture with the inputs (stored outputs in it are ignored)")->required();
  cmd->add_option("--actual", args->actual, "the candidate's outputs, as `nsa-verify run` writes them")->required();
  cmd->add_option("--json", args->json, "write every metric as JSON to this file");
  cmd->add_option("--junit", args->junit, "write a JUnit XML report to this file");
  cmd->add_option("--rtol", args->rtol, "one rel-L2 tolerance for every tensor (default by the candidate's dtype: f64 1e-12, f32 1e-5, f16 2e-3, bf16 1.6e-2)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--baseline-relative", args->baseline_relative,
                "pass when the error is at most --baseline-factor times that of the reference run in the candidate's dtype");
  cmd->add_option("--baseline-factor", args->baseline_factor, "factor of the baseline-relative rule (default 2)")->check(CLI::PositiveNumber);
  cmd->add_option("--sample-rows", args->sample_rows, "compare only N random query rows, forward tensors only")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "seed of the row sample (default 0)");
  cmd->add_option("--threads", args->threads, "CPU threads (default: all)");
  cmd->add_flag("--allow-nonfinite", args->allow_nonfinite, "accept NaN/Inf in the inputs");
  add_config_flags(*cmd, args->overrides);
  cmd->callback([args] { g_exit_code = run_check(*args); });
}

}  // namespace nsa::cli
