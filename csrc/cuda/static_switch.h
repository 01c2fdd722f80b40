// The one switch from a math mode to a tile policy, in the style of FlashAttention's
// static_switch.h: every launcher calls with_policy<T, TIn>(mode, f) and f receives the
// policy as a tag (f(Policy{}) returns a cudaError_t), so the ladder is written once and
// each launcher is instantiated only for the policies its row dtype can run.
#pragma once

#include <type_traits>

#include "tile.cuh"

namespace symile_cuda {

// Float32 rows follow mode (kIeee, kTf32, kBf16); float64 rows run IEEE only; bf16 rows
// run bf16 tiles and fp16 rows TF32 tiles (exact for fp16 values) whatever mode says.
// Any other mode is cudaErrorInvalidValue (the binding has refused it already).
template <typename T, typename TIn, typename F>
cudaError_t with_policy(int mode, F&& f) {
  if constexpr (std::is_same<TIn, __nv_bfloat16>::value) {
    return f(Bf16Policy{});
  } else if constexpr (std::is_same<TIn, __half>::value) {
    return f(Tf32Policy{});
  } else if constexpr (sizeof(T) == 8) {
    return mode == kIeee ? f(IeeePolicy<T>{}) : cudaErrorInvalidValue;
  } else {
    switch (mode) {
      case kIeee:
        return f(IeeePolicy<T>{});
      case kTf32:
        return f(Tf32Policy{});
      case kBf16:
        return f(Bf16Policy{});
      default:
        return cudaErrorInvalidValue;
    }
  }
}

}  // namespace symile_cuda
