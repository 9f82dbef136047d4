// Suites: the case list, the manifest, case selection (filter, shard) and stripping stored outputs.
#include "verify/suite.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "core/errors.h"
#include "verify/generator.h"

namespace nsa::suite {
namespace {

namespace fs = std::filesystem;

// A scratch directory removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("nsa_suite_test_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name) << text;
    return (path / name).string();
  }
};

std::vector<std::string> names(const std::vector<SuiteCase>& cases) {
  std::vector<std::string> out;
  for (const SuiteCase& c : cases) out.push_back(c.name);
  return out;
}

std::vector<SuiteCase> make_cases(std::initializer_list<const char*> list) {
  std::vector<SuiteCase> cases;
  for (const char* n : list) cases.push_back({n, std::string(n) + ".safetensors", ""});
  return cases;
}

TEST(CaseList, ParsesNamesAndFlagsSkippingCommentsAndBlankLines) {
  TempDir dir;
  const std::string path = dir.write("cases.txt",
                                     "# the suite\n"
                                     "\n"
                                     "fixed_g1:  --seqlen 100 --heads-q 2 --heads-kv 2\n"
                                     "  varlen-empty: --varlen 5,0,7 --dtype f16  \n");
  const std::vector<CaseLine> cases = read_case_list(path);
  ASSERT_EQ(cases.size(), 2u);
  EXPECT_EQ(cases[0].name, "fixed_g1");
  EXPECT_EQ(cases[0].args, (std::vector<std::string>{"--seqlen", "100", "--heads-q", "2", "--heads-kv", "2"}));
  EXPECT_EQ(cases[1].name, "varlen-empty");
  EXPECT_EQ(cases[1].args_text, "--varlen 5,0,7 --dtype f16");
}

