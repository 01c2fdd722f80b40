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
  Acc* row_l = reinterpret_cast<Acc*>(smem + lay.row_l);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  // This CTA's rows of the partial buffers (initialised to -inf by the launcher).
  T* Lb_row = Lb_part + static_cast<int64_t>(blockIdx.x) * J;
  T* Lc_row = Lc_part + static_cast<int64_t>(blockIdx.x) * K;

  for (int64_t u = blockIdx.x; u < plan.units; u += gridDim.x) {
    const int64_t ib = u / plan.num_js;
    const int64_t js = u % plan.num_js;
    const int64_t i0 = ib * BLOCK_I;
    const int64_t j_begin = split_begin(js, plan.num_jb, plan.num_js) * BLOCK_J;
    const int64_t j_split_end = split_begin(js + 1, plan.num_jb, plan.num_js) * BLOCK_J;
    const int64_t j_end = j_split_end < J ? j_split_end : J;
    if (t < BLOCK_I) row_l[t] = neg_inf<Acc>();

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
        {
          // Every valid row and column holds at least one finite logit (pair (i0, j0), column k0).
          int row;
          Acc m, s;
          bool leader;
          tile_row_stats<Acc, BP, BLOCK_K>(S, ldS, row, m, s, leader);
          if (leader) merge_running(pair_m[row], pair_s[row], m, s);
          int col;
          tile_col_stats<Acc, BP, BLOCK_K>(S, ldS, col, m, s, leader);
          if (leader && k0 + col < K) {
            const Acc tile_lse = m == neg_inf<Acc>() ? m : m + log_(s);
            Lc_row[k0 + col] = log_add_exp(Lc_row[k0 + col], tile_lse);
          }
        }
        __syncthreads();
      }
      if (t < BP) pair_m[t] = pair_m[t] == neg_inf<Acc>() ? pair_m[t] : pair_m[t] + log_(pair_s[t]);
      __syncthreads();
      // pair_m[p] is now LSE_k of pair p; fold it into Lb (over i) and La (over j).
      if (t < BLOCK_J) {
        const int64_t j = j0 + t;
        if (j < j_end) {
          Acc v = neg_inf<Acc>();
          for (int ii = 0; ii < BLOCK_I; ++ii) {
            if (i0 + ii < I) v = log_add_exp(v, pair_m[ii * BLOCK_J + t]);
          }
          Lb_row[j] = log_add_exp(Lb_row[j], v);
        }
      } else if (t >= 32 && t < 32 + BLOCK_I) {
        const int ii = t - 32;
        Acc v = neg_inf<Acc>();
        for (int jj = 0; jj < BLOCK_J; ++jj) {
          if (j0 + jj < j_end) v = log_add_exp(v, pair_m[ii * BLOCK_J + jj]);
        }
        row_l[ii] = log_add_exp(row_l[ii], v);
      }
      __syncthreads();
    }
    if (t < BLOCK_I && i0 + t < I) La_part[js * I + i0 + t] = row_l[t];
    __syncthreads();
  }
}

