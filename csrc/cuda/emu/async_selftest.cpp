// The emulation's cp.async model, case by case (tests/test_cuda_work.py runs each case as a
// process and checks its exit status and output). Each case is a one-CTA kernel over 256
// emulated threads; thread 0 reports. Build: g++ -std=c++20 -DSYMILE_CUDA_EMULATE -pthread.
//   ok          16-byte copies and zero fills land at the matching wait_group
//   early_read  reading the destination before its wait_group sees NaN (poison)
//   misaligned  a 16-byte cp.async to an address off a 16-byte boundary aborts
//   unwaited    a kernel that ends with copies not waited for aborts
//   mma_col     MmaBf16Tile (ldmatrix x4 + mma.sync m16n8k16) against a float reference, B by rows of n
//   mma_row     the same with B by rows of k (ldmatrix .trans), accumulating onto loaded values
//   ldsm_misaligned  an ldmatrix row address off a 16-byte boundary aborts
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../tile.cuh"

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

// C (64 x 32, float) = C0 + A (64 x 48, row-major) B (48 x 32) in MmaBf16Tile; bf16 values are
// small integers / 8, so every product and sum is exact in float and the check is equality.
constexpr int kM = 64, kN = 32, kK = 48, kLd = kK + 8, kLdB = kN + 8, kLdC = kN + 4;
float g_max_err = -1;

__global__ void mma_kernel(int which) {
  using symile_cuda::MmaBf16Tile;
  SK_DYNAMIC_SMEM(smem);
  auto* A = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* B = A + kM * kLd;                       // B_COL: kN rows of kK; else kK rows of kN
  float* C = reinterpret_cast<float*>(B + kN * kLd + kK * kLdB);
  const bool col = which == 4 || which == 6;
  auto val = [](int a, int b, int m) { return static_cast<float>((a * 7 + b * 3) % m - m / 2) / 8.0f; };
  for (int e = threadIdx.x; e < kM * kK; e += symile_cuda::kThreads) {
    A[(e / kK) * kLd + e % kK] = __float2bfloat16_rn(val(e / kK, e % kK, 9));
  }
  for (int e = threadIdx.x; e < kK * kN; e += symile_cuda::kThreads) {
    const int k = e / kN, n = e % kN;
    const __nv_bfloat16 v = __float2bfloat16_rn(val(k, n + 1, 7));
    if (col) {
      B[n * kLd + k] = v;
    } else {
      B[k * kLdB + n] = v;
    }
  }
  for (int e = threadIdx.x; e < kM * kN; e += symile_cuda::kThreads) C[(e / kN) * kLdC + e % kN] = col ? 0.0f : 1.5f;
  __syncthreads();
  MmaBf16Tile<kM, kN> t;
  if (col) {
    t.zero();
    t.mma<true>(which == 6 ? A + 4 : A, kLd, B, kLd, kK);  // case 6: rows start 8 bytes off
  } else {
    t.load(C, kLdC);
    t.mma<false>(A, kLd, B, kLdB, kK);
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

}  // namespace

int main(int argc, char** argv) {
  const char* names[] = {"ok", "early_read", "misaligned", "unwaited", "mma_col", "mma_row", "ldsm_misaligned"};
  int which = -1;
  for (int q = 0; q < 7; ++q) {
    if (argc > 1 && std::strcmp(argv[1], names[q]) == 0) which = q;
  }
  if (which < 0) {
    std::fprintf(stderr, "usage: async_selftest ok|early_read|misaligned|unwaited|mma_col|mma_row|ldsm_misaligned\n");
    return 2;
  }
  if (which >= 4) {
    const std::size_t bytes = (kM * kLd + kN * kLd + kK * kLdB) * 2 + kM * kLdC * 4;
    SK_LAUNCH(mma_kernel, 1, bytes, nullptr, which == 6 ? 6 : which);
    std::printf("max_err %g\n", g_max_err);
    return 0;
  }
  SK_LAUNCH(kernel, 1, 128, nullptr, which);
  for (float v : g_seen) std::printf("%s ", std::isnan(v) ? "nan" : std::to_string(static_cast<int>(v)).c_str());
  std::printf("\n");
  return 0;
}
