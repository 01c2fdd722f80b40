// Fused CPU kernels of the "cpu" backend (docs/math.md sections 2 and 3).
//
// Operators (namespace symile_kernels, CPU dispatch key):
//   cpu_cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)
//   cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, need_dx, need_dy, need_dz, need_dtau)
//     -> (dx, dy, dz, dtau)
//   cpu_pair_lse_forward(a, b, pos, tau) -> L
//   cpu_pair_lse_backward(a, b, pos, tau, L, gL, need_da, need_db, need_dpos, need_dtau)
//     -> (da, db, dpos, dtau)
// with the semantics of symile_kernels/backends.py. Their fake (meta) kernels are
// registered in Python (symile_kernels/cpu.py).
//
// Layout of the work (the chunked backend, symile_kernels/chunked.py, is the
// readable blueprint):
//  * The cube tau*T[i,j,k] is cut into tiles of BLOCK_I x BLOCK_J anchor/partner
//    row pairs (the rows of XY[(i,j)] = x[i] * y[j]) by BLOCK_K columns; one tile
//    S = XY @ (tau z[k-block])^T is one matrix product (tile_mm.h: oneDNN's
//    micro-kernels for float32, BLAS for float64) into a per-thread workspace,
//    followed by vectorised passes over it while it is hot in cache. The cube is
//    never held: extra memory is O(N*d + N) plus per-slice partials and the
//    per-thread tiles.
//  * Cube: the i range is split into a fixed number of slices (contiguous runs of
//    i-blocks, at most kMaxSlices, independent of the thread count) that the
//    at::parallel_for threads take one at a time from a shared counter. A slice
//    owns its rows of La and dx; reductions over i (Lb, Lc, dy, dz, dtau) go to
//    per-slice partial buffers that are combined in slice order at the end. The
//    reduction order is therefore fixed: the result does not depend on the number
//    of threads (up to 16 threads; beyond that the slice count follows the thread
//    count), only on the problem size. The extension must be compiled with
//    -fopenmp for at::parallel_for to use more than one thread (setup.py does).
//  * Pair: work items are i-blocks; the reduction over i (db) is folded into db
//    in i-block order as the blocks finish (see pair_backward_kernel), so the
//    result does not depend on the thread count at all.
//  * Elementwise passes over float32 tiles use vec_rows.h: AVX-512, AVX2 or plain
//    loops chosen at run time, with a vectorised exponential (<= 2 ulp).
//  * Log-sum-exps are kept as (m, s) pairs, value = m + log(s), in double, with
//    a running maximum m, so tau = 100 (logits in [-100, 100]) cannot overflow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "tile_mm.h"
#include "vec_rows.h"

// MKL's per-thread thread count, when torch's BLAS is MKL (weak: absent elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace symile_cpu {
namespace {

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

// Largest log-space gap across which one exponential is re-scaled instead of
// computing a second one (see the forward's column sums and the backward's G).
// e^-30 * e^-87 (float32's smallest normal) leaves any term lost to underflow
// below e^-57 relative to the sums it belongs to: far below float32 rounding.
constexpr double kShareGap = 30.0;
// Upper bound on the number of i-slices (see the header comment).
constexpr int64_t kMaxSlices = 16;
// Tile sizes: BLOCK_I * BLOCK_J ~ kTileRows row pairs, BLOCK_K columns; a float32
// tile of 256 x 256 is 256 KiB, which stays in a core's L2 cache.
constexpr int64_t kTileRows = 256;
constexpr int64_t kBlockK = 256;
// Pair tiles: BLOCK_I anchor rows by BLOCK_J columns, 256 KiB in float32 (in L2).
// BLOCK_I = 256 is also the inner dimension of the backward's db product; 256 x 256
// measured as good as 128 x 512 and 256 x 512, and better than 64 x 512 (N = 2048, d = 256).
constexpr int64_t kPairBlockI = 256;
constexpr int64_t kPairBlockJ = 256;

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

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "symile_kernels cpu ops: ", name, " must be a CPU tensor; got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "symile_kernels cpu ops: ", name, " must be float32 or float64; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "symile_kernels cpu ops: ", name, " must be 2-D (rows, d); got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "symile_kernels cpu ops: ", name, " must be contiguous");
  TORCH_CHECK(t.size(0) >= 1 && t.size(1) >= 1, "symile_kernels cpu ops: ", name,
              " must have at least one row and one column; got shape ", t.sizes());
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                c10::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "symile_kernels cpu ops: ", name, " must be a CPU tensor; got device ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "symile_kernels cpu ops: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "); got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "symile_kernels cpu ops: ", name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "symile_kernels cpu ops: ", name, " must be contiguous");
}

void check_cube_inputs(const Tensor& x, const Tensor& y, const Tensor& z, const Tensor& tau) {
  check_matrix(x, "x");
  check_like(y, "y", x, "x", {y.size(0), x.size(1)});
  check_like(z, "z", x, "x", {z.size(0), x.size(1)});
  check_like(tau, "tau", x, "x", {});
}

// Range of i-blocks [begin, end) of slice s out of n_slices over n_blocks blocks.
inline std::pair<int64_t, int64_t> slice_blocks(int64_t s, int64_t n_slices, int64_t n_blocks) {
  return {s * n_blocks / n_slices, (s + 1) * n_blocks / n_slices};
}

// Work items (slices, blocks) are handed out dynamically: at::parallel_for starts
// one worker per thread and each worker takes the next item from a shared
// counter, so a thread slowed by another process on its core takes fewer items
// instead of holding the others up. An item's computation does not depend on
// which thread runs it, so results stay deterministic.
inline int64_t num_workers(int64_t n_items) {
  return std::max<int64_t>(1, std::min<int64_t>(n_items, at::get_num_threads()));
}

inline int64_t num_slices(int64_t n_blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(n_blocks, std::max<int64_t>(kMaxSlices, at::get_num_threads())));
}

struct CubeBlocks {
  int64_t BLOCK_I, BLOCK_J, BLOCK_K;
};

CubeBlocks cube_blocks(int64_t I, int64_t J, int64_t K) {
  CubeBlocks b;
  // Small BLOCK_I keeps many i-blocks for the threads; BLOCK_J fills the tile rows.
  // (256 x 256 tiles with BLOCK_I = 4 measured best among 128..1024 rows, 128..512
  // columns and BLOCK_I 4 or 8 at N = 512, d = 64.)
  b.BLOCK_I = std::min<int64_t>(I, 4);
  b.BLOCK_J = std::min<int64_t>(J, std::max<int64_t>(1, kTileRows / b.BLOCK_I));
  b.BLOCK_K = std::min<int64_t>(K, kBlockK);
  return b;
}