// dA = tau * sum_{b,c} G[a,b,c] B[b] * C[c] for the anchor A (x, y or z: G is
// symmetric in the three roles, so one kernel serves dx, dy and dz) and, when
// dtau_part is given, this CTA's share of dtau = sum_a <A[a], dA[a]> / tau.
// CTA u owns rows [a0, a0 + BLOCK_I) and columns [dw0, dw0 + BLOCK_DW) of dA.
template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads)
    cube_backward_kernel(const TIn* __restrict__ A, const TIn* __restrict__ B, const TIn* __restrict__ C,
                         const T* __restrict__ tau_ptr, const T* __restrict__ LA, const T* __restrict__ LB,
                         const T* __restrict__ LC, const T* __restrict__ gA, const T* __restrict__ gB,
                         const T* __restrict__ gC, int64_t NA, int64_t NB, int64_t NC, int64_t D, int64_t num_dw,
                         TIn* __restrict__ dA, T* __restrict__ dtau_part) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  constexpr TileConfig c = Policy::cfg;
  constexpr int BLOCK_I = c.BLOCK_I, BLOCK_J = c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D;
  constexpr int BLOCK_DW = c.BLOCK_DW;
  constexpr int BP = BLOCK_I * BLOCK_J;
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldG = BLOCK_K + c.pad_in;
  constexpr int ldP = BLOCK_D + c.pad_in;
  constexpr int ldCw = BLOCK_DW + c.pad_in;
  constexpr int ldW = BLOCK_DW + c.pad_acc;
  constexpr BackwardLayout lay = backward_layout(c);

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* G = reinterpret_cast<In*>(smem + lay.G);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Cd = reinterpret_cast<In*>(smem + lay.Cd);
  In* Cw = reinterpret_cast<In*>(smem + lay.Cw);
  Acc* W = reinterpret_cast<Acc*>(smem + lay.W);  // aliases S..Cw, used after the k loop only
  Acc* dA_s = reinterpret_cast<Acc*>(smem + lay.dA);
  Acc* LA_s = reinterpret_cast<Acc*>(smem + lay.LA);
  Acc* gA_s = reinterpret_cast<Acc*>(smem + lay.gA);
  Acc* LB_s = reinterpret_cast<Acc*>(smem + lay.LB);
  Acc* gB_s = reinterpret_cast<Acc*>(smem + lay.gB);
  Acc* LC_s = reinterpret_cast<Acc*>(smem + lay.LC);
  Acc* gC_s = reinterpret_cast<Acc*>(smem + lay.gC);
  Acc* red = reinterpret_cast<Acc*>(smem + lay.red);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t unit = blockIdx.x;
  const int64_t a0 = (unit / num_dw) * BLOCK_I;
  const int64_t dw0 = (unit % num_dw) * BLOCK_DW;

  if (t < BLOCK_I) {
    const bool ok = a0 + t < NA;
    LA_s[t] = ok ? static_cast<Acc>(LA[a0 + t]) : Acc(0);
    gA_s[t] = ok ? static_cast<Acc>(gA[a0 + t]) : Acc(0);
  }
  for (int e = t; e < BLOCK_I * BLOCK_DW; e += kThreads) dA_s[e] = Acc(0);

  for (int64_t b0 = 0; b0 < NB; b0 += BLOCK_J) {
    if (t < BLOCK_J) {
      const bool ok = b0 + t < NB;
      LB_s[t] = ok ? static_cast<Acc>(LB[b0 + t]) : Acc(0);
      gB_s[t] = ok ? static_cast<Acc>(gB[b0 + t]) : Acc(0);
    }
    // W[(a, b), :] = sum_c G[a, b, c] C[c, dw0 : dw0 + BLOCK_DW], accumulated over k tiles.
    TileFor<Policy, BP, BLOCK_DW> w;
    w.zero();
    for (int64_t c0 = 0; c0 < NC; c0 += BLOCK_K) {
      if (t < BLOCK_K) {
        const bool ok = c0 + t < NC;
        LC_s[t] = ok ? static_cast<Acc>(LC[c0 + t]) : Acc(0);
        gC_s[t] = ok ? static_cast<Acc>(gC[c0 + t]) : Acc(0);
      }
      TileFor<Policy, BP, BLOCK_K> s;
      s.zero();
      for (int64_t d0 = 0; d0 < D; d0 += BLOCK_D) {
        load_pair_products<In, Acc, TIn, BLOCK_I, BLOCK_J>(P, ldP, BLOCK_D, A, B, a0, NA, b0, NB, d0, D);
        load_rows<In, Acc>(Cd, ldP, BLOCK_K, BLOCK_D, C, c0, NC, d0, D);
        __syncthreads();
        s.template mma<true>(P, ldP, Cd, ldP, BLOCK_D);
        __syncthreads();
      }
      s.store(S, ldS);
      load_rows<In, Acc>(Cw, ldCw, BLOCK_K, BLOCK_DW, C, c0, NC, dw0, D);
      __syncthreads();
      // G = gA e^(S - LA) + gB e^(S - LB) + gC e^(S - LC); each exponent is <= 0 up to
      // rounding because an LSE bounds every logit it covers, so nothing overflows at tau = 100.
      for (int e = t; e < BP * BLOCK_K; e += kThreads) {
        const int p = e / BLOCK_K;
        const int kk = e % BLOCK_K;
        const int aa = p / BLOCK_J;
        const int bb = p % BLOCK_J;
        Acc g = Acc(0);
        if (a0 + aa < NA && b0 + bb < NB && c0 + kk < NC) {
          const Acc v = tau * S[p * ldS + kk];
          g = gA_s[aa] * exp_(v - LA_s[aa]) + gB_s[bb] * exp_(v - LB_s[bb]) + gC_s[kk] * exp_(v - LC_s[kk]);
        }
        G[p * ldG + kk] = to_in<In, Acc>(g);
      }
      __syncthreads();
      w.template mma<false>(G, ldG, Cw, ldCw, BLOCK_K);
      __syncthreads();
    }
    w.store(W, ldW);
    __syncthreads();
    // dA[a] += sum_b B[b] * W[a, b] (elementwise over the BLOCK_DW columns).
    for (int e = t; e < BLOCK_I * BLOCK_DW; e += kThreads) {
      const int aa = e / BLOCK_DW;
      const int dd = e % BLOCK_DW;
      const int64_t col = dw0 + dd;
      if (col < D) {
        Acc v = dA_s[e];
        for (int bb = 0; bb < BLOCK_J; ++bb) {
          const int64_t b = b0 + bb;
          if (b < NB) v += to_acc<Acc>(B[b * D + col]) * W[(aa * BLOCK_J + bb) * ldW + dd];
        }
        dA_s[e] = v;
      }
    }
    __syncthreads();
  }

  Acc part = Acc(0);
  for (int e = t; e < BLOCK_I * BLOCK_DW; e += kThreads) {
    const int64_t a = a0 + e / BLOCK_DW;
    const int64_t col = dw0 + e % BLOCK_DW;
    if (a < NA && col < D) {
      const Acc v = dA_s[e];
      dA[a * D + col] = from_acc<TIn>(tau * v);
      part += to_acc<Acc>(A[a * D + col]) * v;
    }
  }
  if (dtau_part != nullptr) {  // uniform over the CTA, so block_sum's barriers are safe
    const Acc total = block_sum<Acc>(part, red);
    if (t == 0) dtau_part[unit] = static_cast<T>(total);
  }
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                           int64_t D, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part, T* La,
                           T* Lb, T* Lc, cudaStream_t stream) {
  if (plan.smem != forward_layout(Policy::cfg).total || plan.ctas < 1 || plan.ctas > INT32_MAX) {
    return cudaErrorInvalidValue;  // the plan was made for another mode
  }
  auto kernel = cube_forward_kernel<T, TIn, Policy>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.smem));
  if (err != cudaSuccess) return err;
  const T minus_inf = -std::numeric_limits<T>::infinity();
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * J), 0, stream, Lb_part, plan.ctas * J, minus_inf);
  SK_LAUNCH(fill_kernel<T>, grid_for(plan.ctas * K), 0, stream, Lc_part, plan.ctas * K, minus_inf);
  SK_LAUNCH(kernel, static_cast<unsigned>(plan.ctas), plan.smem, stream, x, y, z, tau, I, J, K, D, plan,
                                                                             La_part, Lb_part, Lc_part);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(I), 0, stream, La_part, plan.num_js, I, La);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(J), 0, stream, Lb_part, plan.ctas, J, Lb);
  SK_LAUNCH(combine_lse_kernel<T>, grid_for(K), 0, stream, Lc_part, plan.ctas, K, Lc);
  return cudaGetLastError();
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb,
                            const T* Lc, const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J, int64_t K,
                            int64_t D, T* dtau_part, TIn* dx, TIn* dy, TIn* dz, T* dtau, cudaStream_t stream) {
  constexpr TileConfig c = Policy::cfg;
  auto kernel = cube_backward_kernel<T, TIn, Policy>;
  const BackwardPlan px = plan_backward(I, D, c.BLOCK_I, c);
  const BackwardPlan py = plan_backward(J, D, c.BLOCK_I, c);
  const BackwardPlan pz = plan_backward(K, D, c.BLOCK_I, c);
  if (px.units > INT32_MAX || py.units > INT32_MAX || pz.units > INT32_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(px.smem));
  if (err != cudaSuccess) return err;
  // The three anchors: G is symmetric under permuting (x, La, gLa), (y, Lb, gLb), (z, Lc, gLc).
  SK_LAUNCH(kernel, static_cast<unsigned>(px.units), px.smem, stream, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc,
                                                                         I, J, K, D, px.num_dw, dx, dtau_part);
  SK_LAUNCH(kernel, static_cast<unsigned>(py.units), py.smem, stream, y, x, z, tau, Lb, La, Lc, gLb, gLa, gLc,
                                                                         J, I, K, D, py.num_dw, dy, nullptr);
  SK_LAUNCH(kernel, static_cast<unsigned>(pz.units), pz.smem, stream, z, x, y, tau, Lc, La, Lb, gLc, gLa, gLb,
                                                                         K, I, J, D, pz.num_dw, dz, nullptr);
  SK_LAUNCH(sum_kernel<T>, 1, 0, stream, dtau_part, px.units, dtau);
  return cudaGetLastError();
}

}  // namespace

