// load_problem under bad input (nsa-spec §6): every rejection is an InputError naming the file, the tensor and
// the problem (with the expected shape for shape errors); and the head-first layout reads as the transpose.
#include "core/problem.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/errors.h"

namespace nsa {
namespace {

const char* const kOrigin = "case.safetensors";

// Distinct, finite values: 0.25 * (i + offset) with alternating sign, exact in every float dtype for small i.
std::vector<double> ramp(int64_t n, int offset = 0) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = 0.25 * double(i + offset) * ((i % 2) ? -1.0 : 1.0);
  return v;
}

Tensor floats(Shape shape, DType dtype = DType::F32, int offset = 0) {
  const int64_t n = numel(shape);
  return Tensor::from_f64(ramp(n, offset), std::move(shape), dtype);
}

// A valid fixed-length token-major problem: B=1, T=8, HQ=4, H=2, K=3, V=5, block size 4, S=2.
struct Fixture {
  int64_t B = 1, T = 8, HQ = 4, H = 2, K = 3, V = 5;
  SafetensorsFile file;
  Fixture() {
    file.metadata["nsa.block_size"] = "4";
    file.metadata["nsa.block_count"] = "2";
    file.set("q", floats({B, T, HQ, K}, DType::F32, 1));
    file.set("k", floats({B, T, H, K}, DType::F32, 2));
    file.set("v", floats({B, T, H, V}, DType::F32, 3));
  }
};

std::string load_error(const SafetensorsFile& f, const ConfigOverrides& ov = {}, bool allow_nonfinite = false) {
  try {
    load_problem(f, kOrigin, ov, allow_nonfinite);
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not an InputError: ") + e.what() + ">";
  }
  return "<loaded without error>";
}

void expect_rejected(const SafetensorsFile& f, std::initializer_list<std::string> fragments, const ConfigOverrides& ov = {},
                     bool allow_nonfinite = false) {
  const std::string msg = load_error(f, ov, allow_nonfinite);
  EXPECT_EQ(msg.rfind(std::string(kOrigin) + ": ", 0), 0u) << "message does not start with the file: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& frag : fragments) EXPECT_NE(msg.find(frag), std::string::npos) << "missing '" << frag << "' in: " << msg;
}

TEST(LoadProblem, AcceptsTheValidFixture) {
  Fixture fx;
  const Problem p = load_problem(fx.file, kOrigin);
  EXPECT_EQ(p.layout.dims.B, 1);
  EXPECT_EQ(p.layout.dims.T, 8);
  EXPECT_EQ(p.layout.dims.HQ, 4);
  EXPECT_EQ(p.layout.dims.H, 2);
  EXPECT_EQ(p.layout.dims.G(), 2);
  EXPECT_EQ(p.layout.dims.K, 3);
  EXPECT_EQ(p.layout.dims.V, 5);
  EXPECT_EQ(p.layout.BS(), 4);
  EXPECT_EQ(p.layout.S(), 2);
  EXPECT_EQ(p.layout.chunks, 2);
  EXPECT_DOUBLE_EQ(p.layout.scale(), 1.0 / std::sqrt(3.0));
  EXPECT_EQ(p.input_dtype, DType::F32);
  EXPECT_EQ(p.q, ramp(1 * 8 * 4 * 3, 1));
  EXPECT_FALSE(p.has_backward());
  EXPECT_FALSE(p.layout.varlen);
}

TEST(LoadProblem, RejectsMissingInputs) {
  for (const char* name : {"q", "k", "v"}) {
    Fixture fx;
    fx.file.tensors.erase(std::find_if(fx.file.tensors.begin(), fx.file.tensors.end(),
                                       [&](const auto& e) { return e.first == name; }));
    expect_rejected(fx.file, {std::string("tensor '") + name + "'", "required tensor is missing"});
  }
}

TEST(LoadProblem, RejectsWrongRank) {
  Fixture fx;
  fx.file.set("q", floats({1, 8, 12}));
  expect_rejected(fx.file, {"tensor 'q'", "expected 4 dimensions, got shape [1, 8, 12]"});
  Fixture fk;
  fk.file.set("k", floats({1, 8, 2, 3, 1}));
  expect_rejected(fk.file, {"tensor 'k'", "expected 4 dimensions"});
  Fixture fv;
  fv.file.set("v", floats({}));
  expect_rejected(fv.file, {"tensor 'v'", "expected 4 dimensions, got shape []"});
}

TEST(LoadProblem, RejectsDtypeMismatches) {
  Fixture fk;
  fk.file.set("k", floats({1, 8, 2, 3}, DType::F16));
  expect_rejected(fk.file, {"tensor 'k'", "dtype differs from q's F32"});
  Fixture fv;
  fv.file.set("v", floats({1, 8, 2, 5}, DType::BF16));
  expect_rejected(fv.file, {"tensor 'v'", "dtype differs from q's F32"});
  Fixture fq;
  fq.file.set("q", Tensor::from_i64(std::vector<int64_t>(96, 1), {1, 8, 4, 3}, DType::I32));
  expect_rejected(fq.file, {"tensor 'q'", "I32 is not a float type"});
  Fixture fg;
  fg.file.set("g_slc", Tensor::from_i64(std::vector<int64_t>(32, 1), {1, 8, 4}, DType::I64));
  expect_rejected(fg.file, {"tensor 'g_slc'", "not a float type"});
  Fixture fi;
  fi.file.set("block_indices", floats({1, 8, 2, 2}));
  expect_rejected(fi.file, {"tensor 'block_indices'", "F32 is not I32 or I64"});
}

TEST(LoadProblem, RejectsQueryHeadsNotAMultipleOfKvHeads) {
  Fixture fx;
  fx.file.set("q", floats({1, 8, 3, 3}));
  expect_rejected(fx.file, {"tensor 'q'", "HQ = 3 is not a multiple of kv heads H = 2"});
}

TEST(LoadProblem, RejectsEmptyDimensions) {
  Fixture fq;
  fq.file.set("q", floats({1, 8, 0, 3}));
  expect_rejected(fq.file, {"tensor 'q'", "empty dimension"});
  Fixture fk;
  fk.file.set("k", floats({1, 8, 0, 3}));
  expect_rejected(fk.file, {"tensor 'k'", "no kv heads"});
  Fixture fv;
  fv.file.set("v", floats({1, 8, 2, 0}));
  expect_rejected(fv.file, {"tensor 'v'", "empty value dim"});
}

TEST(LoadProblem, ShapeMismatchesNameTheExpectedShape) {
  struct Case { const char* name; Shape shape; const char* expected; };
  const Case cases[] = {
      {"k", {1, 9, 2, 3}, "expected [1, 8, 2, 3]"},   // T differs from q
      {"k", {1, 8, 2, 4}, "expected [1, 8, 2, 3]"},   // K differs from q
      {"k", {2, 8, 2, 3}, "expected [1, 8, 2, 3]"},   // B differs
      {"v", {1, 8, 1, 5}, "expected [1, 8, 2, 5]"},   // H differs from k
      {"v", {1, 7, 2, 5}, "expected [1, 8, 2, 5]"},
      {"g_cmp", {1, 8, 2}, "expected [1, 8, 4]"},
      {"g_slc", {1, 8, 4, 1}, "expected [1, 8, 4]"},
      {"g_swa", {8, 4}, "expected [1, 8, 4]"},
      {"do", {1, 8, 4, 3}, "expected [1, 8, 4, 5]"},  // do has V, not K
      {"block_indices", {1, 8, 2, 3}, "expected [1, 8, 2, 2]"},  // S = 2 from the metadata
      {"block_counts", {1, 8, 4}, "expected [1, 8, 2]"},
  };
  for (const Case& c : cases) {
    Fixture fx;
    if (std::string(c.name).rfind("block_", 0) == 0)
      fx.file.set(c.name, Tensor::from_i64(std::vector<int64_t>(numel(c.shape), 0), c.shape, DType::I32));
    else
      fx.file.set(c.name, floats(c.shape));
    expect_rejected(fx.file, {std::string("tensor '") + c.name + "'", "shape " + shape_str(c.shape), c.expected});
  }
}

TEST(LoadProblem, RejectsNonFiniteInputsUnlessAllowed) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  struct Case { const char* name; Shape shape; DType dtype; double bad; };
  const Case cases[] = {
      {"q", {1, 8, 4, 3}, DType::F32, nan},   {"k", {1, 8, 2, 3}, DType::F32, inf},
      {"v", {1, 8, 2, 5}, DType::F32, -inf},  {"g_cmp", {1, 8, 4}, DType::F32, nan},
      {"do", {1, 8, 4, 5}, DType::F32, inf},
  };
  for (const Case& c : cases) {
    Fixture fx;
    std::vector<double> values = ramp(numel(c.shape));
    values[5] = c.bad;
    fx.file.set(c.name, Tensor::from_f64(values, c.shape, c.dtype));
    expect_rejected(fx.file, {std::string("tensor '") + c.name + "'", "non-finite value", "flat index 5", "--allow-nonfinite"});
    const Problem p = load_problem(fx.file, kOrigin, {}, /*allow_nonfinite=*/true);
    const std::vector<double>& loaded = c.name == std::string("q") ? p.q : c.name == std::string("k") ? p.k
                                        : c.name == std::string("v") ? p.v : c.name == std::string("do") ? *p.d_o : *p.g_cmp;
    EXPECT_TRUE(std::isnan(c.bad) ? std::isnan(loaded[5]) : loaded[5] == c.bad) << c.name;
  }
  // Half-precision storage: the bit patterns of NaN and -infinity.
  Fixture fh;
  for (const char* name : {"q", "k", "v"}) {
    const Tensor* t = fh.file.find(name);
    fh.file.set(name, Tensor::from_f64(t->to_f64(), t->shape, DType::F16));
  }
  Tensor q = *fh.file.find("q");
  q.bytes[2 * 7] = 0x00;
  q.bytes[2 * 7 + 1] = 0xFC;  // -inf in F16
  fh.file.set("q", q);
  expect_rejected(fh.file, {"tensor 'q'", "non-finite value -inf at flat index 7"});
}