// XY[(ii, jj)] = x[i0 + ii] * y[j0 + jj] for a bi x bj block: (bi * bj, d), row-major.
template <typename scalar_t>
void fill_xy(const scalar_t* x, const scalar_t* y, int64_t d, int64_t i0, int64_t bi, int64_t j0, int64_t bj,
             scalar_t* XY) {
  for (int64_t ii = 0; ii < bi; ++ii) {
    const scalar_t* xr = x + (i0 + ii) * d;
    for (int64_t jj = 0; jj < bj; ++jj) {
      const scalar_t* yr = y + (j0 + jj) * d;
      scalar_t* out = XY + (ii * bj + jj) * d;
      for (int64_t c = 0; c < d; ++c) out[c] = xr[c] * yr[c];
    }
  }
}

// (tau t)^T, d x rows, row-major: the right operand of the logit products S = A @ (tau t)^T, formed
// once per call (tile_mm takes row-major operands; scaling here keeps tau out of every tile).
inline Tensor tau_transposed(const Tensor& t, double tau) { return (t.t() * tau).contiguous(); }

// XY^T of the same block: (d, bi * bj), row-major, from y^T (d x J) so that the inner loop is contiguous.
template <typename scalar_t>
void fill_xy_t(const scalar_t* x, const scalar_t* yT, int64_t J, int64_t d, int64_t i0, int64_t bi, int64_t j0,
               int64_t bj, scalar_t* XYT) {
  const int64_t R = bi * bj;
  for (int64_t c = 0; c < d; ++c) {
    const scalar_t* yc = yT + c * J + j0;
    for (int64_t ii = 0; ii < bi; ++ii) {
      const scalar_t xv = x[(i0 + ii) * d + c];
      scalar_t* out = XYT + c * R + ii * bj;
      for (int64_t jj = 0; jj < bj; ++jj) out[jj] = xv * yc[jj];
    }
  }
}

// ---------------------------------------------------------------------------
// Cube forward.
//
// One pass over the cube, one exponential per element, shared by the three
// reductions. For a tile S (rows r = (i, j), columns k):
//   rm[r] = max_k S[r, k]                E[r, k] = e^(S[r, k] - rm[r])  (<= 1)
//   La(i), Lb(j) take rs[r] = sum_k E[r, k] at scale rm[r]: exact row sums.
//   Lc(k) takes cs[k] = sum_r w[r] E[r, k] at scale C = max_r rm[r], with
//   w[r] = e^(rm[r] - C) <= 1, since w[r] E[r, k] = e^(S[r, k] - C).
// Why the reuse is safe: nothing overflows (every factor is <= 1); what can
// underflow is a term e^(S - C) < e^-87. A column whose sum passes
// cs[k] >= R e^-kShareGap has its largest term e^(cm[k] - C) >= cs[k] / R >=
// e^-kShareGap, so the lost terms are below R e^-(87 - kShareGap) relative to
// it: invisible in float32. Columns below that floor (rare: a tile whose rows
// differ by more than kShareGap in log space) are re-summed with their own
// maximum as the scale, a second exponential for those columns only.
template <typename scalar_t>
void cube_forward_kernel(const Tensor& x, const Tensor& y, const Tensor& z, double tau, Tensor& La, Tensor& Lb,
                         Tensor& Lc) {
  const int64_t I = x.size(0), J = y.size(0), K = z.size(0), d = x.size(1);
  const CubeBlocks blk = cube_blocks(I, J, K);
  const int64_t n_iblocks = (I + blk.BLOCK_I - 1) / blk.BLOCK_I;
  const int64_t n_slices = num_slices(n_iblocks);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const Tensor tzT = tau_transposed(z, tau);  // d x K
  const scalar_t* tzTp = tzT.data_ptr<scalar_t>();

  // (m, s) accumulators: La owned by the slice holding row i; Lb, Lc per slice.
  std::vector<double> La_m(I, -kInf), La_s(I, 0.0);
  std::vector<double> Lb_m(n_slices * J, -kInf), Lb_s(n_slices * J, 0.0);
  std::vector<double> Lc_m(n_slices * K, -kInf), Lc_s(n_slices * K, 0.0);

  std::atomic<int64_t> next_slice{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_slices), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    const int64_t R_max = blk.BLOCK_I * blk.BLOCK_J;
    // Workspaces from ATen's allocator: 64-byte aligned rows for the micro-kernels.
    Tensor XY = at::empty({R_max, d}, x.options());
    Tensor S = at::empty({R_max * blk.BLOCK_K}, x.options());
    std::vector<scalar_t> rm(R_max), w(R_max), cs(blk.BLOCK_K);
    std::vector<double> rs(R_max);
    for (int64_t s = next_slice++; s < n_slices; s = next_slice++) {
      double* Lb_ms = Lb_m.data() + s * J;
      double* Lb_ss = Lb_s.data() + s * J;
      double* Lc_ms = Lc_m.data() + s * K;
      double* Lc_ss = Lc_s.data() + s * K;
      const auto blocks = slice_blocks(s, n_slices, n_iblocks);
      for (int64_t ib = blocks.first; ib < blocks.second; ++ib) {
        const int64_t i0 = ib * blk.BLOCK_I, bi = std::min(blk.BLOCK_I, I - i0);
        for (int64_t j0 = 0; j0 < J; j0 += blk.BLOCK_J) {
          const int64_t bj = std::min(blk.BLOCK_J, J - j0), R = bi * bj;
          scalar_t* XYp = XY.data_ptr<scalar_t>();
          fill_xy(xp, yp, d, i0, bi, j0, bj, XYp);
          for (int64_t k0 = 0; k0 < K; k0 += blk.BLOCK_K) {
            const int64_t bk = std::min(blk.BLOCK_K, K - k0);
            scalar_t* Sp = S.data_ptr<scalar_t>();  // R x bk
            tile_mm<scalar_t>(R, bk, d, XYp, d, tzTp + k0, K, Sp, bk, /*accumulate=*/false);
            std::fill(cs.begin(), cs.begin() + bk, scalar_t(0));
            scalar_t C = -std::numeric_limits<scalar_t>::infinity();
            for (int64_t r = 0; r < R; ++r) {
              rm[r] = row_max(Sp + r * bk, bk);
              C = std::max(C, rm[r]);
            }
            for (int64_t r = 0; r < R; ++r) w[r] = std::exp(rm[r] - C);
            for (int64_t r = 0; r < R; ++r) rs[r] = exp_row_col_sum(Sp + r * bk, bk, rm[r], w[r], cs.data());
            for (int64_t r = 0; r < R; ++r) {
              const int64_t i = i0 + r / bj, j = j0 + r % bj;
              lse_add(La_m[i], La_s[i], rm[r], rs[r]);
              lse_add(Lb_ms[j], Lb_ss[j], rm[r], rs[r]);
            }
            // cs[k] <= R e^(cm[k] - C) with cm[k] the column's maximum, so cs[k] >= col_floor
            // proves cm[k] >= C - kShareGap - log(R) (see above); other columns are re-summed.
            const double col_floor = R * std::exp(-kShareGap);
            for (int64_t k = 0; k < bk; ++k) {
              if (!(cs[k] < col_floor)) {  // NaN goes this way and propagates
                lse_add(Lc_ms[k0 + k], Lc_ss[k0 + k], C, cs[k]);
              } else {  // the column sits far below the tile's maximum: its own scale
                scalar_t cm = -std::numeric_limits<scalar_t>::infinity();
                for (int64_t r = 0; r < R; ++r) cm = std::max(cm, Sp[r * bk + k]);
                double col = 0;
                for (int64_t r = 0; r < R; ++r) col += std::exp(Sp[r * bk + k] - cm);
                lse_add(Lc_ms[k0 + k], Lc_ss[k0 + k], cm, col);
              }
            }
          }
        }
      }
    }
  });

  double* Lap = La.data_ptr<double>();
  double* Lbp = Lb.data_ptr<double>();
  double* Lcp = Lc.data_ptr<double>();
  for (int64_t i = 0; i < I; ++i) Lap[i] = lse_value(La_m[i], La_s[i]);
  // Slice partials, combined in slice order.
  for (int64_t j = 0; j < J; ++j) {
    double m = -kInf, s = 0;
    for (int64_t sl = 0; sl < n_slices; ++sl) lse_add(m, s, Lb_m[sl * J + j], Lb_s[sl * J + j]);
    Lbp[j] = lse_value(m, s);
  }
  for (int64_t k = 0; k < K; ++k) {
    double m = -kInf, s = 0;
    for (int64_t sl = 0; sl < n_slices; ++sl) lse_add(m, s, Lc_m[sl * K + k], Lc_s[sl * K + k]);
    Lcp[k] = lse_value(m, s);
  }
}

