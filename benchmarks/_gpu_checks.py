"""The GPU suite's correctness stage: the oracle sweep, the pytest step, compute-sanitizer.

One *job* (a dict) runs in its own subprocess (``gpu_suite.py --check-worker JOB``)
and prints one JSON row per case: a crash (an illegal address kills the CUDA
context) loses one job, not the suite, and jobs compile their Triton kernels in
parallel. A job is one backend x compute mode x Triton configuration index x
shape set:

* compute modes (``MODES``): "fp32" (float32, IEEE products), "tf32" (float32 with
  ``torch.backends.cuda.matmul.allow_tf32``), "bf16", "fp16", and for the cuda
  backend "fp32-as-bf16" (float32 rows with SYMILE_KERNELS_CUDA_MATH=bf16);
* cases: M in {2, 3, 4} x {"n", "n_squared"} x odd (N, d) that leave ragged tiles
  x input kinds (unit rows at tau 14.3 and 100, Gaussian rows, a faint row that
  takes the kernels' fallback paths; docs/math.md section 6.1);
* each case: ``symile_loss(..., backend=b)`` forward and backward (a random
  upstream gradient) against the float64 oracle ``symile_kernels.reference`` on
  the same device and the same (cast) values, loss and every gradient (dtau
  too) by relative error at docs/math.md section 6.1's tolerances.

Triton configurations: every kernel's autotune list is checked by pinning index
i (clamped to each list's length) with autotuning off, through
``symile_kernels.triton.kernel_configs()`` / ``pinned_config(name, index)`` when
the package has them, else through the autotuners' ``configs`` lists
(``config_tables``); neither: the report says the check is unavailable.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from typing import Iterator, Optional

import torch

# docs/math.md section 6.1: (loss, gradients) relative-error tolerances per compute mode.
TOLERANCES = {"fp64": (1e-10, 1e-9), "fp32": (1e-5, 1e-4), "tf32": (5e-3, 1e-2), "bf16": (2e-2, 5e-2),
              "fp16": (2e-2, 5e-2), "fp32-as-bf16": (2e-2, 5e-2)}
# mode -> (input dtype, allow TF32, extra environment of the job's process)
MODES = {"fp32": ("float32", False, {}), "tf32": ("float32", True, {}), "bf16": ("bfloat16", False, {}),
         "fp16": ("float16", False, {}), "fp32-as-bf16": ("float32", False, {"SYMILE_KERNELS_CUDA_MATH": "bf16"}),
         "fp64": ("float64", False, {})}
KINDS = (("unit", 14.3), ("unit", 100.0), ("gaussian", 1.0), ("faint", 14.3))
# (N, d): not multiples of any tile size; d = 48 is a multiple of 16 (another Triton specialisation).
SHAPES = {"full": ((7, 3), (33, 48), (129, 200)), "reduced": ((33, 48), (129, 200)), "smoke": ((5, 3), (7, 10)),
          "interpreter": ((5, 3),)}
# The oracle materialises N^M float64 logits (a few copies): M = 3 up to N = 129, M = 4 up to N = 33.
ORACLE_MAX_ELEMENTS = 2 ** 24


def cases(shape_set: str, Ms=(2, 3, 4), n_kinds: Optional[int] = None) -> list[dict]:
    """The sweep's cases, cheapest first. "reduced" (pinned Triton configurations) and
    "smoke" keep the kinds that matter most and fewer shapes; ``Ms`` and ``n_kinds``
    (the first kinds only) shrink it further (the Triton interpreter is slow)."""
    kinds = KINDS if shape_set == "full" else KINDS[:2] + KINDS[3:]
    kinds = kinds[:n_kinds] if n_kinds else kinds
    out = []
    for N, d in SHAPES[shape_set]:
        for M in Ms:
            for sampling in ("n_squared", "n"):
                if sampling == "n_squared" and N ** M > ORACLE_MAX_ELEMENTS:
                    continue
                if shape_set != "full" and M == 4 and N > 7:
                    continue
                out += [dict(M=M, N=N, d=d, sampling=sampling, inputs=k, tau=t) for k, t in kinds]
    return out


def make_inputs(kind: str, M: int, N: int, d: int, generator: torch.Generator) -> list[torch.Tensor]:
    """M float64 CPU tensors (N, d) of one of docs/math.md section 6.1's kinds (never zeros)."""
    reps = [torch.randn(N, d, dtype=torch.float64, generator=generator) for _ in range(M)]
    if kind == "unit":
        return [torch.nn.functional.normalize(r, dim=1) for r in reps]
    if kind == "gaussian":
        return reps
    if kind == "faint":  # rows near one direction, one row 30x shorter: a tile spreads over many nats
        direction = torch.randn(d, dtype=torch.float64, generator=generator)
        reps = [torch.nn.functional.normalize(direction + 0.3 * r, dim=1) for r in reps]
        for r in reps:
            r[N // 2] /= 30.0
        return reps
    raise ValueError(f"unknown input kind {kind!r}")


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64; inf when ``out`` is not finite."""
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    scale = max(float(ref.norm()), floor)
    return float((out - ref).norm()) / scale if scale > 0 else float(out.norm())


def check_case(backend: str, mode: str, case: dict, device: torch.device, seed: int) -> dict:
    """One case against the float64 oracle on ``device``; returns errors, tolerances and "ok"."""
    from symile_kernels import symile_loss
    from symile_kernels.reference import mip, symile_loss_reference

    dtype = getattr(torch, MODES[mode][0])
    generator = torch.Generator().manual_seed(seed)
    reps64 = make_inputs(case["inputs"], case["M"], case["N"], case["d"], generator)
    inputs = [r.to(device=device, dtype=dtype).requires_grad_() for r in reps64]
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(case["tau"], dtype=tau_dtype, device=device, requires_grad=True)
    exact = [r.detach().to(torch.float64).requires_grad_() for r in inputs]  # the cast values, on the device
    tau_exact = tau.detach().double().requires_grad_()
    upstream = torch.rand((), dtype=torch.float64, generator=generator) + 0.5

    torch.manual_seed(seed)  # "n" draws its permutations from the default CPU generator
    value = symile_loss(inputs, tau, negative_sampling=case["sampling"], backend=backend)
    grads = torch.autograd.grad(value, inputs + [tau], upstream.to(device=device, dtype=value.dtype))
    torch.manual_seed(seed)
    expected = symile_loss_reference(exact, tau_exact, case["sampling"])
    expected_grads = torch.autograd.grad(expected, exact + [tau_exact], upstream.to(device))
    # Where the LSE and positive parts of a gradient cancel, its norm says nothing of the
    # rounding: the denominator is at least 5% of the positive part's gradient (docs/math.md 6.1).
    positive = upstream.to(device) * tau_exact * mip(exact).mean()
    floors = [0.05 * float(g.norm()) for g in torch.autograd.grad(positive, exact + [tau_exact])]

    loss_tol, grad_tol = TOLERANCES[mode]
    errors = {"loss": relative_error(value, expected)}
    for m, (g, e) in enumerate(zip(grads, expected_grads)):
        errors["dtau" if m == len(inputs) else f"d{m}"] = relative_error(g, e, floors[m])
    grad_err = max(v for k, v in errors.items() if k != "loss")
    ok = errors["loss"] <= loss_tol and grad_err <= grad_tol and value.dtype == dtype
    return dict(loss_err=errors["loss"], grad_err=grad_err, worst_grad=max(
        (k for k in errors if k != "loss"), key=errors.get), loss_tol=loss_tol, grad_tol=grad_tol,
        dtype_ok=value.dtype == dtype, ok=bool(ok))


# ---------------------------------------------------------------- Triton configurations

_PRIVATE_TABLES = {"cube_fwd": ("cube", "_FWD"), "cube_bwd_u": ("cube", "_BWD_U"), "cube_bwd_dz": ("cube", "_BWD_DZ"),
                   "pair_fwd": ("pair", "_FWD"), "pair_bwd_rows": ("pair", "_BWD_ROWS"),
                   "pair_bwd_cols": ("pair", "_BWD_COLS")}


def config_tables(device: torch.device) -> tuple[str, dict]:
    """(how, {kernel name: number of configurations}) of the Triton backend on ``device``.

    how: "public" (``kernel_configs``/``pinned_config``), "autotuner lists", or
    "unavailable: why".
    """
    try:
        import symile_kernels.triton as package
    except Exception as exc:  # noqa: BLE001  (no Triton: nothing to pin)
        return f"unavailable: {type(exc).__name__}: {exc}", {}
    if hasattr(package, "kernel_configs") and hasattr(package, "pinned_config"):
        return "public", {name: len(configs) for name, configs in package.kernel_configs().items()}
    tables = _autotuners(package, device)
    if tables is None:
        return "unavailable: every-config check unavailable in this revision (no kernel_configs())", {}
    return "autotuner lists", {name: len(tuner.configs) for name, tuner in tables.items()}


def _autotuners(package, device: torch.device) -> Optional[dict]:
    """The compiled kernels' autotuners for ``device`` (Hopper or not), or None if the layout differs."""
    try:
        from symile_kernels.triton import _launch

        hopper = _launch.is_hopper(device)
        return {name: getattr(getattr(package, module), attr)[hopper]
                for name, (module, attr) in _PRIVATE_TABLES.items()}
    except (AttributeError, KeyError, ImportError, TypeError):
        return None


@contextlib.contextmanager
def pinned(index: Optional[int], device: torch.device) -> Iterator[dict]:
    """Runs every Triton kernel with configuration ``index`` of its list (clamped); yields
    {kernel: index used}. With autotuning off (the job's environment) the kernels
    launch their list's first entry, so the autotuner lists are rotated."""
    if index is None:
        yield {}
        return
    import symile_kernels.triton as package

    if hasattr(package, "kernel_configs") and hasattr(package, "pinned_config"):
        with contextlib.ExitStack() as stack:
            used = {}
            for name, configs in package.kernel_configs().items():
                used[name] = min(index, len(configs) - 1)
                stack.enter_context(package.pinned_config(name, used[name]))
            yield used
        return
    tables = _autotuners(package, device)
    if tables is None:
        raise RuntimeError("no way to pin a Triton configuration in this revision")
    saved = {name: tuner.configs for name, tuner in tables.items()}
    used = {}
    try:
        for name, tuner in tables.items():
            used[name] = min(index, len(tuner.configs) - 1)
            tuner.configs = [tuner.configs[used[name]]] + [c for j, c in enumerate(tuner.configs) if j != used[name]]
        yield used
    finally:
        for name, tuner in tables.items():
            tuner.configs = saved[name]


def run_job(job: dict) -> Iterator[dict]:
    """Yields one row per case of ``job`` (see the module docstring), then a summary row."""
    dtype_name, tf32, _ = MODES[job["mode"]]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    device = torch.device(job["device"])
    base = dict(kind="check", backend=job["backend"], mode=job["mode"], config=job.get("config"))
    passed = total = 0
    with pinned(job.get("config"), device) as used:
        for number, case in enumerate(cases(job["shapes"], job.get("Ms", (2, 3, 4)),
                                                        job.get("n_kinds"))):
            begin = time.perf_counter()
            try:
                result = check_case(job["backend"], job["mode"], case, device, seed=1000 + number)
            except Exception as exc:  # noqa: BLE001  (recorded as a failed case; a dead CUDA context fails the rest)
                result = dict(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            total += 1
            passed += bool(result["ok"])
            yield dict(base, **case, **result, seconds=round(time.perf_counter() - begin, 3))
    yield dict(base, kind="check_job", passed=passed, total=total, configs_used=used, dtype=dtype_name)


# ---------------------------------------------------------------- pytest and compute-sanitizer

def test_backend(nodeid: str) -> str:
    """The backend a failing test id belongs to (by file name)."""
    for name in ("triton", "cuda", "cpu", "chunked"):
        if f"test_{name}" in nodeid:
            return name
    return "other"


def pytest_command(root: str, smoke: bool) -> list[str]:
    """``pytest -m gpu tests`` when the ``gpu`` marker is registered, else the GPU test files."""
    base = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    with open(os.path.join(root, "pyproject.toml")) as f:
        has_marker = re.search(r'^\s*"gpu\s*:', f.read(), re.M) is not None
    files = [p for p in ("tests/test_triton_backend.py", "tests/test_cuda_gpu.py")
             if os.path.exists(os.path.join(root, p))]
    command = base + (["-m", "gpu", "tests"] if has_marker else files)
    if smoke:  # the plumbing only: collect, run nothing
        command = base + ["--collect-only", "tests/test_gpu_suite.py"]
    return command


def parse_pytest(output: str, returncode) -> dict:
    """Summary line and failing test ids per backend from pytest's ``-rfE`` output."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    failed: dict[str, list[str]] = {}
    for line in lines:
        match = re.match(r"(FAILED|ERROR) (\S+)", line)
        if match:
            failed.setdefault(test_backend(match.group(2)), []).append(match.group(2))
    return dict(summary=lines[-1] if lines else "no output", returncode=returncode, failed=failed,
                ok=returncode in (0, 5) and not failed)  # 5: nothing collected


def find_sanitizer() -> Optional[str]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [shutil.which("compute-sanitizer")] + [
        os.path.join(h, sub, "compute-sanitizer") for h in homes if h for sub in ("bin", "compute-sanitizer")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# What the sanitizers run: the cuda backend's cube and pair kernels, forward and backward, small.
SANITIZER_SCRIPT = """
import torch, symile_kernels
for M, sampling, dtype in ((3, "n_squared", torch.float32), (3, "n_squared", torch.bfloat16), (2, "n", torch.float32)):
    reps = [torch.nn.functional.normalize(torch.randn(37, 40, device="cuda"), dim=1).to(dtype).requires_grad_()
            for _ in range(M)]
    tau = torch.tensor(14.3, device="cuda", requires_grad=True)
    symile_kernels.symile_loss(reps, tau, negative_sampling=sampling, backend="cuda").backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


def parse_sanitizer(output: str, returncode) -> dict:
    match = re.search(r"ERROR SUMMARY: (\d+) errors?", output)
    errors = int(match.group(1)) if match else None
    done = "sanitizer script done" in output
    return dict(summary=match.group(0) if match else "no ERROR SUMMARY line", errors=errors,
                script_completed=done, ok=errors == 0 and done and returncode == 0)
