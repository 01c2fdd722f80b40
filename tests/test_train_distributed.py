"""The reference trainer under torchrun: two gloo processes on the CPU
train on a shared global batch and reproduce the single-process claims.

The two-process run is a real ``python -m torch.distributed.run`` in a
subprocess of its own session, killed (with its workers) at a deadline, so a
hung collective fails the test instead of hanging CI. The rest checks, in this
process, what the command line does before any process joins a group.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import symile_kernels
from symile_kernels.train import cli, loop, parallel
from symile_kernels.train.loop import RunConfig

from test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one torch thread)

# The trainer's own CI configuration (tests/test_train.py: SMALL), at p_hat = 1.
SMALL = ["--train-n", "2000", "--epochs", "2", "--test-n", "2000", "--batch-size", "100"]
SMALL_CONFIG = dict(train_n=2000, epochs=2, test_n=2000, batch_size=100)
# The trainer is under test here, not the kernels (the backends' distributed
# correctness is tests/test_distributed.py's): "auto", what users run.
BACKEND = "auto"
DEADLINE_S = 180  # about 20 s on 2 busy cores; a hung collective must not hang CI
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv, deadline_s: float = DEADLINE_S) -> subprocess.CompletedProcess:
    """Runs ``torchrun --nproc_per_node=nproc -m symile_kernels.train argv``; kills
    the launcher and its workers (one process group) and fails at the deadline."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "symile_kernels.train", *argv]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill the whole tree, workers first.
        for pid in reversed(_process_tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {deadline_s} s (hung collective?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _process_tree(root: int) -> list:
    """``root`` and its descendants, parents before children (from /proc, Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, ()))
    return tree


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """xor at p_hat = 1, Symile and CLIP, 2 gloo processes: (out dir, results.json, stdout, stderr)."""
    out = tmp_path_factory.mktemp("torchrun")
    done = _torchrun(2, ["--p-hat", "1", "--loss", "symile", "clip", *SMALL, "--backend", BACKEND,
                         "--out", str(out)])
    assert done.returncode == 0, done.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text()), done.stdout, done.stderr


def _run(results, loss):
    [run] = [r for r in results["runs"] if r["loss"] == loss]
    return run


def test_two_processes_reproduce_the_accuracy_claims(two_process_run):
    _, results, _, _ = two_process_run
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        # results.json records the backend "auto" resolved to
        assert run["world_size"] == 2 and run["config"]["batch_size"] == 100
        assert run["backend"] in symile_kernels.available_backends("cpu")
        assert run["chance_accuracy"] == 0.25
    assert _run(results, "symile")["test_accuracy"] >= 0.95
    assert _run(results, "clip")["test_accuracy"] <= 0.45


def test_batch_size_is_the_global_batch(two_process_run):
    """The two-process run optimises the single-process objective: same global
    batches of 100, same seeds, so the loss and the learned temperature agree up
    to the order of floating-point sums (a per-process batch of 100 would give a
    global batch of 200, whose loss is about log 2 higher)."""
    _, results, _, _ = two_process_run
    distributed = _run(results, "symile")
    single, _ = loop.train_run(RunConfig(loss="symile", p_hat=1.0, backend=BACKEND, **SMALL_CONFIG))
    assert single["world_size"] == 1
    assert distributed["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-3)
    assert distributed["logit_scale"] == pytest.approx(single["logit_scale"], rel=1e-2)
    assert abs(distributed["test_accuracy"] - single["test_accuracy"]) <= 0.02


def test_rank_zero_alone_reports_and_writes(two_process_run):
    out, results, stdout, stderr = two_process_run
    assert stdout.count("results: ") == 1 and stdout.count("| xor  | symile") == 1
    # The per-run line of the progress display, printed once per run.
    assert stderr.count("[1/2] xor-symile-n_squared-p_hat1-q0-seed0: test accuracy") == 1, stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "xor-clip-p_hat1-q0-seed0.pt", "xor-symile-n_squared-p_hat1-q0-seed0.pt"]
    assert results["command"][0] == "symile-train"
    # A checkpoint of the DDP run holds the plain Encoders and evaluates to the same accuracy.
    entry, _ = loop.evaluate_checkpoint(_run(results, "symile")["checkpoint"])
    assert entry["test_accuracy"] == _run(results, "symile")["test_accuracy"] and entry["world_size"] == 2


def _fake_torchrun(monkeypatch, rank: int, world_size: int) -> None:
    # The variables alone, no process group: the command line must stop before joining one.
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))


def test_global_batch_not_divisible_by_processes_is_rejected(monkeypatch, tmp_path, capsys):
    _fake_torchrun(monkeypatch, 0, 2)
    with pytest.raises(SystemExit) as exc:
        cli.main([*SMALL[:-2], "--batch-size", "101", "--out", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size: the global batch must be a multiple of the number of processes (2); got 101" in err
    assert not torch.distributed.is_initialized()


def test_eval_only_runs_on_rank_zero_alone(monkeypatch, tmp_path):
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"")  # never opened on rank 1
    _fake_torchrun(monkeypatch, 1, 2)
    assert cli.main(["--eval-only", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_context_from_the_environment(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not parallel.launched()
    assert parallel.environment() == parallel.Context() and parallel.current().world_size == 1
    _fake_torchrun(monkeypatch, 1, 3)
    assert parallel.launched()
    context = parallel.environment()
    assert (context.rank, context.world_size, context.local_rank) == (1, 3, 1)
    assert context.distributed and not context.is_main
