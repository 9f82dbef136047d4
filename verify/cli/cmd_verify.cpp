// nsa-verify verify: the CI entry. Runs a backend over a fixture suite (default: the committed golden suite)
// and checks every case against the float64 reference; optionally also checks the stored reference outputs
// against a fresh reference run, which catches a reference that drifted since the suite was generated.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <omp.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/backends.h"
#include "verify/check.h"
#include "verify/cli/commands.h"
#include "verify/generator.h"
#include "verify/suite.h"

namespace nsa::cli {
namespace {

namespace fs = std::filesystem;

struct VerifyArgs {
  std::vector<std::string> files;
  std::string suite_dir;
  std::string backend = "cpu";
  std::string filter, shard;
  std::string json, junit;
  int64_t sample_rows = 0;
  uint64_t seed = 0;
  bool check_stored = false;
  bool baseline_relative = false;
  std::optional<double> rtol;
  int threads = 0;
  bool allow_nonfinite = false;
  ConfigOverrides overrides;
};

bool any_override(const ConfigOverrides& o) { return o.block_size || o.block_count || o.window || o.scale || o.policy; }

std::vector<suite::SuiteCase> select_cases(const VerifyArgs& a) {
  std::vector<suite::SuiteCase> cases;
  if (!a.files.empty()) {
    if (!a.suite_dir.empty()) throw InputError("verify: give either --suite or fixture files, not both");
    cases = suite::cases_from_files(a.files);
  } else {
    cases = suite::read_manifest(suite::manifest_path(a.suite_dir));
  }
  cases = suite::filter_cases(cases, a.filter);
  if (!a.shard.empty()) cases = suite::shard_cases(cases, suite::parse_shard(a.shard));
  return cases;
}

std::string first_failure(const CheckReport& r) {
  if (r.topk && !r.topk->pass) return "block_indices: " + r.topk->first_problem;
  for (const TensorCheck& t : r.tensors)
    if (!t.pass) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s: rel_l2 %.3g > tol %.3g (max_abs %.3g at %s, %d non-finite)", t.name.c_str(),
                    t.rel_l2, t.tol, t.max_abs, t.worst_where.c_str(), int(t.nonfinite));
      return buf;
    }
  return "";
}

std::string pass_summary(const CheckReport& r) {
  double worst = 0;
  std::string worst_name;
  for (const TensorCheck& t : r.tensors)
    if (t.tol > 0 && t.rel_l2 / t.tol >= worst) worst = t.rel_l2 / t.tol, worst_name = t.name;
  char buf[200];
  int n = std::snprintf(buf, sizeof buf, "%zu tensors", r.tensors.size());
  if (!worst_name.empty()) n += std::snprintf(buf + n, sizeof buf - n, ", worst %s at %.2g of tol", worst_name.c_str(), worst);
  if (r.topk && r.topk->rows > 0)
    std::snprintf(buf + n, sizeof buf - n, ", top-k exact %.1f%%", 100.0 * double(r.topk->exact_rows) / double(r.topk->rows));
  return buf;
}

void print_line(const CheckReport& r, double seconds) {
  if (r.pass) std::printf("PASS  %-28s %s  (%.2f s)\n", r.case_name.c_str(), pass_summary(r).c_str(), seconds);
  else
    std::printf("FAIL  %-28s stage %s: %s  (%.2f s)\n", r.case_name.c_str(),
                r.first_failing_stage.empty() ? "?" : r.first_failing_stage.c_str(), first_failure(r).c_str(), seconds);
  std::fflush(stdout);
}

CheckReport input_error_report(const std::string& name, const std::string& message) {
  CheckReport r;
  r.case_name = name;
  r.pass = false;
  r.first_failing_stage = "input";
  TensorCheck t;
  t.name = "input";
  t.stage = "input";
  t.pass = false;
  t.worst_where = message;
  r.tensors.push_back(t);
  return r;
}

