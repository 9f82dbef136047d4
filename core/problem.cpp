#include "core/problem.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "core/errors.h"

namespace nsa {

const char* policy_name(Policy p) { return p == Policy::Seed ? "seed" : "paper"; }
Policy policy_from_name(const std::string& name) {
  if (name == "seed") return Policy::Seed;
  if (name == "paper") return Policy::Paper;
  throw std::invalid_argument("unknown policy '" + name + "' (expected seed or paper)");
}

Layout Layout::make(const Dims& dims, Config config, const std::vector<int64_t>& cu, const std::string& origin) {
  Layout L;
  L.dims = dims;
  if (config.block_size < 1) fail_input(origin, "", "block size must be positive, got " + std::to_string(config.block_size));
  if (config.block_count < 1) fail_input(origin, "", "block count must be positive, got " + std::to_string(config.block_count));
  if (config.window < 0) fail_input(origin, "", "window must be >= 0, got " + std::to_string(config.window));
  // The kernels take 32-bit configuration, and block arithmetic such as ceil_div(T, BS) must not overflow.
  constexpr int64_t kMaxConfig = std::numeric_limits<int32_t>::max();
  if (config.block_size > kMaxConfig)
    fail_input(origin, "", "block size " + std::to_string(config.block_size) + " is too large (at most 2147483647)");
  // Every query row carries S indices and per-row scratch of that size; no sequence has 65536 blocks to pick.
  constexpr int64_t kMaxBlockCount = 65536;
  if (config.block_count > kMaxBlockCount)
    fail_input(origin, "", "block count " + std::to_string(config.block_count) + " is too large (at most 65536)");
  if (config.window > kMaxConfig)
    fail_input(origin, "", "window " + std::to_string(config.window) + " is too large (at most 2147483647)");
  if (config.scale == 0) config.scale = 1.0 / std::sqrt(double(dims.K));
  if (!std::isfinite(config.scale)) fail_input(origin, "", "scale must be finite");
  L.config = config;
  const int64_t BS = config.block_size;
  if (cu.empty()) {
    for (int64_t b = 0; b < dims.B; ++b) L.sequences.push_back({b, 0, dims.T, 0});
    L.chunks = ceil_div(dims.T, BS);
    return L;
  }
  L.varlen = true;
  if (dims.B != 1) fail_input(origin, "cu_seqlens", "varlen input needs batch size 1, got " + std::to_string(dims.B));
  if (cu.front() != 0) fail_input(origin, "cu_seqlens", "must start at 0, starts at " + std::to_string(cu.front()));
  for (std::size_t n = 1; n < cu.size(); ++n)
    if (cu[n] < cu[n - 1])
      fail_input(origin, "cu_seqlens", "decreases at position " + std::to_string(n) + " (" + std::to_string(cu[n - 1]) +
                                           " then " + std::to_string(cu[n]) + ")");
  if (cu.back() != dims.T)
    fail_input(origin, "cu_seqlens", "must end at T = " + std::to_string(dims.T) + ", ends at " + std::to_string(cu.back()));
  int64_t chunk = 0;
  for (std::size_t n = 0; n + 1 < cu.size(); ++n) {
    const int64_t len = cu[n + 1] - cu[n];
    L.sequences.push_back({0, cu[n], len, chunk});
    chunk += ceil_div(len, BS);
  }
  L.chunks = chunk;
  return L;
}

namespace {

// std::stoll / std::stod skip leading whitespace; metadata values must be the bare number.
bool starts_bare(const std::string& text) { return !text.empty() && !std::isspace(static_cast<unsigned char>(text[0])); }

int64_t parse_int(const std::string& text, const std::string& origin, const std::string& key) {
  std::size_t used = 0;
  long long v = 0;
  try {
    if (starts_bare(text)) v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) fail_input(origin, "", "metadata " + key + " = '" + text + "' is not an integer");
  return v;
}

double parse_double(const std::string& text, const std::string& origin, const std::string& key) {
  std::size_t used = 0;
  double v = 0;
  try {
    if (starts_bare(text)) v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) fail_input(origin, "", "metadata " + key + " = '" + text + "' is not a number");
  return v;
}

// [B, X, T, D] <-> [B, T, X, D]: swaps dims 1 and 2 of a 4-d array (D = 1 for 3-d tensors).
template <typename T>
std::vector<T> swap12(const std::vector<T>& in, int64_t B, int64_t d1, int64_t d2, int64_t D) {
  std::vector<T> out(in.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < d1; ++i)
      for (int64_t j = 0; j < d2; ++j)
        for (int64_t d = 0; d < D; ++d) out[((b * d2 + j) * d1 + i) * D + d] = in[((b * d1 + i) * d2 + j) * D + d];
  return out;
}

// Token-major shape of a tensor with `heads` heads and trailing size `D` (0 => no trailing dim).
Shape token_major(int64_t B, int64_t T, int64_t heads, int64_t D) {
  return D ? Shape{B, T, heads, D} : Shape{B, T, heads};
}
Shape file_shape(bool head_first, int64_t B, int64_t T, int64_t heads, int64_t D) {
  if (!head_first) return token_major(B, T, heads, D);
  return D ? Shape{B, heads, T, D} : Shape{B, heads, T};
}

struct Reader {
  const SafetensorsFile& file;
  const std::string& origin;
  bool head_first;
  bool allow_nonfinite;

