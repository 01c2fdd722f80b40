// A host-thread emulation of the small CUDA subset the kernels use, so that the
// real kernel sources (cube.cu, pair.cu) run on a CPU in tests: one std::thread
// per CUDA thread, one CTA at a time, __syncthreads as a std::barrier over the
// CTA, warp shuffles through a per-warp buffer and barrier, and WMMA fragments
// that hold the whole 16 x 16 tile in every lane (the documented pointer
// alignment and ldm rules are checked, so a layout that would be undefined on a
// GPU aborts here). Shared memory starts filled with 0xFF bytes (NaN) so a read
// before a write shows. Not part of the extension: compiled only with
// -DSYMILE_CUDA_EMULATE by tests/test_cuda_emulation.py.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

using std::fma;
using std::fmax;

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx, gridDim, blockDim;

// ---------------------------------------------------------------------------
// Runtime API stand-ins.
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace symile_emu {

constexpr int kBlockThreads = 256;
constexpr int kWarps = kBlockThreads / 32;
constexpr int kSmemOptin = 232448;  // H100's per-block opt-in limit

struct Block {
  std::barrier<> all{kBlockThreads};
  std::unique_ptr<std::barrier<>> warp[kWarps];
  alignas(16) double shfl[kWarps][32];
  unsigned char* smem = nullptr;
  Block() {
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(32);
  }
};

inline thread_local Block* tls_block = nullptr;
inline cudaError_t last_error = cudaSuccess;

// Work counters (tests/test_cuda_work.py, benchmarks/count_work_cuda.py): tile-product
// FLOPs (2 m n k per warp-wide mma_sync, 2 per SIMT fused multiply-add) and calls of
// exp_. Each emulated thread counts in thread-local variables, folded into the totals
// when it ends; the totals of every launch are kept in order, with the launch's name.
struct LaunchWork {
  const char* name;
  int64_t grid, flops, exps, vexps, vloads, async_copies, pair_products;
};
inline thread_local int64_t tl_flops = 0, tl_exps = 0, tl_vexps = 0, tl_vloads = 0, tl_async = 0, tl_pairs = 0;
inline std::atomic<int64_t> launch_flops{0}, launch_exps{0}, launch_vexps{0}, launch_vloads{0}, launch_async{0},
    launch_pairs{0};
inline std::vector<LaunchWork> launches;

inline void count_flops(int64_t n) { tl_flops += n; }
inline void count_exp() { ++tl_exps; }
inline void count_vexp() { ++tl_vexps; }
// Elements of row products x[i] * y[j] written to shared memory (pair-product tiles built).
inline void count_pair_products(int64_t n) { tl_pairs += n; }


inline unsigned char* dynamic_smem() { return tls_block->smem; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

// A 16-byte global load (LDG.128): undefined on a GPU unless the address is 16-byte aligned,
// so a misaligned one aborts here. Counted per launch (vloads).
inline void load16(const void* src, void* out) {
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("16-byte vector load from an address not 16-byte aligned");
  ++tl_vloads;
  std::memcpy(out, src, 16);
}

// cp.async (sm_80+, PTX "cp.async.cg.shared.global" with 16-byte copies, commit_group,
// wait_group): a copy lands in shared memory only when its group is waited for, so the
// emulation fills the destination with NaN bytes at issue and copies at the matching
// wait_group; a kernel that read it earlier (or let another thread read it before the
// barrier after the wait) sees NaN. Both addresses must be 16-byte aligned (else the copy
// is undefined on a GPU: abort here); src_bytes < 16 copies that many and zero-fills the
// rest (0: a pure zero fill that reads nothing). A thread that ends with copies not waited
// for aborts.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};
inline thread_local std::vector<AsyncCopy> tl_open;                // issued, not committed
inline thread_local std::vector<std::vector<AsyncCopy>> tl_groups;  // committed, oldest first

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async 16-byte copy to a shared address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size outside [0, 16]");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("cp.async 16-byte copy from a global address not 16-byte aligned");
  }
  if (src_bytes > 0) ++tl_async;
  std::memset(dst, 0xFF, 16);
  tl_open.push_back(AsyncCopy{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes});
}
inline void cp_async_commit() {
  tl_groups.push_back(std::move(tl_open));
  tl_open.clear();
}
// Completes every committed group but the newest `newest` ones (uncommitted copies stay pending).
inline void cp_async_wait(std::size_t newest) {
  while (tl_groups.size() > newest) {
    for (const AsyncCopy& c : tl_groups.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<std::size_t>(c.src_bytes));
      std::memset(c.dst + c.src_bytes, 0, static_cast<std::size_t>(16 - c.src_bytes));
    }
    tl_groups.erase(tl_groups.begin());
  }
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), int64_t grid, std::size_t smem_bytes, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  if (grid < 1 || grid > INT32_MAX) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  launch_flops = 0;
  launch_exps = 0;
  launch_vexps = 0;
  launch_vloads = 0;
  launch_async = 0;
  launch_pairs = 0;
  for (int64_t b = 0; b < grid; ++b) {
    Block block;
    const std::size_t bytes = smem_bytes == 0 ? 128 : (smem_bytes + 127) / 128 * 128;
    unsigned char* smem = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(128)));
    std::memset(smem, 0xFF, bytes);
    block.smem = smem;
    std::vector<std::thread> threads;
    threads.reserve(kBlockThreads);
    for (int t = 0; t < kBlockThreads; ++t) {
      threads.emplace_back([&, t, b] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(b);
        gridDim.x = static_cast<unsigned>(grid);
        blockDim.x = kBlockThreads;
        tls_block = &block;
        tl_flops = tl_exps = tl_vexps = tl_vloads = tl_async = tl_pairs = 0;
        tl_open.clear();
        tl_groups.clear();
        kernel(static_cast<P>(args)...);
        if (!tl_open.empty() || !tl_groups.empty()) fail("the kernel ended with cp.async copies not waited for");
        launch_flops += tl_flops;
        launch_exps += tl_exps;
        launch_vexps += tl_vexps;
        launch_vloads += tl_vloads;
        launch_async += tl_async;
        launch_pairs += tl_pairs;
      });
    }
    for (auto& th : threads) th.join();
    ::operator delete(smem, std::align_val_t(128));
  }
  launches.push_back(LaunchWork{name, grid, launch_flops.load(), launch_exps.load(),
                                launch_vexps.load(), launch_vloads.load(), launch_async.load(),
                                launch_pairs.load()});
}

}  // namespace symile_emu

