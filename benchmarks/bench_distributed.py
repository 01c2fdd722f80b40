"""The distributed loss on the CPU: time, peak memory and cube work per process.

Spawns 1, 2, ... gloo processes on this machine; each holds N / world_size rows
of a global batch of N and runs ``symile_loss(..., gather=True)`` forward and
backward. Per process it reports the median forward+backward time, the peak RSS
above the inputs (Linux VmHWM, reset through /proc/self/clear_refs) and the
cube elements its backend actually computed in one forward (counted by wrapping
the backend's ``cube_lse_forward``): a split cube shows N^3 / world_size, a
repeated one N^3.

    python benchmarks/bench_distributed.py --world-sizes 1 2 --N 256 --d 64 --backends chunked
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timing import machine_info, peak_bytes, reset_peak


def _count_cube_elements(backend_name: str) -> list[int]:
    """Wraps the backend's cube forward so each call adds I*J*K to the returned counter."""
    from symile_kernels import backends

    counter = [0]
    if backend_name == "reference":
        return counter
    backend = backends.get(backend_name)
    forward = backend.cube_lse_forward

    def counting(x, y, z, tau):
        counter[0] += x.shape[0] * y.shape[0] * z.shape[0]
        return forward(x, y, z, tau)

    backend.cube_lse_forward = counting
    return counter


def _worker(rank, world_size, port, config, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=config["timeout"]))
    torch.set_num_threads(config["threads"])
    import symile_kernels

    N, d, M = config["N"], config["d"], config["M"]
    n = N // world_size
    torch.manual_seed(0)
    everyone = [torch.nn.functional.normalize(torch.randn(N, d), dim=1) for _ in range(M)]
    reps = [r[rank * n:(rank + 1) * n].clone().requires_grad_() for r in everyone]
    tau = torch.tensor(14.3, requires_grad=True)
    counter = _count_cube_elements(config["backend"])

    def step(reps=reps):
        loss = symile_kernels.symile_loss(reps, tau, backend=config["backend"], gather=True)
        loss.backward()
        for t in reps + [tau]:
            t.grad = None

    # A tiny call first loads the code paths, so their pages do not count as the loss's memory.
    step([r[:2].detach().clone().requires_grad_() for r in reps])
    device = torch.device("cpu")
    baseline = reset_peak(device)
    counter[0] = 0
    step()
    peak = peak_bytes(device) - baseline
    cube_elements = counter[0]
    times = []
    for _ in range(config["repeats"]):
        dist.barrier()
        begin = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - begin))
    queue.put(dict(rank=rank, fwd_bwd_ms=statistics.median(times), peak_mb=peak / 2 ** 20,
                   cube_elements=cube_elements))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world_size: int, config: dict) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, config, queue))
                 for port in [_free_port()] for rank in range(world_size)]
    for p in processes:
        p.start()
    results = [queue.get(timeout=config["timeout"]) for _ in processes]
    for p in processes:
        p.join(timeout=config["timeout"])
    return dict(config, world_size=world_size, fwd_bwd_ms=max(r["fwd_bwd_ms"] for r in results),
                peak_mb_per_process=max(r["peak_mb"] for r in results),
                cube_elements_per_process=max(r["cube_elements"] for r in results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["chunked"])
    parser.add_argument("--N", type=int, default=256, help="global batch size (divisible by each world size)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--M", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends:
        for world_size in args.world_sizes:
            if args.N % world_size:
                raise SystemExit(f"--N {args.N} is not divisible by world size {world_size}")
            config = dict(backend=backend, N=args.N, d=args.d, M=args.M, repeats=args.repeats,
                          threads=args.threads, timeout=args.timeout)
            rows.append(run(world_size, config))
            print(f"{backend} world={world_size}: done", file=sys.stderr, flush=True)
    lines = ["| backend | processes | N (global) | d | fwd+bwd ms (slowest process) | peak MiB per process "
             "| cube elements per process | share of N^3 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        share = r["cube_elements_per_process"] / r["N"] ** 3 if r["cube_elements_per_process"] else None
        lines.append(f"| {r['backend']} | {r['world_size']} | {r['N']} | {r['d']} | {r['fwd_bwd_ms']:.0f} "
                     f"| {r['peak_mb_per_process']:.0f} | {r['cube_elements_per_process']} "
                     f"| {'-' if share is None else format(share, '.2f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=machine_info(torch.device("cpu")), argv=sys.argv, rows=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
