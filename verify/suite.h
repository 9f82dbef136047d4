// Fixture suites: the case list the golden suite is generated from, its manifest, and the selection of cases
// a verify run takes (filter, shard).
//
// fixtures/cases.txt: one case per line, `name: <nsa-verify gen flags>`; '#' starts a comment line.
// fixtures/manifest.json: written when the suite is generated, read by `nsa-verify verify`:
//   {"format": 1, "generator": ..., "tool_version": ..., "cases": [{"name", "file" (relative to the manifest),
//    "gen_args", "fnv1a64" (of the file's bytes, hex), "bytes", "B", "T", "HQ", "H", "G", "K", "V", "dtype",
//    "layout", "policy", "block_size", "block_count", "window", "varlen" (lengths or null), "gates",
//    "block_counts", "given_indices", "with_grads"}, ...]}
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/problem.h"
#include "core/safetensors.h"

namespace nsa::suite {

struct CaseLine {
  std::string name;
  std::vector<std::string> args;  // the gen flags, split on whitespace
  std::string args_text;
};
// Throws InputError naming the file and line for a malformed line or a repeated name.
std::vector<CaseLine> read_case_list(const std::string& path);

// One manifest entry describing a generated fixture.
nlohmann::json manifest_entry(const std::string& name, const std::string& relative_file, const std::string& gen_args,
                              const Problem& p, const std::vector<uint8_t>& file_bytes);
nlohmann::json make_manifest(const std::vector<nlohmann::json>& entries);

struct SuiteCase {
  std::string name;
  std::string path;  // resolved: relative to the manifest's directory, or as given
  std::string expected_fnv1a64;  // empty when unknown
};
// Reads a manifest; throws InputError for a malformed one.
std::vector<SuiteCase> read_manifest(const std::string& path);
// Cases for files given on the command line: the name is the file's stem.
std::vector<SuiteCase> cases_from_files(const std::vector<std::string>& paths);

// Keeps the cases whose name matches one of the comma-separated patterns: shell wildcards (`*`, `?`) match
// the whole name, a pattern without wildcards matches any part of it. An empty filter keeps everything.
std::vector<SuiteCase> filter_cases(const std::vector<SuiteCase>& cases, const std::string& filter);

// "--shard i/n": case j (in manifest order) belongs to shard j mod n; i counts from 0.
struct Shard {
  int64_t index = 0, count = 1;
};
Shard parse_shard(const std::string& text);  // throws InputError unless 0 <= i < n
std::vector<SuiteCase> shard_cases(const std::vector<SuiteCase>& cases, const Shard& shard);

// The manifest of a suite: `suite` is a directory holding manifest.json or the manifest itself; empty means
// the committed suite, ./fixtures/manifest.json, else <executable's dir>/../fixtures/manifest.json.
// Throws InputError when there is none.
std::string manifest_path(const std::string& suite);

// A fixture without its stored outputs, so that load_problem sees only the inputs. block_indices stays when
// it is an input: metadata nsa.given_indices = 1, or no other output tensor in the file.
SafetensorsFile inputs_only(const SafetensorsFile& fixture);
// The same, moved out of `fixture` instead of copied (a 64k-token fixture's inputs are gigabytes), which keeps
// its stored outputs and metadata (and given block_indices, which are both).
SafetensorsFile take_inputs(SafetensorsFile& fixture);
bool has_given_indices(const SafetensorsFile& fixture);
// Whether the fixture stores any reference output (k_cmp ... o, dq ...).
bool has_outputs(const SafetensorsFile& fixture);

// FNV-1a 64 as 16 lowercase hex digits.
std::string hex64(uint64_t value);

}  // namespace nsa::suite
