"""The formulas the oracle and the production loss share (docs/math.md sections 1-3).

``symile_kernels.reference`` (the float64 oracle) and ``symile_kernels.loss``
both import these, so neither depends on the other: the multilinear inner
product, the positive logits, and the order in which "n" sampling draws its
permutations; and the float64 LSE's stand-ins in the compute dtype that the
backward ops and the fused pair forwards use (docs/math.md section 6.4).
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


def shift_and_weight(L: Tensor, gL: "Tensor | None", dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The backward ops' stand-ins for a float64 LSE vector L (n,) and its gradient gL (n,),
    both in the compute ``dtype`` (docs/math.md section 6.4).

    shift is L rounded down to ``dtype``: the largest value <= L, so no logit exceeds it
    (the maximum logit is itself a ``dtype`` value <= L). weight = gL * exp(shift - L),
    formed in float64, puts back the part of L that ``dtype`` cannot hold (at most
    log(n_terms)); then ``weight * exp(S - shift) == gL * exp(S - L)`` term by term.
    """
    if gL is None:
        gL = torch.zeros_like(L)
    if dtype == torch.float64:
        return L, gL.to(dtype).contiguous()
    shift = L.to(dtype)
    shift = torch.where(shift.to(L.dtype) > L, torch.nextafter(shift, torch.full_like(shift, -torch.inf)), shift)
    weight = gL.to(torch.float64) * torch.exp(shift.to(torch.float64) - L)
    return shift, weight.to(dtype)
