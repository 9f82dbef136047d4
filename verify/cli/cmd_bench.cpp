// nsa-verify bench: time each forward stage of a backend on one shape, and with --backward the whole backward
// pass, with FLOP counts, TFLOP/s and the fraction of the device's dense bf16 peak.
//
// FLOP counts (multiply-add = 2), summed over every query token t of every sequence (positions within the
// sequence), HQ query heads:
//   mean pooling         B*T*H*(K+V)                          (one add per input element; memory-bound)
//   compressed attention 2*HQ*(K+V) * NC(t),     NC(t) = floor((t+1)/BS)
//   top-k scores         2*HQ*K * n(t),          n(t) = floor(t/BS) (seed) or NC(t) (paper): the q.k pass
//   selected attention   2*HQ*(K+V) * keys(t),   keys(t) = (t mod BS) + 1 + BS * min(S-1, floor(t/BS)):
//                        the current block up to t plus S-1 complete earlier blocks; for t >= S*BS this is
//                        about S*BS, i.e. 4*T*HQ*S*BS*K when K = V, less the causal part of short prefixes
//   sliding window       2*HQ*(K+V) * min(t+1, W)
//   gating               2*B*T*HQ*V per present branch
//   backward (--backward), per stage: each attention branch 2*HQ*(3K+2V) per (row, key) of its forward: Q K^T
//                        recomputed, dO V^T, P^T dO, dS^T Q and dS K (FlashAttention's count, 2.5x the forward at
//                        K = V); the gate and mean pooling as their forwards; the whole pass is their sum
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>
#include <omp.h>

#include "core/errors.h"
#include "reference/reference.h"
#include "verify/cli/commands.h"
#ifdef NSA_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace nsa::cli {
namespace {

struct BenchArgs {
  std::string backend = "cuda";
  int64_t batch = 1, seqlen = 8192, heads_q = 64, heads_kv = 4, dim_k = 128, dim_v = 128;
  int64_t block_size = 64, block_count = 16, window = 0;
  std::string policy = "seed";
  std::string dtype = "bf16";
  int warmup = 3, iters = 10, threads = 0;
  uint64_t seed = 1;
  bool no_sm90_kernels = false;  // cuda: the kernels an sm_80 GPU runs, even on an sm_90 device
  int smem_limit_kb = 0;         // cuda: > 0, those kernels' CTAs within this much shared memory (DeviceLayout)
  bool backward = false;         // also time the backward pass
  std::string json;
};

struct StageResult {
  std::string name;
  double ms = 0, flop = 0;
};

// FLOP counts of every stage, by the formulas at the top of this file.
struct FlopCounts {
  double mean_pool = 0, compressed = 0, topk = 0, selected = 0, sliding = 0, gate = 0;
  // The backward's stages.
  double compressed_bwd = 0, selected_bwd = 0, sliding_bwd = 0;
  double backward() const { return gate + selected_bwd + sliding_bwd + compressed_bwd + mean_pool; }
};

FlopCounts count_flops(const Layout& L, bool window, int gates) {
  const Dims& d = L.dims;
  const double HQ = double(d.HQ), K = double(d.K), V = double(d.V);
  const int64_t BS = L.BS(), S = L.S(), W = L.config.window;
  FlopCounts f;
  f.mean_pool = double(d.B) * double(d.T) * double(d.H) * (K + V);
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t) {
      const double nc = double((t + 1) / BS), cur = double(t / BS);
      f.compressed += 2 * HQ * (K + V) * nc;
      f.topk += 2 * HQ * K * (L.config.policy == Policy::Seed ? cur : nc);
      const double keys = double(t % BS + 1 + BS * std::min<int64_t>(S - 1, t / BS));
      f.selected += 2 * HQ * (K + V) * keys;
      if (window) f.sliding += 2 * HQ * (K + V) * double(std::min<int64_t>(t + 1, W));
    }
  f.gate = 2.0 * double(d.B) * double(d.T) * HQ * V * gates;
  // Each attention branch's (row, key) pairs are its forward FLOPs over 2 (K + V).
  const double bwd = (3 * K + 2 * V) / (K + V);
  f.compressed_bwd = f.compressed * bwd, f.selected_bwd = f.selected * bwd, f.sliding_bwd = f.sliding * bwd;
  return f;
}

