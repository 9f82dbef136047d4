// Timing harness for the selected-attention and sliding-window forward kernels at production shapes
// (not a test). Inputs are random bf16. block_indices come in two patterns:
//   shared: for each token the current block, block 0 and 14 other earlier blocks, the same for every token
//           of an aligned run of 64 tokens (neighbouring tokens select alike: the union path's best case);
//   random: for each token the current block and S-1 distinct random earlier blocks, drawn independently
//           per token (what the real top-k gives on random inputs: neighbours share little beyond the
//           current block).
// Prints median ms and TFLOP/s per shape and pattern, and how many tiles took the union / per-token path,
// after checking a sample of rows against a float64 host computation.
//
// FLOPs (as the published NSA figures count them): selected 2 * T * HQ * S * BS * (K + V);
// sliding window 2 * sum_t min(t + 1, W) * HQ * (K + V).
//
// Build: nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I.
//        cuda/tools/attention_bench.cu cuda/selected_attention.cu cuda/selected_attention_streamed.cu
//        cuda/selected_attention_blocks.cu cuda/sliding_window.cu cuda/attention_sm90.cu -lcuda -o attention_bench
// Add -DNSA_BENCH_OLD_LAUNCHER to time a selected_attention.cu that predates SelectedPath (no path figures).
// Arguments (optional): the selected-attention path, auto | union | per-token | streamed | blocks (default auto); the patterns,
// both | shared | random (default both); a sequence length T to time only the shapes of that length (default all).
// NSA_BENCH_SPAN=n (environment) draws the random pattern's blocks from the n blocks before the current one
// only, a working set of n blocks per kv head (with more repeats between neighbours).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/kernels.h"
#include "cuda/selected_attention_streamed.h"
#include "cuda/tools/tool_util.h"

namespace {

nsa::cuda::SelectedPath g_path = nsa::cuda::SelectedPath::Auto;

using nsa::tools::ok;
using nsa::tools::sorted_run_ms;

// Roughly normal values from a counter hash (sum of four uniforms, variance 1).
__global__ void fill_random(__nv_bfloat16* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (uint32_t r = 0; r < 4; ++r) {
      uint32_t h = uint32_t(i) * 0x9E3779B1u ^ (uint32_t(i >> 32) + seed * 0x85EBCA77u + r * 0xC2B2AE3Du);
      h ^= h >> 16, h *= 0x7feb352du, h ^= h >> 15, h *= 0x846ca68bu, h ^= h >> 16;
      s += float(h) * (1.0f / 4294967296.0f) - 0.5f;
    }
    x[i] = __float2bfloat16(s * 1.7320508f);
  }
}

struct Shape {
  int64_t T, HQ, H, K, V;
  int S, BS, W;  // W > 0: time the sliding window instead
};

std::vector<int32_t> shared_run_indices(const Shape& s) {
  std::vector<int32_t> idx(size_t(s.T * s.H * s.S), -1);
  std::vector<int32_t> others;
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t h = 0; h < s.H; ++h) {
      const int32_t cur = int32_t(t / s.BS);
      std::mt19937_64 rng(uint64_t(t / 64) * 131 + uint64_t(h) * 7 + 1);  // shared by the run of 64 tokens
      std::vector<int32_t> chosen{cur};
      if (cur != 0) chosen.push_back(0);
      for (int tries = 0; tries < 200 && int(chosen.size()) < s.S && cur > 1; ++tries) {
        const int32_t c = 1 + int32_t(rng() % uint64_t(cur - 1));
        if (std::find(chosen.begin(), chosen.end(), c) == chosen.end()) chosen.push_back(c);
      }
      std::copy(chosen.begin(), chosen.end(), &idx[size_t((t * s.H + h) * s.S)]);
    }
  return idx;
}

