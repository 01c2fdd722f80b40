"""Launch helpers shared by the Triton cube and pair kernels.

Whether the kernels run compiled (CUDA) or through Triton's interpreter (CPU
tensors) is decided when ``triton.jit`` decorates them, i.e. when this
subpackage is first imported: ``TRITON_INTERPRET=1`` must be set before that.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# True when the kernels of this subpackage were decorated in interpreter mode.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile rows whose shared exponential would lose a column or an LSE term take a
# fallback path with their own exponential (see cube.py); these are the widest
# logit spreads, in natural-log units, for which sharing is exact to float32.
FORWARD_SHARE_SPREAD = 60.0
BACKWARD_SHARE_SPREAD = 40.0


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: TF32 for float32 only when torch allows it (as torch.mm does)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED:
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype):
    """Accumulation and LSE dtype inside the kernels: float32 (float64 never reaches them)."""
    return tl.float32


def block_d(d: int, cap: int) -> int:
    """Feature-chunk width: the next power of two of d (>= 16, tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(d)))


def size_bucket(*sizes: int) -> int:
    """Autotuning key for the problem size: tuning once per power of two up to 4096."""
    return min(triton.next_power_of_2(max(sizes)), 4096)


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
