// Tile-product engines: SIMT FMAs, WMMA fragments and mma.sync with ldmatrix fragments, each
// C (BM x BN) += A B over operands in shared memory, and the shared-memory layouts they use.
#pragma once

#include "device.cuh"

namespace symile_cuda {

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

}  // namespace symile_cuda
