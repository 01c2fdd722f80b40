// Device building blocks shared by the cube and pair kernels: tile-product
// engines (SIMT and WMMA), operand conversion and log-sum-exp helpers.
// No torch headers: raw pointers and sizes only.
#pragma once

#ifdef SYMILE_CUDA_EMULATE
// CPU tests only: host threads stand in for a CTA (csrc/cuda/emu/cuda_emu.h).
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// The CTA's dynamic shared memory, and a launch of kThreads threads per CTA.
#define SK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define SK_LAUNCH(kernel, grid, smem, stream, ...) kernel<<<(grid), kThreads, (smem), (stream)>>>(__VA_ARGS__)
// Work counters exist in the emulation only.
#define SK_COUNT_FLOPS(n) ((void)0)
#define SK_COUNT_EXP() ((void)0)
#define SK_COUNT_VEXP() ((void)0)
#define SK_COUNT_PAIR_PRODUCTS(n) ((void)0)
// One 16-byte global load (LDG.128) into out; the caller guarantees 16-byte alignment.
#define SK_LOAD16(src, out)                                    \
  do {                                                         \
    const uint4 sk_raw = *reinterpret_cast<const uint4*>(src); \
    memcpy((out), &sk_raw, 16);                                \
  } while (0)
// cp.async (sm_80+): a 16-byte global-to-shared copy that bypasses registers and L1 (.cg),
// reading src_bytes (0 or 16) and zero-filling the rest; both addresses 16-byte aligned.
// The copies of a thread land once their commit group is waited for (wait_group n: all
// but the newest n groups); a barrier then shows them to the other threads.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SK_CP_ASYNC16(dst, src, src_bytes)                                                      \
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(                        \
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),                        \
               "l"(src), "r"(src_bytes))
#define SK_CP_ASYNC_COMMIT() asm volatile("cp.async.commit_group;\n" ::)
#define SK_CP_ASYNC_WAIT(newest) asm volatile("cp.async.wait_group %0;\n" ::"n"(newest))
#else  // older targets (never launched: the binding refuses them): a synchronous copy
#define SK_CP_ASYNC16(dst, src, src_bytes)                                   \
  do {                                                                      \
    uint4 sk_raw = make_uint4(0, 0, 0, 0);                                  \
    if ((src_bytes) > 0) sk_raw = *reinterpret_cast<const uint4*>(src);     \
    *reinterpret_cast<uint4*>(dst) = sk_raw;                                \
  } while (0)
#define SK_CP_ASYNC_COMMIT() ((void)0)
#define SK_CP_ASYNC_WAIT(newest) ((void)0)
#endif
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "plan.h"

