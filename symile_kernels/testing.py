"""A backend against the float64 oracle: docs/math.md section 6's inputs, tolerances and comparison.

For whoever writes or checks a backend (docs/backends.md): the test suite, the GPU suite and a
backend of your own use the same three pieces.

``make_inputs(kind, M, N, d)``
    M float64 tensors (N, d) of one of section 6.1's input kinds (``KINDS``).
``compare_with_oracle(backend, reps64, tau, ...) -> Comparison``
    ``symile_loss`` (or ``clip_loss``) with ``backend`` on the inputs cast to a dtype on a device,
    against the oracle ``symile_kernels.reference`` in float64 on the same cast values: the loss and
    every gradient (each representation and tau) by relative error, at ``TOLERANCES``.
``check_against_oracle(...)``
    the same, raising AssertionError with the errors when one exceeds its tolerance.

Example:
    >>> from symile_kernels.testing import check_against_oracle, make_inputs
    >>> check_against_oracle("chunked", make_inputs("unit", 3, 33, 48), 14.3, dtype=torch.float32)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .loss import clip_loss, symile_loss
from .reference import clip_loss_reference, mip, symile_loss_reference

# docs/math.md section 6: (loss, gradients) relative-error tolerances per compute mode.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    "tf32": (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (2e-2, 5e-2),
}

# (kind, tau): unit rows at three temperatures, Gaussian rows, ties, one huge row, and repeated
# rows at a small tau (the tau gradient's cancellation, docs/math.md section 6.1).
INPUT_KINDS = (("unit", 1.0), ("unit", 14.3), ("unit", 100.0), ("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0),
               ("repeated", 0.01))
# Every kind make_inputs knows (docs/math.md section 6.1), the variants included.
KINDS = ("unit", "gaussian", "ties", "ties_alternating", "huge_row", "huge_unit", "faint", "repeated")


def make_inputs(kind: str, M: int, N: int, d: int, generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """M float64 CPU tensors (N, d) of one of docs/math.md section 6.1's kinds (fresh random values).

    unit: L2-normalised rows; gaussian: unnormalised N(0, 1) rows;
    ties: unit rows, each modality repeats its first row in its second half;
    ties_alternating: unit rows, every row of each modality is one of two rows;
    huge_row: Gaussian rows, each modality's middle row six times longer;
    huge_unit: unit rows, the first modality's middle row ten times longer (logits up to 10 tau);
    faint: unit rows near one direction (logits near tau) and one faint last-modality row
    (logits near 0), so tiles span more than 30 nats (the kernels' second-exponential paths);
    repeated: unit rows, every modality but the first one row repeated N times, so every logit
    of anchor row i is the same and, at a small tau, the tau gradient is a small difference of
    large sums (a float32 sum of N equal terms biases it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {KINDS}")
    normalize = torch.nn.functional.normalize
    if kind == "faint":
        direction = torch.zeros(d, dtype=torch.float64)
        direction[d // 2] = 1  # a basis vector: the multilinear product of M copies is 1
        reps = [normalize(direction + 0.1 / d ** 0.5 * torch.randn(N, d, dtype=torch.float64, generator=generator),
                          dim=1) for _ in range(M)]
        reps[-1][N // 3] *= 1e-3
        return reps
    reps = [torch.randn(N, d, dtype=torch.float64, generator=generator) for _ in range(M)]
    if kind not in ("gaussian", "huge_row"):
        reps = [normalize(r, dim=1) for r in reps]
    if kind == "ties":
        for r in reps:
            r[N // 2:] = r[0]
    elif kind == "ties_alternating":
        reps = [r[torch.arange(N) % 2] for r in reps]
    elif kind == "huge_row":
        for r in reps:
            r[N // 2] *= 6.0
    elif kind == "huge_unit":
        reps[0][N // 2] *= 10
    elif kind == "repeated":
        for r in reps[1:]:
            r[:] = r[0]
    return reps


def relative_error(out: Tensor, ref: Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64; inf when ``out`` has a NaN or an inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    scale = max(float(ref.norm()), floor)
    return float((out - ref).norm()) / scale if scale > 0 else float(out.norm())


class Comparison(NamedTuple):
    """``compare_with_oracle``'s result: relative errors ("loss", "d0", "d1", ..., "dtau"), the
    tolerances, whether the loss and gradients came back in the inputs' dtypes, and the verdict."""

    errors: dict
    loss_tol: float
    grad_tol: float
    dtypes_ok: bool

    @property
    def ok(self) -> bool:
        return self.dtypes_ok and not self.failures()

    def failures(self) -> list[str]:
        """One line per error above its tolerance."""
        return [f"{name} error {err:.3g} > {self.loss_tol if name == 'loss' else self.grad_tol}"
                for name, err in self.errors.items()
                if not err <= (self.loss_tol if name == "loss" else self.grad_tol)]


def compare_with_oracle(backend: str, reps64: list[Tensor], tau: float, *, dtype: torch.dtype = torch.float64,
                        negative_sampling: str = "n_squared", loss: str = "symile",
                        tolerance: Union[torch.dtype, str, None] = None, device: Union[str, torch.device] = "cpu",
                        seed: int = 0, floor: Optional[float] = None,
                        generator: Optional[torch.Generator] = None) -> Comparison:
    """``backend``'s loss and every gradient against the float64 oracle on the same values.

    reps64: float64 CPU tensors (N, d); the backend sees them cast to ``dtype`` on ``device``, the
    oracle (on the same device) sees those cast values in float64. A random upstream gradient in
    [0.5, 1.5) (from ``generator``, else torch's default one) scales the backward pass; both runs
    draw "n"'s permutations after ``torch.manual_seed(seed)``. ``tolerance``: a ``TOLERANCES``
    key (default ``dtype``). ``floor``: None floors each gradient's denominator at 5% of the
    positive part's gradient (docs/math.md section 6.1) and the loss's at 0; a number floors every
    denominator at it.
    """
    loss_tol, grad_tol = TOLERANCES[tolerance if tolerance is not None else dtype]
    inputs = [r.to(device=device, dtype=dtype).requires_grad_() for r in reps64]
    tau_in = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=device, requires_grad=True)
    exact = [r.detach().to(torch.float64).requires_grad_() for r in inputs]
    tau_exact = tau_in.detach().double().requires_grad_()
    grad_output = (torch.rand((), dtype=torch.float64, generator=generator) + 0.5).to(device)

    def run(fn_symile, fn_clip, reps, t):
        torch.manual_seed(seed)
        if loss == "symile":
            return fn_symile(reps, t)
        return fn_clip(reps, t)

    value = run(lambda r, t: symile_loss(r, t, negative_sampling=negative_sampling, backend=backend),
                lambda r, t: clip_loss(r, t, backend=backend), inputs, tau_in)
    grads = torch.autograd.grad(value, inputs + [tau_in], grad_output.to(value.dtype))
    expected = run(lambda r, t: symile_loss_reference(r, t, negative_sampling), clip_loss_reference, exact, tau_exact)
    expected_grads = torch.autograd.grad(expected, exact + [tau_exact], grad_output)
    # A gradient is the difference of the LSE part and the positive part. Where they cancel
    # (N = 1, or d = 1 unit rows, all +-1) the result's norm says nothing of the rounding, which
    # scales with the cancelled terms (float32: ~1e-7 sqrt(d) of them), so the denominator is at
    # least 5% of the positive part's gradient norm.
    positive = grad_output * tau_exact * mip(exact).mean()
    floors = [0.05 * float(g.norm()) for g in torch.autograd.grad(positive, exact + [tau_exact])]
    if floor is not None:
        floors = [floor] * len(floors)

    errors = {"loss": relative_error(value, expected, floor or 0.0)}
    for m, (g, e) in enumerate(zip(grads, expected_grads)):
        errors["dtau" if m == len(inputs) else f"d{m}"] = relative_error(g, e, floors[m])
    dtypes_ok = value.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, inputs + [tau_in]))
    return Comparison(errors, loss_tol, grad_tol, dtypes_ok)


def check_against_oracle(backend: str, reps64: list[Tensor], tau: float, **options) -> dict:
    """``compare_with_oracle`` (same arguments) that raises AssertionError when an error exceeds
    its tolerance or a result's dtype is not its input's; returns the errors."""
    result = compare_with_oracle(backend, reps64, tau, **options)
    assert result.dtypes_ok, f"the loss or a gradient is not in its input's dtype: {result.errors}"
    failures = result.failures()
    assert not failures, f"{'; '.join(failures)}: {result.errors}"
    return result.errors
