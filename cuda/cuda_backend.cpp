#include "cuda/cuda_backend.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "core/errors.h"

namespace nsa::cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw CudaError(std::string(what) + ": " + cudaGetErrorString(err));
}

std::size_t elem_size(ElemType t) { return t == ElemType::F32 ? 4 : 2; }

ElemType device_type_for(DType t) {
  switch (t) {
    case DType::BF16: return ElemType::BF16;
    case DType::F16: return ElemType::F16;
    default: return ElemType::F32;  // f32, and f64 inputs run in fp32
  }
}

// Host doubles -> device element bits (exact for values representable in the type).
std::vector<uint8_t> encode(const std::vector<double>& x, ElemType t) {
  std::vector<uint8_t> out(x.size() * elem_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float f = float(x[i]);
    if (t == ElemType::F32) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h = t == ElemType::BF16 ? float_to_bf16(f) : float_to_half(f);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<double> decode(const std::vector<uint8_t>& bytes, ElemType t) {
  const std::size_t n = bytes.size() / elem_size(t);
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (t == ElemType::F32) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      out[i] = f;
    } else {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      out[i] = t == ElemType::BF16 ? bf16_to_float(h) : half_to_float(h);
    }
  }
  return out;
}

std::size_t count(int64_t a, int64_t b = 1, int64_t c = 1, int64_t d = 1) { return std::size_t(a * b * c * d); }

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

DeviceInfo device_info() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  DeviceInfo info;
  info.name = prop.name;
  info.sm_count = prop.multiProcessorCount;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  const std::string name = info.name;
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("H100") && has("PCIe")) info.bf16_dense_peak_tflops = 756;
  else if (has("H100") || has("H200") || has("H800") || has("H20")) info.bf16_dense_peak_tflops = 989;
  else if (has("A100") || has("A800")) info.bf16_dense_peak_tflops = 312;
  else {
    // Dense bf16 FLOP per SM per clock: 4096 on sm_90, 2048 on sm_80, 1024 otherwise.
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev);
    const double per_clock = prop.major >= 9 ? 4096 : prop.major == 8 && prop.minor == 0 ? 2048 : 1024;
    info.bf16_dense_peak_tflops = info.sm_count * per_clock * clock_khz * 1e3 / 1e12;
  }
  return info;
}

DeviceBuffer::DeviceBuffer(std::size_t bytes, const std::string& name) : bytes_(bytes) {
  if (bytes == 0) return;
  const cudaError_t err = cudaMalloc(&ptr_, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    ptr_ = nullptr;
    throw InputError("out of device memory allocating " + name + " (" + std::to_string(bytes >> 20) +
                     " MiB): the problem is too large for this GPU");
  }
  check(err, ("cudaMalloc(" + name + ")").c_str());
}
DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
  o.ptr_ = nullptr;
  o.bytes_ = 0;
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

const char* stage_name(Stage s) {
  switch (s) {
    case Stage::MeanPool: return "mean_pool";
    case Stage::Compressed: return "compressed_attention";
    case Stage::Topk: return "topk";
    case Stage::Selected: return "selected_attention";
    case Stage::SlidingWindow: return "sliding_window";
    case Stage::Gate: return "gate";
    case Stage::SelectedGated: return "selected_attention+gate";
  }
  return "?";
}

void validate_layout(const Layout& L, const PipelineOptions& opt, const std::string& origin) {
  const Dims& d = L.dims;
  if (d.K > 256 || d.V > 256)
    fail_input(origin, d.K > 256 ? "q" : "v",
               "the CUDA backend takes K and V up to 256, got K = " + std::to_string(d.K) + ", V = " + std::to_string(d.V));
  if (!opt.given_indices && L.S() > kTopkMaxBlockCount)
    fail_input(origin, "", "the CUDA top-k takes block counts S up to " + std::to_string(kTopkMaxBlockCount) +
                               ", got S = " + std::to_string(L.S()));
  if (L.sequences.size() > 65535)
    fail_input(origin, "cu_seqlens", "the CUDA backend takes up to 65535 sequences, got " + std::to_string(L.sequences.size()));
  if (d.H > 65535 || d.B > 65535) fail_input(origin, "k", "the CUDA backend takes B and H up to 65535");
  if (L.BS() > (int64_t(1) << 30) || L.S() > (int64_t(1) << 30) || L.config.window > (int64_t(1) << 30))
    fail_input(origin, "", "block size, block count and window must fit in 32 bits");
  if (d.B * d.T >= (int64_t(1) << 31)) fail_input(origin, "q", "the CUDA backend takes fewer than 2^31 tokens");
}

