"""Zero-shot scoring by the multilinear inner product (docs/math.md section 4)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def mip_similarity(candidates: Tensor, query_reps: Sequence[Tensor]) -> Tensor:
    """Scores ``(prod_r Q_r) @ C^T``.

    Args:
        candidates: (K, d) floating representations of the missing modality, K >= 1, d >= 1.
        query_reps: r >= 1 tensors of the query modalities, each (B, d) or (d,)
            (a (d,) query is shared by every item), all of candidates' dtype and
            device, and every 2-D one with the same B.

    Returns:
        (B, K) scores in candidates' dtype, (1, K) when every query is 1-D; the
        argmax over the last dimension is the zero-shot prediction.

    Raises:
        TypeError: a non-tensor, a non-floating tensor or no queries.
        ValueError: a wrong shape, K or d of 0, different B, dtypes or devices;
            the message names the argument.
    """
    if not isinstance(candidates, Tensor):
        raise TypeError(f"candidates must be a torch.Tensor; got {type(candidates).__name__}")
    if candidates.dim() != 2 or not candidates.is_floating_point():
        raise ValueError(f"candidates must be a floating (K, d) tensor; got {candidates.dtype} {tuple(candidates.shape)}")
    if 0 in candidates.shape:
        raise ValueError(f"candidates must have K >= 1 rows and d >= 1 features; got shape {tuple(candidates.shape)}")
    if isinstance(query_reps, Tensor) or not isinstance(query_reps, (list, tuple)) or not query_reps:
        raise TypeError("query_reps must be a non-empty list or tuple of (B, d) or (d,) tensors")
    d = candidates.shape[1]
    batch = None  # (index, B) of the first 2-D query
    for q, r in enumerate(query_reps):
        if not isinstance(r, Tensor) or not r.is_floating_point():
            raise TypeError(f"query_reps[{q}] must be a floating torch.Tensor")
        if r.dim() not in (1, 2) or r.shape[-1] != d:
            raise ValueError(f"query_reps[{q}] must have shape (B, {d}) or ({d},); got {tuple(r.shape)}")
        if r.dtype != candidates.dtype:
            raise ValueError(f"query_reps[{q}] has dtype {r.dtype} but candidates have {candidates.dtype}; "
                             f"pass one dtype")
        if r.device != candidates.device:
            raise ValueError(f"query_reps[{q}] is on {r.device} but candidates are on {candidates.device}")
        if r.dim() == 2:
            if batch is None:
                batch = (q, r.shape[0])
            elif r.shape[0] != batch[1]:
                raise ValueError(f"query_reps[{q}] has B = {r.shape[0]} rows but query_reps[{batch[0]}] has "
                                 f"{batch[1]}; every (B, d) query needs the same B")
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
