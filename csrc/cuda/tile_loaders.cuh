// Operand loaders: global rows (and the x[i] * y[j] row products) into shared memory, with
// zero-filled tails of rows and of d.
#pragma once

#include "device.cuh"

namespace symile_cuda {

// ---------------------------------------------------------------------------
// Operand loaders: copy a rows x BLOCK_D chunk into shared memory, zero outside
// the tensors (tails of rows and of d are handled here, not by padded copies).

// Global rows are read in 16-byte pieces (VEC elements, LDG.128) when every piece is
// aligned: the tensor's base is 16-byte aligned, D is a multiple of VEC (so is every row
// start) and so are the chunk's first column and width. Otherwise (odd d, offset views)
// element by element. Either way out-of-range rows and columns are zero.
template <typename T>
__device__ __forceinline__ bool rows_vectorisable(const T* src, int64_t D, int64_t d0, int cols) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  return D % VEC == 0 && d0 % VEC == 0 && cols % VEC == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
}

// VEC elements of row `row` from column col (a multiple of VEC), as Acc: zeros unless row < n
// and col < D (then col + VEC <= D, D being a multiple of VEC).
template <typename Acc, typename T>
__device__ __forceinline__ void load_piece(Acc (&out)[16 / sizeof(T)], const T* __restrict__ src, int64_t row,
                                           int64_t n, int64_t col, int64_t D) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if (row < n && col < D) {
    T v[VEC];
    SK_LOAD16(src + row * D + col, v);
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = to_acc<Acc>(v[q]);
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = Acc(0);
  }
}

// Rows of an (n, D) tensor: dst[r][dd] = src[row0 + r][d0 + dd]. INFLIGHT: 16-byte pieces
// in flight per thread (1 in the cube backward, whose 128-register plan has no room for two).
template <typename In, typename Acc, typename T, int INFLIGHT = 2>
__device__ __forceinline__ void load_rows(In* dst, int ld, int rows, int cols, const T* __restrict__ src,
                                          int64_t row0, int64_t n, int64_t d0, int64_t D) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if (rows_vectorisable(src, D, d0, cols)) {
    const int pieces = cols / VEC;
    // At most two pieces in flight per thread: the bf16 kernels' accumulators stay in
    // registers under the 2-CTA cap (no spills, tests/test_cuda_sass.py).
#pragma unroll INFLIGHT
    for (int e = opaque_tid(); e < rows * pieces; e += kThreads) {
      const int r = e / pieces;
      const int dd = (e % pieces) * VEC;
      Acc v[VEC];
      load_piece(v, src, row0 + r, n, d0 + dd, D);
#pragma unroll
      for (int q = 0; q < VEC; ++q) dst[r * ld + dd + q] = to_in<In, Acc>(v[q]);
    }
    return;
  }
  for (int e = opaque_tid(); e < rows * cols; e += kThreads) {
    const int r = e / cols;
    const int dd = e % cols;
    const int64_t row = row0 + r;
    const int64_t col = d0 + dd;
    const Acc v = (row < n && col < D) ? to_acc<Acc>(src[row * D + col]) : Acc(0);
    dst[r * ld + dd] = to_in<In, Acc>(v);
  }
}

// load_rows through cp.async: the copies land at the caller's SK_CP_ASYNC_WAIT (then a
// barrier). Only when the rows are already the operand type (no conversion on the way)
// and every 16-byte piece is aligned at both ends (rows_vectorisable, and a shared row
// stride and base on 16 bytes); pieces of rows >= n or columns >= D are zero fills that
// read nothing. Otherwise (float rows in bf16 tiles, odd d, offset bases, SIMT strides)
// load_rows, synchronously: its stores are visible after the same barrier.
template <typename In, typename Acc, typename T>
__device__ __forceinline__ void load_rows_async(In* dst, int ld, int rows, int cols, const T* __restrict__ src,
                                                int64_t row0, int64_t n, int64_t d0, int64_t D) {
  if constexpr (std::is_same<In, T>::value) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    if ((ld * sizeof(In)) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
        rows_vectorisable(src, D, d0, cols)) {
      const int pieces = cols / VEC;
      for (int e = opaque_tid(); e < rows * pieces; e += kThreads) {
        const int r = e / pieces;
        const int dd = (e % pieces) * VEC;
        const int64_t row = row0 + r, col = d0 + dd;
        const bool inside = row < n && col < D;
        SK_CP_ASYNC16(dst + r * ld + dd, inside ? src + row * D + col : src, inside ? 16 : 0);
      }
      return;
    }
  }
  load_rows<In, Acc>(dst, ld, rows, cols, src, row0, n, d0, D);
}

// Row products of BLOCK_I x BLOCK_J pairs: dst[p][dd] = A[a0 + p / BJ][d] * B[b0 + p % BJ][d].
// INFLIGHT as load_rows.
template <typename In, typename Acc, typename T, int BI, int BJ, int INFLIGHT = 2>
__device__ __forceinline__ void load_pair_products(In* dst, int ld, int cols, const T* __restrict__ A,
                                                   const T* __restrict__ B, int64_t a0, int64_t NA, int64_t b0,
                                                   int64_t NB, int64_t d0, int64_t D) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if (opaque_tid() == 0) SK_COUNT_PAIR_PRODUCTS(int64_t(BI) * BJ * cols);  // the tile's elements, zeros included
  if (rows_vectorisable(A, D, d0, cols) && rows_vectorisable(B, D, d0, cols)) {
    const int pieces = cols / VEC;
#pragma unroll INFLIGHT  // as load_rows
    for (int e = opaque_tid(); e < BI * BJ * pieces; e += kThreads) {
      const int p = e / pieces;
      const int dd = (e % pieces) * VEC;
      // A pair outside the cube reads neither row (as the scalar path): exact zeros.
      const bool ok = a0 + p / BJ < NA && b0 + p % BJ < NB;
      Acc va[VEC], vb[VEC];
      load_piece(va, A, a0 + p / BJ, ok ? NA : 0, d0 + dd, D);
      load_piece(vb, B, b0 + p % BJ, ok ? NB : 0, d0 + dd, D);
#pragma unroll
      for (int q = 0; q < VEC; ++q) dst[p * ld + dd + q] = to_in<In, Acc>(va[q] * vb[q]);
    }
    return;
  }
  for (int e = opaque_tid(); e < BI * BJ * cols; e += kThreads) {
    const int p = e / cols;
    const int dd = e % cols;
    const int64_t a = a0 + p / BJ;
    const int64_t b = b0 + p % BJ;
    const int64_t col = d0 + dd;
    Acc v = Acc(0);
    if (a < NA && b < NB && col < D) v = to_acc<Acc>(A[a * D + col]) * to_acc<Acc>(B[b * D + col]);
    dst[p * ld + dd] = to_in<In, Acc>(v);
  }
}

}  // namespace symile_cuda
