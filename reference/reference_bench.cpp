// CPU reference timings at the shape of the spec's CPU anchor (nsa-spec §7: the PyTorch naive peer needs 60 s
// forward + 82 s backward on 2 threads): B=1, T=4096, HQ=16, H=1, K=V=64, S=16, BS=64, float64, 2 threads.
// Besides the whole pipeline, the selected-attention stage alone, which dominates it. "CPU" is the whole
// process's CPU time: on an otherwise idle machine, wall time is about CPU / 2.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <random>

#include "reference/reference.h"

namespace nsa::ref {
namespace {

constexpr int kThreads = 2;

Problem anchor_problem(int64_t T) {
  const Dims d{1, T, 16, 1, 64, 64};
  Problem p;
  p.layout = Layout::make(d, Config{}, {});
  p.input_dtype = DType::F64;
  std::mt19937_64 rng(2024);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> gate(0.05, 0.95);
  auto fill = [&](int64_t n, auto& dist) {
    std::vector<double> v(n);
    for (double& x : v) x = dist(rng);
    return v;
  };
  p.q = fill(T * d.HQ * d.K, normal);
  p.k = fill(T * d.H * d.K, normal);
  p.v = fill(T * d.H * d.V, normal);
  p.g_cmp = fill(T * d.HQ, gate);
  p.g_slc = fill(T * d.HQ, gate);
  p.d_o = fill(T * d.HQ * d.V, normal);
  return p;
}

void BM_PipelineForward(benchmark::State& state) {
  const Problem p = anchor_problem(state.range(0));
  RunOptions opt;
  opt.threads = kThreads;
  opt.backward = false;
  for (auto _ : state) benchmark::DoNotOptimize(run_reference(p, opt).o.data());
}

void BM_PipelineForwardBackward(benchmark::State& state) {
  const Problem p = anchor_problem(state.range(0));
  RunOptions opt;
  opt.threads = kThreads;
  for (auto _ : state) benchmark::DoNotOptimize(run_reference(p, opt).dq.data());
}

// The selected-attention stage on the pipeline's own top-k selection.
void BM_SelectedAttention(benchmark::State& state, bool backward) {
  const Problem p = anchor_problem(state.range(0));
  RunOptions opt;
  opt.threads = kThreads;
  opt.backward = false;
  const Outputs fwd = run_reference(p, opt);
  const Layout& L = p.layout;
  const Dims& d = L.dims;
  std::vector<double> o(fwd.o_slc.size()), lse(fwd.lse_slc.size());
  std::vector<double> dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
  for (auto _ : state) {
    if (backward)
      selected_attention_backward(dq.data(), dk.data(), dv.data(), p.d_o->data(), p.q.data(), p.k.data(), p.v.data(),
                                  fwd.o_slc.data(), fwd.lse_slc.data(), fwd.block_indices.data(), nullptr, L);
    else
      selected_attention_forward(o.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), fwd.block_indices.data(),
                                 nullptr, L);
    benchmark::ClobberMemory();
  }
  // Two GEMMs forward (q k^T, p v), five backward, each 2 * G * keys * dim FLOP per (token, kv head).
  double keys = 0;
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t j = 0; j < L.S(); ++j) {
      const int32_t c = fwd.block_indices[t * L.S() + j];
      if (c >= 0 && c * L.BS() <= t) keys += double(std::min(c * L.BS() + L.BS() - 1, t) - c * L.BS() + 1);
    }
  const double flop = 2.0 * d.HQ * keys * (backward ? 3 * d.K + 2 * d.V : d.K + d.V);
  state.counters["GFLOP/s"] = benchmark::Counter(flop * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_SelectedForward(benchmark::State& state) { BM_SelectedAttention(state, false); }
void BM_SelectedBackward(benchmark::State& state) { BM_SelectedAttention(state, true); }

BENCHMARK(BM_PipelineForward)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime()->MinTime(2.0);
BENCHMARK(BM_PipelineForwardBackward)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime()->MinTime(2.0);
BENCHMARK(BM_SelectedForward)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime()->MinTime(2.0);
BENCHMARK(BM_SelectedBackward)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime()->MinTime(2.0);

}  // namespace
}  // namespace nsa::ref

int main(int argc, char** argv) {
  omp_set_num_threads(nsa::ref::kThreads);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
