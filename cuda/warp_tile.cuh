// Warp-level tiles shared by the compressed-attention and top-k kernels, which must compute the same logits
// (the top-k scores are exp(z - lse) with lse from the compressed pass, so z has to match bit for bit).
//
// A CTA holds ROWS = 16 * WARPS query rows; a row is one (token, query head) pair of one kv head. The rows
// are `tpt` tokens x `hpt` heads (the G heads of a token are contiguous rows, so one pooled-key tile serves
// every head of the group and several tokens at once); when G > ROWS a token's heads are split into
// `head_chunks` chunks of hpt heads.
//
// Each warp owns 16 consecutive rows. Its fragment of a [16 x BN] score tile or [16 x VP] output tile follows
// the mma.m16n8k16 accumulator layout: lane holds rows (lane / 4) and (lane / 4 + 8), columns
// j * 8 + (lane % 4) * 2 + {0, 1} for every 8-column group j. The fp32 path keeps the same layout and does the
// products on CUDA cores, so the kernels around it are written once.
#pragma once
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace nsa::cuda::tile {

constexpr int kBlockN = 64;  // pooled blocks per key tile

// Smem row stride (elements) for rows of `cols_padded` elements: padding by 16 bytes spreads the 8 rows that
// one fragment load touches over distinct banks.
template <typename T>
__host__ __device__ constexpr int smem_stride(int cols_padded) {
  return cols_padded + int(16 / sizeof(T));
}

struct Geometry {
  int hpt = 0;          // heads per tile (<= ROWS)
  int tpt = 0;          // tokens per tile
  int head_chunks = 0;  // ceil(G / hpt)
  int tiles_x = 0;      // grid.x: token tiles of the longest sequence x head chunks
};

inline Geometry make_geometry(int64_t G, int rows, int64_t max_len) {
  Geometry g;
  g.hpt = int(G < rows ? G : rows);
  g.tpt = rows / g.hpt;
  g.head_chunks = int(div_up(G, g.hpt));
  g.tiles_x = int(div_up(max_len, g.tpt) * g.head_chunks);
  return g;
}

// Copies `rows_total` rows of `cols_padded` elements into smem (row stride `stride`), zero-filling rows for
// which row_ptr(r) is null and columns >= cols. When every row is 16-byte aligned the copies are cp.async
// (the caller commits and waits: cp_async_commit / cp_async_wait, then __syncthreads); otherwise they are
// plain loads, done when the function returns.
template <typename T, typename RowPtr>
__device__ __forceinline__ void load_rows(T* dst, int stride, int rows_total, int cols, int cols_padded, RowPtr row_ptr) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = (cols % kVec) == 0;
  const int chunks = cols_padded / kVec;
  // Groups of `lanes` threads (8: 128 bytes) take a row each, so that a thread looks a row up once (row_ptr
  // may be a gather's index arithmetic) however many chunks it copies from it.
  const int lanes = chunks >= 8 ? 8 : chunks >= 4 ? 4 : chunks >= 2 ? 2 : 1;
  const int lane = int(threadIdx.x) % lanes, row_step = int(blockDim.x) / lanes;
  for (int r = int(threadIdx.x) / lanes; r < rows_total; r += row_step) {
    const T* src = row_ptr(r);
    for (int c = lane * kVec; c < cols_padded; c += lanes * kVec) {
      T* d = dst + r * stride + c;
      if (src && vec_ok && c < cols) {
        cp_async_16(d, src + c, true);
      } else if (!src || c >= cols) {
        *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[e] = c + e < cols ? src[c + e] : Elem<T>::from_float(0.f);
      }
    }
  }
}

// A smem tile that load_row_pairs fills: rows of `cols_padded` elements `stride` apart, `cols` of them copied.
template <typename T>
struct RowTile {
  T* dst;
  int stride, cols, cols_padded;
};

// load_rows for the rows of two tensors gathered by one index (the backward's Q and dO rows of a step), with one
// lookup per row and thread for both: row_ptrs(r, a, b) sets the two rows' sources (null: zeros). Its own loop:
// load_rows built on the same per-row helper measured 6% slower in the K = V = 128 backward (H100), a codegen
// difference, so the two stay apart.
template <typename T, typename RowPtrs>
__device__ __forceinline__ void load_row_pairs(const RowTile<T>& ta, const RowTile<T>& tb, int rows_total,
                                               RowPtrs row_ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  const int chunks = min(ta.cols_padded, tb.cols_padded) / kVec;
  const int lanes = chunks >= 8 ? 8 : chunks >= 4 ? 4 : chunks >= 2 ? 2 : 1;
  const int lane = int(threadIdx.x) % lanes, row_step = int(blockDim.x) / lanes;
  for (int r = int(threadIdx.x) / lanes; r < rows_total; r += row_step) {
    const T* src[2];
    row_ptrs(r, src[0], src[1]);
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const RowTile<T>& t = m == 0 ? ta : tb;
      const bool vec_ok = (t.cols % kVec) == 0;
      for (int c = lane * kVec; c < t.cols_padded; c += lanes * kVec) {
        T* d = t.dst + r * t.stride + c;
        if (src[m] && vec_ok && c < t.cols) {
          cp_async_16(d, src[m] + c, true);
        } else if (!src[m] || c >= t.cols) {
          *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) d[e] = c + e < t.cols ? src[m][c + e] : Elem<T>::from_float(0.f);
        }
      }
    }
  }
}