std::tuple<Tensor, Tensor, Tensor> cube_lse_forward(const Tensor& x, const Tensor& y, const Tensor& z,
                                                    const Tensor& tau) {
  check_cube_inputs(x, y, z, tau);
  // float64 whatever the compute dtype: L = m + log(s) keeps log(s) below float32's ulp of m
  // (docs/math.md section 6.4).
  const auto lse_options = x.options().dtype(at::kDouble);
  Tensor La = at::empty({x.size(0)}, lse_options);
  Tensor Lb = at::empty({y.size(0)}, lse_options);
  Tensor Lc = at::empty({z.size(0)}, lse_options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_cube_lse_forward", [&] {
    cube_forward_kernel<scalar_t>(x, y, z, tau.item<double>(), La, Lb, Lc);
  });
  return {La, Lb, Lc};
}

// ---------------------------------------------------------------------------
// Cube backward.
//
// G[r, k] = gLa[i] e^(S - La[i]) + gLb[j] e^(S - Lb[j]) + gLc[k] e^(S - Lc[k]),
// recomputed per tile from the saved LSE vectors with one exponential per
// element: with mn[r] = min(La[i], Lb[j]) >= S[r, k] and E = e^(S - mn[r]) <= 1,
//   G = E * (a[r] + u[r] * gv[k]),   a[r] = gLa e^(mn - La) + gLb e^(mn - Lb),
//   u[r] = e^(mn[r] - Q), gv[k] = gLc[k] e^(Q - Lc[k]),  Q = max_r mn[r].
// a and u are <= 1 in magnitude (times the g's); gv is bounded by e^kShareGap as
// long as Q - min_k Lc[k] <= kShareGap, which the tile checks. An underflowed E
// (< e^-87) or u (< e^-87) then only drops terms below e^-(87 - kShareGap) times
// the g's. Tiles failing the check use two exponentials per element.
// Then W[r] = sum_k G[r, k] z[k] (a tile product per k-block), dz += G^T XY (per i-block, then per slice;
// held transposed, d x K, as XY^T @ G: tile_mm takes row-major operands, and XY^T is cheap to build),
// and per row pair dx[i] += y[j] * W[r], dy[j] += x[i] * W[r]; dx, dy, dz are scaled by tau at the end.
// dtau = sum G T = sum G S / tau is summed in double from the G pass itself (g_row_*<true>), not
// from W: its terms largely cancel against the positive part's, so a float32 sum (W's over k, in
// the tile product) leaves a bias that the cancellation exposes (y and z one repeated row each,
// small tau: 8e-4 relative error). dx sums over every j, likewise in double per i-block.
// Needs: which of dx, dy, dz, dtau the caller wants (docs/math.md section 2). A pass whose
// results nobody needs is skipped: no W product without dx or dy, no dz product (nor XY^T)
// without dz, no G . S sum without dtau. Unneeded outputs are empty (0,) tensors.
struct CubeNeeds {
  bool dx, dy, dz, dtau;
};

