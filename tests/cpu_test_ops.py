"""The CPU kernels' test-only operators (csrc/cpu/test_ops.cpp), built apart from the production library.

``symile_kernels::cpu_exp_test(x, isa)`` (the vectorised exponential at an instruction set) and
``symile_kernels::cpu_tile_mm_test(A, B, C, accumulate)`` (one tile product) serve
tests/test_cpu_exp.py, tests/test_cpu_tile_mm.py and benchmarks/tile_rate.py. They are not in
``symile_kernels._cpu_kernels``: ``load_reason()`` JIT-builds them once, as the library
"symile_kernels_cpu_test_ops" (torch's extension cache, TORCH_EXTENSIONS_DIR), with the CPU
extension's flags, so they run the headers (vec_rows.h, tile_mm.h) as the kernels compile them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from symile_kernels import _build
from symile_kernels._extension import jit_build

SOURCE = Path(_build.source_root(Path(_build.__file__).resolve().parent)) / "csrc" / "cpu" / "test_ops.cpp"


@functools.lru_cache(maxsize=None)
def load_reason() -> Optional[str]:
    """None once ``torch.ops.symile_kernels.cpu_exp_test`` and ``cpu_tile_mm_test`` are usable, else why not."""
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("symile_kernels::cpu_exp_test", "CPU"):
            return None
    except RuntimeError:  # not registered yet
        pass
    return jit_build("C++ CPU test operators", [SOURCE], "a C++17 compiler is needed",
                     name="symile_kernels_cpu_test_ops", extra_cflags=_build.cpu_cxx_flags(),
                     extra_ldflags=_build.openmp_flags(), verbose=False)
