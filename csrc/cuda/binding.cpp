// Torch binding of the CUDA backend: validates tensors, guards the device,
// allocates outputs and workspaces with torch's caching allocator, launches the
// torch-free launchers of launch.h on the current stream and checks every launch.
//
// Rows x, y, z (a, b) may be float32, float64, bfloat16 or float16; tau, pos and the
// LSE vectors are float32 for 16-bit rows (which run tensor-core tiles), else the rows' dtype.
//
// Operators (schemas below) live in the shared ``symile_kernels`` namespace, so
// this file owns a TORCH_LIBRARY_FRAGMENT of it. Autograd is not registered here:
// symile_kernels.ops wraps these plain forward/backward ops (through
// symile_kernels/cuda.py) in its own differentiable custom ops; fake (meta)
// implementations are registered in symile_kernels/cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>

#include "launch.h"
#include "plan.h"

namespace {

using at::Tensor;

bool low_precision(const Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

// dtype of tau, pos and every LSE and gradient vector: the rows' own, float32 for bf16/fp16 rows.
at::ScalarType compute_dtype(const Tensor& rows) { return low_precision(rows) ? at::kFloat : rows.scalar_type(); }

// The first tensor fixes device and dtype for the others.
void check_first(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || low_precision(t), op, ": ", name,
              " must be float32, float64, bfloat16 or float16; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, d); got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_like(const Tensor& t, const char* op, const char* name, const Tensor& first, const char* first_name,
                int64_t dim) {
  TORCH_CHECK(t.is_cuda() && t.device() == first.device(), op, ": ", name, " must be on ", first_name, "'s device ",
              first.device(), "; got ", t.device());
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": ", name, " must have ", first_name, "'s dtype ",
              first.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// tau, pos and the LSE and gradient vectors: the compute dtype on the rows' device.
void check_vector(const Tensor& t, const char* op, const char* name, const Tensor& rows, const char* rows_name,
                  int64_t dim) {
  TORCH_CHECK(t.is_cuda() && t.device() == rows.device(), op, ": ", name, " must be on ", rows_name, "'s device ",
              rows.device(), "; got ", t.device());
  TORCH_CHECK(t.scalar_type() == compute_dtype(rows), op, ": ", name, " must have dtype ", compute_dtype(rows),
              " (", rows_name, " is ", rows.scalar_type(), "); got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Calls run(T{}, TIn{}) for the rows' dtype: T the compute type, TIn the rows' element type.
template <typename F>
void dispatch_rows(const Tensor& rows, const char* op, F&& run) {
  switch (rows.scalar_type()) {
    case at::kFloat: return run(float(), float());
    case at::kDouble: return run(double(), double());
    case at::kBFloat16: return run(float(), __nv_bfloat16());
    case at::kHalf: return run(float(), __half());
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", rows.scalar_type());
  }
}

template <typename V>
const V* cptr(const Tensor& t) {
  return static_cast<const V*>(t.const_data_ptr());
}

template <typename V>
V* mptr(Tensor& t) {
  return static_cast<V*>(t.mutable_data_ptr());
}

// The tile configuration the rows run (see plan.h effective_mode).
symile_cuda::TileConfig config_of(const Tensor& rows, int64_t mode) {
  const int eff = symile_cuda::effective_mode(static_cast<int>(mode), static_cast<int>(rows.element_size()),
                                              rows.scalar_type() == at::kBFloat16);
  return symile_cuda::config_for(eff, static_cast<int>(c10::elementSize(compute_dtype(rows))));
}

void check_len(const Tensor& t, const char* op, const char* name, int64_t n) {
  TORCH_CHECK(t.size(0) == n, op, ": ", name, " must have ", n, " entries; got ", t.size(0));
}

void check_ok(const std::string& message, const char* op) { TORCH_CHECK(message.empty(), op, ": ", message); }

// What the launchers need to know about the current device (queried attribute by
// attribute: cudaGetDeviceProperties is slow enough to show in a training step).
struct DeviceInfo {
  int major = 0, minor = 0, sms = 0, smem_optin = 0;
};

DeviceInfo check_device(const char* op) {
  DeviceInfo info;
  const int device = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(info.major >= 8, op, ": the CUDA backend needs compute capability >= 8.0 (Ampere or newer); device ",
              device, " has ", info.major, ".", info.minor);
  return info;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The one checked path every op takes once its arguments are checked: the device guard,
// the device query (compute capability), the rows' tile configuration; then launch()
// checks the plan's shared memory against the device and runs the launcher for the rows'
// dtype, launcher(T{}, TIn{}) returning the cudaError_t it checks.
class DeviceCall {
 public:
  DeviceCall(const Tensor& rows, int64_t mode, const char* op)
      : guard_(rows.device()), rows_(rows), op_(op), info(check_device(op)), cfg(config_of(rows, mode)),
        stream(current_stream()) {}

  template <typename F>
  void launch(std::size_t smem, F&& launcher) const {
    check_ok(symile_cuda::check_smem(smem, info.smem_optin), op_);
    dispatch_rows(rows_, op_, [&](auto t_tag, auto in_tag) { C10_CUDA_CHECK(launcher(t_tag, in_tag)); });
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  const Tensor& rows_;
  const char* op_;

 public:
  const DeviceInfo info;
  const symile_cuda::TileConfig cfg;
  const cudaStream_t stream;
};

// Checks shared by the cube ops: x, y, z (one device, dtype and feature size d), tau, mode.
void check_cube(const char* op, const Tensor& x, const Tensor& y, const Tensor& z, const Tensor& tau, int64_t mode) {
  check_first(x, op, "x");
  check_like(y, op, "y", x, "x", 2);
  check_like(z, op, "z", x, "x", 2);
  check_vector(tau, op, "tau", x, "x", 0);
  const int64_t D = x.size(1);
  TORCH_CHECK(y.size(1) == D && z.size(1) == D, op, ": x, y and z must have the same feature size d; got ", D,
              ", ", y.size(1), ", ", z.size(1));
  check_ok(symile_cuda::check_sizes(x.size(0), y.size(0), z.size(0), D), op);
  check_ok(symile_cuda::check_mode(mode, static_cast<int>(x.element_size())), op);
}

// Vectors of given lengths: the compute dtype, 1-D, on the rows' device.
void check_vectors(const char* op, const Tensor& rows, const char* rows_name,
                   std::initializer_list<std::tuple<const Tensor&, const char*, int64_t>> vectors) {
  for (const auto& [t, name, n] : vectors) {
    check_vector(t, op, name, rows, rows_name, 1);
    check_len(t, op, name, n);
  }
}

std::tuple<Tensor, Tensor, Tensor> cube_lse_forward(const Tensor& x, const Tensor& y, const Tensor& z,
                                                    const Tensor& tau, int64_t mode) {
  constexpr const char* op = "symile_kernels::cuda_cube_lse_forward";
  check_cube(op, x, y, z, tau, mode);
  const int64_t I = x.size(0), J = y.size(0), K = z.size(0), D = x.size(1);
  const DeviceCall call(x, mode, op);
  const symile_cuda::CubeForwardPlan plan = symile_cuda::plan_cube_forward(I, J, K, D, call.cfg, call.info.sms);
  const auto options = x.options().dtype(compute_dtype(x));
  // The LSEs in float64 whatever the compute dtype (launch.h); the partials in the compute dtype.
  const auto lse = x.options().dtype(at::kDouble);
  Tensor La = at::empty({I}, lse), Lb = at::empty({J}, lse), Lc = at::empty({K}, lse);
  Tensor La_part = at::empty({2 * plan.num_js * I}, options);
  Tensor Lb_part = at::empty({2 * plan.ctas * J}, options);
  Tensor Lc_part = at::empty({2 * plan.ctas * K}, options);
  call.launch(plan.smem, [&](auto t_tag, auto in_tag) {
    using T = decltype(t_tag);
    using TIn = decltype(in_tag);
    return symile_cuda::cube_lse_forward<T, TIn>(cptr<TIn>(x), cptr<TIn>(y), cptr<TIn>(z), cptr<T>(tau), I, J, K, D,
                                                 static_cast<int>(mode), plan, mptr<T>(La_part), mptr<T>(Lb_part),
                                                 mptr<T>(Lc_part), mptr<double>(La), mptr<double>(Lb), mptr<double>(Lc),
                                                 call.stream);
  });
  return {La, Lb, Lc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cube_lse_backward(const Tensor& x, const Tensor& y, const Tensor& z,
                                                             const Tensor& tau, const Tensor& La, const Tensor& Lb,
                                                             const Tensor& Lc, const Tensor& gLa, const Tensor& gLb,
                                                             const Tensor& gLc, int64_t mode) {
  constexpr const char* op = "symile_kernels::cuda_cube_lse_backward";
  check_cube(op, x, y, z, tau, mode);
  const int64_t I = x.size(0), J = y.size(0), K = z.size(0), D = x.size(1);
  check_vectors(op, x, "x", {{La, "La", I}, {Lb, "Lb", J}, {Lc, "Lc", K}, {gLa, "gLa", I}, {gLb, "gLb", J},
                             {gLc, "gLc", K}});
  const DeviceCall call(x, mode, op);
  const symile_cuda::CubeBackwardPlan plan =
      symile_cuda::plan_cube_backward(I, J, K, D, call.cfg, call.info.sms, call.info.smem_optin);
  Tensor dx = at::empty_like(x), dy = at::empty_like(y), dz = at::empty_like(z), dtau = at::empty_like(tau);
  Tensor workspace = at::empty({plan.workspace}, tau.options());
  call.launch(symile_cuda::max_size(plan.pair_smem, plan.z_smem), [&](auto t_tag, auto in_tag) {
    using T = decltype(t_tag);
    using TIn = decltype(in_tag);
    return symile_cuda::cube_lse_backward<T, TIn>(
        cptr<TIn>(x), cptr<TIn>(y), cptr<TIn>(z), cptr<T>(tau), cptr<T>(La), cptr<T>(Lb), cptr<T>(Lc), cptr<T>(gLa),
        cptr<T>(gLb), cptr<T>(gLc), I, J, K, D, static_cast<int>(mode), plan, mptr<T>(workspace), mptr<TIn>(dx),
        mptr<TIn>(dy), mptr<TIn>(dz), mptr<T>(dtau), call.stream);
  });
  return {dx, dy, dz, dtau};
}

// Checks shared by the pair ops: a (I, d), b (J, d) with I <= J, pos (I,), tau (0-dim).
void check_pair(const char* op, const Tensor& a, const Tensor& b, const Tensor& pos, const Tensor& tau,
                int64_t mode) {
  check_first(a, op, "a");
  check_like(b, op, "b", a, "a", 2);
  check_vectors(op, a, "a", {{pos, "pos", a.size(0)}});
  check_vector(tau, op, "tau", a, "a", 0);
  TORCH_CHECK(b.size(1) == a.size(1), op, ": a and b must have the same feature size d; got ", a.size(1), " and ",
              b.size(1));
  check_ok(symile_cuda::check_pair_sizes(a.size(0), b.size(0), a.size(1)), op);
  check_ok(symile_cuda::check_mode(mode, static_cast<int>(a.element_size())), op);
}

Tensor pair_lse_forward(const Tensor& a, const Tensor& b, const Tensor& pos, const Tensor& tau, int64_t mode) {
  constexpr const char* op = "symile_kernels::cuda_pair_lse_forward";
  check_pair(op, a, b, pos, tau, mode);
  const int64_t I = a.size(0), J = b.size(0), D = a.size(1);
  const DeviceCall call(a, mode, op);
  const symile_cuda::PairPlan plan = symile_cuda::plan_pair(I, J, D, call.cfg, call.info.sms);
  Tensor L = at::empty({I}, pos.options().dtype(at::kDouble));  // float64 whatever the compute dtype (launch.h)
  Tensor L_part = at::empty({plan.forward_workspace}, pos.options());
  call.launch(plan.forward_smem, [&](auto t_tag, auto in_tag) {
    using T = decltype(t_tag);
    using TIn = decltype(in_tag);
    return symile_cuda::pair_lse_forward<T, TIn>(cptr<TIn>(a), cptr<TIn>(b), cptr<T>(pos), cptr<T>(tau), I, J, D,
                                                 static_cast<int>(mode), plan, mptr<T>(L_part), mptr<double>(L),
                                                 call.stream);
  });
  return L;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pair_lse_backward(const Tensor& a, const Tensor& b, const Tensor& pos,
                                                             const Tensor& tau, const Tensor& L, const Tensor& gL,
                                                             int64_t mode) {
  constexpr const char* op = "symile_kernels::cuda_pair_lse_backward";
  check_pair(op, a, b, pos, tau, mode);
  const int64_t I = a.size(0), J = b.size(0), D = a.size(1);
  check_vectors(op, a, "a", {{L, "L", I}, {gL, "gL", I}});
  const DeviceCall call(a, mode, op);
  const symile_cuda::PairPlan plan = symile_cuda::plan_pair(I, J, D, call.cfg, call.info.sms);
  Tensor da = at::empty_like(a), db = at::empty_like(b), dpos = at::empty_like(pos), dtau = at::empty_like(tau);
  Tensor workspace = at::empty({plan.backward_workspace}, pos.options());
  call.launch(plan.backward_smem, [&](auto t_tag, auto in_tag) {
    using T = decltype(t_tag);
    using TIn = decltype(in_tag);
    return symile_cuda::pair_lse_backward<T, TIn>(cptr<TIn>(a), cptr<TIn>(b), cptr<T>(pos), cptr<T>(tau),
                                                  cptr<T>(L), cptr<T>(gL), I, J, D, static_cast<int>(mode), plan,
                                                  mptr<T>(workspace), mptr<TIn>(da), mptr<TIn>(db), mptr<T>(dpos),
                                                  mptr<T>(dtau), call.stream);
  });
  return {da, db, dpos, dtau};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symile_kernels, m) {
  m.def("cuda_cube_lse_forward(Tensor x, Tensor y, Tensor z, Tensor tau, int mode) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_cube_lse_backward(Tensor x, Tensor y, Tensor z, Tensor tau, Tensor La, Tensor Lb, Tensor Lc, "
        "Tensor gLa, Tensor gLb, Tensor gLc, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_pair_lse_forward(Tensor a, Tensor b, Tensor pos, Tensor tau, int mode) -> Tensor");
  m.def("cuda_pair_lse_backward(Tensor a, Tensor b, Tensor pos, Tensor tau, Tensor L, Tensor gL, int mode) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symile_kernels, CUDA, m) {
  m.impl("cuda_cube_lse_forward", &cube_lse_forward);
  m.impl("cuda_cube_lse_backward", &cube_lse_backward);
  m.impl("cuda_pair_lse_forward", &pair_lse_forward);
  m.impl("cuda_pair_lse_backward", &pair_lse_backward);
}
