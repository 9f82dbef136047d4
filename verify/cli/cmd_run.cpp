// nsa-verify run: compute every stage of a backend on a fixture's inputs and write all outputs.
#include <cstdio>
#include <omp.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/backends.h"
#include "verify/suite.h"
#include "verify/cli/commands.h"

namespace nsa::cli {
namespace {

struct RunArgs {
  std::string backend = "cpu";
  std::string input, output;
  std::string out_dtype = "f32";
  int threads = 0;
  bool forward_only = false;
  bool allow_nonfinite = false;
  ConfigOverrides overrides;
};

int run_run(const RunArgs& a) {
  const DType out_dtype = dtype_from_flag(a.out_dtype);
  SafetensorsFile in = read_safetensors(a.input);
  // A file written by an earlier run holds outputs too; only its inputs define the problem (moved out of the
  // file, and released once widened).
  const Problem p = load_problem(suite::take_inputs(in), a.input, a.overrides, a.allow_nonfinite);
  auto backend = make_backend(a.backend);
  RunOptions opt;
  opt.threads = a.threads;
  opt.backward = !a.forward_only;
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const Outputs out = backend->run(p, opt);
  SafetensorsFile file = problem_to_file(p);
  file.metadata["nsa.backend"] = a.backend;
  file.metadata["nsa.compute_dtype"] = dtype_flag(backend->compute_dtype(p.input_dtype));
  add_outputs(file, p, out, out_dtype);
  write_safetensors(a.output, file);
  const Dims& d = p.layout.dims;
  std::printf("%s: B=%lld T=%lld HQ=%lld H=%lld K=%lld V=%lld BS=%lld S=%lld W=%lld policy=%s%s -> %s (%zu tensors%s)\n",
              a.backend.c_str(), (long long)d.B, (long long)d.T, (long long)d.HQ, (long long)d.H, (long long)d.K,
              (long long)d.V, (long long)p.layout.BS(), (long long)p.layout.S(), (long long)p.layout.config.window,
              policy_name(p.layout.config.policy), p.layout.varlen ? " varlen" : "", a.output.c_str(), file.tensors.size(),
              out.has_grads ? ", with gradients" : "");
  return 0;
}

}  // namespace

void setup_run(CLI::App& app) {
  auto args = std::make_shared<RunArgs>();
  CLI::App* cmd = app.add_subcommand("run", "compute every stage of a backend on a fixture's inputs and write all outputs");
  cmd->footer(
      "Examples:\n"
      "  nsa-verify run --backend cpu -i case.safetensors -o out.safetensors\n"
      "  nsa-verify run --backend cuda -i case.safetensors -o out.safetensors --out-dtype f64 --block-size 32");
  cmd->add_option("--backend", args->backend, "backend: cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("-i,--input", args->input, "input fixture (safetensors)")->required();
  cmd->add_option("-o,--output", args->output, "output file (safetensors), written atomically")->required();
  cmd->add_option("--out-dtype", args->out_dtype, "dtype of float outputs")->check(CLI::IsMember({"f32", "f64"}));
  cmd->add_option("--threads", args->threads, "CPU threads (default: all)");
  cmd->add_flag("--forward-only", args->forward_only, "skip the backward even when the input holds `do`");
  cmd->add_flag("--allow-nonfinite", args->allow_nonfinite, "accept NaN/Inf in inputs");
  add_config_flags(*cmd, args->overrides);
  cmd->callback([args] { g_exit_code = run_run(*args); });
}

}  // namespace nsa::cli
