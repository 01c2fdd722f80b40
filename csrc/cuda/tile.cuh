// The logit tiles the cube and pair kernels share: S = A B^T over the whole d through the
// engines (tile_engines.cuh) and the loaders (tile_loaders.cuh), the shared-exponential
// epilogues (forward row and column LSEs, backward G), deterministic reductions and small helper
// kernels. No torch headers: raw pointers and sizes only.
#pragma once

#include "device.cuh"
#include "tile_engines.cuh"
#include "tile_loaders.cuh"

namespace symile_cuda {

// ---------------------------------------------------------------------------
// S (BM x BN logits' raw products, ld ldS) = A B^T over the full d, BD columns per step:
// load_a(d0) stages A's BM x BD chunk (or finds it staged) and returns where it starts in
// shared memory (ld lda); load_b(d0, buf) B's BN x BD chunk in buffer buf
// of Cd (STAGES = 2 buffers of bytes_b each, both ld ldP, zero-filled outside the
// tensors), through cp.async where it can: B's next chunk is in flight while this chunk's
// products run (double buffering). Every thread calls; S is ready on return.
// STAGES = 1: one buffer, B loaded after the previous step's barrier and landed before this
// step's (the pair backward and the cube backward, whose accumulators and bookkeeping leave no
// registers for copies in flight under their 128-register plans); cp.async copies, where
// load_b issues them, are waited for at once (no group stays open).
template <typename Policy, int BM, int BN, int BD, int STAGES = kOperandStages, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_products(int64_t D, LoadA&& load_a, LoadB&& load_b, int lda,
                                              typename Policy::In* Cd, std::size_t bytes_b, int ldP,
                                              typename Policy::Acc* S, int ldS) {
  using In = typename Policy::In;
  static_assert(STAGES == 1 || STAGES == 2, "one buffer, or two: current and next");
  if constexpr (STAGES == 1) {
    (void)bytes_b;
    TileFor<Policy, BM, BN> acc;
    acc.zero();
    for (int64_t d0 = 0; d0 < D; d0 += BD) {
      const In* A = load_a(d0);
      load_b(d0, Cd);
      SK_CP_ASYNC_COMMIT();
      SK_CP_ASYNC_WAIT(0);
      __syncthreads();
      acc.template mma<true>(A, lda, Cd, ldP, BD);
      __syncthreads();
    }
    acc.store(S, ldS);
    __syncthreads();
    return;
  }
  In* cur = Cd;
  In* next = reinterpret_cast<In*>(reinterpret_cast<unsigned char*>(Cd) + bytes_b);
  TileFor<Policy, BM, BN> acc;
  acc.zero();
  load_b(int64_t(0), cur);
  SK_CP_ASYNC_COMMIT();
  for (int64_t d0 = 0; d0 < D; d0 += BD) {
    // `next` was last read by the previous step's products (a barrier since).
    if (d0 + BD < D) load_b(d0 + BD, next);
    SK_CP_ASYNC_COMMIT();  // possibly empty: every step commits one group
    const In* A = load_a(d0);
    SK_CP_ASYNC_WAIT(1);   // this step's chunk has landed (only the next one may be in flight)
    __syncthreads();
    acc.template mma<true>(A, lda, cur, ldP, BD);
    __syncthreads();
    In* const done = cur;
    cur = next;
    next = done;
  }
  SK_CP_ASYNC_WAIT(0);  // the last, empty group
  acc.store(S, ldS);
  __syncthreads();
}

// An LSE vector and its gradient for rows [r0, r0 + count) of n: L_s, g_s (0 outside).
template <typename Acc, typename T>
__device__ __forceinline__ void load_vectors(Acc* L_s, Acc* g_s, const T* __restrict__ L, const T* __restrict__ g,
                                             int64_t r0, int64_t n, int count) {
  const int t = opaque_tid();
  if (t < count) {
    const bool ok = r0 + t < n;
    L_s[t] = ok ? static_cast<Acc>(L[r0 + t]) : Acc(0);
    g_s[t] = ok ? static_cast<Acc>(g[r0 + t]) : Acc(0);
  }
}

// Max and sum over groups of LANES adjacent lanes (a power of two <= 32) by butterfly
// shuffles: every lane of the group gets the result; every lane of the warp must call.
template <int LANES, typename T>
__device__ __forceinline__ T lanes_max(T v) {
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "lanes: a power of two <= 32");
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <int LANES, typename T>
__device__ __forceinline__ T lanes_sum(T v) {
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "lanes: a power of two <= 32");
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Row log-sum-exp of a shared-memory tile (masked entries hold -inf).
// Each row gets kThreads / rows adjacent lanes; the result goes to
// the lane with q == 0 through butterfly shuffles, so every thread must call.

template <typename Acc, int ROWS, int COLS>
__device__ __forceinline__ void tile_row_stats(const Acc* S, int ld, int& row, Acc& m, Acc& s, bool& leader) {
  constexpr int TPR = kThreads / ROWS;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "lanes per row must be a power of two <= 32");
  row = threadIdx.x / TPR;
  const int q = threadIdx.x % TPR;
  m = neg_inf<Acc>();
  for (int c = q; c < COLS; c += TPR) m = fmax(m, S[row * ld + c]);
  m = lanes_max<TPR>(m);
  s = Acc(0);
  if (m != neg_inf<Acc>()) {
    for (int c = q; c < COLS; c += TPR) s += exp_(S[row * ld + c] - m);
  }
  s = lanes_sum<TPR>(s);
  leader = q == 0;
}