TEST(LoadProblem, RejectsBadCuSeqlens) {
  struct Case { std::vector<int64_t> cu; const char* fragment; };
  const Case cases[] = {
      {{1, 8}, "must start at 0, starts at 1"},
      {{0, 5, 3, 8}, "decreases at position 2 (5 then 3)"},
      {{0, 3, 7}, "must end at T = 8, ends at 7"},
      {{0, 3, 9}, "must end at T = 8, ends at 9"},
      {{-1, 8}, "must start at 0"},
  };
  for (const Case& c : cases) {
    Fixture fx;
    fx.file.set("cu_seqlens", Tensor::from_i64(c.cu, {int64_t(c.cu.size())}, DType::I64));
    expect_rejected(fx.file, {"tensor 'cu_seqlens'", c.fragment});
  }
  Fixture fb;  // varlen needs B == 1
  fb.file.set("q", floats({2, 4, 4, 3}));
  fb.file.set("k", floats({2, 4, 2, 3}));
  fb.file.set("v", floats({2, 4, 2, 5}));
  fb.file.set("cu_seqlens", Tensor::from_i32({0, 4}, {2}));
  expect_rejected(fb.file, {"tensor 'cu_seqlens'", "batch size 1, got 2"});
  Fixture fr;
  fr.file.set("cu_seqlens", Tensor::from_i32({0, 4, 8, 8}, {2, 2}));
  expect_rejected(fr.file, {"tensor 'cu_seqlens'", "expected shape [N+1], got [2, 2]"});
  Fixture fe;
  fe.file.set("cu_seqlens", Tensor::from_i32({}, {0}));
  expect_rejected(fe.file, {"tensor 'cu_seqlens'", "expected shape [N+1]"});
  Fixture ff;
  ff.file.set("cu_seqlens", floats({2}));
  expect_rejected(ff.file, {"tensor 'cu_seqlens'", "is not I32 or I64"});
}

