"""The formulas the oracle and the production loss share (docs/math.md sections 1-3).

``symile_kernels.reference`` (the float64 oracle) and ``symile_kernels.loss``
both import these, so neither depends on the other: the multilinear inner
product, the positive logits, and the order in which "n" sampling draws its
permutations.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def mip(representations: Sequence[Tensor]) -> Tensor:
    """Row-wise multilinear inner product ``sum_d prod_m R_m[i, d]`` (docs/math.md section 1).

    representations: M tensors (N, d) of one dtype and device. Returns (N,) in that dtype.
    """
    product = representations[0]
    for r in representations[1:]:
        product = product * r
    return product.sum(dim=-1)


def positive_logits(representations: Sequence[Tensor], logit_scale: Union[float, Tensor]) -> Tensor:
    """``p(i) = tau * MIP(R_1[i], ..., R_M[i])`` (N,), the logit of each row's positive tuple.

    With a tensor ``logit_scale`` the rows are cast to its dtype first (the loss
    computes the positive term in tau's compute dtype, float32 or float64).
    """
    if isinstance(logit_scale, Tensor):
        representations = [r.to(logit_scale.dtype) for r in representations]
    return logit_scale * mip(representations)


def draw_n_permutations(M: int, N: int) -> list[list[Tensor]]:
    """The permutations of "n" sampling (docs/math.md section 3), in the reference package's order.

    Returns ``perms[m]``: for anchor m, one ``torch.randperm(N)`` (CPU, default
    generator) per other modality, in increasing modality order.
    """
    return [[torch.randperm(N) for other in range(M) if other != m] for m in range(M)]
