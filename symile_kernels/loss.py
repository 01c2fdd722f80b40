"""The public losses: ``symile_loss``, ``clip_loss`` and their Module wrappers.

A thin layer over the LSE operators of ``symile_kernels.ops``: the positive
logits, the means and the average over anchors are plain torch, so autograd
handles them (docs/math.md sections 2 and 3). The formulas it shares with the
oracle come from ``symile_kernels._math``; only ``backend="reference"`` calls the
oracle itself.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends, ops
from ._math import draw_n_permutations, positive_logits
from ._validation import check_negative_sampling, prepare
from .distributed import Shard, make_shard

# Folded rows per cube_lse call for M > 3: big enough to amortise a call, small
# next to the N^(M-2) rows of the fold.
_FOLD_ROWS = 4096


def symile_loss(representations: Sequence[Tensor], logit_scale: Union[float, Tensor], *,
                negative_sampling: str = "n_squared", backend: str = "auto", gather: bool = False,
                process_group=None) -> Tensor:
    """The Symile loss (docs/math.md sections 2-3) without materialising the logits.

    Args:
        representations: M >= 2 tensors of shape (N, d), row i of each belonging
            to tuple i; any floating dtypes, one device, promoted to a common
            dtype. float64 computes in float64, float32 in float32. bf16/fp16
            rows go unconverted to backends that accept low precision ("triton",
            "cuda": products in that dtype, float32 accumulation, LSEs and tau);
            the other backends and the oracle get them cast to float32.
        logit_scale: tau > 0, already exponentiated: a float or a 0-dim tensor
            (gradients flow to it when it requires grad).
        negative_sampling: "n_squared" (all N^(M-1) candidates per anchor) or
            "n" (N candidates, permutations drawn from torch's default CPU
            generator in the order of the reference package ``symile``).
        backend: "auto", "reference" (the oracle) or a name from
            ``available_backends()``; SYMILE_KERNELS_BACKEND overrides "auto".
        gather: each process of ``process_group`` (default: the whole world)
            passes its local (n, d) slice of a global batch, every process the
            same n; the loss contrasts against the whole global batch and
            returns this process's share, so that the mean over processes is the
            single-process loss of the global batch and DistributedDataParallel's
            gradient averaging gives the single-process gradients (
            section 7 of docs/math.md). "n" then needs the same torch seed on every process.

    Returns:
        0-dim tensor in the promoted input dtype (gradients in each input's
        dtype): the mean over anchors m of
        ``mean_i [LSE_m(i) - tau * MIP(R_1[i], ..., R_M[i])]``, i over this
        process's rows.

    Example:
        >>> x, y, z = (torch.nn.functional.normalize(torch.randn(8, 16), dim=1) for _ in range(3))
        >>> loss = symile_loss([x, y, z], logit_scale=14.3)
    """
    check_negative_sampling(negative_sampling)
    reps, tau, choice, out_dtype = _prepare(representations, logit_scale, backend)
    shard = make_shard(gather, process_group, reps)
    if choice.name == "reference":
        from . import reference  # the oracle runs only when asked for by name

        loss = reference.symile_loss_reference([shard.gather(r) for r in reps], tau, negative_sampling,
                                               rows=shard.rows)
    elif negative_sampling == "n":
        loss = _symile_n(reps, tau, choice, shard)
    elif len(reps) == 2:
        loss = _symmetric_pair(reps[0], reps[1], tau, choice, shard)
    else:
        loss = _symile_cube(reps, tau, choice.name, shard)
    return _at_the_edges(loss, reps, shard.N).to(out_dtype)


def clip_loss(representations: Sequence[Tensor], logit_scale: Union[float, Tensor], *,
              backend: str = "auto", gather: bool = False, process_group=None) -> Tensor:
    """Pairwise CLIP baseline: the sum over modality pairs (a < b) of the symmetric
    InfoNCE loss ``(CE(tau R_a R_b^T) + CE(tau R_b R_a^T)) / 2``.

    Same arguments, dtype rules and ``gather`` semantics as ``symile_loss``;
    M >= 2 tensors (N, d). Returns a 0-dim tensor.
    """
    reps, tau, choice, out_dtype = _prepare(representations, logit_scale, backend)
    shard = make_shard(gather, process_group, reps)
    if choice.name == "reference":
        from . import reference

        total = reference.clip_loss_reference([shard.gather(r) for r in reps], tau, rows=shard.rows)
    else:
        total = sum(_symmetric_pair(reps[a], reps[b], tau, choice, shard)
                    for a in range(len(reps)) for b in range(a + 1, len(reps)))
    return _at_the_edges(total, reps, shard.N).to(out_dtype)


def _at_the_edges(loss: Tensor, reps: Sequence[Tensor], N: int) -> Tensor:
    """The loss's contract where backends would differ (docs/math.md section 6.5).

    A NaN or an infinity in any representation makes the loss and every gradient NaN: an LSE
    over a +inf logit is +inf in one backend's arithmetic and inf - inf = NaN in another's, and
    neither is a loss. With one tuple (N = 1 over the whole batch) there are no negatives: each
    LSE runs over one candidate, the positive itself, so the loss is identically 0 and so are
    its gradients; the kernels would round the LSE (max + log(sum), not the logit itself) and
    leave ~1e-7. Both factors are exactly 1 otherwise, so nothing else changes.
    """
    finite = torch.stack([torch.isfinite(r).all() for r in reps]).all()
    loss = loss * torch.where(finite, 1.0, torch.nan).to(loss.dtype)
    return loss * 0 + 0 if N == 1 else loss  # (+ 0: -0.0 becomes 0.0)


class _Choice(NamedTuple):
    """The backend a loss call resolved, once: its name (what the ops take) and whether the pair
    LSE runs fused with its gradient's parts."""

    name: str
    fused_pair: bool


