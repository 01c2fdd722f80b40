"""Shared test helpers: docs/math.md section 6's inputs and the comparison with the float64 oracle.

Every backend's tests use ``check_against_oracle``: it runs ``symile_loss`` (or
``clip_loss``) with the backend under test on inputs of a given dtype, the
oracle in float64 on the same values, and compares the loss and every gradient
(each representation and tau) by relative error at docs/math.md's tolerances.
"""
from __future__ import annotations

import torch

from symile_kernels import clip_loss, symile_loss
from symile_kernels.reference import clip_loss_reference, mip, symile_loss_reference

# docs/math.md section 6: (loss, gradients) relative-error tolerances per compute mode.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    "tf32": (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (2e-2, 5e-2),
}

# (kind, tau): unit rows at three temperatures, Gaussian rows, ties, one huge row.
INPUT_KINDS = [("unit", 1.0), ("unit", 14.3), ("unit", 100.0), ("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0)]


def make_inputs(kind: str, M: int, N: int, d: int, generator: torch.Generator = None) -> list[torch.Tensor]:
    """M float64 tensors (N, d) of one of docs/math.md section 6's kinds (fresh random values)."""
    reps = [torch.randn(N, d, dtype=torch.float64, generator=generator) for _ in range(M)]
    if kind in ("unit", "ties"):
        reps = [torch.nn.functional.normalize(r, dim=1) for r in reps]
    if kind == "ties":  # identical rows: every modality repeats its first row in its second half
        for r in reps:
            r[N // 2:] = r[0]
    elif kind == "huge_row":
        for r in reps:
            r[N // 2] *= 6.0
    elif kind not in ("unit", "gaussian"):
        raise ValueError(kind)
    return reps


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)``; NaN or inf in ``out`` fails."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    scale = max(float(ref.norm()), floor)
    return float((out - ref).norm()) / scale if scale > 0 else float(out.norm())


def check_against_oracle(backend: str, reps64: list[torch.Tensor], tau: float, *, dtype=torch.float64,
                         negative_sampling: str = "n_squared", loss: str = "symile", tolerance=None,
                         device: str = "cpu", seed: int = 0) -> dict:
    """Asserts loss and all gradients of ``backend`` match the float64 oracle; returns the errors.

    reps64: float64 CPU tensors; the backend sees them cast to ``dtype`` on
    ``device``, the oracle sees those cast values in float64. A random
    ``grad_output`` scales the backward pass. ``tolerance`` is a TOLERANCES key
    (defaults to ``dtype``).
    """
    loss_tol, grad_tol = TOLERANCES[tolerance if tolerance is not None else dtype]
    inputs = [r.to(device=device, dtype=dtype).requires_grad_() for r in reps64]
    tau_in = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=device, requires_grad=True)
    exact = [r.detach().to(torch.float64).cpu().requires_grad_() for r in inputs]
    tau_exact = tau_in.detach().double().cpu().requires_grad_()
    grad_output = torch.rand((), dtype=torch.float64) + 0.5

    torch.manual_seed(seed)
    if loss == "symile":
        value = symile_loss(inputs, tau_in, negative_sampling=negative_sampling, backend=backend)
    else:
        value = clip_loss(inputs, tau_in, backend=backend)
    grads = torch.autograd.grad(value, inputs + [tau_in], grad_output.to(device=device, dtype=value.dtype))

    torch.manual_seed(seed)
    if loss == "symile":
        expected = symile_loss_reference(exact, tau_exact, negative_sampling)
    else:
        expected = clip_loss_reference(exact, tau_exact)
    expected_grads = torch.autograd.grad(expected, exact + [tau_exact], grad_output)
    # A gradient is the difference of the LSE part and the positive part. Where they
    # cancel (N = 1, or d = 1 unit rows, all +-1) the result's norm says nothing of the
    # rounding, which scales with the cancelled terms (float32: ~1e-7 sqrt(d) of them),
    # so the denominator is at least 5% of the positive part's gradient norm.
    positive = grad_output * tau_exact * mip(exact).mean()
    floors = [0.05 * float(g.norm()) for g in torch.autograd.grad(positive, exact + [tau_exact])]

    assert value.dtype == dtype, f"loss dtype {value.dtype}, expected {dtype}"
    errors = {"loss": relative_error(value, expected)}
    for m, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == (inputs + [tau_in])[m].dtype, "gradient dtype differs from its input's"
        errors["dtau" if m == len(inputs) else f"d{m}"] = relative_error(g, e, floors[m])
    assert errors["loss"] <= loss_tol, f"loss error {errors['loss']:.3g} > {loss_tol}: {errors}"
    for name, err in errors.items():
        if name != "loss":
            assert err <= grad_tol, f"{name} error {err:.3g} > {grad_tol}: {errors}"
    return errors
