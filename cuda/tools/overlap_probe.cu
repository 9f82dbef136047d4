// Timing probe (not a test): does selected attention, bound by the L2, overlap with compressed attention and
// top-k, bound by latency, when they run on two streams? B = 1, T = 65536 (or argv[1]), HQ = 64, H = 4,
// K = V = 128, BS = 64, S = 16, bf16, random inputs, the real top-k as selections. Prints the mean ms of the
// three stages in sequence, and of {compressed + top-k} on one stream beside {selected} on another (each
// reading its own buffers, so they are independent), with either stream at the higher priority, and with the
// two streams in green contexts that split the SMs between them.
//
// Build: nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I.
//        cuda/tools/overlap_probe.cu build/cuda/libnsa_cuda.a -o overlap_probe
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda/kernels.h"
#include "cuda/tools/tool_util.h"

namespace {

using nsa::tools::ok;

void* alloc(size_t bytes) {
  void* p = nullptr;
  ok(cudaMalloc(&p, bytes), "cudaMalloc");
  return p;
}

template <typename F>
F driver(const char* name, int version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
  ok(cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &status), name);
  if (!fn || status != cudaDriverEntryPointSuccess) {
    std::fprintf(stderr, "no driver entry point %s\n", name);
    std::exit(1);
  }
  return reinterpret_cast<F>(fn);
}