  const Tensor& require(const std::string& name) const {
    const Tensor* t = file.find(name);
    if (!t) fail_input(origin, name, "required tensor is missing");
    return *t;
  }
  void expect_shape(const std::string& name, const Tensor& t, int64_t B, int64_t T, int64_t heads, int64_t D,
                    const char* legend) const {
    const Shape want = file_shape(head_first, B, T, heads, D);
    if (t.shape != want)
      fail_input(origin, name, "shape " + shape_str(t.shape) + " does not match the expected " + shape_str(want) + " " + legend);
  }
  // The error for the non-finite value x at flat index i of tensor `name` (without --allow-nonfinite).
  [[noreturn]] void reject_nonfinite(const std::string& name, double x, int64_t i) const {
    fail_input(origin, name, "non-finite value " + std::to_string(x) + " at flat index " + std::to_string(i) +
                                 " (pass --allow-nonfinite to accept)");
  }
  // A float tensor of `heads` heads and trailing dim D, returned token-major.
  std::vector<double> floats(const std::string& name, const Tensor& t, int64_t B, int64_t T, int64_t heads, int64_t D,
                             const char* legend) const {
    if (!is_float(t.dtype)) fail_input(origin, name, std::string("dtype ") + dtype_name(t.dtype) + " is not a float type");
    expect_shape(name, t, B, T, heads, D, legend);
    std::vector<double> values = t.to_f64();
    if (!allow_nonfinite)
      for (std::size_t i = 0; i < values.size(); ++i)
        if (!std::isfinite(values[i])) reject_nonfinite(name, values[i], int64_t(i));
    // Not `head_first ? swap12(...) : values`: a conditional copies its lvalue operand (4 GB for a 64k q).
    if (head_first) return swap12(values, B, heads, T, D ? D : 1);
    return values;
  }
  // Rows `tokens` (flat b * T + t, ascending) of a [B, T, heads, D] float tensor, widened, token-major; every
  // value of the tensor is checked, the rest left unwidened.
  std::vector<double> float_rows(const std::string& name, const Tensor& t, int64_t B, int64_t T, int64_t heads,
                                 int64_t D, const std::vector<int64_t>& tokens) const {
    expect_shape(name, t, B, T, heads, D, "(B, T, HQ, K)");
    if (!allow_nonfinite)
      for (int64_t i = 0; i < t.numel(); ++i)
        if (!std::isfinite(t.at_f64(i))) reject_nonfinite(name, t.at_f64(i), i);
    std::vector<double> out(tokens.size() * heads * D);
    for (std::size_t r = 0; r < tokens.size(); ++r) {
      const int64_t b = tokens[r] / T, tt = tokens[r] % T;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const int64_t src = (head_first ? (b * heads + hd) * T + tt : (b * T + tt) * heads + hd) * D;
        for (int64_t e = 0; e < D; ++e) out[(r * heads + hd) * D + e] = t.at_f64(src + e);
      }
    }
    return out;
  }
  // A [B, T, heads, D] tensor's stored bytes in token-major order; taken from `owned` (t itself, given up by
  // the caller) when they already are.
  Tensor token_major_bytes(const Tensor& t, Tensor* owned, int64_t B, int64_t T, int64_t heads, int64_t D) const {
    Tensor out;
    out.dtype = t.dtype;
    out.shape = token_major(B, T, heads, D);
    if (!head_first) {
      out.bytes = owned ? std::move(owned->bytes) : t.bytes;
      return out;
    }
    const std::size_t row = std::size_t(D) * dtype_size(t.dtype);
    out.bytes.resize(t.bytes.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hd = 0; hd < heads; ++hd)
        for (int64_t tt = 0; tt < T; ++tt)
          std::memcpy(out.bytes.data() + ((b * T + tt) * heads + hd) * row,
                      t.bytes.data() + ((b * heads + hd) * T + tt) * row, row);
    return out;
  }
  std::vector<int64_t> ints(const std::string& name, const Tensor& t, int64_t B, int64_t T, int64_t heads, int64_t D,
                            const char* legend) const {
    if (t.dtype != DType::I32 && t.dtype != DType::I64)
      fail_input(origin, name, std::string("dtype ") + dtype_name(t.dtype) + " is not I32 or I64");
    expect_shape(name, t, B, T, heads, D, legend);
    std::vector<int64_t> values = t.to_i64();
    if (head_first) return swap12(values, B, heads, T, D ? D : 1);
    return values;
  }
};

}  // namespace