std::vector<int32_t> random_indices(const Shape& s) {
  std::vector<int32_t> idx(size_t(s.T * s.H * s.S), -1);
  std::mt19937_64 rng(12345);
  const char* span_env = std::getenv("NSA_BENCH_SPAN");
  const int32_t span = span_env && std::atoi(span_env) > 0 ? std::max(s.S, std::atoi(span_env)) : 0;
  std::vector<int32_t> chosen;
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t h = 0; h < s.H; ++h) {
      const int32_t cur = int32_t(t / s.BS);
      chosen.assign(1, cur);
      if (cur < s.S) {  // every earlier block
        for (int32_t c = 0; c < cur; ++c) chosen.push_back(c);
      } else {
        while (int(chosen.size()) < s.S) {
          const int32_t lo = span > 0 && cur > span ? cur - span : 0;
          const int32_t c = lo + int32_t(rng() % uint64_t(cur - lo));
          if (std::find(chosen.begin(), chosen.end(), c) == chosen.end()) chosen.push_back(c);
        }
      }
      std::shuffle(chosen.begin(), chosen.end(), rng);
      std::copy(chosen.begin(), chosen.end(), &idx[size_t((t * s.H + h) * s.S)]);
    }
  return idx;
}

float bf(__nv_bfloat16 x) { return __bfloat162float(x); }