// Row and column log-sum-exps of a ROWS x COLS logit tile S (masked entries -inf; every
// row or column with a finite entry is "valid") with one exponential per element
// (docs/math.md section 5): E = exp(S - rowmax_r) serves the rows, and the columns get
// sum_r E[r, c] * exp(rowmax_r - cmax), cmax the tile's maximum (ROWS extra exponentials).
// That is exact to float32 only while every valid column's maximum lies within
// kForwardShareSpread of cmax (a flushed term is then below e^(60 - 87.3) of its column's
// largest); other tiles take the exact path, a second exponential per element.
// Row r's (max, sum) is merged into (row_M[r], row_S[r]); column c's tile LSE is
// colo[c] + log(cols[c]) ((-inf, 0) for masked columns). S is overwritten with E. colm
// (COLS) and roww (ROWS) are scratch. Every thread calls; results are visible on return.
template <typename Acc, int ROWS, int COLS>
__device__ __forceinline__ void tile_lse_shared(Acc* S, int ld, Acc* colm, Acc* colo, Acc* cols, Acc* roww,
                                                Acc* row_M, Acc* row_S) {
  constexpr int TPC = kThreads / COLS;
  constexpr int TPR = kThreads / ROWS;
  static_assert(TPC >= 1 && TPC <= 32 && (TPC & (TPC - 1)) == 0, "lanes per column must be a power of two <= 32");
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "lanes per row must be a power of two <= 32");
  const Acc ninf = neg_inf<Acc>();
  {
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    Acc m = ninf;
        for (int r = q; r < ROWS; r += TPC) m = fmax(m, S[r * ld + col]);
    m = lanes_max<TPC>(m);
    if (q == 0) colm[col] = m;
  }
  __syncthreads();
  // Block-uniform: every thread reads the same COLS maxima.
  Acc cmax = ninf, lowest = static_cast<Acc>(INFINITY);
#pragma unroll 8  // fully unrolled, these COLS shared loads were hoisted into registers
  for (int c = 0; c < COLS; ++c) {
    const Acc m = colm[c];
    cmax = fmax(cmax, m);
    if (m != ninf) lowest = lowest < m ? lowest : m;
  }
  const bool share = lowest >= cmax - static_cast<Acc>(kForwardShareSpread);
  if (!share) {  // exact path: the columns' own exponentials, before S is overwritten
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    const Acc m = colm[col];
    Acc s = Acc(0);
    if (m != ninf) {
            for (int r = q; r < ROWS; r += TPC) s += exp_(S[r * ld + col] - m);
    }
    s = lanes_sum<TPC>(s);
    if (q == 0) {
      colo[col] = m;
      cols[col] = s;
    }
  }
  __syncthreads();
  {
    const int row = threadIdx.x / TPR;
    const int q = threadIdx.x % TPR;
    Acc m = ninf;
        for (int c = q; c < COLS; c += TPR) m = fmax(m, S[row * ld + c]);
    m = lanes_max<TPR>(m);
    Acc s = Acc(0);
        for (int c = q; c < COLS; c += TPR) {
      const Acc e = m == ninf ? Acc(0) : exp_(S[row * ld + c] - m);  // the shared exponential
      S[row * ld + c] = e;
      s += e;
    }
    s = lanes_sum<TPR>(s);
    if (q == 0) {
      merge_running(row_M[row], row_S[row], m, s);
      if (share) roww[row] = m == ninf ? Acc(0) : vexp_(m - cmax);
    }
  }
  __syncthreads();
  if (share) {
    const int col = threadIdx.x / TPC;
    const int q = threadIdx.x % TPC;
    Acc s = Acc(0);
        for (int r = q; r < ROWS; r += TPC) s += S[r * ld + col] * roww[r];
    s = lanes_sum<TPC>(s);
    // A valid column's largest term is exp(its max - cmax) >= e^-60: s > 0.
    if (q == 0) {
      colo[col] = colm[col] == ninf ? ninf : cmax;
      cols[col] = colm[col] == ninf ? Acc(0) : s;
    }
    __syncthreads();
  }
}

