"""The CUDA backend (csrc/cuda, symile_kernels/cuda.py).

Without a GPU (CI) the checks are the compiler's and the CPU's:

* every ``.cu`` file compiles with nvcc for sm_80 and sm_90 with warnings as
  errors (skipped with a message where nvcc is absent), and ``binding.cpp``
  compiles (syntax only) against torch's headers;
* ``plan.h``'s host logic (tile configurations, shared-memory layouts, launch
  geometry, argument checks) passes ``csrc/cuda/plan_test.cpp`` (g++);
* the real kernel sources run on the CPU through a host-thread emulation of the
  CUDA subset they use (``csrc/cuda/emu``: one thread per CUDA thread,
  barriers, warp shuffles, WMMA fragments with their alignment rules) and match
  the float64 oracle through ``symile_loss`` in every mode (IEEE float32 and
  float64, TF32, bf16 tiles), including tau = 100, odd sizes, a rectangular
  cube, "n" sampling and M = 2;
* the backend says why it cannot run on CPU tensors.

With CUDA the GPU tests run the compiled extension against the oracle (docs/math.md
section 6 inputs and tolerances), opcheck, torch.compile and determinism.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from symile_kernels import _build, backends, chunked, symile_loss
from symile_kernels.backends import Backend

from oracle_check import check_against_oracle, make_inputs, relative_error

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


# ---------------------------------------------------------------------------
# Builds, started together once per module so the two cores overlap them.

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
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDA_HOME"), CUDA_HOME, str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if not found:
        return None
    cuda_include = found[0]
    flags = []
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in paths):
        stub = stub_dir / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        flags += ["-isystem", str(stub_dir)]
    for p in paths:
        flags += ["-isystem", p]
    return flags + ["-isystem", str(cuda_include)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_build")
    b = _Builds(out)
    if NVCC is None:
        for f in CU_FILES:
            b.skips[f"nvcc:{f}"] = ("nvcc not found (set CUDA_HOME or put nvcc on PATH): "
                                    "the CUDA sources were not compiled")
    else:
        for f in CU_FILES:
            b.start(f"nvcc:{f}", [NVCC, "-c", f, "-o", str(out / (f + ".o"))] + NVCC_FLAGS)
    if GXX is None:
        for name in ("plan", "emu", "binding"):
            b.skips[name] = "no C++ compiler (g++) found"
        return b
    b.start("plan", [GXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "plan_test.cpp", "-o",
                     str(out / "plan_test")])
    b.start("emu", [GXX, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-Wall", "-Wextra",
                    "-Wno-unknown-pragmas", "-Werror", "-DSYMILE_CUDA_EMULATE", "-I.", "-x", "c++", "cube.cu",
                    "-x", "c++", "pair.cu", "-x", "none", "emu/emu_shim.cpp", "-o", str(out / "libsymile_emu.so")])
    headers = _torch_cuda_headers(out / "stub")
    if headers is None:
        b.skips["binding"] = "torch's c10/cuda headers or the CUDA toolkit headers are missing"
    else:
        b.start("binding", [GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DUSE_CUDA",
                            *headers, "binding.cpp"])
    return b


# ---------------------------------------------------------------------------
# Compiler checks (no GPU).

@no_gpu_only
@pytest.mark.parametrize("cu_file", CU_FILES)
def test_cu_file_compiles_for_sm80_sm90_without_warnings(builds, cu_file):
    rc, output, seconds = builds.result(f"nvcc:{cu_file}")
    assert rc == 0, f"nvcc failed on {cu_file}:\n{output}"
    assert "warning" not in output.lower(), f"nvcc warned on {cu_file}:\n{output}"
    print(f"{cu_file}: compiled for sm_80 + sm_90 in {seconds:.0f} s")


def test_mode_map_matches_plan_h():
    import re

    enum = (CSRC / "plan.h").read_text().split("enum Mode", 1)[1].split("};", 1)[0]
    found = {name.lower(): int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert found == _build.MATH_MODES


def test_every_cu_file_is_built_by_the_extension():
    import symile_kernels.cuda as cuda_backend

    assert CU_FILES and set(CU_FILES) <= set(cuda_backend.SOURCES)
    assert all((CSRC / s).exists() for s in cuda_backend.SOURCES)


@no_gpu_only
def test_binding_compiles_against_torch_headers(builds):
    rc, output, seconds = builds.result("binding")
    assert rc == 0, f"binding.cpp does not compile against torch's headers:\n{output}"


@no_gpu_only
def test_host_planning_logic(builds):
    rc, output, _ = builds.result("plan")
    assert rc == 0, f"plan_test.cpp does not compile:\n{output}"
    run = subprocess.run([str(builds.out / "plan_test")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------------------
# The kernel sources on the CPU through the emulation.

MODES = _build.MATH_MODES
MODE_TOLERANCE = {"ieee": None, "tf32": "tf32", "bf16": torch.bfloat16}


class _Emulated:
    """The four Backend functions over the emulated launchers (CPU tensors)."""

    def __init__(self, lib: ctypes.CDLL, mode: int, num_sms: int):
        self.lib, self.mode, self.num_sms = lib, mode, num_sms

    SUFFIX = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self.lib, f"emu_{name}_{self.SUFFIX[dtype]}")

    def _mode(self, dtype):
        return self.mode if dtype == torch.float32 else 0

    @staticmethod
    def _p(*tensors):
        for t in tensors:
            assert t.is_contiguous() and t.device.type == "cpu"
        return [ctypes.c_void_p(t.data_ptr()) for t in tensors]

    @staticmethod
    def _nan(*shapes_like):
        return [torch.full_like(t, float("nan")) for t in shapes_like]

    def cube_lse_forward(self, x, y, z, tau):
        out = [tau.new_full((t.shape[0],), float("nan")) for t in (x, y, z)]
        sizes = map(ctypes.c_int64, (x.shape[0], y.shape[0], z.shape[0], x.shape[1]))
        rc = self._fn("cube_forward", x.dtype)(*self._p(x, y, z, tau), *sizes, ctypes.c_int(self._mode(x.dtype)),
                                               ctypes.c_int(self.num_sms), *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc):
        out = self._nan(x, y, z, tau)
        sizes = map(ctypes.c_int64, (x.shape[0], y.shape[0], z.shape[0], x.shape[1]))
        rc = self._fn("cube_backward", x.dtype)(*self._p(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc), *sizes,
                                                ctypes.c_int(self._mode(x.dtype)), ctypes.c_int(self.num_sms),
                                                *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)

    def pair_lse_forward(self, a, b, pos, tau):
        out = pos.new_full((a.shape[0],), float("nan"))
        sizes = map(ctypes.c_int64, (a.shape[0], b.shape[0], a.shape[1]))
        rc = self._fn("pair_forward", a.dtype)(*self._p(a, b, pos, tau), *sizes, ctypes.c_int(self._mode(a.dtype)),
                                               ctypes.c_int(self.num_sms), *self._p(out))
        assert rc == 0, f"launcher returned {rc}"
        return out

    def pair_lse_backward(self, a, b, pos, tau, L, gL):
        out = self._nan(a, b, pos, tau)
        sizes = map(ctypes.c_int64, (a.shape[0], b.shape[0], a.shape[1]))
        rc = self._fn("pair_backward", a.dtype)(*self._p(a, b, pos, tau, L, gL), *sizes,
                                                ctypes.c_int(self._mode(a.dtype)), ctypes.c_int(self.num_sms),
                                                *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)


@pytest.fixture(scope="module")
def emu_lib(builds):
    rc, output, _ = builds.result("emu")
    assert rc == 0, f"the emulation build of cube.cu/pair.cu failed:\n{output}"
    return ctypes.CDLL(str(builds.out / "libsymile_emu.so"))


@pytest.fixture
def emulated(emu_lib, monkeypatch):
    """Registers the emulated kernels as backend "cuda_emu" for CPU tensors; returns a
    function that sets its mode and launch geometry."""
    state = _Emulated(emu_lib, 0, 2)
    backend = Backend(name="cuda_emu", cube_lse_forward=state.cube_lse_forward,
                      cube_lse_backward=state.cube_lse_backward, pair_lse_forward=state.pair_lse_forward,
                      pair_lse_backward=state.pair_lse_backward, accepts_low_precision=True)
    backends.register(backend, replace=True)

    def configure(mode: str = "ieee", num_sms: int = 2):
        state.mode, state.num_sms = MODES[mode], num_sms
        return "cuda_emu"
    yield configure
    backends.unregister("cuda_emu")


# (N, d, tau, dtype, mode, num_sms): odd sizes crossing the 4 x 16 pair tiles and 64 (32) column tiles.
EMU_CUBE_CASES = [
    (1, 3, 1.0, torch.float64, "ieee", 1),
    (7, 70, 100.0, torch.float64, "ieee", 3),  # d = 70 crosses float64's 64-column W chunk
    (17, 5, 100.0, torch.float32, "ieee", 2),
    (18, 33, 14.3, torch.float32, "tf32", 1),
    (18, 33, 14.3, torch.float32, "bf16", 16),
]


@no_gpu_only
@pytest.mark.parametrize("N,d,tau,dtype,mode,num_sms", EMU_CUBE_CASES, ids=str)
def test_emulated_cube_matches_oracle(emulated, N, d, tau, dtype, mode, num_sms):
    name = emulated(mode, num_sms)
    check_against_oracle(name, make_inputs("unit", 3, N, d), tau, dtype=dtype, tolerance=MODE_TOLERANCE[mode])


@no_gpu_only
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_emulated_low_precision_rows(emulated, dtype):
    # bf16/fp16 rows reach the kernels unconverted (accepts_low_precision): bf16 or TF32
    # tiles, float32 LSEs, gradients in the rows' dtype.
    name = emulated("ieee", 2)
    check_against_oracle(name, make_inputs("unit", 3, 18, 33), 100.0, dtype=dtype)
    check_against_oracle(name, make_inputs("unit", 3, 70, 20), 14.3, dtype=dtype, negative_sampling="n", seed=2)


@no_gpu_only
def test_emulated_rectangular_cube_and_input_kinds(emulated):
    name = emulated("ieee", 3)
    # M = 4 folds the fourth modality into x's rows: a 25 x 5 x 5 cube.
    check_against_oracle(name, make_inputs("unit", 4, 5, 7), 100.0, dtype=torch.float32)
    check_against_oracle(name, make_inputs("gaussian", 3, 9, 3), 1.0, dtype=torch.float64)
    check_against_oracle(name, make_inputs("huge_row", 3, 9, 3), 1.0, dtype=torch.float32)


@no_gpu_only
@pytest.mark.parametrize("mode", ["ieee", "tf32", "bf16"])
def test_emulated_pairs_n_sampling_and_clip(emulated, mode):
    name = emulated(mode)
    tol = MODE_TOLERANCE[mode]
    # N = 70 crosses a 64-row tile; d = 130 crosses a 128-column W chunk.
    check_against_oracle(name, make_inputs("unit", 3, 70, 130 if mode != "ieee" else 5), 100.0,
                         dtype=torch.float32, negative_sampling="n", tolerance=tol, seed=3)
    check_against_oracle(name, make_inputs("unit", 2, 9, 48), 14.3, dtype=torch.float64 if mode == "ieee"
                         else torch.float32, tolerance=tol)


@no_gpu_only
@pytest.mark.parametrize("I,J,d,dtype", [(5, 70, 3, torch.float64), (66, 67, 130, torch.float32)], ids=str)
def test_emulated_rectangular_pairs_match_chunked(emu_lib, I, J, d, dtype):
    # I < J: a process's local rows against the global batch (distributed runs).
    emu = _Emulated(emu_lib, 0, 2)
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1) for n in (I, J))
    tau = torch.tensor(100.0, dtype=torch.float64)
    pos = tau * (a * b[:I]).sum(1) - 0.5
    gL = torch.randn(I, dtype=torch.float64)
    L = chunked.pair_lse_forward(a, b, pos, tau)
    expected = [L, *chunked.pair_lse_backward(a, b, pos, tau, L, gL)]
    cast = [t.to(dtype).contiguous() for t in (a, b, pos, tau, L, gL)]
    out = [emu.pair_lse_forward(*cast[:4]), *emu.pair_lse_backward(*cast)]
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for name, got, want in zip(("L", "da", "db", "dpos", "dtau"), out, expected):
        assert got.shape == want.shape and relative_error(got, want) < tolerance, name


@no_gpu_only
def test_emulated_results_are_deterministic(emulated):
    name = emulated("ieee", 3)
    reps = [r.float().requires_grad_() for r in make_inputs("unit", 3, 11, 7)]
    runs = []
    for _ in range(2):
        loss = symile_loss(reps, 100.0, backend=name)
        runs.append([loss.detach()] + list(torch.autograd.grad(loss, reps)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------
# The registered backend without a GPU.

def test_registered_and_not_auto_preferred():
    assert backends._MODULES.get("cuda") == "symile_kernels.cuda"
    order = backends._AUTO_ORDER["cuda"]
    assert order.index("cuda") > order.index("triton")


def test_cpu_tensors_are_refused_with_a_reason():
    reason = backends.unavailable_reason("cuda", torch.device("cpu"))
    assert reason is not None and "CUDA tensors only" in reason
    assert "cuda" not in backends.available_backends("cpu")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        symile_loss([torch.randn(3, 4) for _ in range(3)], 1.0, backend="cuda")


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_no_cuda_reason():
    reason = backends.unavailable_reason("cuda", torch.device("cuda"))
    assert reason is not None and ("no CUDA" in reason or "no CUDA device" in reason), reason


def test_math_mode_switch(monkeypatch):
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.math_mode(torch.float64) == 0
    monkeypatch.setenv(cuda_backend.MATH_ENV, "bf16")
    assert cuda_backend.math_mode(torch.float32) == 2 and cuda_backend.math_mode(torch.float64) == 0
    monkeypatch.setenv(cuda_backend.MATH_ENV, "fast")
    with pytest.raises(ValueError, match=cuda_backend.MATH_ENV):
        cuda_backend.math_mode(torch.float32)


# ---------------------------------------------------------------------------
# On a GPU: the compiled extension (the GPU suite runs these).

GPU_CUBE_CASES = [(N, d, tau, dtype) for N, d in ((1, 3), (2, 1), (7, 48), (33, 200), (129, 3), (130, 256))
                  for tau in (1.0, 100.0) for dtype in (torch.float64, torch.float32, torch.bfloat16)]
GPU_CUBE_CASES += [(N, d, 100.0, torch.float16) for N, d in ((7, 48), (130, 256))]


@gpu_only
@pytest.mark.parametrize("N,d,tau,dtype", GPU_CUBE_CASES, ids=str)
def test_gpu_cube_matches_oracle(N, d, tau, dtype):
    check_against_oracle("cuda", make_inputs("unit", 3, N, d), tau, dtype=dtype, device="cuda")


@gpu_only
@pytest.mark.parametrize("kind,tau", [("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0), ("unit", 100.0)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_gpu_input_kinds(kind, tau, dtype):
    check_against_oracle("cuda", make_inputs(kind, 3, 67, 48), tau, dtype=dtype, device="cuda")


@gpu_only
@pytest.mark.parametrize("M,N,d", [(4, 5, 3), (4, 23, 48), (5, 9, 17)])
def test_gpu_rectangular_cube(M, N, d):
    check_against_oracle("cuda", make_inputs("unit", M, N, d), 14.3, dtype=torch.float32, device="cuda")


@gpu_only
@pytest.mark.parametrize("M,N,d", [(3, 33, 48), (2, 33, 5), (4, 7, 3), (3, 1025, 59), (2, 4097, 256)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_gpu_n_sampling_and_pairs(M, N, d, dtype):
    check_against_oracle("cuda", make_inputs("unit", M, N, d), 100.0, dtype=dtype, negative_sampling="n",
                         device="cuda", seed=7)


@gpu_only
def test_gpu_clip_loss():
    check_against_oracle("cuda", make_inputs("unit", 3, 65, 48), 14.3, loss="clip", device="cuda")


@gpu_only
@pytest.mark.parametrize("math,tolerance", [("tf32", "tf32"), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("N,d", [(33, 200), (130, 256)])
def test_gpu_tensor_core_modes(monkeypatch, math, tolerance, N, d):
    monkeypatch.setenv("SYMILE_KERNELS_CUDA_MATH", math)
    for tau in (1.0, 100.0):
        check_against_oracle("cuda", make_inputs("unit", 3, N, d), tau, dtype=torch.float32, tolerance=tolerance,
                             device="cuda")
    check_against_oracle("cuda", make_inputs("unit", 3, N, d), 100.0, dtype=torch.float32, tolerance=tolerance,
                         negative_sampling="n", device="cuda", seed=5)


@gpu_only
def test_gpu_tf32_follows_torch_flag(monkeypatch):
    import symile_kernels.cuda as cuda_backend

    monkeypatch.delenv(cuda_backend.MATH_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert cuda_backend.math_mode(torch.float32) == 1
    check_against_oracle("cuda", make_inputs("unit", 3, 33, 48), 14.3, dtype=torch.float32, tolerance="tf32",
                         device="cuda")


@gpu_only
def test_gpu_matches_chunked_at_larger_n():
    reps = [r.to("cuda", torch.float32) for r in make_inputs("unit", 3, 512, 256)]
    out, ref = [], []
    for backend, dest in (("cuda", out), ("chunked", ref)):
        inputs = [r.clone().requires_grad_() for r in reps]
        tau = torch.tensor(14.3, device="cuda", requires_grad=True)
        loss = symile_loss(inputs, tau, backend=backend)
        dest.extend([loss] + list(torch.autograd.grad(loss, inputs + [tau])))
    for a, b in zip(out, ref):
        assert relative_error(a, b) < 1e-4


@gpu_only
@pytest.mark.parametrize("I,J,d", [(5, 70, 3), (66, 131, 130), (1000, 4096, 256)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_gpu_rectangular_pairs_match_chunked(I, J, d, dtype):
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, device="cuda"), dim=1)
            for n in (I, J))
    tau = torch.tensor(100.0, dtype=torch.float64, device="cuda")
    pos = tau * (a * b[:I]).sum(1) - 0.5
    gL = torch.randn(I, dtype=torch.float64, device="cuda")
    L = chunked.pair_lse_forward(a, b, pos, tau)
    expected = [L, *chunked.pair_lse_backward(a, b, pos, tau, L, gL)]
    cast = [t.to(dtype).contiguous() for t in (a, b, pos, tau, L, gL)]
    from symile_kernels import cuda as cuda_backend

    out = [cuda_backend.pair_lse_forward(*cast[:4]), *cuda_backend.pair_lse_backward(*cast)]
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for name, got, want in zip(("L", "da", "db", "dpos", "dtau"), out, expected):
        assert got.shape == want.shape and relative_error(got, want) < tolerance, name


@gpu_only
def test_gpu_deterministic():
    reps = [r.to("cuda", torch.float32).requires_grad_() for r in make_inputs("unit", 3, 257, 96)]
    runs = []
    for _ in range(2):
        loss = symile_loss(reps, 100.0, backend="cuda")
        loss_n = symile_loss(reps, 100.0, backend="cuda", negative_sampling="n")
        runs.append([loss.detach(), loss_n.detach()] + list(torch.autograd.grad(loss + loss_n, reps)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@gpu_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_gpu_opcheck(dtype):
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.load_reason() is None
    ops = torch.ops.symile_kernels
    x, y, z = (torch.randn(n, 19, device="cuda", dtype=dtype) * 0.3 for n in (9, 11, 5))
    tau = torch.tensor(3.0, device="cuda", dtype=dtype)
    La, Lb, Lc = ops.cuda_cube_lse_forward(x, y, z, tau, 0)
    g = [torch.randn_like(v) for v in (La, Lb, Lc)]
    torch.library.opcheck(ops.cuda_cube_lse_forward, (x, y, z, tau, 0))
    torch.library.opcheck(ops.cuda_cube_lse_backward, (x, y, z, tau, La, Lb, Lc, *g, 0))
    a, b = (torch.randn(n, 19, device="cuda", dtype=dtype) * 0.3 for n in (13, 21))  # I < J: distributed rows
    pos = torch.randn(13, device="cuda", dtype=dtype)
    L = ops.cuda_pair_lse_forward(a, b, pos, tau, 0)
    torch.library.opcheck(ops.cuda_pair_lse_forward, (a, b, pos, tau, 0))
    torch.library.opcheck(ops.cuda_pair_lse_backward, (a, b, pos, tau, L, torch.randn_like(L), 0))
    # bf16 rows with float32 tau and LSE vectors.
    xb, yb, zb = (t.to(torch.bfloat16) for t in (x, y, z))
    tau32 = tau.float()
    torch.library.opcheck(ops.cuda_cube_lse_forward, (xb, yb, zb, tau32, 0))
    Lb16 = ops.cuda_cube_lse_forward(xb, yb, zb, tau32, 0)
    torch.library.opcheck(ops.cuda_cube_lse_backward, (xb, yb, zb, tau32, *Lb16, *(v.float() for v in g), 0))
    # The differentiable wrapper op with this backend.
    from symile_kernels import ops as sk_ops

    torch.library.opcheck(sk_ops.cube_lse, (x.requires_grad_(), y, z, tau, "cuda"))


@gpu_only
@pytest.mark.parametrize("negative_sampling", ["n_squared", "n"])
def test_gpu_torch_compile_fullgraph(negative_sampling):
    torch._dynamo.reset()
    reps = [r.to("cuda", torch.float32) for r in make_inputs("unit", 3, 33, 48)]

    def step(x, y, z, log_tau):
        return symile_loss([x, y, z], log_tau.exp(), negative_sampling=negative_sampling, backend="cuda")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):  # eager first: the backend's availability is then cached
        args = [r.clone().requires_grad_() for r in reps] + [torch.tensor(2.0, device="cuda", requires_grad=True)]
        torch.manual_seed(3)
        loss = fn(*args)
        loss.backward()
        results.append([loss.detach()] + [a.grad for a in args])
    for eager, comp in zip(*results):
        assert relative_error(comp, eager) < 1e-6


@gpu_only
def test_gpu_bad_input_names_the_tensor():
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.load_reason() is None
    ops = torch.ops.symile_kernels
    x = torch.randn(5, 8, device="cuda")
    tau = torch.tensor(1.0, device="cuda")
    with pytest.raises(RuntimeError, match="y must be on x's device"):
        ops.cuda_cube_lse_forward(x, x.cpu(), x, tau, 0)
    with pytest.raises(RuntimeError, match="z must be contiguous"):
        ops.cuda_cube_lse_forward(x, x, torch.randn(8, 5, device="cuda").t(), tau, 0)
    with pytest.raises(RuntimeError, match="tau must have dtype"):
        ops.cuda_cube_lse_forward(x, x, x, tau.double(), 0)
    with pytest.raises(RuntimeError, match="tau must have dtype"):  # bf16 rows take a float32 tau
        ops.cuda_cube_lse_forward(x.bfloat16(), x.bfloat16(), x.bfloat16(), tau.bfloat16(), 0)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        ops.cuda_cube_lse_forward(x, x, x, tau, 7)
    with pytest.raises(RuntimeError, match="needs float32 tensors"):
        ops.cuda_cube_lse_forward(x.double(), x.double(), x.double(), tau.double(), 1)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        ops.cuda_cube_lse_forward(x.int(), x.int(), x.int(), tau, 0)
    with pytest.raises(RuntimeError, match="pos must have 5 entries"):
        ops.cuda_pair_lse_forward(x, x, torch.zeros(4, device="cuda"), tau, 0)
    with pytest.raises(RuntimeError, match=r"b.size\(0\) \(J\) must be >= a.size\(0\)"):
        ops.cuda_pair_lse_forward(x, x[:3], torch.zeros(5, device="cuda"), tau, 0)


@gpu_only
def test_gpu_listed_and_big_batch_memory():
    assert "cuda" in backends.available_backends("cuda")
    # N = 2048, d = 256: extra memory is O(N) workspaces, far from any N^2 or N^3 buffer.
    reps = [torch.nn.functional.normalize(torch.randn(2048, 256, device="cuda"), dim=1).requires_grad_()
            for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = symile_loss(reps, 14.3, backend="cuda")
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert torch.cuda.max_memory_allocated() - base < 64 * 2 ** 20
