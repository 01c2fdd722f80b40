"""The GPU suite: correctness first, then speed, inside one device lease.

    python benchmarks/gpu_suite.py OUT_DIR --budget-s 480   # a CUDA machine, about 8 minutes
    python benchmarks/gpu_suite.py OUT_DIR --cpu-smoke      # the same plumbing on the CPU, about a minute
    python benchmarks/gpu_suite.py --plan [--arch sm80]     # the jobs and rows it would run; runs nothing
    python benchmarks/gpu_suite.py --render OUT_DIR         # results.md again from results.jsonl

Two phases under one time budget (``--budget-s``), the most valuable evidence first:

1. Within about the first four minutes (``--first-s`` for the checks): the cuda backend's
   build, or the extension carried in (timed, ``build.log``); the triton and cuda
   backends against the float64 oracle at the headline configurations (bf16 and TF32,
   M = 3 "n_squared" and "n", M = 2, d = 256: every configuration of the Triton lists
   that d = 256 launches take, pinned in turn); the bf16 matrix-product rate; the
   headline row of every fused backend (bf16, N = 4096, d = 256, forward+backward,
   model TFLOP/s and share of that rate).
2. Then (``--check-budget-s`` for the checks): the broad sweep (every compute mode, every
   configuration of every list of the GPU's architecture, ragged shapes, M in {2, 3, 4});
   ``pytest -m gpu`` (``tests.log``); the cuda backend under ``compute-sanitizer`` memcheck
   and racecheck (``sanitizer.log``; a tool that cannot attach is recorded as not run);
   the peers (the reference package ``symile`` 0.1.0, a plain-PyTorch einsum cube and its
   ``torch.compile`` version, materialised cross-entropy for "n" and CLIP: ``peers.py``),
   the other float32 modes and the scale rows, each skipped when its estimate does not fit
   what is left of the budget.

Correctness jobs run in parallel subprocesses (``_gpu_checks.py``); the rows run one at a time
in a long-lived worker subprocess (``_gpu_rows.py``, restarted after a crash). A failure marks
the backend failing; the suite goes on and says so at the top of the report. Output in
OUT_DIR: ``results.jsonl`` (one JSON row appended as each piece completes, so a crash keeps
what came before), ``results.md`` (verdict first, tables, machine block last; also printed),
``build.log``, ``tests.log``, ``sanitizer.log``, ``rows.log``.

Exit status: 0 when every correctness check ran and passed; 1 when one failed;
3 when none failed but some did not run (a budget spent, a timeout, a Triton configuration
no check launched; a sanitizer that cannot run here is reported, not counted); 2 without a
CUDA device (and no ``--cpu-smoke``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # this checkout's symile_kernels, installed or not

import _gpu_checks as checks  # noqa: E402
import _gpu_report as report  # noqa: E402

D = 256
TAU = 14.3
STARTUP_S = {"cuda": 12.0, "cpu": 4.0}  # a fresh interpreter: imports, CUDA context, loading kernels
MIN_ROW_S = 5.0


class Recorder:
    """Appends each row to ``path`` (JSON lines) as it completes, flushed to disk."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        self.path, self.clock, self.begin = path, clock, clock()
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        open(path, "w").close()

    def append(self, row: dict) -> dict:
        with self._lock:
            row = dict(row, t_s=round(self.clock() - self.begin, 1))
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


