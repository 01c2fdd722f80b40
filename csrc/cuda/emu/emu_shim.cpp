// C entry points over the launchers for the CPU emulation (ctypes in
// tests/test_cuda_emulation.py). Workspaces start as NaN so a partial that is read
// before it is written shows in the results. num_sms sets the forward's launch
// geometry (j-splits and units per CTA), so tests can exercise several.
#include <limits>
#include <type_traits>
#include <vector>

#include "launch.h"  // through -I csrc/cuda, as the kernels see it

namespace {

using namespace symile_cuda;

template <typename T>
std::vector<T> nan_buffer(int64_t n) {
  return std::vector<T>(static_cast<std::size_t>(n), std::numeric_limits<T>::quiet_NaN());
}

template <typename T, typename TIn>
int cube_forward(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I, int64_t J, int64_t K, int64_t D,
                 int mode, int num_sms, double* La, double* Lb, double* Lc) {
  const int eff = effective_mode(mode, sizeof(TIn), std::is_same<TIn, __nv_bfloat16>::value);
  const CubeForwardPlan plan = plan_cube_forward(I, J, K, D, config_for(eff, sizeof(T)), num_sms);
  auto la = nan_buffer<T>(2 * plan.num_js * I), lb = nan_buffer<T>(2 * plan.ctas * J),
       lc = nan_buffer<T>(2 * plan.ctas * K);
  return cube_lse_forward<T, TIn>(x, y, z, tau, I, J, K, D, mode, plan, la.data(), lb.data(), lc.data(), La, Lb, Lc,
                                  nullptr);
}

// Per-block shared memory the backward's plan may use (the emulated device's opt-in
// limit unless a test sets a smaller one, to exercise slabs).
int64_t smem_limit = symile_emu::kSmemOptin;

template <typename T, typename TIn>
int cube_backward(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La, const T* Lb, const T* Lc,
                  const T* gLa, const T* gLb, const T* gLc, int64_t I, int64_t J, int64_t K, int64_t D, int mode,
                  int num_sms, TIn* dx, TIn* dy, TIn* dz, T* dtau) {
  const TileConfig cfg = config_for(effective_mode(mode, sizeof(TIn), std::is_same<TIn, __nv_bfloat16>::value),
                                    sizeof(T));
  const CubeBackwardPlan plan = plan_cube_backward(I, J, K, D, cfg, num_sms, smem_limit);
  if (static_cast<int64_t>(plan.pair_smem) > smem_limit || static_cast<int64_t>(plan.z_smem) > smem_limit) return -1;
  auto work = nan_buffer<T>(plan.workspace);
  return cube_lse_backward<T, TIn>(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, mode, plan, work.data(), dx,
                                   dy, dz, dtau, nullptr);
}

template <typename T, typename TIn>
PairPlan pair_plan(int64_t I, int64_t J, int64_t D, int mode, int num_sms) {
  const int eff = effective_mode(mode, sizeof(TIn), std::is_same<TIn, __nv_bfloat16>::value);
  return plan_pair(I, J, D, config_for(eff, sizeof(T)), num_sms);
}

template <typename T, typename TIn>
int pair_forward(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I, int64_t J, int64_t D, int mode,
                 int num_sms, double* L) {
  const PairPlan plan = pair_plan<T, TIn>(I, J, D, mode, num_sms);
  auto part = nan_buffer<T>(plan.forward_workspace);
  return pair_lse_forward<T, TIn>(a, b, pos, tau, I, J, D, mode, plan, part.data(), L, nullptr);
}

template <typename T, typename TIn>
int pair_backward(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L, const T* gL, int64_t I,
                  int64_t J, int64_t D, int mode, int num_sms, TIn* da, TIn* db, T* dpos, T* dtau) {
  const PairPlan plan = pair_plan<T, TIn>(I, J, D, mode, num_sms);
  auto work = nan_buffer<T>(plan.backward_workspace);
  return pair_lse_backward<T, TIn>(a, b, pos, tau, L, gL, I, J, D, mode, plan, work.data(), da, db, dpos, dtau,
                                   nullptr);
}

}  // namespace

