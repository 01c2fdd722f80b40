// The device layer every kernel source includes: the platform (CUDA, or host threads in the
// CPU emulation), the tile-product policies, element conversions, and the exponential, log and
// (max, sum) merge helpers the log-sum-exps are built from. No torch headers.
#pragma once


#ifdef SYMILE_CUDA_EMULATE
// CPU tests only: host threads stand in for a CTA (csrc/cuda/emu/cuda_emu.h).
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// The CTA's dynamic shared memory, and a launch of kThreads threads per CTA.
#define SK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define SK_LAUNCH(kernel, grid, smem, stream, ...) kernel<<<(grid), kThreads, (smem), (stream)>>>(__VA_ARGS__)
// Work counters exist in the emulation only.
#define SK_COUNT_FLOPS(n) ((void)0)
#define SK_COUNT_EXP() ((void)0)
#define SK_COUNT_VEXP() ((void)0)
#define SK_COUNT_PAIR_PRODUCTS(n) ((void)0)
// One 16-byte global load (LDG.128) into out; the caller guarantees 16-byte alignment.
#define SK_LOAD16(src, out)                                    \
  do {                                                         \
    const uint4 sk_raw = *reinterpret_cast<const uint4*>(src); \
    memcpy((out), &sk_raw, 16);                                \
  } while (0)
// cp.async (sm_80+): a 16-byte global-to-shared copy that bypasses registers and L1 (.cg),
// reading src_bytes (0 or 16) and zero-filling the rest; both addresses 16-byte aligned.
// The copies of a thread land once their commit group is waited for (wait_group n: all
// but the newest n groups); a barrier then shows them to the other threads.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SK_CP_ASYNC16(dst, src, src_bytes)                                                      \
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(                        \
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),                        \
               "l"(src), "r"(src_bytes))
#define SK_CP_ASYNC_COMMIT() asm volatile("cp.async.commit_group;\n" ::)
#define SK_CP_ASYNC_WAIT(newest) asm volatile("cp.async.wait_group %0;\n" ::"n"(newest))
#else  // older targets (never launched: the binding refuses them): a synchronous copy
#define SK_CP_ASYNC16(dst, src, src_bytes)                                   \
  do {                                                                      \
    uint4 sk_raw = make_uint4(0, 0, 0, 0);                                  \
    if ((src_bytes) > 0) sk_raw = *reinterpret_cast<const uint4*>(src);     \
    *reinterpret_cast<uint4*>(dst) = sk_raw;                                \
  } while (0)
#define SK_CP_ASYNC_COMMIT() ((void)0)
#define SK_CP_ASYNC_WAIT(newest) ((void)0)
#endif
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "plan.h"

namespace symile_cuda {

// ---------------------------------------------------------------------------
// Policies: how a tile product is computed. ``In`` is the operand type in shared
// memory, ``Acc`` the accumulator (and the type of every LSE and exponential).

template <typename T>
struct IeeePolicy {
  using In = T;
  using Acc = T;
  static constexpr bool kWmma = false;
  static constexpr TileConfig cfg = config_for(kIeee, sizeof(T));
};

struct Tf32Policy {
  using In = float;
  using Acc = float;
  static constexpr bool kWmma = true;
  static constexpr TileConfig cfg = config_for(kTf32, 4);
};

struct Bf16Policy {
  using In = __nv_bfloat16;
  using Acc = float;
  static constexpr bool kWmma = true;
  static constexpr TileConfig cfg = config_for(kBf16, 4);
};

template <typename In, typename Acc>
__device__ __forceinline__ In to_in(Acc v) {
  if constexpr (std::is_same<In, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<In>(v);
  }
}

// Global-memory elements to and from the accumulator type. Explicit, because torch
// builds with __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__.
template <typename Acc, typename V>
__device__ __forceinline__ Acc to_acc(V v) {
  if constexpr (std::is_same<V, __nv_bfloat16>::value) {
    return static_cast<Acc>(__bfloat162float(v));
  } else if constexpr (std::is_same<V, __half>::value) {
    return static_cast<Acc>(__half2float(v));
  } else {
    return static_cast<Acc>(v);
  }
}

template <typename V, typename Acc>
__device__ __forceinline__ V from_acc(Acc v) {
  if constexpr (std::is_same<V, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same<V, __half>::value) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<V>(v);
  }
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Two names for one function, so the emulation counts them apart (docs/math.md section 5's
// bound is on the first): exp_ is evaluated per cube element (tile epilogues), vexp_ per
// row, column, tile or partial LSE (o(1) per element: 1/BLOCK_K, 1/BLOCK_P or 1/N of them).
__device__ __forceinline__ float exp_raw(float v) { return expf(v); }
__device__ __forceinline__ double exp_raw(double v) { return exp(v); }
template <typename T>
__device__ __forceinline__ T exp_(T v) {
  SK_COUNT_EXP();
  return exp_raw(v);
}
template <typename T>
__device__ __forceinline__ T vexp_(T v) {
  SK_COUNT_VEXP();
  return exp_raw(v);
}
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

// Merges a tile's (max m, sum of exp(v - m)) into a running (M, S) pair: one
// exponential, of whichever maximum is the smaller (exp(-inf) = 0 starts the pair).
template <typename T>
__device__ __forceinline__ void merge_running(T& M, T& S, T m, T s) {
  if (m == neg_inf<T>()) return;
  if (m > M) {
    S = S * vexp_(M - m) + s;
    M = m;
  } else {
    S += s * vexp_(m - M);
  }
}

}  // namespace symile_cuda
