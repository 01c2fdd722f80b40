// The M = 3 cube kernels (docs/math.md section 2): La, Lb, Lc by online log-sum-exp over
// tiles, and dx, dy, dz, dtau recomputed from the saved LSE vectors. The cube is
// never written to memory. Blueprint: symile_kernels/chunked.py.
//
// A tile is BP = BLOCK_I * BLOCK_J (i, j) pairs against BLOCK_K rows of z: the
// pairs' row products x[i] * y[j] (built in shared memory, BLOCK_D columns at a
// time) times z^T, on tensor cores (WMMA) or SIMT FMAs. Every output row has one
// owning CTA and partial LSEs are combined in a fixed order: no float atomics,
// results are deterministic on a given GPU.
#include <limits>

#include "launch.h"
#include "static_switch.h"
#include "tile.cuh"

namespace symile_cuda {
namespace {

template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads)
    cube_forward_kernel(const TIn* __restrict__ x, const TIn* __restrict__ y, const TIn* __restrict__ z,
                        const T* __restrict__ tau_ptr, int64_t I, int64_t J, int64_t K, int64_t D,
                        CubeForwardPlan plan, T* __restrict__ La_part, T* __restrict__ Lb_part,
                        T* __restrict__ Lc_part) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  static_assert(std::is_same<Acc, T>::value, "partial LSEs are stored in the tensors' dtype");
  constexpr TileConfig c = Policy::cfg;
  constexpr int BLOCK_I = c.BLOCK_I, BLOCK_J = c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D;
  constexpr int BP = BLOCK_I * BLOCK_J;
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldP = BLOCK_D + c.pad_in;
  constexpr ForwardLayout lay = forward_layout(c);
  static_assert(BLOCK_I <= 32 && BLOCK_J <= 32 && BP <= kThreads, "per-row bookkeeping uses one thread per row");

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Zs = reinterpret_cast<In*>(smem + lay.Z);
  Acc* pair_m = reinterpret_cast<Acc*>(smem + lay.pair_m);
  Acc* pair_s = reinterpret_cast<Acc*>(smem + lay.pair_s);
  Acc* row_M = reinterpret_cast<Acc*>(smem + lay.row_l);
  Acc* row_S = reinterpret_cast<Acc*>(smem + lay.row_ls);
  Acc* colm = reinterpret_cast<Acc*>(smem + lay.colm);
  Acc* colo = reinterpret_cast<Acc*>(smem + lay.colo);
  Acc* cols = reinterpret_cast<Acc*>(smem + lay.cols);
  Acc* roww = reinterpret_cast<Acc*>(smem + lay.roww);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  // This CTA's rows of the partial buffers, (max, sum) pairs (initialised to (-inf, 0) by
  // the launcher): every merge is a rescaled sum, never a chain of log-add-exps.
  const int64_t b = blockIdx.x;
  T* Lb_M = Lb_part + b * J;
  T* Lb_S = Lb_part + (plan.ctas + b) * J;
  T* Lc_M = Lc_part + b * K;
  T* Lc_S = Lc_part + (plan.ctas + b) * K;