#define SK_EMU_ENTRY_POINTS(T, TIn, SUFFIX)                                                                        \
  extern "C" int emu_cube_forward_##SUFFIX(const TIn* x, const TIn* y, const TIn* z, const T* tau, int64_t I,     \
                                          int64_t J, int64_t K, int64_t D, int mode, int num_sms, double* La,      \
                                          double* Lb, double* Lc) {                                                \
    return cube_forward<T, TIn>(x, y, z, tau, I, J, K, D, mode, num_sms, La, Lb, Lc);                              \
  }                                                                                                                \
  extern "C" int emu_cube_backward_##SUFFIX(const TIn* x, const TIn* y, const TIn* z, const T* tau, const T* La,  \
                                           const T* Lb, const T* Lc, const T* gLa, const T* gLb, const T* gLc,     \
                                           int64_t I, int64_t J, int64_t K, int64_t D, int mode, int num_sms,      \
                                           TIn* dx, TIn* dy, TIn* dz, T* dtau) {                                   \
    return cube_backward<T, TIn>(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, I, J, K, D, mode, num_sms, dx, dy, dz,   \
                                 dtau);                                                                            \
  }                                                                                                                \
  extern "C" int emu_pair_forward_##SUFFIX(const TIn* a, const TIn* b, const T* pos, const T* tau, int64_t I,      \
                                          int64_t J, int64_t D, int mode, int num_sms, double* L) {                \
    return pair_forward<T, TIn>(a, b, pos, tau, I, J, D, mode, num_sms, L);                                       \
  }                                                                                                                \
  extern "C" int emu_pair_backward_##SUFFIX(const TIn* a, const TIn* b, const T* pos, const T* tau, const T* L,   \
                                           const T* gL, int64_t I, int64_t J, int64_t D, int mode, int num_sms,    \
                                           TIn* da, TIn* db, T* dpos, T* dtau) {                                   \
    return pair_backward<T, TIn>(a, b, pos, tau, L, gL, I, J, D, mode, num_sms, da, db, dpos, dtau);               \
  }

SK_EMU_ENTRY_POINTS(float, float, f32)
SK_EMU_ENTRY_POINTS(double, double, f64)
SK_EMU_ENTRY_POINTS(float, __nv_bfloat16, bf16)
SK_EMU_ENTRY_POINTS(float, __half, f16)

// Sets the backward's shared-memory limit (bytes); returns the previous one.
extern "C" int64_t emu_set_smem_limit(int64_t bytes) {
  const int64_t old = smem_limit;
  smem_limit = bytes;
  return old;
}

// Work counters of the launches since the last reset (symile_emu::launches): the
// count, and one launch's name, grid, tile-product FLOPs and exponentials (per element
// exp_ and per vector vexp_) and 16-byte global loads.
extern "C" void emu_work_reset() { symile_emu::launches.clear(); }
extern "C" int64_t emu_work_launches() { return static_cast<int64_t>(symile_emu::launches.size()); }
extern "C" const char* emu_work_launch(int64_t n, int64_t* grid, int64_t* flops, int64_t* exps, int64_t* vexps,
                                       int64_t* vloads) {
  const symile_emu::LaunchWork& w = symile_emu::launches.at(static_cast<std::size_t>(n));
  *grid = w.grid;
  *flops = w.flops;
  *exps = w.exps;
  *vexps = w.vexps;
  *vloads = w.vloads;
  return w.name;
}

// cp.async copies (with a source, not pure zero fills) of launch n.
extern "C" int64_t emu_work_async_copies(int64_t n) {
  return symile_emu::launches.at(static_cast<std::size_t>(n)).async_copies;
}

// Elements of row products x[i] * y[j] built in shared memory by launch n.
extern "C" int64_t emu_work_pair_products(int64_t n) {
  return symile_emu::launches.at(static_cast<std::size_t>(n)).pair_products;
}
