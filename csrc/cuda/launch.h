// Launchers of the CUDA backend: raw device pointers, sizes and a stream, no torch.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise);
// the caller checks it. All tensors are contiguous, row-major, on the current
// device. T (float or double) is the compute dtype of tau, pos and every LSE and
// gradient vector; TIn is the dtype of the rows x, y, z (a, b) and of their
// gradients: T itself, or __nv_bfloat16 / __half with T = float (tensor-core
// tiles, float32 accumulation; ``mode`` is then ignored). tau points to one
// device scalar (read by the kernels, so no host synchronisation).
#pragma once

#ifdef SYMILE_CUDA_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "plan.h"

namespace symile_cuda {

// Calls M(T, TIn) for every (compute type, row type) pair the launchers are built for.
#define SK_FOR_EACH_ROW_TYPE(M) M(float, float) M(double, double) M(float, __nv_bfloat16) M(float, __half)

// La (I,), Lb (J,), Lc (K,) of the cube tau * T[i,j,k] (docs/math.md section 2), in float64
// whatever T: the partials are (max, sum) pairs of T and only the final m + log s is formed in
// float64 (docs/math.md section 6.4).
// Workspace ((max, sum) pairs): La_part (2 * plan.num_js * I), Lb_part (2 * plan.ctas * J),
// Lc_part (2 * plan.ctas * K)
// from plan_cube_forward(I, J, K, D, config_for(effective_mode(mode, sizeof(TIn)), sizeof(T)), num_sms).
template <typename T, typename TIn>
cudaError_t cube_lse_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K,
                             int64_t D, int mode, const CubeForwardPlan& plan, T* La_part, T* Lb_part, T* Lc_part,
                             double* La, double* Lb, double* Lc, cudaStream_t stream);

// dx (I, D), dy (J, D), dz (K, D) and dtau (one scalar) of
// sum gLa * La + gLb * Lb + gLc * Lc (docs/math.md section 2 without the positive term).
// La, Lb, Lc (type T) enter only as exp(S - L) and gLa, gLb, gLc only as its multipliers, so
// a caller may pass a shift <= L with gL e^(shift - L) (docs/math.md section 6.4).
// plan: plan_cube_backward(I, J, K, D, cfg, num_sms, smem_limit) for the rows' config (as
// the forward's); workspace: plan.workspace elements of T.
template <typename T, typename TIn>
cudaError_t cube_lse_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb,
                              const T* Lc, const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J,
                              int64_t K, int64_t D, int mode, const CubeBackwardPlan& plan, T* workspace, TIn* dx,
                              TIn* dy, TIn* dz, T* dtau, cudaStream_t stream);

// a (I, D), b (J, D) with I <= J, pos (I,). L (I,): L[i] = LSE_{j < J} l[i, j],
// l[i, j] = tau <a[i], b[j]> (j != i), l[i, i] = pos[i] (docs/math.md section 3).
// plan: plan_pair(I, J, D, cfg, num_sms) for the rows' config; L_part: plan.forward_workspace
// ((max, sum) pairs of T); L in float64 as the cube's.
template <typename T, typename TIn>
cudaError_t pair_lse_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D,
                             int mode, const PairPlan& plan, T* L_part, double* L, cudaStream_t stream);

// da (I, D), db (J, D), dpos (I,) and dtau of sum_i gL[i] L[i].
// Workspace: plan.backward_workspace elements of T.
template <typename T, typename TIn>
cudaError_t pair_lse_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL,
                              int64_t I, int64_t J, int64_t D, int mode, const PairPlan& plan, T* workspace, TIn* da,
                              TIn* db, T* dpos, T* dtau, cudaStream_t stream);

}  // namespace symile_cuda
