"""Zero-shot retrieval scores and the metrics people report for them.

For each query item, the candidates of the target modality are ranked by

- Symile: the MIP of the candidate with the product of the query modalities'
  representations (``mip_similarity``, the functional ``MIPSimilarity``);
- CLIP: the sum over query modalities of the pairwise dot products with the
  candidate (the Symile paper's CLIP baseline; query-query terms are the same
  for every candidate and left out).

The rank of the true candidate is 1 + the number of other candidates that
score strictly higher (a tie counts in the item's favour). From the ranks:
top-k accuracy (rank <= k) for k = 1, 5, 10 and the mean reciprocal rank.
Scores are formed in blocks of at most ``budget`` (queries x candidates)
entries, so evaluation memory does not grow with the test set.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from .. import mip_similarity
from .model import unwrap

TOP_K = (1, 5, 10)
DEFAULT_BUDGET = 1 << 24  # score entries per block: 64 MiB of float32


def score_matrix(candidates: Tensor, queries: Sequence[Tensor], loss: str) -> Tensor:
    """(B, K) scores of B query items (queries: one (B, d) tensor per query
    modality) against K candidates (K, d), for ``loss`` "symile" or "clip"."""
    if loss == "symile":
        return mip_similarity(candidates, list(queries))
    return sum(q @ candidates.T for q in queries)


def true_scores(candidates: Tensor, queries: Sequence[Tensor], labels: Tensor, loss: str) -> Tensor:
    """(B,) score of each item's own candidate ``candidates[labels]``."""
    own = candidates[labels]
    if loss == "symile":
        product = own
        for q in queries:
            product = product * q
        return product.sum(dim=1)
    return sum((q * own).sum(dim=1) for q in queries)


def ranks(candidates: Tensor, queries: Sequence[Tensor], labels: Tensor, loss: str,
          budget: int = DEFAULT_BUDGET) -> Tensor:
    """(B,) int64 rank (1 = best) of candidate ``labels[i]`` for item i.

    Never forms a score block of more than ``max(budget, 1)`` entries.

    Args:
        candidates: (K, d) candidate representations.
        queries: one (B, d) tensor per query modality.
        labels: (B,) int64 in [0, K).
        loss: "symile" or "clip".
    """
    count, b = candidates.shape[0], labels.shape[0]
    per_block = max(1, int(budget))
    width = min(count, per_block)
    height = max(1, per_block // width)
    out = torch.empty(b, dtype=torch.int64)
    for q0 in range(0, b, height):
        rows = slice(q0, min(q0 + height, b))
        part = [q[rows] for q in queries]
        label = labels[rows].to(candidates.device)
        own = true_scores(candidates, part, label, loss)
        above = torch.zeros(label.shape[0], dtype=torch.int64, device=candidates.device)
        for c0 in range(0, count, width):
            block = score_matrix(candidates[c0:c0 + width], part, loss)
            # The item's own candidate is not "another candidate", whatever rounding says.
            inside = (label >= c0) & (label < c0 + block.shape[1])
            block[inside.nonzero().squeeze(1), label[inside] - c0] = -float("inf")
            above += (block > own[:, None]).sum(dim=1)
        out[rows] = (above + 1).cpu()
    return out


def metrics(rank: Tensor, prefix: str = "") -> Dict[str, float]:
    """``{prefix + "top1": ..., "top5", "top10", "mrr", "queries"}`` from (B,) ranks."""
    rank = rank.to(torch.float64)
    out = {f"{prefix}top{k}": float((rank <= k).double().mean()) for k in TOP_K}
    out[f"{prefix}mrr"] = float((1.0 / rank).mean())
    out[f"{prefix}queries"] = int(rank.numel())
    return out


@torch.no_grad()
def evaluate_split(model: nn.Module, split, loss: str, device: torch.device, budget: int = DEFAULT_BUDGET,
                   batch_size: int = 4096) -> Dict[str, float]:
    """Ranks of every item of a ``features.FeatureSplit`` with a target: metrics
    (``metrics``) plus ``candidates``, the number of candidates K.

    Encodes the K candidates once ((K, d) kept), then the query items in
    batches of ``batch_size`` rows, scoring blocks of at most ``budget``."""
    encoders = unwrap(model)
    was_training = model.training
    model.eval()
    targets = split.targets()
    parts: List[Tensor] = []
    for start in range(0, targets.count, batch_size):
        x = targets.candidates(start, min(start + batch_size, targets.count)).to(device)
        parts.append(encoders.encode(split.target, x, torch.zeros(x.shape[0], device=device)))
    candidates = torch.cat(parts)
    labels = torch.from_numpy(targets.labels)
    evaluated = torch.nonzero(labels >= 0).squeeze(1)
    found = []
    for start in range(0, len(evaluated), batch_size):
        index = evaluated[start:start + batch_size]
        batch = split.batch(index)
        queries = [encoders.encode(m, batch["inputs"][m].to(device), batch["missing"][m].to(device))
                   for m in split.queries]
        found.append(ranks(candidates, queries, labels[index], loss, budget))
    model.train(was_training)
    out = metrics(torch.cat(found))
    out["candidates"] = targets.count
    return out