CudaPipeline::CudaPipeline(const Layout& L, const PipelineOptions& opt) : L_(L), opt_(opt) {
  validate_layout(L, opt);
  const Dims& d = L.dims;
  const std::size_t es = elem_size(opt.dtype);
  const int64_t tokens = d.B * d.T;
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");

  std::vector<DeviceSequence> seqs;
  std::vector<int32_t> token_seq(tokens, 0);
  int64_t max_len = 0;
  for (std::size_t n = 0; n < L.sequences.size(); ++n) {
    const Sequence& s = L.sequences[n];
    seqs.push_back({s.batch, s.start, s.length, s.chunk_start});
    for (int64_t t = 0; t < s.length; ++t) token_seq[s.batch * d.T + s.start + t] = int32_t(n);
    max_len = std::max(max_len, s.length);
  }
  seqs_ = DeviceBuffer(seqs.size() * sizeof(DeviceSequence), "sequence table");
  token_seq_ = DeviceBuffer(token_seq.size() * 4, "token_seq");
  check(cudaMemcpy(seqs_.get(), seqs.data(), seqs_.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy(sequence table)");
  check(cudaMemcpy(token_seq_.get(), token_seq.data(), token_seq_.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy(token_seq)");

  dl_.dtype = opt.dtype;
  dl_.B = d.B;
  dl_.T = d.T;
  dl_.HQ = d.HQ;
  dl_.H = d.H;
  dl_.K = d.K;
  dl_.V = d.V;
  dl_.C = L.chunks;
  dl_.block_size = int(L.BS());
  dl_.block_count = int(L.S());
  dl_.window = int(L.config.window);
  dl_.scale = float(L.scale());
  dl_.paper_policy = L.config.policy == Policy::Paper;
  dl_.num_seqs = int(seqs.size());
  dl_.max_len = max_len;
  dl_.seqs = static_cast<const DeviceSequence*>(seqs_.get());
  dl_.token_seq = static_cast<const int32_t*>(token_seq_.get());
  dl_.sm90_kernels = opt.sm90_kernels;
  dl_.smem_limit = opt.smem_limit;

  q_ = DeviceBuffer(count(tokens, d.HQ, d.K) * es, "q");
  k_ = DeviceBuffer(count(tokens, d.H, d.K) * es, "k");
  v_ = DeviceBuffer(count(tokens, d.H, d.V) * es, "v");
  if (opt.gate_cmp) g_cmp_ = DeviceBuffer(count(tokens, d.HQ) * es, "g_cmp");
  if (opt.gate_slc) g_slc_ = DeviceBuffer(count(tokens, d.HQ) * es, "g_slc");
  if (opt.gate_swa) g_swa_ = DeviceBuffer(count(tokens, d.HQ) * es, "g_swa");
  if (opt.block_counts) block_counts_ = DeviceBuffer(count(tokens, d.H) * 4, "block_counts");
  k_cmp_ = DeviceBuffer(count(d.B, L.chunks, d.H, d.K) * es, "k_cmp");
  // A top-k this GPU's shared memory cannot hold is the shape's error (exit 2), as running out of device memory.
  if (!opt.given_indices)
    if (const std::string why = topk_shared_memory_shortfall(dl_, q_.get(), k_cmp_.get()); !why.empty())
      throw InputError(why);
  v_cmp_ = DeviceBuffer(count(d.B, L.chunks, d.H, d.V) * es, "v_cmp");
  o_cmp_ = DeviceBuffer(count(tokens, d.HQ, d.V) * es, "o_cmp");
  lse_cmp_ = DeviceBuffer(count(tokens, d.HQ) * 4, "lse_cmp");
  block_indices_ = DeviceBuffer(count(tokens, d.H, L.S()) * 4, "block_indices");
  o_slc_ = DeviceBuffer(count(tokens, d.HQ, d.V) * es, "o_slc");
  lse_slc_ = DeviceBuffer(count(tokens, d.HQ) * 4, "lse_slc");
  if (L.config.window > 0) {
    o_swa_ = DeviceBuffer(count(tokens, d.HQ, d.V) * es, "o_swa");
    lse_swa_ = DeviceBuffer(count(tokens, d.HQ) * 4, "lse_swa");
  }
  o_ = DeviceBuffer(count(tokens, d.HQ, d.V) * es, "o");
  if (opt.backward) {
    const bool window = L.config.window > 0;
    auto grad = [](std::size_t n, const char* name) { return DeviceBuffer(n * sizeof(float), name); };
    d_o_ = DeviceBuffer(count(tokens, d.HQ, d.V) * es, "do");
    dq_ = grad(count(tokens, d.HQ, d.K), "dq");
    dk_ = grad(count(tokens, d.H, d.K), "dk");
    dv_ = grad(count(tokens, d.H, d.V), "dv");
    dk_cmp_ = grad(count(d.B, L.chunks, d.H, d.K), "dk_cmp");
    dv_cmp_ = grad(count(d.B, L.chunks, d.H, d.V), "dv_cmp");
    // The gate backward hands each branch its gated gradient in the form its backward takes: for the tensor-core
    // path do itself with the rows' gates and deltas (two floats a row; no gated copy of do is written or read),
    // fp32 do_x for the CUDA-core kernels.
    if (opt.gated_branch_grads) {
      gated_.cmp = compressed_backward_takes_gated(dl_, q_.get(), k_cmp_.get(), v_cmp_.get());
      gated_.slc = selected_backward_takes_gated(dl_, q_.get(), k_.get(), v_.get());
      gated_.swa = sliding_window_backward_takes_gated(dl_, q_.get(), k_.get(), v_.get());
    }
    auto branch_grad = [&](bool gated, const char* name) {
      return grad(count(tokens, d.HQ, gated ? 2 : d.V), name);
    };
    if (opt.gate_cmp) dg_cmp_ = grad(count(tokens, d.HQ), "dg_cmp"), do_cmp_ = branch_grad(gated_.cmp, "do_cmp");
    if (opt.gate_slc) dg_slc_ = grad(count(tokens, d.HQ), "dg_slc"), do_slc_ = branch_grad(gated_.slc, "do_slc");
    if (opt.gate_swa) dg_swa_ = grad(count(tokens, d.HQ), "dg_swa");
    if (opt.gate_swa && window) do_swa_ = branch_grad(gated_.swa, "do_swa");
  }
}

CudaPipeline::~CudaPipeline() {
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaPipeline::upload(const Problem& p) {
  auto put = [&](DeviceBuffer& dst, const std::vector<double>& x, const char* name) {
    if (!dst.get()) return;
    const std::vector<uint8_t> bytes = encode(x, opt_.dtype);
    if (bytes.size() != dst.bytes()) throw CudaError(std::string("upload: size mismatch for ") + name);
    // Pageable source: the copy is staged before the call returns, so `bytes` may go out of scope.
    check(cudaMemcpyAsync(dst.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice, stream_), name);
  };
  if (p.q_rows.empty()) {
    put(q_, p.q, "cudaMemcpyAsync(q)");
  } else {
    // q widened for sampled rows only (Problem::q_rows): the device takes all of it from the stored bytes, as
    // they are where the device computes in the stored type, else (f64) narrowed to fp32.
    const Tensor& stored = p.q_stored;
    std::vector<uint8_t> narrowed;
    const uint8_t* src = stored.bytes.data();
    if (stored.dtype == DType::F64) {
      narrowed.resize(std::size_t(stored.numel()) * sizeof(float));
      for (int64_t i = 0; i < stored.numel(); ++i) {
        const float x = float(stored.at_f64(i));
        std::memcpy(narrowed.data() + i * sizeof(float), &x, sizeof(float));
      }
      src = narrowed.data();
    }
    const std::size_t bytes = narrowed.empty() ? stored.bytes.size() : narrowed.size();
    if (device_type_for(stored.dtype) != opt_.dtype || bytes != q_.bytes())
      throw CudaError("upload: the stored q does not match the pipeline's dtype or size");
    check(cudaMemcpyAsync(q_.get(), src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync(q)");
  }
  if (opt_.backward) {
    if (!p.d_o) throw CudaError("upload: the pipeline holds gradients but the problem has no `do`");
    put(d_o_, *p.d_o, "cudaMemcpyAsync(do)");
  }
  put(k_, p.k, "cudaMemcpyAsync(k)");
  put(v_, p.v, "cudaMemcpyAsync(v)");
  if (opt_.gate_cmp) put(g_cmp_, *p.g_cmp, "cudaMemcpyAsync(g_cmp)");
  if (opt_.gate_slc) put(g_slc_, *p.g_slc, "cudaMemcpyAsync(g_slc)");
  if (opt_.gate_swa) put(g_swa_, *p.g_swa, "cudaMemcpyAsync(g_swa)");
  if (opt_.given_indices)
    check(cudaMemcpy(block_indices_.get(), p.block_indices->data(), block_indices_.bytes(), cudaMemcpyHostToDevice),
          "cudaMemcpy(block_indices)");
  if (opt_.block_counts)
    check(cudaMemcpy(block_counts_.get(), p.block_counts->data(), block_counts_.bytes(), cudaMemcpyHostToDevice),
          "cudaMemcpy(block_counts)");
}

void CudaPipeline::fill_random(uint64_t seed) {
  const Dims& d = L_.dims;
  const int64_t tokens = d.B * d.T;
  fill_random_device(q_, count(tokens, d.HQ, d.K), seed * 8 + 0, true);
  fill_random_device(k_, count(tokens, d.H, d.K), seed * 8 + 1, true);
  fill_random_device(v_, count(tokens, d.H, d.V), seed * 8 + 2, true);
  fill_random_device(g_cmp_, count(tokens, d.HQ), seed * 8 + 3, false);
  fill_random_device(g_slc_, count(tokens, d.HQ), seed * 8 + 4, false);
  fill_random_device(g_swa_, count(tokens, d.HQ), seed * 8 + 5, false);
  fill_random_device(d_o_, count(tokens, d.HQ, d.V), seed * 8 + 6, true);
}

void CudaPipeline::fill_random_device(DeviceBuffer& buf, std::size_t n, uint64_t seed, bool normal) {
  if (buf.get()) nsa::cuda::fill_random(buf.get(), int64_t(n), opt_.dtype, seed, normal, 0.05f, 0.95f, stream_);
}

void CudaPipeline::run(Stage s) {
  switch (s) {
    case Stage::MeanPool:
      mean_pool_forward(k_cmp_.get(), v_cmp_.get(), k_.get(), v_.get(), dl_, stream_);
      break;
    case Stage::Compressed:
      compressed_attention_forward(o_cmp_.get(), static_cast<float*>(lse_cmp_.get()), q_.get(), k_cmp_.get(),
                                   v_cmp_.get(), dl_, stream_);
      break;
    case Stage::Topk:
      topk_forward(static_cast<int32_t*>(block_indices_.get()), q_.get(), k_cmp_.get(),
                   static_cast<const float*>(lse_cmp_.get()), dl_, stream_);
      break;
    case Stage::Selected:
      selected_attention_forward(o_slc_.get(), static_cast<float*>(lse_slc_.get()), q_.get(), k_.get(), v_.get(),
                                 static_cast<const int32_t*>(block_indices_.get()),
                                 static_cast<const int32_t*>(block_counts_.get()), dl_, stream_);
      break;
    case Stage::SlidingWindow:
      if (L_.config.window > 0)
        sliding_window_forward(o_swa_.get(), static_cast<float*>(lse_swa_.get()), q_.get(), k_.get(), v_.get(), dl_,
                               stream_);
      break;
    case Stage::Gate:
      gate_forward(o_.get(), o_cmp_.get(), o_slc_.get(), o_swa_.get(), g_cmp_.get(), g_slc_.get(), g_swa_.get(), dl_,
                   stream_);
      break;
    case Stage::SelectedGated: {
      // The fused kernel takes both the compressed and the selected branch; the window's when there is one.
      const bool fusable = g_cmp_.get() && g_slc_.get();
      const bool window = L_.config.window > 0 && g_swa_.get();
      gate_fused_ = fusable && selected_attention_gated_forward(
                                   o_slc_.get(), static_cast<float*>(lse_slc_.get()), q_.get(), k_.get(), v_.get(),
                                   static_cast<const int32_t*>(block_indices_.get()),
                                   static_cast<const int32_t*>(block_counts_.get()), dl_, stream_,
                                   GatedOutput{o_.get(), o_cmp_.get(), g_cmp_.get(), g_slc_.get(),
                                               window ? o_swa_.get() : nullptr, window ? g_swa_.get() : nullptr});
      if (!fusable) run(Stage::Selected);  // (where it could not fuse, the gated call ran selected attention)
      if (!gate_fused_) run(Stage::Gate);
      break;
    }
  }
}

void CudaPipeline::forward() {
  run(Stage::MeanPool);
  run(Stage::Compressed);
  if (!opt_.given_indices) run(Stage::Topk);
  run(Stage::SlidingWindow);
  run(Stage::SelectedGated);
}

void CudaPipeline::backward() {
  if (!opt_.backward) throw CudaError("backward: the pipeline was built without gradients");
  for (DeviceBuffer* b : {&dq_, &dk_, &dv_, &dk_cmp_, &dv_cmp_, &dg_cmp_, &dg_slc_, &dg_swa_})
    if (b->get()) check(cudaMemsetAsync(b->get(), 0, b->bytes(), stream_), "cudaMemsetAsync(gradients)");
  for (Stage s : {Stage::Gate, Stage::Selected, Stage::SlidingWindow, Stage::Compressed, Stage::MeanPool})
    run_backward(s);
}

void CudaPipeline::run_backward(Stage s) {
  if (!opt_.backward) throw CudaError("backward: the pipeline was built without gradients");
  auto f32 = [](const DeviceBuffer& b) { return static_cast<float*>(b.get()); };
  const bool window = L_.config.window > 0 && g_swa_.get();
  auto grad = [&](const DeviceBuffer& b, bool gated_form) {
    return gated_form ? gated_layout(f32(b), d_o_.get(), dl_) : BranchGrad(f32(b));
  };
  switch (s) {
    case Stage::Gate:
      gate_backward(f32(dg_cmp_), f32(dg_slc_), f32(dg_swa_), f32(do_cmp_), f32(do_slc_), f32(do_swa_), d_o_.get(),
                    o_cmp_.get(), o_slc_.get(), window ? o_swa_.get() : nullptr, g_cmp_.get(), g_slc_.get(),
                    window ? g_swa_.get() : nullptr, dl_, stream_, gated_);
      break;
    case Stage::Selected:
      if (g_slc_.get())
        selected_attention_backward(f32(dq_), f32(dk_), f32(dv_), grad(do_slc_, gated_.slc), q_.get(), k_.get(),
                                    v_.get(), o_slc_.get(), f32(lse_slc_),
                                    static_cast<const int32_t*>(block_indices_.get()),
                                    static_cast<const int32_t*>(block_counts_.get()), dl_, stream_);
      break;
    case Stage::SlidingWindow:
      if (window)
        sliding_window_backward(f32(dq_), f32(dk_), f32(dv_), grad(do_swa_, gated_.swa), q_.get(), k_.get(), v_.get(),
                                o_swa_.get(), f32(lse_swa_), dl_, stream_);
      break;
    case Stage::Compressed:
      if (g_cmp_.get())
        compressed_attention_backward(f32(dq_), f32(dk_cmp_), f32(dv_cmp_), grad(do_cmp_, gated_.cmp), q_.get(),
                                      k_cmp_.get(), v_cmp_.get(), o_cmp_.get(), f32(lse_cmp_), dl_, stream_);
      break;
    case Stage::MeanPool:
      mean_pool_backward(f32(dk_), f32(dv_), f32(dk_cmp_), f32(dv_cmp_), dl_, stream_);
      break;
    default:
      throw CudaError(std::string("run_backward: stage ") + stage_name(s) + " has no backward");
  }
}

Outputs CudaPipeline::download(const std::vector<int64_t>& rows) const {
  check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(forward)");
  auto floats = [&](const DeviceBuffer& b, const char* name) {
    std::vector<uint8_t> bytes(b.bytes());
    if (!bytes.empty()) check(cudaMemcpy(bytes.data(), b.get(), bytes.size(), cudaMemcpyDeviceToHost), name);
    return decode(bytes, opt_.dtype);
  };
  // A [B, T, HQ, V] output: every row, or only `rows` (compact, Outputs::rows), copied row by row.
  const std::size_t row_bytes = count(L_.dims.HQ, L_.dims.V) * elem_size(opt_.dtype);
  auto output_rows = [&](const DeviceBuffer& b, const char* name) {
    if (rows.empty()) return floats(b, name);
    std::vector<uint8_t> bytes(rows.size() * row_bytes);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] < 0 || std::size_t(rows[i] + 1) * row_bytes > b.bytes())
        throw std::invalid_argument(std::string(name) + ": row " + std::to_string(rows[i]) + " out of range");
      check(cudaMemcpy(bytes.data() + i * row_bytes, static_cast<const uint8_t*>(b.get()) + rows[i] * row_bytes,
                       row_bytes, cudaMemcpyDeviceToHost),
            name);
    }
    return decode(bytes, opt_.dtype);
  };
  auto f32 = [&](const DeviceBuffer& b, const char* name) {  // lse and gradients
    std::vector<uint8_t> bytes(b.bytes());
    if (!bytes.empty()) check(cudaMemcpy(bytes.data(), b.get(), bytes.size(), cudaMemcpyDeviceToHost), name);
    return decode(bytes, ElemType::F32);
  };
  Outputs out;
  out.rows = rows;
  out.k_cmp = floats(k_cmp_, "download k_cmp");
  out.v_cmp = floats(v_cmp_, "download v_cmp");
  out.o_cmp = output_rows(o_cmp_, "download o_cmp");
  out.lse_cmp = f32(lse_cmp_, "download lse_cmp");
  out.block_indices.resize(block_indices_.bytes() / 4);
  if (!out.block_indices.empty())
    check(cudaMemcpy(out.block_indices.data(), block_indices_.get(), block_indices_.bytes(), cudaMemcpyDeviceToHost),
          "download block_indices");
  out.o_slc = output_rows(o_slc_, "download o_slc");
  out.lse_slc = f32(lse_slc_, "download lse_slc");
  if (L_.config.window > 0) {
    out.o_swa = output_rows(o_swa_, "download o_swa");
    out.lse_swa = f32(lse_swa_, "download lse_swa");
  }
  out.o = output_rows(o_, "download o");
  if (opt_.backward) {
    out.has_grads = true;
    out.dq = f32(dq_, "download dq");
    out.dk = f32(dk_, "download dk");
    out.dv = f32(dv_, "download dv");
    out.dk_cmp = f32(dk_cmp_, "download dk_cmp");
    out.dv_cmp = f32(dv_cmp_, "download dv_cmp");
    if (dg_cmp_.get()) out.dg_cmp = f32(dg_cmp_, "download dg_cmp");
    if (dg_slc_.get()) out.dg_slc = f32(dg_slc_, "download dg_slc");
    if (dg_swa_.get()) out.dg_swa = f32(dg_swa_, "download dg_swa");
  }
  return out;
}

float CudaPipeline::time_ms(const std::function<void()>& work, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) work();
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  check(cudaEventRecord(start, stream_), "cudaEventRecord");
  for (int i = 0; i < iters; ++i) work();
  check(cudaEventRecord(stop, stream_), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return iters > 0 ? ms / float(iters) : 0.f;
}

}  // namespace nsa::cuda

namespace nsa {
namespace {

class CudaBackend : public Backend {
 public:
  CudaBackend(bool sm90_kernels, int64_t smem_limit) : sm90_kernels_(sm90_kernels), smem_limit_(smem_limit) {}
  std::string name() const override { return "cuda"; }
  DType compute_dtype(DType input) const override { return input == DType::F64 ? DType::F32 : input; }

  Outputs run(const Problem& p, const RunOptions& opt) override {
    if (cuda::device_count() == 0) throw InputError("backend 'cuda': no CUDA device is available");
    cuda::PipelineOptions po;
    po.dtype = cuda::device_type_for(p.input_dtype);
    po.gate_cmp = p.g_cmp.has_value();
    po.gate_slc = p.g_slc.has_value();
    po.gate_swa = p.g_swa.has_value();
    po.given_indices = p.block_indices.has_value();
    po.block_counts = p.block_counts.has_value();
    po.sm90_kernels = sm90_kernels_;
    po.smem_limit = smem_limit_;
    po.backward = p.has_backward() && opt.backward;
    cuda::validate_layout(p.layout, po);
    if (p.input_dtype == DType::F64) std::fprintf(stderr, "nsa: cuda backend: f64 inputs run in fp32\n");
    cuda::CudaPipeline pipe(p.layout, po);
    pipe.upload(p);
    pipe.forward();
    if (po.backward) pipe.backward();
    // A row sample keeps the [B, T, HQ, V] outputs compact; the backward, as the reference's, needs every row.
    const int64_t tokens = p.layout.dims.B * p.layout.dims.T;
    return pipe.download(po.backward ? std::vector<int64_t>{} : sorted_sample(opt.rows, tokens));
  }

 private:
  bool sm90_kernels_;
  int64_t smem_limit_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(bool sm90_kernels, int64_t smem_limit) {
  return std::make_unique<CudaBackend>(sm90_kernels, smem_limit);
}

}  // namespace nsa
