// The safetensors reader under hostile input (nsa-spec §6) and the writer's round trip. Every rejected file
// must raise InputError with one line naming the file, the tensor where there is one, and the problem.
#include "core/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <iterator>
#include <limits>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/errors.h"

namespace nsa {
namespace {

const char* const kOrigin = "case.safetensors";

// A file from its parts: the 8-byte little-endian header length (the header's size unless `declared_len`),
// the header text and `data_bytes` bytes of data (0, 1, 2, ...).
std::vector<uint8_t> raw_file(const std::string& header, std::size_t data_bytes = 0,
                              std::optional<uint64_t> declared_len = std::nullopt) {
  const uint64_t len = declared_len.value_or(header.size());
  std::vector<uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(len >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(uint8_t(i));
  return out;
}

// `bytes` written to a regular file, which read_safetensors reads header first and then tensor by tensor.
std::string as_file(const std::vector<uint8_t>& bytes) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("nsa_reader_case_" + std::to_string(::getpid()) + ".safetensors")).string();
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  return path;
}

// The InputError message of `read` (origin first), or a marker when it succeeds (or throws something else).
template <typename F>
std::string error_of(F&& read) {
  try {
    read();
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not an InputError: ") + e.what() + ">";
  }
  return "<parsed without error>";
}

// The InputError message of parsing `bytes`, or a marker when it parses (or throws something else). Every
// case is also read from a file, which must end the same way (the message naming the path instead).
std::string parse_error(const std::vector<uint8_t>& bytes) {
  const std::string msg = error_of([&] { parse_safetensors(bytes.data(), bytes.size(), kOrigin); });
  const std::string path = as_file(bytes);
  std::string from_file = error_of([&] { read_safetensors(path); });
  std::filesystem::remove(path);
  if (from_file.rfind(path, 0) == 0) from_file = kOrigin + from_file.substr(path.size());
  EXPECT_EQ(from_file, msg) << "read_safetensors and parse_safetensors disagree";
  return msg;
}

// Rejected with one line that names the file and contains every fragment.
void expect_rejected(const std::vector<uint8_t>& bytes, std::initializer_list<std::string> fragments) {
  const std::string msg = parse_error(bytes);
  EXPECT_EQ(msg.rfind(std::string(kOrigin) + ": ", 0), 0u) << "message does not start with the file: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
  for (const std::string& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "missing '" << f << "' in: " << msg;
}

// Parses `bytes`; reading them from a file must give the same metadata and tensors.
SafetensorsFile parse_ok(const std::vector<uint8_t>& bytes) {
  SafetensorsFile f = parse_safetensors(bytes.data(), bytes.size(), kOrigin);
  const std::string path = as_file(bytes);
  const SafetensorsFile g = read_safetensors(path);
  std::filesystem::remove(path);
  EXPECT_EQ(g.metadata, f.metadata);
  EXPECT_EQ(g.tensors.size(), f.tensors.size());
  for (std::size_t i = 0; i < std::min(f.tensors.size(), g.tensors.size()); ++i) {
    EXPECT_EQ(g.tensors[i].first, f.tensors[i].first);
    EXPECT_EQ(g.tensors[i].second.dtype, f.tensors[i].second.dtype);
    EXPECT_EQ(g.tensors[i].second.shape, f.tensors[i].second.shape);
    EXPECT_EQ(g.tensors[i].second.bytes, f.tensors[i].second.bytes);
  }
  return f;
}

// One header entry.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

TEST(SafetensorsReader, RejectsFilesShorterThanTheLengthPrefix) {
  for (std::size_t n = 0; n < 8; ++n) expect_rejected(std::vector<uint8_t>(n, 0), {"shorter than the 8-byte header length"});
}

TEST(SafetensorsReader, RejectsHeaderLongerThan100MB) {
  expect_rejected(raw_file("{}", 0, 100'000'001), {"header length 100000001 exceeds the 100 MB limit"});
  expect_rejected(raw_file("{}", 0, ~uint64_t(0)), {"exceeds the 100 MB limit"});
  // Exactly at the limit is allowed by the format; this one then fails because the file is too short.
  expect_rejected(raw_file("{}", 0, 100'000'000), {"runs past the end of the file"});
}

TEST(SafetensorsReader, RejectsHeaderLengthPastTheEnd) {
  expect_rejected(raw_file("{}", 0, 3), {"header length 3 runs past the end of the file (10 bytes)"});
  expect_rejected(raw_file("{}", 4, 15), {"runs past the end"});
}

TEST(SafetensorsReader, RejectsHeaderNotStartingWithBrace) {
  expect_rejected(raw_file(" {}"), {"header does not start with '{'"});
  expect_rejected(raw_file("[]"), {"does not start with '{'"});
  expect_rejected(raw_file(""), {"does not start with '{'"});
  expect_rejected(raw_file("\xef\xbb\xbf{}"), {"does not start with '{'"});  // a byte-order mark
}

TEST(SafetensorsReader, RejectsInvalidUtf8) {
  expect_rejected(raw_file("{\"q\xff\":{}}"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{\"q\xc0\xaf\":{}}"), {"not valid UTF-8 JSON"});              // overlong '/'
  expect_rejected(raw_file("{\"q\xed\xa0\x80\":{}}"), {"not valid UTF-8 JSON"});          // a UTF-16 surrogate
  expect_rejected(raw_file("{\"__metadata__\":{\"a\":\"\x80\"}}"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{\"q\xe2\x82\":{}}"), {"not valid UTF-8 JSON"});              // truncated sequence
}

TEST(SafetensorsReader, ErrorLinesStayPrintable) {
  // Names and parser excerpts come from the file: control characters and stray bytes must not break the line.
  const std::string msg = parse_error(raw_file("{" + entry("a\\nb\\u001b", "X", "[]", "[0,0]") + "}"));
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\x1b'), std::string::npos) << msg;
  EXPECT_NE(msg.find("unsupported dtype"), std::string::npos) << msg;
  const std::string utf8 = parse_error(raw_file("{\"q\xff\":{}}"));
  for (char c : utf8) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << "byte " << int(uint8_t(c)) << " in: " << utf8;
}

TEST(SafetensorsReader, RejectsInvalidJson) {
  expect_rejected(raw_file("{\"a\":}"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{\"a\":1,}"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{}{}"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{}x"), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file(std::string("{}\0", 3)), {"not valid UTF-8 JSON"});
  expect_rejected(raw_file("{'a':1}"), {"not valid UTF-8 JSON"});
}

TEST(SafetensorsReader, SurvivesDeeplyNestedJson) {
  const int depth = 100000;
  const std::string arrays = "{\"a\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
  expect_rejected(raw_file(arrays), {"tensor 'a'", "not an object"});
  std::string objects = "{";
  for (int i = 0; i < depth; ++i) objects += "\"a\":{";
  objects += std::string(depth, '}') + "}";
  EXPECT_NE(parse_error(raw_file(objects)).find(kOrigin), std::string::npos);
}

TEST(SafetensorsReader, RejectsMetadataThatIsNotStringToString) {
  expect_rejected(raw_file("{\"__metadata__\":{\"a\":1}}"), {"__metadata__ value of 'a' is not a string"});
  expect_rejected(raw_file("{\"__metadata__\":{\"a\":null}}"), {"'a' is not a string"});
  expect_rejected(raw_file("{\"__metadata__\":{\"a\":{\"b\":\"c\"}}}"), {"'a' is not a string"});
  expect_rejected(raw_file("{\"__metadata__\":{\"a\":[\"b\"]}}"), {"'a' is not a string"});
  expect_rejected(raw_file("{\"__metadata__\":\"x\"}"), {"__metadata__ is not an object of strings"});
  expect_rejected(raw_file("{\"__metadata__\":[\"a\",\"b\"]}"), {"__metadata__ is not an object of strings"});
}

TEST(SafetensorsReader, RejectsMalformedEntries) {
  expect_rejected(raw_file("{\"a\":5}"), {"tensor 'a'", "header entry is not an object"});
  expect_rejected(raw_file("{\"a\":{\"shape\":[],\"data_offsets\":[0,4]}}", 4), {"tensor 'a'", "dtype"});
  expect_rejected(raw_file("{\"a\":{\"dtype\":4,\"shape\":[],\"data_offsets\":[0,4]}}", 4), {"tensor 'a'", "dtype"});
  expect_rejected(raw_file("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), {"tensor 'a'", "shape"});
  expect_rejected(raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[]}}", 4), {"tensor 'a'", "data_offsets"});
  expect_rejected(raw_file("{" + entry("a", "F32", "4", "[0,4]") + "}", 4), {"tensor 'a'", "non-array shape"});
  expect_rejected(raw_file("{" + entry("a", "F32", "[]", "[0,4,8]") + "}", 8), {"tensor 'a'", "data_offsets must be"});
  expect_rejected(raw_file("{" + entry("a", "F32", "[]", "[4]") + "}", 4), {"tensor 'a'", "data_offsets must be"});
  expect_rejected(raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"x\":1}}", 4),
                  {"tensor 'a'", "unknown header field 'x'"});
}

TEST(SafetensorsReader, RejectsUnknownDtype) {
  for (const char* dtype : {"F8_E4M3", "BOOL", "U8", "f32", "float32", ""})
    expect_rejected(raw_file("{" + entry("w", dtype, "[1]", "[0,1]") + "}", 1), {"tensor 'w'", "unsupported dtype"});
}

TEST(SafetensorsReader, RejectsNegativeOrNonIntegerShapes) {
  for (const char* shape : {"[-1]", "[2.0]", "[2.5]", "[\"2\"]", "[true]", "[[2]]", "[null]", "[1e2]", "[-0]"})
    expect_rejected(raw_file("{" + entry("w", "F32", shape, "[0,8]") + "}", 8),
                    {"tensor 'w'", "shape dimensions must be non-negative integers"});
  // Beyond uint64: JSON parsers read it as a float, so it is not an integer either.
  expect_rejected(raw_file("{" + entry("w", "F32", "[18446744073709551616]", "[0,8]") + "}", 8),
                  {"non-negative integers"});
}

TEST(SafetensorsReader, RejectsShapeTimesDtypeOverflowing64Bits) {
  // 2^62 * 4 elements of 8 bytes = 2^67 bytes.
  expect_rejected(raw_file("{" + entry("w", "F64", "[4611686018427387904,4]", "[0,0]") + "}"),
                  {"tensor 'w'", "overflows"});
  // One dimension above 2^63 - 1.
  expect_rejected(raw_file("{" + entry("w", "I32", "[9223372036854775808]", "[0,0]") + "}"), {"tensor 'w'", "too large"});
  expect_rejected(raw_file("{" + entry("w", "BF16", "[18446744073709551615]", "[0,0]") + "}"), {"tensor 'w'"});
  // Overflow before a zero dimension is still an overflow (the reference implementation multiplies in order).
  expect_rejected(raw_file("{" + entry("w", "F32", "[4611686018427387904,4611686018427387904,0]", "[0,0]") + "}"),
                  {"tensor 'w'", "overflows"});
  // 2^61 F64 elements = 2^64 bytes: overflows exactly at the last multiplication.
  expect_rejected(raw_file("{" + entry("w", "F64", "[2305843009213693952]", "[0,0]") + "}"), {"overflows"});
  // A huge but representable size must be caught by the offsets, without allocating.
  expect_rejected(raw_file("{" + entry("w", "F64", "[1152921504606846975]", "[0,9223372036854775800]") + "}"),
                  {"tensor 'w'", "past the data section"});
}

TEST(SafetensorsReader, RejectsOffsetsThatDoNotMatchDtypeTimesShape) {
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[0,4]") + "}", 4),
                  {"tensor 'w'", "data_offsets span 4 bytes but F32 x [2] needs 8"});
  expect_rejected(raw_file("{" + entry("w", "BF16", "[2,3]", "[0,16]") + "}", 16), {"BF16 x [2, 3] needs 12"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[8,0]") + "}", 8), {"tensor 'w'", "end before they begin"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[-8,0]") + "}", 8), {"tensor 'w'", "data_offsets must be non-negative"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[0,8.0]") + "}", 8), {"tensor 'w'", "data_offsets must be non-negative"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[\"0\",8]") + "}", 8), {"tensor 'w'", "data_offsets"});
}

