"""The "cuda" backend: fused CUDA C++ kernels (csrc/cuda/) for CUDA tensors.

The kernels (``cube.cu``, ``pair.cu``; torch-free launchers in ``launch.h``,
tile planning in ``plan.h``) are torch operators in the ``symile_kernels``
namespace (CUDA dispatch key, ``binding.cpp``), with fake implementations
registered here:

``cuda_cube_lse_forward(x, y, z, tau, mode) -> (La, Lb, Lc)``
    x: (I, d), y: (J, d), z: (K, d): float32, float64, bf16 or fp16, contiguous,
    one CUDA device; tau: 0-dim, of the compute dtype (the rows' dtype; float32
    for bf16/fp16 rows). La (I,), Lb (J,), Lc (K,) in float64 whatever the compute
    dtype: docs/math.md section 2's log-sum-exps of ``tau * T`` by online (running-max)
    LSE over tiles, merged as (max, sum) pairs of the compute dtype and formed as
    ``float64(m) + log(float64(s))`` only at the end (docs/math.md section 6.4); the cube
    is never stored.
``cuda_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, mode) -> (dx, dy, dz, dtau)``
``cuda_pair_lse_forward(a, b, pos, tau, mode) -> L`` and
``cuda_pair_lse_backward(a, b, pos, tau, L, gL, mode) -> (da, db, dpos, dtau)``
    as in ``symile_kernels.backends`` (a: (I, d), b: (J, d) with I <= J; L float64 as
    the cube's); gradients of the rows come back in the rows' dtype, the others in the
    compute dtype. The backward ops take their L vectors and gL in the compute dtype and
    use L only inside exp(S - L), gL only as its multiplier, so ``ops`` may pass a shift
    <= L and gL e^(shift - L) (docs/math.md section 6.4).

``mode`` chooses the tile products: 0 IEEE (SIMT FMAs in the tensors' dtype; the
only mode for float64), 1 TF32 tensor cores, 2 bf16 tensor cores (float32
tensors rounded to bf16 tiles in shared memory); accumulation, exponentials and
LSEs are float32 (float64 for float64 tensors). bf16 and fp16 rows (the loss
layer passes them unconverted, ``accepts_low_precision``) ignore ``mode``: bf16
rows run bf16 tiles, fp16 rows TF32 tiles (exact for fp16 values). The backend uses mode 1 for
float32 when torch allows TF32 matrix products
(``torch.backends.cuda.matmul.allow_tf32`` or ``fp32_precision == "tf32"``),
else mode 0; SYMILE_KERNELS_CUDA_MATH=ieee|tf32|bf16 overrides that for float32.
Results are deterministic: every output row has one owning CTA and partial LSEs
are combined in a fixed order (no float atomics).

The compiled library comes from, in order: the extension that
``pip install --no-build-isolation -e .`` built on a machine with CUDA torch and
nvcc (``symile_kernels._cuda_kernels``), else a JIT build of the sources with
``torch.utils.cpp_extension.load`` (ninja, nvcc; into TORCH_EXTENSIONS_DIR; for
the visible GPUs' architectures unless TORCH_CUDA_ARCH_LIST says otherwise),
which prints one line when it starts. SYMILE_KERNELS_NO_JIT=1 disables the JIT
build. When neither works, ``BACKEND.unavailable_reason`` says why, "cuda" is
left out of ``available_backends()``, and ``backend="cuda"`` raises that message.
Devices: compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import _build
from ._extension import CompiledOps, jit_build
from .backends import Backend

EXTENSION = "symile_kernels._cuda_kernels"
SOURCE_DIR = Path(_build.source_root(Path(__file__).resolve().parent)) / _build.CUDA_SOURCE_DIR
SOURCES = _build.CUDA_SOURCES
MODES = _build.MATH_MODES
MATH_ENV = "SYMILE_KERNELS_CUDA_MATH"
_OPS = ("cuda_cube_lse_forward", "cuda_cube_lse_backward", "cuda_pair_lse_forward", "cuda_pair_lse_backward")

def nvcc_flags() -> list[str]:
    """nvcc flags of the JIT build (``symile_kernels._build``, which setup.py reads too)."""
    return list(_build.NVCC_FLAGS)


def _jit_build() -> Optional[str]:
    # Before torch.utils.cpp_extension's CUDA_HOME is read: where nvcc is a wrapper script
    # (/usr/local/bin/nvcc exec'ing the toolkit's), torch would infer a root without the headers.
    _build.apply_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "JIT-building needs the CUDA toolkit (nvcc); set CUDA_HOME or put nvcc on PATH"
    return jit_build("CUDA backend", [SOURCE_DIR / name for name in SOURCES], "nvcc or the C++ compiler failed",
                     name="symile_kernels_cuda", extra_cflags=list(_build.CUDA_CXX_FLAGS), extra_cuda_cflags=nvcc_flags(),
                     extra_include_paths=[str(SOURCE_DIR)],
                     verbose=os.environ.get("SYMILE_KERNELS_VERBOSE_BUILD") == "1")


def _register_fakes() -> None:
    @torch.library.register_fake("symile_kernels::cuda_cube_lse_forward")
    def _(x, y, z, tau, mode):
        return tuple(t.new_empty(t.shape[0], dtype=torch.float64) for t in (x, y, z))

    @torch.library.register_fake("symile_kernels::cuda_cube_lse_backward")
    def _(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, mode):
        return torch.empty_like(x), torch.empty_like(y), torch.empty_like(z), torch.empty_like(tau)

    @torch.library.register_fake("symile_kernels::cuda_pair_lse_forward")
    def _(a, b, pos, tau, mode):
        return pos.new_empty(a.shape[0], dtype=torch.float64)

    @torch.library.register_fake("symile_kernels::cuda_pair_lse_backward")
    def _(a, b, pos, tau, L, gL, mode):
        return torch.empty_like(a), torch.empty_like(b), torch.empty_like(pos), torch.empty_like(tau)


_LIBRARY = CompiledOps("CUDA extension", EXTENSION, _OPS[0], "CUDA", _jit_build, _register_fakes,
                       "Build it with `pip install --no-build-isolation -e .` on a machine with CUDA torch and nvcc")
load_reason = _LIBRARY.load_reason  # call it only where torch has CUDA
_ops = _LIBRARY.ops


def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) == "tf32":
        return True
    return bool(matmul.allow_tf32)


def math_mode(dtype: torch.dtype) -> int:
    """The ``mode`` argument the backend passes for tensors of ``dtype`` (see the module docstring)."""
    if dtype != torch.float32:  # float64 runs IEEE; bf16/fp16 rows choose their own tiles
        return MODES["ieee"]
    choice = os.environ.get(MATH_ENV)
    if choice:
        if choice not in MODES:
            raise ValueError(f"{MATH_ENV} must be one of {', '.join(MODES)}; got {choice!r}")
        return MODES[choice]
    return MODES["tf32"] if _tf32_allowed() else MODES["ieee"]


_device_reasons: dict = {}


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors only; got {device.type} tensors"
    # Cached per device: after the first (eager) call, dispatch under torch.compile is a dict lookup.
    if device.index in _device_reasons:
        return _device_reasons[device.index]
    reason = _device_reason(device)
    if reason is None or torch.version.cuda is None or not torch.cuda.is_available():
        _device_reasons[device.index] = reason
    return reason


def _device_reason(device: torch.device) -> Optional[str]:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "torch finds no CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"the CUDA kernels need compute capability >= 8.0 (Ampere or newer); "
                f"{torch.cuda.get_device_name(index)} has {major}.{minor}")
    return load_reason()


class CudaBackend(Backend):
    """The CUDA kernels of csrc/cuda as a backend: CUDA tensors of compute capability 8.0 or newer."""

    name = "cuda"
    description = ("fused CUDA C++ (csrc/cuda): tiled online LSE, mma.sync (TF32/bf16) or IEEE SIMT tile products, "
                   "row-owning backward passes (deterministic)")

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return _unavailable_reason(device)

    def row_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # bf16/fp16 rows run tensor-core tiles unconverted (module docstring)

    # The kernels compute every gradient (``needs`` is not passed down: the op drops what is not needed).
    def cube_lse_forward(self, x, y, z, tau):
        return tuple(_ops().cuda_cube_lse_forward(x, y, z, tau, math_mode(x.dtype)))

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs=(True,) * 4):
        return tuple(_ops().cuda_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, math_mode(x.dtype)))

    def pair_lse_forward(self, a, b, pos, tau):
        return _ops().cuda_pair_lse_forward(a, b, pos, tau, math_mode(a.dtype))

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs=(True,) * 4):
        return tuple(_ops().cuda_pair_lse_backward(a, b, pos, tau, L, gL, math_mode(a.dtype)))


BACKEND = CudaBackend()
