// The cube's log-sum-exps and their gradients (docs/math.md section 2): cpu_cube_lse_forward and
// cpu_cube_lse_backward. The i range is cut into slices of i-blocks (binding.cpp's header comment);
// each tile of the cube is one tile product (tile_mm.h) followed by vectorised passes over it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"
#include "tile_mm.h"

namespace symile_cpu {
namespace {

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

// A worker's tile workspaces, from ATen's allocator (64-byte aligned rows for the micro-kernels):
// XY, the (i, j) block's row products (R_max x d), and S, its logits (R_max x BLOCK_K).
struct TileWorkspace {
  int64_t R_max;
  Tensor XY, S;
  TileWorkspace(const CubeBlocks& blk, int64_t d, const at::TensorOptions& options)
      : R_max(blk.BLOCK_I * blk.BLOCK_J),
        XY(at::empty({R_max, d}, options)),
        S(at::empty({R_max * blk.BLOCK_K}, options)) {}
};

// Runs body(ws, next_slice) once per worker thread, each with its own TileWorkspace, the caller's
// thread-local state and a sequential BLAS (the workers are the parallelism); the workers take
// slices from the shared counter next_slice.
template <typename Body>
void on_workers(int64_t n_slices, const CubeBlocks& blk, int64_t d, const at::TensorOptions& options,
                Body body) {
  std::atomic<int64_t> next_slice{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers(n_slices), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential_blas(caller_state);
    const TileWorkspace ws(blk, d, options);
    body(ws, next_slice);
  });
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

  on_workers(n_slices, blk, d, x.options(), [&](const TileWorkspace& ws, std::atomic<int64_t>& next_slice) {
    const int64_t R_max = ws.R_max;
    const Tensor &XY = ws.XY, &S = ws.S;
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

}  // namespace

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

namespace {

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

  on_workers(n_slices, blk, d, x.options(), [&](const TileWorkspace& ws, std::atomic<int64_t>& next_slice) {
    const int64_t R_max = ws.R_max;
    const Tensor &XY = ws.XY, &S = ws.S;
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

}  // namespace

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

}  // namespace symile_cpu
