// One NSA problem: the configuration, the sequence layout and the input tensors, read from a fixture and
// validated (nsa-spec §1, §6); and the outputs every backend produces (§4).
//
// Conventions, stated once for the whole toolkit:
// * Dimension legend: B batch rows, T tokens per row, HQ query heads, H kv heads, G = HQ / H query heads per
//   kv head (query head i uses kv head i / G), K key/query dim, V value dim, BS block size, S selected blocks
//   per query, W sliding window (0 = off), C pooled blocks per row (k_cmp's second dimension).
// * In memory every tensor is token-major and contiguous: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V],
//   gates [B, T, HQ], block_indices [B, T, H, S], k_cmp [B, C, H, K]. Head-first files (nsa.layout = bhtd) are
//   transposed on reading and writing.
// * Sequences: fixed length => B sequences of length T; varlen => B == 1 and sequence n is tokens
//   [cu[n], cu[n+1]). Positions and block numbers count from the start of a token's own sequence.
// * Empty rows: a query that sees no key in a branch gets o = 0 and lse = 0.
// * Top-k ties go to the smaller block index; missing selections are -1.
// * Backward stage functions accumulate (+=) into their gradient outputs; the pipeline zeroes them first.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/safetensors.h"

namespace nsa {

enum class Policy { Seed, Paper };
const char* policy_name(Policy p);
Policy policy_from_name(const std::string& name);  // throws std::invalid_argument

struct Config {
  int64_t block_size = 64;   // BS
  int64_t block_count = 16;  // S
  int64_t window = 0;        // W
  double scale = 0;          // 0 => 1 / sqrt(K)
  Policy policy = Policy::Seed;
};

// Flags given on the command line; each set one wins over the file's metadata.
struct ConfigOverrides {
  std::optional<int64_t> block_size, block_count, window;
  std::optional<double> scale;
  std::optional<std::string> policy;
};

struct Dims {
  int64_t B = 0, T = 0, HQ = 0, H = 0, K = 0, V = 0;
  int64_t G() const { return H ? HQ / H : 0; }
};

struct Sequence {
  int64_t batch;        // batch row
  int64_t start;        // first token within the row
  int64_t length;       // tokens
  int64_t chunk_start;  // first pooled block within the row (k_cmp's dim 1)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Everything a stage needs besides tensors: sizes, sequences and configuration (scale resolved).
struct Layout {
  Dims dims;
  Config config;
  std::vector<Sequence> sequences;
  int64_t chunks = 0;  // C
  bool varlen = false;

  int64_t S() const { return config.block_count; }
  int64_t BS() const { return config.block_size; }
  double scale() const { return config.scale; }
  // Builds sequences and C; `cu_seqlens` empty => fixed length. Throws InputError on bad offsets.
  static Layout make(const Dims& dims, Config config, const std::vector<int64_t>& cu_seqlens, const std::string& origin = "");
};

struct Problem {
  Layout layout;
  std::vector<int64_t> cu_seqlens;  // empty for fixed length
  DType input_dtype = DType::F32;   // dtype of q/k/v as stored
  bool head_first = false;          // nsa.layout = bhtd
  std::map<std::string, std::string> metadata;

  // Inputs as stored, widened to double, token-major.
  std::vector<double> q, k, v;
  // A problem loaded for a row-sampled forward (load_problem's `q_rows_for`) widens only the query rows that
  // forward reads: then row r of q ([q_rows.size(), HQ, K]) is query token q_rows[r] (b * T + t, ascending,
  // distinct), and q_stored holds all of q as stored (input_dtype, token-major [B, T, HQ, K]) for a backend
  // that computes every row. Empty q_rows: q is whole and q_stored empty.
  std::vector<int64_t> q_rows;
  Tensor q_stored;
  std::optional<std::vector<double>> g_cmp, g_slc, g_swa, d_o;  // d_o is the file's `do`
  std::optional<std::vector<int32_t>> block_indices, block_counts;

  bool has_backward() const { return d_o.has_value(); }
};

struct Outputs {
  // A row-sampled forward run (RunOptions::rows) may keep the [B, T, HQ, V] outputs -- o_cmp, o_slc, o_swa and
  // o -- compact: then `rows` lists the sample's query rows (b * T + t, ascending, distinct) and row r of
  // those tensors is query row rows[r]. Empty => full-size tensors. Every other tensor is full-size.
  std::vector<int64_t> rows;
  std::vector<double> k_cmp, v_cmp, o_cmp, lse_cmp;
  std::vector<int32_t> block_indices;
  std::vector<double> o_slc, lse_slc, o_swa, lse_swa, o;  // o_swa / lse_swa empty when W == 0
  bool has_grads = false;
  std::vector<double> dq, dk, dv, dg_cmp, dg_slc, dg_swa, dk_cmp, dv_cmp;  // dg_x empty when gate x is absent
};

// A row sample as compact outputs order it: distinct, ascending. Throws InputError for a row outside [0, tokens).
std::vector<int64_t> sorted_sample(std::vector<int64_t> rows, int64_t tokens);
// Per query row of [0, tokens): its index in `sorted` (sorted_sample), or -1.
std::vector<int64_t> sample_slots(const std::vector<int64_t>& sorted, int64_t tokens);
// Per query row of [0, tokens): 1 where `rows` holds it, else 0 (a row mask; empty when `rows` is). Throws
// InputError for a row outside [0, tokens).
std::vector<uint8_t> sample_mask(const std::vector<int64_t>& rows, int64_t tokens);

// Reads and validates a problem (nsa-spec §6). `origin` names the file in errors. With `q_rows_for`, the query
// rows it returns for the validated layout (flat tokens, ascending, distinct) are the only ones widened
// (Problem::q_rows); every value of q is still validated.
Problem load_problem(const SafetensorsFile& file, const std::string& origin, const ConfigOverrides& overrides = {},
                     bool allow_nonfinite = false,
                     const std::function<std::vector<int64_t>(const Layout&)>& q_rows_for = nullptr);
// The same for a file the caller gives up: Problem::q_stored then takes q's bytes instead of a copy.
Problem load_problem(SafetensorsFile&& file, const std::string& origin, const ConfigOverrides& overrides = {},
                     bool allow_nonfinite = false,
                     const std::function<std::vector<int64_t>(const Layout&)>& q_rows_for = nullptr);
// Writes the problem's inputs (in `input_dtype`) and metadata, in the problem's layout.
SafetensorsFile problem_to_file(const Problem& p);
// Adds every output present to `file` in the problem's layout; floats as `out_dtype`, indices as I32.
void add_outputs(SafetensorsFile& file, const Problem& p, const Outputs& out, DType out_dtype);
// Reads outputs named in §4 from a file (absent ones stay empty), converting to token-major.
Outputs outputs_from_file(const SafetensorsFile& file, const Problem& p, const std::string& origin);
// Writes the configuration into metadata (nsa.block_size, ...).
void write_config_metadata(std::map<std::string, std::string>& meta, const Config& c);

}  // namespace nsa