// Float32/float64 tensors run the policy ``mode`` names; bf16 tensors run bf16 tiles and
// fp16 tensors TF32 tiles (exact for fp16 values), both with float32 accumulation.
template <typename T, typename TIn>
cudaError_t cube_lse_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                             int64_t D, int mode, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part,
                             T* La, T* Lb, T* Lc, cudaStream_t stream) {
#define SK_FORWARD(POLICY) \
  launch_forward<T, TIn, POLICY>(x, y, z, tau, I, J, K, D, plan, La_part, Lb_part, Lc_part, La, Lb, Lc, stream)
  if constexpr (std::is_same<TIn, __nv_bfloat16>::value) {
    return SK_FORWARD(Bf16Policy);
  } else if constexpr (std::is_same<TIn, __half>::value) {
    return SK_FORWARD(Tf32Policy);
  } else if constexpr (sizeof(T) == 8) {
    return mode == kIeee ? SK_FORWARD(IeeePolicy<T>) : cudaErrorInvalidValue;
  } else {
    switch (mode) {
      case kIeee:
        return SK_FORWARD(IeeePolicy<T>);
      case kTf32:
        return SK_FORWARD(Tf32Policy);
      case kBf16:
        return SK_FORWARD(Bf16Policy);
      default:
        return cudaErrorInvalidValue;
    }
  }
#undef SK_FORWARD
}