namespace symile_cuda {

// ---------------------------------------------------------------------------
// Policies: how a tile product is computed. ``In`` is the operand type in shared
// memory, ``Acc`` the accumulator (and the type of every LSE and exponential).

template <typename T>
struct IeeePolicy {
  using In = T;
  using Acc = T;
  static constexpr bool kWmma = false;
  static constexpr TileConfig cfg = config_for(kIeee, sizeof(T));
};

struct Tf32Policy {
  using In = float;
  using Acc = float;
  static constexpr bool kWmma = true;
  static constexpr TileConfig cfg = config_for(kTf32, 4);
};

struct Bf16Policy {
  using In = __nv_bfloat16;
  using Acc = float;
  static constexpr bool kWmma = true;
  static constexpr TileConfig cfg = config_for(kBf16, 4);
};

template <typename In, typename Acc>
__device__ __forceinline__ In to_in(Acc v) {
  if constexpr (std::is_same<In, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<In>(v);
  }
}

// Global-memory elements to and from the accumulator type. Explicit, because torch
// builds with __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__.
template <typename Acc, typename V>
__device__ __forceinline__ Acc to_acc(V v) {
  if constexpr (std::is_same<V, __nv_bfloat16>::value) {
    return static_cast<Acc>(__bfloat162float(v));
  } else if constexpr (std::is_same<V, __half>::value) {
    return static_cast<Acc>(__half2float(v));
  } else {
    return static_cast<Acc>(v);
  }
}

template <typename V, typename Acc>
__device__ __forceinline__ V from_acc(Acc v) {
  if constexpr (std::is_same<V, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same<V, __half>::value) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<V>(v);
  }
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Two names for one function, so the emulation counts them apart (docs/math.md section 5's
// bound is on the first): exp_ is evaluated per cube element (tile epilogues), vexp_ per
// row, column, tile or partial LSE (o(1) per element: 1/BLOCK_K, 1/BLOCK_P or 1/N of them).
__device__ __forceinline__ float exp_raw(float v) { return expf(v); }
__device__ __forceinline__ double exp_raw(double v) { return exp(v); }
template <typename T>
__device__ __forceinline__ T exp_(T v) {
  SK_COUNT_EXP();
  return exp_raw(v);
}
template <typename T>
__device__ __forceinline__ T vexp_(T v) {
  SK_COUNT_VEXP();
  return exp_raw(v);
}
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

// Merges a tile's (max m, sum of exp(v - m)) into a running (M, S) pair: one
// exponential, of whichever maximum is the smaller (exp(-inf) = 0 starts the pair).
template <typename T>
__device__ __forceinline__ void merge_running(T& M, T& S, T m, T s) {
  if (m == neg_inf<T>()) return;
  if (m > M) {
    S = S * vexp_(M - m) + s;
    M = m;
  } else {
    S += s * vexp_(m - M);
  }
}

// ---------------------------------------------------------------------------
// Tile-product engines. C (BM x BN) += A (BM x kred, row-major, ld lda) times
// B (kred x BN): B_COL means B(k, n) = Bs[n * ldb + k] (rows of z stored
// row-major), else B(k, n) = Bs[k * ldb + n]. All operands are in shared memory;
// every thread of the CTA calls every method.

template <typename T, int BM, int BN>
struct SimtTile {
  static constexpr int TX = 16;
  static constexpr int TY = kThreads / TX;
  static_assert(BM % TY == 0 && BN % TX == 0, "SIMT tile must split over a 16 x 16 thread grid");
  static constexpr int RM = BM / TY;
  static constexpr int RN = BN / TX;
  T acc[RM][RN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RN; ++c) acc[r][c] = T(0);
  }

  template <bool B_COL>
  __device__ __forceinline__ void mma(const T* As, int lda, const T* Bs, int ldb, int kred) {
    // Strided ownership (rows ty + r * TY, columns tx + c * TX) keeps a warp's
    // shared-memory reads on distinct banks or broadcasts.
    const int tx = threadIdx.x % TX;
    const int ty = threadIdx.x / TX;
    SK_COUNT_FLOPS(int64_t(2) * RM * RN * kred);  // this thread's share of 2 BM BN kred
    for (int kk = 0; kk < kred; ++kk) {
      T a[RM], b[RN];
#pragma unroll
      for (int r = 0; r < RM; ++r) a[r] = As[(ty + r * TY) * lda + kk];
#pragma unroll
      for (int c = 0; c < RN; ++c) b[c] = B_COL ? Bs[(tx + c * TX) * ldb + kk] : Bs[kk * ldb + tx + c * TX];
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RN; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
    }
  }

  // acc = C (BM x BN, row-major, ld ldc): resumes an accumulation kept in shared memory.
  __device__ __forceinline__ void load(const T* Cs, int ldc) {
    const int tx = threadIdx.x % TX;
    const int ty = threadIdx.x / TX;
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RN; ++c) acc[r][c] = Cs[(ty + r * TY) * ldc + tx + c * TX];
  }

  __device__ __forceinline__ void store(T* Cs, int ldc) const {
    const int tx = threadIdx.x % TX;
    const int ty = threadIdx.x / TX;
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RN; ++c) Cs[(ty + r * TY) * ldc + tx + c * TX] = acc[r][c];
  }
};

template <typename In, int BM, int BN>
struct WmmaTile {
  // TF32 fragments are m16n16k8 over float storage; bf16 fragments m16n16k16.
  static constexpr bool kTf32 = std::is_same<In, float>::value;
  static constexpr int WK = kTf32 ? 8 : 16;
  using FragT = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, In>::type;
  static constexpr int WARPS = kThreads / 32;
  static constexpr int TILES_N = BN / 16;
  static constexpr int TILES = (BM / 16) * TILES_N;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && TILES % WARPS == 0, "WMMA tile must split into 16 x 16 pieces per warp");
  static constexpr int PER_WARP = TILES / WARPS;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, WK, float> acc[PER_WARP];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q) nvcuda::wmma::fill_fragment(acc[q], 0.0f);
  }

  template <bool B_COL>
  __device__ __forceinline__ void mma(const In* As, int lda, const In* Bs, int ldb, int kred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bf16 and TF32 fragments need sm_80; the binding refuses older devices
#else
    using namespace nvcuda;
    using BLayout = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32;
#pragma unroll 1
    for (int kk = 0; kk < kred; kk += WK) {
#pragma unroll
      for (int q = 0; q < PER_WARP; ++q) {
        const int t = warp + q * WARPS;
        const int tm = t / TILES_N;
        const int tn = t % TILES_N;
        wmma::fragment<wmma::matrix_a, 16, 16, WK, FragT, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, WK, FragT, BLayout> b;
        wmma::load_matrix_sync(a, As + tm * 16 * lda + kk, lda);
        wmma::load_matrix_sync(b, B_COL ? Bs + tn * 16 * ldb + kk : Bs + kk * ldb + tn * 16, ldb);
        if constexpr (kTf32) {
#pragma unroll
          for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
#pragma unroll
          for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
        }
        wmma::mma_sync(acc[q], a, b, acc[q]);
      }
    }
#endif
  }

  __device__ __forceinline__ void load(const float* Cs, int ldc) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q) {
      const int t = warp + q * WARPS;
      nvcuda::wmma::load_matrix_sync(acc[q], Cs + (t / TILES_N) * 16 * ldc + (t % TILES_N) * 16, ldc,
                                     nvcuda::wmma::mem_row_major);
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q) {
      const int t = warp + q * WARPS;
      nvcuda::wmma::store_matrix_sync(Cs + (t / TILES_N) * 16 * ldc + (t % TILES_N) * 16, acc[q], ldc,
                                      nvcuda::wmma::mem_row_major);
    }
  }
};