template <typename scalar_t>
void cube_backward_kernel(const Tensor& x, const Tensor& y, const Tensor& z, double tau, const Tensor& La,
                          const Tensor& Lb, const Tensor& Lc, const Tensor& gLa, const Tensor& gLb,
                          const Tensor& gLc, CubeNeeds needs, Tensor& dx, Tensor& dy, Tensor& dz, Tensor& dtau) {
  const int64_t I = x.size(0), J = y.size(0), K = z.size(0), d = x.size(1);
  const CubeBlocks blk = cube_blocks(I, J, K);
  const int64_t n_iblocks = (I + blk.BLOCK_I - 1) / blk.BLOCK_I;
  const int64_t n_slices = num_slices(n_iblocks);
  const bool need_W = needs.dx || needs.dy;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* Lap = La.data_ptr<scalar_t>();
  const scalar_t* Lbp = Lb.data_ptr<scalar_t>();
  const scalar_t* Lcp = Lc.data_ptr<scalar_t>();
  const scalar_t* gLap = gLa.data_ptr<scalar_t>();
  const scalar_t* gLbp = gLb.data_ptr<scalar_t>();
  const scalar_t* gLcp = gLc.data_ptr<scalar_t>();

  const Tensor tzT = tau_transposed(z, tau);  // as in the forward: the same products, so the same S
  const scalar_t* tzTp = tzT.data_ptr<scalar_t>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const Tensor yT = needs.dz ? y.t().contiguous() : Tensor();
  const scalar_t* yTp = needs.dz ? yT.data_ptr<scalar_t>() : nullptr;

  Tensor dy_part = needs.dy ? at::zeros({n_slices, J, d}, x.options()) : Tensor();
  Tensor dzT_part = needs.dz ? at::zeros({n_slices, d, K}, x.options()) : Tensor();
  std::vector<double> dtau_part(n_slices, 0.0);
  scalar_t* dxp = needs.dx ? dx.data_ptr<scalar_t>() : nullptr;

  std::atomic<int64_t> next_slice{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_slices), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    const int64_t R_max = blk.BLOCK_I * blk.BLOCK_J;
    Tensor XY = at::empty({R_max, d}, x.options());
    Tensor S = at::empty({R_max * blk.BLOCK_K}, x.options());
    // XY^T: dz's left operand, row-major; W: the i-block's G @ z rows.
    Tensor XYT = needs.dz ? at::empty({d, R_max}, x.options()) : Tensor();
    Tensor W = need_W ? at::empty({R_max, d}, x.options()) : Tensor();
    // dz^T of one i-block, folded into the slice's dz^T after its j-loop: two short float32 sums
    // instead of one over every (i, j) tile of the slice (3.7e-4 relative error at I = J = 4096).
    Tensor dzT_blk = needs.dz ? at::empty({d, K}, x.options()) : Tensor();
    std::vector<scalar_t> mn(R_max), a(R_max), u(R_max), gv(blk.BLOCK_K);
    std::vector<double> dx_blk(needs.dx ? blk.BLOCK_I * d : 0);  // the i-block's sum_j y[j] * W[(i, j)]
    for (int64_t s = next_slice++; s < n_slices; s = next_slice++) {
      scalar_t* dyp = needs.dy ? dy_part[s].data_ptr<scalar_t>() : nullptr;
      scalar_t* dzTbp = needs.dz ? dzT_blk.data_ptr<scalar_t>() : nullptr;
      double dtau_acc = 0;
      const auto blocks = slice_blocks(s, n_slices, n_iblocks);
      for (int64_t ib = blocks.first; ib < blocks.second; ++ib) {
        const int64_t i0 = ib * blk.BLOCK_I, bi = std::min(blk.BLOCK_I, I - i0);
        std::fill(dx_blk.begin(), dx_blk.end(), 0.0);
        for (int64_t j0 = 0; j0 < J; j0 += blk.BLOCK_J) {
          const int64_t bj = std::min(blk.BLOCK_J, J - j0), R = bi * bj;
          scalar_t* XYp = XY.data_ptr<scalar_t>();
          fill_xy(xp, yp, d, i0, bi, j0, bj, XYp);
          if (needs.dz) fill_xy_t(xp, yTp, J, d, i0, bi, j0, bj, XYT.data_ptr<scalar_t>());
          scalar_t Q = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = i0 + r / bj, j = j0 + r % bj;
            const double m = std::min<double>(Lap[i], Lbp[j]);
            mn[r] = static_cast<scalar_t>(m);
            a[r] = static_cast<scalar_t>(gLap[i] * std::exp(m - Lap[i]) + gLbp[j] * std::exp(m - Lbp[j]));
            Q = std::max(Q, mn[r]);
          }
          for (int64_t r = 0; r < R; ++r) u[r] = std::exp(mn[r] - Q);
          for (int64_t k0 = 0; k0 < K; k0 += blk.BLOCK_K) {
            const int64_t bk = std::min(blk.BLOCK_K, K - k0);
            scalar_t* Gp = S.data_ptr<scalar_t>();  // R x bk: the logits, then G in place
            tile_mm<scalar_t>(R, bk, d, XYp, d, tzTp + k0, K, Gp, bk, /*accumulate=*/false);
            scalar_t Lc_min = std::numeric_limits<scalar_t>::infinity();
            for (int64_t k = 0; k < bk; ++k) Lc_min = std::min(Lc_min, Lcp[k0 + k]);
            if (Q - Lc_min <= kShareGap) {  // false for NaN too
              for (int64_t k = 0; k < bk; ++k) gv[k] = gLcp[k0 + k] * std::exp(Q - Lcp[k0 + k]);
              for (int64_t r = 0; r < R; ++r) {
                scalar_t* row = Gp + r * bk;
                dtau_acc += needs.dtau ? g_row_shared<true>(row, bk, mn[r], a[r], u[r], gv.data())
                                       : g_row_shared<false>(row, bk, mn[r], a[r], u[r], gv.data());
              }
            } else {
              for (int64_t r = 0; r < R; ++r) {
                scalar_t* row = Gp + r * bk;
                dtau_acc += needs.dtau ? g_row_two<true>(row, bk, mn[r], a[r], Lcp + k0, gLcp + k0)
                                       : g_row_two<false>(row, bk, mn[r], a[r], Lcp + k0, gLcp + k0);
              }
            }
            // W (+)= G @ z[k-block];  dz[k-block]^T (+)= XY^T @ G, columns k0.. of the d x K block.
            if (need_W) {
              tile_mm<scalar_t>(R, d, bk, Gp, bk, zp + k0 * d, d, W.data_ptr<scalar_t>(), d, /*accumulate=*/k0 != 0);
            }
            if (needs.dz) {
              tile_mm<scalar_t>(d, bk, R, XYT.data_ptr<scalar_t>(), R, Gp, bk, dzTbp + k0, K,
                                /*accumulate=*/j0 != 0);
            }
          }
          if (!need_W) continue;
          const scalar_t* Wp = W.data_ptr<scalar_t>();
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = i0 + r / bj, j = j0 + r % bj;
            const scalar_t* wr = Wp + r * d;
            if (needs.dx) {
              const scalar_t* yr = yp + j * d;
              double* dxr = dx_blk.data() + (i - i0) * d;
              for (int64_t c = 0; c < d; ++c) dxr[c] += static_cast<double>(yr[c]) * wr[c];
            }
            if (needs.dy) {
              const scalar_t* xr = xp + i * d;
              scalar_t* dyr = dyp + j * d;
              for (int64_t c = 0; c < d; ++c) dyr[c] += xr[c] * wr[c];
            }
          }
        }
        if (needs.dx) {
          for (int64_t e = 0; e < bi * d; ++e) dxp[i0 * d + e] = static_cast<scalar_t>(tau * dx_blk[e]);
        }
        if (needs.dz) dzT_part[s].add_(dzT_blk);
      }
      dtau_part[s] = dtau_acc;
    }
  });

  // Slice partials, combined in slice order.
  if (needs.dy) {
    at::sum_out(dy, dy_part, {0});
    dy.mul_(tau);
  }
  if (needs.dz) {
    dz.copy_(dzT_part.sum(0).t());
    dz.mul_(tau);
  }
  if (needs.dtau) {
    double t = 0;
    for (int64_t s = 0; s < n_slices; ++s) t += dtau_part[s];
    dtau.fill_(t / tau);  // the G pass summed G S = tau G T
  }
}

// The output for a gradient: `like`'s shape when needed, else an empty (0,) tensor.
inline Tensor grad_output(const Tensor& like, bool needed) {
  return needed ? at::empty_like(like) : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cube_lse_backward(const Tensor& x, const Tensor& y, const Tensor& z,
                                                             const Tensor& tau, const Tensor& La,
                                                             const Tensor& Lb, const Tensor& Lc,
                                                             const Tensor& gLa, const Tensor& gLb,
                                                             const Tensor& gLc, bool need_dx, bool need_dy,
                                                             bool need_dz, bool need_dtau) {
  check_cube_inputs(x, y, z, tau);
  check_like(La, "La", x, "x", {x.size(0)});
  check_like(Lb, "Lb", x, "x", {y.size(0)});
  check_like(Lc, "Lc", x, "x", {z.size(0)});
  check_like(gLa, "gLa", x, "x", {x.size(0)});
  check_like(gLb, "gLb", x, "x", {y.size(0)});
  check_like(gLc, "gLc", x, "x", {z.size(0)});
  const CubeNeeds needs{need_dx, need_dy, need_dz, need_dtau};
  Tensor dx = grad_output(x, need_dx), dy = grad_output(y, need_dy), dz = grad_output(z, need_dz);
  Tensor dtau = grad_output(tau, need_dtau);
  if (!(need_dx || need_dy || need_dz || need_dtau)) return {dx, dy, dz, dtau};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_cube_lse_backward", [&] {
    cube_backward_kernel<scalar_t>(x, y, z, tau.item<double>(), La, Lb, Lc, gLa, gLb, gLc, needs, dx, dy, dz, dtau);
  });
  return {dx, dy, dz, dtau};
}

