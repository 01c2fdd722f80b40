// The CPU backend's operators (docs/math.md sections 2 and 3), defined in cube.cpp and pair.cpp and
// registered by binding.cpp; their semantics are symile_kernels/backends.py's and symile_kernels/cpu.py's.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace symile_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cube_lse_forward(const at::Tensor& x, const at::Tensor& y,
                                                                const at::Tensor& z, const at::Tensor& tau);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cube_lse_backward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& tau, const at::Tensor& La,
    const at::Tensor& Lb, const at::Tensor& Lc, const at::Tensor& gLa, const at::Tensor& gLb,
    const at::Tensor& gLc, bool need_dx, bool need_dy, bool need_dz, bool need_dtau);
at::Tensor pair_lse_forward(const at::Tensor& a, const at::Tensor& b, const at::Tensor& pos, const at::Tensor& tau);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_lse_backward(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& pos, const at::Tensor& tau, const at::Tensor& L,
    const at::Tensor& gL, bool need_da, bool need_db, bool need_dpos, bool need_dtau);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_lse_forward_grads(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& pos, const at::Tensor& tau, bool need_U,
    bool need_V);

}  // namespace symile_cpu
