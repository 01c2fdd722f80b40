"""Timing, peak-memory, model-FLOP and machine-fact helpers shared by the benchmark scripts, so that
``bench_loss.py``, ``gpu_suite.py``, ``bench_distributed.py`` and the pytest-benchmark tests measure
the same way. The package does not ship this file: the loss never uses it.

* ``time_ms(fn, device)``: one call's wall time in milliseconds (CUDA events on
  a GPU, ``time.perf_counter`` on the CPU).
* ``reset_peak(device)`` / ``peak_bytes(device)``: a peak-memory window,
  ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the
  CPU (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).
* ``model_flops(...)``: the cost model of docs/math.md section 5.
* ``mm_tflops(device, dtype)``: the dense matrix-product rate the model FLOP/s
  are compared with, measured in the same run.
* ``machine_info(device)``: what a results file records about the machine.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    """Waits for queued GPU work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Runs ``fn`` once and returns its wall time in milliseconds.

    On a GPU the time is measured with CUDA events around the call, so it
    covers the kernels ``fn`` queued; on the CPU it is ``time.perf_counter``.
    """
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop)
    begin = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - begin)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 0) -> list[float]:
    """``warmup`` untimed calls, then ``repeats`` timed ones; returns the times (ms), in call order."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_ms(fn, device) for _ in range(repeats)]


def loss_steps(loss_fn: Callable, reps: list, tau: "torch.Tensor | float") -> tuple[Callable[[], None], Callable[[], None]]:
    """The two timed steps of a loss: a forward without autograd, and a forward+backward that
    clears the gradients it made (so repeats do not accumulate them)."""
    def forward():
        with torch.no_grad():
            loss_fn(reps, tau)

    def forward_backward():
        loss_fn(reps, tau).backward()
        for t in reps + [tau]:
            if isinstance(t, torch.Tensor):  # tau may be a float (bench_loss --frozen)
                t.grad = None

    return forward, forward_backward


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak(device: torch.device) -> int:
    """Starts a peak-memory window; returns the baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: the lifetime peak, an upper bound on the baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device) -> int:
    """The peak since ``reset_peak`` (absolute; subtract its baseline)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_flops(M: int, N: int, d: int, sampling: str, backward: bool) -> Optional[float]:
    """Model FLOPs of one Symile loss call (docs/math.md section 5).

    "n_squared", M = 3: 2 N^3 d forward, 6 N^3 d forward+backward (the cube).
    "n" (any M >= 2), and M = 2 / CLIP under either sampling: per anchor one
    N x N logit product, 2 N^2 d forward and 6 N^2 d forward+backward; M anchors
    (2 for CLIP). Other shapes (n_squared with M > 3) return None.
    """
    per_pass = 6 if backward else 2
    if sampling == "n" or M == 2:
        return per_pass * M * N ** 2 * d
    if M == 3:
        return per_pass * N ** 3 * d
    return None


def mm_tflops(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """Dense ``torch.mm`` rate (TFLOP/s, median of ``repeats``) for size x size operands of ``dtype``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = median_ms(lambda: torch.mm(a, b), device, repeats, warmup=1)
    return 2 * size ** 3 / (statistics.median(times) * 1e-3) / 1e12


def memory_limit_bytes(device: torch.device) -> int:
    """The memory a configuration may plan to use: the GPU's, or 70% of the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 7 // 10


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), e.g. "AMD EPYC 9R45" or "Intel(R) Xeon(R) Processor"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Date, machine, library versions, git revision (and GPU, driver, CUDA on a GPU)."""
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    import symile_kernels

    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=platform.node(), processor=cpu_model(),
                cpu_count=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                symile_kernels=symile_kernels.__version__, git_revision=revision or None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