// ---------------------------------------------------------------------------
// Pair LSE (docs/math.md section 3 and M = 2): L[i] = LSE_j l[i, j], l[i, j] =
// tau <a[i], b[j]> off the diagonal and pos[i] on it; a has I rows, b has J >= I
// (a process's local rows against the global batch). Tiles of kPairBlockI rows by
// kPairBlockJ columns, one tile product each (tile_mm.h), then one vectorised pass
// while the tile is in cache; the I x J logits are never held. This serves "n" sampling
// (b = the permuted products of the other modalities, formed by the loss: an
// O(N d) pass, next to the kernel's O(N^2 d)), M = 2 and clip_loss.

void check_pair_inputs(const Tensor& a, const Tensor& b, const Tensor& pos, const Tensor& tau) {
  check_matrix(a, "a");
  check_like(b, "b", a, "a", {b.size(0), a.size(1)});
  TORCH_CHECK(b.size(0) >= a.size(0), "symile_kernels cpu ops: b must have at least as many rows as a (",
              a.size(0), "); got ", b.size(0));
  check_like(pos, "pos", a, "a", {a.size(0)});
  check_like(tau, "tau", a, "a", {});
}

// S (bi x bj, row-major) = a[i0:] (tau b[j0:])^T with the diagonal entries replaced by pos;
// tbT = (tau b)^T, d x J.
template <typename scalar_t>
void pair_tile(const scalar_t* ap, const scalar_t* tbT, int64_t J, int64_t d, const scalar_t* posp, scalar_t* S,
               int64_t i0, int64_t bi, int64_t j0, int64_t bj) {
  tile_mm<scalar_t>(bi, bj, d, ap + i0 * d, d, tbT + j0, J, S, bj, /*accumulate=*/false);
  for (int64_t ii = 0; ii < bi; ++ii) {
    const int64_t jj = i0 + ii - j0;
    if (jj >= 0 && jj < bj) S[ii * bj + jj] = posp[i0 + ii];
  }
}

template <typename scalar_t>
void pair_forward_kernel(const Tensor& a, const Tensor& b, const Tensor& pos, double tau, Tensor& L) {
  const int64_t N = a.size(0), J = b.size(0);
  const int64_t BI = std::min(N, kPairBlockI), BJ = std::min(J, kPairBlockJ);
  const int64_t n_iblocks = (N + BI - 1) / BI, d = a.size(1);
  const scalar_t* posp = pos.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const Tensor tbT = tau_transposed(b, tau);
  const scalar_t* tbTp = tbT.data_ptr<scalar_t>();
  double* Lp = L.data_ptr<double>();
  // Each i-block owns its rows of L: no cross-thread reduction.
  std::atomic<int64_t> next_block{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_iblocks), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    Tensor S = at::empty({BI * BJ}, a.options());
    for (int64_t ib = next_block++; ib < n_iblocks; ib = next_block++) {
      const int64_t i0 = ib * BI, bi = std::min(BI, N - i0);
      std::vector<double> m(bi, -kInf), s(bi, 0.0);
      for (int64_t j0 = 0; j0 < J; j0 += BJ) {
        const int64_t bj = std::min(BJ, J - j0);
        scalar_t* Sp = S.data_ptr<scalar_t>();
        pair_tile(ap, tbTp, J, d, posp, Sp, i0, bi, j0, bj);
        for (int64_t ii = 0; ii < bi; ++ii) {
          const scalar_t rm = row_max(Sp + ii * bj, bj);
          lse_add(m[ii], s[ii], rm, exp_row_sum(Sp + ii * bj, bj, rm));
        }
      }
      for (int64_t ii = 0; ii < bi; ++ii) Lp[i0 + ii] = lse_value(m[ii], s[ii]);
    }
  });
}

Tensor pair_lse_forward(const Tensor& a, const Tensor& b, const Tensor& pos, const Tensor& tau) {
  check_pair_inputs(a, b, pos, tau);
  Tensor L = at::empty({a.size(0)}, a.options().dtype(at::kDouble));  // float64: docs/math.md section 6.4
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpu_pair_lse_forward", [&] {
    pair_forward_kernel<scalar_t>(a, b, pos, tau.item<double>(), L);
  });
  return L;
}

// A reduction over i (db, V) of per-i-block shares, folded into outT[:, j-block] in i-block
// order. The reduction is held transposed, outT = out^T (d x J, row-major), because each
// share is one tile product a[i-block]^T @ P[:, j-block] (d x bj, inner dimension BI,
// computed while the tile is hot): tile_mm takes row-major operands, and a^T is formed
// once. Block ib's share of a j-block is added after block ib - 1's (a per-j-block counter
// says how many blocks have been folded in). The order of the sums therefore depends on
// the block sizes only, never on the number of threads. A share whose turn has not come
// is parked and folded as soon as it has, so a worker does not wait on a slower one
// (say, one whose core another process holds) until the end of its block. Waiting
// cannot deadlock when blocks are taken in increasing order: block ib - 1 was taken
// before block ib by a running worker, which waits only on ib - 2, and block 0 waits on
// nothing. Extra memory: per worker, only when a share had to be parked, a d x J buffer.
template <typename scalar_t>
class OrderedFold {
 public:
  // One worker's parked shares (its d x J buffer, allocated on first use, and their j-blocks).
  struct Parking {
    Tensor parked;
    std::vector<int64_t> waiting;
  };

  OrderedFold(scalar_t* outT, int64_t J, int64_t BJ, int64_t d)
      : outT_(outT), J_(J), BJ_(BJ), d_(d), folded_(new std::atomic<int64_t>[(J + BJ - 1) / BJ]) {
    for (int64_t jb = 0; jb < (J + BJ - 1) / BJ; ++jb) folded_[jb].store(0);
  }

