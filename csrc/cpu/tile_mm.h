// One thread's tile product for the CPU kernels (cube.cpp, pair.cpp):
//   C (m x n, row stride ldc) = [C +] A (m x k, lda) @ B (k x n, ldb), all row-major.
//
// float32 goes through ATen's batch-reduce GEMM, at::native::cpublas::brgemm: oneDNN's
// JIT micro-kernels, generated once per shape and cached by ATen, using AVX-512 where
// the CPU has it (ATen falls back to its BLAS where oneDNN has no kernel). torch.mm's
// float32 path is MKL's sgemm, and MKL runs its AVX2 code on non-Intel CPUs: on the
// development machine's AMD EPYC (Zen 5) one core does ~106 GFLOP/s through MKL and
// ~250 through brgemm at the kernels' tile shapes (256 x 256 x 64 and its transposes).
// float64, and torch builds whose headers lack the float32 brgemm, take at::addmm_out
// (MKL/OpenBLAS) on views of the same memory.
//
// Neither path reads C when accumulate is false (NaN-safe on fresh workspaces), and both
// compute a given shape the same way every call, so results do not depend on which
// thread runs a tile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>

namespace symile_cpu {

template <typename scalar_t>
inline void tile_mm(int64_t m, int64_t n, int64_t k, const scalar_t* A, int64_t lda, const scalar_t* B,
                    int64_t ldb, scalar_t* C, int64_t ldc, bool accumulate) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor Av = at::from_blob(const_cast<scalar_t*>(A), {m, k}, {lda, 1}, options);
  const at::Tensor Bv = at::from_blob(const_cast<scalar_t*>(B), {k, n}, {ldb, 1}, options);
  at::Tensor Cv = at::from_blob(C, {m, n}, {ldc, 1}, options);
  at::addmm_out(Cv, Cv, Av, Bv, /*beta=*/accumulate ? 1 : 0, /*alpha=*/1);
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
template <>
inline void tile_mm<float>(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}
#endif

}  // namespace symile_cpu
