"""The pair LSE fused with its gradient's parts (``ops.pair_lse_fused``, docs/math.md section 5),
which the losses run when gradients are needed, against the recomputing backward of
``ops.pair_lse``: every backend with ``pair_lse_forward_grads`` that runs on the CPU here.
(The oracle battery and opcheck of tests/test_conformance.py run the same path through the losses.)
"""
import pytest
import torch
import torch.nn.functional as F

import symile_kernels
from symile_kernels import available_backends, backends

from harness import TOLERANCES, relative_error

OPS = torch.ops.symile_kernels
DTYPES = (torch.float64, torch.float32)
FUSED = [name for name in available_backends("cpu") if name != "reference"
         and backends.get(name).fuses_pair_forward()]


def _pair_inputs(I, J, d, tau, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(I, d, dtype=torch.float64, generator=g), dim=1)
    b = F.normalize(torch.randn(J, d, dtype=torch.float64, generator=g), dim=1)
    pos = tau * (a * b[:I]).sum(1) + torch.randn(I, dtype=torch.float64, generator=g)
    gL = torch.randn(I, dtype=torch.float64, generator=g)
    return [t.to(dtype) for t in (a, b, pos, torch.tensor(tau, dtype=torch.float64))] + [gL]


def _grads(op, a, b, pos, t, weights, needs):
    leaves = [x.clone().requires_grad_(need) for x, need in zip((a, b, pos, t), needs)]
    L = op(*leaves)
    return L.detach(), torch.autograd.grad((L * weights).sum(), [x for x in leaves if x.requires_grad])


def test_the_cpu_backends_have_the_fused_forward():
    assert "chunked" in FUSED
    assert "cpu" in FUSED or symile_kernels.cpu.load_reason() is not None


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["uniform", "random"])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False),
                                   (False, True, False, False), (False, False, True, True)],
                         ids=["all", "a", "b", "pos+tau"])
def test_fused_forward_gives_the_recomputing_backward(needs, weights, dtype, backend):
    """Uniform weights (a mean loss) take db from V; other weights recompute db; I < J, and
    (for cpu) two i-blocks of 256 rows."""
    a, b, pos, t, gL = _pair_inputs(300, 389, 19, 14.3, dtype, seed=4)
    w = torch.full_like(gL, 1 / 300) if weights == "uniform" else gL
    fused = lambda *x: OPS.pair_lse_fused(*x, backend, list(needs))[0]  # noqa: E731
    plain = lambda *x: OPS.pair_lse(*x, backend)  # noqa: E731
    L_fused, g_fused = _grads(fused, a, b, pos, t, w, needs)
    L_plain, g_plain = _grads(plain, a, b, pos, t, w, needs)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(L_fused, L_plain) <= loss_tol
    assert len(g_fused) == sum(needs)
    for out, ref in zip(g_fused, g_plain):
        assert relative_error(out, ref) <= grad_tol


@pytest.mark.parametrize("backend", FUSED)
def test_losses_run_the_fused_forward_only_when_gradients_are_needed(backend, monkeypatch):
    calls = []
    record = backends.get(backend)
    real = record.pair_lse_forward_grads
    monkeypatch.setattr(record, "pair_lse_forward_grads", lambda *x: calls.append(x[4:]) or real(*x))
    reps = [F.normalize(torch.randn(40, 8), dim=1) for _ in range(3)]
    with torch.no_grad():
        symile_kernels.Symile(backend=backend)(reps, 14.3)
    assert calls == []
    reps[2].requires_grad_()  # only z: U (for da) where z is the anchor, V where it is a partner
    symile_kernels.Symile(backend=backend)(reps, torch.tensor(14.3)).backward()
    assert sorted(calls) == [(False, True), (False, True), (True, False)]
