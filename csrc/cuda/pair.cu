// The pair LSE kernels (docs/math.md section 3, "n" sampling, and the M = 2 / CLIP loss):
// for a (I, d) and b (J, d) with I <= J, L[i] = LSE_j l[i, j] over the J columns with
// l[i, j] = tau <a[i], b[j]> off the diagonal and l[i, i] = pos[i], tiled over BLOCK_K
// columns so the I x J logits never exist. (I < J in distributed runs: local rows
// against the global batch, rotated so that row i's positive is column i.)
// Blueprint: symile_kernels/chunked.py (pair_lse_forward/backward). Each CTA owns
// BP rows of its output: deterministic, no float atomics.
#include "launch.h"
#include "tile.cuh"

namespace symile_cuda {
namespace {

template <typename T, typename TIn, typename Policy>
__global__ void __launch_bounds__(kThreads)
    pair_forward_kernel(const TIn* __restrict__ a, const TIn* __restrict__ b, const T* __restrict__ pos,
                        const T* __restrict__ tau_ptr, int64_t I, int64_t J, int64_t D, T* __restrict__ L) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  constexpr TileConfig c = Policy::cfg;
  constexpr int BP = c.BLOCK_I * c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D;
  constexpr int ldS = BLOCK_K + c.pad_acc;
  constexpr int ldP = BLOCK_D + c.pad_in;
  constexpr ForwardLayout lay = forward_layout(c);

  SK_DYNAMIC_SMEM(smem);
  Acc* S = reinterpret_cast<Acc*>(smem + lay.S);
  In* P = reinterpret_cast<In*>(smem + lay.P);
  In* Zs = reinterpret_cast<In*>(smem + lay.Z);
  Acc* row_m = reinterpret_cast<Acc*>(smem + lay.pair_m);
  Acc* row_s = reinterpret_cast<Acc*>(smem + lay.pair_s);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BP;
  if (t < BP) {
    row_m[t] = neg_inf<Acc>();
    row_s[t] = Acc(0);
  }
  for (int64_t c0 = 0; c0 < J; c0 += BLOCK_K) {
    TileFor<Policy, BP, BLOCK_K> acc;
    acc.zero();
    for (int64_t d0 = 0; d0 < D; d0 += BLOCK_D) {
      load_rows<In, Acc>(P, ldP, BP, BLOCK_D, a, r0, I, d0, D);
      load_rows<In, Acc>(Zs, ldP, BLOCK_K, BLOCK_D, b, c0, J, d0, D);
      __syncthreads();
      acc.template mma<true>(P, ldP, Zs, ldP, BLOCK_D);
      __syncthreads();
    }
    acc.store(S, ldS);
    __syncthreads();
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
  if (t < BP && r0 + t < I) L[r0 + t] = static_cast<T>(row_m[t] + log_(row_s[t]));
}

// NR rows of R against NC columns of Cm. Not TRANSPOSED: R = a (I rows i), Cm = b
// (J columns j), out = da, and dpos and the dtau shares are written. TRANSPOSED:
// R = b (J rows j), Cm = a (I columns i), out = db. With P[i, j] = gL[i] e^(l[i, j] - L[i]) off the
// diagonal: da[i] = tau sum_j P[i, j] b[j], db[j] = tau sum_i P[i, j] a[i],
// dpos[i] = gL[i] e^(pos[i] - L[i]), dtau = sum_i <a[i], da[i]> / tau.
template <typename T, typename TIn, typename Policy, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads)
    pair_backward_kernel(const TIn* __restrict__ R, const TIn* __restrict__ Cm, const T* __restrict__ pos,
                         const T* __restrict__ tau_ptr, const T* __restrict__ L, const T* __restrict__ gL, int64_t NR,
                         int64_t NC, int64_t D, int64_t num_dw, TIn* __restrict__ out, T* __restrict__ dpos,
                         T* __restrict__ dtau_part) {
  using In = typename Policy::In;
  using Acc = typename Policy::Acc;
  constexpr TileConfig c = Policy::cfg;
  constexpr int BP = c.BLOCK_I * c.BLOCK_J, BLOCK_K = c.BLOCK_K, BLOCK_D = c.BLOCK_D, BLOCK_DW = c.BLOCK_DW;
  static_assert(BLOCK_K <= BP, "column statistics reuse the BP-sized vectors of the layout");
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
  Acc* W = reinterpret_cast<Acc*>(smem + lay.W);  // aliases S..Cw, used after the column loop only
  // Statistics of the anchor index i: per row (not TRANSPOSED) or per column (TRANSPOSED).
  Acc* L_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.LC : lay.LA));
  Acc* gL_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.gC : lay.gA));
  Acc* pos_s = reinterpret_cast<Acc*>(smem + (TRANSPOSED ? lay.gB : lay.LB));
  Acc* red = reinterpret_cast<Acc*>(smem + lay.red);

  const Acc tau = static_cast<Acc>(*tau_ptr);
  const int t = threadIdx.x;
  const int64_t unit = blockIdx.x;
  const int64_t r0 = (unit / num_dw) * BP;
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
  for (int64_t c0 = 0; c0 < NC; c0 += BLOCK_K) {
    if (TRANSPOSED && t < BLOCK_K) {
      const bool ok = c0 + t < NC;
      L_s[t] = ok ? static_cast<Acc>(L[c0 + t]) : Acc(0);
      gL_s[t] = ok ? static_cast<Acc>(gL[c0 + t]) : Acc(0);
      pos_s[t] = ok ? static_cast<Acc>(pos[c0 + t]) : Acc(0);
    }
    TileFor<Policy, BP, BLOCK_K> s;
    s.zero();
    for (int64_t d0 = 0; d0 < D; d0 += BLOCK_D) {
      load_rows<In, Acc>(P, ldP, BP, BLOCK_D, R, r0, NR, d0, D);
      load_rows<In, Acc>(Cd, ldP, BLOCK_K, BLOCK_D, Cm, c0, NC, d0, D);
      __syncthreads();
      s.template mma<true>(P, ldP, Cd, ldP, BLOCK_D);
      __syncthreads();
    }
    s.store(S, ldS);
    load_rows<In, Acc>(Cw, ldCw, BLOCK_K, BLOCK_DW, Cm, c0, NC, dw0, D);
    __syncthreads();
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
  Acc part = Acc(0);
  for (int e = t; e < BP * BLOCK_DW; e += kThreads) {
    const int r = e / BLOCK_DW;
    const int dd = e % BLOCK_DW;
    const int64_t row = r0 + r;
    const int64_t col = dw0 + dd;
    if (row < NR && col < D) {
      const Acc v = W[r * ldW + dd];
      out[row * D + col] = from_acc<TIn>(tau * v);
      part += to_acc<Acc>(R[row * D + col]) * v;
    }
  }
  if (dtau_part != nullptr) {  // uniform over the CTA
    const Acc total = block_sum<Acc>(part, red);
    if (t == 0) dtau_part[unit] = static_cast<T>(total);
  }
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D,
                           T* L, cudaStream_t stream) {
  const PairForwardPlan plan = plan_pair_forward(I, Policy::cfg);
  if (plan.blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = pair_forward_kernel<T, TIn, Policy>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.smem));
  if (err != cudaSuccess) return err;
  SK_LAUNCH(kernel, static_cast<unsigned>(plan.blocks), plan.smem, stream, a, b, pos, tau, I, J, D, L);
  return cudaGetLastError();
}

