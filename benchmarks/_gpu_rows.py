"""The GPU suite's benchmark rows: one loss-level measurement per fresh subprocess.

A row config: backend (a ``symile_kernels`` backend, or "symile" for the
reference package 0.1.0), M, N, d, sampling, mode (a compute mode of
``_gpu_checks.MODES``), device, tau, warmup, repeats. ``measure`` returns the
config with: fwd_ms and fwd_bwd_ms (medians; CUDA events on a GPU),
fwd_bwd_min_ms/max_ms, peak_mb (``torch.cuda.max_memory_allocated`` of one
forward+backward above the inputs; the process's peak RSS on the CPU),
model_tflops (docs/math.md section 5: 6 N^3 d for M = 3 "n_squared") and
``loss``, the value at a fixed seed on the row's inputs: rows of one shape and
mode see the same inputs (and, for "n", the same permutations), so losses of two
backends, the reference package's too, can be compared.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch

from _gpu_checks import MODES

from symile_kernels.benchmarking import median_ms, model_flops, peak_bytes, reset_peak, sync


def loss_function(backend: str, sampling: str):
    if backend == "symile":
        import symile

        reference_loss = symile.Symile(negative_sampling=sampling)
        return lambda reps, tau: reference_loss(reps, tau)
    import symile_kernels

    return lambda reps, tau: symile_kernels.symile_loss(reps, tau, negative_sampling=sampling, backend=backend)


def measure(config: dict) -> dict:
    """Runs one row in this process (see the module docstring)."""
    dtype_name, tf32, env = MODES[config["mode"]]
    os.environ.update(env)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    device = torch.device(config["device"])
    dtype = getattr(torch, dtype_name)
    M, N, d, sampling = config["M"], config["N"], config["d"], config["sampling"]
    loss_fn = loss_function(config["backend"], sampling)
    generator = torch.Generator(device=device).manual_seed(0)
    # A tiny call first loads (and JIT-compiles) the code, so it is neither timed nor counted as memory.
    tiny = [torch.randn(5, d, device=device, dtype=dtype, requires_grad=True) for _ in range(M)]
    loss_fn(tiny, torch.tensor(config["tau"], device=device, requires_grad=True)).backward()
    reps = [torch.nn.functional.normalize(torch.randn(N, d, device=device, generator=generator), dim=1)
            .to(dtype).requires_grad_() for _ in range(M)]
    tau = torch.tensor(config["tau"], device=device, requires_grad=True)

    def forward():
        with torch.no_grad():
            loss_fn(reps, tau)

    def forward_backward():
        loss_fn(reps, tau).backward()
        for t in reps + [tau]:
            t.grad = None

    sync(device)
    baseline = reset_peak(device)
    torch.manual_seed(1)  # the "n" permutations of the recorded loss value
    value = loss_fn(reps, tau)  # also the warm-up (and Triton's tuning on a prefix)
    value.backward()
    sync(device)
    peak = peak_bytes(device) - baseline
    loss_value = float(value)
    del value
    for t in reps + [tau]:
        t.grad = None
    fwd = median_ms(forward, device, config["repeats"], warmup=config["warmup"])
    fwd_bwd = median_ms(forward_backward, device, config["repeats"])
    row = dict(config, status="ok", loss=loss_value, peak_mb=peak / 2 ** 20, fwd_ms=statistics.median(fwd),
               fwd_bwd_ms=statistics.median(fwd_bwd), fwd_bwd_min_ms=min(fwd_bwd), fwd_bwd_max_ms=max(fwd_bwd))
    flops = model_flops(M, N, d, sampling, backward=True)
    row["model_tflops"] = None if flops is None else flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


def run_in_subprocess(script: str, flag: str, config: dict, timeout: float) -> dict:
    """``script flag JSON`` in a fresh interpreter; its last stdout line is the row."""
    command = [sys.executable, script, flag, json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(script))))
    except subprocess.TimeoutExpired:
        return dict(config, status=f"timeout after {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
    killed = " (killed: out of memory?)" if done.returncode < 0 else ""
    return dict(config, status=f"failed{killed}: {tail[-1][:300]}")


def mm_rate(device: torch.device, mode: str, size: int) -> float:
    """Dense ``torch.mm`` rate (TFLOP/s, median of 5) of one compute mode, size x size operands."""
    dtype_name, tf32, _ = MODES[mode]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        from symile_kernels.benchmarking import mm_tflops

        return mm_tflops(device, getattr(torch, dtype_name), size=size)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def estimated_bytes(config: dict) -> int:
    """Rough peak of the backends that materialise logits ("symile", "reference"); 0 for the others.

    "n_squared": the reference package measured about 9.1 N^3 floats at M = 3
    (docs/math.md section 5), covered by 10 N^M + 6 N^(M-1) d elements. "n": per
    anchor an (N, N) logit matrix, the identity mask, the masked copy, the scaled
    copy and the softmax autograd keeps: about 5 N^2 elements per anchor.
    """
    if config["backend"] not in ("symile", "reference"):
        return 0
    M, N, d = config["M"], config["N"], config["d"]
    size = 4  # float32 compute
    if config["sampling"] == "n":
        return size * (5 * M * N ** 2 + 4 * M * N * d)
    return size * (10 * N ** M + 6 * N ** (M - 1) * d)
