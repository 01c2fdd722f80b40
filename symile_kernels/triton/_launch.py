"""Launch helpers shared by the Triton cube and pair kernels.

Whether the kernels run compiled (CUDA) or through Triton's interpreter (CPU
tensors) is decided when ``triton.jit`` decorates them, i.e. when this
subpackage is first imported: ``TRITON_INTERPRET=1`` must be set before that.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

# True when the kernels of this subpackage were decorated in interpreter mode.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile rows whose shared exponential would lose a column or an LSE term take a
# fallback path with their own exponential (see cube.py); these are the widest
# logit spreads, in natural-log units, for which sharing is exact to float32.
FORWARD_SHARE_SPREAD = 60.0
BACKWARD_SHARE_SPREAD = 40.0


def dot_precision(dtype: torch.dtype):
    """``tl.dot``'s input_precision: for float32, TF32 only when torch allows it (as torch.mm does),
    else IEEE; None (the dtype's own tensor-core products) for bf16/fp16."""
    if dtype != torch.float32:
        return None
    if torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED:
        return "tf32"
    return "ieee"


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot`` for inputs of ``dtype`` (accumulation is always float32).

    The interpreter's bf16/fp16 ``tl.dot`` is wrong in Triton 3.9 (it reads the
    16-bit operands as garbage), so under the interpreter low-precision inputs
    are multiplied in float32; compiled kernels use the input dtype.
    """
    if dtype not in _DOT_DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 tensors; got {dtype}")
    return tl.float32 if INTERPRETED else _DOT_DTYPES[dtype]


def autotune_enabled() -> bool:
    """False when SYMILE_KERNELS_TRITON_AUTOTUNE=0: the first configuration of each list runs
    untuned (tests, quick checks: half the compilations and no tuning runs)."""
    return os.environ.get("SYMILE_KERNELS_TRITON_AUTOTUNE", "1") != "0"


# Problems with fewer rows than TUNE_MIN_ROWS run the first configuration untuned
# (tuning on them says nothing, and the choice is cached per D, not per N); larger
# first calls tune on a TUNE_ROWS-row prefix so that tuning costs milliseconds.
TUNE_MIN_ROWS = 512
TUNE_ROWS = 2048
_prefix_tuned: set = set()


def should_tune(rows: int) -> bool:
    return autotune_enabled() and rows >= TUNE_MIN_ROWS


def tune_on_prefix(op: str, *tensors: torch.Tensor) -> int:
    """Rows of the prefix problem to tune on first (0: none needed): once per op, device,
    dtype, feature size and precision, when the call is larger than TUNE_ROWS."""
    first = tensors[0]
    if first.device.type != "cuda" or INTERPRETED or not autotune_enabled():
        return 0
    if max(t.shape[0] for t in tensors) <= TUNE_ROWS:
        return 0
    key = (op, first.device.index, first.dtype, first.shape[1], dot_precision(first.dtype))
    if key in _prefix_tuned:
        return 0
    _prefix_tuned.add(key)
    return TUNE_ROWS


def target_programs(device: torch.device) -> int:
    """How many programs a launch should expose to fill the device."""
    if device.type != "cuda":
        return 4  # interpreter: small, but enough to exercise the split paths
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def split_count(blocks_owned: int, blocks_looped: int, device: torch.device) -> int:
    """Splits of the looped axis so that ``blocks_owned * splits`` fills the device."""
    want = -(-target_programs(device) // max(1, blocks_owned))
    return max(1, min(blocks_looped, want))
