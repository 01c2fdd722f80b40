"""Global-batch losses across processes (docs/math.md section 7).

With ``gather=True`` each process passes its local (n, d) slice of a global
batch of N = world_size * n rows. ``Shard`` describes that slice and supplies
the two collectives the losses need, both differentiable:

- ``gather(t)``: the global (N, ...) tensor from every process's (n, ...) part;
  its backward sums each process's gradient for a part and returns it to the
  part's owner (an all-reduce, which gloo and NCCL both have).
- ``combine_lse(part)``: the log-sum-exp over processes of partial LSE vectors,
  so one cube split by rows of x yields the global Lb and Lc.

Without ``gather`` the loss uses a one-process shard, whose
collectives are the identity, so one code path serves both.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, shard: "Shard") -> Tensor:
        ctx.shard, ctx.length = shard, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(shard.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=shard.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard = ctx.shard
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=shard.group)
        return grad[shard.rank * ctx.length:(shard.rank + 1) * ctx.length], None


class Shard:
    """This process's rows ``[offset, offset + n)`` of a global batch of N rows."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, group=None):
        self.n, self.world_size, self.rank, self.group = n, world_size, rank, group
        self.N = n * world_size
        self.offset = n * rank
        self.rows = slice(self.offset, self.offset + n)

    def gather(self, t: Tensor) -> Tensor:
        """(r, ...) local part -> (world_size * r, ...) global tensor, parts ordered by rank."""
        return t if self.world_size == 1 else _AllGather.apply(t, self)

    def combine_lse(self, part: Tensor) -> Tensor:
        """LSE over processes of each process's partial LSE vector (same shape)."""
        if self.world_size == 1:
            return part
        return torch.logsumexp(self.gather(part[None]), dim=0)

    def local(self, t: Tensor) -> Tensor:
        """This process's rows of a global (N, ...) tensor."""
        return t if self.world_size == 1 else t[self.rows]

    def roll_to_local(self, t: Tensor) -> Tensor:
        """Rows of a global tensor rotated so that row ``offset + i`` comes first for i = 0:
        the local row i then faces its positive partner at column i."""
        return t if self.offset == 0 else torch.roll(t, -self.offset, dims=0)



def make_shard(gather: bool, process_group, reps: Sequence[Tensor]) -> Shard:
    """The shard of this process for its validated representations ``reps``
    (M tensors (n, d) of one dtype, on one device): a one-process shard
    unless ``gather``.

    Raises TypeError for a non-bool ``gather``, RuntimeError when ``gather`` is
    set without an initialised default (or given) process group, and
    ValueError, the same on every process, when the processes differ in M, n,
    d or dtype: they first all-gather one fixed-size descriptor of those, so a
    mismatch stops every process here, never in a collective of unequal sizes
    (which gloo aborts on and NCCL can hang in).
    """
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool; got {type(gather).__name__}")
    local_rows = reps[0].shape[0]
    if not gather:
        if process_group is not None:
            raise ValueError("process_group is only used with gather=True")
        return Shard(local_rows)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather=True needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    world_size = dist.get_world_size(group=process_group)
    rank = dist.get_rank(group=process_group)
    mine = _descriptor(reps).to(_collective_device(process_group, reps[0].device))
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=process_group)
    described = [_describe(t) for t in every]
    if len(set(described)) != 1:
        raise ValueError("gather=True needs the same number of modalities M, local rows n, features d and dtype "
                         "on every process; got " + "; ".join(f"rank {r}: {text}" for r, text in enumerate(described))
                         + " (give every process an equal share of the global batch, e.g. drop_last=True, with the "
                           "same modalities and dtype)")
    return Shard(local_rows, world_size, rank, process_group)


# Bytes of the dtype's name in the descriptor; torch's floating dtypes have shorter names ("float8_e4m3fnuz").
_NAME_BYTES = 24


def _descriptor(reps: Sequence[Tensor]) -> Tensor:
    """(3 + _NAME_BYTES,) int64: M, n, d, then the dtype's name as bytes (zero-padded)."""
    name = str(reps[0].dtype).replace("torch.", "").encode()[:_NAME_BYTES]
    return torch.tensor([len(reps), *reps[0].shape, *name.ljust(_NAME_BYTES, b"\0")], dtype=torch.int64)


def _describe(descriptor: Tensor) -> str:
    """'M=3, n=4, d=8, float32' from a ``_descriptor``."""
    m, n, d, *name = (int(v) for v in descriptor.cpu())
    return f"M={m}, n={n}, d={d}, " + bytes(name).rstrip(b"\0").decode(errors="replace")


def _collective_device(group, device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU (and CUDA) tensors.
    backend = dist.get_backend(group)
    return device if backend == "nccl" else torch.device("cpu")
