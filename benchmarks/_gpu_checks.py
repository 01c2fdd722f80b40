"""The GPU suite's correctness stage: the oracle sweep, the pytest step, compute-sanitizer.

One *job* (a dict) runs in its own subprocess (``gpu_suite.py --check-worker JOB``)
and prints one JSON row per case: a crash (an illegal address kills the CUDA
context) loses one job, not the suite, and jobs compile their Triton kernels in
parallel. A job is one backend x compute mode x Triton configuration index x
shape set:

* compute modes (``MODES``): "fp32" (float32, IEEE products), "tf32" (float32 with
  ``torch.backends.cuda.matmul.allow_tf32``), "bf16", "fp16", and for the cuda
  backend "fp32-as-bf16" (float32 rows with SYMILE_KERNELS_CUDA_MATH=bf16);
* shape sets (``SHAPES``): "headline" (d = 256, the lists N = 4096 launches take: M = 3
  "n_squared" and "n", M = 2), "lists" (one feature size per configuration list variant,
  ``_launch.VARIANT_D``), "full" (ragged (N, d) x M in {2, 3, 4} x both samplings), and the
  CPU rehearsal's "smoke" and "interpreter";
* each case: ``symile_kernels.testing.compare_with_oracle``, the test suite's comparison:
  ``symile_loss(..., backend=b)`` forward and backward (a random upstream gradient) against
  the float64 oracle on the same device and the same (cast) values, the loss and every
  gradient (dtau too) at docs/math.md section 6.1's tolerances.

Triton configurations: a job with ``config`` = i pins configuration i (clamped to each
list's length) of every list of the GPU's architecture (``_launch.pinned_config``, keyed by
list), so a case at feature size d runs exactly configuration i of the list a launch at d
takes (``_launch.launch_list``). The job's summary names the lists whose pin launches used
(``configs_used``): what was checked, not what was asked for.
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

# mode -> (input dtype, allow TF32, extra environment of the job's process, TOLERANCES key)
MODES = {"fp32": ("float32", False, {}, torch.float32), "tf32": ("float32", True, {}, "tf32"),
         "bf16": ("bfloat16", False, {}, torch.bfloat16), "fp16": ("float16", False, {}, torch.float16),
         "fp32-as-bf16": ("float32", False, {"SYMILE_KERNELS_CUDA_MATH": "bf16"}, torch.bfloat16),
         "fp64": ("float64", False, {}, torch.float64)}
# (kind, tau) of symile_kernels.testing.make_inputs: unit rows at two temperatures, Gaussian rows,
# faint rows whose tiles spread over many nats (the kernels' fallback paths).
KINDS = (("unit", 14.3), ("unit", 100.0), ("gaussian", 1.0), ("faint", 14.3))
HEADLINE_D = 256
# The oracle materialises N^M float64 logits (a few copies): M = 3 up to N = 129, M = 4 up to N = 33.
ORACLE_MAX_ELEMENTS = 2 ** 24


def _lists_shapes() -> tuple:
    from symile_kernels.triton import _launch

    return tuple((33, d) for d in _launch.VARIANT_D.values())


# shape set -> (M, N, d, samplings) of its cases; "lists" is read from the Triton package.
SHAPES = {
    "headline": ((3, 33, HEADLINE_D, ("n_squared", "n")), (3, 129, HEADLINE_D, ("n_squared", "n")),
                 (3, 1031, HEADLINE_D, ("n",)), (2, 257, HEADLINE_D, ("n_squared",))),
    "full": tuple((M, N, d, ("n_squared", "n")) for N, d in ((7, 3), (33, 48), (129, 200), (65, 256), (33, 496))
                  for M in (2, 3, 4)),
    "smoke": tuple((M, N, d, ("n_squared", "n")) for N, d in ((5, 3), (7, 10)) for M in (2, 3, 4)),
    "interpreter": tuple((M, 5, 3, ("n_squared", "n")) for M in (2, 3)),
}


def cases(shape_set: str, Ms=(2, 3, 4), n_kinds: Optional[int] = None) -> list[dict]:
    """The sweep's cases, cheapest first: every (M, N, d, sampling) of the shape set whose oracle
    fits (``ORACLE_MAX_ELEMENTS``; M = 4 at N <= 33) x input kinds. "full" takes every kind, the
    others the unit and faint ones; ``Ms`` and ``n_kinds`` (the first kinds only) shrink it further
    (the Triton interpreter is slow)."""
    if shape_set == "lists":
        shapes = tuple((M, N, d, ("n_squared", "n")) for N, d in _lists_shapes() for M in (2, 3))
    else:
        shapes = SHAPES[shape_set]
    kinds = KINDS if shape_set == "full" else KINDS[:2] + KINDS[3:]
    kinds = kinds[:n_kinds] if n_kinds else kinds
    out = []
    for M, N, d, samplings in shapes:
        if M not in Ms or (M == 4 and N > 33):
            continue
        for sampling in samplings:
            if sampling == "n_squared" and N ** M > ORACLE_MAX_ELEMENTS:
                continue
            out += [dict(M=M, N=N, d=d, sampling=sampling, inputs=k, tau=t) for k, t in kinds]
    return sorted(out, key=lambda c: c["N"] ** (c["M"] if c["sampling"] == "n_squared" else 2) * c["d"])


def check_case(backend: str, mode: str, case: dict, device: torch.device, seed: int) -> dict:
    """One case against the float64 oracle on ``device``; returns errors, tolerances and "ok"."""
    from symile_kernels.testing import compare_with_oracle, make_inputs

    dtype_name, _, _, tolerance = MODES[mode]
    generator = torch.Generator().manual_seed(seed)
    reps64 = make_inputs(case["inputs"], case["M"], case["N"], case["d"], generator)
    result = compare_with_oracle(backend, reps64, case["tau"], dtype=getattr(torch, dtype_name),
                                 negative_sampling=case["sampling"], tolerance=tolerance, device=device,
                                 seed=seed, generator=generator)
    grads = {k: v for k, v in result.errors.items() if k != "loss"}
    worst = max(grads, key=grads.get)
    return dict(loss_err=result.errors["loss"], grad_err=grads[worst], worst_grad=worst,
                loss_tol=result.loss_tol, grad_tol=result.grad_tol, dtype_ok=result.dtypes_ok, ok=result.ok)


# ---------------------------------------------------------------- Triton configurations

def config_lists(arch: str) -> tuple[str, dict]:
    """(how, {list name: number of configurations}) of the Triton backend's ``arch`` lists
    ("sm90" or "sm80"); how is "public" or "unavailable: why"."""
    try:
        from symile_kernels.triton import kernel_configs
    except Exception as exc:  # noqa: BLE001  (no Triton: nothing to pin)
        return f"unavailable: {type(exc).__name__}: {exc}", {}
    return "public", {name: len(c) for name, c in kernel_configs().items() if name.split("/")[1] == arch}


def headline_lists(arch: str) -> list[str]:
    """The lists a launch of each Triton kernel at d = HEADLINE_D takes on ``arch``."""
    from symile_kernels.triton import _launch, kernel_configs

    return sorted({_launch.list_name(name.split("/")[0], arch, HEADLINE_D) for name in kernel_configs()
                   if name.split("/")[1] == arch})


@contextlib.contextmanager
def pinned(index: Optional[int], arch: str) -> Iterator[list]:
    """Within the block, every list of ``arch`` is pinned to configuration ``index`` (clamped to its
    length); yields the ``Pin`` objects (their ``launches`` count what used them). None: no pins."""
    if index is None:
        yield []
        return
    from symile_kernels.triton import kernel_configs, pinned_config

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(pinned_config(name, min(index, len(configs) - 1)))
               for name, configs in kernel_configs().items() if name.split("/")[1] == arch]


def device_arch(device: torch.device) -> str:
    """The configuration lists' architecture of a CUDA ``device``; "interpreter" for the CPU."""
    if device.type != "cuda":
        return "interpreter"
    from symile_kernels.triton import _launch

    return _launch.arch_of(device)