void write_config_metadata(std::map<std::string, std::string>& meta, const Config& c) {
  meta["nsa.format"] = "1";
  meta["nsa.block_size"] = std::to_string(c.block_size);
  meta["nsa.block_count"] = std::to_string(c.block_count);
  meta["nsa.window_size"] = std::to_string(c.window);
  std::ostringstream os;
  os.precision(17);
  os << c.scale;
  meta["nsa.scale"] = os.str();
  meta["nsa.policy"] = policy_name(c.policy);
}

namespace {

// load_problem; `owned` is the file itself when the caller gave it up.
Problem load(const SafetensorsFile& file, SafetensorsFile* owned, const std::string& origin, const ConfigOverrides& ov,
             bool allow_nonfinite, const std::function<std::vector<int64_t>(const Layout&)>& q_rows_for) {
  Problem p;
  p.metadata = file.metadata;
  auto meta = [&](const char* key) -> const std::string* {
    auto it = file.metadata.find(key);
    return it == file.metadata.end() ? nullptr : &it->second;
  };
  if (const std::string* layout = meta("nsa.layout")) {
    if (*layout == "bhtd") p.head_first = true;
    else if (*layout != "bthd") fail_input(origin, "", "metadata nsa.layout = '" + *layout + "' (expected bthd or bhtd)");
  }
  const Reader r{file, origin, p.head_first, allow_nonfinite};

  const Tensor& q = r.require("q");
  const Tensor& k = r.require("k");
  const Tensor& v = r.require("v");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    if (t->rank() != 4) fail_input(origin, name, "expected 4 dimensions, got shape " + shape_str(t->shape));
    if (!is_float(t->dtype)) fail_input(origin, name, std::string("dtype ") + dtype_name(t->dtype) + " is not a float type");
  }
  if (k.dtype != q.dtype || v.dtype != q.dtype)
    fail_input(origin, k.dtype != q.dtype ? "k" : "v", "dtype differs from q's " + std::string(dtype_name(q.dtype)));
  Dims d;
  d.B = q.dim(0);
  d.T = p.head_first ? q.dim(2) : q.dim(1);
  d.HQ = p.head_first ? q.dim(1) : q.dim(2);
  d.K = q.dim(3);
  d.H = p.head_first ? k.dim(1) : k.dim(2);
  d.V = v.dim(3);
  if (d.B < 1 || d.HQ < 1 || d.K < 1) fail_input(origin, "q", "empty dimension in shape " + shape_str(q.shape));
  if (d.H < 1) fail_input(origin, "k", "no kv heads in shape " + shape_str(k.shape));
  if (d.V < 1) fail_input(origin, "v", "empty value dim in shape " + shape_str(v.shape));
  if (d.HQ % d.H != 0)
    fail_input(origin, "q", "query heads HQ = " + std::to_string(d.HQ) + " is not a multiple of kv heads H = " + std::to_string(d.H));
  p.input_dtype = q.dtype;
  // With q_rows_for, q is widened last, once the layout says which rows to take.
  if (q_rows_for) r.expect_shape("q", q, d.B, d.T, d.HQ, d.K, "(B, T, HQ, K)");
  else p.q = r.floats("q", q, d.B, d.T, d.HQ, d.K, "(B, T, HQ, K)");
  p.k = r.floats("k", k, d.B, d.T, d.H, d.K, "(B, T, H, K from q)");
  p.v = r.floats("v", v, d.B, d.T, d.H, d.V, "(B, T, H, V)");
  for (auto [name, slot] : {std::pair<const char*, std::optional<std::vector<double>>*>{"g_cmp", &p.g_cmp},
                            {"g_slc", &p.g_slc}, {"g_swa", &p.g_swa}})
    if (const Tensor* g = file.find(name)) *slot = r.floats(name, *g, d.B, d.T, d.HQ, 0, "(B, T, HQ)");
  if (const Tensor* g = file.find("do")) p.d_o = r.floats("do", *g, d.B, d.T, d.HQ, d.V, "(B, T, HQ, V)");

