"""Input checks shared by every public entry point.

Each error names the argument and says what was expected and what came. Nothing
the caller passed is modified: promotion and ``contiguous`` make copies when
they change anything.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

NEGATIVE_SAMPLING = ("n", "n_squared")


def check_negative_sampling(negative_sampling: str) -> str:
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"negative_sampling must be 'n' or 'n_squared'; got {negative_sampling!r}")
    return negative_sampling


def check_representations(representations: Sequence[Tensor], name: str = "representations",
                          min_count: int = 2) -> list[Tensor]:
    """Validates M tensors of shape (N, d); returns them promoted to one floating dtype.

    Raises TypeError for a non-sequence, non-tensors and integer, bool or complex
    dtypes; ValueError for fewer than ``min_count`` tensors, non-2-D tensors,
    N = 0, d = 0, different N or d, or different devices.
    """
    if isinstance(representations, Tensor) or not isinstance(representations, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors of shape (N, d); "
                        f"got {type(representations).__name__}")
    if len(representations) < min_count:
        raise ValueError(f"{name} must hold at least {min_count} tensors (modalities); got {len(representations)}")
    for m, r in enumerate(representations):
        if not isinstance(r, Tensor):
            raise TypeError(f"{name}[{m}] must be a torch.Tensor; got {type(r).__name__}")
        if not r.is_floating_point():
            raise TypeError(f"{name}[{m}] must have a floating dtype; got {r.dtype}")
        if r.dim() != 2:
            raise ValueError(f"{name}[{m}] must be 2-D (N, d); got shape {tuple(r.shape)}")
    first = representations[0]
    for m, r in enumerate(representations):
        if r.shape != first.shape:
            raise ValueError(f"{name}[{m}] has shape {tuple(r.shape)} but {name}[0] has {tuple(first.shape)}; "
                             "every modality needs the same N (batch) and d (features)")
        if r.device != first.device:
            raise ValueError(f"{name}[{m}] is on {r.device} but {name}[0] is on {first.device}")
    if first.shape[0] == 0 or first.shape[1] == 0:
        raise ValueError(f"{name} must have N >= 1 rows and d >= 1 features; got shape {tuple(first.shape)}")
    dtype = first.dtype
    for r in representations[1:]:
        dtype = torch.promote_types(dtype, r.dtype)
    return [r.to(dtype) for r in representations]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of tau, the positive logits and the LSE vectors for rows of ``dtype``:
    float64 for float64, float32 for float32, bf16 and fp16. (bf16/fp16 rows keep
    their dtype for the products on backends that accept low precision, and are
    cast to float32 for the others; see ``symile_kernels.loss``.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logit_scale(logit_scale: Union[float, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """tau as a 0-dim tensor of ``dtype`` on ``device``; gradients flow back to a tensor argument.

    Raises TypeError for anything but a real number or a one-element floating
    tensor, ValueError unless tau is positive and finite once rounded to
    ``dtype`` (1e39 overflows float32 to inf, 1e-50 underflows it to 0).
    Under torch.compile the value is not read here (it may be symbolic): the
    operators of ``symile_kernels.ops`` check it when the graph runs.
    """
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar (0-dim tensor); got shape {tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating tensor; got {logit_scale.dtype}")
        tau = logit_scale.reshape(()).to(device=device, dtype=dtype)
        if not torch.compiler.is_compiling():
            check_tau_value(tau, "logit_scale")  # reads the value: one sync on a GPU
        return tau
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a float or a 0-dim tensor; got {type(logit_scale).__name__}")
    if torch.compiler.is_compiling():
        # The float may be symbolic (dynamic=True); via float64 so that 1e39 becomes inf in float32
        # (rejected by the operator when the graph runs) instead of failing inductor's constant fold.
        return torch.full((), logit_scale, dtype=torch.float64, device=device).to(dtype)
    value = _as_float(logit_scale, "logit_scale")
    _check_positive_finite(value, "logit_scale", dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def check_tau_value(tau: Tensor, name: str = "tau (logit_scale)") -> None:
    """Raises ValueError unless the 0-dim tensor ``tau`` is positive and finite in its own dtype."""
    _check_positive_finite(float(tau.detach()), name, tau.dtype)


def _as_float(value, name: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int such as 10**400
        raise ValueError(f"{name} must be a positive finite scalar (tau, already exponentiated); "
                         f"got an int too large for a float") from None


def _check_positive_finite(value: float, name: str, dtype: torch.dtype) -> None:
    rounded = float(torch.tensor(value, dtype=torch.float64).to(dtype)) if dtype != torch.float64 else value
    if not (math.isfinite(rounded) and rounded > 0):
        raise ValueError(f"{name} must be a positive finite scalar (tau, already exponentiated) in the "
                         f"compute dtype {dtype}; got {value!r}" + (f" (rounds to {rounded} in {dtype})"
                                                                    if rounded != value and value == value else ""))


def prepare(representations: Sequence[Tensor], logit_scale: Union[float, Tensor]):
    """Validated inputs.

    Returns ``(reps, tau)``: reps are contiguous (N, d) tensors in the promoted
    input dtype (the dtype the loss is returned in), tau a 0-dim tensor of the
    compute dtype (``compute_dtype`` of it: float32 or float64) on their device.
    Whether bf16/fp16 rows are then cast is the loss's decision, per backend.
    """
    reps = check_representations(representations)
    tau = check_logit_scale(logit_scale, compute_dtype(reps[0].dtype), reps[0].device)
    return [r.contiguous() for r in reps], tau
