// Vectorised float32 row passes of the CPU kernels with the instruction set
// chosen at run time: AVX-512, else AVX2 + FMA, else plain loops with std::exp.
//
// The row passes (rows_impl.h) are compiled once per instruction set inside a
// `#pragma GCC target` region, so a build without -march=native (the portable
// build, SYMILE_KERNELS_PORTABLE=1) still uses the widest set the CPU running it
// supports; `active_isa()` picks it once (environment variable
// SYMILE_KERNELS_CPU_ISA = scalar | avx2 | avx512 narrows the choice, for tests).
//
// The exponential (docs/math.md section 5: the cube does N^3 of them next to
// 2 N^3 d product FLOPs, so at small d they bound the kernel; vec_exp.h, one
// body for every SIMD set) is Cody-Waite range reduction, x = n ln2 + r with |r| <= ln2 / 2, and Cephes' degree-6 polynomial
// for e^r, scaled by 2^n. Arguments are clamped to [-104, 89], where e^x is
// already 0 or inf in float32, so -inf gives 0 and +inf gives inf; the clamps
// take x as the second operand of max/min, so a NaN passes through. The scaling
// by 2^n rounds once, so results in the subnormal range are rounded correctly
// from the polynomial's value. Accuracy: <= 2 ulp against the correctly rounded
// e^x over all float32 inputs (tests/test_cpu_exp.py sweeps it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SYMILE_CPU_X86 1
#endif

namespace symile_cpu {
namespace vec {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Cephes expf coefficients and the split of ln 2 (ln2_hi has 9 significant bits,
// so n * ln2_hi is exact for |n| <= 150).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpLo = -104.0f;
constexpr float kExpHi = 89.0f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

namespace scalar {
struct Vec {
  static constexpr int64_t W = 1;
  float v;
  static Vec load(const float* p) { return {*p}; }
  static void store(float* p, Vec a) { *p = a.v; }
  static Vec set1(float x) { return {x}; }
  static Vec add(Vec a, Vec b) { return {a.v + b.v}; }
  static Vec sub(Vec a, Vec b) { return {a.v - b.v}; }
  static Vec mul(Vec a, Vec b) { return {a.v * b.v}; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  static Vec max(Vec a, Vec b) { return {std::max(a.v, b.v)}; }
  static Vec exp(Vec a) { return {std::exp(a.v)}; }
  static float hsum(Vec a) { return a.v; }
  static float hmax(Vec a) { return a.v; }
  using Acc = double;
  static Acc acc_zero() { return 0.0; }
  static void acc_fma(Acc& acc, Vec a, Vec b) { acc += static_cast<double>(a.v) * b.v; }
  static double acc_sum(Acc acc) { return acc; }
};
#include "rows_impl.h"
}  // namespace scalar

#ifdef SYMILE_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Vec {
  static constexpr int64_t W = 8;
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void store(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  static Vec sub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec round_nearest(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // p * 2^n for integral n in [-150, 128], as 2^n1 * 2^n2 with n1 = floor(n / 2): both are
  // normal floats, the first product is exact and the second rounds once.
  static Vec scale2n(Vec p, Vec n) {
    const __m256i ni = _mm256_cvtps_epi32(n.v);
    const __m256i n1 = _mm256_srai_epi32(ni, 1);
    const __m256i n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return {_mm256_mul_ps(_mm256_mul_ps(p.v, s1), s2)};
  }
  static Vec exp(Vec a);
  static float hsum(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(Vec a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Double accumulator: the lanes widened to double (a float32 product is exact in double).
  struct Acc {
    __m256d lo, hi;
  };
  static Acc acc_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static void acc_fma(Acc& acc, Vec a, Vec b) {
    acc.lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a.v)),
                             _mm256_cvtps_pd(_mm256_castps256_ps128(b.v)), acc.lo);
    acc.hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(b.v, 1)), acc.hi);
  }
  static double acc_sum(Acc acc) {
    const __m256d s = _mm256_add_pd(acc.lo, acc.hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
    return _mm_cvtsd_f64(t);
  }
};
#include "vec_exp.h"
#include "rows_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {
struct Vec {
  static constexpr int64_t W = 16;
  __m512 v;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  static Vec sub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec round_nearest(Vec a) {
    return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  // p * 2^n, one rounding, subnormals and overflow included.
  static Vec scale2n(Vec p, Vec n) { return {_mm512_scalef_ps(p.v, n.v)}; }
  static Vec exp(Vec a);
  static float hsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
  static float hmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
  // Double accumulator, as avx2's.
  struct Acc {
    __m512d lo, hi;
  };
  static Acc acc_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static void acc_fma(Acc& acc, Vec a, Vec b) {
    acc.lo = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a.v)),
                             _mm512_cvtps_pd(_mm512_castps512_ps256(b.v)), acc.lo);
    acc.hi = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(a.v, 1)),
                             _mm512_cvtps_pd(_mm512_extractf32x8_ps(b.v, 1)), acc.hi);
  }
  static double acc_sum(Acc acc) { return _mm512_reduce_add_pd(_mm512_add_pd(acc.lo, acc.hi)); }
};
#include "vec_exp.h"
#include "rows_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // SYMILE_CPU_X86

