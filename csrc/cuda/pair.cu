// The pair LSE kernels (docs/math.md section 3, "n" sampling, and the M = 2 / CLIP loss):
// for a (I, d) and b (J, d) with I <= J, L[i] = LSE_j l[i, j] over the J columns with
// l[i, j] = tau <a[i], b[j]> off the diagonal and l[i, i] = pos[i], tiled over BLOCK_K
// columns so the I x J logits never exist. (I < J in distributed runs: local rows
// against the global batch, rotated so that row i's positive is column i.)
// Blueprint: symile_kernels/chunked.py (pair_lse_forward/backward). Each CTA owns
// BP rows of its output: deterministic, no float atomics.
#include <initializer_list>

#include "launch.h"
#include "static_switch.h"
#include "tile.cuh"

namespace symile_cuda {
namespace {

// The raw products S[r, k] = <A[a0 + r], B[b0 + k]> of a BP x BLOCK_K tile over the full d.
// ASYNC: B's rows double-buffered through cp.async (load_rows_async, tile_products); the
// backward keeps one synchronous buffer (plan.h backward_layout), its W accumulators leaving
// no registers for copies in flight under its 128-register plan.
template <typename Policy, typename TIn, bool ASYNC>
__device__ __forceinline__ void pair_tile_products(const TIn* __restrict__ A, int64_t a0, int64_t NA,
                                                   const TIn* __restrict__ B, int64_t b0, int64_t NB, int64_t D,
                                                   typename Policy::In* P, typename Policy::In* Cd,
                                                   typename Policy::Acc* S) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  constexpr TileConfig c = Policy::cfg;
  constexpr int BP = c.BLOCK_I * c.BLOCK_J, BK = c.BLOCK_K, BD = c.BLOCK_D, ldP = BD + c.pad_in;
  tile_products<Policy, BP, BK, BD, ASYNC ? kOperandStages : 1>(
      D,
      [&](int64_t d0) -> const In* {
        load_rows<In, Acc>(P, ldP, BP, BD, A, a0, NA, d0, D);
        return P;
      },
      [&](int64_t d0, In* dst) {
        if constexpr (ASYNC) {
          load_rows_async<In, Acc>(dst, ldP, BK, BD, B, b0, NB, d0, D);
        } else {
          load_rows<In, Acc>(dst, ldP, BK, BD, B, b0, NB, d0, D);
        }
      },
      ldP, Cd, tile_bytes(BK, BD, c.pad_in, c.in_size), ldP, S, BK + c.pad_acc);
}

template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads, kMinCtasPairForward)
    pair_forward_kernel(const TIn* __restrict__ a, const TIn* __restrict__ b, const T* __restrict__ pos,
                        const T* __restrict__ tau_ptr, int64_t I, int64_t J, int64_t D, PairPlan plan,
                        T* __restrict__ L_part) {
  using Tl = ForwardTiles<Policy>;
  using Acc = typename Tl::Acc;
  constexpr int BP = Tl::BP, BLOCK_K = Tl::BK, ldS = Tl::ldS;
  SK_DYNAMIC_SMEM(smem);
  const Tl s(smem);
  Acc *S = s.S, *row_m = s.pair_m, *row_s = s.pair_s;

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t sp = blockIdx.x % plan.f_splits;
  const int64_t r0 = blockIdx.x / plan.f_splits * BP;
  if (t < BP) {
    row_m[t] = neg_inf<Acc>();
    row_s[t] = Acc(0);
  }
  // Split sp's column blocks (BLOCK_K-aligned, so no tile straddles two splits).
  const int64_t c_end = split_begin(sp + 1, plan.f_col_blocks, plan.f_splits) * BLOCK_K;
  for (int64_t c0 = split_begin(sp, plan.f_col_blocks, plan.f_splits) * BLOCK_K; c0 < c_end && c0 < J;
       c0 += BLOCK_K) {
    pair_tile_products<Policy, TIn, true>(a, r0, I, b, c0, J, D, s.P, s.Z, S);
    for (int e = t; e < BP * BLOCK_K; e += kThreads) {
      const int r = e / BLOCK_K;
      const int kk = e % BLOCK_K;
      const int64_t i = r0 + r;
      const int64_t j = c0 + kk;
      Acc v = neg_inf<Acc>();
      if (i < I && j < J) v = i == j ? static_cast<Acc>(pos[i]) : tau * S[r * ldS + kk];
      S[r * ldS + kk] = v;
    }
    __syncthreads();
    int row;
    Acc m, s;
    bool leader;
    tile_row_stats<Acc, BP, BLOCK_K>(S, ldS, row, m, s, leader);
    if (leader) merge_running(row_m[row], row_s[row], m, s);
    __syncthreads();
  }
  if (t < BP && r0 + t < I) {  // this split's partial LSE of row r0 + t as a (max, sum) pair
    L_part[sp * I + r0 + t] = row_m[t];
    L_part[(plan.f_splits + sp) * I + r0 + t] = row_s[t];
  }
}

