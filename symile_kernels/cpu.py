"""The "cpu" backend: fused C++ kernels (csrc/cpu/symile_cpu.cpp) for CPU tensors.

The kernels are torch operators in the ``symile_kernels`` namespace (CPU
dispatch key), with fake implementations registered here:

``cpu_cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)``
    x: (I, d), y: (J, d), z: (K, d), tau: 0-dim; float32 or float64, contiguous, CPU.
    La (I,), Lb (J,), Lc (K,): SPEC section 2's log-sum-exps of ``tau * T``.
``cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> (dx, dy, dz, dtau)``
``cpu_pair_lse_forward(a, b, pos, tau) -> L`` and
``cpu_pair_lse_backward(a, b, pos, tau, L, gL) -> (da, db, dpos, dtau)``
    as in ``symile_kernels.backends``.

The compiled library comes from, in order: the extension that
``pip install --no-build-isolation -e .`` built (``symile_kernels._cpu_kernels``),
else a JIT build of the sources with ``torch.utils.cpp_extension.load`` (ninja,
into torch's extension cache, TORCH_EXTENSIONS_DIR), which prints one line
when it starts. SYMILE_KERNELS_NO_JIT=1 disables the JIT build;
SYMILE_KERNELS_PORTABLE=1 builds without ``-march=native``. When neither works,
``BACKEND.unavailable_reason`` says why, "cpu" is left out of
``available_backends()``, and ``backend="cpu"`` raises that message.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .backends import Backend

EXTENSION = "symile_kernels._cpu_kernels"
_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu" / "symile_cpu.cpp"
_OPS = ("cpu_cube_lse_forward", "cpu_cube_lse_backward", "cpu_pair_lse_forward", "cpu_pair_lse_backward")

_lock = threading.Lock()
_state: dict = {"done": False, "reason": None, "origin": None}


def compile_flags() -> list[str]:
    """C++ flags of the JIT build (setup.py uses the same): -O3, -fopenmp on Linux
    (without it at::parallel_for runs serially), and -march=native unless
    SYMILE_KERNELS_PORTABLE=1."""
    flags = ["-O3"] + _openmp()
    if os.environ.get("SYMILE_KERNELS_PORTABLE") != "1":
        flags.append("-march=native")
    return flags


def _openmp() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _registered() -> bool:
    """Whether a copy of the library is already loaded in this process (loading a
    second one would register the operators twice)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"symile_kernels::{_OPS[0]}", "CPU")
    except RuntimeError:  # the operator does not exist yet
        return False


def _load_prebuilt() -> Optional[str]:
    """Loads the setup.py-built library; returns why not, or None when loaded."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return f"the extension {EXTENSION} was not built"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as exc:  # built against another torch, say
        return f"loading {spec.origin} failed: {exc}"
    _state["origin"] = spec.origin
    return None


def _jit_build() -> Optional[str]:
    """JIT-builds and loads the library; returns why not, or None when loaded."""
    if os.environ.get("SYMILE_KERNELS_NO_JIT") == "1":
        return "the JIT build is disabled (SYMILE_KERNELS_NO_JIT=1)"
    if not _SOURCE.exists():
        return f"its C++ source {_SOURCE} is not there to JIT-build (install from a source checkout)"
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
    except Exception as exc:
        return f"JIT-building needs ninja ({exc}); pip install ninja"
    print(f"symile_kernels: JIT-building the C++ CPU backend from {_SOURCE} (once, about a minute)...",
          file=sys.stderr, flush=True)
    try:
        load(name="symile_kernels_cpu", sources=[str(_SOURCE)], extra_cflags=compile_flags(),
             extra_ldflags=_openmp(), is_python_module=False, verbose=False)
    except Exception as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return "JIT-building it failed (a C++17 compiler is needed): " + " | ".join(lines[-3:])
    _state["origin"] = "JIT build (torch extension cache)"
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("symile_kernels::cpu_cube_lse_forward")
    def _(x, y, z, tau):
        return x.new_empty(x.shape[0]), y.new_empty(y.shape[0]), z.new_empty(z.shape[0])

    @torch.library.register_fake("symile_kernels::cpu_cube_lse_backward")
    def _(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc):
        return torch.empty_like(x), torch.empty_like(y), torch.empty_like(z), torch.empty_like(tau)

    @torch.library.register_fake("symile_kernels::cpu_pair_lse_forward")
    def _(a, b, pos, tau):
        return a.new_empty(a.shape[0])

    @torch.library.register_fake("symile_kernels::cpu_pair_lse_backward")
    def _(a, b, pos, tau, L, gL):
        return torch.empty_like(a), torch.empty_like(b), torch.empty_like(pos), torch.empty_like(tau)


def load_reason() -> Optional[str]:
    """Loads the compiled operators once (prebuilt, else JIT); None when they are usable,
    else why not and how to fix it."""
    if _state["done"]:
        return _state["reason"]
    with _lock:
        if not _state["done"]:
            reason = None
            if not _registered():
                prebuilt = _load_prebuilt()
                if prebuilt is not None:
                    jit = _jit_build()
                    if jit is not None:
                        reason = (f"the C++ CPU extension is unavailable: {prebuilt}, and {jit}. Build it with "
                                  "`pip install --no-build-isolation -e .` where a C++ compiler is present")
            if reason is None and _state.get("fakes") is None:
                _register_fakes()
                _state["fakes"] = True
            _state["reason"] = reason
            _state["done"] = True
    return _state["reason"]


def _ops():
    reason = load_reason()
    if reason is not None:
        raise RuntimeError(f"symile_kernels 'cpu' backend: {reason}")
    return torch.ops.symile_kernels


def cube_lse_forward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_ops().cpu_cube_lse_forward(x, y, z, tau))


def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_ops().cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc))


def pair_lse_forward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
    return _ops().cpu_pair_lse_forward(a, b, pos, tau)


def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor,
                      gL: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_ops().cpu_pair_lse_backward(a, b, pos, tau, L, gL))


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors only; got {device.type} tensors"
    return load_reason()


BACKEND = Backend(
    name="cpu",
    cube_lse_forward=cube_lse_forward,
    cube_lse_backward=cube_lse_backward,
    pair_lse_forward=pair_lse_forward,
    pair_lse_backward=pair_lse_backward,
    unavailable_reason=_unavailable_reason,
    description="fused C++ (csrc/cpu): one exponential per cube element per pass, BLAS tiles, at::parallel_for",
)