#define SK_DYNAMIC_SMEM(name) unsigned char* name = ::symile_emu::dynamic_smem()
#define SK_LAUNCH(kernel, grid, smem, stream, ...) \
  ((void)(stream), ::symile_emu::launch(#kernel, (kernel), static_cast<int64_t>(grid), (smem), __VA_ARGS__))
#define SK_COUNT_FLOPS(n) ::symile_emu::count_flops(n)
#define SK_COUNT_EXP() ::symile_emu::count_exp()
#define SK_COUNT_VEXP() ::symile_emu::count_vexp()
#define SK_COUNT_PAIR_PRODUCTS(n) ::symile_emu::count_pair_products(n)
#define SK_LOAD16(src, out) ::symile_emu::load16((src), (out))
#define SK_CP_ASYNC16(dst, src, src_bytes) ::symile_emu::cp_async16((dst), (src), (src_bytes))
#define SK_CP_ASYNC_COMMIT() ::symile_emu::cp_async_commit()
#define SK_CP_ASYNC_WAIT(newest) ::symile_emu::cp_async_wait(newest)

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return value <= symile_emu::kSmemOptin ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = symile_emu::last_error;
  symile_emu::last_error = cudaSuccess;
  return e;
}

inline void __syncthreads() { symile_emu::tls_block->all.arrive_and_wait(); }
[[noreturn]] inline void __trap() { symile_emu::fail("__trap"); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) symile_emu::fail("only full-warp shuffles are emulated");
  symile_emu::Block* b = symile_emu::tls_block;
  const int lane = threadIdx.x % 32;
  const int w = threadIdx.x / 32;
  T* buf = reinterpret_cast<T*>(b->shfl[w]);
  buf[lane] = v;
  b->warp[w]->arrive_and_wait();
  const T r = buf[lane ^ lane_mask];
  b->warp[w]->arrive_and_wait();
  return r;
}