TEST(LoadProblem, VarlenWithEmptySequencesBuildsTheLayout) {
  Fixture fx;
  fx.file.set("cu_seqlens", Tensor::from_i32({0, 0, 5, 5, 8}, {5}));
  const Problem p = load_problem(fx.file, kOrigin);
  ASSERT_TRUE(p.layout.varlen);
  ASSERT_EQ(p.layout.sequences.size(), 4u);
  const int64_t want[4][3] = {{0, 0, 0}, {0, 5, 0}, {5, 0, 2}, {5, 3, 2}};  // start, length, chunk_start (BS = 4)
  for (int n = 0; n < 4; ++n) {
    EXPECT_EQ(p.layout.sequences[n].start, want[n][0]) << n;
    EXPECT_EQ(p.layout.sequences[n].length, want[n][1]) << n;
    EXPECT_EQ(p.layout.sequences[n].chunk_start, want[n][2]) << n;
    EXPECT_EQ(p.layout.sequences[n].batch, 0);
  }
  EXPECT_EQ(p.layout.chunks, 3);
}

TEST(LoadProblem, RejectsBlockIndicesOutOfRange) {
  // T = 8, BS = 4: each row has blocks {0, 1}; -1 pads.
  for (int64_t bad : {int64_t(2), int64_t(-2), int64_t(1) << 40}) {
    Fixture fx;
    std::vector<int64_t> idx(1 * 8 * 2 * 2, -1);
    idx[(5 * 2 + 1) * 2 + 1] = bad;  // token 5, head 1, slot 1
    fx.file.set("block_indices", Tensor::from_i64(idx, {1, 8, 2, 2}, DType::I64));
    expect_rejected(fx.file, {"tensor 'block_indices'", "value " + std::to_string(bad) + " at [0, 5, 1, 1]",
                              "outside [-1, 2)"});
  }
  // Varlen: the range is the token's own sequence (length 3, BS 4 => one block), not the whole row.
  Fixture fv;
  fv.file.set("cu_seqlens", Tensor::from_i32({0, 5, 8}, {3}));
  std::vector<int32_t> idx(1 * 8 * 2 * 2, -1);
  idx[(6 * 2 + 0) * 2 + 0] = 1;
  fv.file.set("block_indices", Tensor::from_i32(idx, {1, 8, 2, 2}));
  expect_rejected(fv.file, {"tensor 'block_indices'", "value 1 at [0, 6, 0, 0]", "outside [-1, 1)"});
}