// Whether this CPU runs `isa`.
inline bool supported(Isa isa) {
#ifdef SYMILE_CPU_X86
  __builtin_cpu_init();
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kScalar;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

// The widest supported set, no wider than SYMILE_KERNELS_CPU_ISA when that is set.
inline Isa detect_isa() {
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("SYMILE_KERNELS_CPU_ISA")) {
    if (std::strcmp(env, "scalar") == 0) cap = Isa::kScalar;
    if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
  }
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (static_cast<int>(isa) <= static_cast<int>(cap) && supported(isa)) return isa;
  }
  return Isa::kScalar;
}

inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#ifdef SYMILE_CPU_X86
#define SYMILE_VEC_DISPATCH(isa, call)                   \
  switch (isa) {                                         \
    case ::symile_cpu::vec::Isa::kAvx512: return avx512::call; \
    case ::symile_cpu::vec::Isa::kAvx2: return avx2::call;     \
    default: return scalar::call;                        \
  }
#else
#define SYMILE_VEC_DISPATCH(isa, call) return scalar::call;
#endif

// The row passes at the active instruction set (see rows_impl.h for each one's meaning).
inline float row_max(const float* s, int64_t n) { SYMILE_VEC_DISPATCH(active_isa(), row_max(s, n)) }
inline double exp_row_sum(const float* s, int64_t n, float ref) {
  SYMILE_VEC_DISPATCH(active_isa(), exp_row_sum(s, n, ref))
}
inline double exp_row_col_sum(const float* s, int64_t n, float ref, float w, float* col_sum) {
  SYMILE_VEC_DISPATCH(active_isa(), exp_row_col_sum(s, n, ref, w, col_sum))
}
inline void exp_row_scale(float* s, int64_t n, float ref, float scale) {
  SYMILE_VEC_DISPATCH(active_isa(), exp_row_scale(s, n, ref, scale))
}
template <bool kDot>
inline double g_row_shared(float* s, int64_t n, float ref, float a, float u, const float* gv) {
  SYMILE_VEC_DISPATCH(active_isa(), g_row_shared<kDot>(s, n, ref, a, u, gv))
}
template <bool kDot>
inline double g_row_two(float* s, int64_t n, float ref, float a, const float* Lc, const float* gLc) {
  SYMILE_VEC_DISPATCH(active_isa(), g_row_two<kDot>(s, n, ref, a, Lc, gLc))
}
// e^x elementwise at a given (supported) instruction set: the accuracy test's entry point.
inline void exp_array(Isa isa, const float* x, int64_t n, float* out) { SYMILE_VEC_DISPATCH(isa, exp_array(x, n, out)) }

#undef SYMILE_VEC_DISPATCH

}  // namespace vec
}  // namespace symile_cpu
