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
// j * 8 + (lane % 4) * 2 + {0, 1} for every 8-column group j. The fp32 path keeps the same layout with tf32
// mma (three products each, Tf32x3: fp32's precision), so the kernels around it are written once.
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
    // fp32: three tf32 products (Tf32x3), k-steps of 8, the fragments by ldmatrix as above (an 8 x 4-float matrix
    // is the tf32 operand layout); the big x big products and the cross terms in two accumulators.
    float cross[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) cross[j][0] = cross[j][1] = cross[j][2] = cross[j][3] = 0.f;
    const uint32_t a_row = smem_addr(Qs + (row0 + lane % 16) * stride + (lane / 16) * 4);
    const uint32_t b_row = smem_addr(Ks + ((lane / 16) * 8 + lane % 8) * stride + ((lane / 8) % 2) * 4);
    for (int kc = 0; kc < k_padded; kc += 8) {
      uint32_t a[4], a_big[4], a_small[4];
      ldmatrix_x4(a, a_row + kc * 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) Tf32x3::split(a[i], a_big[i], a_small[i]);
      uint32_t b_big[BN / 8][2], b_small[BN / 8][2];
#pragma unroll
      for (int j = 0; j < BN / 8; j += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, b_row + (j * 8 * stride + kc) * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) Tf32x3::split(b[i], b_big[j + i / 2][i % 2], b_small[j + i / 2][i % 2]);
      }
      Tf32x3::mma3(s, cross, a_big, a_small, b_big, b_small);
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] += cross[j][e];
  }
}

// o[j][e] += sum_key p[row][key] * v[key][col]. fp32: three tf32 products a k-step of 8 keys, the S fragment as A
// with the keys in the order 0, 2, 4, 6, 1, 3, 5, 7 and V's rows 2t, 2t + 1 (t = lane % 4) by plain loads at
// column lane / 4; each 32 keys' products summed apart and added to o in fp32 (the tensor cores' accumulation
// rounds towards zero, which one chain over thousands of keys would turn into a bias).
template <typename T, int BN, int VP>
__device__ __forceinline__ void warp_pv(float (&o)[VP / 8][4], const float (&p)[BN / 8][4], const T* Vs, int vstride,
                                        int lane) {
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
    constexpr int kPart = BN < 32 ? BN / 8 : 4;  // k-steps summed apart: 32 keys
    constexpr int kN = 4;                        // 8-column tiles in flight
    static_assert(VP % (8 * kN) == 0 && BN % (8 * kPart) == 0, "whole groups of output tiles and key steps");
    const T* v_col = Vs + 2 * (lane % 4) * vstride + lane / 4;
#pragma unroll
    for (int k0 = 0; k0 < BN / 8; k0 += kPart) {
      uint32_t a_big[kPart][4], a_small[kPart][4];
#pragma unroll
      for (int kk = 0; kk < kPart; ++kk) {
        const float a[4] = {p[k0 + kk][0], p[k0 + kk][2], p[k0 + kk][1], p[k0 + kk][3]};
#pragma unroll
        for (int i = 0; i < 4; ++i) tf32_split(a[i], a_big[kk][i], a_small[kk][i]);
      }
#pragma unroll
      for (int n0 = 0; n0 < VP / 8; n0 += kN) {
        float part[kN][4];
#pragma unroll
        for (int j = 0; j < kN; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kPart; ++kk) {
          uint32_t b_big[kN][2], b_small[kN][2];
#pragma unroll
          for (int j = 0; j < kN; ++j) {
            const T* v_rows = v_col + (k0 + kk) * 8 * vstride + (n0 + j) * 8;
            tf32_split(v_rows[0], b_big[j][0], b_small[j][0]);
            tf32_split(v_rows[vstride], b_big[j][1], b_small[j][1]);
          }
          Tf32x3::mma3(part, part, a_big[kk], a_small[kk], b_big, b_small);
        }
#pragma unroll
        for (int j = 0; j < kN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[n0 + j][e] += part[j][e];
      }
    }
  }
}

}  // namespace nsa::cuda::tile