TEST(LoadProblem, RejectsDuplicatedBlockIndicesButNotRepeatedPadding) {
  Fixture fx;
  std::vector<int32_t> idx(1 * 8 * 2 * 2, -1);
  idx[(7 * 2 + 0) * 2 + 0] = 1;
  idx[(7 * 2 + 0) * 2 + 1] = 1;
  fx.file.set("block_indices", Tensor::from_i32(idx, {1, 8, 2, 2}));
  expect_rejected(fx.file, {"tensor 'block_indices'", "block 1 appears twice at [0, 7, 0]"});

  Fixture ok;
  std::vector<int32_t> padded(1 * 8 * 2 * 2, -1);
  padded[(7 * 2 + 1) * 2 + 0] = 1;
  padded[(7 * 2 + 1) * 2 + 1] = 0;
  ok.file.set("block_indices", Tensor::from_i32(padded, {1, 8, 2, 2}));
  const Problem p = load_problem(ok.file, kOrigin);
  ASSERT_TRUE(p.block_indices.has_value());
  EXPECT_EQ(*p.block_indices, padded);
}

TEST(LoadProblem, BlockCountDefaultsToTheGivenSelectionWidth) {
  Fixture fx;
  fx.file.metadata.erase("nsa.block_count");
  fx.file.set("block_indices", Tensor::from_i32(std::vector<int32_t>(1 * 8 * 2 * 3, -1), {1, 8, 2, 3}));
  EXPECT_EQ(load_problem(fx.file, kOrigin).layout.S(), 3);
  ConfigOverrides ov;
  ov.block_count = 2;
  expect_rejected(fx.file, {"tensor 'block_indices'", "expected [1, 8, 2, 2]"}, ov);
}

