"""tau at the edges of the compute dtype and the oracle's double backward (issue 14 items 13, 16);
every backend's input checks and its refusal of a second derivative: tests/test_conformance.py."""
import pytest
import torch

import symile_kernels as sk


def _reps(n=4, d=3, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("tau", [1e39, 1e-50, torch.tensor(1e39, dtype=torch.float64),
                                 torch.tensor(1e-50, dtype=torch.float64), 10 ** 400],
                         ids=["1e39", "1e-50", "t1e39", "t1e-50", "int10**400"])
def test_tau_out_of_float32_range_is_rejected(tau):
    # 1e39 is inf and 1e-50 is 0 in float32: the loss would be NaN or tau = 0 (which is rejected).
    with pytest.raises(ValueError, match="logit_scale must be a positive finite scalar"):
        sk.symile_loss(_reps(), tau, backend="chunked")


def test_tau_out_of_float32_range_is_fine_in_float64():
    loss = sk.symile_loss(_reps(dtype=torch.float64), 1e-50, backend="chunked")
    want = sk.symile_loss(_reps(dtype=torch.float64), 1e-50, backend="reference")
    torch.testing.assert_close(loss, want)


def test_reference_backend_has_double_backward():
    reps = _reps(dtype=torch.float64, grad=True)
    grads = torch.autograd.grad(sk.symile_loss(reps, 2.0, backend="reference"), reps, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert all(r.grad is not None and torch.isfinite(r.grad).all() for r in reps)
