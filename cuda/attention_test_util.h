// Helpers for the GPU tests of the attention kernels: a problem uploaded in a kernel dtype (inputs rounded
// first, so the float64 reference sees exactly what the kernel sees), downloads widened to double, and random
// block selections that mix the current block, earlier blocks, future blocks and -1 padding.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/problem.h"
#include "cuda/kernels.h"
#include "reference/test_util.h"

namespace nsa::test {

inline bool cuda_device_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Whether device 0 is an sm_90 part, where Auto takes the warpgroup kernels.
inline bool on_sm90() {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
}

// A parameterised GPU test: skips with a message where there is no device.
template <typename Param>
class GpuParamTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: the GPU tests need one";
  }
};

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// One device allocation, freed on scope exit.
class DeviceBytes {
 public:
  explicit DeviceBytes(std::size_t n) : n_(n) { cuda_ok(cudaMalloc(&p_, std::max<std::size_t>(n, 16)), "cudaMalloc"); }
  ~DeviceBytes() { cudaFree(p_); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  void* get() const { return p_; }
  std::size_t bytes() const { return n_; }
  void upload(const void* src) { cuda_ok(cudaMemcpy(p_, src, n_, cudaMemcpyHostToDevice), "cudaMemcpy H2D"); }
  void download(void* dst) const { cuda_ok(cudaMemcpy(dst, p_, n_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H"); }
  // 0xff bytes: NaN in every float type, so an element the kernel never writes fails the comparison.
  void poison() { cuda_ok(cudaMemset(p_, 0xff, n_), "cudaMemset"); }

 private:
  void* p_ = nullptr;
  std::size_t n_;
};

inline cuda::ElemType elem_type(DType t) {
  switch (t) {
    case DType::F32: return cuda::ElemType::F32;
    case DType::F16: return cuda::ElemType::F16;
    case DType::BF16: return cuda::ElemType::BF16;
    default: throw std::invalid_argument("no CUDA element type for this dtype");
  }
}

inline void round_in_place(std::vector<double>& x, DType t) {
  for (double& e : x) e = round_to(t, e);
}

// Packs doubles (already representable) into `t`'s bytes.
inline std::vector<uint8_t> pack(const std::vector<double>& x, DType t) {
  std::vector<uint8_t> out(x.size() * dtype_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::F32) {
      const float f = float(x[i]);
      std::memcpy(&out[i * 4], &f, 4);
    } else {
      const uint16_t h = t == DType::BF16 ? float_to_bf16(float(x[i])) : float_to_half(float(x[i]));
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

inline std::vector<double> unpack(const std::vector<uint8_t>& bytes, DType t) {
  const std::size_t n = bytes.size() / dtype_size(t);
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (t == DType::F32) {
      float f;
      std::memcpy(&f, &bytes[i * 4], 4);
      out[i] = f;
    } else {
      uint16_t h;
      std::memcpy(&h, &bytes[i * 2], 2);
      out[i] = t == DType::BF16 ? bf16_to_float(h) : half_to_float(h);
    }
  }
  return out;
}

inline DeviceBytes& upload_into(DeviceBytes& d, const std::vector<uint8_t>& host) {
  d.upload(host.data());
  return d;
}

// q, k, v of a problem on the device in `dtype` (the problem's vectors are rounded in place first) plus the
// sequence tables; layout() is the DeviceLayout the launchers take.
class DeviceInputs {
 public:
  DeviceInputs(Problem& p, DType dtype)
      : dtype_(dtype),
        q_((round_in_place(p.q, dtype), p.q.size() * dtype_size(dtype))),
        k_((round_in_place(p.k, dtype), p.k.size() * dtype_size(dtype))),
        v_((round_in_place(p.v, dtype), p.v.size() * dtype_size(dtype))),
        seqs_(std::max<std::size_t>(p.layout.sequences.size(), 1) * sizeof(cuda::DeviceSequence)),
        token_seq_(std::size_t(p.layout.dims.B * p.layout.dims.T) * sizeof(int32_t)) {
    q_.upload(pack(p.q, dtype).data());
    k_.upload(pack(p.k, dtype).data());
    v_.upload(pack(p.v, dtype).data());
    const Layout& L = p.layout;
    std::vector<cuda::DeviceSequence> seqs;
    std::vector<int32_t> token_seq(std::size_t(L.dims.B * L.dims.T), -1);
    int64_t max_len = 0;
    for (const Sequence& s : L.sequences) {
      for (int64_t t = 0; t < s.length; ++t) token_seq[s.batch * L.dims.T + s.start + t] = int32_t(seqs.size());
      seqs.push_back({s.batch, s.start, s.length, s.chunk_start});
      max_len = std::max(max_len, s.length);
    }
    if (!seqs.empty()) cuda_ok(cudaMemcpy(seqs_.get(), seqs.data(), seqs.size() * sizeof(seqs[0]), cudaMemcpyHostToDevice), "seqs");
    if (!token_seq.empty()) token_seq_.upload(token_seq.data());
    dl_.dtype = elem_type(dtype);
    dl_.B = L.dims.B, dl_.T = L.dims.T, dl_.HQ = L.dims.HQ, dl_.H = L.dims.H, dl_.K = L.dims.K, dl_.V = L.dims.V;
    dl_.C = L.chunks;
    dl_.block_size = int(L.BS()), dl_.block_count = int(L.S()), dl_.window = int(L.config.window);
    dl_.scale = float(L.scale());
    dl_.paper_policy = L.config.policy == Policy::Paper;
    dl_.num_seqs = int(seqs.size());
    dl_.max_len = max_len;
    dl_.seqs = static_cast<const cuda::DeviceSequence*>(seqs_.get());
    dl_.token_seq = static_cast<const int32_t*>(token_seq_.get());
  }
  const cuda::DeviceLayout& layout() const { return dl_; }
  const void* q() const { return q_.get(); }
  const void* k() const { return k_.get(); }
  const void* v() const { return v_.get(); }
  DType dtype() const { return dtype_; }

 private:
  DType dtype_;
  DeviceBytes q_, k_, v_, seqs_, token_seq_;
  cuda::DeviceLayout dl_;
};

// Kernel outputs of one attention stage: o [B, T, HQ, V] in the input dtype, lse [B, T, HQ] fp32, both
// poisoned before the launch.
struct DeviceAttentionOutputs {
  DeviceAttentionOutputs(const Layout& L, DType dtype)
      : dtype(dtype),
        o(std::size_t(L.dims.B * L.dims.T * L.dims.HQ * L.dims.V) * dtype_size(dtype)),
        lse(std::size_t(L.dims.B * L.dims.T * L.dims.HQ) * sizeof(float)) {
    o.poison();
    lse.poison();
  }
  std::vector<double> o_host() const {
    std::vector<uint8_t> bytes(o.bytes());
    o.download(bytes.data());
    return unpack(bytes, dtype);
  }
  std::vector<double> lse_host() const {
    std::vector<uint8_t> bytes(lse.bytes());
    lse.download(bytes.data());
    return unpack(bytes, DType::F32);
  }
  DType dtype;
  DeviceBytes o, lse;
};

// Block selections [B, T, H, S] for every token: the current block (usually), random earlier blocks, now and
// then a block after the token (the kernel must skip it) and -1 entries, each block at most once per row.
inline std::vector<int32_t> mixed_block_indices(const Layout& L, std::mt19937_64& rng) {
  const Dims& d = L.dims;
  const int64_t S = L.S(), BS = L.BS();
  std::vector<int32_t> idx(std::size_t(d.B * d.T * d.H * S), -1);
  for (const Sequence& s : L.sequences) {
    const int64_t NB = ceil_div(s.length, BS);
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t h = 0; h < d.H; ++h) {
        int32_t* row = &idx[std::size_t((((s.batch * d.T) + s.start + t) * d.H + h) * S)];
        const int64_t cur = t / BS;
        std::vector<int32_t> pool;
        if (rng() % 8 != 0) pool.push_back(int32_t(cur));
        // Random distinct others: mostly earlier blocks, sometimes later ones.
        for (int64_t tries = 0; tries < 4 * S && int64_t(pool.size()) < S; ++tries) {
          const bool later = rng() % 4 == 0 && cur + 1 < NB;
          const int64_t c = later ? cur + 1 + int64_t(rng() % uint64_t(NB - cur - 1))
                                  : (cur > 0 ? int64_t(rng() % uint64_t(cur)) : -1);
          if (c >= 0 && std::find(pool.begin(), pool.end(), int32_t(c)) == pool.end()) pool.push_back(int32_t(c));
        }
        std::size_t used = 0;
        for (int64_t j = 0; j < S; ++j) row[j] = (rng() % 6 == 0 || used >= pool.size()) ? -1 : pool[used++];
        std::shuffle(row, row + S, rng);
      }
  }
  return idx;
}

// Block selections where every token picks its current block and S-1 distinct earlier blocks (all of them
// when it has fewer), independently of its neighbours: what a real top-k gives on random inputs.
inline std::vector<int32_t> independent_block_indices(const Layout& L, std::mt19937_64& rng) {
  const Dims& d = L.dims;
  const int64_t S = L.S(), BS = L.BS();
  std::vector<int32_t> idx(std::size_t(d.B * d.T * d.H * S), -1);
  for (const Sequence& s : L.sequences)
    for (int64_t t = 0; t < s.length; ++t)
      for (int64_t h = 0; h < d.H; ++h) {
        int32_t* row = &idx[std::size_t((((s.batch * d.T) + s.start + t) * d.H + h) * S)];
        const int64_t cur = t / BS;
        std::vector<int32_t> pool{int32_t(cur)};
        if (cur < S) {
          for (int64_t c = 0; c < cur; ++c) pool.push_back(int32_t(c));
        } else {
          while (int64_t(pool.size()) < S) {
            const int32_t c = int32_t(rng() % uint64_t(cur));
            if (std::find(pool.begin(), pool.end(), c) == pool.end()) pool.push_back(c);
          }
        }
        std::shuffle(pool.begin(), pool.end(), rng);
        std::copy(pool.begin(), pool.end(), row);
      }
  return idx;
}

// Block selections shared by aligned runs of `run` tokens (run divides BS): each token picks its current
// block and the run's S-1 earlier blocks, so neighbours select alike.
inline std::vector<int32_t> shared_run_block_indices(const Layout& L, int64_t run, std::mt19937_64& rng) {
  const Dims& d = L.dims;
  const int64_t S = L.S(), BS = L.BS();
  std::vector<int32_t> idx(std::size_t(d.B * d.T * d.H * S), -1);
  for (const Sequence& s : L.sequences)
    for (int64_t t0 = 0; t0 < s.length; t0 += run)
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t cur = t0 / BS;
        std::vector<int32_t> pool{int32_t(cur)};
        for (int64_t tries = 0; tries < 8 * S && int64_t(pool.size()) < S && cur > 0; ++tries) {
          const int32_t c = int32_t(rng() % uint64_t(cur));
          if (std::find(pool.begin(), pool.end(), c) == pool.end()) pool.push_back(c);
        }
        for (int64_t t = t0; t < std::min(t0 + run, s.length); ++t)
          std::copy(pool.begin(), pool.end(), &idx[std::size_t((((s.batch * d.T) + s.start + t) * d.H + h) * S)]);
      }
  return idx;
}

inline std::vector<int32_t> random_block_counts(const Layout& L, std::mt19937_64& rng) {
  std::vector<int32_t> counts(std::size_t(L.dims.B * L.dims.T * L.dims.H));
  for (int32_t& c : counts) c = int32_t(rng() % (L.S() + 1));
  return counts;
}

inline bool all_finite(const std::vector<double>& x) {
  return std::all_of(x.begin(), x.end(), [](double e) { return std::isfinite(e); });
}

// Relative-L2 tolerance of an attention output by input dtype (nsa-spec §5.1).
inline double output_tolerance(DType t) {
  switch (t) {
    case DType::BF16: return 1.6e-2;
    case DType::F16: return 2e-3;
    default: return 1e-5;
  }
}

// An attention stage's o and lse against the float64 reference: every element written and finite, o within the
// dtype's tolerance, lse (fp32 whatever the inputs; its logits are exact products summed in fp32) within 1e-5
// for fp32 inputs, else 1e-4.
inline void expect_attention_close(const std::vector<double>& o, const std::vector<double>& lse,
                                   const std::vector<double>& ref_o, const std::vector<double>& ref_lse, DType dtype) {
  ASSERT_TRUE(all_finite(o)) << "an output element is NaN/Inf or was never written";
  ASSERT_TRUE(all_finite(lse)) << "an lse element is NaN/Inf or was never written";
  EXPECT_LE(rel_l2(o, ref_o), output_tolerance(dtype)) << "o: max abs diff " << max_abs_diff(o, ref_o);
  const double lse_tol = dtype == DType::F32 ? 1e-5 : 1e-4;
  EXPECT_LE(rel_l2(lse, ref_lse), lse_tol) << "lse: max abs diff " << max_abs_diff(lse, ref_lse);
}

}  // namespace nsa::test
