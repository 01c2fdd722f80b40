// Test-only operators of the CPU kernels' building blocks, kept out of the production library
// (symile_kernels._cpu_kernels, built from binding.cpp, cube.cpp, pair.cpp): tests/cpu_test_ops.py JIT-builds this
// file on its own, as the library "symile_kernels_cpu_test_ops", for tests/test_cpu_exp.py,
// tests/test_cpu_tile_mm.py and benchmarks/tile_rate.py.
//   cpu_exp_test(x, isa) -> e^x through vec_rows.h's exponential at instruction set isa
//   cpu_tile_mm_test(A, B, C, accumulate) -> C = [C +] A @ B through tile_mm.h (in place)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>

#include "tile_mm.h"
#include "vec_rows.h"

namespace symile_cpu {
namespace {

using at::Tensor;

// Internal, for tests: e^x of a float32 tensor through the kernels' vectorised
// exponential at instruction set `isa` ("avx512", "avx2", "scalar" or "active"),
// and the name of the set the kernels use.

Tensor exp_test(const Tensor& x, c10::string_view isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "symile_kernels cpu ops: x must be a float32 CPU tensor; got ", x.scalar_type(), " on ", x.device());
  vec::Isa chosen = vec::active_isa();
  if (isa == "avx512") chosen = vec::Isa::kAvx512;
  else if (isa == "avx2") chosen = vec::Isa::kAvx2;
  else if (isa == "scalar") chosen = vec::Isa::kScalar;
  else TORCH_CHECK(isa == "active", "symile_kernels cpu ops: isa must be avx512, avx2, scalar or active; got ", isa);
  TORCH_CHECK(vec::supported(chosen), "symile_kernels cpu ops: this CPU does not run isa ", isa);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  vec::exp_array(chosen, xc.data_ptr<float>(), xc.numel(), out.data_ptr<float>());
  return out;
}

// Internal, for tests and benchmarks/tile_rate.py: C = [C +] A @ B through tile_mm (one thread,
// the kernels' product path) on row-major views; C is written in place and returned.
Tensor tile_mm_test(const Tensor& A, const Tensor& B, Tensor C, bool accumulate) {
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{A, "A"}, {B, "B"}, {C, "C"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1),
                "symile_kernels cpu ops: ", name, " must be a 2-D CPU matrix with unit column stride; got shape ",
                t.sizes(), " and strides ", t.strides());
    TORCH_CHECK(t.scalar_type() == A.scalar_type() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "symile_kernels cpu ops: ", name, " must be float32 or float64, like A; got ", t.scalar_type());
  }
  TORCH_CHECK(A.size(1) == B.size(0) && C.size(0) == A.size(0) && C.size(1) == B.size(1),
              "symile_kernels cpu ops: C (", C.sizes(), ") must be A (", A.sizes(), ") @ B (", B.sizes(), ")");
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "cpu_tile_mm_test", [&] {
    tile_mm<scalar_t>(A.size(0), B.size(1), A.size(1), A.data_ptr<scalar_t>(), A.stride(0), B.data_ptr<scalar_t>(),
                      B.stride(0), C.data_ptr<scalar_t>(), C.stride(0), accumulate);
  });
  return C;
}

}  // namespace
}  // namespace symile_cpu

// FRAGMENT: the namespace is the production library's (and the Python custom ops').
TORCH_LIBRARY_FRAGMENT(symile_kernels, m) {
  m.def("cpu_exp_test(Tensor x, str isa) -> Tensor");
  m.def("cpu_tile_mm_test(Tensor A, Tensor B, Tensor(a!) C, bool accumulate) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(symile_kernels, CPU, m) {
  m.impl("cpu_exp_test", &symile_cpu::exp_test);
  m.impl("cpu_tile_mm_test", &symile_cpu::tile_mm_test);
}
