"""The reference trainer: it reproduces the Symile paper's synthetic
effect, is deterministic, round-trips checkpoints and rejects bad arguments.

Every run here is small (a few dozen optimisation steps on the CPU) and runs
in-process; the module's sweep fixture trains the four xor runs once.
"""
from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch

from symile_kernels.train import cli, data, loop, report
from symile_kernels.train.loop import RunConfig

# Small enough for CI, large enough to converge (d_v = 2: chance is 0.25).
SMALL = ["--train-n", "2000", "--epochs", "2", "--test-n", "2000", "--batch-size", "100"]
SMALL_CONFIG = dict(train_n=2000, epochs=2, test_n=2000, batch_size=100)
# m3-synthetic at a size that trains in seconds; "n" sampling keeps it cheap at d = 64.
M3_SMALL = dict(task="m3-synthetic", w=4, classes=100, class_dim=16, d=64, lr=0.05, batch_size=128,
                train_n=4000, epochs=3, test_n=2000, logit_scale_init=0.0, negative_sampling="n")
RUN_KEYS = {"task", "loss", "negative_sampling", "backend", "missing_prob", "seed", "test_accuracy",
            "chance_accuracy", "train_seconds"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The matrices are tiny: one thread is as fast and does not fight the other suites for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The xor sweep p_hat in {0, 1} x {symile, clip} through the CLI: (out dir, results.json)."""
    out = tmp_path_factory.mktemp("sweep")
    assert cli.main(["--p-hat", "0", "1", "--loss", "symile", "clip", *SMALL, "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _run(results, loss, p_hat):
    [run] = [r for r in results["runs"] if r["loss"] == loss and r["p_hat"] == p_hat]
    return run


def test_symile_solves_xor_and_clip_cannot(sweep):
    _, results = sweep
    assert _run(results, "symile", 1.0)["test_accuracy"] >= 0.95
    assert _run(results, "clip", 1.0)["test_accuracy"] <= 0.45


@pytest.mark.parametrize("loss", ["symile", "clip"])
def test_nobody_beats_chance_at_p_zero(sweep, loss):
    _, results = sweep
    run = _run(results, loss, 0.0)
    assert run["chance_accuracy"] == 0.25
    assert abs(run["test_accuracy"] - 0.25) <= 0.1


def test_results_schema(sweep):
    out, results = sweep
    assert isinstance(results["runs"], list) and len(results["runs"]) == 4
    assert [(r["p_hat"], r["loss"]) for r in results["runs"]] == [
        (0.0, "symile"), (0.0, "clip"), (1.0, "symile"), (1.0, "clip")]
    for run in results["runs"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert run["task"] == "xor" and run["seed"] == 0 and run["missing_prob"] == 0.0
        assert run["negative_sampling"] == ("n_squared" if run["loss"] == "symile" else None)
        assert run["backend"] in torch_backends()
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["train_seconds"] > 0
        assert math.isfinite(run["final_train_loss"]) and run["logit_scale"] > 0
        assert (out / "checkpoints").is_dir() and run["checkpoint"].endswith(".pt")
    # The file is plain JSON with its metadata.
    assert results["schema_version"] == 1 and results["command"][0] == "symile-train"


def torch_backends():
    import symile_kernels
    return symile_kernels.available_backends()


def test_plot_written_when_matplotlib_is_installed(sweep):
    out, _ = sweep
    png = out / "accuracy.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(sweep, tmp_path, monkeypatch):
    _, results = sweep
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert report.plot_accuracy(results["runs"], str(tmp_path / "accuracy.png")) is False
    assert not (tmp_path / "accuracy.png").exists()


def test_summary_table_lists_every_run(sweep):
    _, results = sweep
    table = report.format_table(results["runs"]).splitlines()
    assert table[0].startswith("| task") and "test accuracy" in table[0]
    assert len(table) == 2 + 4
    assert f"{_run(results, 'symile', 1.0)['test_accuracy']:.4f}" in table[4]


def test_same_seed_same_numbers(sweep):
    """Retraining a sweep run from its stored config gives bit-identical weights and numbers."""
    _, results = sweep
    run = _run(results, "symile", 1.0)
    config = RunConfig.from_dict(run["config"])
    entry, model = loop.train_run(config)
    assert entry["test_accuracy"] == run["test_accuracy"]
    assert entry["final_train_loss"] == run["final_train_loss"]
    assert entry["logit_scale"] == run["logit_scale"]
    saved = torch.load(run["checkpoint"], weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_different_seed_different_data():
    a = loop.make_split(RunConfig(seed=0, test_n=64), "test")
    b = loop.make_split(RunConfig(seed=1, test_n=64), "test")
    assert not torch.equal(a.inputs["a"], b.inputs["a"])
    # The test split does not depend on the training set size.
    c = loop.make_split(RunConfig(seed=0, test_n=64, train_n=500), "test")
    assert torch.equal(a.inputs["b"], c.inputs["b"])


def test_eval_only_reproduces_checkpoint_accuracy(sweep, tmp_path, capsys):
    _, results = sweep
    runs = [_run(results, "symile", 1.0), _run(results, "clip", 1.0)]
    argv = ["--eval-only", "--checkpoint", *(r["checkpoint"] for r in runs), "--out", str(tmp_path), "--quiet"]
    assert cli.main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())["runs"]
    for before, after in zip(runs, again):
        assert after["eval_only"] is True
        assert after["test_accuracy"] == before["test_accuracy"]
        assert after["train_seconds"] == before["train_seconds"]
        assert after["loss"] == before["loss"] and after["p_hat"] == before["p_hat"]
    printed = capsys.readouterr().out
    assert f"{runs[0]['test_accuracy']:.4f}" in printed


def test_xor_data_follow_the_generating_process():
    gen = data.generator(0, "train")
    split = data.xor_split(4000, 3, 1.0, gen)
    a, b, c = (split.inputs[m].long() for m in "abc")
    assert torch.equal(c, a ^ b)
    assert torch.equal(split.candidates[split.labels], split.inputs["b"])
    split = data.xor_split(4000, 3, 0.0, gen)
    assert torch.equal(split.inputs["c"], split.inputs["a"])
    split = data.xor_split(20000, 2, 0.5, gen)
    xor_rows = (split.inputs["c"].long() == (split.inputs["a"].long() ^ split.inputs["b"].long())).all(1)
    same_rows = (split.inputs["c"] == split.inputs["a"]).all(1)
    # P(c = a XOR b) = p + (1 - p) P(b = 0) = 0.5 + 0.5 / 4.
    assert abs(xor_rows.float().mean().item() - 0.625) < 0.02
    assert (xor_rows | same_rows).all()


def test_m3_data_follow_the_generating_process():
    table = data.class_vectors(50, 8, seed=0)
    split = data.m3_split(300, 3, 0.0, table, data.generator(0, "test"))
    lang = split.inputs["text"].argmax(1)
    slots = split.inputs["audio"].view(300, 3, 8)
    assert torch.allclose(split.inputs["image"], table[split.labels])
    assert torch.allclose(slots[torch.arange(300), lang], split.inputs["image"])
    assert torch.equal(split.candidates, table)


def test_missing_modalities_hide_with_fill_and_indicator():
    split = data.xor_split(5000, 2, 1.0, data.generator(3, "train"))
    hidden = data.hide(split, 0.3, data.generator(3, "train-missing"))
    for m in "abc":
        flags = hidden.missing[m].bool()
        assert abs(flags.float().mean().item() - 0.3) < 0.03
        assert (hidden.inputs[m][flags] == 0.5).all()
        assert torch.equal(hidden.inputs[m][~flags], split.inputs[m][~flags])
    assert torch.equal(split.missing["a"], torch.zeros(5000))  # the input split is not modified


def test_missing_modalities_symile_still_beats_clip(tmp_path):
    entries = {loss: loop.train_run(RunConfig(loss=loss, p_hat=1.0, missing_prob=0.3, seed=1, **SMALL_CONFIG))
               for loss in ("symile", "clip")}
    symile, clip = entries["symile"][0], entries["clip"][0]
    assert symile["missing_prob"] == 0.3
    assert symile["test_accuracy"] >= 0.9
    assert clip["test_accuracy"] <= 0.45
    assert symile["test_accuracy"] > clip["test_accuracy"] + 0.4

    # Evaluation with hidden queries: a sample keeps its answer only when both a
    # and c are visible (probability 0.5^2 here); otherwise b is a coin flip.
    path = tmp_path / "symile.pt"
    config = RunConfig.from_dict(symile["config"])
    loop.save_checkpoint(path, entries["symile"][1], config, symile)
    hidden, _ = loop.evaluate_checkpoint(str(path), eval_missing_prob=0.5)
    assert hidden["eval_missing_prob"] == 0.5
    expected = 0.25 * symile["test_accuracy"] + 0.75 * 0.25
    assert abs(hidden["test_accuracy"] - expected) < 0.08


def test_m3_synthetic_symile_beats_pairwise_bound(tmp_path):
    symile, _ = loop.train_run(RunConfig(loss="symile", **M3_SMALL))
    clip, _ = loop.train_run(RunConfig(loss="clip", **M3_SMALL))
    bound = 1 / M3_SMALL["w"]
    assert symile["w"] == 4 and symile["chance_accuracy"] == 1 / M3_SMALL["classes"]
    assert clip["test_accuracy"] <= bound + 0.1
    assert symile["test_accuracy"] >= bound + 0.2


def test_m3_synthetic_through_the_cli(tmp_path, capsys):
    argv = ["--task", "m3-synthetic", "--w", "2", "--classes", "20", "--class-dim", "8", "--d", "16",
            "--train-n", "512", "--test-n", "200", "--epochs", "1", "--loss", "symile", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    [run] = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["task"] == "m3-synthetic" and run["w"] == 2 and run["chance_accuracy"] == 1 / 20
    assert "p_hat" not in run and RUN_KEYS <= set(run)
    out = capsys.readouterr()
    assert "| m3-synthetic" in out.out
    assert "test accuracy" in out.err  # the per-run line: progress is on without --quiet


@pytest.mark.parametrize("argv, option", [
    (["--task", "nope"], "--task"),
    (["--p-hat", "1.5"], "--p-hat"),
    (["--p-hat", "-0.1"], "--p-hat"),
    (["--p-hat", "nan"], "--p-hat"),
    (["--missing-prob", "1"], "--missing-prob"),
    (["--missing-prob", "-0.2"], "--missing-prob"),
    (["--eval-missing-prob", "1"], "--eval-missing-prob"),
    (["--batch-size", "1"], "--batch-size"),
    (["--loss", "triplet"], "--loss"),
    (["--negative-sampling", "all"], "--negative-sampling"),
    (["--backend", "nope"], "--backend"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--d-v", "0"], "--d-v"),
    (["--task", "m3-synthetic", "--w", "1"], "--w"),
    (["--train-n", "10", "--batch-size", "100"], "--train-n"),
    (["--device", "not-a-device"], "--device"),
    (["--threads", "-1"], "--threads"),
    (["--eval-only"], "--eval-only"),
    (["--checkpoint", "x.pt"], "--checkpoint"),
    (["--eval-only", "--checkpoint", "/nonexistent/run.pt"], "--checkpoint"),
])
def test_bad_arguments_exit_with_a_clear_error(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err


def test_bad_config_raises_config_error_naming_the_field():
    with pytest.raises(loop.ConfigError, match="p_hat must be in") as exc:
        RunConfig(p_hat=2.0).validate()
    assert exc.value.field == "p_hat"
    with pytest.raises(ValueError, match="batch_size"):
        loop.train_run(RunConfig(batch_size=1))


def test_not_a_checkpoint_is_rejected(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit):
        cli.main(["--eval-only", "--checkpoint", str(path), "--out", str(tmp_path)])
    assert "not a symile_kernels.train checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other weights"])
def test_damaged_checkpoint_gives_one_line_and_writes_nothing(sweep, damage, tmp_path, capsys):
    _, results = sweep
    good = _run(results, "symile", 1.0)["checkpoint"]
    path = tmp_path / "bad.pt"
    if damage == "other weights":
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["model"] = {"encoders.z.weight": torch.zeros(2, 2)}
        torch.save(checkpoint, path)
        expected = f"checkpoint '{path}': its weights do not fit the model its config describes"
    else:
        blob = open(good, "rb").read()
        path.write_bytes({"truncated": blob[:len(blob) // 2], "garbage": b"not a checkpoint\n" * 20,
                          "empty": b""}[damage])
        expected = f"checkpoint '{path}' cannot be read: it is truncated, corrupt or not a torch file"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--eval-only", "--checkpoint", good, str(path), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # argparse's usage, then one line: the error.
    assert err.strip().splitlines()[-1].startswith(f"{cli.build_parser().prog}: error: argument --checkpoint: "
                                                   f"{expected}"), err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert not out.exists()  # the good checkpoint was evaluated, but nothing is written


def test_default_out_is_documented_and_its_path_printed(sweep, tmp_path, capsys, monkeypatch):
    """Without --out, --eval-only writes ./symile-train-out, says so in --help and prints the path."""
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "relative to the current directory" in help_text and "(default: symile-train-out)" in help_text
    _, results = sweep
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--eval-only", "--checkpoint", _run(results, "clip", 1.0)["checkpoint"], "--quiet"]) == 0
    written = tmp_path / "symile-train-out" / "results.json"
    assert f"results: {written}" in capsys.readouterr().out.splitlines()
    assert json.loads(written.read_text())["runs"][0]["loss"] == "clip"


def test_progress_quiet_and_plain_fallback(monkeypatch):
    stream = io.StringIO()
    quiet = report.Progress(3, "run", quiet=True, stream=stream)
    for _ in range(3):
        quiet.update(torch.tensor(1.0))
    quiet.close()
    assert stream.getvalue() == ""

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # no tqdm: the plain display
    plain = report.Progress(3, "run", stream=stream)
    for value in (3.0, 2.0, 1.0):
        plain.update(torch.tensor(value))
    plain.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run: step 1/3 loss 3.0000"
    assert lines[-1].startswith("run: step 3/3 loss ")


def test_train_step_is_a_plain_step_on_a_batch():
    """One call = one optimizer step through model.forward (what DDP needs)."""
    config = RunConfig(train_n=200, test_n=10)
    torch.manual_seed(0)
    model = loop.make_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    split = loop.make_split(config, "train")
    before = [p.detach().clone() for p in model.parameters()]
    index = next(loop.batch_indices(len(split), 100, data.generator(0, "train")))
    loss = loop.train_step(model, optimizer, split.batch(index), loop.make_loss_fn(config))
    assert loss.dim() == 0 and not loss.requires_grad and math.isfinite(loss.item())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_batch_indices_shard_every_global_batch():
    gen_args = (1000, 100)
    shards = [list(loop.batch_indices(*gen_args, data.generator(0, "train"), rank=r, world_size=4))
              for r in range(4)]
    full = list(loop.batch_indices(*gen_args, data.generator(0, "train")))
    assert len(full) == 10 and all(len(s) == 10 for s in shards)
    for step in range(10):
        assert torch.equal(torch.cat([s[step] for s in shards]), full[step])