  for (int64_t u = blockIdx.x; u < plan.units; u += gridDim.x) {
    const int64_t ib = u / plan.num_js;
    const int64_t js = u % plan.num_js;
    const int64_t i0 = ib * BLOCK_I;
    const int64_t j_begin = split_begin(js, plan.num_jb, plan.num_js) * BLOCK_J;
    const int64_t j_split_end = split_begin(js + 1, plan.num_jb, plan.num_js) * BLOCK_J;
    const int64_t j_end = j_split_end < J ? j_split_end : J;
    if (t < BLOCK_I) {
      row_M[t] = neg_inf<Acc>();
      row_S[t] = Acc(0);
    }

    for (int64_t j0 = j_begin; j0 < j_end; j0 += BLOCK_J) {
      // Running (max, sum) over k of each pair's logits.
      if (t < BP) {
        pair_m[t] = neg_inf<Acc>();
        pair_s[t] = Acc(0);
      }
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK_K) {
        TileFor<Policy, BP, BLOCK_K> acc;
        acc.zero();
        for (int64_t d0 = 0; d0 < D; d0 += BLOCK_D) {
          load_pair_products<In, Acc, TIn, BLOCK_I, BLOCK_J>(P, ldP, BLOCK_D, x, y, i0, I, j0, J, d0, D);
          load_rows<In, Acc>(Zs, ldP, BLOCK_K, BLOCK_D, z, k0, K, d0, D);
          __syncthreads();
          acc.template mma<true>(P, ldP, Zs, ldP, BLOCK_D);
          __syncthreads();
        }
        acc.store(S, ldS);
        __syncthreads();
        // Logits tau * T; entries outside the cube (or of pairs in another j-split) are -inf.
        for (int e = t; e < BP * BLOCK_K; e += kThreads) {
          const int p = e / BLOCK_K;
          const int kk = e % BLOCK_K;
          const bool valid = i0 + p / BLOCK_J < I && j0 + p % BLOCK_J < j_end && k0 + kk < K;
          S[p * ldS + kk] = valid ? tau * S[p * ldS + kk] : neg_inf<Acc>();
        }
        __syncthreads();
        // Every valid row and column holds at least one finite logit (pair (i0, j0), column k0).
        tile_lse_shared<Acc, BP, BLOCK_K>(S, ldS, colm, colo, cols, roww, pair_m, pair_s);
        if (t < BLOCK_K && k0 + t < K) merge_running(Lc_M[k0 + t], Lc_S[k0 + t], colo[t], cols[t]);
        __syncthreads();
      }
      // (pair_m[p], pair_s[p]) is pair p's LSE over k as (max, sum); fold it into Lb (over i) and La (over j).
      if (t < BLOCK_J) {
        const int64_t j = j0 + t;
        if (j < j_end) {
          for (int ii = 0; ii < BLOCK_I; ++ii) merge_running(Lb_M[j], Lb_S[j], pair_m[ii * BLOCK_J + t],
                                                             pair_s[ii * BLOCK_J + t]);
        }
      } else if (t >= 32 && t < 32 + BLOCK_I) {
        const int ii = t - 32;
        for (int jj = 0; jj < BLOCK_J; ++jj) merge_running(row_M[ii], row_S[ii], pair_m[ii * BLOCK_J + jj],
                                                           pair_s[ii * BLOCK_J + jj]);
      }
      __syncthreads();
    }
    if (t < BLOCK_I && i0 + t < I) {
      La_part[js * I + i0 + t] = row_M[t];
      La_part[(plan.num_js + js) * I + i0 + t] = row_S[t];
    }
    __syncthreads();
  }
}

// The logits' raw products S[p, k] = sum_d (x[a0 + p / BJ] * y[b0 + p % BJ])[d] z[k0 + k][d] of
// a BP x BLOCK_K tile over the full d (BLOCK_D columns per step), stored to S (ld ldS).
template <typename Policy, typename TIn, int BI, int BJ, int BK, int BD>
__device__ __forceinline__ void cube_tile_products(const TIn* __restrict__ x, const TIn* __restrict__ y,
                                                   const TIn* __restrict__ z, int64_t a0, int64_t NA, int64_t b0,
                                                   int64_t NB, int64_t k0, int64_t NC, int64_t D,
                                                   typename Policy::In* P, typename Policy::In* Cd, int ldP,
                                                   typename Policy::Acc* S, int ldS) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  TileFor<Policy, BI * BJ, BK> acc;
  acc.zero();
  for (int64_t d0 = 0; d0 < D; d0 += BD) {
    load_pair_products<In, Acc, TIn, BI, BJ>(P, ldP, BD, x, y, a0, NA, b0, NB, d0, D);
    load_rows<In, Acc>(Cd, ldP, BK, BD, z, k0, NC, d0, D);
    __syncthreads();
    acc.template mma<true>(P, ldP, Cd, ldP, BD);
    __syncthreads();
  }
  acc.store(S, ldS);
  __syncthreads();
}