// bf16 fragments through ldmatrix and mma.sync (PTX, sm_80+). An x4 fragment is this lane's
// four 32-bit registers on a GPU; the emulation (emu/cuda_emu.h) holds the whole warp's, so a
// fragment layout or an unaligned row aborts or goes wrong on the CPU as it would on a GPU.
// row_of(lane) is the row address lane `lane` gives ldmatrix (a function of the lane and of
// values uniform over the warp): a GPU lane evaluates it for itself, the emulation for all 32.
#ifdef SYMILE_CUDA_EMULATE
using FragX4 = symile_emu::WarpX4;
#else
struct FragX4 {
  uint32_t r[4];
};
#endif

// This thread's index, read by a volatile asm so that the compiler recomputes the fragment
// addresses that depend on it at every tile product instead of hoisting them out of the
// kernels' loops and holding them (or spilling them) for the whole kernel: the cube backward's
// 128-register plan. The emulation reads threadIdx.
__device__ __forceinline__ int opaque_tid() {
#if defined(__CUDA_ARCH__) && !defined(SYMILE_CUDA_EMULATE)
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
#else
  return static_cast<int>(threadIdx.x);
#endif
}

// lane: this thread's lane (threadIdx.x % 32, from opaque_tid).
template <typename RowOf>
__device__ __forceinline__ void ldsm_x4(FragX4& f, RowOf row_of, bool trans, int lane) {
#ifdef SYMILE_CUDA_EMULATE
  (void)lane;
  symile_emu::ldmatrix_x4(f, row_of, trans);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_of(lane)));
  if (trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3]) : "r"(addr));
  }
#else
  (void)row_of;
  (void)trans;
  (void)lane;
  f.r[0] = f.r[1] = f.r[2] = f.r[3] = 0u;
  __trap();  // bf16 fragments need sm_80; the binding refuses older devices
#endif
}

// Registers 0..count-1 of this lane's fragment from the 32-bit shared words word_of(lane, j)
// (plain LDS; the emulation evaluates word_of for every lane, as ldsm_x4).
template <typename WordOf>
__device__ __forceinline__ void lds_words(FragX4& f, WordOf word_of, int count, int lane) {
#ifdef SYMILE_CUDA_EMULATE
  symile_emu::gather_words(f, word_of, count);  // the whole warp's registers, as ldsm_x4's emulation
  (void)lane;
#else
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j < count) f.r[j] = *reinterpret_cast<const uint32_t*>(word_of(lane, j));
  }
#endif
}

// d += A B, one m16n8 step, B from registers 2 h and 2 h + 1 of fragment b: bf16 (A 16 x 16, B
// 16 x 8: m16n8k16) or, kTf32, TF32 (A 16 x 8, B 8 x 8: m16n8k8; the fragments hold float32
// bits, rounded here by cvt.rna.tf32.f32 as WMMA's __float_to_tf32).
template <bool kTf32>
__device__ __forceinline__ void mma_m16n8(float (&d)[4], const FragX4& a, const FragX4& b, int h) {
#ifdef SYMILE_CUDA_EMULATE
  if constexpr (kTf32) {
    symile_emu::mma_1688_tf32(d, a, b, h);
  } else {
    symile_emu::mma_16816_bf16(d, a, b, h);
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t t[6] = {a.r[0], a.r[1], a.r[2], a.r[3], b.r[2 * h], b.r[2 * h + 1]};
  if constexpr (kTf32) {
#pragma unroll
    for (int q = 0; q < 6; ++q) asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(t[q]) : "f"(__uint_as_float(t[q])));
  }
#define SK_MMA_M16N8(SHAPE_AND_TYPES)                                                                    \
  asm volatile("mma.sync.aligned." SHAPE_AND_TYPES " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "     \
               "{%0, %1, %2, %3};\n"                                                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
               : "r"(t[0]), "r"(t[1]), "r"(t[2]), "r"(t[3]), "r"(t[4]), "r"(t[5]))
  if constexpr (kTf32) {
    SK_MMA_M16N8("m16n8k8.row.col.f32.tf32.tf32.f32");
  } else {
    SK_MMA_M16N8("m16n8k16.row.col.f32.bf16.bf16.f32");
  }
#undef SK_MMA_M16N8
#else
  (void)d;
  (void)a;
  (void)b;
  (void)h;
  __trap();  // tensor-core fragments need sm_80; the binding refuses older devices
#endif
}

