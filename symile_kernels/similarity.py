"""Zero-shot scoring by the multilinear inner product (docs/math.md section 4)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def mip_similarity(candidates: Tensor, query_reps: Sequence[Tensor]) -> Tensor:
    """Scores ``(prod_r Q_r) @ C^T``.

    Args:
        candidates: (K, d) representations of the missing modality.
        query_reps: r >= 1 tensors, each (B, d) or (d,), of the query modalities.

    Returns:
        (B, K) scores, (1, K) when every query is 1-D; the argmax over the last
        dimension is the zero-shot prediction.
    """
    if not isinstance(candidates, Tensor):
        raise TypeError(f"candidates must be a torch.Tensor; got {type(candidates).__name__}")
    if candidates.dim() != 2 or not candidates.is_floating_point():
        raise ValueError(f"candidates must be a floating (K, d) tensor; got {candidates.dtype} {tuple(candidates.shape)}")
    if isinstance(query_reps, Tensor) or not isinstance(query_reps, (list, tuple)) or not query_reps:
        raise TypeError("query_reps must be a non-empty list or tuple of (B, d) or (d,) tensors")
    d = candidates.shape[1]
    for q, r in enumerate(query_reps):
        if not isinstance(r, Tensor) or not r.is_floating_point():
            raise TypeError(f"query_reps[{q}] must be a floating torch.Tensor")
        if r.dim() not in (1, 2) or r.shape[-1] != d:
            raise ValueError(f"query_reps[{q}] must have shape (B, {d}) or ({d},); got {tuple(r.shape)}")
        if r.device != candidates.device:
            raise ValueError(f"query_reps[{q}] is on {r.device} but candidates are on {candidates.device}")
    product = query_reps[0]
    for r in query_reps[1:]:
        product = product * r
    scores = product @ candidates.T
    return scores.unsqueeze(0) if scores.dim() == 1 else scores


class MIPSimilarity:
    """Drop-in for ``symile.MIPSimilarity``: ``sim(candidates, query_reps)`` returns (B, K) scores."""

    def forward(self, candidates: Tensor, query_reps: Sequence[Tensor]) -> Tensor:
        return mip_similarity(candidates, query_reps)

    __call__ = forward