TEST(SafetensorsReader, RejectsOffsetsPastTheEnd) {
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[0,8]") + "}", 4),
                  {"tensor 'w'", "data_offsets end at 8, past the data section (4 bytes)"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[18446744073709551608,18446744073709551616]") + "}", 8),
                  {"tensor 'w'", "data_offsets"});
  expect_rejected(raw_file("{" + entry("w", "F32", "[2]", "[18446744073709551607,18446744073709551615]") + "}", 8),
                  {"tensor 'w'", "past the data section"});
}

TEST(SafetensorsReader, RejectsOverlappingTensors) {
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[4,12]") + "}", 12),
                  {"tensor 'b'", "overlaps"});
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "I64", "[1]", "[0,8]") + "}", 8),
                  {"overlaps"});
  // An empty tensor strictly inside another one's bytes overlaps too.
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("e", "F32", "[0]", "[4,4]") + "}", 8),
                  {"overlaps"});
}

TEST(SafetensorsReader, RejectsGapsInTheDataSection) {
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[12,20]") + "}", 20),
                  {"tensor 'b'", "gap in the data section"});
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[4,12]") + "}", 12), {"tensor 'a'", "gap"});
}

TEST(SafetensorsReader, RejectsTrailingBytes) {
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "}", 12), {"4 trailing bytes"});
  expect_rejected(raw_file("{}", 1), {"1 trailing bytes"});
  expect_rejected(raw_file("{\"__metadata__\":{}}", 7), {"7 trailing bytes"});
}