// A warp-tiled tensor-core tile product as WmmaTile (16 x 16 output tiles, PER_WARP per warp),
// each tile two m16n8 products per k step: bf16 (In = __nv_bfloat16, m16n8k16) or TF32 (In =
// float, m16n8k8, operands rounded by cvt.rna as WMMA's). A is row-major (ld lda); B_COL: B(k, n) =
// Bs[n ldb + k] (rows of n, k contiguous: ldmatrix as stored), else Bs[k ldb + n] (bf16: ldmatrix
// .trans; TF32, whose 32-bit elements ldmatrix cannot transpose: two LDS per lane). Every
// fragment row is 16 bytes at a 16-byte-aligned address: ld * sizeof(In) and the base on 16
// bytes (plan.h pads bf16 rows by 8 elements, float rows by 4; plan_test.cpp checks the strides).
template <typename In, int BM, int BN>
struct MmaTile {
  static constexpr bool kTf32 = std::is_same<In, float>::value;
  static constexpr int KS = kTf32 ? 8 : 16;  // k per mma.sync
  static constexpr int KH = KS / 2;          // k per 8 x 16-byte ldmatrix matrix
  static constexpr int WARPS = kThreads / 32;
  static constexpr int TILES_N = BN / 16;
  static constexpr int TILES = (BM / 16) * TILES_N;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && TILES % WARPS == 0, "tile must split into 16 x 16 pieces per warp");
  static constexpr int PER_WARP = TILES / WARPS;
  float acc[PER_WARP][2][4];  // [tile][n half][c0..c3]

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[q][h][i] = 0.0f;
  }

  template <bool B_COL>
  __device__ __forceinline__ void mma(const In* As, int lda, const In* Bs, int ldb, int kred) {
    const int tid = opaque_tid();
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll 1
    for (int kk = 0; kk < kred; kk += KS) {
#pragma unroll
      for (int q = 0; q < PER_WARP; ++q) {
        const int t = warp + q * WARPS;
        const int tm = t / TILES_N, tn = t % TILES_N;
        // Lane l gives row l % 8 of matrix l / 8 of each x4 load. A: matrices (rows 0-7, k 0-KH),
        // (rows 8-15, k 0-KH), (rows 0-7, k KH-KS), (rows 8-15, k KH-KS), the a0..a3 of the mma.
        // B: matrices (n 0-7, k 0-KH), (n 0-7, k KH-KS), (n 8-15, k 0-KH), (n 8-15, k KH-KS), so
        // registers 0, 1 feed columns 0-7 and 2, 3 columns 8-15.
        const In* a_base = As + tm * 16 * lda + kk;
        const In* b_base = B_COL ? Bs + tn * 16 * ldb + kk : Bs + kk * ldb + tn * 16;
        FragX4 a, b;
        symile_cuda::ldsm_x4(a, [=](int l) { return a_base + (l % 16) * lda + (l / 16) * KH; }, false, lane);
        if constexpr (B_COL || !kTf32) {
          symile_cuda::ldsm_x4(
              b,
              [=](int l) {
                const int j = l / 8, r = l % 8;
                const int n = (j / 2) * 8 + (B_COL ? r : 0), k = (j % 2) * KH + (B_COL ? 0 : r);
                return B_COL ? b_base + n * ldb + k : b_base + k * ldb + n;
              },
              !B_COL, lane);
        } else {
          // Register j of lane l: B(k, n) with k = (j % 2) * 4 + l % 4, n = (j / 2) * 8 + l / 4.
          symile_cuda::lds_words(
              b, [=](int l, int j) { return b_base + ((j % 2) * 4 + l % 4) * ldb + (j / 2) * 8 + l / 4; }, 4,
              lane);
        }
        symile_cuda::mma_m16n8<kTf32>(acc[q][0], a, b, 0);  // columns tn * 16 + 0..7
        symile_cuda::mma_m16n8<kTf32>(acc[q][1], a, b, 1);  // columns tn * 16 + 8..15
      }
    }
  }

  // acc[q][h][i] is row (lane / 4) + 8 (i / 2), column h * 8 + 2 (lane % 4) + i % 2 of tile q.
  __device__ __forceinline__ void load(const float* Cs, int ldc) {
    const int tid = opaque_tid();
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q) {
      const int t = warp + q * WARPS;
      const float* base = Cs + (t / TILES_N) * 16 * ldc + (t % TILES_N) * 16;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[q][h][i] = base[(lane / 4 + 8 * (i / 2)) * ldc + h * 8 + 2 * (lane % 4) + i % 2];
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) const {
    const int tid = opaque_tid();
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll
    for (int q = 0; q < PER_WARP; ++q) {
      const int t = warp + q * WARPS;
      float* base = Cs + (t / TILES_N) * 16 * ldc + (t % TILES_N) * 16;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) base[(lane / 4 + 8 * (i / 2)) * ldc + h * 8 + 2 * (lane % 4) + i % 2] = acc[q][h][i];
    }
  }
};

