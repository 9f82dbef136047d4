// Deterministic fixture generation (nsa-spec §4): the same seed gives bit-identical inputs on any machine.
//
// The generator, exactly (so that another program, e.g. a short Python script, can reproduce it):
//
// 1. Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123's
//    philox4x32 with 10 rounds): counter c = (c0, c1, c2, c3), key k = (k0, k1), all uint32. One round:
//      (hi0, lo0) = 0xD2511F53 * c0 (64-bit product),  (hi1, lo1) = 0xCD9E8D57 * c2
//      c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//    and between rounds k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32).
// 2. Streams. Every tensor draws from its own stream, stream = FNV-1a 64 of its name ("q", "k", "v", "g_cmp",
//    "g_slc", "g_swa", "do", "block_counts", "block_indices"; offset basis 0xcbf29ce484222325, prime
//    0x100000001b3). Word n (n = 0, 1, 2, ...) of a stream under seed s is output word (n mod 4) of Philox with
//      counter = (lo32(n / 4), hi32(n / 4), lo32(stream), hi32(stream)),  key = (lo32(s), hi32(s)).
// 3. Normals (Box–Muller). Element i of a float tensor, counted in the token-major order [B, T, heads, D]
//    whatever the file's layout, uses the four words w0..w3 of Philox block j = i / 2 (words 4j .. 4j+3):
//      u1 = (2^53 - ((w1 * 2^32 + w0) >> 11)) * 2^-53      (in (0, 1], exact: never 0, so the log is finite)
//      u2 = ((w3 * 2^32 + w2) >> 11) * 2^-53                (in [0, 1), exact)
//      r = sqrt(-2 * log(u1)),  z = r * cos(2 pi u2) for even i, r * sin(2 pi u2) for odd i
//    all in float64 (2 pi = 6.283185307179586), then rounded to float32: that float32 value is the sample.
//    Rounding to float32 first makes the result independent of 1-ulp differences between libm versions
//    (except at a float32 rounding boundary, about 2^-29 per element).
//    q, k, v and do are samples; a gate is float32(1 / (1 + exp(-z))) of its own stream's sample z.
//    The stored value is then rounded (nearest even) to the fixture dtype; f64 fixtures hold the float32 value.
// 4. Integers. block_counts[r] (r = flat (b, t, h) row) = word r of "block_counts" mod (S + 1).
//    block_indices of row r (token at position t of its sequence, NB blocks in the sequence): the pool is
//    blocks [0, P) with P = min(cur + 2, NB), cur = t / BS — every causal block plus the next one, so that
//    entries starting after t (skipped by the selected attention) are exercised. m = min(S, P) entries are
//    chosen by a partial Fisher–Yates shuffle of the pool (0, 1, ..., P-1): for j < m, swap pool[j] and
//    pool[j + (word (r * S + j) of "block_indices") mod (P - j)]; the row is pool[0..m) padded with -1.
// Values outside the tensors' valid tokens do not exist: varlen fixtures have B = 1 and every token belongs
// to a sequence.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/problem.h"
#include "core/safetensors.h"

namespace nsa::gen {

using Philox4x32Counter = std::array<uint32_t, 4>;
using Philox4x32Key = std::array<uint32_t, 2>;

Philox4x32Counter philox4x32_10(Philox4x32Counter counter, Philox4x32Key key);

uint64_t fnv1a64(const void* data, std::size_t size);
inline uint64_t stream_id(const std::string& tensor_name) { return fnv1a64(tensor_name.data(), tensor_name.size()); }

// Word n of a stream (step 2 above).
uint32_t random_word(uint64_t seed, uint64_t stream, uint64_t n);
// Element i's standard normal sample (step 3), as float32.
float normal_sample(uint64_t seed, uint64_t stream, uint64_t i);
// Element i's gate value, sigmoid of the normal sample, as float32 (in (0, 1)).
float gate_sample(uint64_t seed, uint64_t stream, uint64_t i);

// `count` distinct values of [0, total), sorted ascending: a partial Fisher–Yates shuffle of 0..total-1 with
// swap offsets (word j of stream "sample_rows") mod (total - j). All of them when count >= total.
std::vector<int64_t> sample_rows(int64_t total, int64_t count, uint64_t seed);

constexpr const char* kGeneratorName = "philox4x32-10/box-muller";

// What `nsa-verify gen` makes. Shape fields are the logical (token-major) sizes; with `varlen` set,
// B = 1 and T = the sum of the lengths.
struct GenSpec {
  int64_t batch = 1, seqlen = 256, heads_q = 16, heads_kv = 1, dim_k = 64, dim_v = 64;
  std::optional<std::vector<int64_t>> varlen;  // sequence lengths; zeros allowed
  DType dtype = DType::BF16;
  uint64_t seed = 0;
  bool with_grads = false;
  bool gate_cmp = true, gate_slc = true, gate_swa = true;
  bool block_counts = false;   // random per-query block counts in [0, S]
  bool given_indices = false;  // random valid block_indices as an input (metadata nsa.given_indices = 1)
  bool head_first = false;     // nsa.layout = bhtd
  Config config;               // scale 0 => 1 / sqrt(K), written resolved into the metadata
};

// A named starting point for the shape and configuration; explicit flags then override its fields.
struct Preset {
  std::string name, description;
  GenSpec spec;
};
const std::vector<Preset>& presets();
// Throws InputError listing the known names when `name` is unknown.
const Preset& find_preset(const std::string& name);

// Builds the problem: inputs drawn as above and rounded to spec.dtype, metadata (nsa.format .. nsa.policy,
// nsa.seed, nsa.generator, nsa.tool_version, nsa.given_indices). Throws InputError for an invalid spec.
Problem generate_problem(const GenSpec& spec);

// The fixture file: the problem's inputs, and with `reference` the float64 reference outputs computed from
// the inputs as stored, written as `out_dtype` (metadata nsa.reference_precision = f64).
SafetensorsFile generate_fixture(const GenSpec& spec, bool reference, DType out_dtype = DType::F32, int threads = 0);

}  // namespace nsa::gen