TEST(SafetensorsReader, RejectsANameGivenTwice) {
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("a", "F32", "[2]", "[8,16]") + "}", 16),
                  {"tensor 'a'", "appears twice"});
  // The same tensor entry repeated byte for byte is still two declarations.
  expect_rejected(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("a", "F32", "[2]", "[0,8]") + "}", 8),
                  {"tensor 'a'", "appears twice"});
  expect_rejected(raw_file("{\"__metadata__\":{\"x\":\"1\"},\"__metadata__\":{\"x\":\"2\"}}"), {"__metadata__", "twice"});
  expect_rejected(raw_file("{\"__metadata__\":{\"x\":\"1\",\"x\":\"2\"}}"), {"key 'x' appears twice"});
  expect_rejected(raw_file("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
                  {"key 'dtype' appears twice"});
}

TEST(SafetensorsReader, ReadsAHandWrittenFile) {
  // Two tensors listed out of data order, padded header, little-endian data written out by hand.
  const std::string header = "{\"__metadata__\":{\"nsa.block_size\":\"32\"}," + entry("z", "F32", "[2]", "[0,8]") + "," +
                             entry("a", "I64", "[1,1]", "[8,16]") + "," + entry("e", "F16", "[0,3]", "[16,16]") + "}   ";
  std::vector<uint8_t> bytes = raw_file(header);
  const uint8_t data[] = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0,   // 1.0f, -2.0f
                          0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};  // int64 -2
  bytes.insert(bytes.end(), std::begin(data), std::end(data));
  const SafetensorsFile f = parse_ok(bytes);
  EXPECT_EQ(f.metadata.at("nsa.block_size"), "32");
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].first, "z");  // data-offset order, not alphabetical
  EXPECT_EQ(f.tensors[1].first, "a");
  EXPECT_EQ(f.find("z")->to_f64(), (std::vector<double>{1.0, -2.0}));
  EXPECT_EQ(f.find("a")->to_i64(), (std::vector<int64_t>{-2}));
  EXPECT_EQ(f.find("a")->shape, (Shape{1, 1}));
  EXPECT_EQ(f.find("e")->shape, (Shape{0, 3}));
  EXPECT_EQ(f.find("e")->dtype, DType::F16);
  EXPECT_TRUE(f.find("e")->bytes.empty());
  EXPECT_EQ(f.find("missing"), nullptr);
}

