// The emulation's cp.async model, case by case (tests/test_cuda_work.py runs each case as a
// process and checks its exit status and output). Each case is a one-CTA kernel over 256
// emulated threads; thread 0 reports. Build: g++ -std=c++20 -DSYMILE_CUDA_EMULATE -pthread.
//   ok          16-byte copies and zero fills land at the matching wait_group
//   early_read  reading the destination before its wait_group sees NaN (poison)
//   misaligned  a 16-byte cp.async to an address off a 16-byte boundary aborts
//   unwaited    a kernel that ends with copies not waited for aborts
//   mma_col     MmaTile in bf16 (ldmatrix x4 + mma.sync m16n8k16) against a float reference, B by rows of n
//   mma_row     the same with B by rows of k (ldmatrix .trans), accumulating onto loaded values
//   ldsm_misaligned  an ldmatrix row address off a 16-byte boundary aborts
//   mma_col_tf32, mma_row_tf32  the same two products in TF32 tiles (m16n8k8; B by rows of k through LDS)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tile.cuh"  // through -I csrc/cuda, as the kernels see it

namespace {

alignas(16) float g_src[2][4] = {{1, 2, 3, 4}, {5, 6, 7, 8}};
float g_seen[8];

__global__ void kernel(int g_case) {
  SK_DYNAMIC_SMEM(smem);
  float* dst = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) {
    if (g_case == 2) {  // misaligned destination
      SK_CP_ASYNC16(dst + 1, g_src[0], 16);
      SK_CP_ASYNC_COMMIT();
      SK_CP_ASYNC_WAIT(0);
      return;
    }
    SK_CP_ASYNC16(dst, g_src[0], 16);  // group 0: a copy
    SK_CP_ASYNC_COMMIT();
    SK_CP_ASYNC16(dst + 4, g_src[1], 0);  // group 1: a zero fill that reads nothing
    SK_CP_ASYNC_COMMIT();
    if (g_case == 3) return;  // never waited for
    if (g_case == 1) {
      std::memcpy(g_seen, dst, sizeof(g_seen));  // before any wait
      SK_CP_ASYNC_WAIT(0);
      return;
    }
    SK_CP_ASYNC_WAIT(1);  // group 0 landed, group 1 may still be in flight
    std::memcpy(g_seen, dst, 4 * sizeof(float));
    SK_CP_ASYNC_WAIT(0);
    std::memcpy(g_seen + 4, dst + 4, 4 * sizeof(float));
  }
}

// C (64 x 32, float) = C0 + A (64 x 48, row-major) B (48 x 32) in MmaTile<In> (bf16 or TF32);
// the values are small integers / 8, exact in bf16, TF32 and float, so the check is equality.
constexpr int kM = 64, kN = 32, kK = 48;
float g_max_err = -1;

template <typename In>
__global__ void mma_kernel(int which) {
  constexpr int pad = 16 / static_cast<int>(sizeof(In));  // 16-byte row padding, as plan.h
  constexpr int kLd = kK + pad, kLdB = kN + pad, kLdC = kN + 4;
  SK_DYNAMIC_SMEM(smem);
  auto* A = reinterpret_cast<In*>(smem);
  In* B = A + kM * kLd;                       // B_COL: kN rows of kK; else kK rows of kN
  float* C = reinterpret_cast<float*>(B + kN * kLd + kK * kLdB);
  const bool col = which == 4 || which == 6 || which == 7;
  auto val = [](int a, int b, int m) { return static_cast<float>((a * 7 + b * 3) % m - m / 2) / 8.0f; };
  auto in = [](float v) {
    if constexpr (std::is_same<In, float>::value) {
      return v;
    } else {
      return __float2bfloat16_rn(v);
    }
  };
  for (int e = threadIdx.x; e < kM * kK; e += symile_cuda::kThreads) A[(e / kK) * kLd + e % kK] = in(val(e / kK, e % kK, 9));
  for (int e = threadIdx.x; e < kK * kN; e += symile_cuda::kThreads) {
    const int k = e / kN, n = e % kN;
    const In v = in(val(k, n + 1, 7));
    if (col) {
      B[n * kLd + k] = v;
    } else {
      B[k * kLdB + n] = v;
    }
  }
  for (int e = threadIdx.x; e < kM * kN; e += symile_cuda::kThreads) C[(e / kN) * kLdC + e % kN] = col ? 0.0f : 1.5f;
  __syncthreads();
  symile_cuda::MmaTile<In, kM, kN> t;
  if (col) {
    t.zero();
    t.template mma<true>(which == 6 ? A + 4 : A, kLd, B, kLd, kK);  // case 6: rows start 8 bytes off
  } else {
    t.load(C, kLdC);
    t.template mma<false>(A, kLd, B, kLdB, kK);
  }
  __syncthreads();
  t.store(C, kLdC);
  __syncthreads();
  if (threadIdx.x == 0) {
    float err = 0;
    for (int m = 0; m < kM; ++m)
      for (int n = 0; n < kN; ++n) {
        float want = col ? 0.0f : 1.5f;
        for (int k = 0; k < kK; ++k) want += val(m, k, 9) * val(k, n + 1, 7);
        err = std::fmax(err, std::fabs(C[m * kLdC + n] - want));
      }
    g_max_err = err;
  }
}

template <typename In>
std::size_t mma_bytes() {
  constexpr int pad = 16 / static_cast<int>(sizeof(In));
  return ((kM + kN) * (kK + pad) + kK * (kN + pad)) * sizeof(In) + kM * (kN + 4) * 4;
}

}  // namespace

int main(int argc, char** argv) {
  const char* names[] = {"ok",      "early_read",      "misaligned",   "unwaited",    "mma_col",
                         "mma_row", "ldsm_misaligned", "mma_col_tf32", "mma_row_tf32"};
  int which = -1;
  for (int q = 0; q < 9; ++q) {
    if (argc > 1 && std::strcmp(argv[1], names[q]) == 0) which = q;
  }
  if (which < 0) {
    std::fprintf(stderr, "usage: async_selftest ok|early_read|misaligned|unwaited|mma_col|mma_row|ldsm_misaligned"
                         "|mma_col_tf32|mma_row_tf32\n");
    return 2;
  }
  if (which >= 7) {
    SK_LAUNCH(mma_kernel<float>, 1, mma_bytes<float>(), nullptr, which);
    std::printf("max_err %g\n", g_max_err);
    return 0;
  }
  if (which >= 4) {
    SK_LAUNCH(mma_kernel<__nv_bfloat16>, 1, mma_bytes<__nv_bfloat16>(), nullptr, which);
    std::printf("max_err %g\n", g_max_err);
    return 0;
  }
  SK_LAUNCH(kernel, 1, 128, nullptr, which);
  for (float v : g_seen) std::printf("%s ", std::isnan(v) ? "nan" : std::to_string(static_cast<int>(v)).c_str());
  std::printf("\n");
  return 0;
}
