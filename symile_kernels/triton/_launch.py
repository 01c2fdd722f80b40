"""Launch helpers shared by the Triton cube and pair kernels.

Whether the kernels run compiled (CUDA) or through Triton's interpreter (CPU
tensors) is decided when ``triton.jit`` decorates them, i.e. when this
subpackage is first imported: ``TRITON_INTERPRET=1`` must be set before that.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
from typing import Callable

import torch
import triton
import triton.language as tl


def triton_version(text: str = triton.__version__) -> tuple:
    """(major, minor) of a Triton version string ("3.6.0", "3.9.0+git1234" -> (3, 6), (3, 9))."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


TRITON_VERSION = triton_version()
# The Triton releases whose compilers the configuration lists are checked on (.ci/run compiles every
# kernel under each: tests/test_triton_compile.py), oldest first: 3.6 is torch 2.11's pin, 3.9 the
# newest. A Triton older than the first makes the backend unavailable with the version it needs
# (symile_kernels/triton/__init__.py); any other takes the newest release here not above it
# (``triton_release``), by which both TRITON_CONFIGS and the compile check's spill pins are chosen.
TRITON_RELEASES = ((3, 6), (3, 9))
MIN_TRITON = TRITON_RELEASES[0]


def triton_release(version: tuple = TRITON_VERSION) -> tuple:
    """The entry of TRITON_RELEASES whose checks a Triton of ``version`` (major, minor) follows."""
    return max((r for r in TRITON_RELEASES if r <= version), default=MIN_TRITON)


# Configuration lists that a release's compiler needs in place of cube.py's and pair.py's (the one
# place where configurations depend on the Triton version): {release: {list name: configurations}}.
# Triton 3.6 stages pair_fwd's 64 x 32 x 512 float32 (TF32) tiles in 260 KiB of shared memory, over
# sm_90's 227 KiB per block (3.9: 196 KiB); 64 x 16 keeps two stages and wgmma and takes 196 KiB,
# spill-free in every mode (64 x 32 in one stage took 164 KiB but spilled 12 KiB in IEEE float32).
TRITON_CONFIGS = {
    (3, 6): {"pair_fwd/sm90/xlarge": [triton.Config(dict(BLOCK_M=64, BLOCK_N=16), num_warps=8, num_stages=2)]},
}

# True when the kernels of this subpackage were decorated in interpreter mode.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


if INTERPRETED:
    def loop_bound(x):
        """A kernel loop's runtime bound x (a scalar int32/int64 tensor: an argument such as J, or a
        program's start or stop; or a Python int) as the Python int that the interpreter's ``range``
        needs. The interpreter holds a scalar as a 1-element array, which Triton 3.6 converts with
        ``int()``, refused by numpy >= 2.4 for arrays of one dimension (Triton 3.9 squeezes it first);
        ``item()`` reads the same integer, so every loop runs the same iterations on every Triton."""
        if isinstance(x, int):
            return x
        return int(x.handle.data.item())
else:
    @triton.jit
    def loop_bound(x):
        """Compiled kernels: the bound x (a scalar int32/int64) itself, inlined. Loops keep runtime
        bounds rather than constexpr ones: one compiled kernel serves every problem size."""
        return x

# Tile rows whose shared exponential would lose a column or an LSE term take a
# fallback path with their own exponential (see cube.py); these are the widest
# logit spreads, in natural-log units, for which sharing is exact to float32.
FORWARD_SHARE_SPREAD = 60.0
BACKWARD_SHARE_SPREAD = 40.0

# exp2 is the hardware's exponential: the kernels evaluate e^x as 2^(x * LOG2E), x a difference of
# natural-log logits or LSEs (never a base-2 logit, which rounds away log(sum) at logits near 1e8).
LOG2E = 1.4426950408889634


