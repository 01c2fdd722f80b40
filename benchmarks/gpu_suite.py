"""The GPU suite: correctness first, then speed, inside one device lease.

    python benchmarks/gpu_suite.py OUT_DIR --budget-s 480   # a CUDA machine, about 8 minutes
    python benchmarks/gpu_suite.py OUT_DIR --cpu-smoke      # the same plumbing on the CPU, < 1 minute
    python benchmarks/gpu_suite.py --render OUT_DIR         # results.md again from results.jsonl

Stages, in order, under one time budget (``--budget-s``; the correctness stage
has its own share, ``--check-budget-s``):

1. Build and correctness (``_gpu_checks.py``), jobs in parallel subprocesses:
   the cuda backend's build (timed); the oracle sweep of every GPU backend
   (triton, cuda; chunked as a control) x compute mode (fp32 IEEE, TF32, bf16,
   fp16) x M in {2, 3, 4} x {"n", "n_squared"} x ragged (N, d), tau up to 100,
   with every Triton autotune configuration pinned in turn; ``pytest -m gpu``
   (``tests.log``); the cuda backend under ``compute-sanitizer`` memcheck and
   racecheck (``sanitizer.log``). A failure marks the backend failing; the
   suite goes on to the timings and says so at the top of the report.
2. Headline rows (``_gpu_rows.py``, one fresh subprocess each): the reference
   package ``symile`` 0.1.0 vs every backend at N = 1024, d = 256; the fused
   backends at N = 4096 in fp32 / TF32 / bf16 (model TFLOP/s against the dense
   matrix-product rate of the same mode, measured in this run); "n" sampling at
   N = 16384 and 65536 against the reference package's "n".
3. Scale rows, N = 8192 and 16384, under the time guard: a row whose estimated
   time (N^3 from the measured smaller row) does not fit what is left of the
   budget is recorded as skipped.
4. Output in OUT_DIR: ``results.jsonl`` (one JSON row appended as each piece
   completes, so a crash keeps what came before), ``results.md`` (verdict first,
   tables, machine block last; also printed), ``build.log``, ``tests.log``,
   ``sanitizer.log``. ``--plan`` prints the planned jobs and rows and runs nothing.

Exit status: 0 when every correctness check ran and passed; 1 when one failed;
3 when none failed but some did not run (correctness budget spent, a timeout; a
machine without compute-sanitizer is reported, not counted); 2 without a CUDA
device (and no ``--cpu-smoke``).
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
    """Benchmark rows, in the order they run: headline rows, then scale rows."""
    device = "cpu" if smoke else "cuda"

    def row(stage, backend, N, mode="fp32", sampling="n_squared", warmup=1, repeats=3, d=D):
        return dict(kind="bench", stage=stage, backend=backend, M=3, N=N, d=d, sampling=sampling, mode=mode,
                    device=device, tau=TAU, warmup=warmup, repeats=repeats)

    if smoke:  # the stages and both guards at CPU sizes; the last row cannot fit any budget
        return ([row("vs_symile", b, 8, d=8) for b in ("symile", "chunked")]
                + [row("n", "chunked", 16, sampling="n", mode="bf16", d=8)]
                + [row("scale", "chunked", N, warmup=0, repeats=1, d=8) for N in (24, 4096)])
    rows = [row("vs_symile", b, 1024) for b in ["symile", "chunked"] + fused]
    # fp32 IEEE products take seconds a call at N = 4096: fewer repeats.
    rows += [row("fused", b, 4096, mode, warmup=0, repeats=2 if mode == "fp32" else 3)
             for mode in ("fp32", "tf32", "bf16") for b in fused]
    rows += [row("n", b, N, sampling="n") for N in (16384, 65536) for b in ["symile"] + fused]
    rows += [row("vs_symile", "reference", 1024)]  # the oracle, materialised: last of the headline rows
    rows += [row("scale", b, N, mode, warmup=0, repeats=1) for mode in ("bf16", "tf32") for N in (8192, 16384)
             for b in fused]
    return rows


def check_plan(smoke: bool, config_counts: dict) -> list[dict]:
    """Correctness jobs, most important first. ``needs_build``: waits for the compiled backend."""
    if smoke:
        return [dict(backend="chunked", mode="fp32", shapes="smoke"),
                dict(backend="chunked", mode="bf16", shapes="smoke", required=True),
                # optional: a machine without the C++ build or Triton records them as unavailable
                dict(backend="cpu", mode="fp32", shapes="smoke", needs_build=True, optional=True),
                dict(backend="triton", mode="fp32", shapes="interpreter", Ms=(2, 3), n_kinds=1,
                     env={"TRITON_INTERPRET": "1"}, optional=True),
                dict(kind="pytest", needs_build=True)]
    modes = ("fp32", "tf32", "bf16", "fp16")
    jobs = [dict(backend="triton", mode=m, config=0, shapes="full", required=True) for m in modes]
    jobs += [dict(backend="cuda", mode=m, shapes="full", needs_build=True, required=True)
             for m in modes + ("fp32-as-bf16",)]
    jobs += [dict(kind="pytest", needs_build=True)]
    jobs += [dict(kind="sanitizer", tool=tool, needs_build=True) for tool in ("memcheck", "racecheck")]
    jobs += [dict(backend="chunked", mode=m, shapes="full") for m in modes]
    for index in range(1, max(config_counts.values(), default=1)):
        jobs += [dict(backend="triton", mode=m, config=index, shapes="reduced", required=True) for m in modes]
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
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Runs the build, then ``jobs`` on ``workers`` threads (a job that ``needs_build``
    waits for it, and is skipped if it failed); nothing starts after ``deadline``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TRITON_INTERPRET", None)
    built = threading.Event()
    build_ok = [build is None]

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
    parser.add_argument("out_dir", nargs="?", help="folder for results.jsonl, results.md, tests.log, sanitizer.log")
    parser.add_argument("--cpu-smoke", dest="smoke", action="store_true",
                        help="the same plumbing on the CPU at tiny sizes (interpreter, emulation), < 1 minute")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole suite")
    parser.add_argument("--check-budget-s", type=float, default=180.0, help="seconds for build and correctness")
    parser.add_argument("--workers", type=int, default=0, help="parallel correctness jobs (default: cores / 2)")
    parser.add_argument("--render", metavar="OUT_DIR", help="rebuild OUT_DIR/results.md from results.jsonl")
    parser.add_argument("--plan", action="store_true", help="print the correctness jobs and rows; run nothing")
    for flag in ("--check-worker", "--row-worker", "--build-worker"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_worker:
        _check_worker(json.loads(args.check_worker))
        return 0
    if args.build_worker:
        print(json.dumps(_build_worker(*json.loads(args.build_worker))))
        return 0
    if args.row_worker:
        import _gpu_rows

        print(json.dumps(_gpu_rows.measure(json.loads(args.row_worker))))
        return 0
    if args.render:
        text = report.render(report.read_rows(os.path.join(args.render, "results.jsonl")))
        with open(os.path.join(args.render, "results.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    if args.plan:  # the Triton configuration counts are read on the GPU; here: up to 3 per kernel
        for item in check_plan(args.smoke, {"any": 3}) + bench_plan(args.smoke, [] if args.smoke else ["triton", "cuda"]):
            print(json.dumps(item))
        return 0
    if not args.out_dir:
        parser.error("the output folder is required")
    return run_suite(args)


def run_suite(args) -> int:
    import torch

    import _gpu_rows
    from symile_kernels.benchmarking import machine_info, memory_limit_bytes

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run on a GPU machine, or use --cpu-smoke", file=sys.stderr)
        return 2
    if args.smoke:  # no JIT build of the C++ backend in the rehearsal: it records "unavailable" instead
        os.environ["SYMILE_KERNELS_NO_JIT"] = "1"
    os.makedirs(args.out_dir, exist_ok=True)
    for stale in ("tests.log", "sanitizer.log", "build.log"):
        if os.path.exists(os.path.join(args.out_dir, stale)):
            os.remove(os.path.join(args.out_dir, stale))
    budget = Budget(args.budget_s)
    recorder = Recorder(os.path.join(args.out_dir, "results.jsonl"))
    info = machine_info(torch.device(device))
    revision_file = os.path.join(ROOT, ".whl", "git-revision.txt")  # written by prepare_lease.sh
    if not info.get("git_revision") and os.path.exists(revision_file):
        with open(revision_file) as f:
            info["git_revision"] = f.read().strip() + " (from .whl/git-revision.txt)"
    info.update(kind="info", command=" ".join(["python"] + sys.argv), budget_s=args.budget_s,
                check_budget_s=args.check_budget_s, smoke=args.smoke)
    try:
        import symile

        info["symile"] = getattr(symile, "__version__", "installed")
    except ImportError:
        info["symile"] = "NOT INSTALLED"
        print("[gpu_suite] reference package symile: NOT INSTALLED; its rows will be skipped", file=sys.stderr)
    recorder.append(info)

    # 1. Build and correctness.
    if args.smoke:
        how, counts = "not applicable: the Triton interpreter runs fixed blocks", {}
    else:
        how, counts = checks.config_tables(torch.device(device))
    recorder.append(dict(kind="configs", how=how, counts=counts))
    compiled = "cpu" if args.smoke else "cuda"
    check_deadline = time.monotonic() + min(args.check_budget_s, budget.left())
    workers = args.workers or max(2, min(8, (os.cpu_count() or 2) // 2))
    run_correctness(check_plan(args.smoke, counts),
                    lambda: dict(build_row(compiled, device, check_deadline - time.monotonic(),
                                           os.path.join(args.out_dir, "build.log")), required=not args.smoke),
                    recorder, check_deadline, args.out_dir, args.smoke, device, workers)

    # 2-3. Matrix-product rates, headline rows, scale rows.
    size = 256 if args.smoke else 8192
    for mode in ("fp32", "tf32", "bf16", "fp16"):
        if not args.smoke or mode in ("fp32", "bf16"):
            recorder.append(dict(kind="mm", mode=mode, size=size,
                                 tflops=_gpu_rows.mm_rate(torch.device(device), mode, size)))
    if device == "cuda":
        torch.cuda.empty_cache()  # the rows' subprocesses get the memory back
    from symile_kernels import backends

    fused = [] if args.smoke else ["triton", "cuda"]
    failed_builds = {r["backend"] for r in recorder.rows if r.get("kind") == "build" and r["status"] != "ok"}
    limit = memory_limit_bytes(torch.device(device))

    def skip_reason(config):
        if config["backend"] == "symile" and info["symile"] == "NOT INSTALLED":
            return "skipped: reference package symile NOT INSTALLED (carry its wheel: benchmarks/prepare_lease.sh)"
        if config["backend"] in failed_builds:  # asking again would retry the JIT build
            return f"skipped: the {config['backend']} backend did not build"
        if config["backend"] not in ("symile", "reference"):
            reason = backends.unavailable_reason(config["backend"], torch.device(device))
            if reason is not None:
                return f"skipped: backend unavailable: {reason[:200]}"
        need = _gpu_rows.estimated_bytes(config)
        if need > 0.9 * limit:
            return f"skipped: needs ~{need / 2 ** 30:.0f} GiB (materialises the logits)"
        return None

    run_rows(bench_plan(args.smoke, fused),
             lambda config, timeout: _gpu_rows.run_in_subprocess(__file__, "--row-worker", config, timeout),
             recorder, budget, skip_reason)

    # 4. Report.
    recorder.append(dict(kind="end", elapsed_s=round(args.budget_s - budget.left(), 1)))
    text = report.render(recorder.rows)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    result = report.verdict(recorder.rows)
    return 1 if result["failing"] else (3 if result["incomplete"] or not result["checks"] else 0)


if __name__ == "__main__":
    sys.exit(main())