  Config c;
  auto set_int = [&](int64_t& slot, const char* key, const std::optional<int64_t>& flag) {
    if (flag) slot = *flag;
    else if (const std::string* s = meta(key)) slot = parse_int(*s, origin, key);
  };
  set_int(c.block_size, "nsa.block_size", ov.block_size);
  const bool count_given = ov.block_count || meta("nsa.block_count");
  set_int(c.block_count, "nsa.block_count", ov.block_count);
  set_int(c.window, "nsa.window_size", ov.window);
  if (ov.scale) c.scale = *ov.scale;
  else if (const std::string* s = meta("nsa.scale")) c.scale = parse_double(*s, origin, "nsa.scale");
  // Config::scale = 0 means "default 1/sqrt(K)"; a scale of 0 given on purpose is an error, not the default.
  if ((ov.scale || meta("nsa.scale")) && c.scale == 0) fail_input(origin, "", "scale must be nonzero");
  try {
    if (ov.policy) c.policy = policy_from_name(*ov.policy);
    else if (const std::string* s = meta("nsa.policy")) c.policy = policy_from_name(*s);
  } catch (const std::invalid_argument& e) {
    fail_input(origin, "", e.what());
  }
  const Tensor* bi = file.find("block_indices");
  if (bi && !count_given && bi->rank() == 4) c.block_count = bi->dim(3);  // S from the given selection