Layout bench_layout(const BenchArgs& a) {
  if (a.seqlen < 1 || a.batch < 1 || a.heads_q < 1 || a.heads_kv < 1 || a.dim_k < 1 || a.dim_v < 1)
    throw InputError("bench: every shape flag must be positive");
  if (a.heads_q % a.heads_kv != 0)
    throw InputError("bench: --heads-q " + std::to_string(a.heads_q) + " is not a multiple of --heads-kv " +
                     std::to_string(a.heads_kv));
  if (a.iters < 1 || a.warmup < 0) throw InputError("bench: --iters must be >= 1 and --warmup >= 0");
  Config c;
  c.block_size = a.block_size;
  c.block_count = a.block_count;
  c.window = a.window;
  c.policy = policy_from_name(a.policy);
  return Layout::make(Dims{a.batch, a.seqlen, a.heads_q, a.heads_kv, a.dim_k, a.dim_v}, c, {}, "bench");
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU: the float64 reference stages on random inputs, timed by the host clock.
std::vector<StageResult> bench_cpu(const BenchArgs& a, const Layout& L, const FlopCounts& f) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const Dims& d = L.dims;
  const int64_t tokens = d.B * d.T;
  std::mt19937_64 rng(a.seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.05, 0.95);
  auto fill = [&](std::size_t n, bool gaussian) {
    std::vector<double> x(n);
    for (double& e : x) e = gaussian ? normal(rng) : uniform(rng);
    return x;
  };
  const std::vector<double> q = fill(tokens * d.HQ * d.K, true), k = fill(tokens * d.H * d.K, true),
                            v = fill(tokens * d.H * d.V, true), g_cmp = fill(tokens * d.HQ, false),
                            g_slc = fill(tokens * d.HQ, false), g_swa = fill(tokens * d.HQ, false);
  std::vector<double> k_cmp(d.B * L.chunks * d.H * d.K), v_cmp(d.B * L.chunks * d.H * d.V);
  std::vector<double> o_cmp(tokens * d.HQ * d.V), lse_cmp(tokens * d.HQ), o_slc(o_cmp.size()), lse_slc(lse_cmp.size());
  std::vector<double> o_swa(L.config.window > 0 ? o_cmp.size() : 0), lse_swa(o_swa.empty() ? 0 : lse_cmp.size());
  std::vector<double> o(o_cmp.size());
  std::vector<int32_t> idx(tokens * d.H * L.S());
  const bool window = L.config.window > 0;

  std::vector<StageResult> r;
  auto time = [&](const char* name, double flop, const std::function<void()>& work) {
    for (int i = 0; i < a.warmup; ++i) work();
    const double t0 = now_ms();
    for (int i = 0; i < a.iters; ++i) work();
    r.push_back({name, (now_ms() - t0) / a.iters, flop});
  };
  time("mean_pool", f.mean_pool, [&] { ref::mean_pool_forward(k_cmp.data(), v_cmp.data(), k.data(), v.data(), L); });
  time("compressed_attention", f.compressed, [&] {
    ref::compressed_attention_forward(o_cmp.data(), lse_cmp.data(), q.data(), k_cmp.data(), v_cmp.data(), L);
  });
  time("topk", f.topk, [&] { ref::topk_forward(idx.data(), q.data(), k_cmp.data(), lse_cmp.data(), L); });
  time("selected_attention", f.selected, [&] {
    ref::selected_attention_forward(o_slc.data(), lse_slc.data(), q.data(), k.data(), v.data(), idx.data(), nullptr, L);
  });
  if (window)
    time("sliding_window", f.sliding, [&] {
      ref::sliding_window_forward(o_swa.data(), lse_swa.data(), q.data(), k.data(), v.data(), L);
    });
  time("gate", f.gate, [&] {
    ref::gate_forward(o.data(), o_cmp.data(), o_slc.data(), window ? o_swa.data() : nullptr, g_cmp.data(), g_slc.data(),
                      window ? g_swa.data() : nullptr, L);
  });
  double full = 0, flop = 0;
  for (const StageResult& s : r) full += s.ms, flop += s.flop;
  r.push_back({"full_forward", full, flop});  // sum of the stages: the reference runs them back to back
  if (a.backward) {
    const std::vector<double> d_o = fill(tokens * d.HQ * d.V, true);
    std::vector<double> dq(tokens * d.HQ * d.K), dk(tokens * d.H * d.K), dv(tokens * d.H * d.V),
        dk_cmp(k_cmp.size()), dv_cmp(v_cmp.size()), dg_cmp(tokens * d.HQ), dg_slc(dg_cmp.size()), dg_swa(dg_cmp.size()),
        do_cmp(o.size()), do_slc(o.size()), do_swa(window ? o.size() : 0);
    const std::size_t first = r.size();
    time("gate_backward", f.gate, [&] {
      ref::gate_backward(dg_cmp.data(), dg_slc.data(), window ? dg_swa.data() : nullptr, do_cmp.data(), do_slc.data(),
                         window ? do_swa.data() : nullptr, d_o.data(), o_cmp.data(), o_slc.data(),
                         window ? o_swa.data() : nullptr, g_cmp.data(), g_slc.data(), window ? g_swa.data() : nullptr, L);
    });
    time("selected_attention_backward", f.selected_bwd, [&] {
      ref::selected_attention_backward(dq.data(), dk.data(), dv.data(), do_slc.data(), q.data(), k.data(), v.data(),
                                       o_slc.data(), lse_slc.data(), idx.data(), nullptr, L);
    });
    if (window)
      time("sliding_window_backward", f.sliding_bwd, [&] {
        ref::sliding_window_backward(dq.data(), dk.data(), dv.data(), do_swa.data(), q.data(), k.data(), v.data(),
                                     o_swa.data(), lse_swa.data(), L);
      });
    time("compressed_attention_backward", f.compressed_bwd, [&] {
      ref::compressed_attention_backward(dq.data(), dk_cmp.data(), dv_cmp.data(), do_cmp.data(), q.data(), k_cmp.data(),
                                         v_cmp.data(), o_cmp.data(), lse_cmp.data(), L);
    });
    time("mean_pool_backward", f.mean_pool,
         [&] { ref::mean_pool_backward(dk.data(), dv.data(), dk_cmp.data(), dv_cmp.data(), L); });
    double total = 0;
    for (std::size_t i = first; i < r.size(); ++i) total += r[i].ms;
    r.push_back({"backward", total, f.backward()});  // sum of the stages, as full_forward
  }
  return r;
}