def _interpreting(arch: Optional[str]) -> contextlib.AbstractContextManager:
    """``interpret_as(arch)`` (the CPU rehearsal runs a GPU's lists in the interpreter), or nothing."""
    if arch is None:
        return contextlib.nullcontext()
    from symile_kernels.triton import interpret_as

    return interpret_as(arch)


def run_job(job: dict) -> Iterator[dict]:
    """Yields one row per case of ``job`` (see the module docstring), then a summary row."""
    dtype_name, tf32, _, _ = MODES[job["mode"]]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    device = torch.device(job["device"])
    base = dict(kind="check", backend=job["backend"], mode=job["mode"], config=job.get("config"))
    passed = total = 0
    arch = job.get("interpret_as") or device_arch(device)
    with _interpreting(job.get("interpret_as")), pinned(job.get("config"), arch) as pins:
        for number, case in enumerate(cases(job["shapes"], job.get("Ms", (2, 3, 4)), job.get("n_kinds"))):
            begin = time.perf_counter()
            try:
                result = check_case(job["backend"], job["mode"], case, device, seed=1000 + number)
            except Exception as exc:  # noqa: BLE001  (recorded as a failed case; a dead CUDA context fails the rest)
                result = dict(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            total += 1
            passed += bool(result["ok"])
            yield dict(base, **case, **result, seconds=round(time.perf_counter() - begin, 3))
        used = {pin.name: pin.index for pin in pins if pin.launches}
    yield dict(base, kind="check_job", passed=passed, total=total, configs_used=used, dtype=dtype_name)


# ---------------------------------------------------------------- pytest and compute-sanitizer

def test_backend(nodeid: str) -> str:
    """The backend a failing test id belongs to (by file name)."""
    for name in ("triton", "cuda", "cpu", "chunked"):
        if f"test_{name}" in nodeid:
            return name
    return "other"


def pytest_command(root: str, smoke: bool) -> list[str]:
    """``pytest -m gpu tests`` (the conformance suite's CUDA targets and the GPU-only tests) when the
    ``gpu`` marker is registered, else the GPU test files; with ``smoke``, the conformance battery
    on the chunked backend's CPU target."""
    base = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    with open(os.path.join(root, "pyproject.toml")) as f:
        has_marker = re.search(r'^\s*"gpu\s*:', f.read(), re.M) is not None
    files = [p for p in ("tests/test_triton_backend.py", "tests/test_cuda_gpu.py")
             if os.path.exists(os.path.join(root, p))]
    command = base + (["-m", "gpu", "tests"] if has_marker else files)
    if smoke:  # the same battery on a CPU target (its oracle checks ran as the smoke's jobs)
        command = base + ["tests/test_conformance.py", "-k", "chunked-cpu and not correctness and not compile"]
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