  // Block ib's share (d x min(BJ, J - j0), row-major) of outT's j-block jb: folded now if
  // block ib - 1's is in, else parked; then any parked share whose turn has come is folded.
  void offer(Parking& p, const scalar_t* share, int64_t ib, int64_t jb, const Tensor& like) {
    const int64_t bj = width(jb);
    if (folded_[jb].load(std::memory_order_acquire) == ib) {
      fold(share, bj, ib, jb);
    } else {
      if (!p.parked.defined()) p.parked = at::empty({d_, J_}, like.options());
      scalar_t* dst = p.parked.template data_ptr<scalar_t>() + jb * BJ_;
      for (int64_t c = 0; c < d_; ++c) std::copy(share + c * bj, share + (c + 1) * bj, dst + c * J_);
      p.waiting.push_back(jb);
    }
    fold_ready(p, ib);
  }

  // After block ib's last share: waits until its parked shares are folded.
  void finish(Parking& p, int64_t ib) {
    while (!p.waiting.empty()) {
      fold_ready(p, ib);
      if (!p.waiting.empty()) std::this_thread::yield();
    }
  }

 private:
  int64_t width(int64_t jb) const { return std::min(BJ_, J_ - jb * BJ_); }

  // share: d x width(jb) with row stride ld.
  void fold(const scalar_t* share, int64_t ld, int64_t ib, int64_t jb) {
    const int64_t bj = width(jb);
    for (int64_t c = 0; c < d_; ++c) {
      const scalar_t* src = share + c * ld;
      scalar_t* dst = outT_ + c * J_ + jb * BJ_;
      if (ib == 0) {
        std::copy(src, src + bj, dst);
      } else {
        for (int64_t jj = 0; jj < bj; ++jj) dst[jj] += src[jj];
      }
    }
    folded_[jb].store(ib + 1, std::memory_order_release);
  }

  void fold_ready(Parking& p, int64_t ib) {
    size_t kept = 0;
    for (const int64_t jb : p.waiting) {
      if (folded_[jb].load(std::memory_order_acquire) == ib) {
        fold(p.parked.template data_ptr<scalar_t>() + jb * BJ_, J_, ib, jb);
      } else {
        p.waiting[kept++] = jb;
      }
    }
    p.waiting.resize(kept);
  }

  scalar_t* outT_;
  int64_t J_, BJ_, d_;
  std::unique_ptr<std::atomic<int64_t>[]> folded_;
};

// P[i, j] = gL[i] e^(l[i, j] - L[i]) (one exponential per element, <= |gL[i]|);
// dpos[i] = P[i, i]; with the diagonal zeroed, da = tau P b, db = tau P^T a and
// dtau = sum_{j != i} P[i, j] <a[i], b[j]> = sum_i <a[i], (P b)[i]>.
//
// Work items are the i-blocks (BI rows), handed out in increasing order. An
// i-block owns its rows of da, accumulated over the j-blocks in cache; db^T is
// folded in i-block order (OrderedFold). Extra memory: a^T, (tau b)^T and db^T
// (d x N, d x J, d x J), and per thread one tile, one d x BJ share and, only when
// a share had to be parked, a d x J buffer.
// Needs (da, db, dpos, dtau) skip what nobody wants: the P b product serves da and dtau, the
// a^T P product (and db's fold) db alone; an unneeded output is an empty (0,) tensor.
struct PairNeeds {
  bool da, db, dpos, dtau;
};

template <typename scalar_t>
void pair_backward_kernel(const Tensor& a, const Tensor& b, const Tensor& pos, double tau, const Tensor& L,
                          const Tensor& gL, PairNeeds needs, Tensor& da, Tensor& db, Tensor& dpos,
                          Tensor& dtau) {
  const int64_t N = a.size(0), J = b.size(0), d = a.size(1);
  const int64_t BI = std::min(N, kPairBlockI), BJ = std::min(J, kPairBlockJ);
  const int64_t n_iblocks = (N + BI - 1) / BI, n_jblocks = (J + BJ - 1) / BJ;
  const scalar_t* posp = pos.data_ptr<scalar_t>();
  const scalar_t* Lp = L.data_ptr<scalar_t>();
  const scalar_t* gLp = gL.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const bool need_Pb = needs.da || needs.dtau;
  const Tensor aT = needs.db ? a.t().contiguous() : Tensor();
  const Tensor tbT = tau_transposed(b, tau);
  const scalar_t* aTp = needs.db ? aT.data_ptr<scalar_t>() : nullptr;
  const scalar_t* tbTp = tbT.data_ptr<scalar_t>();
  // P b of the owned rows: da's rows when da is wanted, else a scratch for dtau alone.
  Tensor Pb = needs.da ? da : (need_Pb ? at::empty_like(a) : Tensor());
  scalar_t* dap = need_Pb ? Pb.data_ptr<scalar_t>() : nullptr;
  scalar_t* dposp = needs.dpos ? dpos.data_ptr<scalar_t>() : nullptr;
  Tensor dbT = needs.db ? at::empty({d, J}, b.options()) : Tensor();
  std::vector<double> dtau_part(n_iblocks, 0.0);
  OrderedFold<scalar_t> db_fold(needs.db ? dbT.data_ptr<scalar_t>() : nullptr, J, BJ, d);

  std::atomic<int64_t> next_block{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_iblocks), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    Tensor S = at::empty({BI * BJ}, a.options());
    Tensor part = needs.db ? at::empty({d, BJ}, a.options()) : Tensor();
    typename OrderedFold<scalar_t>::Parking parking;
    for (int64_t ib = next_block++; ib < n_iblocks; ib = next_block++) {
      const int64_t i0 = ib * BI, bi = std::min(BI, N - i0);
      scalar_t* dab = need_Pb ? dap + i0 * d : nullptr;  // owned rows; hold P b until scaled by tau
      for (int64_t jb = 0; jb < n_jblocks; ++jb) {
        const int64_t j0 = jb * BJ, bj = std::min(BJ, J - j0);
        scalar_t* Pp = S.data_ptr<scalar_t>();
        pair_tile(ap, tbTp, J, d, posp, Pp, i0, bi, j0, bj);
        for (int64_t ii = 0; ii < bi; ++ii) exp_row_scale(Pp + ii * bj, bj, Lp[i0 + ii], gLp[i0 + ii]);
        for (int64_t ii = 0; ii < bi; ++ii) {
          const int64_t jj = i0 + ii - j0;
          if (jj >= 0 && jj < bj) {
            if (needs.dpos) dposp[i0 + ii] = Pp[ii * bj + jj];
            Pp[ii * bj + jj] = 0;  // the diagonal's logit is pos, not tau <a, b>
          }
        }
        // da (+)= P b[j-block];  db[j-block]^T's share = a[i-block]^T P (d x bj).
        if (need_Pb) tile_mm<scalar_t>(bi, d, bj, Pp, bj, bp + j0 * d, d, dab, d, /*accumulate=*/jb != 0);
        if (needs.db) {
          scalar_t* partp = part.data_ptr<scalar_t>();
          tile_mm<scalar_t>(d, bj, bi, aTp + i0, N, Pp, bj, partp, bj, /*accumulate=*/false);
          db_fold.offer(parking, partp, ib, jb, a);
        }
      }
      if (needs.db) db_fold.finish(parking, ib);
      if (needs.dtau) {
        double t = 0;  // double: the terms cancel against the positive part's (as the cube's dtau)
        for (int64_t ii = 0; ii < bi; ++ii) {
          for (int64_t c = 0; c < d; ++c) t += static_cast<double>(ap[(i0 + ii) * d + c]) * dab[ii * d + c];
        }
        dtau_part[ib] = t;
      }
      if (needs.da) {
        for (int64_t e = 0; e < bi * d; ++e) dab[e] *= static_cast<scalar_t>(tau);
      }
    }
  });

  if (needs.db) at::mul_out(db, dbT.t(), tau);
  if (needs.dtau) {
    double t = 0;
    for (int64_t ib = 0; ib < n_iblocks; ++ib) t += dtau_part[ib];
    dtau.fill_(t);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_lse_backward(const Tensor& a, const Tensor& b, const Tensor& pos,
                                                             const Tensor& tau, const Tensor& L,
                                                             const Tensor& gL, bool need_da, bool need_db,
                                                             bool need_dpos, bool need_dtau) {
  check_pair_inputs(a, b, pos, tau);
  check_like(L, "L", a, "a", {a.size(0)});
  check_like(gL, "gL", a, "a", {a.size(0)});
  const PairNeeds needs{need_da, need_db, need_dpos, need_dtau};
  Tensor da = grad_output(a, need_da), db = grad_output(b, need_db), dpos = grad_output(pos, need_dpos);
  Tensor dtau = grad_output(tau, need_dtau);
  if (!(need_da || need_db || need_dpos || need_dtau)) return {da, db, dpos, dtau};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpu_pair_lse_backward", [&] {
    pair_backward_kernel<scalar_t>(a, b, pos, tau.item<double>(), L, gL, needs, da, db, dpos, dtau);
  });
  return {da, db, dpos, dtau};
}

