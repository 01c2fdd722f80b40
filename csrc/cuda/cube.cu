// The M = 3 cube kernels (docs/math.md section 2): La, Lb, Lc by online log-sum-exp over
// tiles, and dx, dy, dz, dtau recomputed from the saved LSE vectors. The cube is
// never written to memory. Blueprint: symile_kernels/chunked.py.
//
// A tile is BP = BLOCK_I * BLOCK_J (i, j) pairs against BLOCK_K rows of z: the
// pairs' row products x[i] * y[j] (built in shared memory, BLOCK_D columns at a
// time) times z^T, on tensor cores (mma.sync or WMMA) or SIMT FMAs. Every output row has one
// owning CTA and partial LSEs are combined in a fixed order: no float atomics,
// results are deterministic on a given GPU.
#include <limits>

#include "launch.h"
#include "static_switch.h"
#include "tile.cuh"

namespace symile_cuda {
namespace {

// The logits' raw products S[p, k] = sum_d (x[a0 + p / BJ] * y[b0 + p % BJ])[d] z[k0 + k][d] of
// a BP x BLOCK_K tile over the full d (BLOCK_D columns per step), stored to S (ld ldS); Cd
// holds kOperandStages buffers of z rows (tile_products). ldPf > 0: P already holds the
// pairs' products over all of d (ld ldPf; the forward builds them once per pair block); else
// P takes one BLOCK_D chunk of them per step (ld ldP), rebuilt for every tile. STAGES: Cd's
// buffers (tile_products; the backward passes take one, plan.h kCubeBackwardStages).
template <typename Policy, typename TIn, int BI, int BJ, int BK, int BD, int STAGES = kOperandStages>
__device__ __forceinline__ void cube_tile_products(const TIn* __restrict__ x, const TIn* __restrict__ y,
                                                   const TIn* __restrict__ z, int64_t a0, int64_t NA, int64_t b0,
                                                   int64_t NB, int64_t k0, int64_t NC, int64_t D,
                                                   typename Policy::In* P, typename Policy::In* Cd, int ldP,
                                                   typename Policy::Acc* S, int ldS, int ldPf = 0) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  tile_products<Policy, BI * BJ, BK, BD, STAGES>(
      D,
      [&](int64_t d0) -> const In* {
        if (ldPf > 0) return P + d0;
        load_pair_products<In, Acc, TIn, BI, BJ>(P, ldP, BD, x, y, a0, NA, b0, NB, d0, D);
        return P;
      },
      [&](int64_t d0, In* dst) { load_rows_async<In, Acc>(dst, ldP, BK, BD, z, k0, NC, d0, D); },
      ldPf > 0 ? ldPf : ldP, Cd, tile_bytes(BK, BD, Policy::cfg.pad_in, Policy::cfg.in_size), ldP, S, ldS);
}

template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads, kMinCtasCubeForward)
    cube_forward_kernel(const TIn* __restrict__ x, const TIn* __restrict__ y, const TIn* __restrict__ z,
                        const T* __restrict__ tau_ptr, int64_t I, int64_t J, int64_t K, int64_t D,
                        CubeForwardPlan plan, T* __restrict__ La_part, T* __restrict__ Lb_part,
                        T* __restrict__ Lc_part) {
  using Tl = ForwardTiles<Policy>;
  using Acc = typename Tl::Acc;
  static_assert(std::is_same<Acc, T>::value, "partial LSEs are stored in the tensors' dtype");
  constexpr int BLOCK_I = Tl::BI, BLOCK_J = Tl::BJ, BLOCK_K = Tl::BK, BP = Tl::BP, ldS = Tl::ldS;
  static_assert(BLOCK_I <= 32 && BLOCK_J <= 32 && BP <= kThreads, "per-row bookkeeping uses one thread per row");
  SK_DYNAMIC_SMEM(smem);
  const Tl s(smem, plan.p_cols);
  Acc *S = s.S, *pair_m = s.pair_m, *pair_s = s.pair_s, *row_M = s.row_M, *row_S = s.row_S;
  // Full products: P holds the pair block's x[i] * y[j] over all of d (ld ldPf), built once per
  // pair block and read by every tile of z rows (plan.h CubeForwardPlan).
  const int ldPf = plan.full_products ? plan.p_cols + Tl::c.pad_in : 0;

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
      // Visible after the barrier in tile_products; the previous pair block's last reads of P
      // ended before the barrier that closed its k loop.
      if (ldPf > 0) {
        load_pair_products<typename Tl::In, Acc, TIn, BLOCK_I, BLOCK_J>(s.P, ldPf, plan.p_cols, x, y, i0, I, j0, J,
                                                                        0, D);
      }
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK_K) {
        cube_tile_products<Policy, TIn, BLOCK_I, BLOCK_J, BLOCK_K, Tl::BD>(x, y, z, i0, I, j0, J, k0, K, D, s.P, s.Z,
                                                                           Tl::ldP, S, ldS, ldPf);
        // Logits tau * T; entries outside the cube (or of pairs in another j-split) are -inf.
        for (int e = t; e < BP * BLOCK_K; e += kThreads) {
          const int p = e / BLOCK_K;
          const int kk = e % BLOCK_K;
          const bool valid = i0 + p / BLOCK_J < I && j0 + p % BLOCK_J < j_end && k0 + kk < K;
          S[p * ldS + kk] = valid ? tau * S[p * ldS + kk] : neg_inf<Acc>();
        }
        __syncthreads();
        // Every valid row and column holds at least one finite logit (pair (i0, j0), column k0).
        tile_lse_shared<Acc, BP, BLOCK_K>(S, ldS, s.colm, s.colo, s.cols, s.roww, pair_m, pair_s);
        if (t < BLOCK_K && k0 + t < K) merge_running(Lc_M[k0 + t], Lc_S[k0 + t], s.colo[t], s.cols[t]);
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

// The cube backward's inputs, one kernel argument for both passes.
template <typename T, typename TIn>
struct CubeBackwardArgs {
  const TIn *x, *y, *z;
  const T *tau, *La, *Lb, *Lc, *gLa, *gLb, *gLc;
  int64_t I, J, K, D;
  CubeBackwardPlan plan;
};

// A backward unit (CTA) of a pass with `splits` splits: blockIdx.x = (outer * splits + split)
// * num_slabs + slab; the slab is columns [col0, col0 + cols), chunks kCubeChunk-wide chunks.
struct Unit {
  int64_t outer, split, col0;
  int cols, chunks;
  __device__ Unit(const CubeBackwardPlan& plan, int64_t splits, int64_t D) {
    const int64_t unit = blockIdx.x;
    outer = unit / (plan.num_slabs * splits);
    split = (unit / plan.num_slabs) % splits;
    col0 = (unit % plan.num_slabs) * plan.slab;
    cols = static_cast<int>(D - col0 < plan.slab ? D - col0 : plan.slab);
    chunks = static_cast<int>(ceil_div(cols, kCubeChunk));
  }
};

// The backward passes' tile sizes (plan.h cube_backward_config: 32 pair rows in pass "pairs",
// BLOCK_K / 2 rows of z in pass "z") and shared-memory regions (plan.h cube_backward_layout):
// Op is the contraction's operand chunk (rows of z in pass "pairs", pair products in pass
// "z"), W its accumulators (BP x slab, or BLOCK_K x slab), G the weights (transposed in "z");
// with plan.full_products, Pf holds a pair block's row products over all of d (ld ldPf; else
// ldPf = 0). Also the pass's tau (read from its device scalar).
template <typename Policy, typename T, bool Z_PASS>
struct BackwardTiles {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  static constexpr TileConfig c = cube_backward_config(Policy::cfg, Z_PASS);
  static constexpr int BI = c.BLOCK_I, BJ = c.BLOCK_J, BK = c.BLOCK_K, BD = c.BLOCK_D, BP = BI * BJ;
  static constexpr int ldS = BK + c.pad_acc, ldP = BD + c.pad_in;
  static_assert(std::is_same<Acc, T>::value, "partial gradients are stored in the compute dtype");
  static_assert(BP <= kThreads && BK <= kThreads, "per-row bookkeeping uses one thread per row");
  static constexpr int ldOp = kCubeChunk + c.pad_in;
  Acc *S, *W, *LA, *gA, *LB, *gB, *ref, *arow, *u, *LC, *gC, *bcol;
  In *G, *P, *Cd, *Op, *Pf;
  int ldW, ldPf;
  Acc tau;
  Unit unit;

  // splits: the pass's split count (plan.pair_is or plan.z_is).
  __device__ BackwardTiles(const CubeBackwardPlan& plan, const T* tau_ptr, int64_t splits, int64_t D)
      : tau(static_cast<Acc>(*tau_ptr)), unit(plan, splits, D) {
    SK_DYNAMIC_SMEM(smem);
    const int64_t slab = plan.slab;
    constexpr TileConfig base = Policy::cfg;  // a local copy: the static member may not be ODR-used in device code
    const CubeBackwardLayout l = cube_backward_layout(base, slab, Z_PASS, plan.p_cols);
    Acc** acc[] = {&S, &W, &LA, &gA, &LB, &gB, &ref, &arow, &u, &LC, &gC, &bcol};
    const std::size_t acc_at[] = {l.S, l.W, l.LA, l.gA, l.LB, l.gB, l.ref, l.arow, l.u, l.LC, l.gC, l.bcol};
    for (int q = 0; q < 12; ++q) *acc[q] = reinterpret_cast<Acc*>(smem + acc_at[q]);
    In** in[] = {&G, &P, &Cd, &Op, &Pf};
    const std::size_t in_at[] = {l.G, l.P, l.Cd, l.Op, l.Pf};
    for (int q = 0; q < 5; ++q) *in[q] = reinterpret_cast<In*>(smem + in_at[q]);
    ldW = static_cast<int>(slab) + c.pad_acc;
    ldPf = plan.full_products ? plan.p_cols + c.pad_in : 0;
  }
};

// G of the tile (pairs of i-block a0 and j-block b0) x (rows k0.. of z) in s.G (TRANSPOSED:
// k-major, ld ldG), the logits recomputed over the full d; c0 from pair_factors.
template <bool TRANSPOSED, typename Policy, typename T, typename TIn>
__device__ __forceinline__ void tile_weights(const BackwardTiles<Policy, T, TRANSPOSED>& s,
                                             const CubeBackwardArgs<T, TIn>& a, int64_t a0, int64_t b0, int64_t k0,
                                             T c0, int ldG) {
  using Tl = BackwardTiles<Policy, T, TRANSPOSED>;
  cube_tile_products<Policy, TIn, Tl::BI, Tl::BJ, Tl::BK, Tl::BD, kCubeBackwardStages>(
      a.x, a.y, a.z, a0, a.I, b0, a.J, k0, a.K, a.D, s.ldPf > 0 ? s.Pf : s.P, s.Cd, Tl::ldP, s.S, Tl::ldS, s.ldPf);
  tile_G<typename Tl::In, T, Tl::BP, Tl::BK, TRANSPOSED>(s.S, Tl::ldS, s.tau, s.ref, s.arow, s.u, c0, s.LC, s.gC, k0,
                                                         a.K, s.bcol, s.G, ldG);
}

// W[:, chunk ch] += G (BM x kred, ld ldG) times the operand chunk Op (kred x kCubeChunk, ld
// ldOp: s.Op, or the chunk's columns of s.Pf), the accumulators resumed from and returned to
// shared memory. Every thread calls after staging Op; the barriers order the staging before
// and the next staging after.
template <int BM, typename Policy, typename T, bool Z_PASS>
__device__ __forceinline__ void contract_chunk(const BackwardTiles<Policy, T, Z_PASS>& s, int ch, int ldG, int kred,
                                               const typename Policy::In* Op, int ldOp) {
  __syncthreads();
  TileFor<Policy, BM, kCubeChunk> w;
  w.load(s.W + ch * kCubeChunk, s.ldW);
  w.template mma<false>(s.G, ldG, Op, ldOp, kred);
  w.store(s.W + ch * kCubeChunk, s.ldW);
  __syncthreads();
}

// Backward pass "pairs" (plan.h CubeBackwardPlan): unit (is, js, sl) accumulates, per
// (i-block, j-block) of its splits, W[(i, j), slab] = sum_k G[i, j, k] z[k, slab] over
// every k (the logits recomputed once), then adds sum_j y[j] * W to dx_part[js, i, slab]
// and sum_i x[i] * W to dy_part[is, j, slab] (its own rows: zero-filled by the launcher).
template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads, kMinCtasCubePairs)
    cube_backward_pairs_kernel(CubeBackwardArgs<T, TIn> args, T* __restrict__ dx_part, T* __restrict__ dy_part) {
  using Tl = BackwardTiles<Policy, T, false>;
  using Acc = typename Tl::Acc;
  constexpr int BLOCK_I = Tl::BI, BLOCK_J = Tl::BJ, BLOCK_K = Tl::BK, BP = Tl::BP, ldG = BLOCK_K + Tl::c.pad_in;
  const auto [x, y, z, tau_ptr, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, plan] = args;
  const Tl s(plan, tau_ptr, plan.pair_is, D);
  const Unit& sl = s.unit;
  const int64_t is = sl.split, js = sl.outer;  // outer: the j-split

  const int64_t ib_end = split_begin(is + 1, plan.num_ib, plan.pair_is);
  const int64_t jb_begin = split_begin(js, plan.num_jb, plan.pair_js);
  const int64_t jb_end = split_begin(js + 1, plan.num_jb, plan.pair_js);
  for (int64_t ib = split_begin(is, plan.num_ib, plan.pair_is); ib < ib_end; ++ib) {
    const int64_t a0 = ib * BLOCK_I;
    load_vectors(s.LA, s.gA, La, gLa, a0, I, BLOCK_I);
    for (int64_t jb = jb_begin; jb < jb_end; ++jb) {
      const int64_t b0 = jb * BLOCK_J;
      load_vectors(s.LB, s.gB, Lb, gLb, b0, J, BLOCK_J);
      for (int e = opaque_tid(); e < BP * s.ldW; e += kThreads) s.W[e] = Acc(0);
      __syncthreads();
      const Acc c0 = pair_factors<Acc, BLOCK_I, BLOCK_J>(s.LA, s.gA, s.LB, s.gB, a0, I, b0, J, s.ref, s.arow, s.u);
      // Full products: built once per pair block, read by every tile of z rows (visible after the
      // barrier in tile_products; the previous block's last reads ended before this block's barriers).
      if (s.ldPf > 0) {
        load_pair_products<typename Tl::In, Acc, TIn, BLOCK_I, BLOCK_J, 1>(s.Pf, s.ldPf, plan.p_cols, x, y, a0, I, b0,
                                                                           J, 0, D);
      }
      for (int64_t k0 = 0; k0 < K; k0 += BLOCK_K) {
        load_vectors(s.LC, s.gC, Lc, gLc, k0, K, BLOCK_K);
        tile_weights<false>(s, args, a0, b0, k0, c0, ldG);
        // W[:, chunk] += G z[k0 : k0 + BLOCK_K, chunk], the accumulators resumed from shared memory.
        for (int ch = 0; ch < sl.chunks; ++ch) {
          load_rows<typename Tl::In, Acc, TIn, 1>(s.Op, Tl::ldOp, BLOCK_K, kCubeChunk, z, k0, K,
                                                  sl.col0 + ch * kCubeChunk, D);
          contract_chunk<BP>(s, ch, ldG, BLOCK_K, s.Op, Tl::ldOp);
        }
      }
      // dx_part[js, i] += sum_j y[j] * W[(i, j)] and dy_part[is, j] += sum_i x[i] * W[(i, j)].
      for (int e = opaque_tid(); e < (BLOCK_I + BLOCK_J) * sl.cols; e += kThreads) {
        const int r = e / sl.cols;
        const int dd = e % sl.cols;
        const int64_t col = sl.col0 + dd;
        // Row r < BLOCK_I is x's row a0 + r against the j-block; the others y's rows against the i-block.
        const bool is_x = r < BLOCK_I;
        const int own = is_x ? r : r - BLOCK_I;
        const int64_t row = (is_x ? a0 : b0) + own;
        if (row < (is_x ? I : J)) {
          const TIn* other = is_x ? y : x;
          const int64_t o0 = is_x ? b0 : a0, o_end = is_x ? J : I;
          Acc v = Acc(0);
          for (int q = 0; q < (is_x ? BLOCK_J : BLOCK_I) && o0 + q < o_end; ++q) {
            const int p = is_x ? own * BLOCK_J + q : q * BLOCK_J + own;
            v += to_acc<Acc>(other[(o0 + q) * D + col]) * s.W[p * s.ldW + dd];
          }
          T* out = is_x ? dx_part + (js * I + row) * D : dy_part + (is * J + row) * D;
          out[col] += v;
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
__global__ void __launch_bounds__(kThreads, kMinCtasCubeZ)
    cube_backward_z_kernel(CubeBackwardArgs<T, TIn> args, T* __restrict__ dz_part) {
  using Tl = BackwardTiles<Policy, T, true>;
  constexpr int BLOCK_I = Tl::BI, BLOCK_J = Tl::BJ, BLOCK_K = Tl::BK, BP = Tl::BP, ldGt = BP + Tl::c.pad_in;
  const auto [x, y, z, tau_ptr, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, plan] = args;
  const Tl s(plan, tau_ptr, plan.z_is, D);
  const int64_t is = s.unit.split, k0 = s.unit.outer * BLOCK_K;  // outer: the k-block
  const Unit& sl = s.unit;

  load_vectors(s.LC, s.gC, Lc, gLc, k0, K, BLOCK_K);
  for (int e = opaque_tid(); e < BLOCK_K * s.ldW; e += kThreads) s.W[e] = T(0);
  const int64_t ib_end = split_begin(is + 1, plan.z_num_ib, plan.z_is);
  for (int64_t ib = split_begin(is, plan.z_num_ib, plan.z_is); ib < ib_end; ++ib) {
    const int64_t a0 = ib * BLOCK_I;
    for (int64_t b0 = 0; b0 < J; b0 += BLOCK_J) {
      load_vectors(s.LA, s.gA, La, gLa, a0, I, BLOCK_I);
      load_vectors(s.LB, s.gB, Lb, gLb, b0, J, BLOCK_J);
      __syncthreads();
      const T c0 = pair_factors<T, BLOCK_I, BLOCK_J>(s.LA, s.gA, s.LB, s.gB, a0, I, b0, J, s.ref, s.arow, s.u);
      // Full products: built once per pair block for the logits and the contraction (the previous
      // block's contraction ended with a barrier; tile_products' barrier shows them).
      if (s.ldPf > 0) {
        load_pair_products<typename Tl::In, T, TIn, BLOCK_I, BLOCK_J, 1>(s.Pf, s.ldPf, plan.p_cols, x, y, a0, I, b0,
                                                                         J, 0, D);
      }
      tile_weights<true>(s, args, a0, b0, k0, c0, ldGt);
      // V[:, chunk] += G^T (x * y)[pairs, chunk], V (in W) resumed from shared memory.
      for (int ch = 0; ch < sl.chunks; ++ch) {
        if (s.ldPf > 0) {
          contract_chunk<BLOCK_K>(s, ch, ldGt, BP, s.Pf + sl.col0 + ch * kCubeChunk, s.ldPf);
        } else {
          load_pair_products<typename Tl::In, T, TIn, BLOCK_I, BLOCK_J, 1>(s.Op, Tl::ldOp, kCubeChunk, x, y, a0, I,
                                                                           b0, J, sl.col0 + ch * kCubeChunk, D);
          contract_chunk<BLOCK_K>(s, ch, ldGt, BP, s.Op, Tl::ldOp);
        }
      }
    }
  }
  for (int e = opaque_tid(); e < BLOCK_K * sl.cols; e += kThreads) {
    const int kk = e / sl.cols;
    const int dd = e % sl.cols;
    if (k0 + kk < K) dz_part[(is * K + k0 + kk) * D + sl.col0 + dd] = s.W[kk * s.ldW + dd];
  }
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                           int64_t D, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part, double* La,
                           double* Lb, double* Lc, cudaStream_t stream) {
  constexpr TileConfig c = Policy::cfg;
  if (plan.smem != forward_layout(c, plan.p_cols).total || plan.ctas < 1 || plan.ctas > INT32_MAX ||
      plan.p_cols % c.BLOCK_D != 0 || (plan.full_products ? plan.p_cols < D : plan.p_cols != c.BLOCK_D)) {
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
  if (plan.pair_smem != cube_backward_layout(c, plan.slab, false, plan.p_cols).total ||
      plan.z_smem != cube_backward_layout(c, plan.slab, true, plan.p_cols).total ||
      (plan.full_products ? plan.p_cols < D || plan.p_cols % kCubeChunk != 0 : plan.p_cols != 0) ||
      plan.pair_units > INT32_MAX ||
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
  const CubeBackwardArgs<T, TIn> args{x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, plan};
  SK_LAUNCH(pairs_pass, static_cast<unsigned>(plan.pair_units), plan.pair_smem, stream, args, dx_part, dy_part);
  SK_LAUNCH(z_pass, static_cast<unsigned>(plan.z_units), plan.z_smem, stream, args, dz_part);
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
                             double* La, double* Lb, double* Lc, cudaStream_t stream) {
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
                                                int64_t, int64_t, int, const CubeForwardPlan&, T*, T*, T*, double*, \
                                                double*, double*, cudaStream_t);                                   \
  template cudaError_t cube_lse_backward<T, TIn>(const TIn*, const TIn*, const TIn*, const T*, const T*, const T*, \
                                                 const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                                 int64_t, int, const CubeBackwardPlan&, T*, TIn*, TIn*, TIn*, T*, \
                                                 cudaStream_t);
SK_FOR_EACH_ROW_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace symile_cuda