template <typename T, typename TIn, typename Policy>
cudaError_t launch_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL,
                            int64_t I, int64_t J, int64_t D, T* dtau_part, TIn* da, TIn* db, T* dpos, T* dtau,
                            cudaStream_t stream) {
  constexpr TileConfig c = Policy::cfg;
  const BackwardPlan rows = plan_backward(I, D, tile_pairs(c), c);  // da, dpos, dtau shares
  const BackwardPlan cols = plan_backward(J, D, tile_pairs(c), c);  // db
  if (rows.units > INT32_MAX || cols.units > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto rows_kernel = pair_backward_kernel<T, TIn, Policy, false>;
  auto cols_kernel = pair_backward_kernel<T, TIn, Policy, true>;
  cudaError_t err = cudaFuncSetAttribute(rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(rows.smem));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(cols_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cols.smem));
  if (err != cudaSuccess) return err;
  SK_LAUNCH(rows_kernel, static_cast<unsigned>(rows.units), rows.smem, stream, a, b, pos, tau, L, gL, I, J, D,
            rows.num_dw, da, dpos, dtau_part);
  SK_LAUNCH(cols_kernel, static_cast<unsigned>(cols.units), cols.smem, stream, b, a, pos, tau, L, gL, J, I, D,
            cols.num_dw, db, nullptr, nullptr);
  SK_LAUNCH(sum_kernel<T>, 1, 0, stream, dtau_part, rows.units, dtau);
  return cudaGetLastError();
}

}  // namespace

// Policies as in cube.cu: float32/float64 follow ``mode``; bf16 tensors run bf16 tiles,
// fp16 tensors TF32 tiles.
template <typename T, typename TIn>
cudaError_t pair_lse_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D,
                             int mode, T* L, cudaStream_t stream) {
#define SK_FORWARD(POLICY) launch_forward<T, TIn, POLICY>(a, b, pos, tau, I, J, D, L, stream)
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
cudaError_t pair_lse_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL,
                              int64_t I, int64_t J, int64_t D, int mode, T* dtau_part, TIn* da, TIn* db, T* dpos,
                              T* dtau, cudaStream_t stream) {
#define SK_BACKWARD(POLICY) \
  launch_backward<T, TIn, POLICY>(a, b, pos, tau, L, gL, I, J, D, dtau_part, da, db, dpos, dtau, stream)
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

#define SK_INSTANTIATE(T, TIn)                                                                                     \
  template cudaError_t pair_lse_forward<T, TIn>(const TIn*, const TIn*, const T*, const T*, int64_t, int64_t,      \
                                                int64_t, int, T*, cudaStream_t);                                   \
  template cudaError_t pair_lse_backward<T, TIn>(const TIn*, const TIn*, const T*, const T*, const T*, const T*,   \
                                                 int64_t, int64_t, int64_t, int, T*, TIn*, TIn*, T*, T*, cudaStream_t);
SK_INSTANTIATE(float, float)
SK_INSTANTIATE(double, double)
SK_INSTANTIATE(float, __nv_bfloat16)
SK_INSTANTIATE(float, __half)
#undef SK_INSTANTIATE

}  // namespace symile_cuda
