"""The C++ CPU backend's pair LSE kernel (the "n" sampling and CLIP path) at sizes
that span several tiles, against the float64 oracle and the chunked backend.

tests/test_cpu_backend.py covers small sizes (one tile); here N and J exceed
the kernel's BLOCK_I and BLOCK_J (256), so the in-order fold of db across
i-blocks and the diagonal crossing tile borders are exercised.
"""
import pytest
import torch
import torch.nn.functional as F

from symile_kernels import chunked
from symile_kernels import cpu as cpu_backend

from harness import INPUT_KINDS, TOLERANCES, check_against_oracle, make_inputs, relative_error

_REASON = cpu_backend.load_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

OPS = torch.ops.symile_kernels
DTYPES = (torch.float64, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,tau", INPUT_KINDS)
def test_n_sampling_several_tiles_matches_oracle(kind, tau, dtype):
    reps = make_inputs(kind, 3, 389, 19, torch.Generator().manual_seed(1))
    check_against_oracle("cpu", reps, tau, dtype=dtype, negative_sampling="n")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,tau", [("unit", 100.0), ("gaussian", 1.0), ("huge_row", 1.0)])
def test_clip_several_tiles_matches_oracle(kind, tau, dtype):
    reps = make_inputs(kind, 2, 517, 33, torch.Generator().manual_seed(2))
    check_against_oracle("cpu", reps, tau, dtype=dtype, loss="clip")


def _pair_inputs(I, J, d, tau, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(I, d, dtype=torch.float64, generator=g), dim=1)
    b = F.normalize(torch.randn(J, d, dtype=torch.float64, generator=g), dim=1)
    pos = tau * (a * b[:I]).sum(1) + torch.randn(I, dtype=torch.float64, generator=g)
    gL = torch.randn(I, dtype=torch.float64, generator=g)
    return [t.to(dtype) for t in (a, b, pos, torch.tensor(tau, dtype=torch.float64), gL)]


@pytest.mark.parametrize("I,J,d,tau", [(521, 777, 19, 100.0), (256, 257, 5, 14.3), (300, 300, 1, 1.0)])
def test_rectangular_pair_ops_match_chunked(I, J, d, tau):
    """I < J (a process's local rows against the global batch), block edges, d = 1."""
    a, b, pos, t, gL = _pair_inputs(I, J, d, tau)
    L_ref = chunked.pair_lse_forward(a, b, pos, t)
    grads_ref = chunked.pair_lse_backward(a, b, pos, t, L_ref, gL)
    for dtype in DTYPES:
        loss_tol, grad_tol = TOLERANCES[dtype]
        c = [x.to(dtype) for x in (a, b, pos, t)]
        L = OPS.cpu_pair_lse_forward(*c)
        assert relative_error(L, L_ref) <= loss_tol
        grads = OPS.cpu_pair_lse_backward(*c, L_ref.to(dtype), gL.to(dtype))
        for name, out, ref in zip(("da", "db", "dpos", "dtau"), grads, grads_ref):
            assert relative_error(out, ref) <= grad_tol, name


def test_pair_ops_gradcheck_several_tiles():
    """float64 gradcheck of the raw ops across two i-blocks and two j-blocks (few columns keep it quick)."""
    a, b, pos, t, gL = _pair_inputs(260, 263, 2, 3.0)
    a, b, pos, t = (x.clone().requires_grad_() for x in (a, b, pos, t))
    fn = lambda a, b, pos, t: (OPS.pair_lse(a, b, pos, t, "cpu") * gL).sum()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, pos, t), eps=1e-6, atol=1e-5, fast_mode=True)


def test_pair_results_are_bitwise_independent_of_thread_count():
    # 8 threads on a small machine: workers get preempted, so shares get parked (OrderedFold): the
    # backward's db and the fused forward's V.
    a, b, pos, t, gL = _pair_inputs(1500, 1600, 24, 14.3, dtype=torch.float32, seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            L = OPS.cpu_pair_lse_forward(a, b, pos, t)
            results.append([L, *OPS.cpu_pair_lse_backward(a, b, pos, t, L.to(a.dtype), gL),
                            *OPS.cpu_pair_lse_forward_grads(a, b, pos, t, True, True)])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)