int run_verify(const VerifyArgs& a) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const std::vector<suite::SuiteCase> cases = select_cases(a);
  if (cases.empty()) throw InputError("verify: no case matches --filter '" + a.filter + "'" + (a.shard.empty() ? "" : " in shard " + a.shard));
  auto backend = make_backend(a.backend);
  CheckOptions base;
  base.rtol_override = a.rtol;
  base.baseline_relative = a.baseline_relative;
  base.threads = a.threads;
  const bool stored_check = a.check_stored && !any_override(a.overrides);
  if (a.check_stored && !stored_check)
    std::printf("note: --check-stored skipped: config flags change the problem the stored outputs were made for\n");

  std::vector<CheckReport> reports;
  int failed = 0, errors = 0;
  for (const suite::SuiteCase& c : cases) {
    const auto case_start = Clock::now();
    try {
      SafetensorsFile fixture = [&] {
        // A file without a manifest checksum is read tensor by tensor, never whole beside its tensors; one with a
        // checksum is read whole to check it, its bytes released once parsed.
        if (c.expected_fnv1a64.empty()) return read_safetensors(c.path);
        const std::vector<uint8_t> bytes = read_file_bytes(c.path);
        const std::string actual = suite::hex64(gen::fnv1a64(bytes.data(), bytes.size()));
        if (actual != c.expected_fnv1a64)
          fail_input(c.path, "", "fnv1a64 " + actual + " differs from the manifest's " + c.expected_fnv1a64 +
                                     " (fixture changed; rerun scripts/regen_fixtures.sh)");
        return parse_safetensors(bytes.data(), bytes.size(), c.path);
      }();
      // The inputs leave the fixture (its stored outputs stay for --check-stored) and are released once widened.
      // Row-sampled: q is widened for the rows the sample's forward reads only (Problem::q_rows).
      std::vector<int64_t> sample;
      Problem p = load_problem(suite::take_inputs(fixture), c.path, a.overrides, a.allow_nonfinite,
                               a.sample_rows > 0 ? sampled_q_rows(a.sample_rows, a.seed, sample) : nullptr);
      if (!backend->reads_stored_q()) p.q_stored = Tensor{};  // (all of q as stored: 1 GB at the §7 shape)
      CheckOptions opt = base;
      RunOptions run;
      run.threads = a.threads;
      if (a.sample_rows > 0) {
        run.rows = sample;
        run.backward = false;  // row sampling covers the forward (nsa-spec §5.4)
        opt.rows = sample_mask(run.rows, p.layout.dims.B * p.layout.dims.T);
      }
      const Outputs candidate = backend->run(p, run);
      CheckReport r = check_candidate(p, candidate, backend->compute_dtype(p.input_dtype), opt);
      r.case_name = c.name;
      print_line(r, std::chrono::duration<double>(Clock::now() - case_start).count());
      if (!r.pass) {
        ++failed;
        print_report(std::cout, r);
      }
      reports.push_back(std::move(r));

      if (stored_check && suite::has_outputs(fixture)) {
        const auto stored_start = Clock::now();
        const Outputs stored = outputs_from_file(fixture, p, c.path);
        const Tensor* o = fixture.find("o");
        CheckReport s = check_candidate(p, stored, o ? o->dtype : DType::F32, opt);
        s.case_name = c.name + "/stored";
        print_line(s, std::chrono::duration<double>(Clock::now() - stored_start).count());
        if (!s.pass) {
          ++failed;
          print_report(std::cout, s);
        }
        reports.push_back(std::move(s));
      }
    } catch (const InputError& e) {
      ++errors;
      std::printf("ERROR %-28s %s\n", c.name.c_str(), e.what());
      reports.push_back(input_error_report(c.name, e.what()));
    }
  }
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("verify: %zu cases, %zu checks: %zu passed, %d failed, %d bad input (backend %s%s, %.1f s)\n", cases.size(),
              reports.size(), reports.size() - failed - errors, failed, errors, a.backend.c_str(),
              a.sample_rows > 0 ? (", " + std::to_string(a.sample_rows) + " sampled rows").c_str() : "", total);
  if (!a.json.empty()) {
    const std::string text = report_json(reports).dump(2) + "\n";
    write_file_atomic(a.json, std::vector<uint8_t>(text.begin(), text.end()));
  }
  if (!a.junit.empty()) {
    const std::string text = report_junit(reports, "nsa-verify." + a.backend);
    write_file_atomic(a.junit, std::vector<uint8_t>(text.begin(), text.end()));
  }
  if (errors) return 2;
  return failed ? 1 : 0;
}

}  // namespace

void setup_verify(CLI::App& app) {
  auto args = std::make_shared<VerifyArgs>();
  CLI::App* cmd = app.add_subcommand("verify", "run a backend over a fixture suite (default: the golden suite) and check it");
  cmd->footer(
      "Exit code: 0 every case passes, 1 a check failed, 2 a fixture or flag is bad.\n"
      "Examples:\n"
      "  nsa-verify verify --backend cpu --check-stored               (the committed golden suite)\n"
      "  nsa-verify verify --backend cuda --filter 'varlen*,g16' --junit verify.xml\n"
      "  nsa-verify verify --backend cuda --shard 1/4 --json shard1.json\n"
      "  nsa-verify verify --backend cuda --sample-rows 1024 --seed 7 long.safetensors");
  cmd->add_option("files", args->files, "fixture files to verify instead of a suite");
  cmd->add_option("--suite", args->suite_dir, "suite directory holding manifest.json (default: ./fixtures)");
  cmd->add_option("--backend", args->backend, "backend: cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--filter", args->filter, "comma-separated case name patterns ('*' wildcards; plain text matches a part)");
  cmd->add_option("--shard", args->shard, "i/n: run only cases j with j mod n == i (i counts from 0)");
  cmd->add_option("--json", args->json, "write the reports as JSON");
  cmd->add_option("--junit", args->junit, "write the reports as JUnit XML");
  cmd->add_option("--sample-rows", args->sample_rows, "check the forward on N random query rows only (long sequences)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "seed of the row sample (default 0)");
  cmd->add_flag("--check-stored", args->check_stored, "also check the stored reference outputs against a fresh reference run");
  cmd->add_option("--rtol", args->rtol, "one rel-L2 tolerance for every tensor (default: by dtype)");
  cmd->add_flag("--baseline-relative", args->baseline_relative, "error at most 2x that of the reference in the candidate's dtype");
  cmd->add_option("--threads", args->threads, "CPU threads (default: all)");
  cmd->add_flag("--allow-nonfinite", args->allow_nonfinite, "accept NaN/Inf in inputs");
  add_config_flags(*cmd, args->overrides);
  cmd->callback([args] {
    if (args->threads > 0) omp_set_num_threads(args->threads);
    g_exit_code = run_verify(*args);
  });
}

}  // namespace nsa::cli
