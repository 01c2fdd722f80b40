// The pair log-sum-exp and its gradients (docs/math.md section 3, M = 2 and CLIP):
// cpu_pair_lse_forward, cpu_pair_lse_backward and cpu_pair_lse_forward_grads. Work items are
// i-blocks; reductions over i are folded in i-block order (OrderedFold), so results do not depend
// on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"
#include "ops.h"
#include "tile_mm.h"

namespace symile_cpu {
namespace {

// Pair tiles: BLOCK_I anchor rows by BLOCK_J columns, 256 KiB in float32 (in L2).
// BLOCK_I = 256 is also the inner dimension of the backward's db product; 256 x 256
// measured as good as 128 x 512 and 256 x 512, and better than 64 x 512 (N = 2048, d = 256).
constexpr int64_t kPairBlockI = 256;
constexpr int64_t kPairBlockJ = 256;

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

}  // namespace

Tensor pair_lse_forward(const Tensor& a, const Tensor& b, const Tensor& pos, const Tensor& tau) {
  check_pair_inputs(a, b, pos, tau);
  Tensor L = at::empty({a.size(0)}, a.options().dtype(at::kDouble));  // float64: docs/math.md section 6.4
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpu_pair_lse_forward", [&] {
    pair_forward_kernel<scalar_t>(a, b, pos, tau.item<double>(), L);
  });
  return L;
}

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace symile_cpu
