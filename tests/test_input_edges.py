"""tau at the edges of the compute dtype, the raw operators' input checks on every backend,
and the clear refusal of double backward (issue 14 items 13, 15, 16)."""
import numpy as np
import pytest
import torch

import symile_kernels as sk
from symile_kernels import backends

OPS = torch.ops.symile_kernels
BACKENDS = [name for name in ("chunked", "cpu", "triton", "cuda") if backends.unavailable_reason(name, torch.device("cpu")) is None]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_op_checks_its_inputs(backend):
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    tau = torch.tensor(2.0)
    with pytest.raises(ValueError, match="a has 5 rows but b only 4"):
        OPS.pair_lse(a, b, torch.zeros(5), tau, backend)
    with pytest.raises(ValueError, match="a must be 2-D"):
        OPS.pair_lse(a[:0], b, torch.zeros(0), tau, backend)
    with pytest.raises(ValueError, match="d = 2"):
        OPS.pair_lse(b, a[:, :2].contiguous(), torch.zeros(4), tau, backend)
    with pytest.raises(ValueError, match="pos must have shape"):
        OPS.pair_lse(b, a, torch.zeros(3), tau, backend)
    with pytest.raises(TypeError, match="tau must be a 0-dim torch.float32 tensor on cpu"):
        OPS.pair_lse(b, a, torch.zeros(4), torch.tensor(2.0, device="meta"), backend)
    with pytest.raises(TypeError, match="tau must be a 0-dim torch.float32"):
        OPS.pair_lse(b, a, torch.zeros(4), torch.tensor(2.0, dtype=torch.float64), backend)
    with pytest.raises(ValueError, match="positive finite"):
        OPS.pair_lse(b, a, torch.zeros(4), torch.tensor(-1.0), backend)
    with pytest.raises(ValueError, match="positive finite"):
        OPS.pair_lse(b, a, torch.zeros(4), torch.tensor(float("inf")), backend)
    with pytest.raises(RuntimeError, match="argument 'tau'"):  # torch's schema check names it
        OPS.pair_lse(b, a, torch.zeros(4), np.float32(2.0), backend)
    L = OPS.pair_lse(b, a, torch.zeros(4), tau, backend).float()  # the backward's dtype
    with pytest.raises(ValueError, match="gL must have shape"):
        OPS.pair_lse_backward(b, a, torch.zeros(4), tau, L, torch.ones(3), backend, [True] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cube_op_checks_its_inputs(backend):
    x, y, z = _reps()
    tau = torch.tensor(2.0)
    with pytest.raises(ValueError, match="y must be 2-D"):
        OPS.cube_lse(x, y[:0], z, tau, backend)
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        OPS.cube_lse(x, y.double(), z, tau, backend)
    with pytest.raises(ValueError, match="positive finite"):
        OPS.cube_lse(x, y, z, torch.tensor(0.0), backend)
    La, Lb, Lc = OPS.cube_lse(x, y[:3].contiguous(), z, tau, backend)  # rectangular cubes are fine
    assert (La.shape, Lb.shape, Lc.shape) == ((4,), (3,), (4,))
    La, Lb, Lc = La.float(), Lb.float(), Lc.float()  # the backward's dtype
    with pytest.raises(ValueError, match="gLb must have shape"):
        OPS.cube_lse_backward(x, y[:3].contiguous(), z, tau, La, Lb, Lc, torch.ones(4), torch.ones(4),
                              torch.ones(4), backend, [True] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling,M", [("n_squared", 3), ("n", 3), ("n_squared", 2)])
def test_double_backward_says_what_to_do(backend, sampling, M):
    reps = _reps(grad=True)[:M]
    loss = sk.symile_loss(reps, 2.0, backend=backend, negative_sampling=sampling)
    grads = torch.autograd.grad(loss, reps, create_graph=True)  # the first backward still works
    want = torch.autograd.grad(sk.symile_loss(reps, 2.0, backend="reference", negative_sampling=sampling)
                               if sampling == "n_squared" else loss, reps, retain_graph=True)
    if sampling == "n_squared":
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        sum(g.square().sum() for g in grads).backward()


def test_reference_backend_has_double_backward():
    reps = _reps(dtype=torch.float64, grad=True)
    grads = torch.autograd.grad(sk.symile_loss(reps, 2.0, backend="reference"), reps, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert all(r.grad is not None and torch.isfinite(r.grad).all() for r in reps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_rows_propagate_as_nan(backend):
    for bad in (float("nan"), float("inf")):
        reps = _reps()
        reps[1][2, 0] = bad
        assert torch.isnan(sk.symile_loss(reps, 2.0, backend=backend)), (backend, bad)