// s[j][e] = q[row] . k[col] for the warp's 16 rows starting at row0 and the BN keys of the tile.
template <typename T, int BN>
__device__ __forceinline__ void warp_scores(float (&s)[BN / 8][4], const T* Qs, const T* Ks, int stride, int row0,
                                            int k_padded, int lane) {
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  if constexpr (Elem<T>::kTensorCore) {
    // A: rows row0 + lane % 16, k half lane / 16. B (K stored [key][k]): two 8-key groups per ldmatrix,
    // key group (lane / 16), k half (lane / 8) % 2.
    // 32-bit shared addresses (bytes): fewer registers than generic pointers.
    const uint32_t a_row = smem_addr(Qs + (row0 + lane % 16) * stride + (lane / 16) * 8);
    const uint32_t b_row = smem_addr(Ks + ((lane / 16) * 8 + lane % 8) * stride + ((lane / 8) % 2) * 8);
    for (int kc = 0; kc < k_padded; kc += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, a_row + kc * int(sizeof(T)));
#pragma unroll
      for (int j = 0; j < BN / 8; j += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, b_row + (j * 8 * stride + kc) * int(sizeof(T)));
        MmaElem<T>::mma(s[j], a, b[0], b[1]);
        MmaElem<T>::mma(s[j + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int r = row0 + lane / 4, c = (lane % 4) * 2;
    for (int kk = 0; kk < k_padded; ++kk) {
      const float q0 = Qs[r * stride + kk], q1 = Qs[(r + 8) * stride + kk];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const float k0 = Ks[(j * 8 + c) * stride + kk], k1 = Ks[(j * 8 + c + 1) * stride + kk];
        s[j][0] = fmaf(q0, k0, s[j][0]);
        s[j][1] = fmaf(q0, k1, s[j][1]);
        s[j][2] = fmaf(q1, k0, s[j][2]);
        s[j][3] = fmaf(q1, k1, s[j][3]);
      }
    }
  }
}

// o[j][e] += sum_key p[row][key] * v[key][col]. The fp32 path stages p through the warp's `Ps` [16 x BN].
template <typename T, int BN, int VP>
__device__ __forceinline__ void warp_pv(float (&o)[VP / 8][4], const float (&p)[BN / 8][4], const T* Vs, int vstride,
                                        float* Ps, int lane) {
  if constexpr (Elem<T>::kTensorCore) {
    const uint32_t v_row = smem_addr(Vs + (lane % 16) * vstride + (lane / 16) * 8);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = MmaElem<T>::pack(p[2 * kk][0], p[2 * kk][1]);
      a[1] = MmaElem<T>::pack(p[2 * kk][2], p[2 * kk][3]);
      a[2] = MmaElem<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[3] = MmaElem<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
      for (int nv = 0; nv < VP / 16; ++nv) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_row + (kk * 16 * vstride + nv * 16) * int(sizeof(T)));
        MmaElem<T>::mma(o[2 * nv], a, b[0], b[1]);
        MmaElem<T>::mma(o[2 * nv + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int r = lane / 4, c = (lane % 4) * 2;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      Ps[r * BN + j * 8 + c] = p[j][0];
      Ps[r * BN + j * 8 + c + 1] = p[j][1];
      Ps[(r + 8) * BN + j * 8 + c] = p[j][2];
      Ps[(r + 8) * BN + j * 8 + c + 1] = p[j][3];
    }
    __syncwarp();
    for (int key = 0; key < BN; ++key) {
      const float p0 = Ps[r * BN + key], p1 = Ps[(r + 8) * BN + key];
#pragma unroll
      for (int j = 0; j < VP / 8; ++j) {
        const float v0 = Vs[key * vstride + j * 8 + c], v1 = Vs[key * vstride + j * 8 + c + 1];
        o[j][0] = fmaf(p0, v0, o[j][0]);
        o[j][1] = fmaf(p0, v1, o[j][1]);
        o[j][2] = fmaf(p1, v0, o[j][2]);
        o[j][3] = fmaf(p1, v1, o[j][3]);
      }
    }
    __syncwarp();
  }
}

}  // namespace nsa::cuda::tile
