"""The oracle against explicit loops and against the reference package ``symile`` 0.1.0."""
import itertools
import math

import pytest
import torch

from symile_kernels.reference import clip_loss_reference, mip, symile_loss_reference


def brute_force_n_squared(reps, tau):
    """docs/math.md section 2 with Python loops: one LSE per (anchor, row) over every candidate tuple."""
    M, N = len(reps), reps[0].shape[0]
    rows = [[r[i].tolist() for i in range(N)] for r in reps]

    def logit(indices):
        return tau * sum(math.prod(rows[m][indices[m]][k] for m in range(M)) for k in range(len(rows[0][0])))

    total = 0.0
    for m in range(M):
        for i in range(N):
            values = [logit(others[:m] + (i,) + others[m:]) for others in itertools.product(range(N), repeat=M - 1)]
            top = max(values)
            lse = top + math.log(sum(math.exp(v - top) for v in values))
            total += (lse - logit((i,) * M)) / N
    return total / M


@pytest.mark.parametrize("M,N,d", [(2, 3, 2), (3, 3, 4), (3, 4, 1), (4, 3, 3)])
def test_oracle_matches_loops(M, N, d):
    reps = [torch.randn(N, d, dtype=torch.float64) for _ in range(M)]
    tau = 1.7
    assert abs(float(symile_loss_reference(reps, tau)) - brute_force_n_squared(reps, tau)) < 1e-12


def test_clip_oracle_matches_loops():
    reps = [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    expected = 0.0
    for a, b in itertools.combinations(range(3), 2):
        # symmetric InfoNCE for the pair = the M = 2 Symile loss
        expected += brute_force_n_squared([reps[a], reps[b]], 2.0)
    assert abs(float(clip_loss_reference(reps, 2.0)) - expected) < 1e-12


def test_mip():
    reps = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    expected = torch.tensor([sum(reps[0][i, k] * reps[1][i, k] * reps[2][i, k] for k in range(3)) for i in range(4)])
    assert torch.allclose(mip(reps), expected.double(), rtol=0, atol=1e-14)


symile = pytest.importorskip("symile", reason="the reference package symile==0.1.0 is a test dependency")


@pytest.mark.parametrize("M,N,d", [(3, 6, 5), (3, 9, 16), (4, 5, 7)])
def test_oracle_matches_symile_package_n_squared(M, N, d):
    reps = [torch.nn.functional.normalize(torch.randn(N, d, dtype=torch.float64), dim=1) for _ in range(M)]
    ours = symile_loss_reference(reps, 14.3, "n_squared")
    theirs = symile.Symile(negative_sampling="n_squared")(reps, 14.3)
    assert abs(float(ours) - float(theirs)) <= 1e-10


@pytest.mark.parametrize("M,N,d", [(3, 10, 8), (5, 7, 4)])
def test_oracle_matches_symile_package_n_same_seed(M, N, d):
    reps = [torch.randn(N, d, dtype=torch.float64) for _ in range(M)]
    torch.manual_seed(123)
    ours = symile_loss_reference(reps, 3.0, "n")
    torch.manual_seed(123)
    theirs = symile.Symile(negative_sampling="n")(reps, 3.0)
    assert abs(float(ours) - float(theirs)) <= 1e-10
    torch.manual_seed(124)  # a different draw gives a different value: the seed is really used
    assert abs(float(symile_loss_reference(reps, 3.0, "n")) - float(ours)) > 1e-6
