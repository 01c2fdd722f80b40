"""The GPU suite's benchmark rows: loss-level measurements in a long-lived worker subprocess.

A row config: backend (a ``symile_kernels`` backend, "symile" for the reference
package 0.1.0, or a plain-PyTorch peer of ``peers.py``: "torch-einsum",
"torch-compile", "torch-ce"), M, N, d, sampling, mode (a compute mode of
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

import gc
import json
import os
import selectors
import statistics
import subprocess
import sys
from typing import Optional

import torch

from _gpu_checks import MODES

from peers import PEERS, peer_loss
from timing import loss_steps, median_ms, model_flops, peak_bytes, reset_peak, sync


def loss_function(backend: str, sampling: str, M: int):
    if backend in PEERS:
        return peer_loss(backend, sampling, M)
    if backend == "symile":
        import symile

        reference_loss = symile.Symile(negative_sampling=sampling)
        return lambda reps, tau: reference_loss(reps, tau)
    import symile_kernels

    return lambda reps, tau: symile_kernels.symile_loss(reps, tau, negative_sampling=sampling, backend=backend)


def measure(config: dict) -> dict:
    """Runs one row in this process (see the module docstring), under its mode's environment."""
    env = MODES[config["mode"]][2]
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return _measure(config)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _measure(config: dict) -> dict:
    dtype_name, tf32, _, _ = MODES[config["mode"]]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    device = torch.device(config["device"])
    dtype = getattr(torch, dtype_name)
    M, N, d, sampling = config["M"], config["N"], config["d"], config["sampling"]
    loss_fn = loss_function(config["backend"], sampling, M)
    generator = torch.Generator(device=device).manual_seed(0)
    # A tiny call first loads (and JIT-compiles) the code, so it is neither timed nor counted as memory.
    tiny = [torch.randn(5, d, device=device, dtype=dtype, requires_grad=True) for _ in range(M)]
    loss_fn(tiny, torch.tensor(config["tau"], device=device, requires_grad=True)).backward()
    reps = [torch.nn.functional.normalize(torch.randn(N, d, device=device, generator=generator), dim=1)
            .to(dtype).requires_grad_() for _ in range(M)]
    tau = torch.tensor(config["tau"], device=device, requires_grad=True)

    forward, forward_backward = loss_steps(loss_fn, reps, tau)

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


class RowWorker:
    """Runs rows in one long-lived subprocess (``python script flag``, reading a JSON config per line
    of stdin and answering a JSON row per line of stdout), so a row pays no interpreter start. A row
    that crashes the worker (an illegal address, out of host memory) or passes its timeout is
    recorded as such, and the next row starts a fresh worker. The worker's stderr goes to ``log``."""

    def __init__(self, script: str, flag: str, log: str):
        self.command = [sys.executable, script, flag]
        self.cwd = os.path.dirname(os.path.dirname(os.path.abspath(script)))
        self.log = log
        self.process: Optional[subprocess.Popen] = None

    def __call__(self, config: dict, timeout: float) -> dict:
        if self.process is None or self.process.poll() is not None:
            with open(self.log, "a") as err:
                self.process = subprocess.Popen(self.command, cwd=self.cwd, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        self.process.stdin.write(json.dumps(config) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout)
        if line is None:
            self.close()
            return dict(config, status=f"timeout after {timeout:.0f} s")
        if not line:
            code = self.process.wait()
            self.process = None
            killed = " (killed: out of memory?)" if code < 0 else ""
            return dict(config, status=f"failed{killed}: {self._stderr_tail()}")
        return json.loads(line)

    def _read_line(self, timeout: float) -> Optional[str]:
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=max(1.0, timeout)):
                return None
        return self.process.stdout.readline()

    def _stderr_tail(self) -> str:
        with open(self.log) as f:
            lines = [line for line in f.read().strip().splitlines() if line.strip()] or ["no output"]
        return lines[-1][:300]

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def serve() -> None:
    """The worker side of ``RowWorker``: one measured row (or the failure) per config line."""
    for line in sys.stdin:
        config = json.loads(line)
        try:
            row = measure(config)
        except Exception as exc:  # noqa: BLE001  (an out-of-memory row: the next rows still run)
            row = dict(config, status=f"failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next row's peak starts from the inputs, not this row's cache
        print(json.dumps(row), flush=True)


def mm_rate(device: torch.device, mode: str, size: int) -> float:
    """Dense ``torch.mm`` rate (TFLOP/s, median of 5) of one compute mode, size x size operands."""
    dtype_name, tf32, _, _ = MODES[mode]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        from timing import mm_tflops

        return mm_tflops(device, getattr(torch, dtype_name), size=size)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def estimated_bytes(config: dict) -> int:
    """Rough peak of the losses that materialise logits (the reference package, the oracle, the
    plain-PyTorch peers); 0 for the fused backends.

    "n_squared": the reference package measured about 9.1 N^3 floats at M = 3
    (docs/math.md section 5), covered by 10 N^M + 6 N^(M-1) d elements; the einsum peer
    keeps the cube and its exponentials for its three reductions, about 4 N^3 elements.
    "n" and CLIP: per anchor an (N, N) logit matrix, the identity mask, the masked copy,
    the scaled copy and the softmax autograd keeps: about 5 N^2 elements per anchor.
    """
    backend = config["backend"]
    if backend not in ("symile", "reference", *PEERS):
        return 0
    M, N, d = config["M"], config["N"], config["d"]
    size = 8 if backend == "reference" else 4  # the oracle computes in float64, the others in float32 or less
    if config["sampling"] == "n" or M == 2:
        return size * (5 * M * N ** 2 + 4 * M * N * d)
    if backend in PEERS:
        return size * 4 * N ** 3
    return size * (10 * N ** M + 6 * N ** (M - 1) * d)