template <typename T, typename TIn>
cudaError_t cube_lse_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb,
                              const T* Lc, const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J,
                              int64_t K, int64_t D, int mode, T* dtau_part, TIn* dx, TIn* dy, TIn* dz, T* dtau,
                              cudaStream_t stream) {
#define SK_BACKWARD(POLICY)                                                                                    \
  launch_backward<T, TIn, POLICY>(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, dtau_part, dx, dy, dz, \
                                  dtau, stream)
  if constexpr (std::is_same<TIn, __nv_bfloat16>::value) {
    return SK_BACKWARD(Bf16Policy);
  } else if constexpr (std::is_same<TIn, __half>::value) {
    return SK_BACKWARD(Tf32Policy);
  } else if constexpr (sizeof(T) == 8) {
    return mode == kIeee ? SK_BACKWARD(IeeePolicy<T>) : cudaErrorInvalidValue;
  } else {
    switch (mode) {
      case kIeee:
        return SK_BACKWARD(IeeePolicy<T>);
      case kTf32:
        return SK_BACKWARD(Tf32Policy);
      case kBf16:
        return SK_BACKWARD(Bf16Policy);
      default:
        return cudaErrorInvalidValue;
    }
  }
#undef SK_BACKWARD
}

#define SK_INSTANTIATE(T, TIn)                                                                                      \
  template cudaError_t cube_lse_forward<T, TIn>(const TIn*, const TIn*, const TIn*, const T*, int64_t, int64_t,     \
                                                int64_t, int64_t, int, const CubeForwardPlan&, T*, T*, T*, T*, T*, \
                                                T*, cudaStream_t);                                                  \
  template cudaError_t cube_lse_backward<T, TIn>(const TIn*, const TIn*, const TIn*, const T*, const T*, const T*, \
                                                 const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                                 int64_t, int, T*, TIn*, TIn*, TIn*, T*, cudaStream_t);
SK_INSTANTIATE(float, float)
SK_INSTANTIATE(double, double)
SK_INSTANTIATE(float, __nv_bfloat16)
SK_INSTANTIATE(float, __half)
#undef SK_INSTANTIATE

}  // namespace symile_cuda