template <int BM, int BN>
using MmaBf16Tile = MmaTile<__nv_bfloat16, BM, BN>;
template <int BM, int BN>
using MmaTf32Tile = MmaTile<float, BM, BN>;

// The tensor-core kernels load fragments with ldmatrix into mma.sync (MmaTile); built with
// -DSK_BF16_WMMA (-DSK_TF32_WMMA) the bf16 (TF32) tiles use WMMA load_matrix_sync instead (plain
// shared loads, kept to compare).
#ifdef SK_BF16_WMMA
constexpr bool kBf16Ldmatrix = false;
#else
constexpr bool kBf16Ldmatrix = true;
#endif
#ifdef SK_TF32_WMMA
constexpr bool kTf32Ldmatrix = false;
#else
constexpr bool kTf32Ldmatrix = true;
#endif
template <typename Policy>
constexpr bool use_mma_tile() {
  return Policy::kWmma && (std::is_same<typename Policy::In, __nv_bfloat16>::value ? kBf16Ldmatrix : kTf32Ldmatrix);
}
template <typename Policy, int BM, int BN>
using TileFor = typename std::conditional<
    !Policy::kWmma, SimtTile<typename Policy::Acc, BM, BN>,
    typename std::conditional<use_mma_tile<Policy>(), MmaTile<typename Policy::In, BM, BN>,
                              WmmaTile<typename Policy::In, BM, BN>>::type>::type;

// A policy's tile sizes and the leading dimensions of its logit (S) and operand (P) tiles.
template <typename Policy>
struct TileSizes {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  static constexpr TileConfig c = Policy::cfg;
  static constexpr int BI = c.BLOCK_I, BJ = c.BLOCK_J, BK = c.BLOCK_K, BD = c.BLOCK_D, BP = BI * BJ;
  static constexpr int ldS = BK + c.pad_acc, ldP = BD + c.pad_in;
};

// The forward kernels' shared-memory regions (plan.h forward_layout).
template <typename Policy>
struct ForwardTiles : TileSizes<Policy> {
  using typename TileSizes<Policy>::In;
  using typename TileSizes<Policy>::Acc;
  using TileSizes<Policy>::c;
  Acc *S, *pair_m, *pair_s, *row_M, *row_S, *colm, *colo, *cols, *roww;
  In *P, *Z;

  // p_cols: the columns of row products P holds (plan.h forward_layout).
  __device__ explicit ForwardTiles(unsigned char* smem, int p_cols = 0) {
    constexpr TileConfig cfg = c;  // a local copy: the static member may not be ODR-used in device code
    const ForwardLayout l = forward_layout(cfg, p_cols);
    Acc** acc[] = {&S, &pair_m, &pair_s, &row_M, &row_S, &colm, &colo, &cols, &roww};
    const std::size_t acc_at[] = {l.S, l.pair_m, l.pair_s, l.row_l, l.row_ls, l.colm, l.colo, l.cols, l.roww};
    for (int q = 0; q < 9; ++q) *acc[q] = reinterpret_cast<Acc*>(smem + acc_at[q]);
    P = reinterpret_cast<In*>(smem + l.P);
    Z = reinterpret_cast<In*>(smem + l.Z);
  }
};

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

// ---------------------------------------------------------------------------
// S (BM x BN logits' raw products, ld ldS) = A B^T over the full d, BD columns per step:
// load_a(d0) stages A's BM x BD chunk (or finds it staged) and returns where it starts in
// shared memory (ld lda); load_b(d0, buf) B's BN x BD chunk in buffer buf
// of Cd (STAGES = 2 buffers of bytes_b each, both ld ldP, zero-filled outside the
// tensors), through cp.async where it can: B's next chunk is in flight while this chunk's
// products run (double buffering). Every thread calls; S is ready on return.
// STAGES = 1: one buffer, B loaded after the previous step's barrier and landed before this
// step's (the pair backward and the cube backward, whose accumulators and bookkeeping leave no
// registers for copies in flight under their 128-register plans); cp.async copies, where
// load_b issues them, are waited for at once (no group stays open).
template <typename Policy, int BM, int BN, int BD, int STAGES = kOperandStages, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_products(int64_t D, LoadA&& load_a, LoadB&& load_b, int lda,
                                              typename Policy::In* Cd, std::size_t bytes_b, int ldP,
                                              typename Policy::Acc* S, int ldS) {
  using In = typename Policy::In;
  static_assert(STAGES == 1 || STAGES == 2, "one buffer, or two: current and next");
  if constexpr (STAGES == 1) {
    (void)bytes_b;
    TileFor<Policy, BM, BN> acc;
    acc.zero();
    for (int64_t d0 = 0; d0 < D; d0 += BD) {
      const In* A = load_a(d0);
      load_b(d0, Cd);
      SK_CP_ASYNC_COMMIT();
      SK_CP_ASYNC_WAIT(0);
      __syncthreads();
      acc.template mma<true>(A, lda, Cd, ldP, BD);
      __syncthreads();
    }
    acc.store(S, ldS);
    __syncthreads();
    return;
  }
  In* cur = Cd;
  In* next = reinterpret_cast<In*>(reinterpret_cast<unsigned char*>(Cd) + bytes_b);
  TileFor<Policy, BM, BN> acc;
  acc.zero();
  load_b(int64_t(0), cur);
  SK_CP_ASYNC_COMMIT();
  for (int64_t d0 = 0; d0 < D; d0 += BD) {
    // `next` was last read by the previous step's products (a barrier since).
    if (d0 + BD < D) load_b(d0 + BD, next);
    SK_CP_ASYNC_COMMIT();  // possibly empty: every step commits one group
    const In* A = load_a(d0);
    SK_CP_ASYNC_WAIT(1);   // this step's chunk has landed (only the next one may be in flight)
    __syncthreads();
    acc.template mma<true>(A, lda, cur, ldP, BD);
    __syncthreads();
    In* const done = cur;
    cur = next;
    next = done;
  }
  SK_CP_ASYNC_WAIT(0);  // the last, empty group
  acc.store(S, ldS);
  __syncthreads();
}

