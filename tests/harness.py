"""The one test harness: docs/math.md section 6's inputs, tolerances and the comparison with the float64 oracle.

Every backend's tests use ``check_against_oracle``: it runs ``symile_loss`` (or
``clip_loss``) with the backend under test on inputs of a given dtype, the
oracle in float64 on the same values, and compares the loss and every gradient
(each representation and tau) by relative error at docs/math.md's tolerances.
``make_inputs`` makes every input kind of docs/math.md section 6.1; the torch
seed comes from tests/conftest.py (one per test).
"""
from __future__ import annotations

from typing import NamedTuple

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
# Every kind make_inputs knows (docs/math.md section 6.1), the variants included.
KINDS = ("unit", "gaussian", "ties", "ties_alternating", "huge_row", "huge_unit", "faint")


def make_inputs(kind: str, M: int, N: int, d: int, generator: torch.Generator = None) -> list[torch.Tensor]:
    """M float64 tensors (N, d) of one of docs/math.md section 6.1's kinds (fresh random values).

    unit: L2-normalised rows; gaussian: unnormalised N(0, 1) rows;
    ties: unit rows, each modality repeats its first row in its second half;
    ties_alternating: unit rows, every row of each modality is one of two rows;
    huge_row: Gaussian rows, each modality's middle row six times longer;
    huge_unit: unit rows, the first modality's middle row ten times longer (logits up to 10 tau);
    faint: unit rows near one direction (logits near tau) and one faint last-modality row
    (logits near 0), so tiles span more than 30 nats (the kernels' second-exponential paths).
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
    return reps


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / max(||ref||, 1e-3)``: the floor keeps an exactly-zero reference (N = 1:
    every gradient is 0) from turning rounding noise into an infinite relative error."""
    ref = ref.detach().double()
    return ((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-3)).item()


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)``; NaN or inf in ``out`` fails."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    scale = max(float(ref.norm()), floor)
    return float((out - ref).norm()) / scale if scale > 0 else float(out.norm())


def check_against_oracle(backend: str, reps64: list[torch.Tensor], tau: float, *, dtype=torch.float64,
                         negative_sampling: str = "n_squared", loss: str = "symile", tolerance=None,
                         device: str = "cpu", seed: int = 0, floor: float = None) -> dict:
    """Asserts loss and all gradients of ``backend`` match the float64 oracle; returns the errors.

    reps64: float64 CPU tensors; the backend sees them cast to ``dtype`` on
    ``device``, the oracle sees those cast values in float64. A random
    ``grad_output`` scales the backward pass. ``tolerance`` is a TOLERANCES key
    (defaults to ``dtype``). ``floor``: None floors each gradient's denominator at
    5% of the positive part's gradient (docs/math.md section 6.1) and the loss's
    at 0; a number floors the loss's and every gradient's denominator at it
    (``rel``'s 1e-3 is stricter than the 5% floor where gradients cancel).
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
    if floor is not None:
        floors = [floor] * len(floors)

    assert value.dtype == dtype, f"loss dtype {value.dtype}, expected {dtype}"
    errors = {"loss": relative_error(value, expected, floor or 0.0)}
    for m, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == (inputs + [tau_in])[m].dtype, "gradient dtype differs from its input's"
        errors["dtau" if m == len(inputs) else f"d{m}"] = relative_error(g, e, floors[m])
    assert errors["loss"] <= loss_tol, f"loss error {errors['loss']:.3g} > {loss_tol}: {errors}"
    for name, err in errors.items():
        if name != "loss":
            assert err <= grad_tol, f"{name} error {err:.3g} > {grad_tol}: {errors}"
    return errors


def check_compile_matches_eager(step, reps: list[torch.Tensor], tolerance: float = 1e-6) -> None:
    """``torch.compile(step, fullgraph=True)`` gives eager's loss and gradients.

    step(x, y, z, log_tau) returns a scalar loss; ``reps`` are its three
    representations, log_tau is 2.0 on their device. Eager runs first (a backend's
    availability is then cached); both runs draw the same seed ("n" sampling).
    """
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        args = [r.clone().requires_grad_() for r in reps] + [torch.tensor(2.0, device=reps[0].device,
                                                                          requires_grad=True)]
        torch.manual_seed(3)
        loss = fn(*args)
        loss.backward()
        results.append([loss.detach()] + [a.grad for a in args])
    for eager, comp in zip(*results):
        assert relative_error(comp, eager) < tolerance


class Case(NamedTuple):
    """One correctness case: M modalities of N rows of d features of input ``kind`` at ``tau``,
    computed in ``dtype`` (``_test_correctness`` runs it against the oracle)."""

    M: int
    N: int
    d: int
    kind: str
    tau: float
    dtype: torch.dtype
    negative_sampling: str = "n_squared"
    loss: str = "symile"
    seed: int = 0
    floor: float | None = None  # None: docs/math.md section 6.1's floor; 1e-3: harness.rel's stricter one

    def id(self) -> str:
        extra = "" if self.loss == "symile" and self.negative_sampling == "n_squared" else \
            f"-{self.loss if self.loss != 'symile' else self.negative_sampling}"
        return f"M{self.M}-N{self.N}-d{self.d}-{self.kind}-tau{self.tau}-{str(self.dtype)[6:]}{extra}"


def _test_correctness(backend: str, case: Case, device: str = "cpu") -> dict:
    """Asserts ``backend``'s loss and gradients on ``case`` match the float64 oracle; returns the errors."""
    return check_against_oracle(backend, make_inputs(case.kind, case.M, case.N, case.d), case.tau,
                                dtype=case.dtype, negative_sampling=case.negative_sampling, loss=case.loss,
                                device=device, seed=case.seed, floor=case.floor)
