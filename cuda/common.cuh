// Shared device helpers: element-type traits, error checks, sequence lookup.
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace nsa::cuda {

// Throws CudaError naming the call (e.g. "cudaMemcpyAsync(q)") and CUDA's own message.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw CudaError(std::string(what) + ": " + cudaGetErrorString(err));
}
#define CUDA_CHECK(call, what) ::nsa::cuda::check_cuda((call), (what))

// After every launch: a bad configuration shows up here, named by its kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw CudaError(std::string("launch of ") + kernel + ": " + cudaGetErrorString(err));
}

// An attribute of the current device (e.g. cudaDevAttrMaxSharedMemoryPerBlockOptin); a failure throws
// CudaError naming `what`.
inline int device_attribute(cudaDeviceAttr attr, const char* what) {
  int device = 0, value = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), what);
  return value;
}

// The current device's stage_budget for L, within L.smem_limit.
inline SmemBudget device_budget(const DeviceLayout& L) {
  return limit_budget(stage_budget(!L.sm90_kernels,
                                   device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                                    "cudaDeviceGetAttribute(shared memory per SM)"),
                                   device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                                    "cudaDeviceGetAttribute(max shared memory)")),
                      L.smem_limit);
}

// A second stream forked from `main` (it starts after main's work so far) for a kernel that may run beside the
// next ones on main; join() (or the destructor) makes main wait for it. Streams and events are released once
// their work is done.
class SideStream {
 public:
  explicit SideStream(cudaStream_t main) : main_(main) {
    check_cuda(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags(side stream)");
    check_cuda(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming), "cudaEventCreateWithFlags(side stream)");
    check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreateWithFlags(side stream)");
    check_cuda(cudaEventRecord(forked_, main_), "cudaEventRecord(side stream fork)");
    check_cuda(cudaStreamWaitEvent(side_, forked_, 0), "cudaStreamWaitEvent(side stream fork)");
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  cudaStream_t get() const { return side_; }
  void join() {
    if (joined_) return;
    joined_ = true;
    check_cuda(cudaEventRecord(done_, side_), "cudaEventRecord(side stream join)");
    check_cuda(cudaStreamWaitEvent(main_, done_, 0), "cudaStreamWaitEvent(side stream join)");
  }
  ~SideStream() {
    if (!joined_) {  // an error path: still order main after the side work; failures show at the next check
      cudaEventRecord(done_, side_);
      cudaStreamWaitEvent(main_, done_, 0);
    }
    cudaEventDestroy(forked_);
    cudaEventDestroy(done_);
    cudaStreamDestroy(side_);
  }

 private:
  cudaStream_t main_, side_ = nullptr;
  cudaEvent_t forked_ = nullptr, done_ = nullptr;
  bool joined_ = false;
};

// Element traits: conversions to and from the fp32 accumulator type, and whether tensor cores take the type.
template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr bool kTensorCore = false;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};
template <> struct Elem<__half> {
  static constexpr bool kTensorCore = true;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Calls f(T{}) with T the C++ type of `t`.
template <typename F>
void dispatch_elem(ElemType t, F&& f) {
  switch (t) {
    case ElemType::F32: f(float{}); break;
    case ElemType::F16: f(__half{}); break;
    case ElemType::BF16: f(__nv_bfloat16{}); break;
  }
}

// A branch's fp32 upstream gradient, which the CUDA-core backward kernels take; a gated one reaching them is the
// caller's error (it asked gate_backward for the gated form of a branch whose *_backward_takes_gated is false).
inline const float* fp32_grad(const BranchGrad& g, const char* what) {
  if (!g.f32 && g.d_out) throw CudaError(std::string(what) + ": a gated upstream gradient on the CUDA-core path");
  return g.f32;
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Device scratch memory for work queued on one stream: cudaMallocAsync'ed there, freed in stream order when
// this goes out of scope (no host synchronisation).
class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream, const char* what) : stream_(stream) {
    check_cuda(cudaMallocAsync(&ptr_, bytes, stream), what);
  }
  ~StreamScratch() { cudaFreeAsync(ptr_, stream_); }  // a destructor does not throw; a failure shows later
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Online softmax with a lazy reference (log2 domain): a row's reference max moves only when a new tile's max
// exceeds it by more than kLazyRescaleLog2, so most tiles skip rescaling the O accumulators. Meanwhile
// p = exp2(z - reference) <= 2^8, far inside fp32 and the bf16/fp16 range of the P operand; o and lse come out
// the same up to rounding, since every term and the final sum share the reference. `ref` is the running
// reference (-inf before the first visible key).
constexpr float kLazyRescaleLog2 = 8.f;
__device__ __forceinline__ float lazy_reference(float ref, float tile_max) {
  return tile_max > ref + kLazyRescaleLog2 ? tile_max : ref;
}

// 2^x on the special-function unit, results below 2^-126 flushed to zero. exp2f gives the same value in the
// normal range (the same ex2.approx) but spends four more instructions per element rescaling arguments whose
// result would be subnormal; a softmax weight or top-k score below 2^-126 changes no fp32 sum it joins, and the
// kernels are issue-bound on these exponentials (top-k: a fifth of its instructions).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The gated output of one element (nsa-spec §2.6) in fp32, branches in a fixed order by explicit FMAs, so that
// the gate pass (gating.cu) and the selected-attention kernel that fuses it write the same bits. An absent
// branch passes gate 0 and value 0.
__device__ __forceinline__ float gate_sum(float slc, float cmp, float swa, float g_slc, float g_cmp, float g_swa) {
  return fmaf(g_swa, swa, fmaf(g_cmp, cmp, fmaf(g_slc, slc, 0.f)));
}

// Whether a stage may take its sm_90 kernel: the layout allows it and the device is compute capability 9.x (the
// kernels are built for sm_90a, which no other major version runs).
inline bool sm90_kernels_run(const DeviceLayout& L) {
  return L.sm90_kernels &&
         device_attribute(cudaDevAttrComputeCapabilityMajor, "cudaDeviceGetAttribute(compute capability)") == 9;
}

// The head dims the sm_90 forward kernels are built for (compressed attention, the window, the streamed selected
// attention): K and V in {64, 128}, or the NSA paper's heads, K = 192 with V = 128.
inline bool paper_heads(const DeviceLayout& L) { return L.K == 192 && L.V == 128; }
inline bool sm90_forward_head_dims(const DeviceLayout& L) {
  return paper_heads(L) || ((L.K == 64 || L.K == 128) && (L.V == 64 || L.V == 128));
}

#ifdef __CUDACC__  // (host-only translation units include this header for its types)
// The sum of x over the warp's 32 lanes, on every lane.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Adds (x, y) to p[0], p[1] (8-byte aligned): one vector atomic on sm_90.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}
// Adds x to p[0..3] (16-byte aligned): one vector atomic on sm_90.
__device__ __forceinline__ void atomic_add4(float* p, float4 x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), x);
#else
  atomicAdd(p, x.x);
  atomicAdd(p + 1, x.y);
  atomicAdd(p + 2, x.z);
  atomicAdd(p + 3, x.w);
