"""Every backend's loss and gradients against the float64 oracle: one parametrised body.

Each case (modalities, sizes, input kind, tau, dtype, negative sampling, loss)
runs for every backend of ``BACKENDS`` through ``harness._test_correctness``; a new
backend gets the whole battery by adding its name. Backends that need a machine
this one lacks are skipped with the reason. The triton backend runs these cases
in its interpreter child process through the same body (tests/test_triton_backend.py), the cuda
backend through its emulation (tests/test_cuda_emulation.py).
"""
from __future__ import annotations

import pytest
import torch

from symile_kernels import backends

from harness import INPUT_KINDS, Case, _test_correctness

BACKENDS = ["chunked", "cpu"]

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


STRICT = 1e-3
CASES = [
    # M = 3 cubes: awkward sizes, tau up to 100 with unit rows, ties, one huge row, faint rows.
    *[Case(3, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (1, 3, 1.0, "unit"), (2, 1, 14.3, "unit"), (7, 48, 100.0, "unit"), (33, 200, 100.0, "unit"),
        (129, 48, 14.3, "unit"), (33, 3, 1.0, "gaussian"), (7, 48, 1.0, "ties_alternating"),
        (33, 48, 100.0, "ties_alternating"), (33, 48, 14.3, "huge_unit"), (33, 48, 100.0, "huge_unit"),
        (33, 48, 100.0, "faint")]],
    *[Case(3, N, d, "unit", 100.0, dtype) for dtype in (F64, F32, BF16) for N in (1, 2, 7, 33, 130)
      for d in (1, 3, 48)],
    *[Case(3, 33, 48, kind, tau, dtype) for kind, tau in INPUT_KINDS for dtype in (F64, F32)],
    # Other modality counts (M = 2 is the CLIP-shaped pair path, M >= 4 folds modalities).
    *[Case(4, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (7, 5, 14.3, "unit"), (5, 48, 100.0, "unit"), (6, 3, 1.0, "gaussian"), (6, 8, 100.0, "faint")]],
    *[Case(2, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (1, 3, 1.0, "unit"), (33, 48, 100.0, "unit"), (129, 200, 14.3, "ties_alternating"),
        (600, 7, 1.0, "gaussian"), (33, 8, 100.0, "faint")]],
    *[Case(M, N, d, "unit", 14.3, dtype) for dtype in (F64, F32)
      for M, N, d in [(2, 33, 48), (2, 1, 3), (4, 7, 3), (4, 13, 48), (5, 5, 3)]],
    # Negative sampling "n": the backend and the oracle draw the same permutations from one seed.
    *[Case(M, N, d, kind, tau, dtype, "n", seed=1234 + N, floor=STRICT) for dtype in (F64, F32)
      for M, N, d, tau, kind in [(3, 33, 48, 100.0, "unit"), (3, 129, 200, 14.3, "unit"),
                                 (4, 7, 3, 1.0, "gaussian"), (3, 33, 48, 14.3, "huge_unit")]],
    *[Case(M, N, d, "unit", 100.0, dtype, "n", seed=7) for dtype in (F64, F32, BF16)
      for M, N, d in [(2, 33, 5), (3, 130, 48), (3, 7, 1), (5, 33, 3)]],
    # bf16 inputs give bf16 gradients.
    Case(3, 33, 48, "unit", 14.3, BF16, floor=STRICT),
    Case(3, 33, 48, "unit", 14.3, BF16, "n", seed=7, floor=STRICT),
    # The CLIP loss.
    *[Case(M, 33, 48, "unit", 14.3, F64, loss="clip") for M in (2, 3, 4)],
    Case(3, 33, 48, "unit", 14.3, F64, loss="clip", floor=STRICT),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_correctness(backend, case):
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    _test_correctness(backend, case)