// The backward's per-pair factors of G (docs/math.md section 2) for a tile of BP = BI x BJ
// pairs (a0 + p / BJ, b0 + p % BJ), from LA_s, gA_s (BI rows) and LB_s, gB_s (BJ rows):
// ref[p] = min(LA, LB) (every logit of the pair lies below both, so exp(S - ref) <= 1),
// arow[p] = gA e^(ref - LA) + gB e^(ref - LB), u[p] = e^(ref - c0) with c0 = max_p ref;
// masked pairs get ref = -inf, arow = u = 0. Returns c0. Every thread calls.
template <typename Acc, int BI, int BJ>
__device__ __forceinline__ Acc pair_factors(const Acc* LA_s, const Acc* gA_s, const Acc* LB_s, const Acc* gB_s,
                                            int64_t a0, int64_t NA, int64_t b0, int64_t NB, Acc* ref, Acc* arow,
                                            Acc* u) {
  constexpr int BP = BI * BJ;
  const int t = opaque_tid();
  if (t < BP) {
    const int aa = t / BJ, bb = t % BJ;
    if (a0 + aa < NA && b0 + bb < NB) {
      // One exponential: the term of the smaller LSE has exponent 0 (e^0 = 1 exactly).
      const Acc la = LA_s[aa], lb = LB_s[bb];
      ref[t] = la < lb ? la : lb;
      arow[t] = la < lb ? gA_s[aa] + gB_s[bb] * vexp_(la - lb) : gA_s[aa] * vexp_(lb - la) + gB_s[bb];
    } else {
      ref[t] = neg_inf<Acc>();
      arow[t] = Acc(0);
    }
  }
  __syncthreads();
  Acc c0 = neg_inf<Acc>();
#pragma unroll 8
  for (int p = 0; p < BP; ++p) c0 = fmax(c0, ref[p]);
  if (t < BP) u[t] = ref[t] == neg_inf<Acc>() ? Acc(0) : vexp_(ref[t] - c0);
  __syncthreads();
  return c0;
}

// G = gA e^(S - LA) + gB e^(S - LB) + gC e^(S - LC) of a BP x BK tile of raw products S
// (logits tau * S) with one exponential per element, E = exp(tau S - ref[p]): the first two
// terms are E * arow[p], the third E * u[p] * bcol[k] with bcol = gC e^(c0 - LC) <= gC
// e^kBackwardShareSpread, used while c0 - min LC <= kBackwardShareSpread (a flushed term
// is then below gC e^(40 - 87.3)); other tiles give the third term its own exponential.
// Writes G[p * ldG + k] (TRANSPOSED: G[k * ldG + p]) in the operand type, 0 where masked.
// LC_s, gC_s: the tile's BK columns, k0 + k < NC valid. bcol is scratch. Every thread calls.
template <typename In, typename Acc, int BP, int BK, bool TRANSPOSED>
__device__ __forceinline__ void tile_G(const Acc* S, int ldS, Acc tau, const Acc* ref, const Acc* arow,
                                       const Acc* u, Acc c0, const Acc* LC_s, const Acc* gC_s, int64_t k0,
                                       int64_t NC, Acc* bcol, In* G, int ldG) {
  const int t = opaque_tid();
  Acc lowest = static_cast<Acc>(INFINITY);  // block-uniform
#pragma unroll 8
  for (int k = 0; k < BK && k0 + k < NC; ++k) lowest = lowest < LC_s[k] ? lowest : LC_s[k];
  const bool share = c0 - lowest <= static_cast<Acc>(kBackwardShareSpread);
  if (share && t < BK) bcol[t] = k0 + t < NC ? gC_s[t] * vexp_(c0 - LC_s[t]) : Acc(0);
  __syncthreads();
  for (int e = t; e < BP * BK; e += kThreads) {
    const int p = TRANSPOSED ? e % BP : e / BK;
    const int k = TRANSPOSED ? e / BP : e % BK;
    Acc g = Acc(0);
    if (ref[p] != neg_inf<Acc>() && k0 + k < NC) {
      const Acc v = tau * S[p * ldS + k];
      const Acc E = exp_(v - ref[p]);  // the shared exponential
      g = share ? E * (arow[p] + u[p] * bcol[k]) : E * arow[p] + gC_s[k] * exp_(v - LC_s[k]);
    }
    G[TRANSPOSED ? k * ldG + p : p * ldG + k] = to_in<In, Acc>(g);
  }
  __syncthreads();
}

