"""Shared by the CUDA backend's tests: markers, compiler paths and flags, and the builds.

tests/test_cuda_build.py, tests/test_cuda_emulation.py and tests/test_cuda_gpu.py
import from here; each starts only the builds it needs (``start_builds``), all
at once, so the two cores overlap them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from symile_kernels import _build, chunked

from harness import relative_error

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cuda"
CUDA = torch.cuda.is_available()
_skip_without_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU suite runs these)")


def gpu_only(test):
    """Skipped without a CUDA device; marked ``gpu`` so that the GPU suite selects it (-m gpu)."""
    return pytest.mark.gpu(_skip_without_gpu(test))
# The compiler and emulation checks stand in for a GPU; where one is present the extension's
# build and the GPU tests check the same sources, so the GPU suite's time goes to those.
no_gpu_only = pytest.mark.skipif(CUDA, reason="CPU stand-in for the GPU tests, which run here instead")

NVCC = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
GXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
# The defines and flags torch's CUDAExtension passes, so CI compiles what the build compiles.
NVCC_FLAGS = ["-std=c++17", *_build.NVCC_FLAGS, *_build.TORCH_NVCC_DEFINES,
              *_build.gencode_flags(_build.DEFAULT_CUDA_ARCH_LIST, ptx=False),
              "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror,-fPIC"]
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))


class _Builds:
    def __init__(self, out: Path):
        self.out = out
        self.jobs: dict[str, tuple[subprocess.Popen, float]] = {}
        self.skips: dict[str, str] = {}

    def start(self, name: str, cmd: list[str], cwd: Path = CSRC) -> None:
        self.jobs[name] = (subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True), time.monotonic())

    def result(self, name: str, timeout: float = 600) -> tuple[int, str, float]:
        if name in self.skips:
            pytest.skip(self.skips[name])
        proc, started = self.jobs[name]
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.monotonic() - started


def _torch_cuda_headers(stub_dir: Path) -> "list[str] | None":
    """Include flags for a syntax-only g++ compile of binding.cpp, or None with torch's
    CUDA headers or the CUDA toolkit's missing. A CPU-only torch ships c10/cuda
    without its generated cuda_cmake_macros.h; an empty stand-in is enough to parse."""
    from torch.utils.cpp_extension import include_paths

    paths = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").exists() for p in paths) or NVCC is None:
        return None
    home = _build.resolve_cuda_home()  # what the builds use (a wrapper nvcc followed to its toolkit)
    if home is None or not (Path(home) / "include" / "cuda_runtime.h").exists():
        return None
    cuda_include = Path(home) / "include"
    flags = []
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in paths):
        stub = stub_dir / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        flags += ["-isystem", str(stub_dir)]
    for p in paths:
        flags += ["-isystem", p]
    return flags + ["-isystem", str(cuda_include)]


def start_builds(out: Path, names: "tuple[str, ...]") -> _Builds:
    """Starts the named builds in ``out``: "nvcc" (every .cu file for sm_80 and sm_90),
    "plan" (plan_test.cpp), "emu" (cube.cu and pair.cu for the CPU emulation) and
    "binding" (binding.cpp, syntax only, against torch's headers)."""
    b = _Builds(out)
    if "nvcc" in names:
        if NVCC is None:
            for f in CU_FILES:
                b.skips[f"nvcc:{f}"] = ("nvcc not found (set CUDA_HOME or put nvcc on PATH): "
                                        "the CUDA sources were not compiled")
        else:
            for f in CU_FILES:
                b.start(f"nvcc:{f}", [NVCC, "-c", f, "-o", str(out / (f + ".o"))] + NVCC_FLAGS)
    for name in ("plan", "emu", "binding"):
        if name in names and GXX is None:
            b.skips[name] = "no C++ compiler (g++) found"
    if GXX is None:
        return b
    if "plan" in names:
        b.start("plan", [GXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "plan_test.cpp", "-o",
                         str(out / "plan_test")])
    if "emu" in names:
        b.start("emu", [GXX, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-Wall", "-Wextra",
                        "-Wno-unknown-pragmas", "-Werror", "-DSYMILE_CUDA_EMULATE", "-I.", "-x", "c++", "cube.cu",
                        "-x", "c++", "pair.cu", "-x", "none", "emu/emu_shim.cpp", "-o",
                        str(out / "libsymile_emu.so")])
    if "binding" in names:
        headers = _torch_cuda_headers(out / "stub")
        if headers is None:
            b.skips["binding"] = "torch's c10/cuda headers or the CUDA toolkit headers are missing"
        else:
            b.start("binding", [GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DUSE_CUDA",
                                *headers, "binding.cpp"])
    return b


def check_rectangular_pairs(forward, backward, I: int, J: int, d: int, dtype: torch.dtype, tolerance: float,
                            device: str = "cpu") -> None:
    """The pair LSE ops ``forward``/``backward`` on I < J rows (a process's local rows against the
    global batch, as in distributed runs) match the chunked backend's float64 results."""
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, device=device), dim=1)
            for n in (I, J))
    tau = torch.tensor(100.0, dtype=torch.float64, device=device)
    pos = tau * (a * b[:I]).sum(1) - 0.5
    gL = torch.randn(I, dtype=torch.float64, device=device)
    L = chunked.pair_lse_forward(a, b, pos, tau)
    expected = [L, *chunked.pair_lse_backward(a, b, pos, tau, L, gL)]
    cast = [t.to(dtype).contiguous() for t in (a, b, pos, tau, L, gL)]
    out = [forward(*cast[:4]), *backward(*cast)]
    for name, got, want in zip(("L", "da", "db", "dpos", "dtau"), out, expected):
        assert got.shape == want.shape and relative_error(got, want) < tolerance, (name, relative_error(got, want))