TEST(LoadProblem, RejectsBlockCountsOutsideZeroToS) {
  for (int64_t bad : {int64_t(-1), int64_t(3), int64_t(1) << 33}) {
    Fixture fx;
    std::vector<int64_t> counts(1 * 8 * 2, 2);
    counts[9] = bad;
    fx.file.set("block_counts", Tensor::from_i64(counts, {1, 8, 2}, DType::I64));
    expect_rejected(fx.file, {"tensor 'block_counts'", "value " + std::to_string(bad) + " at flat index 9",
                              "outside [0, S = 2]"});
  }
  Fixture ok;
  std::vector<int32_t> counts(1 * 8 * 2, 0);
  counts[3] = 2;
  ok.file.set("block_counts", Tensor::from_i32(counts, {1, 8, 2}));
  EXPECT_EQ(*load_problem(ok.file, kOrigin).block_counts, counts);
}

TEST(LoadProblem, RejectsBadConfigurationFromMetadata) {
  struct Case { const char* key; const char* value; const char* fragment; };
  const Case cases[] = {
      {"nsa.block_size", "0", "block size must be positive, got 0"},
      {"nsa.block_size", "-4", "block size must be positive, got -4"},
      {"nsa.block_size", "4.5", "metadata nsa.block_size = '4.5' is not an integer"},
      {"nsa.block_size", "", "is not an integer"},
      {"nsa.block_size", " 4", "is not an integer"},
      {"nsa.block_size", "99999999999999999999", "is not an integer"},
      {"nsa.block_size", "9223372036854775807", "block size"},
      {"nsa.block_count", "0", "block count must be positive"},
      {"nsa.block_count", "4294967296", "block count"},
      {"nsa.block_count", "65537", "block count 65537 is too large (at most 65536)"},
      {"nsa.window_size", "-1", "window must be >= 0"},
      {"nsa.window_size", "x", "metadata nsa.window_size = 'x' is not an integer"},
      {"nsa.scale", "abc", "metadata nsa.scale = 'abc' is not a number"},
      {"nsa.scale", "nan", "scale must be finite"},
      {"nsa.scale", "inf", "scale must be finite"},
      {"nsa.scale", "1e999", "nsa.scale"},
      {"nsa.scale", "0", "scale must be nonzero"},
      {"nsa.policy", "greedy", "unknown policy 'greedy'"},
      {"nsa.layout", "bthd ", "nsa.layout = 'bthd ' (expected bthd or bhtd)"},
  };
  for (const Case& c : cases) {
    Fixture fx;
    fx.file.metadata[c.key] = c.value;
    SCOPED_TRACE(std::string(c.key) + " = '" + c.value + "'");
    expect_rejected(fx.file, {c.fragment});
  }
}

