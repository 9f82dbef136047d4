#include "verify/suite.h"

#include <fnmatch.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "verify/generator.h"

#ifndef NSA_TOOL_VERSION
#define NSA_TOOL_VERSION "unknown"
#endif

namespace nsa::suite {

namespace fs = std::filesystem;

namespace {

const char* const kOutputNames[] = {"k_cmp", "v_cmp", "o_cmp", "lse_cmp", "block_indices", "o_slc", "lse_slc",
                                    "o_swa", "lse_swa", "o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa",
                                    "dk_cmp", "dv_cmp"};

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r") - b + 1);
}

}  // namespace

std::string hex64(uint64_t value) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)value);
  return buf;
}

std::vector<CaseLine> read_case_list(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail_input(path, "", "cannot open the case list");
  std::vector<CaseLine> cases;
  std::set<std::string> names;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    line = trim(line);
    if (line.empty() || line[0] == '#') continue;
    const auto colon = line.find(':');
    const std::string where = "line " + std::to_string(number) + ": ";
    if (colon == std::string::npos) fail_input(path, "", where + "expected 'name: gen flags'");
    CaseLine c;
    c.name = trim(line.substr(0, colon));
    c.args_text = trim(line.substr(colon + 1));
    if (c.name.empty() || c.name.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_-.") != std::string::npos)
      fail_input(path, "", where + "case name '" + c.name + "' must be lowercase letters, digits, '_', '-' or '.'");
    if (!names.insert(c.name).second) fail_input(path, "", where + "case '" + c.name + "' is defined twice");
    std::istringstream words(c.args_text);
    for (std::string w; words >> w;) c.args.push_back(w);
    cases.push_back(std::move(c));
  }
  if (cases.empty()) fail_input(path, "", "no cases");
  return cases;
}

nlohmann::json manifest_entry(const std::string& name, const std::string& relative_file, const std::string& gen_args,
                              const Problem& p, const std::vector<uint8_t>& file_bytes) {
  const Dims& d = p.layout.dims;
  const Config& c = p.layout.config;
  nlohmann::json e;
  e["name"] = name;
  e["file"] = relative_file;
  e["gen_args"] = gen_args;
  e["fnv1a64"] = hex64(gen::fnv1a64(file_bytes.data(), file_bytes.size()));
  e["bytes"] = file_bytes.size();
  e["B"] = d.B, e["T"] = d.T, e["HQ"] = d.HQ, e["H"] = d.H, e["G"] = d.G(), e["K"] = d.K, e["V"] = d.V;
  e["dtype"] = dtype_flag(p.input_dtype);
  e["layout"] = p.head_first ? "bhtd" : "bthd";
  e["policy"] = policy_name(c.policy);
  e["block_size"] = c.block_size, e["block_count"] = c.block_count, e["window"] = c.window;
  if (p.layout.varlen) {
    std::vector<int64_t> lengths;
    for (const Sequence& s : p.layout.sequences) lengths.push_back(s.length);
    e["varlen"] = lengths;
  } else {
    e["varlen"] = nullptr;
  }
  std::vector<std::string> gates;
  if (p.g_cmp) gates.push_back("cmp");
  if (p.g_slc) gates.push_back("slc");
  if (p.g_swa) gates.push_back("swa");
  e["gates"] = gates;
  e["block_counts"] = p.block_counts.has_value();
  e["given_indices"] = p.block_indices.has_value();
  e["with_grads"] = p.has_backward();
  return e;
}

nlohmann::json make_manifest(const std::vector<nlohmann::json>& entries) {
  nlohmann::json m;
  m["format"] = 1;
  m["generator"] = gen::kGeneratorName;
  m["tool_version"] = NSA_TOOL_VERSION;
  m["cases"] = entries;
  return m;
}

std::vector<SuiteCase> read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail_input(path, "", "cannot open the manifest");
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail_input(path, "", std::string("not valid JSON: ") + e.what());
  }
  if (!m.is_object() || !m.contains("cases") || !m["cases"].is_array())
    fail_input(path, "", "expected an object with a \"cases\" array");
  const fs::path dir = fs::path(path).parent_path();
  std::vector<SuiteCase> cases;
  std::set<std::string> names;
  for (const auto& e : m["cases"]) {
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("file") || !e["file"].is_string())
      fail_input(path, "", "every case needs string fields \"name\" and \"file\"");
    SuiteCase c;
    c.name = e["name"].get<std::string>();
    if (!names.insert(c.name).second) fail_input(path, "", "case '" + c.name + "' appears twice");
    const fs::path file = e["file"].get<std::string>();
    c.path = (file.is_absolute() ? file : dir / file).string();
    if (e.contains("fnv1a64") && e["fnv1a64"].is_string()) c.expected_fnv1a64 = e["fnv1a64"].get<std::string>();
    cases.push_back(std::move(c));
  }
  return cases;
}