  if (const Tensor* cu = file.find("cu_seqlens")) {
    if (cu->rank() != 1 || cu->dim(0) < 1) fail_input(origin, "cu_seqlens", "expected shape [N+1], got " + shape_str(cu->shape));
    if (cu->dtype != DType::I32 && cu->dtype != DType::I64)
      fail_input(origin, "cu_seqlens", std::string("dtype ") + dtype_name(cu->dtype) + " is not I32 or I64");
    p.cu_seqlens = cu->to_i64();
  }
  p.layout = Layout::make(d, c, p.cu_seqlens, origin);
  const Layout& L = p.layout;
  if (bi) {
    const std::vector<int64_t> idx = r.ints("block_indices", *bi, d.B, d.T, d.H, L.S(), "(B, T, H, S)");
    std::vector<int32_t> out(idx.size());
    for (const Sequence& s : L.sequences) {
      const int64_t nb = ceil_div(s.length, L.BS());
      for (int64_t t = 0; t < s.length; ++t)
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t row = ((s.batch * d.T + s.start + t) * d.H + h) * L.S();
          for (int64_t j = 0; j < L.S(); ++j) {
            const int64_t c_j = idx[row + j];
            if (c_j < -1 || c_j >= nb)
              fail_input(origin, "block_indices", "value " + std::to_string(c_j) + " at [" + std::to_string(s.batch) + ", " +
                                                      std::to_string(s.start + t) + ", " + std::to_string(h) + ", " +
                                                      std::to_string(j) + "] is outside [-1, " + std::to_string(nb) + ")");
            for (int64_t j2 = 0; j2 < j && c_j >= 0; ++j2)
              if (idx[row + j2] == c_j)
                fail_input(origin, "block_indices", "block " + std::to_string(c_j) + " appears twice at [" +
                                                        std::to_string(s.batch) + ", " + std::to_string(s.start + t) + ", " +
                                                        std::to_string(h) + "]");
            out[row + j] = int32_t(c_j);
          }
        }
    }
    p.block_indices = std::move(out);
  }
  if (const Tensor* bc = file.find("block_counts")) {
    const std::vector<int64_t> counts = r.ints("block_counts", *bc, d.B, d.T, d.H, 0, "(B, T, H)");
    std::vector<int32_t> out(counts.size());
    for (std::size_t i = 0; i < counts.size(); ++i) {
      if (counts[i] < 0 || counts[i] > L.S())
        fail_input(origin, "block_counts", "value " + std::to_string(counts[i]) + " at flat index " + std::to_string(i) +
                                               " is outside [0, S = " + std::to_string(L.S()) + "]");
      out[i] = int32_t(counts[i]);
    }
    p.block_counts = std::move(out);
  }
  if (q_rows_for) {
    std::vector<int64_t> rows = q_rows_for(L);
    const int64_t tokens = d.B * d.T;
    for (std::size_t i = 0; i < rows.size(); ++i)
      if (rows[i] < 0 || rows[i] >= tokens || (i > 0 && rows[i] <= rows[i - 1]))
        throw std::invalid_argument("load_problem: q rows must be ascending, distinct and below B * T");
    if (int64_t(rows.size()) == tokens) {
      p.q = r.floats("q", q, d.B, d.T, d.HQ, d.K, "(B, T, HQ, K)");
    } else {
      p.q = r.float_rows("q", q, d.B, d.T, d.HQ, d.K, rows);
      p.q_stored = r.token_major_bytes(q, owned ? owned->find("q") : nullptr, d.B, d.T, d.HQ, d.K);
      p.q_rows = std::move(rows);
    }
  }
  return p;
}

}  // namespace

Problem load_problem(const SafetensorsFile& file, const std::string& origin, const ConfigOverrides& ov,
                     bool allow_nonfinite, const std::function<std::vector<int64_t>(const Layout&)>& q_rows_for) {
  return load(file, nullptr, origin, ov, allow_nonfinite, q_rows_for);
}

Problem load_problem(SafetensorsFile&& file, const std::string& origin, const ConfigOverrides& ov, bool allow_nonfinite,
                     const std::function<std::vector<int64_t>(const Layout&)>& q_rows_for) {
  return load(file, &file, origin, ov, allow_nonfinite, q_rows_for);
}

namespace {
// v ([B, T, heads, D]) in the file's order: swapped into `buffer` for a head-first file, else v itself
// (`head_first ? swap12(...) : v` would copy v).
template <typename E>
const std::vector<E>& file_order(const Problem& p, const std::vector<E>& v, std::vector<E>& buffer, int64_t T,
                                 int64_t heads, int64_t D) {
  if (!p.head_first) return v;
  buffer = swap12(v, p.layout.dims.B, T, heads, D ? D : 1);
  return buffer;
}
void put_float(SafetensorsFile& f, const Problem& p, const char* name, const std::vector<double>& v, int64_t T, int64_t heads,
               int64_t D, DType dtype) {
  std::vector<double> buffer;
  f.set(name, Tensor::from_f64(file_order(p, v, buffer, T, heads, D),
                               file_shape(p.head_first, p.layout.dims.B, T, heads, D), dtype));
}
// A [B, T, H, D] int32 tensor (block_indices, block_counts with D = 0).
void put_int32(SafetensorsFile& f, const Problem& p, const char* name, const std::vector<int32_t>& v, int64_t D) {
  const Dims& d = p.layout.dims;
  std::vector<int32_t> buffer;
  f.set(name, Tensor::from_i32(file_order(p, v, buffer, d.T, d.H, D), file_shape(p.head_first, d.B, d.T, d.H, D)));
}
}  // namespace

