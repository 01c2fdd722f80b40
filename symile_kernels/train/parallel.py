"""Data-parallel training under ``torchrun`` (docs/math.md section 7).

``torchrun --nproc_per_node=P -m symile_kernels.train ...`` starts P copies of
the trainer with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their
environment. Each copy joins one process group (NCCL for CUDA devices, each
process on ``cuda:LOCAL_RANK``; gloo on the CPU), generates the same data from
the same seeds, wraps its ``Encoders`` (encoders and learned log-temperature)
in ``DistributedDataParallel`` and trains on its ``batch_size / P`` rows of
every global batch, with the loss's ``gather=True`` making each step the
global-batch loss. Rank 0 alone evaluates, prints and writes files.

Without torchrun nothing here does anything: ``current()`` is a one-process
context and the trainer runs exactly as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the group: ``rank`` of ``world_size``
    processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when this process was started by torchrun (or sets its variables)."""
    if not dist.is_available():
        return False
    return dist.is_torchelastic_launched() or all(name in os.environ for name in _ENV)


def environment() -> Context:
    """The context torchrun's variables describe (one process when not launched);
    reads the environment only, so arguments can be checked before joining."""
    if not launched():
        return Context()
    try:
        return Context(*(int(os.environ[name]) for name in _ENV))
    except (KeyError, ValueError) as exc:
        raise RuntimeError(f"torchrun environment incomplete: {', '.join(_ENV)} must be integers ({exc})") from None


def process_device(device: str, context: Context) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA under
    torchrun (one GPU per process), else ``device`` itself."""
    dev = torch.device(device)
    if dev.type == "cuda" and launched():
        return torch.device("cuda", context.local_rank)
    return dev


def init(device: torch.device) -> Context:
    """Joins the default process group described by torchrun's variables
    (``env://``): NCCL for a CUDA ``device`` (made the current device first),
    gloo otherwise. Returns the context."""
    context = environment()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=context.rank, world_size=context.world_size)
    return context


def shutdown() -> None:
    """Leaves the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Context:
    """The default process group's context; one process when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def _collective_device(device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU tensors.
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(value: Tensor, context: Context) -> Tensor:
    """The mean over processes of a 0-dim tensor (a copy; itself on one process).
    Asynchronous on CUDA: no host sync."""
    if not context.distributed:
        return value
    out = value.detach().to(_collective_device(value.device), torch.float64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / context.world_size).to(value.device, value.dtype)


def broadcast_object(value, context: Context):
    """Rank 0's picklable ``value`` (a dict of metrics, say) on every process."""
    if not context.distributed:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