std::vector<SuiteCase> cases_from_files(const std::vector<std::string>& paths) {
  std::vector<SuiteCase> cases;
  for (const std::string& p : paths) cases.push_back({fs::path(p).stem().string(), p, ""});
  return cases;
}

std::vector<SuiteCase> filter_cases(const std::vector<SuiteCase>& cases, const std::string& filter) {
  std::vector<std::string> patterns;
  std::stringstream ss(filter);
  for (std::string p; std::getline(ss, p, ',');)
    if (!trim(p).empty()) patterns.push_back(trim(p));
  if (patterns.empty()) return cases;
  std::vector<SuiteCase> kept;
  for (const SuiteCase& c : cases)
    for (const std::string& p : patterns) {
      const bool wildcard = p.find_first_of("*?[") != std::string::npos;
      if (wildcard ? fnmatch(p.c_str(), c.name.c_str(), 0) == 0 : c.name.find(p) != std::string::npos) {
        kept.push_back(c);
        break;
      }
    }
  return kept;
}

Shard parse_shard(const std::string& text) {
  const auto slash = text.find('/');
  Shard s;
  try {
    std::size_t used_i = 0, used_n = 0;
    if (slash == std::string::npos) throw std::invalid_argument("no slash");
    s.index = std::stoll(text.substr(0, slash), &used_i);
    s.count = std::stoll(text.substr(slash + 1), &used_n);
    if (used_i != slash || used_n != text.size() - slash - 1) throw std::invalid_argument("trailing text");
  } catch (const std::exception&) {
    throw InputError("--shard '" + text + "': expected i/n, e.g. 0/4");
  }
  if (s.count < 1 || s.index < 0 || s.index >= s.count)
    throw InputError("--shard '" + text + "': need n >= 1 and 0 <= i < n (shards count from 0)");
  return s;
}

std::vector<SuiteCase> shard_cases(const std::vector<SuiteCase>& cases, const Shard& shard) {
  std::vector<SuiteCase> mine;
  for (std::size_t j = 0; j < cases.size(); ++j)
    if (int64_t(j) % shard.count == shard.index) mine.push_back(cases[j]);
  return mine;
}

std::string manifest_path(const std::string& suite) {
  if (!suite.empty()) {
    const fs::path given = fs::is_directory(suite) ? fs::path(suite) / "manifest.json" : fs::path(suite);
    if (!fs::exists(given)) fail_input(given.string(), "", "no such suite manifest");
    return given.string();
  }
  const fs::path here = fs::path("fixtures") / "manifest.json";
  if (fs::exists(here)) return here.string();
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path beside = exe.parent_path().parent_path() / "fixtures" / "manifest.json";
    if (fs::exists(beside)) return beside.string();
  }
  throw InputError("no golden suite found (looked for ./fixtures/manifest.json and beside the executable); "
                   "pass --suite DIR or fixture files");
}

bool has_given_indices(const SafetensorsFile& f) {
  auto it = f.metadata.find("nsa.given_indices");
  return it != f.metadata.end() && it->second == "1";
}

bool has_outputs(const SafetensorsFile& f) {
  const bool given = has_given_indices(f);
  for (const char* name : kOutputNames)
    if (f.has(name) && !(given && std::string(name) == "block_indices")) return true;
  return false;
}

namespace {

// Whether block_indices is an input: the metadata says so, or it is the file's only output-named tensor (a
// user's input file that gives the selection).
bool indices_are_input(const SafetensorsFile& f) {
  bool other_outputs = false;
  for (const char* name : kOutputNames)
    other_outputs = other_outputs || (f.has(name) && std::string(name) != "block_indices");
  return has_given_indices(f) || !other_outputs;
}

bool is_input(const std::string& name, bool indices_input) {
  if (name == "block_indices") return indices_input;
  for (const char* o : kOutputNames)
    if (name == o) return false;
  return true;
}

}  // namespace

SafetensorsFile inputs_only(const SafetensorsFile& f) {
  const bool indices_input = indices_are_input(f);
  SafetensorsFile out;
  out.metadata = f.metadata;
  for (const auto& [name, t] : f.tensors)
    if (is_input(name, indices_input)) out.tensors.emplace_back(name, t);
  return out;
}

SafetensorsFile take_inputs(SafetensorsFile& f) {
  const bool indices_input = indices_are_input(f);
  SafetensorsFile out;
  out.metadata = f.metadata;
  std::vector<std::pair<std::string, Tensor>> rest;
  for (auto& [name, t] : f.tensors) {
    if (!is_input(name, indices_input)) {
      rest.emplace_back(name, std::move(t));
    } else if (name == "block_indices") {  // given indices are also the stored selection: both keep them
      out.tensors.emplace_back(name, t);
      rest.emplace_back(name, std::move(t));
    } else {
      out.tensors.emplace_back(name, std::move(t));
    }
  }
  f.tensors = std::move(rest);
  return out;
}

}  // namespace nsa::suite