TEST(LoadProblem, RejectsNonPositiveBlockSizeFromOverrides) {
  Fixture fx;
  ConfigOverrides ov;
  ov.block_size = 0;
  expect_rejected(fx.file, {"block size must be positive, got 0"}, ov);
  ov.block_size = -64;
  expect_rejected(fx.file, {"block size must be positive, got -64"}, ov);
  ConfigOverrides count;
  count.block_count = -1;
  expect_rejected(fx.file, {"block count must be positive, got -1"}, count);
  ConfigOverrides window;
  window.window = -2;
  expect_rejected(fx.file, {"window must be >= 0, got -2"}, window);
  ConfigOverrides scale;
  scale.scale = std::numeric_limits<double>::infinity();
  expect_rejected(fx.file, {"scale must be finite"}, scale);
  scale.scale = 0.0;
  expect_rejected(fx.file, {"scale must be nonzero"}, scale);
}

TEST(LoadProblem, OverridesBeatMetadataWhichBeatsDefaults) {
  Fixture fx;
  fx.file.metadata["nsa.window_size"] = "3";
  fx.file.metadata["nsa.scale"] = "0.5";
  fx.file.metadata["nsa.policy"] = "paper";
  const Problem from_meta = load_problem(fx.file, kOrigin);
  EXPECT_EQ(from_meta.layout.BS(), 4);
  EXPECT_EQ(from_meta.layout.config.window, 3);
  EXPECT_EQ(from_meta.layout.scale(), 0.5);
  EXPECT_EQ(from_meta.layout.config.policy, Policy::Paper);
  ConfigOverrides ov;
  ov.block_size = 2;
  ov.block_count = 5;
  ov.window = 0;
  ov.scale = 0.25;
  ov.policy = "seed";
  const Problem over = load_problem(fx.file, kOrigin, ov);
  EXPECT_EQ(over.layout.BS(), 2);
  EXPECT_EQ(over.layout.S(), 5);
  EXPECT_EQ(over.layout.config.window, 0);
  EXPECT_EQ(over.layout.scale(), 0.25);
  EXPECT_EQ(over.layout.config.policy, Policy::Seed);
  EXPECT_EQ(over.layout.chunks, 4);
  Fixture bare;
  bare.file.metadata.clear();
  const Problem defaults = load_problem(bare.file, kOrigin);
  EXPECT_EQ(defaults.layout.BS(), 64);
  EXPECT_EQ(defaults.layout.S(), 16);
  EXPECT_EQ(defaults.layout.config.window, 0);
  EXPECT_EQ(defaults.layout.config.policy, Policy::Seed);
  EXPECT_EQ(defaults.layout.chunks, 1);
}

// [B, T, X, D] -> [B, X, T, D], written out independently of the loader's own transpose.
Tensor to_head_first(const Tensor& t) {
  const int64_t B = t.dim(0), T = t.dim(1), X = t.dim(2), D = t.rank() == 4 ? t.dim(3) : 1;
  const std::size_t es = dtype_size(t.dtype);
  Tensor out = t;
  out.shape = t.rank() == 4 ? Shape{B, X, T, D} : Shape{B, X, T};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t tok = 0; tok < T; ++tok)
      for (int64_t x = 0; x < X; ++x)
        for (int64_t d = 0; d < D; ++d)
          std::memcpy(&out.bytes[(((b * X + x) * T + tok) * D + d) * es], &t.bytes[(((b * T + tok) * X + x) * D + d) * es], es);
  return out;
}

