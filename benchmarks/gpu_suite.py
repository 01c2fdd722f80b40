"""The GPU suite: every backend's GPU tests, then the benchmark table, in one command.

    python benchmarks/gpu_suite.py OUT_DIR            # on a CUDA machine, about 6-8 minutes
    python benchmarks/gpu_suite.py OUT_DIR --cpu-smoke  # the plumbing on the CPU, tiny sizes

Needs only PyTorch, Triton, pytest (and nvcc + ninja for backends that build on
first use); no network. Steps:

1. Tests: pytest on the GPU backends' test files (``tests/test_triton_backend.py``,
   ``tests/test_cuda_backend.py`` and ``tests/test_gpu*.py`` where present), all
   failures collected (no ``-x``), output in ``OUT_DIR/tests.log``.
2. Dense matrix-product rate (``torch.mm`` 4096 x 4096) per dtype.
3. Benchmarks (M = 3, "n_squared", d = 256, unit rows, tau = 14.3), each in a
   fresh subprocess (peaks apart), CUDA events, median:
   * loss level, through ``symile_kernels.symile_loss`` / ``symile.Symile``
     (``benchmarks/bench_loss.py``'s worker): backends {``symile`` (reference
     package) if importable, ``reference``, ``chunked``, every fused backend
     ``available_backends("cuda")`` lists} x N in {256, 1024, 4096, 8192} x
     {float32, bfloat16}. The loss layer computes bf16 inputs in float32 today.
   * kernel level, the fused backends' ``cube_lse_forward`` + ``cube_lse_backward``
     called directly with tensors of the benchmark dtype (bf16 kernels see bf16):
     N in {4096, 8192, 16384} bf16 and N = 4096 float32.
   Peak memory is ``torch.cuda.max_memory_allocated`` above the inputs. Model
   FLOPs follow SPEC section 5 (6 N^3 d forward+backward) and are reported as a
   fraction of the same dtype's dense rate. Configurations that cannot fit
   (materialised logits) are skipped; slow ones (materialising backends beyond
   N = 1024, float32 IEEE fused runs beyond N = 4096) are dropped; a time
   budget (``--budget-s``) drops whatever is left, most important rows first.
4. ``OUT_DIR/results.json`` (machine, GPU, date, command, rows) and
   ``OUT_DIR/results.md``; the markdown is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_loss import markdown_table, run_in_subprocess, skip_reason  # noqa: E402  (the script's own rows)

from symile_kernels.benchmarking import DTYPES, machine_info, memory_limit_bytes, mm_tflops, time_ms  # noqa: E402

D = 256
TAU = 14.3
LOSS_N = (256, 1024, 4096, 8192)
KERNEL_BF16_N = (4096, 8192, 16384)
KERNEL_FP32_N = (4096,)
MATERIALISING = ("symile", "reference", "chunked")
MATERIALISING_MAX_N = 1024  # beyond it: minutes per configuration (or no fit)
FUSED_FP32_MAX_N = 4096  # float32 IEEE products run on CUDA cores: N = 8192 takes ~30 s a pass


def gpu_test_files() -> list[str]:
    names = ["tests/test_triton_backend.py", "tests/test_cuda_backend.py"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_gpu*.py")))
    return [n for n in dict.fromkeys(names) if os.path.exists(os.path.join(ROOT, n))]


def run_tests(out_dir: str, smoke: bool, timeout: float) -> dict:
    """pytest on the GPU test files; the whole output goes to OUT_DIR/tests.log."""
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"] + files
    if smoke:
        command = command[:-len(files)] + files[:1] + ["--collect-only"]
    # Untuned Triton kernels in the tests: half the compilations, no tuning runs.
    env = dict(os.environ, SYMILE_KERNELS_TRITON_AUTOTUNE="0")
    begin = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\n[gpu_suite] pytest stopped after {timeout:.0f} s\n"
        code = "timeout"
    with open(os.path.join(out_dir, "tests.log"), "w") as f:
        f.write(" ".join(command) + "\n\n" + output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else "no output"
    return dict(command=" ".join(command), files=files, returncode=code, summary=summary,
                seconds=round(time.time() - begin, 1))


def fused_backends(device: torch.device) -> list[str]:
    """Every registered backend that runs on ``device`` except the pure-PyTorch and oracle ones."""
    from symile_kernels import available_backends

    return [name for name in available_backends(device) if name not in ("chunked", "reference")]


def repeats_for(N: int) -> tuple[int, int]:
    """(warm-up, timed repeats): fewer of both where one call takes seconds."""
    if N <= 1024:
        return 1, 5
    if N <= 4096:
        return 0, 2
    return 0, 1


def plan(device: torch.device, smoke: bool) -> list[dict]:
    """The configurations, most important first (the budget drops from the end)."""
    if smoke:  # one row per code path: kernel worker, bench_loss worker in both dtypes
        return [dict(level="kernel", backend="chunked", M=3, N=8, d=8, dtype="bfloat16", sampling="n_squared",
                     device=device.type, tau=TAU, warmup=1, repeats=2),
                dict(level="loss", backend="chunked", M=3, N=8, d=8, dtype="float32", sampling="n_squared",
                     device=device.type, tau=TAU, warmup=1, repeats=2),
                dict(level="loss", backend="reference", M=3, N=8, d=8, dtype="bfloat16", sampling="n_squared",
                     device=device.type, tau=TAU, warmup=1, repeats=2)]
    fused = fused_backends(device)
    loss_backends = ["symile", "reference", "chunked"] + fused
    loss_n, kernel_bf16, kernel_fp32, d = LOSS_N, KERNEL_BF16_N, KERNEL_FP32_N, D

    def loss_row(backend, N, dtype):
        warmup, repeats = repeats_for(N)
        return dict(level="loss", backend=backend, M=3, N=N, d=d, dtype=dtype, sampling="n_squared",
                    device=device.type, tau=TAU, warmup=warmup, repeats=repeats)

    def kernel_row(backend, N, dtype):
        return dict(loss_row(backend, N, dtype), level="kernel")

    first = []  # the targets
    for backend in fused:
        first += [kernel_row(backend, 4096, "bfloat16")]
    for backend in ["symile"] + fused:
        first += [loss_row(backend, 1024, "float32")]
    for backend in fused:
        first += [kernel_row(backend, kernel_bf16[-1], "bfloat16")]
    rest = [loss_row(b, N, dtype) for dtype in ("float32", "bfloat16") for N in loss_n for b in loss_backends]
    rest += [kernel_row(b, N, "bfloat16") for N in kernel_bf16 for b in fused]
    rest += [kernel_row(b, N, "float32") for N in kernel_fp32 for b in fused]
    ordered, seen = [], set()
    for config in first + rest:
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            ordered.append(config)
    return ordered


def dropped_reason(config: dict, smoke: bool) -> "str | None":
    if smoke:
        return None
    if config["backend"] in MATERIALISING and config["N"] > MATERIALISING_MAX_N:
        return f"dropped: {config['backend']} beyond N = {MATERIALISING_MAX_N} takes minutes or does not fit"
    if config["backend"] not in MATERIALISING and config["N"] > FUSED_FP32_MAX_N and (
            config["dtype"] == "float32" or config["level"] == "loss"):
        return f"dropped: float32 products beyond N = {FUSED_FP32_MAX_N} take minutes"
    return None


# ---------------------------------------------------------------- kernel-level worker

def measure_kernel(config: dict) -> dict:
    """One fused backend's cube_lse_forward/backward on (N, d) tensors of the config's dtype."""
    from symile_kernels import backends

    device = torch.device(config["device"])
    dtype = DTYPES[config["dtype"]]
    reason = backends.unavailable_reason(config["backend"], device)
    if reason is not None:
        return dict(config, status=f"unavailable: {reason}")
    backend = backends.get(config["backend"])
    N, d = config["N"], config["d"]
    torch.manual_seed(0)
    x, y, z = (torch.nn.functional.normalize(torch.randn(N, d, device=device), dim=1).to(dtype).contiguous()
               for _ in range(3))
    tau = torch.tensor(config["tau"], device=device)  # float32: LSEs and G stay float32
    g = [torch.full((N,), 1.0 / (3 * N), device=device) for _ in range(3)]

    def forward(rows=N):
        return backend.cube_lse_forward(x[:rows], y[:rows], z[:rows], tau)

    def forward_backward(rows=N):
        La, Lb, Lc = forward(rows)
        backend.cube_lse_backward(x[:rows], y[:rows], z[:rows], tau, La, Lb, Lc, *(t[:rows] for t in g))

    forward_backward(min(N, 2048))  # compiles, and autotunes where the backend does, on a cheap prefix
    for _ in range(config["warmup"]):
        forward_backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    # The first timed run also gives the peak (one run is all N = 16384 can afford).
    def timer(fn):
        return time_ms(fn, device)  # CUDA events on a GPU

    fwd_bwd = [timer(forward_backward)]
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else 0
    fwd_bwd += [timer(forward_backward) for _ in range(config["repeats"] - 1)]
    fwd = [timer(forward) for _ in range(max(1, config["repeats"]))]
    row = dict(config, status="ok", peak_mb=peak / 2 ** 20, fwd_ms=statistics.median(fwd),
               fwd_bwd_ms=statistics.median(fwd_bwd), fwd_bwd_min_ms=min(fwd_bwd), fwd_bwd_max_ms=max(fwd_bwd))
    row["model_tflops"] = 6 * N ** 3 * d / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


def run_kernel_in_subprocess(config: dict, timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--kernel-worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(config, status=f"timeout after {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(config, status=f"failed: {tail[:200]}")


# ---------------------------------------------------------------- report

def render(info: dict, tests: dict, mm: dict, rows: list[dict]) -> str:
    out = [f"# Symile GPU suite: {info.get('gpu', info.get('processor', '?'))}", "",
           f"- date: {info['date']}; torch {info['torch']}; triton {info.get('triton', '-')}; "
           f"git {info.get('git_revision')}",
           f"- command: `{info['command']}`",
           f"- tests: {tests.get('summary', 'not run')} (exit {tests.get('returncode', '-')}, "
           f"{tests.get('seconds', 0)} s; full log: tests.log)",
           "- M = 3, n_squared, unit rows, tau = 14.3; times are CUDA-event medians; peak = "
           "torch.cuda.max_memory_allocated above the inputs; model FLOPs = 6 N^3 d (SPEC section 5)."]
    for level, title in (("kernel", "Kernel level: fused backends' cube_lse_forward + cube_lse_backward "
                                    "on tensors of the listed dtype"),
                         ("loss", "Loss level: symile_kernels.symile_loss / symile.Symile (bf16 inputs "
                                  "compute in float32 in the loss layer today)")):
        for dtype in ("bfloat16", "float32"):
            selected = [r for r in rows if r["level"] == level and r["dtype"] == dtype]
            if selected:
                out += ["", f"## {title}: {dtype}", "", markdown_table(selected, mm.get(dtype))]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="folder for tests.log, results.json and results.md")
    parser.add_argument("--cpu-smoke", "--dry-run", dest="smoke", action="store_true",
                        help="exercise the plumbing on the CPU at tiny sizes (seconds)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="seconds for all benchmark rows")
    parser.add_argument("--config-timeout-s", type=float, default=120.0, help="seconds per configuration")
    parser.add_argument("--tests-timeout-s", type=float, default=210.0, help="seconds for the pytest step")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--kernel-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kernel_worker:
        print(json.dumps(measure_kernel(json.loads(args.kernel_worker))))
        return 0
    if not args.out_dir:
        parser.error("the output folder is required")
    begin = time.time()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --cpu-smoke to check the plumbing")
    os.makedirs(args.out_dir, exist_ok=True)

    info = machine_info(device)
    info["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    info["suite_started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))

    tests = {} if args.skip_tests else run_tests(args.out_dir, args.smoke, args.tests_timeout_s)
    if tests:
        print(f"[gpu_suite] tests: {tests['summary']} ({tests['seconds']} s)", file=sys.stderr, flush=True)

    mm = {dtype: mm_tflops(device, DTYPES[dtype] if device.type == "cuda" else torch.float32,
                           size=4096 if not args.smoke else 256)
          for dtype in ("float32", "bfloat16")}
    limit = memory_limit_bytes(device)
    bench_begin = time.time()
    rows = []
    for config in plan(device, args.smoke):
        left = args.budget_s - (time.time() - bench_begin)
        reason = skip_reason(config, limit) or dropped_reason(config, args.smoke)
        if reason is None and left < 20:
            reason = f"dropped: suite time budget ({args.budget_s:.0f} s) spent"
        if reason is not None:
            row = dict(config, status=reason)
        else:
            # N = 16384 needs one long run (about a minute of fused fwd+bwd on an H100).
            timeout = min(args.config_timeout_s * (2 if config["N"] >= 16384 else 1), left)
            runner = run_kernel_in_subprocess if config["level"] == "kernel" else run_in_subprocess
            row = runner(config, timeout)
        rows.append(row)
        print(f"[gpu_suite] {row['level']} {row['backend']} N={row['N']} {row['dtype']}: {row['status']}"
              + (f", fwd+bwd {row['fwd_bwd_ms']:.1f} ms, peak {row['peak_mb']:.0f} MiB"
                 if row["status"] == "ok" else ""), file=sys.stderr, flush=True)

    info["suite_seconds"] = round(time.time() - begin, 1)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(dict(info=info, tests=tests, mm_tflops=mm, rows=rows), f, indent=1)
    table = render(info, tests, mm, rows)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    failed_tests = tests and tests["returncode"] not in (0, 5)  # 5: nothing collected
    return 1 if failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