void run(const Shape& s, bool random_pattern) {
  const int64_t nq = s.T * s.HQ * s.K, nk = s.T * s.H * s.K, nv = s.T * s.H * s.V, no = s.T * s.HQ * s.V;
  __nv_bfloat16 *q, *k, *v, *o;
  float* lse;
  int32_t *idx_d, *token_seq, *counts_d;
  nsa::cuda::DeviceSequence* seqs;
  ok(cudaMalloc(&q, nq * 2), "malloc q");
  ok(cudaMalloc(&k, nk * 2), "malloc k");
  ok(cudaMalloc(&v, nv * 2), "malloc v");
  ok(cudaMalloc(&o, no * 2), "malloc o");
  ok(cudaMalloc(&lse, s.T * s.HQ * 4), "malloc lse");
  ok(cudaMalloc(&idx_d, s.T * s.H * s.S * 4), "malloc idx");
  ok(cudaMalloc(&token_seq, s.T * 4), "malloc token_seq");
  ok(cudaMalloc(&counts_d, 3 * 4), "malloc path counts");
  ok(cudaMalloc(&seqs, sizeof(nsa::cuda::DeviceSequence)), "malloc seqs");
  fill_random<<<1024, 256>>>(q, nq, 1);
  fill_random<<<1024, 256>>>(k, nk, 2);
  fill_random<<<1024, 256>>>(v, nv, 3);
  const std::vector<int32_t> idx = random_pattern ? random_indices(s) : shared_run_indices(s);
  ok(cudaMemcpy(idx_d, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice), "idx");
  ok(cudaMemset(token_seq, 0, s.T * 4), "token_seq");
  const nsa::cuda::DeviceSequence seq{0, 0, s.T, 0};
  ok(cudaMemcpy(seqs, &seq, sizeof(seq), cudaMemcpyHostToDevice), "seqs");

  nsa::cuda::DeviceLayout L;
  L.dtype = nsa::cuda::ElemType::BF16;
  L.B = 1, L.T = s.T, L.HQ = s.HQ, L.H = s.H, L.K = s.K, L.V = s.V;
  L.block_size = s.BS, L.block_count = s.S, L.window = s.W;
  L.scale = 1.0f / std::sqrt(float(s.K));
  L.num_seqs = 1, L.max_len = s.T, L.seqs = seqs, L.token_seq = token_seq;

  auto launch = [&](bool count_paths = false) {
    if (s.W > 0)
      nsa::cuda::sliding_window_forward(o, lse, q, k, v, L, nullptr);
    else
#ifdef NSA_BENCH_OLD_LAUNCHER
      (void)count_paths, nsa::cuda::selected_attention_forward(o, lse, q, k, v, idx_d, nullptr, L, nullptr);
#else
      nsa::cuda::selected_attention_forward(o, lse, q, k, v, idx_d, nullptr, L, nullptr, g_path,
                                            count_paths ? counts_d : nullptr);
#endif
  };
  if (s.W == 0 && nsa::cuda::selected_streamed_fits(L, q, k, v))
    std::printf("streamed kernel: %d CTAs per SM\n", nsa::cuda::selected_streamed_ctas_per_sm(L));
  ok(cudaMemset(counts_d, 0, 3 * 4), "clear path counts");
  launch(true);
  ok(cudaDeviceSynchronize(), "first run");
  int32_t paths[3] = {};
  ok(cudaMemcpy(paths, counts_d, 3 * 4, cudaMemcpyDeviceToHost), "path counts");

  // Check 64 random rows in float64 on the host.
  std::vector<__nv_bfloat16> hq(nq), hk(nk), hv(nv), ho(no);
  std::vector<float> hl(s.T * s.HQ);
  ok(cudaMemcpy(hq.data(), q, nq * 2, cudaMemcpyDeviceToHost), "q back");
  ok(cudaMemcpy(hk.data(), k, nk * 2, cudaMemcpyDeviceToHost), "k back");
  ok(cudaMemcpy(hv.data(), v, nv * 2, cudaMemcpyDeviceToHost), "v back");
  ok(cudaMemcpy(ho.data(), o, no * 2, cudaMemcpyDeviceToHost), "o back");
  ok(cudaMemcpy(hl.data(), lse, hl.size() * 4, cudaMemcpyDeviceToHost), "lse back");
  std::mt19937_64 rng(42);
  double err2 = 0, ref2 = 0, lse_err = 0;
  for (int n = 0; n < 64; ++n) {
    const int64_t t = n == 0 ? s.T - 1 : int64_t(rng() % uint64_t(s.T)), i = int64_t(rng() % uint64_t(s.HQ));
    const int64_t h = i / (s.HQ / s.H);
    std::vector<int64_t> keys;
    if (s.W > 0) {
      for (int64_t j = std::max<int64_t>(0, t - s.W + 1); j <= t; ++j) keys.push_back(j);
    } else {
      for (int j = 0; j < s.S; ++j) {
        const int32_t c = idx[size_t((t * s.H + h) * s.S + j)];
        if (c < 0 || int64_t(c) * s.BS > t) continue;
        for (int64_t x = int64_t(c) * s.BS; x <= std::min<int64_t>(int64_t(c + 1) * s.BS - 1, t); ++x) keys.push_back(x);
      }
    }
    std::vector<double> z;
    for (int64_t j : keys) {
      double d = 0;
      for (int64_t x = 0; x < s.K; ++x) d += double(bf(hq[(t * s.HQ + i) * s.K + x])) * bf(hk[(j * s.H + h) * s.K + x]);
      z.push_back(d * L.scale);
    }
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (double e : z) sum += std::exp(e - m);
    for (int64_t x = 0; x < s.V; ++x) {
      double acc = 0;
      for (size_t j = 0; j < keys.size(); ++j) acc += std::exp(z[j] - m) / sum * bf(hv[(keys[j] * s.H + h) * s.V + x]);
      const double got = bf(ho[(t * s.HQ + i) * s.V + x]);
      err2 += (got - acc) * (got - acc);
      ref2 += acc * acc;
    }
    lse_err = std::max(lse_err, std::abs(hl[t * s.HQ + i] - (m + std::log(sum))));
  }

  for (int w = 0; w < 3; ++w) launch();
  const std::vector<float> ms = sorted_run_ms(15, launch);
  double flops;
  if (s.W > 0) {
    double keys = 0;
    for (int64_t t = 0; t < s.T; ++t) keys += double(std::min<int64_t>(t + 1, s.W));
    flops = 2.0 * keys * s.HQ * (s.K + s.V);
  } else {
    flops = 2.0 * s.T * s.HQ * s.S * s.BS * (s.K + s.V);
  }
  const double med = ms[ms.size() / 2];
  // Distinct 64-key tiles over runs of 8 tokens of one kv head (what the streamed kernel loads), as GB/s.
  double distinct_bytes = 0;
  if (s.W == 0) {
    std::vector<int32_t> run_blocks;
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t0 = 0; t0 < s.T; t0 += 8) {
        run_blocks.clear();
        for (int64_t t = t0; t < std::min<int64_t>(t0 + 8, s.T); ++t)
          for (int j = 0; j < s.S; ++j) {
            const int32_t c = idx[size_t((t * s.H + h) * s.S + j)];
            if (c >= 0 && int64_t(c) * s.BS <= t) run_blocks.push_back(c);
          }
        std::sort(run_blocks.begin(), run_blocks.end());
        const auto end = std::unique(run_blocks.begin(), run_blocks.end());
        distinct_bytes += double(end - run_blocks.begin()) * s.BS * (s.K + s.V) * 2;
      }
    distinct_bytes *= double(std::max<int64_t>(s.HQ / s.H / 16, 1));
  }
  std::printf("%-9s %-6s T=%6lld HQ=%3lld H=%2lld G=%2lld K=%3lld V=%3lld S=%2d BS=%3d W=%4d | %8.3f ms (min %8.3f) %7.1f "
              "TFLOP/s | distinct tiles %.1f GB, %.2f TB/s | CTAs union/per-token/streamed %d/%d/%d | sample rel-L2 %.2e, max |lse err| %.1e\n",
              s.W > 0 ? "window" : "selected", s.W > 0 ? "-" : random_pattern ? "random" : "shared", (long long)s.T, (long long)s.HQ, (long long)s.H,
              (long long)(s.HQ / s.H), (long long)s.K, (long long)s.V, s.S, s.BS, s.W, med, ms[0], flops / med * 1e-9,
              distinct_bytes * 1e-9, distinct_bytes / med * 1e-9, paths[0], paths[1], paths[2], std::sqrt(err2 / ref2), lse_err);
  std::fflush(stdout);
  cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(o), cudaFree(lse), cudaFree(idx_d), cudaFree(token_seq), cudaFree(seqs);
  cudaFree(counts_d);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "auto", patterns = argc > 2 ? argv[2] : "both";
  const int64_t only_t = argc > 3 ? std::atoll(argv[3]) : 0;
  if (path == "union") g_path = nsa::cuda::SelectedPath::Union;
  else if (path == "per-token") g_path = nsa::cuda::SelectedPath::PerToken;
  else if (path == "streamed") g_path = nsa::cuda::SelectedPath::Streamed;
  else if (path == "blocks") g_path = nsa::cuda::SelectedPath::Blocks;
  else if (path != "auto") return std::fprintf(stderr, "path: auto | union | per-token | streamed | blocks\n"), 2;
  if (patterns != "both" && patterns != "shared" && patterns != "random")
    return std::fprintf(stderr, "patterns: both | shared | random\n"), 2;
  cudaDeviceProp prop;
  ok(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const std::vector<Shape> shapes = {
      {8192, 64, 4, 128, 128, 16, 64, 0},   {32768, 64, 4, 128, 128, 16, 64, 0},
      {65536, 64, 4, 128, 128, 16, 64, 0},  {32768, 16, 4, 128, 128, 16, 64, 0},  // G = 4
      {32768, 16, 16, 128, 128, 16, 64, 0},                                       // G = 1
      {32768, 16, 1, 128, 128, 16, 64, 0},                                        // G = 16, HQ = 16
      {32768, 64, 4, 128, 128, 16, 64, 512},                                      // sliding window
  };
  std::printf("path %s\n", path.c_str());
  for (const Shape& s : shapes) {
    if (only_t > 0 && s.T != only_t) continue;
    if (s.W > 0 || patterns != "random") run(s, false);
    if (s.W == 0 && patterns != "shared") run(s, true);
  }
  return 0;
}