def _prepare(representations, logit_scale, backend: str):
    """Validated inputs in the dtype the backend computes them in, tau, the backend ``_Choice``,
    and the dtype the loss is returned in (the promoted input dtype).

    bf16/fp16 inputs stay in their dtype for backends whose kernels take them (products in
    that dtype, float32 accumulation, ``Backend.row_dtype``); otherwise, and for the oracle,
    they are cast to float32.
    """
    reps, tau = prepare(representations, logit_scale)
    out_dtype = reps[0].dtype
    name, row_dtype, fused_pair = backends.resolve_for_loss(backend, reps[0].device, out_dtype)
    return [r.to(row_dtype) for r in reps], tau, _Choice(name, fused_pair), out_dtype


def _symmetric_pair(a: Tensor, b: Tensor, tau: Tensor, choice: _Choice, shard: Shard) -> Tensor:
    """Symmetric InfoNCE of two (n, d) tensors: the M = 2 Symile loss of the local rows."""
    pos = positive_logits([a, b], tau)
    La = ops.run_pair_lse(a, shard.roll_to_local(shard.gather(b)), pos, tau, *choice)
    Lb = ops.run_pair_lse(b, shard.roll_to_local(shard.gather(a)), pos, tau, *choice)
    return ((La - pos).mean() + (Lb - pos).mean()) / 2


def _symile_n(reps: list[Tensor], tau: Tensor, choice: _Choice, shard: Shard) -> Tensor:
    """docs/math.md section 3: per anchor, N candidates from permuted products of the others."""
    pos = positive_logits(reps, tau)
    everyone = [shard.gather(r) for r in reps]
    losses = []
    for m, perms in enumerate(draw_n_permutations(len(reps), shard.N)):
        others = [r for o, r in enumerate(everyone) if o != m]
        shuffled = _take_rows(others[0], perms[0])
        for r, perm in zip(others[1:], perms[1:]):
            shuffled = shuffled * _take_rows(r, perm)
        L = ops.run_pair_lse(reps[m], shard.roll_to_local(shuffled).contiguous(), pos, tau, *choice)
        losses.append((L - pos).mean())
    return sum(losses) / len(reps)


def _take_rows(r: Tensor, perm: Tensor) -> Tensor:
    """``r[perm]`` for a (N, d) tensor and a (N,) permutation drawn on the CPU."""
    return _PermuteRows.apply(r, perm.to(r.device))


