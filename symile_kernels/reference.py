"""The oracle: docs/math.md's definitions, materialised, in the inputs' dtype.

Short and obviously right rather than fast: the "n_squared" loss builds the
whole N^M logit tensor, so keep N small. Tests and benchmarks import these
functions; nothing re-implements them. The formulas the production loss
shares with it (MIP, the positive logits, the "n" permutations) live in
``symile_kernels._math``, re-exported here.
"""
from __future__ import annotations

import string
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._math import draw_n_permutations, mip, positive_logits

__all__ = ["mip", "positive_logits", "draw_n_permutations", "cube_logits", "symile_loss_reference",
           "clip_loss_reference"]


def cube_logits(representations: Sequence[Tensor], logit_scale: Union[float, Tensor]) -> Tensor:
    """All N^M logits ``tau * MIP(R_1[i_1], ..., R_M[i_M])`` as an (N,)*M tensor."""
    letters = string.ascii_letters[: len(representations)]
    equation = ",".join(f"{c}Z" for c in letters) + "->" + letters
    return logit_scale * torch.einsum(equation, *representations)


def symile_loss_reference(representations: Sequence[Tensor], logit_scale: Union[float, Tensor],
                          negative_sampling: str = "n_squared", rows: slice = slice(None)) -> Tensor:
    """The Symile loss of docs/math.md sections 2 ("n_squared") and 3 ("n").

    representations: M >= 2 tensors (N, d) of one dtype and device.
    logit_scale: tau > 0, a float or 0-dim tensor.
    rows: the anchor rows the mean runs over (all by default; one process's
    share in a distributed batch, docs/math.md section 7).
    Returns the 0-dim loss; "n" draws from torch's default CPU generator.
    """
    M, N = len(representations), representations[0].shape[0]
    labels = torch.arange(N, device=representations[0].device)
    if negative_sampling == "n_squared":
        logits = cube_logits(representations, logit_scale)
        # The positive (i, ..., i) of anchor row i sits at flat index i * (1 + N + ... + N^(M-2)).
        stride = sum(N ** p for p in range(M - 1))
        losses = [F.cross_entropy(logits.movedim(m, 0).reshape(N, -1)[rows], labels[rows] * stride)
                  for m in range(M)]
    elif negative_sampling == "n":
        positive = mip(representations)
        losses = []
        for m, perms in enumerate(draw_n_permutations(M, N)):
            others = [r for o, r in enumerate(representations) if o != m]
            shuffled = torch.ones_like(representations[m])
            for r, perm in zip(others, perms):
                shuffled = shuffled * r[perm.to(r.device)]
            logits = representations[m] @ shuffled.T
            logits = torch.where(torch.eye(N, dtype=torch.bool, device=logits.device), positive, logits)
            losses.append(F.cross_entropy(logit_scale * logits[rows], labels[rows]))
    else:
        raise ValueError(f"negative_sampling must be 'n' or 'n_squared'; got {negative_sampling!r}")
    return sum(losses) / M


def clip_loss_reference(representations: Sequence[Tensor], logit_scale: Union[float, Tensor],
                        rows: slice = slice(None)) -> Tensor:
    """Sum over modality pairs (a < b) of the symmetric InfoNCE loss
    ``(CE(tau R_a R_b^T) + CE(tau R_b R_a^T)) / 2``, anchor rows ``rows`` only."""
    N = representations[0].shape[0]
    labels = torch.arange(N, device=representations[0].device)
    total = 0
    for a in range(len(representations)):
        for b in range(a + 1, len(representations)):
            logits = logit_scale * representations[a] @ representations[b].T
            total = total + (F.cross_entropy(logits[rows], labels[rows])
                             + F.cross_entropy(logits.T[rows], labels[rows])) / 2
    return total