// Backward pass "pairs" (plan.h CubeBackwardPlan): unit (is, js, sl) accumulates, per
// (i-block, j-block) of its splits, W[(i, j), slab] = sum_k G[i, j, k] z[k, slab] over
// every k (the logits recomputed once), then adds sum_j y[j] * W to dx_part[js, i, slab]
// and sum_i x[i] * W to dy_part[is, j, slab] (its own rows: zero-filled by the launcher).
template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads)
    cube_backward_pairs_kernel(const TIn* __restrict__ x, const TIn* __restrict__ y, const TIn* __restrict__ z,
                               const T* __restrict__ tau_ptr, const T* __restrict__ La, const T* __restrict__ Lb,
                               const T* __restrict__ Lc, const T* __restrict__ gLa, const T* __restrict__ gLb,
                               const T* __restrict__ gLc, int64_t I, int64_t J, int64_t K, int64_t D,
                               CubeBackwardPlan plan, T* __restrict__ dx_part, T* __restrict__ dy_part) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  static_assert(std::is_same<Acc, T>::value, "partial gradients are stored in the compute dtype");
  constexpr TileConfig c = Policy::cfg;
  constexpr int BLOCK_I = c.BLOCK_I, BLOCK_J = c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D;
  constexpr int BP = BLOCK_I * BLOCK_J;
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldG = BLOCK_K + c.pad_in;
  constexpr int ldP = BLOCK_D + c.pad_in;
  constexpr int ldOp = kCubeChunk + c.pad_in;
  const int ldW = static_cast<int>(plan.slab) + c.pad_acc;
  const CubeBackwardLayout lay = cube_backward_layout(c, plan.slab, false);

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* G = reinterpret_cast<In*>(smem + lay.G);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Cd = reinterpret_cast<In*>(smem + lay.Cd);
  In* Zw = reinterpret_cast<In*>(smem + lay.Op);
  Acc* W = reinterpret_cast<Acc*>(smem + lay.W);
  Acc* LA_s = reinterpret_cast<Acc*>(smem + lay.LA);
  Acc* gA_s = reinterpret_cast<Acc*>(smem + lay.gA);
  Acc* LB_s = reinterpret_cast<Acc*>(smem + lay.LB);
  Acc* gB_s = reinterpret_cast<Acc*>(smem + lay.gB);
  Acc* ref = reinterpret_cast<Acc*>(smem + lay.ref);
  Acc* arow = reinterpret_cast<Acc*>(smem + lay.arow);
  Acc* u = reinterpret_cast<Acc*>(smem + lay.u);
  Acc* LC_s = reinterpret_cast<Acc*>(smem + lay.LC);
  Acc* gC_s = reinterpret_cast<Acc*>(smem + lay.gC);
  Acc* bcol = reinterpret_cast<Acc*>(smem + lay.bcol);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t unit = blockIdx.x;
  const int64_t sl = unit % plan.num_slabs;
  const int64_t is = (unit / plan.num_slabs) % plan.pair_is;
  const int64_t js = unit / (plan.num_slabs * plan.pair_is);
  const int64_t col0 = sl * plan.slab;
  const int cols = static_cast<int>(D - col0 < plan.slab ? D - col0 : plan.slab);
  const int chunks = static_cast<int>(ceil_div(cols, kCubeChunk));

  for (int64_t ib = split_begin(is, plan.num_ib, plan.pair_is); ib < split_begin(is + 1, plan.num_ib, plan.pair_is);
       ++ib) {
    const int64_t a0 = ib * BLOCK_I;
    if (t < BLOCK_I) {
      const bool ok = a0 + t < I;
      LA_s[t] = ok ? static_cast<Acc>(La[a0 + t]) : Acc(0);
      gA_s[t] = ok ? static_cast<Acc>(gLa[a0 + t]) : Acc(0);
    }
    for (int64_t jb = split_begin(js, plan.num_jb, plan.pair_js);
         jb < split_begin(js + 1, plan.num_jb, plan.pair_js); ++jb) {
      const int64_t b0 = jb * BLOCK_J;
      if (t < BLOCK_J) {
        const bool ok = b0 + t < J;
        LB_s[t] = ok ? static_cast<Acc>(Lb[b0 + t]) : Acc(0);
        gB_s[t] = ok ? static_cast<Acc>(gLb[b0 + t]) : Acc(0);
      }
      for (int e = t; e < BP * ldW; e += kThreads) W[e] = Acc(0);
      __syncthreads();
      const Acc c0 = pair_factors<Acc, BLOCK_I, BLOCK_J>(LA_s, gA_s, LB_s, gB_s, a0, I, b0, J, ref, arow, u);
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK_K) {
        if (t < BLOCK_K) {
          const bool ok = k0 + t < K;
          LC_s[t] = ok ? static_cast<Acc>(Lc[k0 + t]) : Acc(0);
          gC_s[t] = ok ? static_cast<Acc>(gLc[k0 + t]) : Acc(0);
        }
        cube_tile_products<Policy, TIn, BLOCK_I, BLOCK_J, BLOCK_K, BLOCK_D>(x, y, z, a0, I, b0, J, k0, K, D, P, Cd,
                                                                            ldP, S, ldS);
        tile_G<In, Acc, BP, BLOCK_K, false>(S, ldS, tau, ref, arow, u, c0, LC_s, gC_s, k0, K, bcol, G, ldG);
        // W[:, chunk] += G z[k0 : k0 + BLOCK_K, chunk], the accumulators resumed from shared memory.
        for (int ch = 0; ch < chunks; ++ch) {
          load_rows<In, Acc>(Zw, ldOp, BLOCK_K, kCubeChunk, z, k0, K, col0 + ch * kCubeChunk, D);
          __syncthreads();
          TileFor<Policy, BP, kCubeChunk> w;
          w.load(W + ch * kCubeChunk, ldW);
          w.template mma<false>(G, ldG, Zw, ldOp, BLOCK_K);
          w.store(W + ch * kCubeChunk, ldW);
          __syncthreads();
        }
      }
      // dx_part[js, i] += sum_j y[j] * W[(i, j)] and dy_part[is, j] += sum_i x[i] * W[(i, j)].
      for (int e = t; e < (BLOCK_I + BLOCK_J) * cols; e += kThreads) {
        const int r = e / cols;
        const int dd = e % cols;
        const int64_t col = col0 + dd;
        if (r < BLOCK_I) {
          const int64_t a = a0 + r;
          if (a < I) {
            Acc v = Acc(0);
            for (int bb = 0; bb < BLOCK_J && b0 + bb < J; ++bb) {
              v += to_acc<Acc>(y[(b0 + bb) * D + col]) * W[(r * BLOCK_J + bb) * ldW + dd];
            }
            dx_part[(js * I + a) * D + col] += v;
          }
        } else {
          const int bb = r - BLOCK_I;
          const int64_t b = b0 + bb;
          if (b < J) {
            Acc v = Acc(0);
            for (int aa = 0; aa < BLOCK_I && a0 + aa < I; ++aa) {
              v += to_acc<Acc>(x[(a0 + aa) * D + col]) * W[(aa * BLOCK_J + bb) * ldW + dd];
            }
            dy_part[(is * J + b) * D + col] += v;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Backward pass "z": unit (kb, is, sl) owns rows [kb * BLOCK_K, ...) of z and writes
// dz_part[is, k, slab] = sum_{i in split is, j} G[i, j, k] (x[i] * y[j])[slab], the
// logits recomputed once per (i-block, j-block) tile.
template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads)
    cube_backward_z_kernel(const TIn* __restrict__ x, const TIn* __restrict__ y, const TIn* __restrict__ z,
                           const T* __restrict__ tau_ptr, const T* __restrict__ La, const T* __restrict__ Lb,
                           const T* __restrict__ Lc, const T* __restrict__ gLa, const T* __restrict__ gLb,
                           const T* __restrict__ gLc, int64_t I, int64_t J, int64_t K, int64_t D,
                           CubeBackwardPlan plan, T* __restrict__ dz_part) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  static_assert(std::is_same<Acc, T>::value, "partial gradients are stored in the compute dtype");
  constexpr TileConfig c = Policy::cfg;
  constexpr int BLOCK_I = c.BLOCK_I, BLOCK_J = c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D;
  constexpr int BP = BLOCK_I * BLOCK_J;
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldGt = BP + c.pad_in;
  constexpr int ldP = BLOCK_D + c.pad_in;
  constexpr int ldOp = kCubeChunk + c.pad_in;
  const int ldV = static_cast<int>(plan.slab) + c.pad_acc;
  const CubeBackwardLayout lay = cube_backward_layout(c, plan.slab, true);

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* Gt = reinterpret_cast<In*>(smem + lay.G);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Cd = reinterpret_cast<In*>(smem + lay.Cd);
  In* Pw = reinterpret_cast<In*>(smem + lay.Op);
  Acc* V = reinterpret_cast<Acc*>(smem + lay.W);
  Acc* LA_s = reinterpret_cast<Acc*>(smem + lay.LA);
  Acc* gA_s = reinterpret_cast<Acc*>(smem + lay.gA);
  Acc* LB_s = reinterpret_cast<Acc*>(smem + lay.LB);
  Acc* gB_s = reinterpret_cast<Acc*>(smem + lay.gB);
  Acc* ref = reinterpret_cast<Acc*>(smem + lay.ref);
  Acc* arow = reinterpret_cast<Acc*>(smem + lay.arow);
  Acc* u = reinterpret_cast<Acc*>(smem + lay.u);
  Acc* LC_s = reinterpret_cast<Acc*>(smem + lay.LC);
  Acc* gC_s = reinterpret_cast<Acc*>(smem + lay.gC);
  Acc* bcol = reinterpret_cast<Acc*>(smem + lay.bcol);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t unit = blockIdx.x;
  const int64_t sl = unit % plan.num_slabs;
  const int64_t is = (unit / plan.num_slabs) % plan.z_is;
  const int64_t k0 = unit / (plan.num_slabs * plan.z_is) * BLOCK_K;
  const int64_t col0 = sl * plan.slab;
  const int cols = static_cast<int>(D - col0 < plan.slab ? D - col0 : plan.slab);
  const int chunks = static_cast<int>(ceil_div(cols, kCubeChunk));

  if (t < BLOCK_K) {
    const bool ok = k0 + t < K;
    LC_s[t] = ok ? static_cast<Acc>(Lc[k0 + t]) : Acc(0);
    gC_s[t] = ok ? static_cast<Acc>(gLc[k0 + t]) : Acc(0);
  }
  for (int e = t; e < BLOCK_K * ldV; e += kThreads) V[e] = Acc(0);

  for (int64_t ib = split_begin(is, plan.num_ib, plan.z_is); ib < split_begin(is + 1, plan.num_ib, plan.z_is); ++ib) {
    const int64_t a0 = ib * BLOCK_I;
    for (int64_t b0 = 0; b0 < J; b0 += BLOCK_J) {
      if (t < BLOCK_I) {
        const bool ok = a0 + t < I;
        LA_s[t] = ok ? static_cast<Acc>(La[a0 + t]) : Acc(0);
        gA_s[t] = ok ? static_cast<Acc>(gLa[a0 + t]) : Acc(0);
      }
      if (t < BLOCK_J) {
        const bool ok = b0 + t < J;
        LB_s[t] = ok ? static_cast<Acc>(Lb[b0 + t]) : Acc(0);
        gB_s[t] = ok ? static_cast<Acc>(gLb[b0 + t]) : Acc(0);
      }
      __syncthreads();
      const Acc c0 = pair_factors<Acc, BLOCK_I, BLOCK_J>(LA_s, gA_s, LB_s, gB_s, a0, I, b0, J, ref, arow, u);
      cube_tile_products<Policy, TIn, BLOCK_I, BLOCK_J, BLOCK_K, BLOCK_D>(x, y, z, a0, I, b0, J, k0, K, D, P, Cd,
                                                                          ldP, S, ldS);
      tile_G<In, Acc, BP, BLOCK_K, true>(S, ldS, tau, ref, arow, u, c0, LC_s, gC_s, k0, K, bcol, Gt, ldGt);
      // V[:, chunk] += G^T (x * y)[pairs, chunk].
      for (int ch = 0; ch < chunks; ++ch) {
        load_pair_products<In, Acc, TIn, BLOCK_I, BLOCK_J>(Pw, ldOp, kCubeChunk, x, y, a0, I, b0, J,
                                                           col0 + ch * kCubeChunk, D);
        __syncthreads();
        TileFor<Policy, BLOCK_K, kCubeChunk> v;
        v.load(V + ch * kCubeChunk, ldV);
        v.template mma<false>(Gt, ldGt, Pw, ldOp, BP);
        v.store(V + ch * kCubeChunk, ldV);
        __syncthreads();
      }
    }
  }
  for (int e = t; e < BLOCK_K * cols; e += kThreads) {
    const int kk = e / cols;
    const int dd = e % cols;
    if (k0 + kk < K) dz_part[(is * K + k0 + kk) * D + col0 + dd] = V[kk * ldV + dd];
  }
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                           int64_t D, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part, T* La,
                           T* Lb, T* Lc, cudaStream_t stream) {
  if (plan.smem != forward_layout(Policy::cfg).total || plan.ctas < 1 || plan.ctas > INT32_MAX) {
    return cudaErrorInvalidValue;  // the plan was made for another mode
  }
  auto forward_pass = cube_forward_kernel<T, TIn, Policy>;
  cudaError_t err = cudaFuncSetAttribute(forward_pass, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.smem));
  if (err != cudaSuccess) return err;
  const T minus_inf = -std::numeric_limits<T>::infinity();
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * J), 0, stream, Lb_part, plan.ctas * J, minus_inf);
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * J), 0, stream, Lb_part + plan.ctas * J, plan.ctas * J, T(0));
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * K), 0, stream, Lc_part, plan.ctas * K, minus_inf);
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * K), 0, stream, Lc_part + plan.ctas * K, plan.ctas * K, T(0));
  SK_LAUNCH(forward_pass, static_cast<unsigned>(plan.ctas), plan.smem, stream, x, y, z, tau, I, J, K, D, plan,
                                                                             La_part, Lb_part, Lc_part);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(I), 0, stream, La_part, plan.num_js, I, La);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(J), 0, stream, Lb_part, plan.ctas, J, Lb);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(K), 0, stream, Lc_part, plan.ctas, K, Lc);
  return cudaGetLastError();
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb,
                            const T* Lc, const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J, int64_t K,
                            int64_t D, const CubeBackwardPlan& plan, T* work, TIn* dx, TIn* dy, TIn* dz, T* dtau,
                            cudaStream_t stream) {
  constexpr TileConfig c = Policy::cfg;
  if (plan.pair_smem != cube_backward_layout(c, plan.slab, false).total ||
      plan.z_smem != cube_backward_layout(c, plan.slab, true).total || plan.pair_units > INT32_MAX ||
      plan.z_units > INT32_MAX) {
    return cudaErrorInvalidValue;  // the plan was made for another mode
  }
  auto pairs_pass = cube_backward_pairs_kernel<T, TIn, Policy>;
  auto z_pass = cube_backward_z_kernel<T, TIn, Policy>;
  cudaError_t err = cudaFuncSetAttribute(pairs_pass, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.pair_smem));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(z_pass, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.z_smem));
  if (err != cudaSuccess) return err;
  T* dx_part = work + plan.dx_part;
  T* dy_part = work + plan.dy_part;
  T* dz_part = work + plan.dz_part;
  T* dtau_part = work + plan.dtau_part;
  // dx_part and dy_part accumulate (each row in one unit); dz_part is written once.
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.dz_part), 0, stream, work, plan.dz_part, T(0));
  SK_LAUNCH(pairs_pass, static_cast<unsigned>(plan.pair_units), plan.pair_smem, stream, x, y, z, tau, La, Lb, Lc,
            gLa, gLb, gLc, I, J, K, D, plan, dx_part, dy_part);
  SK_LAUNCH(z_pass, static_cast<unsigned>(plan.z_units), plan.z_smem, stream, x, y, z, tau, La, Lb, Lc, gLa, gLb,
            gLc, I, J, K, D, plan, dz_part);
  auto reduce = reduce_parts_kernel<T, TIn>;
  // dx = tau * sum_js dx_part and dtau = sum_i <x[i], dx[i]> / tau (docs/math.md section 2).
  SK_LAUNCH(reduce, static_cast<unsigned>(plan.reduce_ctas), 0, stream, dx_part,
            plan.pair_js, I * D, tau, x, dx, dtau_part);
  SK_LAUNCH(reduce, grid_for(J * D), 0, stream, dy_part, plan.pair_is, J * D, tau,
            static_cast<const TIn*>(nullptr), dy, static_cast<T*>(nullptr));
  SK_LAUNCH(reduce, grid_for(K * D), 0, stream, dz_part, plan.z_is, K * D, tau,
            static_cast<const TIn*>(nullptr), dz, static_cast<T*>(nullptr));
  SK_LAUNCH(sum_kernel<T>, 1, 0, stream, dtau_part, plan.reduce_ctas, dtau);
  return cudaGetLastError();
}

}  // namespace

