"""The "triton" backend: fused Triton kernels for the cube and pair LSEs.

* ``cube.py``: La, Lb, Lc of the M = 3 cube in one pass without writing the
  cube (d in one to five power-of-two feature segments, ``_launch.d_segments``,
  whose tuple helpers are in ``_segments.py``),
  and the backward in two passes that each recompute a tile once over the
  whole feature axis (deterministic, no atomics), one exponential per cube
  element and pass shared across the anchors (docs/math.md sections 2 and 5).
* ``pair.py``: the tiled row LSE of "n" sampling and M = 2 (docs/math.md section 3).
* ``_launch.py``: configuration lists (``kernel_configs()``, ``pinned_config``),
  tuning and the dtype policy (benchmarks/triton_compile.py, outside the
  package, compiles every kernel for sm_80/sm_90 without a GPU).

Devices: CUDA tensors run compiled kernels, tuned (each configuration of the
list timed) once per feature size, dtype and precision on the first call with at
least 512 rows (on a 2048-row prefix when larger; Hopper and older GPUs, and
executed feature sizes up to 128, 129-256 and 257-512, get different configuration lists;
SYMILE_KERNELS_TRITON_AUTOTUNE=0 runs each list's first configuration untuned;
``launch_list(kernel, device, d)`` names the list a launch takes, and ``pinned_config(name, index)``
forces one configuration of one list). CPU tensors run the same kernels through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this
subpackage was imported (slow: for tests at small N), from the small "<kernel>/interpreter"
lists, or from a GPU's lists inside ``interpret_as("sm90")``.

Dtypes: float32 (IEEE products, TF32 when ``torch.backends.cuda.matmul.allow_tf32``
is True), and bf16/fp16 when a caller passes them (tensor-core products,
float32 accumulation). The LSE vectors come back in float64: the kernels keep
float32 (max, sum) pairs and the launchers form max + log(sum) in float64
(docs/math.md section 6.4). float64 is not supported by
``tl.dot`` in Triton 3.6: ``BACKEND.for_dtype(torch.float64)`` is the "chunked" backend, so
the registry runs float64 calls there.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton  # a missing Triton makes the backend unavailable, with the import error

from .. import chunked
from ..backends import Backend
from . import _launch

if _launch.TRITON_VERSION < _launch.MIN_TRITON:
    # Raised before the kernels are decorated (an older Triton fails there less clearly); the registry
    # gives this message as the backend's unavailable_reason.
    _NEEDED = ".".join(map(str, _launch.MIN_TRITON))
    raise ImportError(f"the triton backend needs triton >= {_NEEDED}, found triton {triton.__version__}: "
                      f"pip install 'triton>={_NEEDED}' (or a torch >= 2.11, which pins one)")

from . import cube, pair  # noqa: E402
from ._launch import interpret_as, kernel_configs, launch_list, pinned_config  # noqa: E402

__all__ = ["BACKEND", "interpret_as", "kernel_configs", "launch_list", "pinned_config"]


class TritonBackend(Backend):
    """The Triton kernels as a backend; float64 runs on the chunked backend (no float64 ``tl.dot``)."""

    name = "triton"
    description = ("fused Triton kernels (CUDA; CPU through TRITON_INTERPRET=1): one pass forward, two "
                   "passes backward, shared exponentials; float64 runs the chunked code")

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "torch has no CUDA device"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1" and _launch.INTERPRETED:
                return None
            if os.environ.get("TRITON_INTERPRET") == "1":
                return ("TRITON_INTERPRET=1 was set after symile_kernels.triton was imported; set it before the "
                        "first use of the backend (it is read when the kernels are decorated)")
            return "Triton kernels need a CUDA device; for CPU tensors set TRITON_INTERPRET=1 (slow interpreter)"
        return f"Triton kernels run on CUDA devices (or the CPU with TRITON_INTERPRET=1), not {device.type}"

    def row_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # bf16/fp16 rows go straight to the kernels: tensor-core products, float32 LSEs and
        # accumulation, gradients returned in the rows' dtype.
        return dtype

    def for_dtype(self, dtype: torch.dtype) -> Backend:
        return chunked.BACKEND if dtype == torch.float64 else self

    def cube_lse_forward(self, x, y, z, tau):
        with _on_device(x):
            return cube.cube_lse_forward(x, y, z, tau)

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs):
        with _on_device(x):  # each backward pass runs only where ``needs`` asks for its outputs
            return cube.cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs=needs)

    def pair_lse_forward(self, a, b, pos, tau):
        with _on_device(a):
            return pair.pair_lse_forward(a, b, pos, tau)

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs):
        with _on_device(a):
            return pair.pair_lse_backward(a, b, pos, tau, L, gL, needs=needs)


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The tensors' GPU as the current device (Triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


BACKEND = TritonBackend()
