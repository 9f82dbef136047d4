// nsa-verify gen: make a deterministic fixture (inputs, optionally the float64 reference outputs), or the whole
// golden suite from a case list.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <omp.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/cli/commands.h"
#include "verify/generator.h"
#include "verify/suite.h"

namespace nsa::cli {
namespace {

namespace fs = std::filesystem;

// Every flag that describes one fixture; unset ones fall back to the preset, then to GenSpec's defaults.
struct GenFlags {
  std::optional<std::string> preset;
  ShapeFlags shape;
  std::optional<std::string> dtype;
  uint64_t seed = 0;
  bool with_grads = false, no_gates = false, block_counts = false, given_indices = false;
  std::vector<std::string> gates;
  std::string layout = "bthd";
  ConfigOverrides config;
  bool reference = false;
  std::string out_dtype = "f32";
};

struct GenArgs {
  GenFlags flags;
  std::string output;
  std::string cases, out_dir;
  int threads = 0;
};

void bind_fixture_flags(CLI::App& cmd, GenFlags& f) {
  std::vector<std::string> names;
  for (const gen::Preset& p : gen::presets()) names.push_back(p.name);
  cmd.add_option("--preset", f.preset, "start from a named shape + configuration (see the footer)")->check(CLI::IsMember(names));
  add_shape_flags(cmd, f.shape, gen::GenSpec{});
  cmd.add_option("--dtype", f.dtype, "input dtype (default bf16)")->check(CLI::IsMember({"f64", "f32", "f16", "bf16"}));
  cmd.add_option("--seed", f.seed, "generator seed (default 0)");
  cmd.add_flag("--with-grads", f.with_grads, "add the upstream gradient `do` (the backward is then computed)");
  auto* no_gates = cmd.add_flag("--no-gates", f.no_gates, "no gate tensors (o is then 0)");
  cmd.add_option("--gates", f.gates, "gates to include, e.g. cmp,slc (default: cmp,slc,swa)")
      ->delimiter(',')
      ->check(CLI::IsMember({"cmp", "slc", "swa"}))
      ->excludes(no_gates);
  cmd.add_flag("--block-counts", f.block_counts, "random per-query block counts in [0, S]");
  cmd.add_flag("--given-indices", f.given_indices, "random valid block_indices as an input (top-k is skipped)");
  cmd.add_option("--layout", f.layout, "tensor layout in the file (default bthd)")->check(CLI::IsMember({"bthd", "bhtd"}));
  add_config_flags(cmd, f.config);
  cmd.add_flag("--reference", f.reference, "also compute and store the float64 reference outputs");
  cmd.add_option("--out-dtype", f.out_dtype, "dtype of the stored reference outputs (default f32)")
      ->check(CLI::IsMember({"f32", "f64"}));
}

gen::GenSpec spec_from(const GenFlags& f) {
  gen::GenSpec s = f.preset ? gen::find_preset(*f.preset).spec : gen::GenSpec{};
  f.shape.apply(s);
  if (f.dtype) s.dtype = dtype_from_flag(*f.dtype);
  s.seed = f.seed;
  s.with_grads = f.with_grads;
  if (f.no_gates || !f.gates.empty()) {
    auto has = [&](const char* g) { return std::find(f.gates.begin(), f.gates.end(), g) != f.gates.end(); };
    s.gate_cmp = has("cmp"), s.gate_slc = has("slc"), s.gate_swa = has("swa");
  }
  s.block_counts = f.block_counts;
  s.given_indices = f.given_indices;
  s.head_first = f.layout == "bhtd";
  apply_config_flags(s.config, f.config);
  return s;
}

std::string describe(const Problem& p) {
  const Dims& d = p.layout.dims;
  const Config& c = p.layout.config;
  std::string s = "B=" + std::to_string(d.B) + " T=" + std::to_string(d.T) + " HQ=" + std::to_string(d.HQ) +
                  " H=" + std::to_string(d.H) + " K=" + std::to_string(d.K) + " V=" + std::to_string(d.V) + " " +
                  dtype_flag(p.input_dtype) + " BS=" + std::to_string(c.block_size) + " S=" +
                  std::to_string(c.block_count) + " W=" + std::to_string(c.window) + " policy=" + policy_name(c.policy);
  if (p.layout.varlen) {
    s += " varlen=";
    for (std::size_t n = 0; n < p.layout.sequences.size(); ++n)
      s += (n ? "," : "") + std::to_string(p.layout.sequences[n].length);
  }
  if (p.head_first) s += " bhtd";
  if (p.block_counts) s += " block_counts";
  if (p.block_indices) s += " given_indices";
  if (p.has_backward()) s += " grads";
  return s;
}

// The problem as a reader will see it: loaded back from the file (checks the generated file on the way).
Problem reload(const SafetensorsFile& file, const std::string& origin) {
  return load_problem(suite::inputs_only(file), origin);
}

int gen_one(const GenArgs& a) {
  if (a.output.empty()) throw InputError("gen: -o FILE is required (or --cases LIST --out-dir DIR for a suite)");
  const gen::GenSpec spec = spec_from(a.flags);
  const SafetensorsFile file =
      gen::generate_fixture(spec, a.flags.reference, dtype_from_flag(a.flags.out_dtype), a.threads);
  write_safetensors(a.output, file);
  std::printf("gen: %s seed=%llu -> %s (%zu tensors%s)\n", describe(reload(file, a.output)).c_str(),
              (unsigned long long)spec.seed, a.output.c_str(), file.tensors.size(),
              a.flags.reference ? ", with f64 reference outputs" : "");
  return 0;
}

// Generates every case of the list into <out-dir>/golden/ and writes <out-dir>/manifest.json.
int gen_suite(const GenArgs& a) {
  if (a.out_dir.empty()) throw InputError("gen: --cases needs --out-dir DIR");
  const std::vector<suite::CaseLine> cases = suite::read_case_list(a.cases);
  const fs::path golden = fs::path(a.out_dir) / "golden";
  fs::create_directories(golden);
  std::vector<nlohmann::json> entries;
  for (const suite::CaseLine& c : cases) {
    CLI::App parser{"case " + c.name};
    GenFlags flags;
    bind_fixture_flags(parser, flags);
    try {
      parser.parse(c.args_text, false);
    } catch (const CLI::ParseError& e) {
      fail_input(a.cases, "", "case '" + c.name + "': " + e.what());
    }
    flags.reference = true;  // a golden fixture always carries the reference outputs
    const std::string relative = "golden/" + c.name + ".safetensors";
    const std::string path = (fs::path(a.out_dir) / relative).string();
    const SafetensorsFile file = gen::generate_fixture(spec_from(flags), true, dtype_from_flag(flags.out_dtype), a.threads);
    const std::vector<uint8_t> bytes = serialize_safetensors(file);
    write_file_atomic(path, bytes);
    const Problem p = reload(file, path);
    entries.push_back(suite::manifest_entry(c.name, relative, c.args_text, p, bytes));
    std::printf("gen: %-24s %s (%zu bytes)\n", c.name.c_str(), describe(p).c_str(), bytes.size());
    std::fflush(stdout);
  }
  const std::string manifest = (fs::path(a.out_dir) / "manifest.json").string();
  const std::string text = suite::make_manifest(entries).dump(2) + "\n";
  write_file_atomic(manifest, std::vector<uint8_t>(text.begin(), text.end()));
  std::printf("gen: %zu cases -> %s\n", cases.size(), manifest.c_str());
  return 0;
}

}  // namespace

void setup_gen(CLI::App& app) {
  auto args = std::make_shared<GenArgs>();
  CLI::App* cmd = app.add_subcommand("gen", "make a deterministic fixture (Philox4x32-10 + Box-Muller; see verify/generator.h)");
  std::string footer =
      "Examples:\n"
      "  nsa-verify gen --seqlen 300 --heads-q 16 --heads-kv 1 --dim-k 64 --dim-v 64 --dtype bf16 --with-grads -o case.safetensors\n"
      "  nsa-verify gen --varlen 100,0,257 --block-size 32 --window 64 --policy paper --reference -o varlen.safetensors\n"
      "  nsa-verify gen --preset long-64k --seed 1 -o long.safetensors\n"
      "  nsa-verify gen --cases fixtures/cases.txt --out-dir fixtures      (regenerates the golden suite)\n"
      "Presets:\n";
  for (const gen::Preset& p : gen::presets()) footer += "  " + p.name + ": " + p.description + "\n";
  cmd->footer(footer);
  bind_fixture_flags(*cmd, args->flags);
  cmd->add_option("-o,--output", args->output, "output fixture (safetensors), written atomically");
  cmd->add_option("--cases", args->cases, "generate every case of this list (`name: gen flags` per line)");
  cmd->add_option("--out-dir", args->out_dir, "with --cases: writes DIR/golden/<name>.safetensors and DIR/manifest.json");
  cmd->add_option("--threads", args->threads, "CPU threads for the reference (default: all)");
  cmd->callback([args] {
    if (args->threads > 0) omp_set_num_threads(args->threads);
    g_exit_code = args->cases.empty() ? gen_one(*args) : gen_suite(*args);
  });
}

}  // namespace nsa::cli