class Budget:
    """Seconds left of the suite's budget on an injectable clock."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.begin = seconds, clock, clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.begin)


# ---------------------------------------------------------------- plans

def bench_plan(smoke: bool, fused: list[str]) -> list[dict]:
    """Benchmark rows, in the order they run; ``phase`` 1 is the headline row of every fused backend
    (bf16, N = 4096, d = 256), phase 2 the peers, the sampled and CLIP rows, the other modes and
    the scale rows."""
    device = "cpu" if smoke else "cuda"

    def row(stage, backend, N, mode="bf16", sampling="n_squared", M=3, warmup=1, repeats=3, d=D, phase=2):
        return dict(kind="bench", stage=stage, phase=phase, backend=backend, M=M, N=N, d=d, sampling=sampling,
                    mode=mode, device=device, tau=TAU, warmup=warmup, repeats=repeats)

    if smoke:  # every stage and both guards at CPU sizes; the last row cannot fit any budget
        return ([row("headline", "chunked", 16, d=8, phase=1)]
                + [row("peers", b, 8, d=8) for b in ("symile", "torch-einsum", "chunked")]
                + [row("n", b, 16, sampling="n", d=8) for b in ("torch-ce", "chunked")]
                + [row("clip", "torch-ce", 16, M=2, d=8)]
                + [row("scale", "chunked", N, warmup=0, repeats=1, d=8) for N in (24, 4096)])
    rows = [row("headline", b, 4096, phase=1) for b in fused]
    # The peers where they fit (the reference package's cube runs out of memory near N = 1200 on 80 GB).
    rows += [row("peers", b, 1024) for b in ["symile", "torch-einsum", "torch-compile"] + fused]
    rows += [row("n", b, N, sampling="n") for N in (16384, 65536) for b in ["symile", "torch-ce"] + fused]
    rows += [row("clip", b, N, M=2) for N in (16384, 65536) for b in ["torch-ce"] + fused]
    # fp32 IEEE products take seconds a call at N = 4096: fewer repeats.
    rows += [row("fused", b, 4096, mode, warmup=0, repeats=2 if mode == "fp32" else 3)
             for mode in ("tf32", "fp32") for b in fused]
    rows += [row("scale", b, N, mode, warmup=0, repeats=1) for mode in ("bf16", "tf32") for N in (8192, 16384)
             for b in fused]
    return rows


def check_plan(smoke: bool, config_counts: dict, headline: list[str]) -> list[dict]:
    """Correctness jobs, most important first; ``phase`` 1 runs before the headline rows.

    config_counts: {list name: number of configurations} of the GPU's architecture; headline: the
    lists d = 256 launches take. ``needs_build``: waits for the compiled backend."""
    if smoke:
        return [dict(backend="chunked", mode="fp32", shapes="smoke", phase=1),
                dict(backend="chunked", mode="bf16", shapes="smoke", required=True, phase=1),
                # optional: a machine without the C++ build or Triton records them as unavailable
                dict(backend="cpu", mode="fp32", shapes="smoke", needs_build=True, optional=True, phase=1),
                # the GPU's pinning in the interpreter: sm90's lists, configuration 0 pinned
                dict(backend="triton", mode="fp32", shapes="interpreter", Ms=(2, 3), n_kinds=1, config=0,
                     interpret_as="sm90", env={"TRITON_INTERPRET": "1"}, optional=True, phase=2),
                dict(kind="pytest", needs_build=True, phase=2)]
    first = max((config_counts.get(name, 1) for name in headline), default=1)
    every = max(config_counts.values(), default=1)
    jobs = [dict(backend="triton", mode=m, config=i, shapes="headline", required=True, phase=1)
            for m in ("bf16", "tf32") for i in range(first)]
    jobs += [dict(backend="cuda", mode=m, shapes="headline", needs_build=True, required=True, phase=1)
             for m in ("bf16", "tf32")]
    jobs += [dict(backend="triton", mode=m, config=i, shapes="lists", required=True, phase=2)
             for i in range(every) for m in ("bf16", "tf32", "fp32", "fp16")]
    jobs += [dict(backend="cuda", mode=m, shapes="full", needs_build=True, required=True, phase=2)
             for m in ("bf16", "tf32", "fp32", "fp16", "fp32-as-bf16")]
    jobs += [dict(kind="pytest", needs_build=True, phase=2)]
    jobs += [dict(kind="sanitizer", tool=tool, needs_build=True, phase=2) for tool in ("memcheck", "racecheck")]
    jobs += [dict(backend="chunked", mode=m, shapes="full", phase=2) for m in ("fp32", "bf16")]
    return jobs


# ---------------------------------------------------------------- the time guard

def _calls(config: dict) -> float:
    """Forward+backward calls a row makes (a forward counts a third): the first (peak) call,
    the warm-ups and the timed forward+backward calls, then the timed forwards."""
    return 1 + config["warmup"] + config["repeats"] + (config["warmup"] + config["repeats"]) / 3


def estimate_s(config: dict, done: list[dict]) -> tuple[Optional[float], str]:
    """Seconds the row should take: a fresh process's overhead (the median seen so far, else
    STARTUP_S) plus its calls at the time of the closest smaller measured row of the same
    backend, mode, sampling and d, scaled by (N / N_ref)^3 for n_squared, ^2 for "n"; None
    without such a row."""
    measured = [r for r in done if r.get("kind") == "bench" and r["status"] == "ok"]
    same = [r for r in measured if r["N"] <= config["N"]
            and all(r[k] == config[k] for k in ("backend", "mode", "sampling", "d", "M", "device"))]
    if not same:
        return None, "no smaller measured row"
    ref = max(same, key=lambda r: r["N"])
    power = 2 if config["sampling"] == "n" or config["M"] == 2 else 3
    per_call = ref["fwd_bwd_ms"] * 1e-3 * (config["N"] / ref["N"]) ** power
    overheads = sorted(r["wall_s"] - _calls(r) * r["fwd_bwd_ms"] * 1e-3 for r in measured if "wall_s" in r)
    overhead = max(0.0, overheads[len(overheads) // 2]) if overheads else STARTUP_S[config["device"]]
    return overhead + _calls(config) * per_call, f"from the N = {ref['N']} row"


def run_rows(plan: list[dict], runner: Callable[[dict, float], dict], recorder: Recorder, budget: Budget,
             skip_reason: Callable[[dict], Optional[str]] = lambda c: None) -> None:
    """Runs ``plan`` in order; each row is recorded as it completes. A row that cannot fit
    what is left of the budget, or that ``skip_reason`` rules out, is recorded as skipped;
    a runner that raises is recorded as failed, and the rows after it still run."""
    for config in plan:
        left = budget.left()
        reason = skip_reason(config)
        estimate, basis = estimate_s(config, recorder.rows)
        if reason is None and left < MIN_ROW_S:
            reason = f"skipped: budget spent ({left:.0f} s left)"
        elif reason is None and estimate is not None and estimate > left:
            reason = f"skipped: estimated {estimate:.0f} s ({basis}) > {left:.0f} s left of the budget"
        if reason is not None:
            recorder.append(dict(config, status=reason))
            continue
        timeout = left if estimate is None else min(left, max(60.0, 4 * estimate))
        begin = budget.clock()
        try:
            row = runner(config, timeout)
        except Exception as exc:  # noqa: BLE001  (the suite goes on; the row says what broke)
            row = dict(config, status=f"failed: {type(exc).__name__}: {exc}")
        row = recorder.append(dict(row, estimate_s=None if estimate is None else round(estimate, 1),
                                   wall_s=round(budget.clock() - begin, 2)))
        print(f"[gpu_suite] {row['stage']} {row['backend']} {row['mode']} N={row['N']} {row['sampling']}: "
              f"{row['status']}" + (f", fwd+bwd {row['fwd_bwd_ms']:.1f} ms" if row["status"] == "ok" else ""),
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the correctness stage

def _subprocess(command: list, timeout: float, env: Optional[dict] = None) -> tuple:
    """(returncode or "timeout", stdout, stderr); the output so far survives a timeout."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=False)
    try:
        out, err = process.communicate(timeout=max(1.0, timeout))
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return "timeout", out, err


