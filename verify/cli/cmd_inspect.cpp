// nsa-verify inspect: what a fixture holds — metadata, every tensor's shape, dtype, statistics, NaN/Inf counts
// and checksum (FNV-1a 64 of the tensor's raw little-endian bytes; of the whole file on the first line).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "verify/cli/commands.h"
#include "verify/generator.h"
#include "verify/suite.h"

namespace nsa::cli {
namespace {

struct InspectArgs {
  std::vector<std::string> files;
  std::string json;
};

struct TensorStats {
  double min = 0, max = 0, mean = 0;
  int64_t nan = 0, inf = 0;
};

// Statistics over the finite values (min = max = mean = 0 when there are none).
TensorStats stats_of(const Tensor& t) {
  TensorStats s;
  const std::vector<double> values = is_float(t.dtype) ? t.to_f64() : [&] {
    const std::vector<int64_t> ints = t.to_i64();
    return std::vector<double>(ints.begin(), ints.end());
  }();
  double sum = 0;
  int64_t finite = 0;
  s.min = std::numeric_limits<double>::infinity();
  s.max = -s.min;
  for (double x : values) {
    if (std::isnan(x)) ++s.nan;
    else if (std::isinf(x)) ++s.inf;
    else {
      s.min = std::min(s.min, x);
      s.max = std::max(s.max, x);
      sum += x;
      ++finite;
    }
  }
  if (finite == 0) s.min = s.max = 0;
  s.mean = finite ? sum / double(finite) : 0;
  return s;
}

nlohmann::json inspect_file(const std::string& path) {
  const std::vector<uint8_t> bytes = read_file_bytes(path);
  const SafetensorsFile f = parse_safetensors(bytes.data(), bytes.size(), path);

  nlohmann::json j;
  j["file"] = path;
  j["bytes"] = bytes.size();
  j["fnv1a64"] = suite::hex64(gen::fnv1a64(bytes.data(), bytes.size()));
  j["metadata"] = f.metadata;
  std::printf("%s: %zu bytes, %zu tensors, fnv1a64 %s\n", path.c_str(), bytes.size(), f.tensors.size(),
              j["fnv1a64"].get<std::string>().c_str());
  for (const auto& [key, value] : f.metadata) std::printf("  %-26s %s\n", key.c_str(), value.c_str());

  // The problem it describes, when it is one (a plain safetensors file is still inspected).
  try {
    const Problem p = load_problem(suite::inputs_only(f), path, {}, /*allow_nonfinite=*/true);
    const Dims& d = p.layout.dims;
    const Config& c = p.layout.config;
    std::printf("  problem: B=%lld T=%lld HQ=%lld H=%lld G=%lld K=%lld V=%lld BS=%lld S=%lld W=%lld scale=%.17g policy=%s%s%s\n",
                (long long)d.B, (long long)d.T, (long long)d.HQ, (long long)d.H, (long long)d.G(), (long long)d.K,
                (long long)d.V, (long long)c.block_size, (long long)c.block_count, (long long)c.window, c.scale,
                policy_name(c.policy), p.layout.varlen ? " varlen" : "", p.has_backward() ? " backward" : "");
    j["problem"] = {{"B", d.B}, {"T", d.T}, {"HQ", d.HQ}, {"H", d.H}, {"K", d.K}, {"V", d.V}, {"varlen", p.layout.varlen}};
  } catch (const InputError& e) {
    std::printf("  not a loadable NSA problem: %s\n", e.what());
    j["problem_error"] = e.what();
  }

  std::printf("  %-14s %-5s %-22s %13s %13s %13s %6s %6s  %s\n", "tensor", "dtype", "shape", "min", "max", "mean", "nan",
              "inf", "fnv1a64");
  j["tensors"] = nlohmann::json::array();
  for (const auto& [name, t] : f.tensors) {
    const TensorStats s = stats_of(t);
    const std::string checksum = suite::hex64(gen::fnv1a64(t.bytes.data(), t.bytes.size()));
    std::printf("  %-14s %-5s %-22s %13.6g %13.6g %13.6g %6lld %6lld  %s\n", name.c_str(), dtype_flag(t.dtype),
                shape_str(t.shape).c_str(), s.min, s.max, s.mean, (long long)s.nan, (long long)s.inf, checksum.c_str());
    j["tensors"].push_back({{"name", name}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"min", s.min},
                            {"max", s.max}, {"mean", s.mean}, {"nan", s.nan}, {"inf", s.inf}, {"fnv1a64", checksum}});
  }
  return j;
}

int run_inspect(const InspectArgs& a) {
  nlohmann::json all = nlohmann::json::array();
  for (const std::string& path : a.files) all.push_back(inspect_file(path));
  if (!a.json.empty()) {
    const std::string text = all.dump(2) + "\n";
    write_file_atomic(a.json, std::vector<uint8_t>(text.begin(), text.end()));
  }
  return 0;
}

}  // namespace

void setup_inspect(CLI::App& app) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand("inspect", "print a fixture's metadata, tensors (shape, dtype, min/max/mean, NaN/Inf) and checksums");
  cmd->footer(
      "Checksums are FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3) of the raw bytes: of the\n"
      "whole file on its first line, of each tensor's data in the table.\n"
      "Examples:\n"
      "  nsa-verify inspect case.safetensors\n"
      "  nsa-verify inspect fixtures/golden/*.safetensors --json inspect.json");
  cmd->add_option("files", args->files, "fixture files (safetensors)")->required();
  cmd->add_option("--json", args->json, "also write everything as JSON to this file");
  cmd->callback([args] { g_exit_code = run_inspect(*args); });
}

}  // namespace nsa::cli