// ---------------------------------------------------------------------------
// The pair LSE's forward with the parts of its gradient that do not depend on gL, for a
// caller that will need gradients (symile_kernels/ops.py, pair_lse_fused). With the row
// softmax P[i, j] = e^(l[i, j] - L[i]):
//   U[i] = sum_{j != i} P[i, j] b[j],   V[j] = sum_{i != j} P[i, j] a[i],
//   Pd[i] = P[i, i],                    rowdot[i] = <a[i], U[i]>,
// the gradients of sum_i gL[i] L[i] are da = tau gL[i] U[i], dpos = gL Pd and
// dtau = sum_i gL[i] rowdot[i] for any gL, and db = tau c V when gL = c everywhere (a mean
// loss; the op recomputes db otherwise). Executed: the logits once (2 I J d) and the two
// contractions (4 I J d), the model's 6 I J d, where a forward plus a recomputing backward
// execute 8. An i-block's BI x J logits stay in a per-worker buffer between the LSE sweep
// and the contraction sweep (kPairGradsBufferBytes bounds it; BI shrinks for large J).
// Two exponentials per logit, as forward + backward. Deterministic: U, Pd, rowdot and L
// are owned by i-blocks, V is folded in i-block order (OrderedFold).

// Per-worker logit buffer of pair_forward_grads_kernel: BI x J scalars at most this big.
constexpr int64_t kPairGradsBufferBytes = int64_t(16) << 20;

template <typename scalar_t>
void pair_forward_grads_kernel(const Tensor& a, const Tensor& b, const Tensor& pos, double tau, bool need_U,
                               bool need_V, Tensor& L, Tensor& U, Tensor& V, Tensor& Pd, Tensor& rowdot) {
  const int64_t N = a.size(0), J = b.size(0), d = a.size(1);
  const int64_t fit = kPairGradsBufferBytes / static_cast<int64_t>(sizeof(scalar_t)) / J;
  const int64_t BI = std::min(N, std::max<int64_t>(16, std::min(kPairBlockI, fit)));
  const int64_t BJ = std::min(J, kPairBlockJ);
  const int64_t n_iblocks = (N + BI - 1) / BI, n_jblocks = (J + BJ - 1) / BJ;
  const scalar_t* posp = pos.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const Tensor tbT = tau_transposed(b, tau);
  const Tensor aT = need_V ? a.t().contiguous() : Tensor();
  const Tensor VT = need_V ? at::empty({d, J}, b.options()) : Tensor();
  const scalar_t* tbTp = tbT.data_ptr<scalar_t>();
  double* Lp = L.data_ptr<double>();
  scalar_t* Pdp = Pd.data_ptr<scalar_t>();
  OrderedFold<scalar_t> V_fold(need_V ? VT.data_ptr<scalar_t>() : nullptr, J, BJ, d);

  std::atomic<int64_t> next_block{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_iblocks), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    Tensor S = at::empty({BI, J}, a.options());
    Tensor share = at::empty({d, BJ}, a.options());
    typename OrderedFold<scalar_t>::Parking parking;
    for (int64_t ib = next_block++; ib < n_iblocks; ib = next_block++) {
      const int64_t i0 = ib * BI, bi = std::min(BI, N - i0);
      scalar_t* Sp = S.data_ptr<scalar_t>();  // bi x J, row stride J
      // Sweep 1: the block's logits (the diagonal is pos), one j-block at a time (the micro-kernels'
      // shapes), and their row LSEs.
      for (int64_t j0 = 0; j0 < J; j0 += BJ) {
        tile_mm<scalar_t>(bi, std::min(BJ, J - j0), d, ap + i0 * d, d, tbTp + j0, J, Sp + j0, J,
                          /*accumulate=*/false);
      }
      for (int64_t ii = 0; ii < bi; ++ii) {
        scalar_t* row = Sp + ii * J;
        row[i0 + ii] = posp[i0 + ii];
        const scalar_t rm = row_max(row, J);
        double m = -kInf, s = 0;
        lse_add(m, s, rm, exp_row_sum(row, J, rm));
        const double Li = lse_value(m, s);
        Lp[i0 + ii] = Li;
        // Sweep 2's P = e^(l - L) as e^(l - shift) e^(shift - L), shift = L rounded down to the
        // compute dtype: L itself would lose log(s) at logits near 1e8 (docs/math.md section 6.4).
        scalar_t shift = static_cast<scalar_t>(Li);
        if (static_cast<double>(shift) > Li) shift = std::nextafter(shift, -std::numeric_limits<scalar_t>::infinity());
        exp_row_scale(row, J, shift, static_cast<scalar_t>(std::exp(static_cast<double>(shift) - Li)));
        Pdp[i0 + ii] = row[i0 + ii];
        row[i0 + ii] = 0;  // the diagonal's logit is pos: its gradient is dpos, not da or db
      }
      // Sweep 2: U = P b (summed over the j-blocks), V^T's shares a[i-block]^T P[:, j-block].
      if (need_U) {
        scalar_t* Up = U.data_ptr<scalar_t>() + i0 * d;
        for (int64_t jb = 0; jb < n_jblocks; ++jb) {
          const int64_t j0 = jb * BJ;
          tile_mm<scalar_t>(bi, d, std::min(BJ, J - j0), Sp + j0, J, bp + j0 * d, d, Up, d,
                            /*accumulate=*/jb != 0);
        }
        double* rowdotp = rowdot.data_ptr<double>();
        for (int64_t ii = 0; ii < bi; ++ii) {
          double t = 0;
          for (int64_t c = 0; c < d; ++c) t += static_cast<double>(ap[(i0 + ii) * d + c]) * Up[ii * d + c];
          rowdotp[i0 + ii] = t;
        }
      }
      if (need_V) {
        const scalar_t* aTp = aT.data_ptr<scalar_t>();
        scalar_t* sharep = share.data_ptr<scalar_t>();
        for (int64_t jb = 0; jb < n_jblocks; ++jb) {
          const int64_t j0 = jb * BJ, bj = std::min(BJ, J - j0);
          tile_mm<scalar_t>(d, bj, bi, aTp + i0, N, Sp + j0, J, sharep, bj, /*accumulate=*/false);
          V_fold.offer(parking, sharep, ib, jb, a);
        }
        V_fold.finish(parking, ib);
      }
    }
  });
  if (need_V) V.copy_(VT.t());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pair_lse_forward_grads(const Tensor& a, const Tensor& b,
                                                                          const Tensor& pos, const Tensor& tau,
                                                                          bool need_U, bool need_V) {
  check_pair_inputs(a, b, pos, tau);
  const auto f64 = a.options().dtype(at::kDouble);
  Tensor L = at::empty({a.size(0)}, f64);
  Tensor U = need_U ? at::empty_like(a) : at::empty({0}, a.options());
  Tensor rowdot = at::empty({need_U ? a.size(0) : 0}, f64);
  Tensor V = need_V ? at::empty_like(b) : at::empty({0}, a.options());
  Tensor Pd = at::empty_like(pos);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpu_pair_lse_forward_grads", [&] {
    pair_forward_grads_kernel<scalar_t>(a, b, pos, tau.item<double>(), need_U, need_V, L, U, V, Pd, rowdot);
  });
  return {L, U, V, Pd, rowdot};
}