#ifdef NSA_HAVE_CUDA
std::vector<StageResult> bench_cuda(const BenchArgs& a, const Layout& L, const FlopCounts& f) {
  cuda::PipelineOptions po;
  const DType dt = dtype_from_flag(a.dtype);
  if (dt != DType::BF16 && dt != DType::F16 && dt != DType::F32)
    throw InputError("bench: --dtype for cuda must be bf16, f16 or f32");
  po.dtype = dt == DType::BF16 ? cuda::ElemType::BF16 : dt == DType::F16 ? cuda::ElemType::F16 : cuda::ElemType::F32;
  po.gate_swa = L.config.window > 0;
  po.sm90_kernels = !a.no_sm90_kernels && a.smem_limit_kb == 0;
  po.smem_limit = int64_t(a.smem_limit_kb) * 1024;
  po.backward = a.backward;
  cuda::CudaPipeline pipe(L, po);
  pipe.fill_random(a.seed);
  pipe.forward();  // real top-k indices for the selected stage, and everything warm
  const bool window = L.config.window > 0;
  std::vector<StageResult> r;
  auto time = [&](cuda::Stage s, double flop) {
    r.push_back({cuda::stage_name(s), pipe.time_ms([&] { pipe.run(s); }, a.warmup, a.iters), flop});
  };
  time(cuda::Stage::MeanPool, f.mean_pool);
  time(cuda::Stage::Compressed, f.compressed);
  time(cuda::Stage::Topk, f.topk);
  time(cuda::Stage::Selected, f.selected);
  if (window) time(cuda::Stage::SlidingWindow, f.sliding);
  time(cuda::Stage::Gate, f.gate);
  time(cuda::Stage::SelectedGated, f.selected + f.gate);  // the two fused where the pipeline can
  const double flop = f.mean_pool + f.compressed + f.topk + f.selected + (window ? f.sliding : 0) + f.gate;
  r.push_back({"full_forward", pipe.time_ms([&] { pipe.forward(); }, a.warmup, a.iters), flop});
  if (a.backward) {
    pipe.backward();  // gradients in place and everything warm
    auto time_bwd = [&](const char* name, cuda::Stage s, double stage_flop) {
      r.push_back({name, pipe.time_ms([&] { pipe.run_backward(s); }, a.warmup, a.iters), stage_flop});
    };
    time_bwd("gate_backward", cuda::Stage::Gate, f.gate);
    time_bwd("selected_attention_backward", cuda::Stage::Selected, f.selected_bwd);
    if (window) time_bwd("sliding_window_backward", cuda::Stage::SlidingWindow, f.sliding_bwd);
    time_bwd("compressed_attention_backward", cuda::Stage::Compressed, f.compressed_bwd);
    time_bwd("mean_pool_backward", cuda::Stage::MeanPool, f.mean_pool);
    r.push_back({"backward", pipe.time_ms([&] { pipe.backward(); }, a.warmup, a.iters), f.backward()});
  }
  return r;
}
#endif