// An LSE vector and its gradient for rows [r0, r0 + count) of n: L_s, g_s (0 outside).
template <typename Acc, typename T>
__device__ __forceinline__ void load_vectors(Acc* L_s, Acc* g_s, const T* __restrict__ L, const T* __restrict__ g,
                                             int64_t r0, int64_t n, int count) {
  const int t = opaque_tid();
  if (t < count) {
    const bool ok = r0 + t < n;
    L_s[t] = ok ? static_cast<Acc>(L[r0 + t]) : Acc(0);
    g_s[t] = ok ? static_cast<Acc>(g[r0 + t]) : Acc(0);
  }
}

// Max and sum over groups of LANES adjacent lanes (a power of two <= 32) by butterfly
// shuffles: every lane of the group gets the result; every lane of the warp must call.
template <int LANES, typename T>
__device__ __forceinline__ T lanes_max(T v) {
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "lanes: a power of two <= 32");
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <int LANES, typename T>
__device__ __forceinline__ T lanes_sum(T v) {
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "lanes: a power of two <= 32");
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Row log-sum-exp of a shared-memory tile (masked entries hold -inf).
// Each row gets kThreads / rows adjacent lanes; the result goes to
// the lane with q == 0 through butterfly shuffles, so every thread must call.

template <typename Acc, int ROWS, int COLS>
__device__ __forceinline__ void tile_row_stats(const Acc* S, int ld, int& row, Acc& m, Acc& s, bool& leader) {
  constexpr int TPR = kThreads / ROWS;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "lanes per row must be a power of two <= 32");
  row = threadIdx.x / TPR;
  const int q = threadIdx.x % TPR;
  m = neg_inf<Acc>();
  for (int c = q; c < COLS; c += TPR) m = fmax(m, S[row * ld + c]);
  m = lanes_max<TPR>(m);
  s = Acc(0);
  if (m != neg_inf<Acc>()) {
    for (int c = q; c < COLS; c += TPR) s += exp_(S[row * ld + c] - m);
  }
  s = lanes_sum<TPR>(s);
  leader = q == 0;
}

// Row and column log-sum-exps of a ROWS x COLS logit tile S (masked entries -inf; every
// row or column with a finite entry is "valid") with one exponential per element
// (docs/math.md section 5): E = exp(S - rowmax_r) serves the rows, and the columns get
// sum_r E[r, c] * exp(rowmax_r - cmax), cmax the tile's maximum (ROWS extra exponentials).
// That is exact to float32 only while every valid column's maximum lies within
// kForwardShareSpread of cmax (a flushed term is then below e^(60 - 87.3) of its column's
// largest); other tiles take the exact path, a second exponential per element.
// Row r's (max, sum) is merged into (row_M[r], row_S[r]); column c's tile LSE is
// colo[c] + log(cols[c]) ((-inf, 0) for masked columns). S is overwritten with E. colm
// (COLS) and roww (ROWS) are scratch. Every thread calls; results are visible on return.
template <typename Acc, int ROWS, int COLS>
__device__ __forceinline__ void tile_lse_shared(Acc* S, int ld, Acc* colm, Acc* colo, Acc* cols, Acc* roww,
                                                Acc* row_M, Acc* row_S) {
  constexpr int TPC = kThreads / COLS;
  constexpr int TPR = kThreads / ROWS;
  static_assert(TPC >= 1 && TPC <= 32 && (TPC & (TPC - 1)) == 0, "lanes per column must be a power of two <= 32");
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "lanes per row must be a power of two <= 32");
  const Acc ninf = neg_inf<Acc>();
  {
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    Acc m = ninf;
        for (int r = q; r < ROWS; r += TPC) m = fmax(m, S[r * ld + col]);
    m = lanes_max<TPC>(m);
    if (q == 0) colm[col] = m;
  }
  __syncthreads();
  // Block-uniform: every thread reads the same COLS maxima.
  Acc cmax = ninf, lowest = static_cast<Acc>(INFINITY);
