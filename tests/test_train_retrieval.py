"""Retrieval never scores broken representations as good ones: NaN or Inf
scores rank last, ties count against the item, and training stops when the
loss or a representation stops being finite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from symile_kernels.train import cli, retrieval
from test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one torch thread)

K, B, D = 8, 40, 6
BUDGETS = (1, 5, K * 3, 1 << 20)  # several blocks per query, one row per block, one block for everything


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.nn.functional.normalize(torch.randn(K, D, generator=gen), dim=1)
    queries = [torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1) for _ in range(2)]
    return candidates, queries, torch.randint(0, K, (B,), generator=gen)


@pytest.mark.parametrize("loss", ["symile", "clip"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_nan_queries_rank_last(loss, budget):
    candidates, queries, labels = problem()
    queries[1] = torch.full_like(queries[1], float("nan"))
    rank = retrieval.ranks(candidates, queries, labels, loss, budget)
    assert rank.tolist() == [K] * B
    found = retrieval.metrics(rank)
    assert found["top1"] <= 1 / K and found["mrr"] == pytest.approx(1 / K)


@pytest.mark.parametrize("budget", BUDGETS)
def test_non_finite_scores_never_beat_a_finite_one(budget):
    candidates, queries, labels = problem(1)
    expected = retrieval.ranks(candidates, queries, labels, "symile", budget)
    broken = candidates.clone()
    rivals = torch.tensor([k for k in range(K) if k not in set(labels[:4].tolist())][:2])
    broken[rivals[0]] = float("nan")
    broken[rivals[1]] = float("inf")
    rank = retrieval.ranks(broken, queries, labels, "symile", budget)
    # Items whose own candidate is intact: the two broken rivals no longer count above them.
    intact = ~torch.isin(labels, rivals)
    assert (rank[intact] <= expected[intact]).all()
    # Items whose own candidate is broken rank last.
    assert (rank[~intact] == K).all()


@pytest.mark.parametrize("loss", ["symile", "clip"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_constant_representations_give_chance_at_best(loss, budget):
    """Encoders that map everything to one point score every candidate alike: a tie, which counts
    against the item, so top-1 is not above chance (it was 1.0 when ties counted for the item)."""
    row = torch.nn.functional.normalize(torch.randn(D), dim=0)
    candidates = row.expand(K, D).contiguous()
    queries = [row.expand(B, D).contiguous(), row.expand(B, D).contiguous()]
    labels = torch.arange(B) % K
    found = retrieval.metrics(retrieval.ranks(candidates, queries, labels, loss, budget))
    assert found["top1"] <= 1 / K


def test_features_near_float32_max_stop_training(tmp_path, capsys):
    """Finite features that overflow the encoders (3e38) make NaN representations: the trainer stops
    with an error naming the run, writes no results, and never reports a score."""
    rng = np.random.default_rng(0)
    path = tmp_path / "huge.npz"
    np.savez(path, a=rng.standard_normal((80, 4)).astype(np.float32), b=np.full((80, 4), 3e38, np.float32),
             c=rng.standard_normal((80, 4)).astype(np.float32))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--task", "features", "--features", str(path), "--target", "c", "--batch-size", "16",
                  "--epochs", "1", "--d", "4", "--quiet", "--out", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "features-symile-n_squared-target-c" in err
    assert "the loss or a representation became NaN or Inf" in err and "Traceback" not in err
    assert not (out / "results.json").exists() and not any((out / "checkpoints").iterdir())

