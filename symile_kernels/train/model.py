"""Encoders: one small network per modality and a learned log-temperature.

Everything trainable lives in one ``nn.Module`` (``Encoders``) whose
``forward`` takes a whole batch, so ``torch.nn.parallel.DistributedDataParallel``
can wrap it unchanged (its gradient hooks see every parameter used in forward).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

ENCODERS = ("linear", "mlp")
_EPS = 1e-12  # F.normalize's default


def module_names(modalities: Sequence[str]) -> Dict[str, str]:
    """modality key -> the name of its encoder in ``Encoders.encoders`` (and
    in checkpoints' state dicts).

    Keys are data: a feature file may name a modality "", "a.b" or "keys",
    which ``nn.ModuleDict`` refuses (empty, dotted, or one of its attributes).
    A key that torch takes and that is not all digits is its own name, so
    checkpoints keep readable names; any other key is named by its position
    in ``modalities``, a string of digits, which no kept key is.
    """
    probe = nn.ModuleDict()

    def usable(key: str) -> bool:
        return bool(key) and "." not in key and not key.isdigit() and not hasattr(probe, key)

    return {key: key if usable(key) else str(position) for position, key in enumerate(modalities)}


def _encoder(kind: str, in_features: int, d: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, d)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, d))


class Encoders(nn.Module):
    """One encoder per modality plus ``log_tau``.

    Each encoder sees its modality's features and, as one extra input, the 0/1
    missing indicator (always present, so a model trained without missing data
    can still be evaluated with hidden queries, and checkpoints share one
    layout). Outputs are L2-normalised; ``logit_scale = log_tau.exp()``.

    Args:
        input_sizes: modality name (any string; see ``module_names``) -> number
            of input features, in loss order.
        d: representation size.
        encoder: "linear" or "mlp" (one hidden ReLU layer of ``hidden`` units).
        logit_scale_init: initial ``log_tau``.

    Shape:
        - inputs: modality -> (N, F_m) float; missing: modality -> (N,) float 0/1.
        - Output: list of M tensors (N, d) in ``input_sizes`` order, and tau (0-dim).
    """

    def __init__(self, input_sizes: Dict[str, int], d: int, encoder: str = "linear",
                 hidden: int = 64, logit_scale_init: float = math.log(1 / 0.07)):
        super().__init__()
        self.modalities = list(input_sizes)
        self.names = module_names(self.modalities)
        self.encoders = nn.ModuleDict({self.names[m]: _encoder(encoder, f + 1, d, hidden)
                                       for m, f in input_sizes.items()})
        self.log_tau = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def encode(self, modality: str, x: Tensor, missing: Tensor) -> Tensor:
        """(N, F) features and (N,) indicator -> (N, d) unit rows; a row whose
        norm is not finite (the encoder overflowed) comes out all NaN."""
        z = self.encoders[self.names[modality]](torch.cat([x, missing[:, None].to(x.dtype)], dim=1))
        norm = z.norm(2, 1, keepdim=True)
        # F.normalize's arithmetic, except that where the norm overflows (inputs near float32's limit) it
        # would give a silently constant all-zero row: NaN instead, which training and retrieval refuse.
        return torch.where(torch.isfinite(norm), z / norm.clamp_min(_EPS), torch.nan)

    def forward(self, inputs: Dict[str, Tensor], missing: Dict[str, Tensor]) -> Tuple[List[Tensor], Tensor]:
        reps = [self.encode(m, inputs[m], missing[m]) for m in self.modalities]
        return reps, self.log_tau.exp()


def unwrap(model: nn.Module) -> Encoders:
    """The Encoders inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, Encoders) else model
