// The emulation's cp.async model, case by case (tests/test_cuda_work.py runs each case as a
// process and checks its exit status and output). Each case is a one-CTA kernel over 256
// emulated threads; thread 0 reports. Build: g++ -std=c++20 -DSYMILE_CUDA_EMULATE -pthread.
//   ok          16-byte copies and zero fills land at the matching wait_group
//   early_read  reading the destination before its wait_group sees NaN (poison)
//   misaligned  a 16-byte cp.async to an address off a 16-byte boundary aborts
//   unwaited    a kernel that ends with copies not waited for aborts
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

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

}  // namespace

int main(int argc, char** argv) {
  const char* names[] = {"ok", "early_read", "misaligned", "unwaited"};
  int which = -1;
  for (int q = 0; q < 4; ++q) {
    if (argc > 1 && std::strcmp(argv[1], names[q]) == 0) which = q;
  }
  if (which < 0) {
    std::fprintf(stderr, "usage: async_selftest ok|early_read|misaligned|unwaited\n");
    return 2;
  }
  SK_LAUNCH(kernel, 1, 128, nullptr, which);
  for (float v : g_seen) std::printf("%s ", std::isnan(v) ? "nan" : std::to_string(static_cast<int>(v)).c_str());
  std::printf("\n");
  return 0;
}
