"""The "cpu" backend: fused C++ kernels (csrc/cpu/: cube.cpp, pair.cpp, binding.cpp) for CPU tensors.

The kernels are torch operators in the ``symile_kernels`` namespace (CPU
dispatch key), with fake implementations registered here:

``cpu_cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)``
    x: (I, d), y: (J, d), z: (K, d), tau: 0-dim; float32 or float64, contiguous, CPU.
    La (I,), Lb (J,), Lc (K,): docs/math.md section 2's log-sum-exps of ``tau * T``, float64
    whatever the compute dtype (section 6.4).
``cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, need_dx, need_dy, need_dz, need_dtau)
-> (dx, dy, dz, dtau)``
    each gradient shaped and typed like its input; one whose flag is False is skipped (its
    pass is not run: docs/math.md section 2) and comes back as an empty (0,) tensor.
``cpu_pair_lse_forward(a, b, pos, tau) -> L`` (float64, like La) and
``cpu_pair_lse_backward(a, b, pos, tau, L, gL, need_da, need_db, need_dpos, need_dtau)
-> (da, db, dpos, dtau)``, the flags as the cube's
``cpu_pair_lse_forward_grads(a, b, pos, tau, need_U, need_V) -> (L, U, V, Pd, rowdot)``
    as in ``symile_kernels.backends``.

The compiled library comes from, in order: the extension that
``pip install --no-build-isolation -e .`` built (``symile_kernels._cpu_kernels``),
else a JIT build of the sources with ``torch.utils.cpp_extension.load`` (ninja,
into torch's extension cache, TORCH_EXTENSIONS_DIR), which prints one line
when it compiles. SYMILE_KERNELS_NO_JIT=1 disables the JIT build;
SYMILE_KERNELS_PORTABLE=1 builds without ``-march=native``. When neither works,
``BACKEND.unavailable_reason`` says why, "cpu" is left out of
``available_backends()``, and ``backend="cpu"`` raises that message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import _build
from ._extension import CompiledOps, jit_build
from .backends import Backend
from .ops import _forward_grads_like as forward_grads_like

EXTENSION = "symile_kernels._cpu_kernels"
_SOURCES = [Path(_build.source_root(Path(__file__).resolve().parent)) / name for name in _build.CPU_SOURCES]
_OPS = ("cpu_cube_lse_forward", "cpu_cube_lse_backward", "cpu_pair_lse_forward", "cpu_pair_lse_backward",
        "cpu_pair_lse_forward_grads")

def compile_flags() -> list[str]:
    """C++ flags of the CPU extension (``symile_kernels._build``, which setup.py reads too)."""
    return _build.cpu_cxx_flags()


def _jit_build() -> Optional[str]:
    return jit_build("C++ CPU backend", _SOURCES, "a C++17 compiler is needed", name="symile_kernels_cpu",
                     extra_cflags=compile_flags(), extra_ldflags=_build.openmp_flags(), verbose=False)


def _grads_like(inputs, needs) -> tuple[Tensor, ...]:
    """The backward ops' outputs as the fakes see them: like each input, or (0,) where not needed."""
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(inputs, needs))


def _register_fakes() -> None:
    @torch.library.register_fake("symile_kernels::cpu_cube_lse_forward")
    def _(x, y, z, tau):
        return tuple(t.new_empty(t.shape[0], dtype=torch.float64) for t in (x, y, z))

    @torch.library.register_fake("symile_kernels::cpu_cube_lse_backward")
    def _(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, need_dx=True, need_dy=True, need_dz=True, need_dtau=True):
        return _grads_like((x, y, z, tau), (need_dx, need_dy, need_dz, need_dtau))

    @torch.library.register_fake("symile_kernels::cpu_pair_lse_forward")
    def _(a, b, pos, tau):
        return a.new_empty(a.shape[0], dtype=torch.float64)

    @torch.library.register_fake("symile_kernels::cpu_pair_lse_backward")
    def _(a, b, pos, tau, L, gL, need_da=True, need_db=True, need_dpos=True, need_dtau=True):
        return _grads_like((a, b, pos, tau), (need_da, need_db, need_dpos, need_dtau))

    @torch.library.register_fake("symile_kernels::cpu_pair_lse_forward_grads")
    def _(a, b, pos, tau, need_U, need_V):
        return forward_grads_like(a, b, pos, need_U, need_V)


_LIBRARY = CompiledOps("C++ CPU extension", EXTENSION, _OPS[0], "CPU", _jit_build, _register_fakes,
                       "Build it with `pip install --no-build-isolation -e .` where a C++ compiler is present")
load_reason = _LIBRARY.load_reason
_ops = _LIBRARY.ops


def cube_lse_forward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_ops().cpu_cube_lse_forward(x, y, z, tau))


_ALL = (True, True, True, True)


def _needed(grads, needs) -> tuple:
    """The op's outputs with the unneeded ones (empty (0,) tensors) as None."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor, needs=_ALL) -> tuple:
    """(dx, dy, dz, dtau) like (x, y, z, tau); None where ``needs`` (four bools) is False."""
    needs = tuple(bool(n) for n in needs)
    return _needed(_ops().cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, *needs), needs)


def pair_lse_forward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
    return _ops().cpu_pair_lse_forward(a, b, pos, tau)


def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor, needs=_ALL) -> tuple:
    """(da, db, dpos, dtau) like (a, b, pos, tau); None where ``needs`` (four bools) is False."""
    needs = tuple(bool(n) for n in needs)
    return _needed(_ops().cpu_pair_lse_backward(a, b, pos, tau, L, gL, *needs), needs)


def pair_lse_forward_grads(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, need_U: bool,
                           need_V: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_ops().cpu_pair_lse_forward_grads(a, b, pos, tau, need_U, need_V))


class CpuBackend(Backend):
    """The C++ kernels of csrc/cpu as a backend: CPU tensors, float32 and float64 rows."""

    name = "cpu"
    description = "fused C++ (csrc/cpu): one exponential per cube element per pass, BLAS tiles, at::parallel_for"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors only; got {device.type} tensors"
        return load_reason()

    def cube_lse_forward(self, x, y, z, tau):
        return cube_lse_forward(x, y, z, tau)

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs):
        return cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs)

    def pair_lse_forward(self, a, b, pos, tau):
        return pair_lse_forward(a, b, pos, tau)

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs):
        return pair_lse_backward(a, b, pos, tau, L, gL, needs)

    def pair_lse_forward_grads(self, a, b, pos, tau, need_U, need_V):
        return pair_lse_forward_grads(a, b, pos, tau, need_U, need_V)


BACKEND = CpuBackend()
