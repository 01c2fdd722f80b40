"""The losses a user writes without this package: the peers the GPU suite's headline table measures.

Each takes ``(representations, tau)`` like ``symile_kernels.symile_loss`` and computes the same
value on the same inputs (the "n" one draws the same permutations), so their rows can be checked
against ours and timed beside them.

* ``cube_einsum_loss``: M = 3 "n_squared" as one ``einsum`` cube and three ``logsumexp``s
  (memory ~N^3 elements; ``torch.compile`` of it is the "torch-compile" peer).
* ``clip_cross_entropy_loss``: M = 2, the materialised N x N logits with ``F.cross_entropy`` both
  ways (open_clip's ``ClipLoss`` formula).
* ``n_cross_entropy_loss``: "n" sampling, per anchor the N x N logits of permuted products with the
  positive on the diagonal and ``F.cross_entropy`` (the reference package's formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from symile_kernels._math import draw_n_permutations, positive_logits


def cube_einsum_loss(reps: list[Tensor], tau: Tensor) -> Tensor:
    x, y, z = reps
    cube = tau * torch.einsum("id,jd,kd->ijk", x, y, z)
    lse = cube.logsumexp((1, 2)) + cube.logsumexp((0, 2)) + cube.logsumexp((0, 1))
    return (lse / 3 - positive_logits(reps, tau).to(cube.dtype)).mean()


def clip_cross_entropy_loss(reps: list[Tensor], tau: Tensor) -> Tensor:
    a, b = reps
    logits = tau * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def n_cross_entropy_loss(reps: list[Tensor], tau: Tensor) -> Tensor:
    N = reps[0].shape[0]
    positive = positive_logits(reps, tau)
    labels = torch.arange(N, device=reps[0].device)
    losses = []
    for m, perms in enumerate(draw_n_permutations(len(reps), N)):
        others = [r for o, r in enumerate(reps) if o != m]
        shuffled = others[0][perms[0].to(labels.device)]
        for r, perm in zip(others[1:], perms[1:]):
            shuffled = shuffled * r[perm.to(labels.device)]
        logits = torch.diagonal_scatter(tau * reps[m] @ shuffled.T, positive.to(reps[m].dtype))
        losses.append(F.cross_entropy(logits, labels))
    return sum(losses) / len(reps)


# backend name of a row -> (loss function, whether it is torch.compile'd, what it computes)
PEERS = {
    "torch-einsum": (cube_einsum_loss, False, "n_squared"),
    "torch-compile": (cube_einsum_loss, True, "n_squared"),
    "torch-ce": (None, False, "n or CLIP"),
}


def peer_loss(backend: str, sampling: str, M: int):
    """The loss function of peer ``backend`` for rows of ``sampling`` and M."""
    if backend == "torch-ce":
        if sampling == "n":
            return n_cross_entropy_loss
        if M != 2:
            raise ValueError("the torch-ce peer computes 'n' sampling or M = 2 (CLIP)")
        return clip_cross_entropy_loss
    fn, compiled, _ = PEERS[backend]
    if sampling != "n_squared" or M != 3:
        raise ValueError(f"the {backend} peer computes M = 3 'n_squared' only")
    return torch.compile(fn) if compiled else fn