int run_bench(const BenchArgs& a) {
  const Layout L = bench_layout(a);
  const bool window = L.config.window > 0;
  const FlopCounts f = count_flops(L, window, window ? 3 : 2);
  std::string device = "CPU (float64 reference, " + std::to_string(a.threads > 0 ? a.threads : omp_get_max_threads()) +
                       " threads)";
  double peak_tflops = 0;
  std::vector<StageResult> results;
  if (a.backend == "cpu") {
    results = bench_cpu(a, L, f);
  } else {
#ifdef NSA_HAVE_CUDA
    if (cuda::device_count() == 0) throw InputError("bench: backend 'cuda': no CUDA device is available");
    const cuda::DeviceInfo info = cuda::device_info();
    device = info.name + " (" + std::to_string(info.sm_count) + " SMs, sm_" + std::to_string(info.cc_major) +
             std::to_string(info.cc_minor) + (a.no_sm90_kernels || a.smem_limit_kb ? ", sm_90 kernels off" : "") +
             (a.smem_limit_kb ? ", CTAs within " + std::to_string(a.smem_limit_kb) + " KB" : "") + ")";
    peak_tflops = info.bf16_dense_peak_tflops;
    results = bench_cuda(a, L, f);
#else
    throw InputError("bench: backend 'cuda' is not available: this nsa-verify was built without a CUDA compiler");
#endif
  }

  const Dims& d = L.dims;
  std::printf("device: %s\n", device.c_str());
  std::printf("shape: B=%lld T=%lld HQ=%lld H=%lld G=%lld K=%lld V=%lld BS=%lld S=%lld W=%lld policy=%s dtype=%s\n",
              (long long)d.B, (long long)d.T, (long long)d.HQ, (long long)d.H, (long long)d.G(), (long long)d.K,
              (long long)d.V, (long long)L.BS(), (long long)L.S(), (long long)L.config.window,
              policy_name(L.config.policy), a.backend == "cpu" ? "f64" : a.dtype.c_str());
  if (peak_tflops > 0) std::printf("dense bf16 peak: %.0f TFLOP/s\n", peak_tflops);
  std::printf("%-30s %12s %12s %10s %8s\n", "stage", "ms", "GFLOP", "TFLOP/s", "%peak");
  nlohmann::json js;
  js["backend"] = a.backend;
  js["device"] = device;
  js["peak_tflops"] = peak_tflops;
  js["shape"] = {{"B", d.B}, {"T", d.T}, {"HQ", d.HQ}, {"H", d.H}, {"K", d.K}, {"V", d.V}, {"BS", L.BS()},
                 {"S", L.S()}, {"W", L.config.window}, {"policy", policy_name(L.config.policy)}, {"dtype", a.dtype}};
  js["warmup"] = a.warmup;
  js["iters"] = a.iters;
  js["stages"] = nlohmann::json::array();
  for (const StageResult& s : results) {
    const double tflops = s.ms > 0 ? s.flop / (s.ms * 1e-3) / 1e12 : 0;
    const double frac = peak_tflops > 0 ? tflops / peak_tflops : 0;
    if (peak_tflops > 0)
      std::printf("%-30s %12.4f %12.3f %10.2f %7.1f%%\n", s.name.c_str(), s.ms, s.flop / 1e9, tflops, 100 * frac);
    else
      std::printf("%-30s %12.4f %12.3f %10.4f %8s\n", s.name.c_str(), s.ms, s.flop / 1e9, tflops, "-");
    js["stages"].push_back({{"name", s.name}, {"ms", s.ms}, {"flop", s.flop}, {"tflops", tflops}, {"peak_fraction", frac}});
  }
  if (!a.json.empty()) {
    std::ofstream out(a.json);
    if (!out) throw InputError("bench: cannot write --json file '" + a.json + "'");
    out << js.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

void setup_bench(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "time each forward stage of a backend on one shape, and the backward (ms, TFLOP/s, % of peak)");
  cmd->footer(
      "Examples:\n"
      "  nsa-verify bench --backend cuda --seqlen 65536 --heads-q 64 --heads-kv 4 --dim-k 128 --dim-v 128 \\\n"
      "      --block-size 64 --block-count 16 --dtype bf16 --json bench.json\n"
      "  nsa-verify bench --backend cpu --seqlen 1024 --heads-q 16 --heads-kv 1 --dim-k 64 --dim-v 64 --iters 1\n"
      "  nsa-verify bench --backend cuda --seqlen 8192 --heads-q 64 --heads-kv 4 --backward --warmup 1 --iters 2");
  cmd->add_option("--backend", args->backend, "backend: cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--batch", args->batch, "batch rows B");
  cmd->add_option("--seqlen", args->seqlen, "tokens per row T");
  cmd->add_option("--heads-q", args->heads_q, "query heads HQ");
  cmd->add_option("--heads-kv", args->heads_kv, "kv heads H (HQ must be a multiple)");
  cmd->add_option("--dim-k", args->dim_k, "key/query dim K");
  cmd->add_option("--dim-v", args->dim_v, "value dim V");
  cmd->add_option("--block-size", args->block_size, "block size BS");
  cmd->add_option("--block-count", args->block_count, "selected blocks per query S");
  cmd->add_option("--window", args->window, "sliding window W (0 = off)");
  cmd->add_option("--policy", args->policy, "top-k policy")->check(CLI::IsMember({"seed", "paper"}));
  cmd->add_option("--dtype", args->dtype, "input dtype of the cuda backend")->check(CLI::IsMember({"bf16", "f16", "f32"}));
  cmd->add_option("--warmup", args->warmup, "untimed runs first");
  cmd->add_option("--iters", args->iters, "timed runs (the mean is reported)");
  cmd->add_option("--threads", args->threads, "CPU threads for the cpu backend (default: all)");
  cmd->add_option("--seed", args->seed, "seed of the random inputs");
  cmd->add_option("--json", args->json, "write the results as JSON to this file");
  cmd->add_flag("--no-sm90-kernels", args->no_sm90_kernels,
                "cuda: run the kernels an sm_80 GPU runs, also on an sm_90 device (wgmma/TMA kernels off)");
  cmd->add_option("--smem-limit-kb", args->smem_limit_kb,
                  "cuda: size the sm_80 kernels' CTAs for a GPU of this much shared memory a CTA, e.g. 99 for "
                  "sm_86 / sm_89 (implies --no-sm90-kernels)")
      ->check(CLI::Range(16, 1024));
  cmd->add_flag("--backward", args->backward,
                "also time the backward pass (gate, the three branches, mean pooling) on a random upstream gradient");
  cmd->callback([args] { g_exit_code = run_bench(*args); });
}

}  // namespace nsa::cli