// The policy: with_policy (static_switch.h).
template <typename T, typename TIn>
cudaError_t cube_lse_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                             int64_t D, int mode, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part,
                             T* La, T* Lb, T* Lc, cudaStream_t stream) {
  return with_policy<T, TIn>(mode, [&](auto policy) {
    return launch_forward<T, TIn, decltype(policy)>(x, y, z, tau, I, J, K, D, plan, La_part, Lb_part, Lc_part, La,
                                                    Lb, Lc, stream);
  });
}

template <typename T, typename TIn>
cudaError_t cube_lse_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb,
                              const T* Lc, const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J,
                              int64_t K, int64_t D, int mode, const CubeBackwardPlan& plan, T* workspace, TIn* dx,
                              TIn* dy, TIn* dz, T* dtau, cudaStream_t stream) {
  return with_policy<T, TIn>(mode, [&](auto policy) {
    return launch_backward<T, TIn, decltype(policy)>(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, plan,
                                                     workspace, dx, dy, dz, dtau, stream);
  });
}

#define SK_INSTANTIATE(T, TIn)                                                                                      \
  template cudaError_t cube_lse_forward<T, TIn>(const TIn*, const TIn*, const TIn*, const T*, int64_t, int64_t,     \
                                                int64_t, int64_t, int, const CubeForwardPlan&, T*, T*, T*, T*, T*, \
                                                T*, cudaStream_t);                                                  \
  template cudaError_t cube_lse_backward<T, TIn>(const TIn*, const TIn*, const TIn*, const T*, const T*, const T*, \
                                                 const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                                 int64_t, int, const CubeBackwardPlan&, T*, TIn*, TIn*, TIn*, T*, \
                                                 cudaStream_t);
SK_INSTANTIATE(float, float)
SK_INSTANTIATE(double, double)
SK_INSTANTIATE(float, __nv_bfloat16)
SK_INSTANTIATE(float, __half)
#undef SK_INSTANTIATE

}  // namespace symile_cuda