TEST(LoadProblem, HeadFirstReadEqualsTheTransposedTokenMajorRead) {
  Fixture fx;  // B = 1 would hide batch-stride mistakes: use B = 2.
  const int64_t B = 2, T = 8, HQ = 4, H = 2, K = 3, V = 5, S = 2;
  fx.file.set("q", floats({B, T, HQ, K}, DType::BF16, 1));
  fx.file.set("k", floats({B, T, H, K}, DType::BF16, 2));
  fx.file.set("v", floats({B, T, H, V}, DType::BF16, 3));
  fx.file.set("g_cmp", floats({B, T, HQ}, DType::BF16, 4));
  fx.file.set("g_slc", floats({B, T, HQ}, DType::BF16, 5));
  fx.file.set("g_swa", floats({B, T, HQ}, DType::BF16, 6));
  fx.file.set("do", floats({B, T, HQ, V}, DType::BF16, 7));
  std::vector<int32_t> idx(B * T * H * S), counts(B * T * H);
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = (i % 3 == 2) ? -1 : int32_t(i % 2 == 0 ? (i / 2) % 2 : 1 - (i / 2) % 2);
  for (std::size_t i = 0; i < counts.size(); ++i) counts[i] = int32_t(i % 3);
  fx.file.set("block_indices", Tensor::from_i32(idx, {B, T, H, S}));
  fx.file.set("block_counts", Tensor::from_i32(counts, {B, T, H}));
  const Problem token_major = load_problem(fx.file, kOrigin);

  SafetensorsFile hf;
  hf.metadata = fx.file.metadata;
  hf.metadata["nsa.layout"] = "bhtd";
  for (const auto& [name, t] : fx.file.tensors) hf.set(name, to_head_first(t));
  EXPECT_EQ(hf.find("q")->shape, (Shape{B, HQ, T, K}));
  const Problem head_first = load_problem(hf, kOrigin);

  EXPECT_TRUE(head_first.head_first);
  EXPECT_FALSE(token_major.head_first);
  EXPECT_EQ(head_first.layout.dims.T, T);
  EXPECT_EQ(head_first.layout.dims.HQ, HQ);
  EXPECT_EQ(head_first.layout.dims.H, H);
  EXPECT_EQ(head_first.q, token_major.q);
  EXPECT_EQ(head_first.k, token_major.k);
  EXPECT_EQ(head_first.v, token_major.v);
  EXPECT_EQ(*head_first.g_cmp, *token_major.g_cmp);
  EXPECT_EQ(*head_first.g_slc, *token_major.g_slc);
  EXPECT_EQ(*head_first.g_swa, *token_major.g_swa);
  EXPECT_EQ(*head_first.d_o, *token_major.d_o);
  EXPECT_EQ(*head_first.block_indices, *token_major.block_indices);
  EXPECT_EQ(*head_first.block_counts, *token_major.block_counts);
  EXPECT_EQ(*token_major.block_indices, idx);

  // Writing the problem back keeps its layout: the head-first file is reproduced tensor for tensor.
  const SafetensorsFile written = problem_to_file(head_first);
  EXPECT_EQ(written.metadata.at("nsa.layout"), "bhtd");
  for (const auto& [name, t] : hf.tensors) {
    const Tensor* w = written.find(name);
    ASSERT_NE(w, nullptr) << name;
    EXPECT_EQ(w->shape, t.shape) << name;
    EXPECT_EQ(w->dtype, t.dtype) << name;
    EXPECT_EQ(w->bytes, t.bytes) << name;
  }
}