#pragma unroll 8  // fully unrolled, these COLS shared loads were hoisted into registers
  for (int c = 0; c < COLS; ++c) {
    const Acc m = colm[c];
    cmax = fmax(cmax, m);
    if (m != ninf) lowest = lowest < m ? lowest : m;
  }
  const bool share = lowest >= cmax - static_cast<Acc>(kForwardShareSpread);
  if (!share) {  // exact path: the columns' own exponentials, before S is overwritten
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    const Acc m = colm[col];
    Acc s = Acc(0);
    if (m != ninf) {
            for (int r = q; r < ROWS; r += TPC) s += exp_(S[r * ld + col] - m);
    }
    s = lanes_sum<TPC>(s);
    if (q == 0) {
      colo[col] = m;
      cols[col] = s;
    }
  }
  __syncthreads();
  {
    const int row = threadIdx.x / TPR;
    const int q = threadIdx.x % TPR;
    Acc m = ninf;
        for (int c = q; c < COLS; c += TPR) m = fmax(m, S[row * ld + c]);
    m = lanes_max<TPR>(m);
    Acc s = Acc(0);
        for (int c = q; c < COLS; c += TPR) {
      const Acc e = m == ninf ? Acc(0) : exp_(S[row * ld + c] - m);  // the shared exponential
      S[row * ld + c] = e;
      s += e;
    }
    s = lanes_sum<TPR>(s);
    if (q == 0) {
      merge_running(row_M[row], row_S[row], m, s);
      if (share) roww[row] = m == ninf ? Acc(0) : vexp_(m - cmax);
    }
  }
  __syncthreads();
  if (share) {
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    Acc s = Acc(0);
        for (int r = q; r < ROWS; r += TPC) s += S[r * ld + col] * roww[r];
    s = lanes_sum<TPC>(s);
    // A valid column's largest term is exp(its max - cmax) >= e^-60: s > 0.
    if (q == 0) {
      colo[col] = colm[col] == ninf ? ninf : cmax;
      cols[col] = colm[col] == ninf ? Acc(0) : s;
    }
    __syncthreads();
  }
}

// The backward's per-pair factors of G (docs/math.md section 2) for a tile of BP = BI x BJ
// pairs (a0 + p / BJ, b0 + p % BJ), from LA_s, gA_s (BI rows) and LB_s, gB_s (BJ rows):
// ref[p] = min(LA, LB) (every logit of the pair lies below both, so exp(S - ref) <= 1),
// arow[p] = gA e^(ref - LA) + gB e^(ref - LB), u[p] = e^(ref - c0) with c0 = max_p ref;
// masked pairs get ref = -inf, arow = u = 0. Returns c0. Every thread calls.
template <typename Acc, int BI, int BJ>
__device__ __forceinline__ Acc pair_factors(const Acc* LA_s, const Acc* gA_s, const Acc* LB_s, const Acc* gB_s,
                                            int64_t a0, int64_t NA, int64_t b0, int64_t NB, Acc* ref, Acc* arow,
                                            Acc* u) {
  constexpr int BP = BI * BJ;
  const int t = opaque_tid();
  if (t < BP) {
    const int aa = t / BJ, bb = t % BJ;
    if (a0 + aa < NA && b0 + bb < NB) {
      // One exponential: the term of the smaller LSE has exponent 0 (e^0 = 1 exactly).
      const Acc la = LA_s[aa], lb = LB_s[bb];
      ref[t] = la < lb ? la : lb;
      arow[t] = la < lb ? gA_s[aa] + gB_s[bb] * vexp_(la - lb) : gA_s[aa] * vexp_(lb - la) + gB_s[bb];
    } else {
      ref[t] = neg_inf<Acc>();
      arow[t] = Acc(0);
    }
  }
  __syncthreads();
  Acc c0 = neg_inf<Acc>();
#pragma unroll 8
  for (int p = 0; p < BP; ++p) c0 = fmax(c0, ref[p]);
  if (t < BP) u[t] = ref[t] == neg_inf<Acc>() ? Acc(0) : vexp_(ref[t] - c0);
  __syncthreads();
  return c0;
}