// Two streams in green contexts: the first on `sms` SMs, the second on the rest of the device.
void green_streams(int sms, cudaStream_t& a, cudaStream_t& b) {
  static auto get = driver<PFN_cuDeviceGetDevResource_v12040>("cuDeviceGetDevResource", 12040);
  static auto split = driver<PFN_cuDevSmResourceSplitByCount_v12040>("cuDevSmResourceSplitByCount", 12040);
  static auto desc = driver<PFN_cuDevResourceGenerateDesc_v12040>("cuDevResourceGenerateDesc", 12040);
  static auto create = driver<PFN_cuGreenCtxCreate_v12040>("cuGreenCtxCreate", 12040);
  static auto stream = driver<PFN_cuGreenCtxStreamCreate_v12050>("cuGreenCtxStreamCreate", 12050);
  auto check = [](CUresult r, const char* what) {
    if (r != CUDA_SUCCESS) {
      std::fprintf(stderr, "%s failed: %d\n", what, int(r));
      std::exit(1);
    }
  };
  CUdevResource all{}, part{}, rest{};
  check(get(0, &all, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource");
  unsigned groups = 1;
  check(split(&part, &groups, &all, &rest, 0, unsigned(sms)), "cuDevSmResourceSplitByCount");
  CUdevResourceDesc da{}, db{};
  check(desc(&da, &part, 1), "cuDevResourceGenerateDesc");
  check(desc(&db, &rest, 1), "cuDevResourceGenerateDesc");
  CUgreenCtx ga{}, gb{};
  check(create(&ga, da, 0, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate");
  check(create(&gb, db, 0, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate");
  CUstream sa{}, sb{};
  check(stream(&sa, ga, CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate");
  check(stream(&sb, gb, CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate");
  std::printf("green contexts: %u SMs / %u SMs\n", part.sm.smCount, rest.sm.smCount);
  a = sa, b = sb;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace nsa::cuda;
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 65536;
  DeviceLayout L;
  L.dtype = ElemType::BF16;
  L.B = 1, L.T = T, L.HQ = 64, L.H = 4, L.K = 128, L.V = 128;
  L.block_size = 64, L.block_count = 16, L.window = 0;
  L.C = T / 64;
  L.scale = 1.f / std::sqrt(128.f);
  L.num_seqs = 1, L.max_len = T;
  const DeviceSequence seq{0, 0, T, 0};
  auto* seqs = static_cast<DeviceSequence*>(alloc(sizeof(seq)));
  ok(cudaMemcpy(seqs, &seq, sizeof(seq), cudaMemcpyHostToDevice), "seqs");
  L.seqs = seqs;
  auto* token_seq = static_cast<int32_t*>(alloc(T * 4));
  ok(cudaMemset(token_seq, 0, T * 4), "token_seq");
  L.token_seq = token_seq;

  const size_t nq = T * L.HQ * L.K, nkv = T * L.H * L.K, nc = L.C * L.H * L.K;
  void *q = alloc(nq * 2), *k = alloc(nkv * 2), *v = alloc(nkv * 2), *kc = alloc(nc * 2), *vc = alloc(nc * 2);
  void *o_cmp = alloc(nq * 2), *o_slc = alloc(nq * 2);
  auto* lse_cmp = static_cast<float*>(alloc(T * L.HQ * 4));
  auto* lse_slc = static_cast<float*>(alloc(T * L.HQ * 4));
  auto* idx_a = static_cast<int32_t*>(alloc(T * L.H * 16 * 4));
  auto* idx_b = static_cast<int32_t*>(alloc(T * L.H * 16 * 4));
  fill_random(q, nq, ElemType::BF16, 1, true, 0, 0, nullptr);
  fill_random(k, nkv, ElemType::BF16, 2, true, 0, 0, nullptr);
  fill_random(v, nkv, ElemType::BF16, 3, true, 0, 0, nullptr);
  mean_pool_forward(kc, vc, k, v, L, nullptr);
  compressed_attention_forward(o_cmp, lse_cmp, q, kc, vc, L, nullptr);
  topk_forward(idx_a, q, kc, lse_cmp, L, nullptr);
  ok(cudaDeviceSynchronize(), "setup");

  int lo = 0, hi = 0;
  ok(cudaDeviceGetStreamPriorityRange(&lo, &hi), "priorities");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto time = [&](const char* name, auto&& body) {
    body();
    ok(cudaDeviceSynchronize(), name);
    const int iters = 10;
    cudaEventRecord(e0, nullptr);
    for (int i = 0; i < iters; ++i) body();
    cudaEventRecord(e1, nullptr);
    ok(cudaEventSynchronize(e1), name);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    std::printf("%-40s %8.3f ms\n", name, ms / iters);
  };
  auto first = [&](cudaStream_t s) {
    compressed_attention_forward(o_cmp, lse_cmp, q, kc, vc, L, s);
    topk_forward(idx_b, q, kc, lse_cmp, L, s);
  };
  auto second = [&](cudaStream_t s) { selected_attention_forward(o_slc, lse_slc, q, k, v, idx_a, nullptr, L, s); };
  time("compressed + top-k", [&] { first(nullptr); });
  time("selected", [&] { second(nullptr); });
  time("compressed + top-k, then selected", [&] {
    first(nullptr);
    second(nullptr);
  });
  // {compressed + top-k} on stream a and / or {selected} on stream b (launched first), forked from and joined
  // to the default stream.
  cudaEvent_t fork, join_a, join_b;
  cudaEventCreateWithFlags(&fork, cudaEventDisableTiming);
  cudaEventCreateWithFlags(&join_a, cudaEventDisableTiming);
  cudaEventCreateWithFlags(&join_b, cudaEventDisableTiming);
  auto side_by_side = [&](cudaStream_t a, cudaStream_t b, bool on_a, bool on_b) {
    cudaEventRecord(fork, nullptr);
    if (on_b) {
      cudaStreamWaitEvent(b, fork, 0);
      second(b);
      cudaEventRecord(join_b, b);
    }
    if (on_a) {
      cudaStreamWaitEvent(a, fork, 0);
      first(a);
      cudaEventRecord(join_a, a);
    }
    if (on_b) cudaStreamWaitEvent(nullptr, join_b, 0);
    if (on_a) cudaStreamWaitEvent(nullptr, join_a, 0);
  };
  for (int variant = 0; variant < 3; ++variant) {
    cudaStream_t a, b;
    const int pa = variant == 1 ? hi : lo, pb = variant == 2 ? hi : lo;
    ok(cudaStreamCreateWithPriority(&a, cudaStreamNonBlocking, pa), "stream a");
    ok(cudaStreamCreateWithPriority(&b, cudaStreamNonBlocking, pb), "stream b");
    const std::string name = std::string("two streams, priority ") +
                             (variant == 0 ? "equal" : variant == 1 ? "compressed+top-k" : "selected");
    time(name.c_str(), [&] { side_by_side(a, b, true, true); });
  }
  for (int sms : {40, 52, 64, 76}) {
    cudaStream_t a, b;
    green_streams(sms, a, b);
    time("  compressed + top-k alone in its part", [&] { side_by_side(a, b, true, false); });
    time("  selected alone in its part", [&] { side_by_side(a, b, false, true); });
    time("  both, each in its part", [&] { side_by_side(a, b, true, true); });
  }
  return 0;
}