#endif
}

#endif

// Query row `row` (= flat token b * T + t, times HQ, plus the head): its token, its position in its sequence
// and the sequence's first flat token. False for a padding token outside every sequence.
struct QueryRow {
  int64_t flat, t, key_base;
  int head, kv_head;
  DeviceSequence seq;
  // From the sequence table (token_seq [B * T] indexes seqs), T tokens per batch row, HQ heads in groups of G.
  __device__ __forceinline__ bool find(const DeviceSequence* seqs, const int32_t* token_seq, int64_t T, int64_t HQ,
                                       int64_t G, int64_t row) {
    flat = row / HQ;
    head = int(row % HQ);
    kv_head = int(head / G);
    const int32_t si = token_seq[flat];
    if (si < 0) return false;
    seq = seqs[si];
    key_base = seq.batch * T + seq.start;
    t = flat - key_base;
    return t >= 0 && t < seq.length;
  }
  __device__ __forceinline__ bool find(const DeviceLayout& L, int64_t row) {
    return find(L.seqs, L.token_seq, L.T, L.HQ, L.HQ / L.H, row);
  }
};

// The sequence holding pooled block `chunk` of batch row `b`: the last sequence whose (batch, chunk_start)
// is <= (b, chunk). Sequences are ordered by batch row, then by start, so a binary search finds it; empty
// sequences share their successor's chunk_start and lose the tie to it.
__device__ __forceinline__ int find_seq_of_chunk(const DeviceSequence* seqs, int num_seqs, int64_t b, int64_t chunk) {
  int lo = 0, hi = num_seqs;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    const bool before = seqs[mid].batch < b || (seqs[mid].batch == b && seqs[mid].chunk_start <= chunk);
    if (before) lo = mid;
    else hi = mid;
  }
  return lo;
}

}  // namespace nsa::cuda
