"""The tests' harness: ``symile_kernels.testing`` (docs/math.md section 6's inputs, tolerances and the
comparison with the float64 oracle, shared with the GPU suite) and what only the tests use.

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

from symile_kernels.testing import (INPUT_KINDS, KINDS, TOLERANCES, check_against_oracle,  # noqa: F401
                                    compare_with_oracle, make_inputs, relative_error)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / max(||ref||, 1e-3)``: the floor keeps an exactly-zero reference (N = 1:
    every gradient is 0) from turning rounding noise into an infinite relative error."""
    ref = ref.detach().double()
    return ((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-3)).item()


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
