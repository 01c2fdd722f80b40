"""The CPU kernels' tile product (csrc/cpu/tile_mm.h), through the test-only op
``symile_kernels::cpu_tile_mm_test(A, B, C, accumulate)`` (csrc/cpu/test_ops.cpp, built by
tests/cpu_test_ops.py).

float32 goes through ATen's brgemm (oneDNN micro-kernels), float64 through
addmm; both are checked against a float64 product at the kernels' tile shapes,
ragged edges, row strides wider than the matrix (the kernels pass column blocks
of wider arrays) and with C's old contents either ignored (even NaN) or added.
"""
import pytest
import torch

from symile_kernels import cpu as cpu_backend

import cpu_test_ops

# The production library (for the kernels), then the test-only operators built beside it.
_REASON = cpu_backend.load_reason() or cpu_test_ops.load_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU test operators unavailable: {_REASON}")

# (m, n, k): the kernels' shapes (cube S, W, dz^T; pair S, da, db^T) and ragged ones.
SHAPES = [(256, 256, 64), (256, 64, 256), (64, 256, 256), (37, 53, 19), (1, 1, 1), (5, 300, 7), (300, 3, 129)]
TOL = {torch.float32: 2e-6, torch.float64: 1e-14}


def _tile_mm(A, B, C, accumulate):
    return torch.ops.symile_kernels.cpu_tile_mm_test(A, B, C, accumulate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_tile_mm_matches_float64_product(dtype, m, n, k, accumulate):
    g = torch.Generator().manual_seed(m * 10007 + n * 101 + k)
    # Column blocks of wider arrays: row strides k + 3, n + 5, n + 2.
    A_full = torch.randn(m, k + 3, generator=g, dtype=dtype)
    B_full = torch.randn(k, n + 5, generator=g, dtype=dtype)
    C_full = torch.randn(m, n + 2, generator=g, dtype=dtype)
    A, B = A_full[:, 1:1 + k], B_full[:, 2:2 + n]
    C0 = C_full.clone()
    if not accumulate:
        C_full[:, :n] = float("nan")  # must not be read
    before = (A_full.clone(), B_full.clone())
    out = _tile_mm(A, B, C_full[:, :n], accumulate)
    want = A.double() @ B.double() + (C0[:, :n].double() if accumulate else 0)
    scale = (A.double().abs() @ B.double().abs()).max().item() + (C0.abs().max().item() if accumulate else 0)
    assert out.data_ptr() == C_full.data_ptr()
    assert (C_full[:, :n].double() - want).abs().max().item() <= TOL[dtype] * scale
    assert torch.equal(C_full[:, n:], C0[:, n:]), "wrote outside C's columns"
    assert torch.equal(A_full, before[0]) and torch.equal(B_full, before[1]), "modified an input"


def test_tile_mm_is_deterministic():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(256, 64, generator=g), torch.randn(64, 256, generator=g)
    first = _tile_mm(A, B, torch.empty(256, 256), False)
    for _ in range(3):
        assert torch.equal(_tile_mm(A, B, torch.empty(256, 256), False), first)


def test_tile_mm_rejects_bad_arguments():
    A, B = torch.randn(4, 3), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="C .* must be A"):
        _tile_mm(A, B, torch.empty(4, 4), False)
    with pytest.raises(RuntimeError, match="B must be a 2-D CPU matrix with unit column stride"):
        _tile_mm(A, B.t().contiguous().t(), torch.empty(4, 5), False)
    with pytest.raises(RuntimeError, match="B must be float32 or float64, like A"):
        _tile_mm(A, B.double(), torch.empty(4, 5), False)