// ---------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 and mma.sync.aligned.m16n8k16.row.col
// .f32.bf16.bf16.f32 (PTX ISA, "Warp-level matrix load instruction: ldmatrix" and "Matrix
// fragments for mma.m16n8k16"), modelled warp-wide so that no lane waits for another: the
// kernel passes ldmatrix the function lane -> row address it evaluates for its own lane on a
// GPU (it depends on the lane and on values uniform over the warp), and each emulated lane
// evaluates it for all 32 lanes and fills the whole warp's registers, WarpX4::r[lane][j]. Lane
// l gives the address of row l % 8 of matrix l / 8, which must be 16-byte aligned (else
// undefined on a GPU: abort here, for every lane's address). Register j of lane l holds row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j (.trans: rows 2 (l % 4) and
// 2 (l % 4) + 1 of column l / 4), the lower column (row) in the low 16 bits. mma.sync then
// reads the other lanes' registers where the fragment layout puts them, as the warp's
// exchange does on a GPU. Every lane pays 128 register reads per ldmatrix and 64 products per
// mma, no warp barrier (the earlier per-lane model with a barrier per call made
// tests/test_cuda_work.py about 5x slower).
namespace symile_emu {
struct WarpX4 {
  uint32_t r[32][4];
};

template <typename RowOf>
inline void ldmatrix_x4(WarpX4& out, RowOf row_of, bool trans) {
  const unsigned char* rows[32];
  for (int l = 0; l < 32; ++l) {
    rows[l] = static_cast<const unsigned char*>(static_cast<const void*>(row_of(l)));
    if (reinterpret_cast<uintptr_t>(rows[l]) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      if (!trans) {
        std::memcpy(&out.r[l][j], rows[j * 8 + l / 4] + (l % 4) * 4, 4);
      } else {
        uint16_t lo, hi;
        std::memcpy(&lo, rows[j * 8 + (l % 4) * 2] + (l / 4) * 2, 2);
        std::memcpy(&hi, rows[j * 8 + (l % 4) * 2 + 1] + (l / 4) * 2, 2);
        out.r[l][j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
}

inline float bf16_bits(uint32_t reg, int high) {
  const uint32_t u = (high ? reg >> 16 : reg & 0xFFFFu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One mma.sync.aligned.m16n8kK.row.col.f32 (PTX ISA, "Matrix fragments for mma.m16n8k16" and
// "... m16n8k8"): d (this lane's 4 accumulators) += A (16 x K) B (K x 8), B from registers 2 h
// and 2 h + 1 of b, with E elements per 32-bit register (bf16: E = 2, K = 16; TF32: E = 1,
// K = 8) and KR = 4 E of k per register column: A(row, k) is element k % E of lane
// (row % 8) * 4 + (k % KR) / E, register (k / KR) * 2 + row / 8; B(k, n) is element k % E of
// lane n * 4 + (k % KR) / E, register 2 h + k / KR; d[i] is row lane / 4 + 8 (i / 2), column
// 2 (lane % 4) + i % 2. element(reg, e) decodes an operand. Lane 0 counts the warp's 2 m n k FLOPs.
template <int E, typename Element>
inline void mma_m16n8(float (&d)[4], const WarpX4& a, const WarpX4& b, int h, Element element) {
  constexpr int KR = 4 * E, K = 2 * KR;
  const int lane = threadIdx.x % 32;
  if (lane == 0) count_flops(int64_t(2) * 16 * 8 * K);
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    float v = d[i];
    for (int k = 0; k < K; ++k) {
      const float x = element(a.r[(row % 8) * 4 + (k % KR) / E][(k / KR) * 2 + row / 8], k % E);
      const float y = element(b.r[col * 4 + (k % KR) / E][2 * h + k / KR], k % E);
      v += x * y;
    }
    d[i] = v;
  }
}

// m16n8k16 with bf16 operands.
inline void mma_16816_bf16(float (&d)[4], const WarpX4& a, const WarpX4& b, int h) {
  mma_m16n8<2>(d, a, b, h, bf16_bits);
}

// Shared-memory loads of 32-bit words into registers 0..count-1 of every lane: register j of
// lane l is the word at word_of(l, j) (4-byte aligned, else abort), as ldmatrix, evaluated for
// the whole warp so that mma.sync can read every lane's.
template <typename WordOf>
inline void gather_words(WarpX4& out, WordOf word_of, int count) {
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < count; ++j) {
      const void* src = word_of(l, j);
      if (reinterpret_cast<uintptr_t>(src) % 4 != 0) fail("32-bit shared load from an address not 4-byte aligned");
      std::memcpy(&out.r[l][j], src, 4);
    }
}

// Round to TF32 (10 explicit mantissa bits), to nearest with ties away, as cvt.rna.tf32.f32.
inline float tf32_round(float f) {
  if (!std::isfinite(f)) return f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x1000u) & ~0x1FFFu;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f32_bits(uint32_t reg) {
  float f;
  std::memcpy(&f, &reg, 4);
  return f;
}

// m16n8k8 with TF32 operands: every operand rounded to TF32 (the kernel's cvt.rna).
inline void mma_1688_tf32(float (&d)[4], const WarpX4& a, const WarpX4& b, int h) {
  mma_m16n8<1>(d, a, b, h, [](uint32_t reg, int) { return tf32_round(f32_bits(reg)); });
}
}  // namespace symile_emu

// ---------------------------------------------------------------------------
// bf16 with round-to-nearest-even conversion.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half through the compiler's _Float16 (round to nearest even).
struct __half {
  uint16_t bits;
};
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}

// ---------------------------------------------------------------------------
// WMMA: every lane holds the whole tile; lane 0 computes the products and stores.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int C = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = R * C;
  float x[R * C];
};

// Round to TF32 (10 explicit mantissa bits), to nearest with ties away, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float f) { return symile_emu::tf32_round(f); }

inline float emu_value(float v) { return v; }
inline float emu_value(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_pointer(const void* ptr, unsigned ldm, std::size_t elem) {
  // CUDA C++ guide, WMMA: mptr 256-bit aligned; ldm a multiple of 8 (16-bit) or 4 (32-bit) elements.
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) symile_emu::fail("WMMA pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) symile_emu::fail("WMMA ldm not a multiple of 16 bytes");
}

template <typename F>
inline void fill_fragment(F& f, float v) {
  for (int e = 0; e < F::num_elements; ++e) f.x[e] = v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  static_assert(std::is_same<T, precision::tf32>::value ? std::is_same<P, float>::value : std::is_same<T, P>::value,
                "fragment and pointer types");
  using Frag = fragment<Use, M, N, K, T, Layout>;
  check_pointer(ptr, ldm, sizeof(P));
  for (int r = 0; r < Frag::R; ++r)
    for (int c = 0; c < Frag::C; ++c)
      f.x[r * Frag::C + c] = emu_value(std::is_same<Layout, row_major>::value ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  // Only lane 0's accumulator reaches memory (store_matrix_sync stores from lane 0), so
  // the other lanes skip the arithmetic (32 times less emulation work) and hold NaN:
  // a kernel that read accumulator elements outside lane 0 would show it.
  if (threadIdx.x % 32 != 0) {
    for (int e = 0; e < M * N; ++e) d.x[e] = NAN;
    return;
  }
  SK_COUNT_FLOPS(int64_t(2) * M * N * K);
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float v = c.x[m * N + n];
      for (int k = 0; k < K; ++k) v += a.x[m * K + k] * b.x[k * N + n];
      out[m * N + n] = v;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  check_pointer(ptr, ldm, sizeof(float));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_pointer(ptr, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      if (layout == mem_row_major) {
        ptr[r * ldm + c] = f.x[r * N + c];
      } else {
        ptr[c * ldm + r] = f.x[r * N + c];
      }
    }
}
}  // namespace wmma
}  // namespace nvcuda
