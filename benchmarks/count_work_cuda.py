"""Work of the "cuda" backend's cube kernels, counted in the CPU emulation.

The real kernel sources (csrc/cuda/cube.cu) run through csrc/cuda/emu, whose
counters record, per kernel launch, the tile-product FLOPs (2 m n k per
warp-wide ``mma_sync``, 2 per SIMT fused multiply-add) and the calls of
``exp_``. This module builds that emulation with g++ (cached by the sources'
hash), runs the cube forward and backward once on unit-norm rows and returns
per launch:

* ``flops / model``: executed FLOPs over the model FLOPs of the whole loss,
  ``6 N^3 d`` (docs/math.md section 5: 2 N^3 d for the logits, 2 N^3 d for each
  of the backward's two contractions);
* ``exp / element``: exponentials per cube element (``N^3`` of them): ``exp_``
  calls, evaluated per element in the tile epilogues; ``vexp / element``: the
  ``vexp_`` calls, one per row, column, tile or partial LSE (o(1) per element);
* ``x∘y built / N²d``: elements of the row products x[i] * y[j] written to
  shared memory (padding included) over the N² d of building each once.
  Counts taken before the emulation told the two apart (the "before" table of
  benchmarks/results/cuda-work-before.md) hold both in exp / element.

No GPU, no timing: exact counts of what the kernels execute.

    python benchmarks/count_work_cuda.py --N 64 128 --d 64 256 --mode bf16
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cuda"
MODES = {"ieee": 0, "tf32": 1, "bf16": 2}
_SOURCES = ("cube.cu", "pair.cu", "device.cuh", "tile.cuh", "tile_engines.cuh", "tile_loaders.cuh", "plan.h", "launch.h", "static_switch.h", "emu/cuda_emu.h",
            "emu/emu_shim.cpp")


def emulation_command(out: Path) -> list[str]:
    """The g++ command that builds the emulated kernels into ``out`` (a shared library)."""
    gxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if gxx is None:
        raise RuntimeError("no C++ compiler (g++) found: the CUDA emulation cannot be built")
    return [gxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
            "-Werror", "-DSYMILE_CUDA_EMULATE", "-I.", "-x", "c++", "cube.cu", "-x", "c++", "pair.cu", "-x", "none",
            "emu/emu_shim.cpp", "-o", str(out)]


def build_emulation(cache: "Path | None" = None) -> Path:
    """Path of the emulation library, built unless a build of the same sources exists."""
    digest = hashlib.sha256(b"".join((CSRC / s).read_bytes() for s in _SOURCES)).hexdigest()[:16]
    cache = cache or Path(tempfile.gettempdir()) / "symile_cuda_emu"
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"libsymile_emu_{digest}.so"
    if not lib.exists():
        tmp = cache / f"{lib.name}.{os.getpid()}.tmp"
        done = subprocess.run(emulation_command(tmp), cwd=CSRC, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the emulation build failed:\n{done.stdout}{done.stderr}")
        tmp.replace(lib)
    return lib


def _launches(lib: ctypes.CDLL) -> list[dict]:
    lib.emu_work_launch.restype = ctypes.c_char_p
    lib.emu_work_pair_products.restype = ctypes.c_int64
    rows = []
    for n in range(lib.emu_work_launches()):
        grid, flops, exps, vexps, vloads = (ctypes.c_int64() for _ in range(5))
        name = lib.emu_work_launch(ctypes.c_int64(n), *map(ctypes.byref, (grid, flops, exps, vexps, vloads)))
        rows.append({"kernel": name.decode(), "grid": grid.value, "flops": flops.value, "exps": exps.value,
                     "vexps": vexps.value, "vector_loads": vloads.value,
                     "pair_products": lib.emu_work_pair_products(ctypes.c_int64(n))})
    return rows


def cuda_work_counts(N: int, d: int, mode: str = "bf16", tau: float = 14.3, seed: int = 0, num_sms: int = 2,
                     lib: "ctypes.CDLL | None" = None) -> dict:
    """Counted work of one cube forward + backward at I = J = K = N, feature size d.

    mode: "ieee", "tf32" or "bf16" (float32 rows). Returns ``{"N", "d", "mode",
    "model_flops", "passes": [{"pass", "kernel", "grid", "flops", "exps", "vexps",
    "flops_per_model", "exp_per_element", "vexp_per_element"}], "flops_per_model",
    "exp_per_element", "vexp_per_element"}``;
    launches that do no tile products and no exponentials (fills, sums) are left out.
    """
    lib = lib or ctypes.CDLL(str(build_emulation()))
    gen = torch.Generator().manual_seed(seed)
    x, y, z = (torch.nn.functional.normalize(torch.randn(N, d, generator=gen), dim=1).contiguous() for _ in range(3))
    tau_t = torch.tensor(tau, dtype=torch.float32)
    L = [torch.empty(N, dtype=torch.float64) for _ in range(3)]  # the forward's LSEs are float64
    L32 = [torch.empty(N) for _ in range(3)]  # the backward's, in the compute dtype
    g = [torch.randn(N, generator=gen) / N for _ in range(3)]
    grads = [torch.empty(N, d) for _ in range(3)] + [torch.empty(())]
    ptr = lambda *ts: [ctypes.c_void_p(t.data_ptr()) for t in ts]  # noqa: E731
    sizes = [ctypes.c_int64(v) for v in (N, N, N, d)]
    passes = []
    for name, call in (
            ("forward", lambda: lib.emu_cube_forward_f32(*ptr(x, y, z, tau_t), *sizes, ctypes.c_int(MODES[mode]),
                                                         ctypes.c_int(num_sms), *ptr(*L))),
            ("backward", lambda: lib.emu_cube_backward_f32(*ptr(x, y, z, tau_t, *L32, *g), *sizes,
                                                           ctypes.c_int(MODES[mode]), ctypes.c_int(num_sms),
                                                           *ptr(*grads)))):
        lib.emu_work_reset()
        for lo, hi in zip(L32, L):
            lo.copy_(hi)  # rounded to float32 (ops passes a shift rounded down; the counts are the same)
        rc = call()
        if rc != 0:
            raise RuntimeError(f"the emulated cube {name} returned {rc}")
        passes += [dict(row, **{"pass": name}) for row in _launches(lib)
                   if row["flops"] or row["exps"] or row["vexps"]]
    model = 6 * N ** 3 * d
    for row in passes:
        row["flops_per_model"] = row["flops"] / model
        row["exp_per_element"] = row["exps"] / N ** 3
        row["vexp_per_element"] = row["vexps"] / N ** 3
        row["pair_products_per_n2d"] = row["pair_products"] / (N * N * d)
    return {"N": N, "d": d, "mode": mode, "model_flops": model, "passes": passes,
            "flops_per_model": sum(r["flops"] for r in passes) / model,
            "exp_per_element": sum(r["exps"] for r in passes) / N ** 3,
            "vexp_per_element": sum(r["vexps"] for r in passes) / N ** 3,
            "pair_products_per_n2d": sum(r["pair_products"] for r in passes) / (N * N * d)}


def markdown(results: list[dict]) -> str:
    """One table row per (N, d, mode): FLOPs / model and exponentials per element, total and per pass."""
    lines = ["| N | d | mode | FLOPs / 6N³d | exp / element | vexp / element | x∘y built / N²d | per launch: "
             "FLOPs / 6N³d, exp / element, x∘y built / N²d |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        per = "; ".join(f"{p['pass']} `{p['kernel']}` ×{p['grid']}: {p['flops_per_model']:.3f}, "
                        f"{p['exp_per_element']:.3f}, {p['pair_products_per_n2d']:.2f}" for p in r["passes"]
                        if p["flops"] or p["exps"])
        lines.append(f"| {r['N']} | {r['d']} | {r['mode']} | {r['flops_per_model']:.3f} | "
                     f"{r['exp_per_element']:.3f} | {r['vexp_per_element']:.3f} | {r['pair_products_per_n2d']:.2f} | "
                     f"{per} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--mode", choices=sorted(MODES), nargs="+", default=["bf16"])
    parser.add_argument("--tau", type=float, default=14.3)
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    lib = ctypes.CDLL(str(build_emulation()))
    results = [cuda_work_counts(N, d, mode, args.tau, lib=lib) for mode in args.mode for N in args.N for d in args.d]
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
