// The fixture generator: Philox against the published Random123 known answers, the documented mapping pinned
// to checksums computed by an independent implementation (scripts/philox_reference.py), and the properties
// of the generated inputs.
#include "verify/generator.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "core/errors.h"

namespace nsa::gen {
namespace {

// Random123's kat_vectors, "philox4x32 10" lines: counter, key -> output.
TEST(Philox, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (Philox4x32Counter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (Philox4x32Counter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (Philox4x32Counter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

// The published FNV-1a 64 test values.
TEST(Fnv1a64, MatchesPublishedValues) {
  EXPECT_EQ(fnv1a64("", 0), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a64("foobar", 6), 0x85944171f73967e8ull);
}

TEST(RandomWord, IsWordNmod4OfPhiloxBlockNdiv4) {
  const uint64_t seed = 0x0123456789abcdefull, stream = stream_id("q");
  const Philox4x32Counter block = philox4x32_10({5, 0, uint32_t(stream), uint32_t(stream >> 32)}, {0x89abcdef, 0x01234567});
  for (int w = 0; w < 4; ++w) EXPECT_EQ(random_word(seed, stream, 20 + w), block[w]);
}

GenSpec pinned_spec(DType dtype) {
  GenSpec s;
  s.batch = 1, s.seqlen = 21, s.heads_q = 4, s.heads_kv = 2, s.dim_k = 8, s.dim_v = 6;
  s.dtype = dtype;
  s.seed = 20261126;
  s.with_grads = true;
  s.config.block_size = 8, s.config.block_count = 3;
  return s;
}

std::string checksum(const SafetensorsFile& f, const std::string& name) {
  const Tensor* t = f.find(name);
  if (!t) return "missing";
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)fnv1a64(t->bytes.data(), t->bytes.size()));
  return buf;
}

// Expected values printed by `python3 scripts/philox_reference.py`, a separate implementation of the mapping
// documented in generator.h.
TEST(Generator, PinnedSeedGivesPinnedChecksumsInFloat32) {
  const SafetensorsFile f = problem_to_file(generate_problem(pinned_spec(DType::F32)));
  EXPECT_EQ(checksum(f, "q"), "1e338735e1b11898");
  EXPECT_EQ(checksum(f, "k"), "c5256b5f6cc5f1cc");
  EXPECT_EQ(checksum(f, "v"), "748814f5f08136f0");
  EXPECT_EQ(checksum(f, "do"), "658dd0566ed61272");
  EXPECT_EQ(checksum(f, "g_cmp"), "ab6670892cff7531");
  EXPECT_EQ(checksum(f, "g_swa"), "983dbd8c528ddc4b");
}

TEST(Generator, PinnedSeedGivesPinnedChecksumsInBfloat16) {
  const SafetensorsFile f = problem_to_file(generate_problem(pinned_spec(DType::BF16)));
  EXPECT_EQ(checksum(f, "q"), "126df864915d62e3");
  EXPECT_EQ(checksum(f, "k"), "df59f4a21c1e6bf5");
  EXPECT_EQ(checksum(f, "v"), "a5e53c5400cec5ff");
  EXPECT_EQ(checksum(f, "do"), "002c4d766f9ecaf3");
  EXPECT_EQ(checksum(f, "g_cmp"), "718cd8fc7a07a985");
  EXPECT_EQ(checksum(f, "g_swa"), "be284d0768324afa");
}

TEST(Generator, PinnedFirstNormalsAndBlockCounts) {
  const uint64_t seed = 20261126, q = stream_id("q");
  EXPECT_EQ(normal_sample(seed, q, 0), -0.191461563f);
  EXPECT_EQ(normal_sample(seed, q, 1), -1.11125779f);
  EXPECT_EQ(normal_sample(seed, q, 2), 0.712236285f);
  EXPECT_EQ(normal_sample(seed, q, 3), 1.42370343f);
  GenSpec s = pinned_spec(DType::F32);
  s.block_counts = true;
  const Problem p = generate_problem(s);
  const std::vector<int32_t> expected = {2, 2, 0, 2, 0, 2, 2, 1, 1, 2, 3, 1, 2, 0, 0, 1, 3, 3, 2, 3, 1,
                                         3, 3, 3, 0, 2, 3, 1, 1, 1, 0, 0, 2, 2, 1, 2, 3, 1, 2, 1, 1, 0};
  ASSERT_TRUE(p.block_counts.has_value());
  EXPECT_EQ(*p.block_counts, expected);
}

TEST(Generator, NormalsHaveUnitMomentsAndGatesLieInOpenUnitInterval) {
  const uint64_t stream = stream_id("moments");
  const int n = 200000;
  double sum = 0, sq = 0;
  for (int i = 0; i < n; ++i) {
    const double z = normal_sample(7, stream, i);
    ASSERT_TRUE(std::isfinite(z));
    sum += z, sq += z * z;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);  // ~4.5 standard errors
  EXPECT_NEAR(sq / n, 1.0, 0.015);
  for (int i = 0; i < 10000; ++i) {
    const float g = gate_sample(7, stream, i);
    ASSERT_GT(g, 0.0f);
    ASSERT_LT(g, 1.0f);
  }
}

TEST(Generator, InputsAreRoundedToTheFixtureDtype) {
  GenSpec s = pinned_spec(DType::F16);
  const Problem p = generate_problem(s);
  for (double x : p.q) ASSERT_EQ(x, round_to(DType::F16, x));
  for (double x : *p.g_slc) ASSERT_EQ(x, round_to(DType::F16, x));
  // f64 fixtures hold the float32 samples widened, so every dtype derives from the same float32 draw.
  s.dtype = DType::F64;
  const Problem wide = generate_problem(s);
  s.dtype = DType::F32;
  const Problem narrow = generate_problem(s);
  EXPECT_EQ(wide.q, narrow.q);
}

TEST(Generator, SameSeedSameBytesOtherSeedOtherBytes) {
  GenSpec s = pinned_spec(DType::BF16);
  s.given_indices = true, s.block_counts = true;
  const auto a = serialize_safetensors(problem_to_file(generate_problem(s)));
  const auto b = serialize_safetensors(problem_to_file(generate_problem(s)));
  EXPECT_EQ(a, b);
  s.seed += 1;
  const auto c = serialize_safetensors(problem_to_file(generate_problem(s)));
  EXPECT_NE(a, c);
}

TEST(Generator, HeadFirstFileHoldsTheSameProblemTransposed) {
  GenSpec s = pinned_spec(DType::F32);
  s.given_indices = true;
  const Problem token_major = generate_problem(s);
  s.head_first = true;
  const SafetensorsFile file = problem_to_file(generate_problem(s));
  EXPECT_EQ(file.metadata.at("nsa.layout"), "bhtd");
  EXPECT_EQ(file.find("q")->shape, (Shape{1, 4, 21, 8}));
  const Problem loaded = load_problem(file, "bhtd");
  EXPECT_EQ(loaded.q, token_major.q);
  EXPECT_EQ(loaded.v, token_major.v);
  EXPECT_EQ(*loaded.g_cmp, *token_major.g_cmp);
  EXPECT_EQ(*loaded.block_indices, *token_major.block_indices);
}

TEST(Generator, GivenIndicesAreValidAndExerciseSkippedFutureBlocks) {
  GenSpec s;
  s.varlen = std::vector<int64_t>{40, 0, 7, 100};
  s.heads_q = 4, s.heads_kv = 2, s.dim_k = 8, s.dim_v = 8, s.seed = 3;
  s.config.block_size = 16, s.config.block_count = 4;
  s.given_indices = true;
  const Problem p = generate_problem(s);
  EXPECT_EQ(p.metadata.at("nsa.given_indices"), "1");
  const Layout& L = p.layout;
  ASSERT_TRUE(p.block_indices.has_value());
  int future_entries = 0;
  for (const Sequence& seq : L.sequences) {
    const int64_t nb = ceil_div(seq.length, 16);
    for (int64_t t = 0; t < seq.length; ++t)
      for (int64_t h = 0; h < 2; ++h) {
        const int32_t* row = p.block_indices->data() + ((seq.start + t) * 2 + h) * 4;
        const int64_t pool = std::min<int64_t>(t / 16 + 2, nb), m = std::min<int64_t>(4, pool);
        std::set<int32_t> seen;
        for (int64_t j = 0; j < 4; ++j) {
          if (j < m) {
            ASSERT_GE(row[j], 0);
            ASSERT_LT(row[j], pool);
            ASSERT_TRUE(seen.insert(row[j]).second) << "duplicate block at token " << seq.start + t;
            future_entries += row[j] * 16 > t;
          } else {
            ASSERT_EQ(row[j], -1);
          }
        }
      }
  }
  EXPECT_GT(future_entries, 0);
  // The file written from it loads back: load_problem's own validation accepts the indices.
  EXPECT_NO_THROW(load_problem(problem_to_file(p), "given"));
}

TEST(Generator, MetadataNamesGeneratorSeedAndConfiguration) {
  GenSpec s = pinned_spec(DType::BF16);
  s.config.window = 5;
  s.config.policy = Policy::Paper;
  const SafetensorsFile f = problem_to_file(generate_problem(s));
  EXPECT_EQ(f.metadata.at("nsa.format"), "1");
  EXPECT_EQ(f.metadata.at("nsa.seed"), "20261126");
  EXPECT_EQ(f.metadata.at("nsa.generator"), "philox4x32-10/box-muller");
  EXPECT_EQ(f.metadata.at("nsa.block_size"), "8");
  EXPECT_EQ(f.metadata.at("nsa.block_count"), "3");
  EXPECT_EQ(f.metadata.at("nsa.window_size"), "5");
  EXPECT_EQ(f.metadata.at("nsa.policy"), "paper");
  EXPECT_EQ(std::stod(f.metadata.at("nsa.scale")), 1.0 / std::sqrt(8.0));
  EXPECT_FALSE(f.metadata.at("nsa.tool_version").empty());
  EXPECT_EQ(f.metadata.count("nsa.given_indices"), 0u);
}

TEST(Generator, GateSelectionAndVarlenShapes) {
  GenSpec s;
  s.varlen = std::vector<int64_t>{5, 0, 20};
  s.heads_q = 2, s.heads_kv = 1, s.dim_k = 4, s.dim_v = 3;
  s.gate_swa = false;
  const SafetensorsFile f = problem_to_file(generate_problem(s));
  EXPECT_TRUE(f.has("g_cmp"));
  EXPECT_TRUE(f.has("g_slc"));
  EXPECT_FALSE(f.has("g_swa"));
  EXPECT_FALSE(f.has("do"));
  EXPECT_EQ(f.find("q")->shape, (Shape{1, 25, 2, 4}));
  EXPECT_EQ(f.find("cu_seqlens")->to_i64(), (std::vector<int64_t>{0, 5, 5, 25}));
}

TEST(Generator, RejectsInvalidSpecsWithInputError) {
  GenSpec s;
  s.heads_q = 6, s.heads_kv = 4;
  EXPECT_THROW(generate_problem(s), InputError);
  s = GenSpec{};
  s.varlen = std::vector<int64_t>{3, 4};
  s.batch = 2;
  EXPECT_THROW(generate_problem(s), InputError);
  s.batch = 1;
  s.varlen = std::vector<int64_t>{3, -1};
  EXPECT_THROW(generate_problem(s), InputError);
  s = GenSpec{};
  s.config.block_size = 0;
  EXPECT_THROW(generate_problem(s), InputError);
  EXPECT_THROW(find_preset("no-such-preset"), InputError);
}

TEST(SampleRows, DistinctSortedInRangeAndDeterministic) {
  const std::vector<int64_t> rows = sample_rows(65536, 1024, 11);
  ASSERT_EQ(rows.size(), 1024u);
  for (std::size_t i = 1; i < rows.size(); ++i) ASSERT_LT(rows[i - 1], rows[i]);
  EXPECT_GE(rows.front(), 0);
  EXPECT_LT(rows.back(), 65536);
  EXPECT_EQ(rows, sample_rows(65536, 1024, 11));
  EXPECT_NE(rows, sample_rows(65536, 1024, 12));
  EXPECT_EQ(sample_rows(5, 9, 1), (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

}  // namespace
}  // namespace nsa::gen