// q widened for chosen rows only (q_rows_for): those rows equal a whole load's, every value is still checked,
// and q_stored holds all of q as stored, token-major, in either file layout.
TEST(LoadProblem, SampledQueryRowsAreTheWholeLoadsRows) {
  Fixture fx;
  const int64_t B = 2, T = 8, HQ = 4, H = 2, K = 3, V = 5;
  fx.file.set("q", floats({B, T, HQ, K}, DType::BF16, 1));
  fx.file.set("k", floats({B, T, H, K}, DType::BF16, 2));
  fx.file.set("v", floats({B, T, H, V}, DType::BF16, 3));
  const Problem whole = load_problem(fx.file, kOrigin);
  const std::vector<int64_t> rows{1, 2, 9, 15};
  Layout seen;
  const auto pick = [&](const Layout& L) {
    seen = L;
    return rows;
  };
  SafetensorsFile hf;
  hf.metadata = fx.file.metadata;
  hf.metadata["nsa.layout"] = "bhtd";
  for (const auto& [name, t] : fx.file.tensors) hf.set(name, to_head_first(t));
  for (const SafetensorsFile* f : {&fx.file, &hf}) {
    const Problem p = load_problem(*f, kOrigin, {}, false, pick);
    EXPECT_EQ(seen.dims.T, T);
    EXPECT_EQ(p.q_rows, rows);
    ASSERT_EQ(p.q.size(), rows.size() * HQ * K);
    for (std::size_t r = 0; r < rows.size(); ++r)
      for (int64_t i = 0; i < HQ * K; ++i)
        EXPECT_EQ(p.q[r * HQ * K + i], whole.q[rows[r] * HQ * K + i]) << "row " << rows[r] << " element " << i;
    EXPECT_EQ(p.q_stored.dtype, DType::BF16);
    EXPECT_EQ(p.q_stored.shape, (Shape{B, T, HQ, K}));
    EXPECT_EQ(p.q_stored.to_f64(), whole.q);
    EXPECT_EQ(p.k, whole.k);
    EXPECT_THROW(problem_to_file(p), std::invalid_argument);
  }
  // Given up by the caller, the file's q bytes move into q_stored.
  SafetensorsFile given = fx.file;
  const Problem moved = load_problem(std::move(given), kOrigin, {}, false, pick);
  EXPECT_EQ(moved.q_stored.bytes, fx.file.find("q")->bytes);
  // Every row asked for: q is whole.
  const Problem all = load_problem(fx.file, kOrigin, {}, false, [&](const Layout&) {
    std::vector<int64_t> every(B * T);
    for (int64_t i = 0; i < B * T; ++i) every[i] = i;
    return every;
  });
  EXPECT_TRUE(all.q_rows.empty());
  EXPECT_EQ(all.q, whole.q);
  // A non-finite value in a row not widened is still rejected; rows out of order are a caller's error.
  Tensor q = floats({B, T, HQ, K}, DType::F32, 1);
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(q.bytes.data() + (5 * HQ * K + 1) * sizeof(float), &inf, sizeof(float));
  SafetensorsFile bad = fx.file;
  bad.set("q", q);
  bad.set("k", floats({B, T, H, K}, DType::F32, 2));
  bad.set("v", floats({B, T, H, V}, DType::F32, 3));
  try {
    load_problem(bad, kOrigin, {}, false, pick);
    ADD_FAILURE() << "a non-finite q value outside the rows loaded without error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_problem(fx.file, kOrigin, {}, false, [](const Layout&) { return std::vector<int64_t>{3, 1}; }),
               std::invalid_argument);
}

TEST(LoadProblem, HeadFirstShapeErrorsNameTheHeadFirstShape) {
  Fixture fx;
  fx.file.metadata["nsa.layout"] = "bhtd";
  fx.file.set("q", floats({1, 4, 8, 3}));  // [B, HQ, T, K]
  fx.file.set("k", floats({1, 2, 8, 3}));
  fx.file.set("v", floats({1, 2, 8, 5}));
  fx.file.set("g_cmp", floats({1, 8, 4}));  // token-major gate in a head-first file
  expect_rejected(fx.file, {"tensor 'g_cmp'", "shape [1, 8, 4] does not match the expected [1, 4, 8]"});
}

TEST(LoadProblem, ReadsWhatTheWriterSerialised) {
  Fixture fx;
  fx.file.set("cu_seqlens", Tensor::from_i64({0, 3, 8}, {3}, DType::I64));
  const std::vector<uint8_t> bytes = serialize_safetensors(fx.file);
  const Problem p = load_problem(parse_safetensors(bytes.data(), bytes.size(), kOrigin), kOrigin);
  EXPECT_EQ(p.q, ramp(8 * 4 * 3, 1));
  EXPECT_EQ(p.v, ramp(8 * 2 * 5, 3));
  EXPECT_EQ(p.cu_seqlens, (std::vector<int64_t>{0, 3, 8}));
  EXPECT_EQ(p.layout.chunks, 3);  // ceil(3/4) + ceil(5/4)
}

}  // namespace
}  // namespace nsa
