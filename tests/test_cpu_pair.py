"""The C++ CPU backend's pair LSE kernel (the "n" sampling and CLIP path) at sizes
that span several tiles, against the float64 oracle and the chunked backend.

tests/test_cpu_backend.py covers small sizes (one tile); here N and J exceed
the kernel's BLOCK_I and BLOCK_J (256), so the in-order fold of db across
i-blocks and the diagonal crossing tile borders are exercised.
"""
import pytest
import torch
import torch.nn.functional as F

import symile_kernels
from symile_kernels import chunked
from symile_kernels import cpu as cpu_backend

from oracle_check import INPUT_KINDS, TOLERANCES, check_against_oracle, make_inputs, relative_error

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


# The fused forward (ops.pair_lse_fused: L together with U = P b, V = P^T a, Pd, rowdot), which the
# losses run when gradients are needed, against the recomputing backward of ops.pair_lse.

def _grads(op, a, b, pos, t, weights, needs):
    leaves = [x.clone().requires_grad_(need) for x, need in zip((a, b, pos, t), needs)]
    L = op(*leaves)
    wanted = [x for x in leaves if x.requires_grad]
    return L.detach(), torch.autograd.grad((L * weights).sum(), wanted)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["uniform", "random"])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False),
                                   (False, True, False, False), (False, False, True, True)],
                         ids=["all", "a", "b", "pos+tau"])
def test_fused_forward_gives_the_recomputing_backward(needs, weights, dtype):
    """Uniform weights (a mean loss) take db from V; other weights recompute db; I < J, two i-blocks."""
    a, b, pos, t, gL = _pair_inputs(300, 389, 19, 14.3, dtype=dtype, seed=4)
    w = torch.full_like(gL, 1 / 300) if weights == "uniform" else gL
    fused = lambda *x: symile_kernels.ops.pair_lse_fused(*x, "cpu", list(needs))[0]  # noqa: E731
    plain = lambda *x: OPS.pair_lse(*x, "cpu")  # noqa: E731
    L_fused, g_fused = _grads(fused, a, b, pos, t, w.to(torch.float64), needs)
    L_plain, g_plain = _grads(plain, a, b, pos, t, w.to(torch.float64), needs)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(L_fused, L_plain) <= loss_tol
    assert len(g_fused) == sum(needs)
    for out, ref in zip(g_fused, g_plain):
        assert relative_error(out, ref) <= grad_tol


def test_losses_run_the_fused_forward_only_when_gradients_are_needed(monkeypatch):
    calls = []
    real = cpu_backend.BACKEND.pair_lse_forward_grads
    monkeypatch.setattr(cpu_backend.BACKEND, "pair_lse_forward_grads", lambda *x: calls.append(x[4:]) or real(*x))
    reps = [F.normalize(torch.randn(40, 8), dim=1) for _ in range(3)]
    with torch.no_grad():
        symile_kernels.Symile(backend="cpu")(reps, 14.3)
    assert calls == []
    reps[2].requires_grad_()  # only z: U (for da) is needed where z is the anchor, V where it is a partner
    symile_kernels.Symile(backend="cpu")(reps, torch.tensor(14.3)).backward()
    assert sorted(calls) == [(False, True), (False, True), (True, False)]


def test_opcheck_fused_pair_ops():
    a, b = (torch.randn(9, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = torch.randn(9, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.pair_lse_fused, (a, b, pos, tau, "cpu", [True, True, True, True]))
    torch.library.opcheck(OPS.pair_lse_fused, (a, b, pos, tau, "cpu", [False, True, False, False]))
    torch.library.opcheck(OPS.cpu_pair_lse_forward_grads, (a.detach(), b.detach(), pos.detach(), tau.detach(),
                                                           True, True))
