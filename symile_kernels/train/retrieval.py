"""Zero-shot retrieval scores and the metrics people report for them.

For each query item, the candidates of the target modality are ranked by

- Symile: the MIP of the candidate with the product of the query modalities'
  representations (``mip_similarity``, the functional ``MIPSimilarity``);
- CLIP: the sum over query modalities of the pairwise dot products with the
  candidate (the Symile paper's CLIP baseline; query-query terms are the same
  for every candidate and left out).

The rank of the true candidate is 1 + the number of other candidates that
score at least as high: a tie counts against the item, so constant scores
give rank K, never a perfect score. A score that is not finite (NaN, Inf:
representations that overflowed) ranks below every finite one: an item whose
own score is not finite gets rank K, and a rival's non-finite score never
counts above the item. The item's own score is read from the same score
block as its rivals', so equal scores compare equal bit for bit. From the
ranks: top-k accuracy (rank <= k) for k = 1, 5, 10 and the mean reciprocal
rank. Scores are formed in blocks of at most ``budget`` (queries x
candidates) entries, so evaluation memory does not grow with the test set.
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


def ranks(candidates: Tensor, queries: Sequence[Tensor], labels: Tensor, loss: str,
          budget: int = DEFAULT_BUDGET) -> Tensor:
    """(B,) int64 rank (1 = best, K = last) of candidate ``labels[i]`` for item i
    (ties and non-finite scores: see the module docstring).

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
    # Several candidate blocks only when width = per_block, and then one query per chunk: every
    # chunk has all its own candidates in one block, its "home".
    height = max(1, per_block // width)
    out = torch.empty(b, dtype=torch.int64)
    for q0 in range(0, b, height):
        rows = slice(q0, min(q0 + height, b))
        part = [q[rows] for q in queries]
        home = int(labels[q0]) // width * width
        label = labels[rows].to(candidates.device) - home
        block = score_matrix(candidates[home:home + width], part, loss)
        picked = torch.arange(label.shape[0], device=candidates.device)
        own = block[picked, label]
        block[picked, label] = -float("inf")  # the item's own candidate is not a rival
        above = _at_least(block, own)
        for c0 in range(0, count, width):
            if c0 != home:
                above += _at_least(score_matrix(candidates[c0:c0 + width], part, loss), own)
        rank = torch.where(torch.isfinite(own), above + 1, torch.full_like(above, count))
        out[rows] = rank.cpu()
    return out


def _at_least(block: Tensor, own: Tensor) -> Tensor:
    """(b,) number of finite scores in each row of ``block`` (b, k) that are >= ``own`` (b,)."""
    return ((block >= own[:, None]) & torch.isfinite(block)).sum(dim=1)


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