// G = gA e^(S - LA) + gB e^(S - LB) + gC e^(S - LC) of a BP x BK tile of raw products S
// (logits tau * S) with one exponential per element, E = exp(tau S - ref[p]): the first two
// terms are E * arow[p], the third E * u[p] * bcol[k] with bcol = gC e^(c0 - LC) <= gC
// e^kBackwardShareSpread, used while c0 - min LC <= kBackwardShareSpread (a flushed term
// is then below gC e^(40 - 87.3)); other tiles give the third term its own exponential.
// Writes G[p * ldG + k] (TRANSPOSED: G[k * ldG + p]) in the operand type, 0 where masked.
// LC_s, gC_s: the tile's BK columns, k0 + k < NC valid. bcol is scratch. Every thread calls.
template <typename In, typename Acc, int BP, int BK, bool TRANSPOSED>
__device__ __forceinline__ void tile_G(const Acc* S, int ldS, Acc tau, const Acc* ref, const Acc* arow,
                                       const Acc* u, Acc c0, const Acc* LC_s, const Acc* gC_s, int64_t k0,
                                       int64_t NC, Acc* bcol, In* G, int ldG) {
  const int t = opaque_tid();
  Acc lowest = static_cast<Acc>(INFINITY);  // block-uniform
#pragma unroll 8
  for (int k = 0; k < BK && k0 + k < NC; ++k) lowest = lowest < LC_s[k] ? lowest : LC_s[k];
  const bool share = c0 - lowest <= static_cast<Acc>(kBackwardShareSpread);
  if (share && t < BK) bcol[t] = k0 + t < NC ? gC_s[t] * vexp_(c0 - LC_s[t]) : Acc(0);
  __syncthreads();
  for (int e = t; e < BP * BK; e += kThreads) {
    const int p = TRANSPOSED ? e % BP : e / BK;
    const int k = TRANSPOSED ? e / BP : e % BK;
    Acc g = Acc(0);
    if (ref[p] != neg_inf<Acc>() && k0 + k < NC) {
      const Acc v = tau * S[p * ldS + k];
      const Acc E = exp_(v - ref[p]);  // the shared exponential
      g = share ? E * (arow[p] + u[p] * bcol[k]) : E * arow[p] + gC_s[k] * exp_(v - LC_s[k]);
    }
    G[TRANSPOSED ? k * ldG + p : p * ldG + k] = to_in<In, Acc>(g);
  }
  __syncthreads();
}

// Deterministic block sum (fixed tree order); every thread calls, thread 0 gets the sum.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* red) {
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) red[t] += red[t + stride];
    __syncthreads();
  }
  return red[0];
}

// ---------------------------------------------------------------------------
// Small helper kernels.

template <typename T>
__global__ void fill_kernel(T* __restrict__ out, int64_t n, T value) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    out[e] = value;
  }
}

// out[n] = LSE of R partial LSEs held as (max, sum) pairs, M = part[r * N + n] and
// S = part[(R + r) * N + n]: one pass for the maximum, one for the rescaled sum (a
// (-inf, 0) pair adds nothing), in the fixed order r = 0, 1, ... The (max, sum) pair is
// the compute dtype's; only the result is formed in float64, (double) m + log((double) s),
// so log s survives where it is below half an ulp of m in the compute dtype (at m = 1e8 a
// float32 m + log s would drop a log 2 of a tie; docs/math.md section 6.4).
template <typename T>
__global__ void combine_lse_kernel(const T* __restrict__ part, int64_t R, int64_t N, double* __restrict__ out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    T m = neg_inf<T>();
    for (int64_t r = 0; r < R; ++r) m = fmax(m, part[r * N + n]);
    T s = T(0);
    if (m != neg_inf<T>()) {
      for (int64_t r = 0; r < R; ++r) {
        const T Mr = part[r * N + n];
        if (Mr != neg_inf<T>()) s += part[(R + r) * N + n] * vexp_(Mr - m);
      }
    }
    out[n] = m == neg_inf<T>() ? neg_inf<double>() : static_cast<double>(m) + log_(static_cast<double>(s));
  }
}

// out[0] = sum of part[0..n) in a fixed order (one CTA).
template <typename T>
__global__ void sum_kernel(const T* __restrict__ part, int64_t n, T* __restrict__ out) {
  __shared__ T red[kThreads];
  T v = T(0);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) v += part[e];
  const T total = block_sum<T>(v, red);
  if (threadIdx.x == 0) out[0] = total;
}

// out[e] = tau * sum_{r < R} part[r * n + e] in the rows' type, r in a fixed order; with X,
// also dot_part[CTA] = sum over the CTA's e of X[e] * (that sum / tau): a fixed grid makes
// dtau deterministic.
template <typename T, typename TIn>
__global__ void __launch_bounds__(kThreads)
    reduce_parts_kernel(const T* __restrict__ part, int64_t R, int64_t n, const T* __restrict__ tau_ptr,
                        const TIn* __restrict__ X, TIn* __restrict__ out, T* __restrict__ dot_part) {
  __shared__ T red[kThreads];
  const T tau = *tau_ptr;
  T dot = T(0);
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    T v = T(0);
    for (int64_t r = 0; r < R; ++r) v += part[r * n + e];
    out[e] = from_acc<TIn>(tau * v);
    if (X != nullptr) dot += to_acc<T>(X[e]) * v;
  }
  if (dot_part != nullptr) {  // uniform over the grid
    const T total = block_sum<T>(dot, red);
    if (threadIdx.x == 0) dot_part[blockIdx.x] = total;
  }
}

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace symile_cuda