// Deterministic block sum (fixed tree order); every thread calls, thread 0 gets the sum.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* red) {
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) red[t] += red[t + stride];
    __syncthreads();
  }
  return red[0];
}

// ---------------------------------------------------------------------------
// Small helper kernels.

template <typename T>
__global__ void fill_kernel(T* __restrict__ out, int64_t n, T value) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    out[e] = value;
  }
}

// out[n] = LSE of R partial LSEs held as (max, sum) pairs, M = part[r * N + n] and
// S = part[(R + r) * N + n]: one pass for the maximum, one for the rescaled sum (a
// (-inf, 0) pair adds nothing), in the fixed order r = 0, 1, ... The (max, sum) pair is
// the compute dtype's; only the result is formed in float64, (double) m + log((double) s),
// so log s survives where it is below half an ulp of m in the compute dtype (at m = 1e8 a
// float32 m + log s would drop a log 2 of a tie; docs/math.md section 6.4).
template <typename T>
__global__ void combine_lse_kernel(const T* __restrict__ part, int64_t R, int64_t N, double* __restrict__ out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    T m = neg_inf<T>();
    for (int64_t r = 0; r < R; ++r) m = fmax(m, part[r * N + n]);
    T s = T(0);
    if (m != neg_inf<T>()) {
      for (int64_t r = 0; r < R; ++r) {
        const T Mr = part[r * N + n];
        if (Mr != neg_inf<T>()) s += part[(R + r) * N + n] * vexp_(Mr - m);
      }
    }
    out[n] = m == neg_inf<T>() ? neg_inf<double>() : static_cast<double>(m) + log_(static_cast<double>(s));
  }
}

// out[0] = sum of part[0..n) in a fixed order (one CTA).
template <typename T>
__global__ void sum_kernel(const T* __restrict__ part, int64_t n, T* __restrict__ out) {
  __shared__ T red[kThreads];
  T v = T(0);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) v += part[e];
  const T total = block_sum<T>(v, red);
  if (threadIdx.x == 0) out[0] = total;
}

// out[e] = tau * sum_{r < R} part[r * n + e] in the rows' type, r in a fixed order; with X,
// also dot_part[CTA] = sum over the CTA's e of X[e] * (that sum / tau): a fixed grid makes
// dtau deterministic.
template <typename T, typename TIn>
__global__ void __launch_bounds__(kThreads)
    reduce_parts_kernel(const T* __restrict__ part, int64_t R, int64_t n, const T* __restrict__ tau_ptr,
                        const TIn* __restrict__ X, TIn* __restrict__ out, T* __restrict__ dot_part) {
  __shared__ T red[kThreads];
  const T tau = *tau_ptr;
  T dot = T(0);
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    T v = T(0);
    for (int64_t r = 0; r < R; ++r) v += part[r * n + e];
    out[e] = from_acc<TIn>(tau * v);
    if (X != nullptr) dot += to_acc<T>(X[e]) * v;
  }
  if (dot_part != nullptr) {  // uniform over the grid
    const T total = block_sum<T>(dot, red);
    if (threadIdx.x == 0) dot_part[blockIdx.x] = total;
  }
}

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace symile_cuda