TEST(CaseList, RejectsMalformedLinesRepeatedNamesAndMissingFiles) {
  TempDir dir;
  EXPECT_THROW(read_case_list(dir.write("a.txt", "no colon here\n")), InputError);
  EXPECT_THROW(read_case_list(dir.write("b.txt", "x: --seqlen 3\nx: --seqlen 4\n")), InputError);
  EXPECT_THROW(read_case_list(dir.write("c.txt", "Bad Name: --seqlen 3\n")), InputError);
  EXPECT_THROW(read_case_list(dir.write("d.txt", "# only a comment\n")), InputError);
  EXPECT_THROW(read_case_list((dir.path / "absent.txt").string()), InputError);
  try {
    read_case_list(dir.write("e.txt", "ok: --seqlen 3\nbroken\n"));
    FAIL() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
}

TEST(Filter, SubstringWildcardAndCommaSeparatedPatterns) {
  const auto cases = make_cases({"fixed_g1", "fixed_g16", "varlen_empty", "bhtd_layout"});
  EXPECT_EQ(names(filter_cases(cases, "")), names(cases));
  EXPECT_EQ(names(filter_cases(cases, "g1")), (std::vector<std::string>{"fixed_g1", "fixed_g16"}));
  EXPECT_EQ(names(filter_cases(cases, "fixed_g1")), (std::vector<std::string>{"fixed_g1", "fixed_g16"}));
  EXPECT_EQ(names(filter_cases(cases, "*_g1")), (std::vector<std::string>{"fixed_g1"}));  // wildcards match the whole name
  EXPECT_EQ(names(filter_cases(cases, "varlen*,bhtd")), (std::vector<std::string>{"varlen_empty", "bhtd_layout"}));
  EXPECT_TRUE(filter_cases(cases, "nothing").empty());
}

TEST(Shard, ParsesIOverNAndRejectsBadText) {
  const Shard s = parse_shard("2/5");
  EXPECT_EQ(s.index, 2);
  EXPECT_EQ(s.count, 5);
  for (const char* bad : {"", "3", "5/5", "-1/4", "1/0", "a/b", "1/4x", "1//4"}) EXPECT_THROW(parse_shard(bad), InputError) << bad;
}

TEST(Shard, ShardsPartitionTheSuite) {
  const auto cases = make_cases({"a", "b", "c", "d", "e", "f", "g"});
  std::multiset<std::string> seen;
  for (int64_t i = 0; i < 3; ++i) {
    const auto part = shard_cases(cases, {i, 3});
    EXPECT_GE(part.size(), 2u);
    for (const SuiteCase& c : part) seen.insert(c.name);
  }
  EXPECT_EQ(seen, (std::multiset<std::string>{"a", "b", "c", "d", "e", "f", "g"}));
  EXPECT_EQ(names(shard_cases(cases, {1, 3})), (std::vector<std::string>{"b", "e"}));
}

TEST(Manifest, EntryDescribesTheProblemAndReadsBack) {
  TempDir dir;
  gen::GenSpec spec;
  spec.varlen = std::vector<int64_t>{9, 0, 30};
  spec.heads_q = 6, spec.heads_kv = 2, spec.dim_k = 16, spec.dim_v = 8, spec.dtype = DType::F16;
  spec.config.block_size = 16, spec.config.block_count = 2, spec.config.window = 4;
  spec.block_counts = true, spec.with_grads = true, spec.gate_swa = false;
  const Problem p = gen::generate_problem(spec);
  const std::vector<uint8_t> bytes = serialize_safetensors(problem_to_file(p));
  const nlohmann::json e = manifest_entry("v", "golden/v.safetensors", "--varlen 9,0,30", p, bytes);
  EXPECT_EQ(e["T"], 39);
  EXPECT_EQ(e["G"], 3);
  EXPECT_EQ(e["K"], 16);
  EXPECT_EQ(e["V"], 8);
  EXPECT_EQ(e["dtype"], "f16");
  EXPECT_EQ(e["window"], 4);
  EXPECT_EQ(e["varlen"], (std::vector<int64_t>{9, 0, 30}));
  EXPECT_EQ(e["gates"], (std::vector<std::string>{"cmp", "slc"}));
  EXPECT_EQ(e["block_counts"], true);
  EXPECT_EQ(e["given_indices"], false);
  EXPECT_EQ(e["with_grads"], true);
  EXPECT_EQ(e["bytes"], bytes.size());
  EXPECT_EQ(e["fnv1a64"], hex64(gen::fnv1a64(bytes.data(), bytes.size())));

  const std::string path = dir.write("manifest.json", make_manifest({e}).dump(2));
  const std::vector<SuiteCase> cases = read_manifest(path);
  ASSERT_EQ(cases.size(), 1u);
  EXPECT_EQ(cases[0].name, "v");
  EXPECT_EQ(fs::path(cases[0].path), dir.path / "golden" / "v.safetensors");
  EXPECT_EQ(cases[0].expected_fnv1a64, e["fnv1a64"]);
  EXPECT_EQ(manifest_path(dir.path.string()), path);
}

TEST(Manifest, RejectsMalformedManifests) {
  TempDir dir;
  EXPECT_THROW(read_manifest(dir.write("a.json", "{not json")), InputError);
  EXPECT_THROW(read_manifest(dir.write("b.json", "{\"cases\": 3}")), InputError);
  EXPECT_THROW(read_manifest(dir.write("c.json", "{\"cases\": [{\"name\": \"x\"}]}")), InputError);
  EXPECT_THROW(read_manifest(dir.write("d.json", R"({"cases": [{"name": "x", "file": "a"}, {"name": "x", "file": "b"}]})")),
               InputError);
  EXPECT_THROW(manifest_path((dir.path / "nowhere").string()), InputError);
}

TEST(InputsOnly, StripsStoredOutputsButKeepsGivenIndices) {
  SafetensorsFile f;
  const Tensor x = Tensor::from_f64({1, 2}, {2}, DType::F32);
  for (const char* n : {"q", "k", "v", "do", "g_cmp", "cu_seqlens", "k_cmp", "o", "lse_cmp", "dq", "dk_cmp", "block_indices"})
    f.set(n, x);
  EXPECT_TRUE(has_outputs(f));
  const SafetensorsFile stripped = inputs_only(f);
  std::vector<std::string> kept;
  for (const auto& [name, t] : stripped.tensors) kept.push_back(name);
  EXPECT_EQ(std::set<std::string>(kept.begin(), kept.end()),
            (std::set<std::string>{"q", "k", "v", "do", "g_cmp", "cu_seqlens"}));
  EXPECT_FALSE(has_outputs(stripped));

  f.metadata["nsa.given_indices"] = "1";
  EXPECT_TRUE(inputs_only(f).has("block_indices"));
  EXPECT_FALSE(inputs_only(f).has("o"));
}

TEST(TakeInputs, MovesTheInputsOutAndLeavesTheStoredOutputs) {
  SafetensorsFile f;
  const Tensor x = Tensor::from_f64({1, 2}, {2}, DType::F32);
  for (const char* n : {"q", "k", "v", "cu_seqlens", "o", "lse_cmp", "block_indices"}) f.set(n, x);
  f.metadata["nsa.given_indices"] = "1";
  const SafetensorsFile taken = take_inputs(f);
  std::set<std::string> in, left;
  for (const auto& [name, t] : taken.tensors) in.insert(name);
  for (const auto& [name, t] : f.tensors) left.insert(name);
  EXPECT_EQ(in, (std::set<std::string>{"q", "k", "v", "cu_seqlens", "block_indices"}));
  // Given indices are both an input and the stored selection; the outputs and metadata stay behind.
  EXPECT_EQ(left, (std::set<std::string>{"o", "lse_cmp", "block_indices"}));
  EXPECT_EQ(taken.find("q")->bytes, x.bytes);
  EXPECT_EQ(f.find("block_indices")->bytes, x.bytes);
  EXPECT_EQ(f.metadata.at("nsa.given_indices"), "1");
  EXPECT_EQ(taken.metadata.at("nsa.given_indices"), "1");
  EXPECT_TRUE(has_outputs(f));
}

// The committed suite and its case list agree: every listed case has a manifest entry and a file whose bytes
// match the manifest's checksum.
TEST(GoldenSuite, ManifestMatchesCaseListAndFiles) {
  const fs::path root = NSA_SOURCE_DIR;
  const std::vector<CaseLine> listed = read_case_list((root / "fixtures" / "cases.txt").string());
  const std::vector<SuiteCase> cases = read_manifest((root / "fixtures" / "manifest.json").string());
  ASSERT_EQ(cases.size(), listed.size());
  uint64_t total_bytes = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(cases[i].name, listed[i].name);
    std::ifstream in(cases[i].path, std::ios::binary);
    ASSERT_TRUE(in) << cases[i].path;
    const std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    total_bytes += bytes.size();
    EXPECT_EQ(hex64(gen::fnv1a64(bytes.data(), bytes.size())), cases[i].expected_fnv1a64) << cases[i].name;
  }
  EXPECT_LT(total_bytes, 20u << 20);  // the suite stays small
}

}  // namespace
}  // namespace nsa::suite