def _run_check_job(job: dict, timeout: float, env: dict, recorder: Recorder, out_dir: str, smoke: bool,
                   device: str) -> None:
    begin = time.monotonic()
    if job.get("kind") == "pytest":
        command = checks.pytest_command(ROOT, smoke)
        code, out, err = _subprocess(command, timeout, env)
        with open(os.path.join(out_dir, "tests.log"), "w") as f:
            f.write(" ".join(command) + "\n\n" + out + err + (f"\n[gpu_suite] stopped after {timeout:.0f} s\n"
                                                              if code == "timeout" else ""))
        parsed = checks.parse_pytest(out + err, code)
        recorder.append(dict(kind="pytest", command=" ".join(command[1:]), seconds=time.monotonic() - begin,
                             status="ok" if parsed["ok"] else (f"timeout after {timeout:.0f} s" if code == "timeout"
                                                               else f"exit {code}"), **parsed))
        return
    if job.get("kind") == "sanitizer":
        tool = checks.find_sanitizer()
        row = dict(kind="sanitizer", tool=job["tool"], backend="cuda")
        if tool is None:
            recorder.append(dict(row, status="not run: compute-sanitizer not found", seconds=0.0))
            return
        command = [tool, "--tool", job["tool"], "--print-limit", "20", sys.executable, "-c", checks.SANITIZER_SCRIPT]
        code, out, err = _subprocess(command, timeout, env)
        with open(os.path.join(out_dir, "sanitizer.log"), "a") as f:
            f.write(f"$ {' '.join(command[:5])} python -c SANITIZER_SCRIPT (exit {code})\n{out}{err}\n")
        parsed = checks.parse_sanitizer(out + err, code)
        status = "ok" if parsed["ok"] else (f"timeout after {timeout:.0f} s" if code == "timeout" else f"exit {code}")
        if "Device not supported" in out + err:  # it could not attach: no verdict on the kernels
            status, parsed["errors"] = "not run: compute-sanitizer: Device not supported", None
        recorder.append(dict(row, status=status, seconds=time.monotonic() - begin, **parsed))
        return
    job = dict(job, device=device)
    # Autotuning off: the kernels launch their list's first entry, the one ``pinned`` chose.
    # Two CPU threads each: several jobs share the cores with Triton's compiler.
    job_env = dict(env, SYMILE_KERNELS_TRITON_AUTOTUNE="0", OMP_NUM_THREADS="2", **job.get("env", {}),
                   **checks.MODES[job["mode"]][2])
    code, out, err = _subprocess([sys.executable, __file__, "--check-worker", json.dumps(job)], timeout, job_env)
    summary = None
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row["kind"] == "check_job":
                summary = row
            else:
                recorder.append(row)
    tail = ([line for line in err.strip().splitlines() if line.strip()] or ["no output"])[-1][:300]
    if summary is None:
        summary = dict(kind="check_job", backend=job["backend"], mode=job["mode"], config=job.get("config"),
                       status=f"timeout after {timeout:.0f} s" if code == "timeout" else f"crashed (exit {code}): {tail}")
    else:
        summary["status"] = summary.get("status", "ok")
    recorder.append(dict(summary, required=job.get("required", False), optional=job.get("optional", False),
                         seconds=round(time.monotonic() - begin, 1)))


