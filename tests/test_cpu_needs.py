"""The cpu backend's backward runs only the passes that its ``needs`` ask for (docs/math.md section 2).

The work is counted, not timed: in float64 every tile product of the C++ kernels (tile_mm.h) is
one ``aten::addmm`` call, which torch's profiler records with its operand shapes, so the executed
matrix FLOPs (2 m n k per product) are exact. One thread keeps every tile on the profiled thread.
Skipped as a whole, with the reason, when the extension can neither be loaded nor JIT-built here.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from symile_kernels import cpu as cpu_backend
from symile_kernels import symile_loss

from harness import make_inputs

_REASON = cpu_backend.load_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

OPS = torch.ops.symile_kernels
N, D = 9, 5  # the cube is N^3 logits of d = 5; the pair N^2


def _product_flops(run) -> int:
    """Matrix FLOPs of the tile products ``run()`` executes (float64: each one an aten::addmm)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
    finally:
        torch.set_num_threads(previous)
    flops = 0
    for event in prof.events():
        if event.name == "aten::addmm":  # addmm.out(self, mat1 (m, k), mat2 (k, n), beta, alpha, out)
            (m, k), (_, n) = event.input_shapes[1], event.input_shapes[2]
            flops += 2 * m * n * k
    return flops


def _cube_backward(needs):
    x, y, z = make_inputs("unit", 3, N, D)
    tau = torch.tensor(14.3, dtype=torch.float64)
    L = OPS.cpu_cube_lse_forward(x, y, z, tau)
    g = [torch.rand(N, dtype=torch.float64) for _ in range(3)]
    out = []
    flops = _product_flops(lambda: out.extend(cpu_backend.cube_lse_backward(x, y, z, tau, *L, *g, needs)))
    assert [t is not None for t in out] == list(needs)
    for t, like, need in zip(out, (x, y, z, tau), needs):
        assert not need or t.shape == like.shape
    return flops // (2 * N ** 3 * D)  # in units of one cube product, 2 N^3 d


def test_cube_backward_runs_only_the_needed_products():
    # The tile recompute always; W = G z for dx and dy; XY^T G for dz; dtau needs no product.
    assert _cube_backward((True, True, True, True)) == 3
    assert _cube_backward((True, True, False, False)) == 2  # z frozen, tau a float
    assert _cube_backward((True, True, False, True)) == 2  # z frozen
    assert _cube_backward((False, True, False, False)) == 2  # W serves dy alone
    assert _cube_backward((False, False, True, False)) == 2  # x, y frozen
    assert _cube_backward((False, False, False, True)) == 1  # tau alone: the G pass's sum


def _pair_backward(needs):
    a, b = make_inputs("unit", 2, N, D)
    tau = torch.tensor(14.3, dtype=torch.float64)
    pos = tau * (a * b).sum(1)
    L = OPS.cpu_pair_lse_forward(a, b, pos, tau)
    g = torch.rand(N, dtype=torch.float64)
    out = []
    flops = _product_flops(lambda: out.extend(cpu_backend.pair_lse_backward(a, b, pos, tau, L, g, needs)))
    assert [t is not None for t in out] == list(needs)
    return flops // (2 * N ** 2 * D)


def test_pair_backward_runs_only_the_needed_products():
    # The logit tile always; P b for da and dtau; a^T P for db.
    assert _pair_backward((True, True, True, True)) == 3
    assert _pair_backward((True, False, True, False)) == 2
    assert _pair_backward((False, False, False, True)) == 2
    assert _pair_backward((False, True, False, False)) == 2
    assert _pair_backward((False, False, True, False)) == 1


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_partial_gradients_equal_the_full_ones(dtype):
    # Skipping passes changes no value: z frozen and tau a float give the all-gradients dx, dy.
    reps = [r.to(dtype) for r in make_inputs("unit", 3, 33, 48)]
    full = [r.clone().requires_grad_() for r in reps]
    tau = torch.tensor(14.3, dtype=dtype, requires_grad=True)
    expected = torch.autograd.grad(symile_loss(full, tau, backend="cpu"), full + [tau])
    partial = [reps[0].clone().requires_grad_(), reps[1].clone().requires_grad_(), reps[2].clone()]
    got = torch.autograd.grad(symile_loss(partial, 14.3, backend="cpu"), partial[:2])
    for g, e in zip(got, expected[:2]):
        assert torch.equal(g, e)