TEST(SafetensorsReader, AcceptsEmptyTensorsAndEmptyFiles) {
  EXPECT_TRUE(parse_ok(raw_file("{}")).tensors.empty());
  const SafetensorsFile only_empty =
      parse_ok(raw_file("{" + entry("a", "F32", "[0]", "[0,0]") + "," + entry("b", "I32", "[3,0,2]", "[0,0]") + "}"));
  ASSERT_EQ(only_empty.tensors.size(), 2u);
  EXPECT_EQ(only_empty.find("b")->shape, (Shape{3, 0, 2}));
  // Empty tensors between and after real ones, at the boundaries.
  const SafetensorsFile mixed = parse_ok(raw_file("{" + entry("a", "F32", "[1]", "[0,4]") + "," + entry("e1", "F64", "[0]", "[4,4]") +
                                                  "," + entry("b", "F32", "[1]", "[4,8]") + "," +
                                                  entry("e2", "BF16", "[0,7]", "[8,8]") + "}",
                                                  8));
  EXPECT_EQ(mixed.tensors.size(), 4u);
  EXPECT_EQ(mixed.find("b")->bytes, (std::vector<uint8_t>{4, 5, 6, 7}));
  // A scalar (shape []) holds one element.
  EXPECT_EQ(parse_ok(raw_file("{" + entry("s", "F64", "[]", "[0,8]") + "}", 8)).find("s")->numel(), 1);
}