def lse_from_pairs(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 LSE per line from a kernel's float32 (max, sum) partials, both (parts, n) or (n,):
    ``M + log(sum_p s_p e^(m_p - M))`` with M = max_p m_p, all in float64 (docs/math.md section 6.4:
    log(sum) survives next to a max near 1e8). -inf where every part is empty."""
    m, s = m.double(), s.double()
    if m.dim() == 1:
        return m + torch.log(s)
    top = m.max(dim=0).values
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.log((s * torch.exp(m - safe)).sum(dim=0))


# Segments hold at most MAX_SEGMENT features (the compiler keeps 256-wide operands and accumulators in
# registers where a 512-wide one spills), and a kernel takes at most MAX_SEGMENTS of them: enough for
# every multiple of 16 up to 512 (496 = 256 + 128 + 64 + 32 + 16) to run exactly.
MAX_SEGMENT = 256
MAX_SEGMENTS = 5


@functools.lru_cache(maxsize=None)
def d_segments(d: int) -> tuple:
    """The feature segments a kernel is specialised for (its constexpr SEGS): one to MAX_SEGMENTS powers
    of two of at least 16 (tl.dot's smallest K), largest first, whose total is the smallest reachable
    one >= d, with the fewest segments. Every multiple of 16 up to 512 is covered exactly (48 -> 32 + 16,
    240 -> 128 + 64 + 32 + 16, 496 -> 256 + 128 + 64 + 32 + 16, 512 -> 256 + 256); any other d up to
    512 runs as d rounded up to a multiple of 16 (17 -> 32, 200 -> 208 = 128 + 64 + 16). The kernels
    execute tile products over sum(d_segments(d)) features."""
    if d < 1:
        raise ValueError(f"feature size d must be positive, got {d}")
    # Above MAX_SEGMENTS * MAX_SEGMENT features, wider segments (spilling) keep the count at MAX_SEGMENTS.
    top = min(MAX_SEGMENT if d <= MAX_SEGMENTS * MAX_SEGMENT else d, 1 << (max(d, 16) - 1).bit_length())
    sizes = [16 << s for s in range(top.bit_length()) if 16 << s <= top]
    best = None
    for count in range(1, MAX_SEGMENTS + 1):
        for combo in itertools.combinations_with_replacement(reversed(sizes), count):
            if sum(combo) >= d and (best is None or (sum(combo), count) < best[0]):
                best = (sum(combo), count), combo
    return tuple(best[1])


def d_exec(d: int) -> int:
    """The feature size the kernels' tile products execute: d rounded up to sum(d_segments(d))."""
    return sum(d_segments(d))


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
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _DOT_DTYPES[dtype]


def grad_dot(dtype: torch.dtype) -> tuple:
    """(operand dtype, input_precision) of the backward's contractions of G (with z, or with the row
    products). G scales like the upstream gradients times e^(S - L), about 1 / (3 N^3) under the mean
    loss: below fp16's smallest normal (6e-5) from N = 32 and flushed to zero by N = 256. fp16 inputs
    therefore contract G in float32 operands (TF32 products on a GPU, IEEE under the interpreter);
    bf16 has float32's exponent range and keeps its own tensor-core products."""
    if dtype == torch.float16:
        return tl.float32, ("ieee" if INTERPRETED else "tf32")
    return dot_dtype(dtype), dot_precision(dtype)


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


# ---------------------------------------------------------------- configurations

# Every kernel's configurations: "<kernel>/<sm90|sm80>/<small|large|xlarge>" (executed feature sizes,
# d_exec, up to 128, 129-256 and above 256) hold the GPU lists, with "<bucket>-seg3" where a kernel
# gives sizes of SEGMENTED or more segments their own (list_name); "<kernel>/interpreter" the small
# default for CPU tensors. Filled by cube.py and pair.py.
_CONFIGS: dict = {}
# list name -> [configuration, launches that took it]: what ``pinned_config`` forces.
_PINNED: dict = {}
_CHOSEN: dict = {}
# The GPU architecture whose lists interpreted launches take (``interpret_as``); None: "interpreter".
_INTERPRET_AS: list = [None]


def register(kernel: str, lists: dict) -> None:
    """Adds ``kernel``'s lists {"<arch>/<bucket>" or "interpreter": [triton.Config, ...]}, each replaced
    by its TRITON_CONFIGS entry for the installed Triton's release where it has one."""
    replaced = TRITON_CONFIGS.get(triton_release(), {})
    for suffix, configs in lists.items():
        name = f"{kernel}/{suffix}"
        _CONFIGS[name] = list(replaced.get(name, configs))


def kernel_configs() -> dict:
    """{"<kernel>/<arch>/<bucket>" or "<kernel>/interpreter": [triton.Config, ...]} for every kernel."""
    return {name: list(configs) for name, configs in _CONFIGS.items()}


class Pin:
    """What ``pinned_config`` yields: the list, the configuration and how many launches took it."""

    def __init__(self, name: str, index: int, config):
        self.name, self.index, self.config, self.launches = name, index, config, 0


@contextlib.contextmanager
def pinned_config(name: str, index: int):
    """Within the block, every launch whose configuration comes from list ``name`` (``launch_list``:
    the kernel, the device's architecture and the feature size select it) uses configuration
    ``index`` of ``kernel_configs()[name]``, untuned. Launches from other lists are unaffected, so a
    check at (kernel, arch, d) runs exactly this configuration only where ``launch_list`` names this
    list; the yielded ``Pin`` counts the launches that took it (0: the block never used the pin)."""
    if name not in _CONFIGS:
        raise KeyError(f"no configuration list {name!r}; see kernel_configs()")
    if not 0 <= index < len(_CONFIGS[name]):
        raise IndexError(f"{name} has {len(_CONFIGS[name])} configurations, not index {index}")
    previous = _PINNED.get(name)
    pin = _PINNED[name] = Pin(name, index, _CONFIGS[name][index])
    try:
        yield pin
    finally:
        if previous is None:
            _PINNED.pop(name)
        else:
            _PINNED[name] = previous


@contextlib.contextmanager
def interpret_as(arch: str):
    """Within the block, interpreted launches (CPU tensors) take their configurations from ``arch``'s
    GPU lists ("sm90" or "sm80", by ``list_name``) as a GPU of that architecture would, instead of
    "<kernel>/interpreter": the interpreter then runs the GPU's tile shapes (tests, work counts)."""
    if arch not in ("sm90", "sm80"):
        raise ValueError(f"arch must be 'sm90' or 'sm80'; got {arch!r}")
    previous, _INTERPRET_AS[0] = _INTERPRET_AS[0], arch
    try:
        yield
    finally:
        _INTERPRET_AS[0] = previous


def bucket(d: int) -> str:
    """The configuration list of feature size d: "small" (executed size up to 128), "large" (up
    to 256) or "xlarge" (up to 512; larger d take the "xlarge" lists too)."""
    size = d_exec(d)
    return "small" if size <= 128 else "large" if size <= 256 else "xlarge"


# Feature sizes taking SEGMENTED or more segments (112 = 64 + 32 + 16, 240, 496...) hold that many
# accumulator and operand tiles at once, which spilled registers at the tile shapes chosen for the
# bucket's one- and two-segment sizes; a kernel may give them a list of its own, "<bucket>-seg3".
SEGMENTED = 3


def list_name(kernel: str, arch: str, d: int) -> str:
    """The configuration list ``kernel`` runs feature size d from on ``arch`` ("sm90" or "sm80"):
    "<kernel>/<arch>/<bucket>", or its "-seg3" list where d takes SEGMENTED or more segments and the
    kernel has one."""
    name = f"{kernel}/{arch}/{bucket(d)}"
    if len(d_segments(d)) >= SEGMENTED and f"{name}-seg3" in _CONFIGS:
        return f"{name}-seg3"
    return name


# A feature size that takes each list variant (``list_name``): a bucket's one- or two-segment sizes
# and its sizes of SEGMENTED or more segments. Checks of every configuration (the tests, the GPU
# suite) reach each list through them.
VARIANT_D = {"small": 20, "small-seg3": 100, "large": 160, "large-seg3": 200, "xlarge": 320, "xlarge-seg3": 400}


def arch_of(device: torch.device) -> str:
    """The configuration lists' architecture name of a CUDA device: "sm90" (Hopper and newer) or "sm80"."""
    return "sm90" if is_hopper(device) else "sm80"


def launch_list(kernel: str, device: torch.device, d: int) -> str:
    """The configuration list a launch of ``kernel`` at feature size d on ``device`` takes: its
    architecture's ``list_name`` on a GPU (or under ``interpret_as``), else "<kernel>/interpreter"."""
    if device.type == "cuda" and not INTERPRETED:
        return list_name(kernel, arch_of(device), d)
    if _INTERPRET_AS[0] is not None:
        return list_name(kernel, _INTERPRET_AS[0], d)
    return f"{kernel}/interpreter"


def pick(kernel: str, device: torch.device, dtype: torch.dtype, d: int, rows: int,
         run: Callable[[triton.Config], None]) -> triton.Config:
    """The configuration to launch ``kernel`` with, from its ``launch_list``: the pinned one, the
    list's first, or (CUDA problems of at least TUNE_MIN_ROWS rows, once per list, device, dtype,
    feature segments and precision) the fastest of the list, timed with ``run(config)``."""
    name = launch_list(kernel, device, d)
    pin = _PINNED.get(name)
    if pin is not None:
        pin.launches += 1
        return pin.config
    configs = _CONFIGS[name]
    if len(configs) == 1 or device.type != "cuda" or INTERPRETED or not should_tune(rows):
        return configs[0]
    key = (name, device.index, dtype, d_segments(d), dot_precision(dtype))
    if key not in _CHOSEN:
        from triton.testing import do_bench

        times = [do_bench(lambda c=c: run(c), warmup=2, rep=10) for c in configs]
        _CHOSEN[key] = configs[times.index(min(times))]
    return _CHOSEN[key]


def launch(kernel, grid: tuple, args: tuple, config: triton.Config, **constexprs) -> None:
    """``kernel[grid](*args)`` with the configuration's block sizes, warps and stages."""
    kernel[grid](*args, **config.kwargs, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


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
