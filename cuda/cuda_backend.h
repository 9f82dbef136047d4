// The CUDA backend: a pipeline over device buffers with one launch method per stage (shared by the Backend and
// `nsa-verify bench`), and the Backend that uploads a Problem, runs the forward and downloads the outputs.
// Host-only header: it can be included by code compiled without nvcc.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/backend.h"
#include "core/problem.h"
#include "cuda/kernels.h"

namespace nsa {

// The "cuda" backend of the verifier: the forward, and the backward where the problem has `do` (gradients
// computed in fp32, returned whole even when the forward is asked for a row sample). `sm90_kernels` false: an
// sm_90 device runs the kernels an sm_80 GPU runs (DeviceLayout::sm90_kernels); `smem_limit` > 0: they size their
// CTAs for a GPU of that much shared memory a CTA (DeviceLayout::smem_limit).
std::unique_ptr<Backend> make_cuda_backend(bool sm90_kernels = true, int64_t smem_limit = 0);

}  // namespace nsa

namespace nsa::cuda {

// Number of CUDA devices; 0 when there is none or no driver (never throws).
int device_count();

struct DeviceInfo {
  std::string name;
  int sm_count = 0, cc_major = 0, cc_minor = 0;
  double bf16_dense_peak_tflops = 0;  // datasheet figure for known parts, else SMs x clock x MMA rate
};
DeviceInfo device_info();

// A cudaMalloc'ed buffer. Running out of device memory is an InputError naming the buffer, so the CLI
// exits with code 2.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, const std::string& name);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// SelectedGated: selected attention and the gate pass, fused into one kernel where it can be
// (selected_attention_gated_forward; the window branch, if any, computed before), else the two in sequence.
enum class Stage { MeanPool, Compressed, Topk, Selected, SlidingWindow, Gate, SelectedGated };
const char* stage_name(Stage s);

struct PipelineOptions {
  ElemType dtype = ElemType::BF16;
  bool gate_cmp = true, gate_slc = true, gate_swa = false;
  bool given_indices = false;  // block_indices are an input: top-k is skipped
  bool block_counts = false;
  bool sm90_kernels = true;    // DeviceLayout::sm90_kernels
  int64_t smem_limit = 0;      // DeviceLayout::smem_limit
  bool backward = false;       // holds `do` and the gradients (CudaPipeline::backward)
  // The gate backward hands the tensor-core branches do with their rows' gates and deltas (BranchGrad's gated
  // form); false: the gated gradients in fp32, each branch casting them itself (the stage functions' plain form).
  bool gated_branch_grads = true;
};

// Throws InputError when the CUDA kernels cannot take the layout (K or V > 256, S > 225 with top-k, ...).
void validate_layout(const Layout& L, const PipelineOptions& opt, const std::string& origin = "");

// Every buffer of one problem shape on the device, and the forward stages over them, all on one stream with
// no host synchronisation between stages.
class CudaPipeline {
 public:
  CudaPipeline(const Layout& L, const PipelineOptions& opt);
  ~CudaPipeline();
  CudaPipeline(const CudaPipeline&) = delete;
  CudaPipeline& operator=(const CudaPipeline&) = delete;

  // Uploads q, k, v, gates and the given block_indices / block_counts, converted to the device dtype
  // (the values must be representable in it, as they are when the problem was stored in that dtype).
  void upload(const Problem& p);
  // Random inputs generated on the device (normal q/k/v, gates in (0.05, 0.95)), for benchmarks.
  void fill_random(uint64_t seed);

  void run(Stage s);
  // mean pool -> compressed -> top-k (unless indices were given) -> sliding window (W > 0) -> selected -> gate
  // (Stage::SelectedGated).
  void forward();
  // After forward(): gate -> selected / sliding window / compressed -> mean pooling (nsa-spec §3), into zeroed
  // fp32 gradients; a branch without its gate (the window also without W > 0) takes no part, as in the
  // reference. Needs PipelineOptions::backward and `do` (upload or fill_random).
  void backward();
  // One stage of backward() (Gate, Selected, SlidingWindow, Compressed or MeanPool), accumulating into the
  // gradients as they are; for benchmarks.
  void run_backward(Stage s);
  // Waits for the stream and returns every forward output as doubles, and the gradients where the pipeline
  // has them (has_grads); with `rows` (sorted_sample), the [B, T, HQ, V] forward outputs hold only those query
  // rows (Outputs::rows).
  Outputs download(const std::vector<int64_t>& rows = {}) const;

  // Mean milliseconds of `work` (launches on stream()) over `iters` runs after `warmup`, by CUDA events.
  float time_ms(const std::function<void()>& work, int warmup, int iters);

  // Whether the last Stage::SelectedGated fused the gate pass into selected attention.
  bool gate_fused() const { return gate_fused_; }
  cudaStream_t stream() const { return stream_; }
  const DeviceLayout& layout() const { return dl_; }
  const Layout& host_layout() const { return L_; }

 private:
  void fill_random_device(DeviceBuffer& buf, std::size_t n, uint64_t seed, bool normal);

  Layout L_;
  PipelineOptions opt_;
  bool gate_fused_ = false;
  DeviceLayout dl_;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer seqs_, token_seq_;
  DeviceBuffer q_, k_, v_, g_cmp_, g_slc_, g_swa_, block_counts_;
  DeviceBuffer k_cmp_, v_cmp_, o_cmp_, lse_cmp_, block_indices_, o_slc_, lse_slc_, o_swa_, lse_swa_, o_;
  // Backward: `do` in the input dtype; the rest fp32.
  DeviceBuffer d_o_, dq_, dk_, dv_, dk_cmp_, dv_cmp_, dg_cmp_, dg_slc_, dg_swa_, do_cmp_, do_slc_, do_swa_;
  GatedBranches gated_;  // the branches whose do_x buffer holds only their rows' gates and deltas (gated_layout)
};

}  // namespace nsa::cuda