TEST(SafetensorsRoundTrip, EveryDtypeWithMetadata) {
  SafetensorsFile f;
  f.metadata = {{"nsa.format", "1"}, {"nsa.scale", "0.125"}, {"note", "ünïcödé \"quoted\" \\ and\nnewline"}};
  f.set("f64", Tensor::from_f64({1.5, -0.0, 1e300, 5e-324}, {2, 2}, DType::F64));
  f.set("f32", Tensor::from_f64({0.1, -3.0, 65504.0}, {3}, DType::F32));
  f.set("f16", Tensor::from_f64({0.1, -2.0, 65504.0, 6e-8, 1e9}, {5, 1}, DType::F16));
  f.set("bf16", Tensor::from_f64({0.1, -2.0, 3e38}, {1, 3}, DType::BF16));
  f.set("i32", Tensor::from_i32({-1, 0, 2147483647, -2147483647 - 1}, {4}));
  f.set("i64", Tensor::from_i64({-1, 9007199254740993LL}, {2}, DType::I64));
  f.set("empty", Tensor::from_f64({}, {0, 4}, DType::BF16));
  f.set("scalar", Tensor::from_i64({7}, {}, DType::I32));
  const std::vector<uint8_t> bytes = serialize_safetensors(f);
  ASSERT_GE(bytes.size(), 9u);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  EXPECT_EQ(header_len % 8, 0u) << "the data section should start 8-byte aligned";
  EXPECT_EQ(bytes[8], '{');

  const SafetensorsFile g = parse_ok(bytes);
  EXPECT_EQ(g.metadata, f.metadata);
  ASSERT_EQ(g.tensors.size(), f.tensors.size());
  for (const auto& [name, t] : f.tensors) {
    const Tensor* back = g.find(name);
    ASSERT_NE(back, nullptr) << name;
    EXPECT_EQ(back->dtype, t.dtype) << name;
    EXPECT_EQ(back->shape, t.shape) << name;
    EXPECT_EQ(back->bytes, t.bytes) << name;
  }
  // Values as hand-checked constants, so a symmetric writer/reader bug cannot hide.
  EXPECT_EQ(g.find("f16")->to_f64(), (std::vector<double>{0.0999755859375, -2.0, 65504.0, 5.9604644775390625e-08,
                                                          std::numeric_limits<double>::infinity()}));
  EXPECT_EQ(g.find("bf16")->to_f64()[0], 0.10009765625);
  EXPECT_EQ(g.find("i64")->to_i64()[1], 9007199254740993LL);
  EXPECT_EQ(g.find("i32")->to_i64()[3], -2147483648LL);
  EXPECT_EQ(g.find("f64")->to_f64()[3], 5e-324);
  EXPECT_TRUE(std::signbit(g.find("f64")->to_f64()[1]));
  EXPECT_EQ(g.find("scalar")->to_i64(), (std::vector<int64_t>{7}));
  // Serialising what was read gives the same bytes.
  EXPECT_EQ(serialize_safetensors(g), bytes);
}

class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("nsa_safetensors_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(SafetensorsFiles, WritesAtomicallyAndReadsBack) {
  SafetensorsFile f;
  f.metadata["k"] = "v";
  f.set("x", Tensor::from_f64({1, 2, 3}, {3}, DType::F32));
  const std::string path = (dir_ / "out.safetensors").string();
  {
    std::ofstream old(path);
    old << "previous contents";
  }
  write_safetensors(path, f);
  const SafetensorsFile g = read_safetensors(path);
  EXPECT_EQ(g.metadata.at("k"), "v");
  EXPECT_EQ(g.find("x")->to_f64(), (std::vector<double>{1, 2, 3}));
  const auto files = std::distance(std::filesystem::directory_iterator(dir_), std::filesystem::directory_iterator());
  EXPECT_EQ(files, 1) << "a temporary file was left behind";
}

TEST_F(SafetensorsFiles, FailedWriteLeavesNothing) {
  SafetensorsFile f;
  f.set("x", Tensor::from_f64({1}, {1}, DType::F32));
  const std::string path = (dir_ / "no_such_dir" / "out.safetensors").string();
  try {
    write_safetensors(path, f);
    ADD_FAILURE() << "writing into a missing directory succeeded";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir_ / "no_such_dir"));
}

TEST_F(SafetensorsFiles, ReadErrorsNameThePath) {
  const std::string missing = (dir_ / "missing.safetensors").string();
  try {
    read_safetensors(missing);
    ADD_FAILURE() << "reading a missing file succeeded";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(missing + ": ", 0), 0u) << e.what();
  }
  EXPECT_THROW(read_safetensors(dir_.string()), InputError);  // a directory
  const std::string truncated = (dir_ / "truncated.safetensors").string();
  SafetensorsFile f;
  f.set("x", Tensor::from_f64({1, 2}, {2}, DType::F64));
  std::vector<uint8_t> bytes = serialize_safetensors(f);
  bytes.pop_back();
  write_file_atomic(truncated, bytes);
  try {
    read_safetensors(truncated);
    ADD_FAILURE() << "reading a truncated file succeeded";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'x'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nsa
