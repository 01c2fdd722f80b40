"""Time and peak memory of the Symile loss, one configuration per fresh subprocess.

For each backend x N x d (with M, dtype, sampling mode and device fixed per
run) it measures the median forward and forward+backward wall time after a
warm-up, and the peak memory of one forward+backward above the inputs:
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak RSS
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above its RSS before
the call, after a tiny warm-up call has loaded the code (one subprocess per
configuration keeps peaks apart).
The backend name ``symile`` means the reference package ``symile`` 0.1.0
(skipped when it is not installed). Model FLOPs follow docs/math.md section 5
(``timing.model_flops``), compared with a dense matrix
product of the same dtype measured in the same run (on the CPU, float32
4096 x 4096). Timing and memory helpers live in ``benchmarks/timing.py``.

    python benchmarks/bench_loss.py --backends symile chunked --N 512 --d 64
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --N 1024 4096 --d 256 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from timing import (DTYPES, loss_steps, machine_info, median_ms, memory_limit_bytes, mm_tflops,
                    model_flops, peak_bytes, reset_peak, sync)


def estimated_materialised_bytes(M: int, N: int, d: int, element_size: int) -> int:
    """Rough peak of the backends that materialise the logits (``symile``, ``reference``).

    The reference package measured 4.9 GB at N = 512, d = 64, float32 (docs/math.md
    section 5), about 9.1 N^3 floats; 10 N^M + 6 N^(M-1) d elements covers it.
    """
    return element_size * (10 * N ** M + 6 * N ** (M - 1) * d)


def loss_fn(backend: str, sampling: str, loss: str = "symile"):
    """The loss under test as ``fn(reps, tau)``: ``symile_kernels``' Symile or CLIP
    loss with ``backend``, or the reference package's ``symile.Symile`` for
    ``backend="symile"`` (which has no CLIP loss)."""
    if backend == "symile":
        if loss != "symile":
            raise ValueError("the reference package symile has no CLIP loss")
        import symile

        reference_loss = symile.Symile(negative_sampling=sampling)
        return lambda reps, tau: reference_loss(reps, tau)
    import symile_kernels

    if loss == "clip":
        return lambda reps, tau: symile_kernels.clip_loss(reps, tau, backend=backend)
    return lambda reps, tau: symile_kernels.symile_loss(reps, tau, negative_sampling=sampling, backend=backend)


def setup(config: dict):
    """Inputs of one configuration and its two timed calls: ``(forward, forward_backward)``.

    Seeds torch, makes a tiny call first (it loads the code paths, so their
    pages do not count as the loss's memory), then L2-normalised (N, d) rows.
    """
    device = torch.device(config["device"])
    dtype = DTYPES[config["dtype"]]
    M, N, d = config["M"], config["N"], config["d"]
    fn = loss_fn(config["backend"], config["sampling"], config.get("loss", "symile"))
    torch.manual_seed(0)
    tiny = [torch.randn(3, d, device=device, dtype=dtype, requires_grad=True) for _ in range(M)]
    fn(tiny, torch.tensor(config["tau"], device=device, requires_grad=True)).backward()
    reps = [torch.nn.functional.normalize(torch.randn(N, d, device=device), dim=1).to(dtype).requires_grad_()
            for _ in range(M)]
    tau = torch.tensor(config["tau"], device=device, requires_grad=True)
    if config.get("frozen"):
        # The last modality frozen and tau a fixed float: their gradient passes are skipped
        # (docs/math.md section 2: no dz contraction, no dtau reduction).
        reps[-1].requires_grad_(False)
        tau = float(config["tau"])

    return loss_steps(fn, reps, tau)


def peak_above(fn, device: torch.device) -> int:
    """Runs ``fn`` once; returns its peak memory in bytes above the memory in use before it."""
    sync(device)
    baseline = reset_peak(device)
    fn()
    sync(device)
    return peak_bytes(device) - baseline


def config_flops(config: dict) -> "float | None":
    """Model FLOPs of one forward+backward of ``config`` (CLIP: M (M - 1) / 2 pairs of two anchors)."""
    M, N, d = config["M"], config["N"], config["d"]
    if config.get("loss", "symile") == "clip":
        return model_flops(2, N, d, "n", backward=True) * M * (M - 1) // 2
    return model_flops(M, N, d, config["sampling"], backward=True)


def measure(config: dict) -> dict:
    """Runs one configuration in this process; returns its row (see ``main``)."""
    device = torch.device(config["device"])
    forward, forward_backward = setup(config)
    peak = peak_above(forward_backward, device)  # also the warm-up of compiled kernels
    fwd = median_ms(forward, device, config["repeats"], warmup=config["warmup"])
    fwd_bwd = median_ms(forward_backward, device, config["repeats"])
    row = dict(config, status="ok", peak_mb=peak / 2 ** 20,
               fwd_ms=statistics.median(fwd), fwd_bwd_ms=statistics.median(fwd_bwd),
               fwd_bwd_min_ms=min(fwd_bwd), fwd_bwd_max_ms=max(fwd_bwd))
    flops = config_flops(config)
    row["model_tflops"] = None if flops is None else flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


def run_in_subprocess(config: dict, timeout: float) -> dict:
    """``measure(config)`` in a fresh interpreter, so peaks of configurations do not mix."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(config, status=f"timeout after {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    killed = " (killed: out of memory?)" if done.returncode < 0 else ""
    return dict(config, status=f"failed{killed}: {tail[:200]}")


def skip_reason(config: dict, limit_bytes: int) -> "str | None":
    if config["backend"] == "symile" and config.get("loss", "symile") != "symile":
        return "the reference package has no CLIP loss"
    if config["backend"] == "symile":
        try:
            import symile  # noqa: F401
        except ImportError:
            return "reference package symile not installed"
    if config["backend"] in ("symile", "reference"):
        exponent = 2 if config["sampling"] == "n" else config["M"]
        need = estimated_materialised_bytes(exponent, config["N"], config["d"], 4)
        if need > limit_bytes:
            return f"skipped: needs ~{need / 2 ** 30:.0f} GiB (materialises the logits)"
    return None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mode(row: dict) -> str:
    return "clip" if row.get("loss", "symile") == "clip" else row["sampling"]


def markdown_table(rows: list[dict], mm_rate: "float | None") -> str:
    lines = ["| backend | M | N | d | dtype | sampling | fwd ms | fwd+bwd ms | peak MiB | model TFLOP/s | % of mm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        r = dict(r, backend=r["backend"] + (" (last modality frozen, tau a float)" if r.get("frozen") else ""))
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['M']} | {r['N']} | {r['d']} | {r['dtype']} | {_mode(r)} "
                         f"| {r['status']} | | | | |")
            continue
        share = None if r["model_tflops"] is None or not mm_rate else 100 * r["model_tflops"] / mm_rate
        lines.append(f"| {r['backend']} | {r['M']} | {r['N']} | {r['d']} | {r['dtype']} | {_mode(r)} "
                     f"| {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['peak_mb']:.0f} "
                     f"| {_fmt(r['model_tflops'], '.3f')} | {_fmt(share, '.0f')} |")
    if mm_rate:
        lines.append(f"\nDense matrix product rate (torch.mm 4096 x 4096, same dtype): {mm_rate:.3f} TFLOP/s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["symile", "chunked"],
                        help="symile_kernels backends, or 'symile' for the reference package")
    parser.add_argument("--M", type=int, default=3, help="number of modalities")
    parser.add_argument("--N", type=int, nargs="+", default=[512], help="batch sizes")
    parser.add_argument("--d", type=int, nargs="+", default=[64], help="representation sizes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--sampling", choices=["n_squared", "n"], default="n_squared")
    parser.add_argument("--loss", choices=["symile", "clip"], default="symile",
                        help="clip: symile_kernels.clip_loss over the M modalities' pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tau", type=float, default=14.3, help="logit_scale (rows are L2-normalised)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--no-mm", action="store_true", help="skip the dense matrix-product rate")
    parser.add_argument("--json", help="write the rows and machine info to this file")
    parser.add_argument("--frozen", action="store_true",
                        help="also time each configuration with the last modality frozen and tau a float "
                             "(no gradient for either)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return []
    device = torch.device(args.device)
    limit = memory_limit_bytes(device)
    rows = []
    for N in args.N:
        for d in args.d:
            for backend, frozen in [(b, f) for b in args.backends for f in ((False, True) if args.frozen else (False,))]:
                config = dict(backend=backend, loss=args.loss, M=args.M, N=N, d=d, dtype=args.dtype,
                              sampling=args.sampling, device=args.device, tau=args.tau, repeats=args.repeats, warmup=args.warmup,
                              frozen=frozen)
                reason = skip_reason(config, limit)
                row = dict(config, status=reason) if reason else run_in_subprocess(config, args.timeout)
                rows.append(row)
                print(f"{backend} N={N} d={d}: {row['status']}"
                      + (f", fwd+bwd {row['fwd_bwd_ms']:.1f} ms, peak {row['peak_mb']:.0f} MiB"
                         if row["status"] == "ok" else ""), file=sys.stderr, flush=True)
    mm_rate = None if args.no_mm else mm_tflops(device, DTYPES[args.dtype] if device.type == "cuda" else torch.float32)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=machine_info(device), argv=sys.argv, mm_tflops=mm_rate, rows=rows), f, indent=1)
    print(markdown_table(rows, mm_rate))
    return rows


if __name__ == "__main__":
    main()
