"""One core's matrix-product rate at the CPU kernels' tile shapes: their own product
path (csrc/cpu/tile_mm.h, through the test-only op ``cpu_tile_mm_test`` of
csrc/cpu/test_ops.cpp, JIT-built by tests/cpu_test_ops.py) against
``torch.mm`` on the same operands, single-threaded, median of ``--repeats`` runs of
``--calls`` products each.

Why it exists: the loss benchmarks quote the kernels as a fraction of ``torch.mm``'s
rate, and on CPUs where torch's BLAS (MKL) does not use the widest vectors the kernels'
float32 tiles (oneDNN micro-kernels) run faster than ``torch.mm`` itself, so that
fraction can exceed 100%. This script shows by how much, on the machine at hand.

    python benchmarks/tile_rate.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from symile_kernels import cpu as cpu_backend
from timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cpu_test_ops  # noqa: E402  (tests/: the test-only operators' loader)

# (m, n, k) of the tile products: cube S = XY (tau z)^T, W = G z, dz^T = XY^T G at d = 64
# and the pair kernels' S, da, db^T shares at d = 256.
SHAPES = [(256, 256, 64), (256, 64, 256), (64, 256, 256), (256, 256, 256)]


def _gflops(fn, m: int, n: int, k: int, calls: int, repeats: int) -> float:
    """GFLOP/s of ``calls`` back-to-back calls of ``fn`` (an m x n x k product each), median of ``repeats``."""
    times = median_ms(lambda: [fn() for _ in range(calls)], torch.device("cpu"), repeats, warmup=1)
    return 2 * m * n * k * calls / (statistics.median(times) * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reason = cpu_backend.load_reason() or cpu_test_ops.load_reason()
    if reason is not None:
        raise SystemExit(f"the C++ CPU backend or its test operators are unavailable: {reason}")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"one thread, {args.dtype}, median of {args.repeats} x {args.calls} products")
    print("| m x n x k | tile products GFLOP/s | torch.mm GFLOP/s | ratio |")
    print("| --- | --- | --- | --- |")
    for m, n, k in SHAPES:
        A, B, C = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
        tile = _gflops(lambda: torch.ops.symile_kernels.cpu_tile_mm_test(A, B, C, False), m, n, k,
                       args.calls, args.repeats)
        mm = _gflops(lambda: torch.mm(A, B, out=C), m, n, k, args.calls, args.repeats)
        print(f"| {m} x {n} x {k} | {tile:.0f} | {mm:.0f} | {tile / mm:.2f} |")


if __name__ == "__main__":
    main()
