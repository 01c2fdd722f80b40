// Shared pieces of the CPU kernels (cube.cpp, pair.cpp): the thread guard of their parallel
// regions, the (m, s) log-sum-exp accumulators, the elementwise row passes (float64 loops here,
// float32 through vec_rows.h), the input checks and small helpers. binding.cpp's header comment
// describes how the work is laid out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec_rows.h"

// MKL's per-thread thread count, when torch's BLAS is MKL (weak: absent elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace symile_cpu {

// Inside a parallel region every BLAS call must stay on its own thread: a nested
// MKL team per tile product oversubscribes the cores (and, with OpenMP's active
// waiting, stalls for seconds on a loaded machine).
// Also carries the caller's thread-local state (autograd off, dispatch keys
// excluded by the custom-op machinery) into the OpenMP worker threads, which
// would otherwise run the tile products as autograd-visible ops.
struct SequentialBlas {
  at::ThreadLocalStateGuard tls;
  int previous = 0;
  explicit SequentialBlas(const at::ThreadLocalState& state) : tls(state) {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

using at::Tensor;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------
// Log-sum-exp accumulators.

// Adds s2 * e^m2 to the pair (m, s) that stands for s * e^m. NaN propagates.
inline void lse_add(double& m, double& s, double m2, double s2) {
  if (std::isnan(m2) || std::isnan(s2)) {
    m = s = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  if (s2 == 0.0) return;
  if (m2 <= m) {
    s += s2 * std::exp(m2 - m);
  } else {
    s = (s == 0.0 ? 0.0 : s * std::exp(m - m2)) + s2;
    m = m2;
  }
}

inline double lse_value(double m, double s) { return m + std::log(s); }

// ---------------------------------------------------------------------------
// Elementwise passes over one tile row. Every pass computes at most one
// exponential per element. float64: the plain loops below, with std::exp;
// float32: vec_rows.h's vectorised passes (AVX-512, AVX2 + FMA or plain loops,
// chosen at run time), through the specialisations after these templates.

// Returns sum_k e^(s[k] - ref) and adds w * e^(s[k] - ref) to col_sum[k].
template <typename scalar_t>
inline double exp_row_col_sum(const scalar_t* s, int64_t n, scalar_t ref, scalar_t w, scalar_t* col_sum) {
  double total = 0;
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t e = std::exp(s[k] - ref);
    total += e;
    col_sum[k] += w * e;
  }
  return total;
}

// Row maximum.
template <typename scalar_t>
inline scalar_t row_max(const scalar_t* s, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t k = 0; k < n; ++k) m = std::max(m, s[k]);
  return m;
}

// Returns sum_k e^(s[k] - ref).
template <typename scalar_t>
inline double exp_row_sum(const scalar_t* s, int64_t n, scalar_t ref) {
  double total = 0;
  for (int64_t k = 0; k < n; ++k) total += std::exp(s[k] - ref);
  return total;
}

// In place: s[k] <- scale * e^(s[k] - ref).
template <typename scalar_t>
inline void exp_row_scale(scalar_t* s, int64_t n, scalar_t ref, scalar_t scale) {
  for (int64_t k = 0; k < n; ++k) s[k] = scale * std::exp(s[k] - ref);
}

// In place, backward's shared form: s[k] <- e^(s[k] - ref) * (a + u * gv[k]). With kDot, returns
// sum_k G[k] S[k] in double (S read, G written: the row's share of dtau, see the backward).
template <bool kDot, typename scalar_t>
inline double g_row_shared(scalar_t* s, int64_t n, scalar_t ref, scalar_t a, scalar_t u, const scalar_t* gv) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vec::g_row_shared<kDot>(s, n, ref, a, u, gv);
  } else {
    double dot = 0;
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t g = std::exp(s[k] - ref) * (a + u * gv[k]);
      if (kDot) dot += g * s[k];
      s[k] = g;
    }
    return dot;
  }
}

// In place, backward's two-exponential form: s[k] <- a e^(s[k] - ref) + gLc[k] e^(s[k] - Lc[k]);
// kDot as in g_row_shared.
template <bool kDot, typename scalar_t>
inline double g_row_two(scalar_t* s, int64_t n, scalar_t ref, scalar_t a, const scalar_t* Lc,
                        const scalar_t* gLc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vec::g_row_two<kDot>(s, n, ref, a, Lc, gLc);
  } else {
    double dot = 0;
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t g = a * std::exp(s[k] - ref) + gLc[k] * std::exp(s[k] - Lc[k]);
      if (kDot) dot += g * s[k];
      s[k] = g;
    }
    return dot;
  }
}

// float32: the vectorised passes at the instruction set chosen at run time (vec_rows.h).
template <>
inline double exp_row_col_sum<float>(const float* s, int64_t n, float ref, float w, float* col_sum) {
  return vec::exp_row_col_sum(s, n, ref, w, col_sum);
}
template <>
inline float row_max<float>(const float* s, int64_t n) { return vec::row_max(s, n); }
template <>
inline double exp_row_sum<float>(const float* s, int64_t n, float ref) { return vec::exp_row_sum(s, n, ref); }
template <>
inline void exp_row_scale<float>(float* s, int64_t n, float ref, float scale) {
  vec::exp_row_scale(s, n, ref, scale);
}

// ---------------------------------------------------------------------------
// Input checks (each message names the tensor).

inline void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "symile_kernels cpu ops: ", name, " must be a CPU tensor; got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "symile_kernels cpu ops: ", name, " must be float32 or float64; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "symile_kernels cpu ops: ", name, " must be 2-D (rows, d); got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "symile_kernels cpu ops: ", name, " must be contiguous");
  TORCH_CHECK(t.size(0) >= 1 && t.size(1) >= 1, "symile_kernels cpu ops: ", name,
              " must have at least one row and one column; got shape ", t.sizes());
}

inline void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                c10::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "symile_kernels cpu ops: ", name, " must be a CPU tensor; got device ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "symile_kernels cpu ops: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "); got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "symile_kernels cpu ops: ", name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "symile_kernels cpu ops: ", name, " must be contiguous");
}

// Work items (slices, blocks) are handed out dynamically: at::parallel_for starts
// one worker per thread and each worker takes the next item from a shared
// counter, so a thread slowed by another process on its core takes fewer items
// instead of holding the others up. An item's computation does not depend on
// which thread runs it, so results stay deterministic.
inline int64_t num_workers(int64_t n_items) {
  return std::max<int64_t>(1, std::min<int64_t>(n_items, at::get_num_threads()));
}

// (tau t)^T, d x rows, row-major: the right operand of the logit products S = A @ (tau t)^T, formed
// once per call (tile_mm takes row-major operands; scaling here keeps tau out of every tile).
inline Tensor tau_transposed(const Tensor& t, double tau) { return (t.t() * tau).contiguous(); }

// The output for a gradient: `like`'s shape when needed, else an empty (0,) tensor.
inline Tensor grad_output(const Tensor& like, bool needed) {
  return needed ? at::empty_like(like) : at::empty({0}, like.options());
}

}  // namespace symile_cpu