SafetensorsFile problem_to_file(const Problem& p) {
  if (!p.q_rows.empty()) throw std::invalid_argument("problem_to_file: the problem holds q for sampled rows only");
  SafetensorsFile f;
  f.metadata = p.metadata;
  write_config_metadata(f.metadata, p.layout.config);
  if (p.head_first) f.metadata["nsa.layout"] = "bhtd";
  if (p.block_indices) f.metadata["nsa.given_indices"] = "1";  // the selection is an input, not a result
  const Dims& d = p.layout.dims;
  put_float(f, p, "q", p.q, d.T, d.HQ, d.K, p.input_dtype);
  put_float(f, p, "k", p.k, d.T, d.H, d.K, p.input_dtype);
  put_float(f, p, "v", p.v, d.T, d.H, d.V, p.input_dtype);
  if (p.g_cmp) put_float(f, p, "g_cmp", *p.g_cmp, d.T, d.HQ, 0, p.input_dtype);
  if (p.g_slc) put_float(f, p, "g_slc", *p.g_slc, d.T, d.HQ, 0, p.input_dtype);
  if (p.g_swa) put_float(f, p, "g_swa", *p.g_swa, d.T, d.HQ, 0, p.input_dtype);
  if (p.d_o) put_float(f, p, "do", *p.d_o, d.T, d.HQ, d.V, p.input_dtype);
  if (!p.cu_seqlens.empty())
    f.set("cu_seqlens", Tensor::from_i64(p.cu_seqlens, {int64_t(p.cu_seqlens.size())}, DType::I32));
  if (p.block_indices) put_int32(f, p, "block_indices", *p.block_indices, p.layout.S());
  if (p.block_counts) put_int32(f, p, "block_counts", *p.block_counts, 0);
  return f;
}

namespace {

void require_rows_inside(const std::vector<int64_t>& rows, int64_t tokens) {
  for (int64_t r : rows)
    if (r < 0 || r >= tokens)
      throw InputError("sampled row " + std::to_string(r) + " is outside the problem's " + std::to_string(tokens) +
                       " query tokens (B * T)");
}

}  // namespace

