"""The "triton" backend: fused Triton kernels for the cube and pair LSEs.

* ``cube.py``: La, Lb, Lc of the M = 3 cube in one pass without writing the
  cube (d in one to five power-of-two feature segments, ``_launch.d_segments``,
  whose tuple helpers are in ``_segments.py``),
  and the backward in two passes that each recompute a tile once over the
  whole feature axis (deterministic, no atomics), one exponential per cube
  element and pass shared across the anchors (docs/math.md sections 2 and 5).
* ``pair.py``: the tiled row LSE of "n" sampling and M = 2 (docs/math.md section 3).
* ``_launch.py``: configuration lists (``kernel_configs()``, ``pinned_config``),
  tuning and the dtype policy; ``_compile.py``: compiles every kernel for
  sm_80/sm_90 without a GPU.

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
``tl.dot`` in Triton 3.6: the record's ``float64_route="chunked"`` has the registry
run float64 calls on the "chunked" backend.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton  # noqa: F401  (a missing Triton makes the backend unavailable, with the import error)

from ..backends import Backend
from . import _launch, cube, pair
from ._launch import interpret_as, kernel_configs, launch_list, pinned_config

__all__ = ["BACKEND", "interpret_as", "kernel_configs", "launch_list", "pinned_config"]


def _unavailable_reason(device: torch.device) -> Optional[str]:
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


def _on_inputs_device(triton_fn):
    """``triton_fn`` on the inputs' GPU (Triton launches on the current device and stream)."""
    def run(*tensors, **options):
        if tensors[0].is_cuda:
            with torch.cuda.device(tensors[0].device):
                return triton_fn(*tensors, **options)
        return triton_fn(*tensors, **options)
    run.__name__ = triton_fn.__name__
    run.__doc__ = triton_fn.__doc__
    return run


BACKEND = Backend(
    name="triton",
    cube_lse_forward=_on_inputs_device(cube.cube_lse_forward),
    cube_lse_backward=_on_inputs_device(cube.cube_lse_backward),
    pair_lse_forward=_on_inputs_device(pair.pair_lse_forward),
    pair_lse_backward=_on_inputs_device(pair.pair_lse_backward),
    unavailable_reason=_unavailable_reason,
    description="fused Triton kernels (CUDA; CPU through TRITON_INTERPRET=1): one pass forward, two "
                "passes backward, shared exponentials; float64 runs the chunked code",
    float64_route="chunked",
    # The backward passes take needs=(dx, dy, dz, dtau) and skip a pass no input needs.
    skips_unneeded_grads=True,
    # bf16/fp16 tensors go straight to the kernels: tensor-core products, float32 LSEs
    # and accumulation, gradients returned in the input dtype.
    accepts_low_precision=True,
)