class _PermuteRows(torch.autograd.Function):
    """Rows of r in the order ``perm``, a permutation of range(N): the backward is the inverse
    permutation of the gradient's rows.

    Both directions are gathers. Inductor's randperm-index rewrite (torch/_inductor/fx_passes/
    misc_patterns.py) fails on ``r[randperm(N)]`` and ``index_select``, which broke
    ``torch.compile(fullgraph=True)`` for "n"; and autograd's own backward of a gather is a
    ``scatter_add_`` into zeros, which took 11% of an "n" step at N = 4096 on the CPU.
    """

    @staticmethod
    def forward(r: Tensor, perm: Tensor) -> Tensor:
        return torch.gather(r, 0, perm[:, None].expand(-1, r.shape[1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (perm,) = ctx.saved_tensors
        inverse = torch.argsort(perm)
        return torch.gather(grad, 0, inverse[:, None].expand(-1, grad.shape[1])), None


def _symile_cube(reps: list[Tensor], tau: Tensor, backend: str, shard: Shard) -> Tensor:
    """docs/math.md section 2 for M >= 3 through the M = 3 cube.

    For M > 3 the modalities 4..M are folded into the rows of modality 1: the
    row (l_4, ..., l_M, i) is ``R_1[i] * R_4[l_4] * ... * R_M[l_M]``, so one
    rectangular cube of N^(M-2) x N x N holds every logit, and each anchor's LSE
    is a log-sum-exp of the folded rows' La over the other folded indices.
    Across processes the cube is split by the local rows i of modality 1: La is
    complete, every other anchor's LSE is partial and combined over processes.
    """
    M = len(reps)
    pos = positive_logits(reps, tau)
    x = reps[0]
    y, z, *folded = [shard.gather(r) for r in reps[1:]]
    if not folded:
        La, Lb, Lc = ops.run_cube_lse(x, y, z, tau, backend)
        L = [La, shard.local(shard.combine_lse(Lb)), shard.local(shard.combine_lse(Lc))]
        return sum((Lm - pos).mean() for Lm in L) / M

    N = shard.N
    combos = torch.cartesian_prod(*[torch.arange(N, device=x.device)] * len(folded)).reshape(-1, len(folded))
    per_call = max(1, _FOLD_ROWS // x.shape[0])
    La_parts, Lb_parts, Lc_parts = [], [], []
    for c0 in range(0, combos.shape[0], per_call):
        chunk = combos[c0:c0 + per_call]
        weight = folded[0][chunk[:, 0]]
        for q in range(1, len(folded)):
            weight = weight * folded[q][chunk[:, q]]
        rows = (weight[:, None, :] * x[None, :, :]).reshape(-1, x.shape[1])
        La_rows, Lb_part, Lc_part = ops.run_cube_lse(rows, y, z, tau, backend)
        La_parts.append(La_rows)
        Lb_parts.append(Lb_part)
        Lc_parts.append(Lc_part)
    # La_fold[l_4, ..., l_M, i]: LSE over (j, k) of the folded row, i local.
    La_fold = torch.cat(La_parts).view(*[N] * len(folded), x.shape[0])
    every = tuple(range(La_fold.dim()))
    partial = [torch.logsumexp(torch.stack(Lb_parts), dim=0), torch.logsumexp(torch.stack(Lc_parts), dim=0)]
    partial += [torch.logsumexp(La_fold, dim=tuple(a for a in every if a != q)) for q in range(len(folded))]
    L = [torch.logsumexp(La_fold, dim=every[:-1])] + [shard.local(shard.combine_lse(p)) for p in partial]
    return sum((Lm - pos).mean() for Lm in L) / M


class SymileLoss(nn.Module):
    """``symile_loss`` as a Module.

    Args:
        negative_sampling: "n_squared" (default) or "n".
        backend: "auto" or a backend name (see ``available_backends()``).
        gather, process_group: as in ``symile_loss``.

    Shape:
        - representations: M >= 2 tensors (N, d).
        - logit_scale: float or 0-dim tensor.
        - Output: 0-dim tensor.

    Example:
        >>> loss_fn = SymileLoss()
        >>> loss = loss_fn([x, y, z], logit_scale=14.3)
    """

    def __init__(self, negative_sampling: str = "n_squared", backend: str = "auto", gather: bool = False,
                 process_group=None):
        super().__init__()
        self.negative_sampling = check_negative_sampling(negative_sampling)
        self.backend = _check_backend_name(backend)
        self.gather, self.process_group = gather, process_group

    def forward(self, representations: Sequence[Tensor], logit_scale: Union[float, Tensor]) -> Tensor:
        return symile_loss(representations, logit_scale, negative_sampling=self.negative_sampling,
                           backend=self.backend, gather=self.gather, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"negative_sampling={self.negative_sampling!r}, backend={self.backend!r}, gather={self.gather}"


class Symile(SymileLoss):
    """Drop-in for the reference package's ``symile.Symile``: ``SymileLoss`` with that
    package's default, ``negative_sampling="n"``.

    Called as ``loss_fn(representations, logit_scale)``; for "n" it draws its
    permutations in the reference package's order, so the same torch seed gives
    the same value.
    """

    def __init__(self, negative_sampling: str = "n", backend: str = "auto", gather: bool = False,
                 process_group=None):
        super().__init__(negative_sampling, backend, gather, process_group)


def _check_backend_name(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    if backend not in backends.NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backends.NAMES))}; got {backend!r}")
    return backend