// ---------------------------------------------------------------------------
// Internal, for tests: e^x of a float32 tensor through the kernels' vectorised
// exponential at instruction set `isa` ("avx512", "avx2", "scalar" or "active"),
// and the name of the set the kernels use.

Tensor exp_test(const Tensor& x, c10::string_view isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "symile_kernels cpu ops: x must be a float32 CPU tensor; got ", x.scalar_type(), " on ", x.device());
  vec::Isa chosen = vec::active_isa();
  if (isa == "avx512") chosen = vec::Isa::kAvx512;
  else if (isa == "avx2") chosen = vec::Isa::kAvx2;
  else if (isa == "scalar") chosen = vec::Isa::kScalar;
  else TORCH_CHECK(isa == "active", "symile_kernels cpu ops: isa must be avx512, avx2, scalar or active; got ", isa);
  TORCH_CHECK(vec::supported(chosen), "symile_kernels cpu ops: this CPU does not run isa ", isa);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  vec::exp_array(chosen, xc.data_ptr<float>(), xc.numel(), out.data_ptr<float>());
  return out;
}

// Internal, for tests and benchmarks/tile_rate.py: C = [C +] A @ B through tile_mm (one thread,
// the kernels' product path) on row-major views; C is written in place and returned.
Tensor tile_mm_test(const Tensor& A, const Tensor& B, Tensor C, bool accumulate) {
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{A, "A"}, {B, "B"}, {C, "C"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1),
                "symile_kernels cpu ops: ", name, " must be a 2-D CPU matrix with unit column stride; got shape ",
                t.sizes(), " and strides ", t.strides());
    TORCH_CHECK(t.scalar_type() == A.scalar_type() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "symile_kernels cpu ops: ", name, " must be float32 or float64, like A; got ", t.scalar_type());
  }
  TORCH_CHECK(A.size(1) == B.size(0) && C.size(0) == A.size(0) && C.size(1) == B.size(1),
              "symile_kernels cpu ops: C (", C.sizes(), ") must be A (", A.sizes(), ") @ B (", B.sizes(), ")");
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "cpu_tile_mm_test", [&] {
    tile_mm<scalar_t>(A.size(0), B.size(1), A.size(1), A.data_ptr<scalar_t>(), A.stride(0), B.data_ptr<scalar_t>(),
                      B.stride(0), C.data_ptr<scalar_t>(), C.stride(0), accumulate);
  });
  return C;
}

}  // namespace
}  // namespace symile_cpu

// FRAGMENT: the symile_kernels namespace is shared with the Python custom ops
// (symile_kernels/ops.py) and the CUDA backend.
TORCH_LIBRARY_FRAGMENT(symile_kernels, m) {
  m.def("cpu_cube_lse_forward(Tensor x, Tensor y, Tensor z, Tensor tau) -> (Tensor, Tensor, Tensor)");
  // The bool flags: which gradients to compute (an unneeded one comes back as an empty (0,) tensor).
  m.def("cpu_cube_lse_backward(Tensor x, Tensor y, Tensor z, Tensor tau, Tensor La, Tensor Lb, Tensor Lc, "
        "Tensor gLa, Tensor gLb, Tensor gLc, bool need_dx=True, bool need_dy=True, bool need_dz=True, "
        "bool need_dtau=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_pair_lse_forward(Tensor a, Tensor b, Tensor pos, Tensor tau) -> Tensor");
  m.def("cpu_pair_lse_backward(Tensor a, Tensor b, Tensor pos, Tensor tau, Tensor L, Tensor gL, "
        "bool need_da=True, bool need_db=True, bool need_dpos=True, bool need_dtau=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_pair_lse_forward_grads(Tensor a, Tensor b, Tensor pos, Tensor tau, bool need_U, bool need_V) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Internal (tests of the vectorised exponential): not part of the backend interface.
  m.def("cpu_exp_test(Tensor x, str isa) -> Tensor");
  // Internal (tests of the tile products, benchmarks/tile_rate.py).
  m.def("cpu_tile_mm_test(Tensor A, Tensor B, Tensor(a!) C, bool accumulate) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(symile_kernels, CPU, m) {
  m.impl("cpu_cube_lse_forward", &symile_cpu::cube_lse_forward);
  m.impl("cpu_cube_lse_backward", &symile_cpu::cube_lse_backward);
  m.impl("cpu_pair_lse_forward", &symile_cpu::pair_lse_forward);
  m.impl("cpu_pair_lse_backward", &symile_cpu::pair_lse_backward);
  m.impl("cpu_pair_lse_forward_grads", &symile_cpu::pair_lse_forward_grads);
  m.impl("cpu_exp_test", &symile_cpu::exp_test);
  m.impl("cpu_tile_mm_test", &symile_cpu::tile_mm_test);
}
