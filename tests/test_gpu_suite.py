"""The GPU suite (benchmarks/gpu_suite.py) on the CPU: its rehearsal end to end, and its
order, time guard, incremental output and verdict at tiny sizes with fake runners and
a fake clock. Timings are not checked: they are the suite's job."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _gpu_checks as checks  # noqa: E402
import _gpu_report as report  # noqa: E402
import gpu_suite  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def bench(N, backend="triton", **extra):
    return dict(dict(kind="bench", stage="scale", backend=backend, M=3, N=N, d=256, sampling="n_squared",
                     mode="bf16", device="cuda", tau=14.3, warmup=0, repeats=1), **extra)


def fake_runner(clock, seconds_per_row, ms_at=lambda N: 1000.0 * (N / 1024) ** 3):
    """Advances the clock as if the row ran, returns a measured row."""
    def run(config, timeout):
        clock.now += seconds_per_row(config)
        return dict(config, status="ok", fwd_ms=1.0, fwd_bwd_ms=ms_at(config["N"]), peak_mb=1.0, loss=1.0)
    return run


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # about 40 s: a dozen fresh interpreters
def test_cpu_smoke_runs_every_stage_in_order(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SYMILE_KERNELS_BACKEND")}
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), str(tmp_path), "--cpu-smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = lines(tmp_path / "results.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "info" and kinds[-1] == "end"
    # Phase 1 (build, first checks) before the first matrix rate, before the headline row; phase 2's
    # checks (pytest among them) after it, then the other rows.
    first_bench = kinds.index("bench")
    assert max(i for i, k in enumerate(kinds) if k == "build") < kinds.index("mm") < first_bench
    assert rows[first_bench]["stage"] == "headline"
    assert first_bench < kinds.index("pytest") < max(i for i, k in enumerate(kinds) if k == "bench")
    tests = rows[kinds.index("pytest")]  # the conformance battery ran (on chunked's CPU target) and passed
    assert tests["ok"] and re.search(r"\b\d+ passed", tests["summary"]) and "failed" not in tests["summary"], tests
    jobs = [r for r in rows if r["kind"] == "check_job"]
    assert {(j["backend"], j["mode"]) for j in jobs} >= {("chunked", "fp32"), ("chunked", "bf16"), ("triton", "fp32")}
    # cpu and triton are optional (no C++ build or no Triton: recorded as unavailable).
    assert all(j["status"] == "ok" and j["passed"] == j["total"] > 0 for j in jobs if not j["optional"])
    assert all(j["status"] == "ok" or j["status"].startswith(("unavailable", "not run")) for j in jobs)
    cases = [r for r in rows if r["kind"] == "check"]
    assert all(r["ok"] and r["loss_err"] <= r["loss_tol"] for r in cases)
    assert {r["M"] for r in cases} == {2, 3, 4} and {r["sampling"] for r in cases} == {"n", "n_squared"}
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:  # the interpreter job ran kernels from sm90's lists, pinned by list as on the GPU
        job = next(j for j in jobs if j["backend"] == "triton")
        assert any(r["backend"] == "triton" for r in cases)
        assert job["configs_used"] and all(name.split("/")[1] == "sm90" for name in job["configs_used"])
    assert next(r for r in rows if r["kind"] == "pytest")["ok"]
    bench_rows = [r for r in rows if r["kind"] == "bench"]
    assert [r["N"] for r in bench_rows] == [r["N"] for r in gpu_suite.bench_plan(True, [])]
    assert bench_rows[-1]["status"].startswith("skipped: estimated")  # N = 4096 from the N = 24 row
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in bench_rows[:-1] if r["backend"] != "symile")
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.splitlines()[2].startswith("**CORRECTNESS: PASS**")
    assert markdown.index("## Headline") < markdown.index("## Scale rows") < markdown.index("## Machine")
    # The peers computed the loss the backends did, on the same inputs.
    peers = [r for r in bench_rows if r["stage"] == "peers" and r["status"] == "ok"]
    assert {r["backend"] for r in peers} >= {"torch-einsum", "chunked"}
    assert max(r["loss"] for r in peers) - min(r["loss"] for r in peers) <= 2e-2 * abs(peers[0]["loss"])
    assert done.stdout.strip().endswith("```")


def test_time_guard_skips_rows_that_do_not_fit_and_records_them(tmp_path):
    clock = FakeClock()
    recorder = gpu_suite.Recorder(str(tmp_path / "results.jsonl"), clock)
    budget = gpu_suite.Budget(100.0, clock)
    # The N = 1024 row takes 30 s of which 7/3 calls of 1 s: 27.7 s of overhead. The N = 2048
    # estimate is 27.7 + 7/3 * 8 s = 46.3 s and fits in 70 s; after it (30 s more) 40 s are
    # left, and N = 4096 needs 27.7 + 7/3 * 64 s: skipped.
    plan = [bench(1024), bench(2048), bench(4096), bench(1024, backend="cuda")]
    gpu_suite.run_rows(plan, fake_runner(clock, lambda c: 30.0), recorder, budget)
    rows = lines(tmp_path / "results.jsonl")
    assert [r["status"][:18] for r in rows] == ["ok", "ok", "skipped: estimated", "ok"]
    assert rows[1]["estimate_s"] == pytest.approx(30 - 7 / 3 + (7 / 3) * 8.0, abs=0.1)
    assert rows[1]["wall_s"] == 30.0
    assert "from the N = 2048 row" in rows[2]["status"] and "40 s left" in rows[2]["status"]
    # Another backend has no measured row: no estimate, it runs with what is left as its timeout.
    assert rows[3]["estimate_s"] is None


def test_time_guard_skips_everything_once_the_budget_is_spent(tmp_path):
    clock = FakeClock()
    recorder = gpu_suite.Recorder(str(tmp_path / "results.jsonl"), clock)
    timeouts = []

    def runner(config, timeout):
        timeouts.append(timeout)
        clock.now += 58.0
        return dict(config, status="ok", fwd_ms=1.0, fwd_bwd_ms=1.0, peak_mb=1.0, loss=1.0)

    gpu_suite.run_rows([bench(8, backend=b) for b in ("a", "b", "c")], runner, recorder, gpu_suite.Budget(60.0, clock))
    assert [r["status"] for r in recorder.rows][:1] == ["ok"]
    assert all(r["status"].startswith("skipped: budget spent") for r in recorder.rows[1:])
    assert timeouts == [60.0]


def test_each_row_is_on_disk_before_the_next_runs_and_a_crash_keeps_them(tmp_path):
    path = tmp_path / "results.jsonl"
    clock = FakeClock()
    recorder = gpu_suite.Recorder(str(path), clock)
    seen_on_disk = []

    class Crash(BaseException):  # like a kill: not caught by the suite
        pass

    def runner(config, timeout):
        seen_on_disk.append(len(lines(path)))
        if config["N"] == 16:
            raise RuntimeError("worker raised")
        if config["N"] == 32:
            raise Crash()
        return dict(config, status="ok", fwd_ms=1.0, fwd_bwd_ms=1.0, peak_mb=1.0, loss=1.0)

    with pytest.raises(Crash):
        gpu_suite.run_rows([bench(8), bench(16), bench(24, backend="x"), bench(32, backend="y"), bench(40)],
                           runner, recorder, gpu_suite.Budget(1000.0, clock))
    assert seen_on_disk == [0, 1, 2, 3]
    rows = lines(path)
    assert [r["N"] for r in rows] == [8, 16, 24]
    assert rows[1]["status"] == "failed: RuntimeError: worker raised" and rows[2]["status"] == "ok"
    # The report can be rebuilt from what the crash left (no end row).
    text = report.render(report.read_rows(str(path)))
    assert "the run was cut short" in text and "worker raised" in text


def test_a_crashed_check_job_keeps_its_rows_and_marks_the_backend(tmp_path, monkeypatch):
    case = dict(kind="check", backend="cuda", mode="fp32", config=None, M=3, N=7, d=3, sampling="n", inputs="unit",
                tau=14.3, loss_err=1e-7, grad_err=1e-6, worst_grad="d0", loss_tol=1e-5, grad_tol=1e-4, ok=True)
    monkeypatch.setattr(gpu_suite, "_subprocess", lambda *a, **k: (-11, json.dumps(case) + "\n", "Segfault\n"))
    recorder = gpu_suite.Recorder(str(tmp_path / "results.jsonl"))
    gpu_suite._run_check_job(dict(backend="cuda", mode="fp32", shapes="full", required=True), 10.0, {}, recorder,
                             str(tmp_path), False, "cuda")
    assert [r["kind"] for r in recorder.rows] == ["check", "check_job"]
    assert recorder.rows[1]["status"] == "crashed (exit -11): Segfault"
    result = report.verdict(recorder.rows)
    assert result["failing"] == {"cuda": ["cuda fp32 config None: crashed (exit -11): Segfault"]}
    text = report.render(recorder.rows + [bench(4096, status="ok", fwd_ms=1.0, fwd_bwd_ms=2.0, peak_mb=3.0, loss=4.0)])
    assert text.splitlines()[2].startswith("**CORRECTNESS: FAIL**") and "| triton | bf16 | 3 | 4096 |" in text


def test_report_says_loudly_when_the_reference_package_is_missing():
    rows = [dict(kind="info", gpu="G"), bench(1024, backend="symile", stage="vs_symile",
                                           status="skipped: reference package symile NOT INSTALLED")]
    text = report.render(rows)
    assert "**Reference package symile: skipped: reference package symile NOT INSTALLED**" in text


def test_comparison_fails_a_wrong_backend():
    # The oracle check can fail: "reference" in float32 against float64 passes; a corrupted
    # gradient (every input doubled by a hook) does not.
    case = dict(M=3, N=5, d=3, sampling="n_squared", inputs="unit", tau=14.3)
    assert checks.check_case("chunked", "fp32", case, torch.device("cpu"), seed=1)["ok"]
    original = torch.Tensor.requires_grad_

    def doubled(self, flag=True):
        out = original(self, flag)
        if self.dtype == torch.float32 and self.dim() == 2:
            self.register_hook(lambda g: 2 * g)
        return out

    torch.Tensor.requires_grad_ = doubled
    try:
        result = checks.check_case("chunked", "fp32", case, torch.device("cpu"), seed=1)
    finally:
        torch.Tensor.requires_grad_ = original
    assert not result["ok"] and result["grad_err"] > 0.5


def test_cases_cover_the_shapes_and_kinds():
    full = checks.cases("full")
    assert {c["M"] for c in full} == {2, 3, 4} and {c["sampling"] for c in full} == {"n", "n_squared"}
    assert {c["tau"] for c in full} >= {100.0} and {c["inputs"] for c in full} == {"unit", "gaussian", "faint"}
    assert all(c["N"] ** c["M"] <= checks.ORACLE_MAX_ELEMENTS for c in full if c["sampling"] == "n_squared")
    assert {c["N"] for c in full} == {7, 33, 65, 129} and {c["d"] for c in full} == {3, 48, 200, 256, 496}
    headline = checks.cases("headline")
    assert {c["d"] for c in headline} == {256} and {(c["M"], c["sampling"]) for c in headline} == {
        (3, "n_squared"), (3, "n"), (2, "n_squared")}


def test_the_lists_sweep_reaches_every_list_of_each_architecture():
    pytest.importorskip("triton")
    from symile_kernels.triton import _launch, kernel_configs

    sizes = {c["d"] for c in checks.cases("lists")}
    for arch in ("sm90", "sm80"):
        reached = {_launch.list_name(name.split("/")[0], arch, d) for name in kernel_configs() for d in sizes
                   if name.split("/")[1] == arch}
        assert reached == set(checks.config_lists(arch)[1]), arch


def test_pinning_reaches_the_list_a_gpu_launch_takes(monkeypatch):
    # On a GPU-sized request (a CUDA device, 4096 rows, d = 256), pick returns configuration i of
    # the list list_name names, pinned by list, without tuning; an unpinned list is untouched.
    pytest.importorskip("triton")
    from symile_kernels.triton import _launch, kernel_configs

    monkeypatch.setattr(_launch, "INTERPRETED", False)
    monkeypatch.setattr(_launch, "arch_of", lambda device: "sm90")
    cuda = torch.device("cuda", 0)

    def pick(kernel, d):
        return _launch.pick(kernel, cuda, torch.bfloat16, d, 4096, run=lambda c: pytest.fail("tuned a pinned list"))

    name = _launch.list_name("cube_fwd", "sm90", 256)
    assert name == "cube_fwd/sm90/large" and len(kernel_configs()[name]) >= 2
    with checks.pinned(1, "sm90") as pins:
        assert {p.name for p in pins} == set(checks.config_lists("sm90")[1])
        assert pick("cube_fwd", 256) is kernel_configs()[name][1]
        assert pick("pair_fwd", 20) is kernel_configs()["pair_fwd/sm90/small"][1]
        assert {p.name: p.launches for p in pins if p.launches} == {name: 1, "pair_fwd/sm90/small": 1}
        with _launch.pinned_config("cube_fwd/sm80/large", 0):  # another architecture's list: not this launch
            assert pick("cube_fwd", 256) is kernel_configs()[name][1]
    # Outside the block, a request too small to tune takes the list's first configuration.
    monkeypatch.setattr(_launch, "should_tune", lambda rows: False)
    assert pick("cube_fwd", 256) is kernel_configs()[name][0]


def test_the_gpu_plan_puts_the_headline_evidence_first():
    counts = {"cube_fwd/sm90/large": 2, "pair_fwd/sm90/large": 1, "cube_fwd/sm90/small": 3}
    jobs = gpu_suite.check_plan(False, counts, ["cube_fwd/sm90/large", "pair_fwd/sm90/large"])
    first = [j for j in jobs if j["phase"] == 1]
    assert sorted((j["backend"], j["mode"], j.get("config", -1)) for j in first) == sorted(
        [("triton", m, i) for m in ("bf16", "tf32") for i in range(2)] + [("cuda", m, -1) for m in ("bf16", "tf32")])
    assert all(j["shapes"] == "headline" and j["required"] for j in first)
    assert jobs[:len(first)] == first
    sweep = [(j["mode"], j["config"]) for j in jobs if j.get("backend") == "triton" and j["phase"] == 2]
    assert sorted(sweep) == sorted((m, i) for m in ("fp32", "tf32", "bf16", "fp16") for i in range(3))
    assert {j["mode"] for j in jobs if j.get("backend") == "cuda"} == {"fp32", "tf32", "bf16", "fp16", "fp32-as-bf16"}
    assert all(j.get("needs_build") for j in jobs if j.get("backend") == "cuda" or j.get("kind"))
    rows = gpu_suite.bench_plan(False, ["triton", "cuda"])
    assert [(r["backend"], r["mode"], r["N"], r["d"]) for r in rows if r["phase"] == 1] == [
        ("triton", "bf16", 4096, 256), ("cuda", "bf16", 4096, 256)]
    assert rows[:2] == [r for r in rows if r["phase"] == 1]
    stages = [r["stage"] for r in rows]
    assert stages.index("scale") > max(i for i, s in enumerate(stages) if s != "scale")
    assert {r["backend"] for r in rows if r["stage"] == "peers"} == {"symile", "torch-einsum", "torch-compile",
                                                                      "triton", "cuda"}
    assert {(r["backend"], r["N"]) for r in rows if r["stage"] == "n"} == {
        (b, N) for b in ("symile", "torch-ce", "triton", "cuda") for N in (16384, 65536)}
    assert {(r["backend"], r["N"], r["M"]) for r in rows if r["stage"] == "clip"} == {
        (b, N, 2) for b in ("torch-ce", "triton", "cuda") for N in (16384, 65536)}
    assert {r["N"] for r in rows if r["stage"] == "scale"} == {8192, 16384}


def test_plan_names_the_gpu_lists():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), "--plan", "--arch", "sm80"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.loads(done.stdout.splitlines()[0])
    assert first["counts"] and all(name.split("/")[1] == "sm80" for name in first["counts"])
    assert "cube_fwd/sm80/large" in first["headline"] and "interpreter" not in done.stdout


def test_the_report_names_configurations_no_check_launched():
    rows = [dict(kind="configs", arch="sm90", how="public", counts={"a/sm90/small": 2, "b/sm90/large": 1}),
            dict(kind="check", backend="triton", mode="bf16", config=0, ok=True, M=3, N=5, d=3, sampling="n",
                 inputs="unit", tau=1.0, loss_err=0, grad_err=0, loss_tol=1, grad_tol=1),
            dict(kind="check_job", backend="triton", mode="bf16", config=0, status="ok", required=True,
                 configs_used={"a/sm90/small": 0, "b/sm90/large": 0})]
    assert report.unchecked_configs(rows) == ["a/sm90/small config 1"]
    assert report.verdict(rows)["incomplete"] == [
        "1 Triton configurations no pinned check launched: a/sm90/small config 1"]
    text = report.render(rows)
    assert "| a/sm90/small | 2 | bf16: 0 |" in text and "**CORRECTNESS: INCOMPLETE**" in text


def test_pytest_and_sanitizer_output_parsing():
    out = "F.\nFAILED tests/test_cuda_gpu.py::test_x - AssertionError\nERROR tests/test_triton_backend.py::t\n1 failed"
    parsed = checks.parse_pytest(out, 1)
    assert parsed["failed"] == {"cuda": ["tests/test_cuda_gpu.py::test_x"],
                                "triton": ["tests/test_triton_backend.py::t"]} and not parsed["ok"]
    assert checks.parse_pytest("5 passed in 1s", 0)["ok"]
    clean = checks.parse_sanitizer("sanitizer script done\n========= ERROR SUMMARY: 0 errors\n", 0)
    assert clean["ok"] and clean["errors"] == 0
    dirty = checks.parse_sanitizer("========= Invalid __global__ read\n========= ERROR SUMMARY: 3 errors\n", 1)
    assert not dirty["ok"] and dirty["errors"] == 3
    assert not checks.parse_sanitizer("========= ERROR SUMMARY: 0 errors\n", 0)["ok"]  # the script never finished


def test_sanitizer_step_records_the_summary_and_marks_errors(tmp_path, monkeypatch):
    commands = []
    outputs = iter([(0, "sanitizer script done\n========= ERROR SUMMARY: 0 errors\n", ""),
                    (1, "========= Race reported\n========= ERROR SUMMARY: 2 errors\n", "")])

    def fake(command, timeout, env=None):
        commands.append(command)
        return next(outputs)

    monkeypatch.setattr(checks, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(gpu_suite, "_subprocess", fake)
    recorder = gpu_suite.Recorder(str(tmp_path / "results.jsonl"))
    for tool in ("memcheck", "racecheck"):
        gpu_suite._run_check_job(dict(kind="sanitizer", tool=tool), 60.0, {}, recorder, str(tmp_path), False, "cuda")
    assert [c[:3] for c in commands] == [["/opt/cuda/bin/compute-sanitizer", "--tool", t] for t in ("memcheck", "racecheck")]
    assert [(r["tool"], r["status"], r["errors"]) for r in recorder.rows] == [("memcheck", "ok", 0), ("racecheck", "exit 1", 2)]
    assert report.verdict(recorder.rows)["failing"] == {"cuda": ["racecheck: ERROR SUMMARY: 2 errors"]}
    log = (tmp_path / "sanitizer.log").read_text()
    assert "--tool memcheck" in log and "Race reported" in log
    monkeypatch.setattr(checks, "find_sanitizer", lambda: None)
    gpu_suite._run_check_job(dict(kind="sanitizer", tool="memcheck"), 60.0, {}, recorder, str(tmp_path), False, "cuda")
    assert recorder.rows[-1]["status"] == "not run: compute-sanitizer not found"
    assert report.verdict(recorder.rows[-1:]) == dict(failing={}, incomplete=[], checks=0,
                                                      notes=["memcheck: not run: compute-sanitizer not found"])
    # A sanitizer that cannot attach to the device says nothing of the kernels: not run, not failing.
    monkeypatch.setattr(checks, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(gpu_suite, "_subprocess", lambda *a, **k: (
        1, "========= Error: Device not supported\n========= ERROR SUMMARY: 1 error\n", ""))
    gpu_suite._run_check_job(dict(kind="sanitizer", tool="racecheck"), 60.0, {}, recorder, str(tmp_path), False, "cuda")
    assert recorder.rows[-1]["status"] == "not run: compute-sanitizer: Device not supported"
    assert report.verdict(recorder.rows[-1:])["failing"] == {}


@pytest.mark.parametrize("broken", ["fails", "raises"])
def test_a_failed_build_skips_the_jobs_that_need_it_and_fails_the_backend(tmp_path, broken):
    import threading
    import time

    def build():
        if broken == "raises":
            raise OSError("no nvcc")
        return dict(kind="build", backend="cuda", seconds=1.0, required=True, status="unavailable: nvcc failed")

    recorder = gpu_suite.Recorder(str(tmp_path / "results.jsonl"))
    jobs = [dict(backend="cuda", mode="fp32", shapes="full", needs_build=True, required=True),
            dict(kind="pytest", needs_build=True),
            dict(backend="cpu", mode="fp32", shapes="smoke", needs_build=True, optional=True)]
    runner = threading.Thread(target=gpu_suite.run_correctness, daemon=True,
                              args=(jobs, build, recorder, time.monotonic() + 60, str(tmp_path), False, "cuda", 2))
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "the jobs waiting for the build never ran"
    assert recorder.rows[0]["kind"] == "build" and recorder.rows[0]["status"] != "ok"
    assert sorted(r["status"] for r in recorder.rows[1:]) == ["not run: the backend did not build"] * 3
    result = report.verdict(recorder.rows)
    assert result["failing"] and result["notes"] == ["cpu fp32 config None: not run: the backend did not build"]
    assert "pytest: not run: the backend did not build" in result["incomplete"]