// NR rows of R against NC columns of Cm. Not TRANSPOSED: R = a (I rows i), Cm = b
// (J columns j), out = da, and dpos and the dtau shares are written. TRANSPOSED:
// R = b (J rows j), Cm = a (I columns i), out = db. With P[i, j] = gL[i] e^(l[i, j] - L[i]) off the
// diagonal: da[i] = tau sum_j P[i, j] b[j], db[j] = tau sum_i P[i, j] a[i],
// dpos[i] = gL[i] e^(pos[i] - L[i]), dtau = sum_i <a[i], da[i]> / tau.
template <typename T, typename TIn, typename Policy, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads, kMinCtasPairBackward)
    pair_backward_kernel(const TIn* __restrict__ R, const TIn* __restrict__ Cm, const T* __restrict__ pos,
                         const T* __restrict__ tau_ptr, const T* __restrict__ L, const T* __restrict__ gL, int64_t NR,
                         int64_t NC, int64_t D, int64_t num_dw, int64_t splits, int64_t col_blocks,
                         T* __restrict__ out_part, T* __restrict__ dpos) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  constexpr TileConfig c = Policy::cfg;
  constexpr int BP = c.BLOCK_I * c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_DW = c.BLOCK_DW;
  static_assert(BLOCK_K <= BP, "column statistics reuse the BP-sized vectors of the layout");
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldG = BLOCK_K + c.pad_in;
  constexpr int ldCw = BLOCK_DW + c.pad_in;
  constexpr int ldW = BLOCK_DW + c.pad_acc;
  constexpr BackwardLayout lay = backward_layout(c);

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* G = reinterpret_cast<In*>(smem + lay.G);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Cd = reinterpret_cast<In*>(smem + lay.Cd);
  In* Cw = reinterpret_cast<In*>(smem + lay.Cw);
  Acc* W = reinterpret_cast<Acc*>(smem + lay.W);  // aliases S..Cw, used after the column loop only
  // Statistics of the anchor index i: per row (not TRANSPOSED) or per column (TRANSPOSED).
  Acc* L_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.LC : lay.LA));
  Acc* gL_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.gC : lay.gA));
  Acc* pos_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.gB : lay.LB));

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  // blockIdx.x = (row block * splits + split) * num_dw + column chunk.
  const int64_t unit = blockIdx.x;
  const int64_t r0 = unit / (num_dw * splits) * BP;
  const int64_t sp = (unit / num_dw) % splits;
  const int64_t dw0 = (unit % num_dw) * BLOCK_DW;
  const bool write_dpos = !TRANSPOSED && dpos != nullptr && dw0 == 0;

  if (!TRANSPOSED && t < BP) {
    const bool ok = r0 + t < NR;
    L_s[t] = ok ? static_cast<Acc>(L[r0 + t]) : Acc(0);
    gL_s[t] = ok ? static_cast<Acc>(gL[r0 + t]) : Acc(0);
    pos_s[t] = ok ? static_cast<Acc>(pos[r0 + t]) : Acc(0);
  }
  TileFor<Policy, BP, BLOCK_DW> w;
  w.zero();
  const int64_t c_end = split_begin(sp + 1, col_blocks, splits) * BLOCK_K;
  for (int64_t c0 = split_begin(sp, col_blocks, splits) * BLOCK_K; c0 < c_end && c0 < NC; c0 += BLOCK_K) {
    if (TRANSPOSED && t < BLOCK_K) {
      const bool ok = c0 + t < NC;
      L_s[t] = ok ? static_cast<Acc>(L[c0 + t]) : Acc(0);
      gL_s[t] = ok ? static_cast<Acc>(gL[c0 + t]) : Acc(0);
      pos_s[t] = ok ? static_cast<Acc>(pos[c0 + t]) : Acc(0);
    }
    pair_tile_products<Policy, TIn, false>(R, r0, NR, Cm, c0, NC, D, P, Cd, S);
    load_rows<In, Acc>(Cw, ldCw, BLOCK_K, BLOCK_DW, Cm, c0, NC, dw0, D);
    __syncthreads();
#pragma unroll 4
    for (int e = t; e < BP * BLOCK_K; e += kThreads) {
      const int r = e / BLOCK_K;
      const int kk = e % BLOCK_K;
      const int64_t row = r0 + r;
      const int64_t col = c0 + kk;
      Acc g = Acc(0);
      if (row < NR && col < NC) {
        const int q = TRANSPOSED ? kk : r;  // where anchor i's statistics sit
        // l[i, j] <= L[i] up to rounding, so the exponent cannot overflow at tau = 100.
        if (row == col) {
          const Acc diag = gL_s[q] * exp_(pos_s[q] - L_s[q]);
          if (write_dpos) dpos[row] = static_cast<T>(diag);
        } else {
          g = gL_s[q] * exp_(tau * S[r * ldS + kk] - L_s[q]);
        }
      }
      G[r * ldG + kk] = to_in<In, Acc>(g);
    }
    __syncthreads();
    w.template mma<false>(G, ldG, Cw, ldCw, BLOCK_K);
    __syncthreads();
  }
  w.store(W, ldW);
  __syncthreads();
  // This split's share of the row's gradient (unscaled), summed over splits by reduce_parts_kernel.
  for (int e = t; e < BP * BLOCK_DW; e += kThreads) {
    const int64_t row = r0 + e / BLOCK_DW, col = dw0 + e % BLOCK_DW;
    if (row < NR && col < D) out_part[(sp * NR + row) * D + col] = W[(e / BLOCK_DW) * ldW + e % BLOCK_DW];
  }
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D,
                           const PairPlan& plan, T* L_part, double* L, cudaStream_t stream) {
  if (plan.forward_smem != forward_layout(Policy::cfg).total || plan.f_units > INT32_MAX) {
    return cudaErrorInvalidValue;  // the plan was made for another mode
  }
  auto forward_pass = pair_forward_kernel<T, TIn, Policy>;
  cudaError_t err = cudaFuncSetAttribute(forward_pass, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.forward_smem));
  if (err != cudaSuccess) return err;
  SK_LAUNCH(forward_pass, static_cast<unsigned>(plan.f_units), plan.forward_smem, stream, a, b, pos, tau, I, J, D,
            plan, L_part);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(I), 0, stream, L_part, plan.f_splits, I, L);
  return cudaGetLastError();
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL,
                            int64_t I, int64_t J, int64_t D, const PairPlan& plan, T* work, TIn* da, TIn* db,
                            T* dpos, T* dtau, cudaStream_t stream) {
  if (plan.backward_smem != backward_layout(Policy::cfg).total || plan.a_units > INT32_MAX ||
      plan.b_units > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  auto rows_pass = pair_backward_kernel<T, TIn, Policy, false>;
  auto cols_pass = pair_backward_kernel<T, TIn, Policy, true>;
  for (auto kernel : {rows_pass, cols_pass}) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.backward_smem));
    if (err != cudaSuccess) return err;
  }
  T* da_part = work + plan.da_part;
  T* db_part = work + plan.db_part;
  T* dtau_part = work + plan.dtau_part;
  SK_LAUNCH(rows_pass, static_cast<unsigned>(plan.a_units), plan.backward_smem, stream, a, b, pos, tau, L, gL, I, J,
            D, plan.num_dw, plan.a_splits, plan.a_col_blocks, da_part, dpos);
  SK_LAUNCH(cols_pass, static_cast<unsigned>(plan.b_units), plan.backward_smem, stream, b, a, pos, tau, L, gL, J, I,
            D, plan.num_dw, plan.b_splits, plan.b_col_blocks, db_part, static_cast<T*>(nullptr));
  // da = tau * sum_sp da_part, dtau = sum_i <a[i], da[i]> / tau; db likewise without dtau.
  auto reduce = reduce_parts_kernel<T, TIn>;
  SK_LAUNCH(reduce, static_cast<unsigned>(plan.reduce_ctas), 0, stream, da_part, plan.a_splits, I * D, tau, a, da,
            dtau_part);
  SK_LAUNCH(reduce, grid_for(J * D), 0, stream, db_part, plan.b_splits, J * D, tau, static_cast<const TIn*>(nullptr),
            db, static_cast<T*>(nullptr));
  SK_LAUNCH(sum_kernel<T>, 1, 0, stream, dtau_part, plan.reduce_ctas, dtau);
  return cudaGetLastError();
}

}  // namespace