def run_correctness(jobs: list[dict], build: Optional[Callable[[], dict]], recorder: Recorder, deadline: float,
                    out_dir: str, smoke: bool, device: str, workers: int,
                    clock: Callable[[], float] = time.monotonic, built_before: bool = True) -> bool:
    """Runs the build, then ``jobs`` on ``workers`` threads (a job that ``needs_build``
    waits for it, and is skipped if it failed); nothing starts after ``deadline``. Without a
    ``build``, ``built_before`` says whether an earlier one succeeded. Returns whether the
    compiled backend is built."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TRITON_INTERPRET", None)
    built = threading.Event()
    build_ok = [built_before if build is None else False]

    def do_build():
        try:
            if build is not None:
                try:
                    row = build()
                except Exception as exc:  # noqa: BLE001  (recorded; the jobs that need it are skipped)
                    row = dict(kind="build", backend="?", seconds=0.0, required=True,
                               status=f"failed: {type(exc).__name__}: {exc}")
                row = recorder.append(row)
                build_ok[0] = row["status"] == "ok"
                print(f"[gpu_suite] build: {row['status']} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        finally:
            built.set()  # the waiting jobs run, or are recorded as not run

    pending = list(jobs)
    lock = threading.Condition()

    def worker():
        while True:
            with lock:
                job = next((j for j in pending if not j.get("needs_build") or built.is_set()), None)
                if job is None:
                    if not pending:
                        return
                    lock.wait(timeout=1.0)
                    continue
                pending.remove(job)
            left = deadline - clock()
            name = dict(kind=job.get("kind", "check_job"), backend=job.get("backend", "cuda"),
                        mode=job.get("mode"), config=job.get("config"), tool=job.get("tool"),
                        required=job.get("required", False), optional=job.get("optional", False))
            if left < 2:
                recorder.append(dict(name, status="not run: correctness budget spent"))
            elif job.get("needs_build") and not build_ok[0]:
                recorder.append(dict(name, status="not run: the backend did not build", required=False))
            else:
                _run_check_job(job, left, env, recorder, out_dir, smoke, device)

    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        pool.submit(do_build).add_done_callback(lambda _: _notify(lock))
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return build_ok[0]


def _notify(condition: threading.Condition) -> None:
    with condition:
        condition.notify_all()


def build_row(backend: str, device: str, timeout: float, log: str) -> dict:
    """Loads (JIT-building if needed) a compiled backend in a subprocess; the time it took.
    The build's output (nvcc commands included) goes to ``log``."""
    begin = time.monotonic()
    command = [sys.executable, __file__, "--build-worker", json.dumps([backend, device])]
    code, out, err = _subprocess(command, timeout, dict(os.environ, SYMILE_KERNELS_VERBOSE_BUILD="1"))
    with open(log, "w") as f:
        f.write(f"$ {' '.join(command)}  (exit {code}, {time.monotonic() - begin:.1f} s)\n{out}{err}")
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if code == 0 and lines else dict(
        status=f"failed (exit {code}): {(err.strip().splitlines() or ['no output'])[-1][:300]}")
    return dict(kind="build", backend=backend, seconds=round(time.monotonic() - begin, 1), **result)


