#include "verify/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/errors.h"
#include "reference/reference.h"

#ifndef NSA_TOOL_VERSION
#define NSA_TOOL_VERSION "unknown"
#endif

namespace nsa::gen {

Philox4x32Counter philox4x32_10(Philox4x32Counter c, Philox4x32Key k) {
  constexpr uint64_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kWeyl0;
      k[1] += kWeyl1;
    }
    const uint64_t p0 = kMul0 * c[0], p1 = kMul1 * c[2];
    c = {uint32_t(p1 >> 32) ^ c[1] ^ k[0], uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k[1], uint32_t(p0)};
  }
  return c;
}

uint64_t fnv1a64(const void* data, std::size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < size; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {

Philox4x32Counter block_of(uint64_t seed, uint64_t stream, uint64_t block) {
  return philox4x32_10({uint32_t(block), uint32_t(block >> 32), uint32_t(stream), uint32_t(stream >> 32)},
                       {uint32_t(seed), uint32_t(seed >> 32)});
}

}  // namespace

uint32_t random_word(uint64_t seed, uint64_t stream, uint64_t n) { return block_of(seed, stream, n / 4)[n % 4]; }

namespace {

constexpr double kTwoPow53 = 9007199254740992.0;

// Both Box–Muller samples of Philox block j, as float32.
std::array<float, 2> normal_pair(uint64_t seed, uint64_t stream, uint64_t j) {
  const Philox4x32Counter w = block_of(seed, stream, j);
  const uint64_t a = ((uint64_t(w[1]) << 32) | w[0]) >> 11;
  const uint64_t b = ((uint64_t(w[3]) << 32) | w[2]) >> 11;
  const double u1 = double((uint64_t(1) << 53) - a) / kTwoPow53;  // (0, 1], exact
  const double u2 = double(b) / kTwoPow53;                       // [0, 1), exact
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double angle = 6.283185307179586 * u2;
  return {float(r * std::cos(angle)), float(r * std::sin(angle))};
}

}  // namespace

float normal_sample(uint64_t seed, uint64_t stream, uint64_t i) { return normal_pair(seed, stream, i / 2)[i % 2]; }

float gate_sample(uint64_t seed, uint64_t stream, uint64_t i) {
  return float(1.0 / (1.0 + std::exp(-double(normal_sample(seed, stream, i)))));
}

std::vector<int64_t> sample_rows(int64_t total, int64_t count, uint64_t seed) {
  std::vector<int64_t> pool(std::max<int64_t>(total, 0));
  std::iota(pool.begin(), pool.end(), 0);
  const int64_t m = std::clamp<int64_t>(count, 0, total);
  const uint64_t stream = stream_id("sample_rows");
  for (int64_t j = 0; j < m; ++j) {
    const int64_t pick = j + int64_t(random_word(seed, stream, j) % uint64_t(total - j));
    std::swap(pool[j], pool[pick]);
  }
  pool.resize(m);
  std::sort(pool.begin(), pool.end());
  return pool;
}

const std::vector<Preset>& presets() {
  static const std::vector<Preset> all = [] {
    std::vector<Preset> v;
    auto add = [&](const char* name, const char* description, int64_t B, int64_t T, int64_t HQ, int64_t H, int64_t K,
                   int64_t V, int64_t BS, int64_t S, int64_t W, Policy policy, DType dtype) {
      GenSpec s;
      s.batch = B, s.seqlen = T, s.heads_q = HQ, s.heads_kv = H, s.dim_k = K, s.dim_v = V;
      s.config.block_size = BS, s.config.block_count = S, s.config.window = W, s.config.policy = policy;
      s.dtype = dtype;
      v.push_back({name, description, s});
    };
    add("tiny", "smoke test: T=37 < 3 blocks, G=2, K=V=16, BS=16, S=2", 1, 37, 4, 2, 16, 16, 16, 2, 0, Policy::Seed,
        DType::F32);
    add("small", "B=2, T=200, HQ=16, H=1, K=V=32, BS=16, S=6 (the peer fixtures' shape)", 2, 200, 16, 1, 32, 32, 16, 6, 0,
        Policy::Paper, DType::F32);
    add("demo", "T=1000, HQ=16, H=1, K=V=64, BS=64, S=16, W=64, bf16", 1, 1000, 16, 1, 64, 64, 64, 16, 64, Policy::Seed,
        DType::BF16);
    add("h100-8k", "the performance anchor: T=8192, HQ=64, H=4, K=V=128, BS=64, S=16, paper policy, bf16", 1, 8192, 64, 4,
        128, 128, 64, 16, 0, Policy::Paper, DType::BF16);
    add("long-64k", "row-sampled verification: T=65536, HQ=16, H=1, K=V=64, BS=64, S=16, bf16", 1, 65536, 16, 1, 64, 64,
        64, 16, 0, Policy::Seed, DType::BF16);
    return v;
  }();
  return all;
}

const Preset& find_preset(const std::string& name) {
  std::string known;
  for (const Preset& p : presets()) {
    if (p.name == name) return p;
    known += (known.empty() ? "" : ", ") + p.name;
  }
  throw InputError("unknown preset '" + name + "' (known: " + known + ")");
}

namespace {

std::vector<double> normals(uint64_t seed, const char* name, int64_t count, DType dtype) {
  const uint64_t stream = stream_id(name);
  std::vector<double> out(count);
  // Each pair depends only on its own counter, so the order of evaluation cannot change a value.
#pragma omp parallel for schedule(static) if (count > (1 << 16))
  for (int64_t j = 0; j < (count + 1) / 2; ++j) {
    const std::array<float, 2> z = normal_pair(seed, stream, j);
    out[2 * j] = round_to(dtype, z[0]);
    if (2 * j + 1 < count) out[2 * j + 1] = round_to(dtype, z[1]);
  }
  return out;
}

std::vector<double> gates(uint64_t seed, const char* name, int64_t count, DType dtype) {
  std::vector<double> out = normals(seed, name, count, DType::F32);
#pragma omp parallel for schedule(static) if (count > (1 << 16))
  for (int64_t i = 0; i < count; ++i) out[i] = round_to(dtype, float(1.0 / (1.0 + std::exp(-out[i]))));
  return out;
}

void require(bool ok, const std::string& problem) {
  if (!ok) throw InputError("gen: " + problem);
}

}  // namespace

Problem generate_problem(const GenSpec& s) {
  require(s.heads_q >= 1 && s.heads_kv >= 1 && s.dim_k >= 1 && s.dim_v >= 1,
          "heads and head dims must be positive (--heads-q --heads-kv --dim-k --dim-v)");
  require(s.heads_q % s.heads_kv == 0, "--heads-q " + std::to_string(s.heads_q) + " is not a multiple of --heads-kv " +
                                           std::to_string(s.heads_kv));
  require(is_float(s.dtype), std::string("--dtype must be a float type, got ") + dtype_flag(s.dtype));
  Dims d;
  std::vector<int64_t> cu;
  if (s.varlen) {
    require(!s.varlen->empty(), "--varlen needs at least one sequence length");
    require(s.batch == 1, "--varlen needs --batch 1, got " + std::to_string(s.batch));
    cu.push_back(0);
    for (int64_t len : *s.varlen) {
      require(len >= 0, "--varlen lengths must be >= 0, got " + std::to_string(len));
      cu.push_back(cu.back() + len);
    }
    d.B = 1;
    d.T = cu.back();
  } else {
    require(s.batch >= 1 && s.seqlen >= 0, "--batch must be >= 1 and --seqlen >= 0");
    d.B = s.batch;
    d.T = s.seqlen;
  }
  d.HQ = s.heads_q, d.H = s.heads_kv, d.K = s.dim_k, d.V = s.dim_v;

  Problem p;
  p.layout = Layout::make(d, s.config, cu, "gen");
  p.cu_seqlens = cu;
  p.input_dtype = s.dtype;
  p.head_first = s.head_first;
  const Layout& L = p.layout;
  const int64_t tokens = d.B * d.T;
  p.q = normals(s.seed, "q", tokens * d.HQ * d.K, s.dtype);
  p.k = normals(s.seed, "k", tokens * d.H * d.K, s.dtype);
  p.v = normals(s.seed, "v", tokens * d.H * d.V, s.dtype);
  if (s.gate_cmp) p.g_cmp = gates(s.seed, "g_cmp", tokens * d.HQ, s.dtype);
  if (s.gate_slc) p.g_slc = gates(s.seed, "g_slc", tokens * d.HQ, s.dtype);
  if (s.gate_swa) p.g_swa = gates(s.seed, "g_swa", tokens * d.HQ, s.dtype);
  if (s.with_grads) p.d_o = normals(s.seed, "do", tokens * d.HQ * d.V, s.dtype);

  const int64_t S = L.S(), BS = L.BS();
  if (s.block_counts) {
    const uint64_t stream = stream_id("block_counts");
    std::vector<int32_t> counts(tokens * d.H);
    for (int64_t r = 0; r < int64_t(counts.size()); ++r) counts[r] = int32_t(random_word(s.seed, stream, r) % uint64_t(S + 1));
    p.block_counts = std::move(counts);
  }
  if (s.given_indices) {
    const uint64_t stream = stream_id("block_indices");
    std::vector<int32_t> idx(tokens * d.H * S, -1);
    std::vector<int32_t> pool;
    for (const Sequence& seq : L.sequences) {
      const int64_t nb = ceil_div(seq.length, BS);
      for (int64_t t = 0; t < seq.length; ++t) {
        const int64_t P = std::min(t / BS + 2, nb), m = std::min(S, P);
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t r = (seq.batch * d.T + seq.start + t) * d.H + h;
          pool.resize(P);
          std::iota(pool.begin(), pool.end(), 0);
          for (int64_t j = 0; j < m; ++j) {
            const int64_t pick = j + int64_t(random_word(s.seed, stream, uint64_t(r * S + j)) % uint64_t(P - j));
            std::swap(pool[j], pool[pick]);
          }
          std::copy(pool.begin(), pool.begin() + m, idx.begin() + r * S);
        }
      }
    }
    p.block_indices = std::move(idx);
    p.metadata["nsa.given_indices"] = "1";
  }
  p.metadata["nsa.seed"] = std::to_string(s.seed);
  p.metadata["nsa.generator"] = kGeneratorName;
  p.metadata["nsa.tool_version"] = NSA_TOOL_VERSION;
  p.metadata["nsa.layout"] = s.head_first ? "bhtd" : "bthd";
  return p;
}

SafetensorsFile generate_fixture(const GenSpec& spec, bool reference, DType out_dtype, int threads) {
  const Problem p = generate_problem(spec);
  SafetensorsFile file = problem_to_file(p);
  if (reference) {
    RunOptions opt;
    opt.threads = threads;
    const Outputs out = ref::run_reference(p, opt);
    add_outputs(file, p, out, out_dtype);
    file.metadata["nsa.reference_precision"] = "f64";
  }
  return file;
}

}  // namespace nsa::gen