// The policy: with_policy (static_switch.h).
template <typename T, typename TIn>
cudaError_t pair_lse_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D,
                             int mode, const PairPlan& plan, T* L_part, double* L, cudaStream_t stream) {
  return with_policy<T, TIn>(mode, [&](auto policy) {
    return launch_forward<T, TIn, decltype(policy)>(a, b, pos, tau, I, J, D, plan, L_part, L, stream);
  });
}

template <typename T, typename TIn>
cudaError_t pair_lse_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL,
                              int64_t I, int64_t J, int64_t D, int mode, const PairPlan& plan, T* workspace, TIn* da,
                              TIn* db, T* dpos, T* dtau, cudaStream_t stream) {
  return with_policy<T, TIn>(mode, [&](auto policy) {
    return launch_backward<T, TIn, decltype(policy)>(a, b, pos, tau, L, gL, I, J, D, plan, workspace, da, db, dpos,
                                                     dtau, stream);
  });
}

#define SK_INSTANTIATE(T, TIn)                                                                                   \
  template cudaError_t pair_lse_forward<T, TIn>(const TIn*, const TIn*, const T*, const T*, int64_t, int64_t,    \
                                                int64_t, int, const PairPlan&, T*, double*, cudaStream_t);       \
  template cudaError_t pair_lse_backward<T, TIn>(const TIn*, const TIn*, const T*, const T*, const T*, const T*, \
                                                 int64_t, int64_t, int64_t, int, const PairPlan&, T*, TIn*, TIn*, \
                                                 T*, T*, cudaStream_t);
SK_FOR_EACH_ROW_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace symile_cuda