# ---------------------------------------------------------------- workers (in subprocesses)

def _build_worker(backend: str, device: str) -> dict:
    import torch

    from symile_kernels import backends

    reason = backends.unavailable_reason(backend, torch.device(device))
    module = sys.modules.get(f"symile_kernels.{backend}")
    ops = getattr(module, "_LIBRARY", None)
    return dict(status="ok" if reason is None else f"unavailable: {reason}", origin=getattr(ops, "origin", None))


def _check_worker(job: dict) -> None:
    import torch

    from symile_kernels import backends

    reason = backends.unavailable_reason(job["backend"], torch.device(job["device"]))
    if reason is not None:
        print(json.dumps(dict(kind="check_job", backend=job["backend"], mode=job["mode"], config=job.get("config"),
                              status=f"unavailable: {reason}", passed=0, total=0)), flush=True)
        return
    for row in checks.run_job(job):
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="folder for results.jsonl, results.md and the logs")
    parser.add_argument("--cpu-smoke", dest="smoke", action="store_true",
                        help="the same plumbing on the CPU at tiny sizes (interpreter, emulation), about a minute")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole suite")
    parser.add_argument("--first-s", type=float, default=150.0,
                        help="seconds for the build and the headline checks (phase 1), before the headline rows")
    parser.add_argument("--check-budget-s", type=float, default=150.0,
                        help="seconds for the broad sweep, pytest and the sanitizers (phase 2)")
    parser.add_argument("--workers", type=int, default=0, help="parallel correctness jobs (default: cores / 2)")
    parser.add_argument("--arch", choices=("sm90", "sm80"), default="sm90",
                        help="with --plan: the GPU architecture whose Triton lists are planned")
    parser.add_argument("--render", metavar="OUT_DIR", help="rebuild OUT_DIR/results.md from results.jsonl")
    parser.add_argument("--plan", action="store_true", help="print the correctness jobs and rows; run nothing")
    for flag in ("--check-worker", "--build-worker"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--row-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_worker:
        _check_worker(json.loads(args.check_worker))
        return 0
    if args.build_worker:
        print(json.dumps(_build_worker(*json.loads(args.build_worker))))
        return 0
    if args.row_worker:
        import _gpu_rows

        _gpu_rows.serve()
        return 0
    if args.render:
        text = report.render(report.read_rows(os.path.join(args.render, "results.jsonl")))
        with open(os.path.join(args.render, "results.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    if args.plan:
        how, counts = checks.config_lists(args.arch)
        headline = checks.headline_lists(args.arch) if counts else []
        print(json.dumps(dict(kind="configs", arch=args.arch, how=how, counts=counts, headline=headline)))
        for item in check_plan(args.smoke, counts, headline) + bench_plan(args.smoke, [] if args.smoke
                                                                          else ["triton", "cuda"]):
            print(json.dumps(item))
        return 0
    if not args.out_dir:
        parser.error("the output folder is required")
    return run_suite(args)


def run_suite(args) -> int:
    import torch

    import _gpu_rows
    from timing import machine_info, memory_limit_bytes

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run on a GPU machine, or use --cpu-smoke", file=sys.stderr)
        return 2
    if args.smoke:  # no JIT build of the C++ backend in the rehearsal: it records "unavailable" instead
        os.environ["SYMILE_KERNELS_NO_JIT"] = "1"
    os.makedirs(args.out_dir, exist_ok=True)
    for stale in ("tests.log", "sanitizer.log", "build.log", "rows.log"):
        if os.path.exists(os.path.join(args.out_dir, stale)):
            os.remove(os.path.join(args.out_dir, stale))
    budget = Budget(args.budget_s)
    recorder = Recorder(os.path.join(args.out_dir, "results.jsonl"))
    info = machine_info(torch.device(device))
    revision_file = os.path.join(ROOT, ".lease", "git-revision.txt")  # written by prepare_lease.sh
    if not info.get("git_revision") and os.path.exists(revision_file):
        with open(revision_file) as f:
            info["git_revision"] = f.read().strip() + " (from .lease/git-revision.txt)"
    info.update(kind="info", command=" ".join(["python"] + sys.argv), budget_s=args.budget_s,
                first_s=args.first_s, check_budget_s=args.check_budget_s, smoke=args.smoke)
    try:
        import symile

        info["symile"] = getattr(symile, "__version__", "installed")
    except ImportError:
        info["symile"] = "NOT INSTALLED"
        print("[gpu_suite] reference package symile: NOT INSTALLED; its rows will be skipped", file=sys.stderr)
    recorder.append(info)

    arch = checks.device_arch(torch.device(device))
    how, counts = ("not applicable: the Triton interpreter runs fixed blocks", {}) if args.smoke \
        else checks.config_lists(arch)
    headline = [] if not counts else checks.headline_lists(arch)
    recorder.append(dict(kind="configs", arch=arch, how=how, counts=counts, headline=headline))
    jobs = check_plan(args.smoke, counts, headline)
    compiled = "cpu" if args.smoke else "cuda"
    workers = args.workers or max(2, min(8, (os.cpu_count() or 2) // 2))
    fused = [] if args.smoke else ["triton", "cuda"]
    rows = bench_plan(args.smoke, fused)
    limit = memory_limit_bytes(torch.device(device))
    worker = _gpu_rows.RowWorker(__file__, "--row-worker", os.path.join(args.out_dir, "rows.log"))

    def skip_reason(config):
        if config["backend"] == "symile" and info["symile"] == "NOT INSTALLED":
            return "skipped: reference package symile NOT INSTALLED (carry its wheel: benchmarks/prepare_lease.sh)"
        if config["backend"] == compiled and not built[0]:  # asking again would retry the JIT build
            return f"skipped: the {compiled} backend did not build"
        if config["backend"] in backends.NAMES and config["backend"] != "reference":
            reason = backends.unavailable_reason(config["backend"], torch.device(device))
            if reason is not None:
                return f"skipped: backend unavailable: {reason[:200]}"
        need = _gpu_rows.estimated_bytes(config)
        if need > 0.9 * limit:
            return f"skipped: needs ~{need / 2 ** 30:.0f} GiB (materialises the logits)"
        return None

    def measure_rates(modes):
        size = 256 if args.smoke else 8192
        for mode in modes:
            recorder.append(dict(kind="mm", mode=mode, size=size,
                                 tflops=_gpu_rows.mm_rate(torch.device(device), mode, size)))
        if device == "cuda":
            torch.cuda.empty_cache()  # the rows' worker gets the memory back

    from symile_kernels import backends

    built = [False]
    try:
        # Phase 1: the build (or the carried extension), the headline checks, the headline rows.
        built[0] = run_correctness(
            [j for j in jobs if j["phase"] == 1],
            lambda: dict(build_row(compiled, device, budget.left(), os.path.join(args.out_dir, "build.log")),
                         required=not args.smoke),
            recorder, time.monotonic() + min(args.first_s, budget.left()), args.out_dir, args.smoke, device, workers)
        measure_rates(["bf16"])
        run_rows([r for r in rows if r["phase"] == 1], worker, recorder, budget, skip_reason)
        # Phase 2: the broad sweep, pytest, the sanitizers; the peers and the other rows.
        run_correctness([j for j in jobs if j["phase"] == 2], None, recorder,
                        time.monotonic() + min(args.check_budget_s, budget.left()), args.out_dir, args.smoke,
                        device, workers, built_before=built[0])
        measure_rates(["tf32", "fp32"] if not args.smoke else ["fp32"])
        run_rows([r for r in rows if r["phase"] == 2], worker, recorder, budget, skip_reason)
    finally:
        worker.close()

    recorder.append(dict(kind="end", elapsed_s=round(args.budget_s - budget.left(), 1)))
    text = report.render(recorder.rows)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    result = report.verdict(recorder.rows)
    return 1 if result["failing"] else (3 if result["incomplete"] or not result["checks"] else 0)


if __name__ == "__main__":
    sys.exit(main())