std::vector<int64_t> sorted_sample(std::vector<int64_t> rows, int64_t tokens) {
  require_rows_inside(rows, tokens);
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

std::vector<int64_t> sample_slots(const std::vector<int64_t>& sorted, int64_t tokens) {
  std::vector<int64_t> slots(tokens, -1);
  for (std::size_t i = 0; i < sorted.size(); ++i) slots[sorted[i]] = int64_t(i);
  return slots;
}

std::vector<uint8_t> sample_mask(const std::vector<int64_t>& rows, int64_t tokens) {
  require_rows_inside(rows, tokens);
  std::vector<uint8_t> mask;
  if (rows.empty()) return mask;
  mask.assign(tokens, 0);
  for (int64_t r : rows) mask[r] = 1;
  return mask;
}

void add_outputs(SafetensorsFile& f, const Problem& p, const Outputs& o, DType out) {
  if (!o.rows.empty()) throw std::invalid_argument("add_outputs: row-sampled outputs are not a fixture's tensors");
  const Dims& d = p.layout.dims;
  const int64_t C = p.layout.chunks;
  auto put = [&](const char* name, const std::vector<double>& v, int64_t T, int64_t heads, int64_t D) {
    if (!v.empty()) put_float(f, p, name, v, T, heads, D, out);
  };
  put("k_cmp", o.k_cmp, C, d.H, d.K);
  put("v_cmp", o.v_cmp, C, d.H, d.V);
  put("o_cmp", o.o_cmp, d.T, d.HQ, d.V);
  put("lse_cmp", o.lse_cmp, d.T, d.HQ, 0);
  if (!o.block_indices.empty()) put_int32(f, p, "block_indices", o.block_indices, p.layout.S());
  put("o_slc", o.o_slc, d.T, d.HQ, d.V);
  put("lse_slc", o.lse_slc, d.T, d.HQ, 0);
  put("o_swa", o.o_swa, d.T, d.HQ, d.V);
  put("lse_swa", o.lse_swa, d.T, d.HQ, 0);
  put("o", o.o, d.T, d.HQ, d.V);
  if (!o.has_grads) return;
  put("dq", o.dq, d.T, d.HQ, d.K);
  put("dk", o.dk, d.T, d.H, d.K);
  put("dv", o.dv, d.T, d.H, d.V);
  put("dg_cmp", o.dg_cmp, d.T, d.HQ, 0);
  put("dg_slc", o.dg_slc, d.T, d.HQ, 0);
  put("dg_swa", o.dg_swa, d.T, d.HQ, 0);
  put("dk_cmp", o.dk_cmp, C, d.H, d.K);
  put("dv_cmp", o.dv_cmp, C, d.H, d.V);
}

Outputs outputs_from_file(const SafetensorsFile& file, const Problem& p, const std::string& origin) {
  const Dims& d = p.layout.dims;
  const int64_t C = p.layout.chunks;
  const Reader r{file, origin, p.head_first, /*allow_nonfinite=*/true};  // a candidate's NaN is a finding, not bad input
  Outputs o;
  auto get = [&](const char* name, std::vector<double>& slot, int64_t T, int64_t heads, int64_t D, const char* legend) {
    if (const Tensor* t = file.find(name)) slot = r.floats(name, *t, d.B, T, heads, D, legend);
  };
  get("k_cmp", o.k_cmp, C, d.H, d.K, "(B, C, H, K)");
  get("v_cmp", o.v_cmp, C, d.H, d.V, "(B, C, H, V)");
  get("o_cmp", o.o_cmp, d.T, d.HQ, d.V, "(B, T, HQ, V)");
  get("lse_cmp", o.lse_cmp, d.T, d.HQ, 0, "(B, T, HQ)");
  if (const Tensor* t = file.find("block_indices")) {
    const std::vector<int64_t> idx = r.ints("block_indices", *t, d.B, d.T, d.H, p.layout.S(), "(B, T, H, S)");
    o.block_indices.resize(idx.size());
    for (std::size_t i = 0; i < idx.size(); ++i) {
      if (idx[i] < std::numeric_limits<int32_t>::min() || idx[i] > std::numeric_limits<int32_t>::max())
        fail_input(origin, "block_indices", "value " + std::to_string(idx[i]) + " does not fit in 32 bits");
      o.block_indices[i] = int32_t(idx[i]);
    }
  }
  get("o_slc", o.o_slc, d.T, d.HQ, d.V, "(B, T, HQ, V)");
  get("lse_slc", o.lse_slc, d.T, d.HQ, 0, "(B, T, HQ)");
  get("o_swa", o.o_swa, d.T, d.HQ, d.V, "(B, T, HQ, V)");
  get("lse_swa", o.lse_swa, d.T, d.HQ, 0, "(B, T, HQ)");
  get("o", o.o, d.T, d.HQ, d.V, "(B, T, HQ, V)");
  get("dq", o.dq, d.T, d.HQ, d.K, "(B, T, HQ, K)");
  get("dk", o.dk, d.T, d.H, d.K, "(B, T, H, K)");
  get("dv", o.dv, d.T, d.H, d.V, "(B, T, H, V)");
  get("dg_cmp", o.dg_cmp, d.T, d.HQ, 0, "(B, T, HQ)");
  get("dg_slc", o.dg_slc, d.T, d.HQ, 0, "(B, T, HQ)");
  get("dg_swa", o.dg_swa, d.T, d.HQ, 0, "(B, T, HQ)");
  get("dk_cmp", o.dk_cmp, C, d.H, d.K, "(B, C, H, K)");
  get("dv_cmp", o.dv_cmp, C, d.H, d.V, "(B, C, H, V)");
  o.has_grads = !o.dq.empty() || !o.dk.empty() || !o.dv.empty();
  return o;
}

}  // namespace nsa
