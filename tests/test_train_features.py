"""Task ``features`` of the trainer: the user's own embeddings in
.npz / .safetensors / .pt / .npy files, seeded or labelled splits, missing
rows, retrieval metrics, bad input, and the m3-synthetic example file.

Everything is small: a few hundred rows and a handful of optimisation steps,
except the reproduction check (a few seconds per run).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from symile_kernels.train import cli, data, features, loop, make_features, retrieval
from symile_kernels.train.feature_files import FeatureError, open_arrays
from symile_kernels.train.loop import RunConfig
from test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one torch thread)

SIZES = {"a": 5, "b": 3, "c": 4}
TINY = ["--batch-size", "16", "--epochs", "1", "--d", "8", "--quiet"]


def arrays(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((n, f)).astype(np.float32) for m, f in SIZES.items()}


def write(path, named, fmt):
    """Writes ``named`` as one ``fmt`` file at ``path`` (a stem); returns the --features argument list."""
    if fmt == "npy":
        out = []
        for key, value in named.items():
            np.save(path.parent / f"{key}.npy", value)
            out.append(str(path.parent / f"{key}.npy"))
        return out
    if fmt == "npz":
        np.savez(f"{path}.npz", **named)
    elif fmt == "npz-compressed":
        np.savez_compressed(f"{path}.npz", **named)
    elif fmt == "pt":
        torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in named.items()}, f"{path}.pt")
        return [f"{path}.pt"]
    elif fmt.startswith("safetensors"):
        save_safetensors(named, f"{path}.safetensors", use_package=fmt == "safetensors")
        return [f"{path}.safetensors"]
    return [f"{path}.npz"]


def save_safetensors(named, path, use_package=True):
    """Writes numpy arrays with the ``safetensors`` package, or, where the
    optional package is missing (CI), by its published layout: a little-endian
    u64 header size, a JSON header of dtype / shape / data_offsets, the data."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        use_package = False
    if use_package:
        return save_file(named, path)
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64"}
    header, blobs, offset = {}, [], 0
    for key, value in named.items():
        blob = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def features_config(paths, **kw):
    settings = dict(task="features", features=[str(p) for p in paths], batch_size=16, epochs=1, d=8, lr=0.05,
                    logit_scale_init=0.0)
    settings.update(kw)
    return RunConfig(**settings).validate()


# ---------------------------------------------------------------- file formats

@pytest.mark.parametrize("fmt", ["npz", "npz-compressed", "safetensors", "safetensors-layout", "pt", "npy"])
def test_every_format_gives_the_same_batches(fmt, tmp_path):
    if fmt.startswith("safetensors"):
        pytest.importorskip("safetensors")  # the optional package reads them
    named = arrays()
    paths = write(tmp_path / "f", named, fmt)
    config = features_config(paths, modalities=["a", "b", "c"])
    split = loop.make_split(config, "train")
    index = torch.tensor([5, 0, 17, 3])
    batch = split.batch(index)
    rows = torch.from_numpy(split.rows[index.numpy()])
    for m in SIZES:
        assert torch.equal(batch["inputs"][m], torch.from_numpy(named[m])[rows]), m
        assert batch["missing"][m].sum() == 0
    # Opening reads no rows: .npy is mapped, .pt tensors sit on mapped storage, .safetensors rows are read
    # when indexed; an .npz member is read whole when first used.
    stored = open_arrays(paths)["a"].data
    assert isinstance(stored, np.memmap) == (fmt == "npy")
    assert (stored is None) == fmt.startswith("npz")
    assert isinstance(stored, torch.Tensor) == (fmt == "pt")


def test_bfloat16_and_float16_features_are_widened(tmp_path):
    values = torch.randn(40, 3)
    paths = write(tmp_path / "f", {"a": values.to(torch.bfloat16), "b": values.half()}, "pt")
    found = open_arrays(paths)
    assert found["a"].dtype_name == "bfloat16"
    assert np.array_equal(found["a"].rows(slice(0, 40)), values.to(torch.bfloat16).float().numpy())
    assert np.array_equal(found["b"].rows(np.arange(40)), values.half().float().numpy())


def test_bfloat16_safetensors_written_by_the_package_are_widened(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    values = torch.randn(40, 3)
    st.save_file({"a": values.to(torch.bfloat16).contiguous()}, str(tmp_path / "g.safetensors"))
    mapped = open_arrays([str(tmp_path / "g.safetensors")])["a"]
    assert np.array_equal(mapped.rows(np.array([3, 1])), values.to(torch.bfloat16).float().numpy()[[3, 1]])


def test_train_and_results_through_the_cli(tmp_path, capsys):
    paths = write(tmp_path / "f", arrays(200), "npz")
    out = tmp_path / "out"
    assert cli.main(["--task", "features", "--features", *paths, "--target", "b", "--val-fraction", "0.2",
                     *TINY, "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["loss"] for r in runs] == ["symile", "clip"]
    for run in runs:
        assert run["task"] == "features" and run["target"] == "b" and run["modalities"] == ["a", "b", "c"]
        assert (run["train_rows"], run["val_rows"], run["test_rows"]) == (120, 40, 40)
        # Random features: every target row is distinct, so there are 40 candidates.
        assert run["test_candidates"] == 40 and run["chance_accuracy"] == 1 / 40
        assert run["test_accuracy"] == run["test_top1"] <= run["test_top5"] <= run["test_top10"] <= 1
        assert 0 < run["test_mrr"] <= 1 and run["val_queries"] == 40
        assert run["checkpoint"].endswith(".pt")
    table = capsys.readouterr().out
    assert "| features | symile" in table and "MRR" in table and f"{runs[0]['test_mrr']:.4f}" in table

    # --eval-only evaluates the checkpoints again with the same numbers.
    again = tmp_path / "again"
    assert cli.main(["--eval-only", "--checkpoint", runs[0]["checkpoint"], "--out", str(again), "--quiet"]) == 0
    [rerun] = json.loads((again / "results.json").read_text())["runs"]
    for key in ("test_top1", "test_top5", "test_top10", "test_mrr", "val_mrr"):
        assert rerun[key] == runs[0][key], key

    # Without its features file a checkpoint cannot be evaluated, and the error says why.
    (tmp_path / "f.npz").unlink()
    with pytest.raises(SystemExit):
        cli.main(["--eval-only", "--checkpoint", runs[0]["checkpoint"], "--out", str(tmp_path / "gone")])
    assert "was trained on features that cannot be read now: no such file" in capsys.readouterr().err


def test_prog_follows_how_the_trainer_was_invoked():
    out = subprocess.run([sys.executable, "-m", "symile_kernels.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith("usage: python -m symile_kernels.train"), out.stdout[:80]
    assert "--features" in out.stdout
    assert cli.build_parser("symile-train").format_usage().startswith("usage: symile-train")


# ---------------------------------------------------------------- splits

def test_seeded_splits_partition_the_rows(tmp_path):
    paths = write(tmp_path / "f", arrays(100), "npz")
    rows = features.prepare(features.FeatureSpec(tuple(paths), val_fraction=0.1, test_fraction=0.25)).rows
    assert [len(rows[s]) for s in ("train", "val", "test")] == [65, 10, 25]
    assert np.array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(100))
    same = features.prepare(features.FeatureSpec(tuple(paths), val_fraction=0.1, test_fraction=0.25, seed=0)).rows
    other = features.prepare(features.FeatureSpec(tuple(paths), val_fraction=0.1, test_fraction=0.25, seed=1)).rows
    assert np.array_equal(same["test"], rows["test"]) and not np.array_equal(other["test"], rows["test"])
    default = features.prepare(features.FeatureSpec(tuple(paths))).rows
    assert (len(default["train"]), len(default["val"]), len(default["test"])) == (80, 0, 20)


@pytest.mark.parametrize("labels", [
    np.array(["train"] * 6 + ["validation"] * 2 + ["test"] * 4),
    np.array(["TRAIN"] * 6 + ["val"] * 2 + [" test"] * 4),
    np.array([0] * 6 + [1] * 2 + [2] * 4),
])
def test_split_key_labels(labels, tmp_path):
    named = arrays(12)
    named["split"] = labels[::-1].copy()
    paths = write(tmp_path / "f", named, "npz")
    rows = features.prepare(features.FeatureSpec(tuple(paths), split_key="split")).rows
    assert rows["test"].tolist() == [0, 1, 2, 3]
    assert rows["val"].tolist() == [4, 5] and rows["train"].tolist() == list(range(6, 12))


def test_split_key_as_a_list_of_names_in_a_pt_file(tmp_path):
    named = dict(arrays(12))
    named["split"] = ["train"] * 8 + ["test"] * 4
    paths = write(tmp_path / "f", named, "pt")
    rows = features.prepare(features.FeatureSpec(tuple(paths), split_key="split")).rows
    assert rows["test"].tolist() == [8, 9, 10, 11] and len(rows["val"]) == 0


# ---------------------------------------------------------------- missing rows

def test_all_nan_rows_are_missing_with_the_training_mean_as_fill(tmp_path):
    named = arrays(40)
    named["b"][[1, 7, 30]] = np.nan
    named["split"] = np.array(["train"] * 30 + ["test"] * 10)
    paths = write(tmp_path / "f", named, "npz")
    config = features_config(paths, split_key="split", target="a")
    prepared = features.prepare(features.FeatureSpec.of(config))
    train_rows = [r for r in range(30) if r not in (1, 7)]
    assert np.allclose(prepared.fill["b"], named["b"][train_rows].mean(axis=0), atol=1e-6)
    assert prepared.missing["b"].nonzero()[0].tolist() == [1, 7, 30]
    batch = loop.make_split(config, "train").batch(torch.tensor([7, 0, 1]))
    assert batch["missing"]["b"].tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(batch["inputs"]["b"][0], torch.from_numpy(prepared.fill["b"]))
    assert torch.equal(batch["inputs"]["b"][1], torch.from_numpy(named["b"][0]))
    # The test set keeps its missing query (row 30 is test row 0) and is evaluated.
    test = loop.make_split(config, "test")
    assert test.missing["b"].tolist() == [1.0] + [0.0] * 9
    assert not torch.isnan(test.batch(torch.arange(10))["inputs"]["b"]).any()


def test_missing_targets_are_not_evaluated_and_missing_queries_are(tmp_path):
    named = arrays(160)
    named["split"] = np.array(["train"] * 120 + ["test"] * 40)
    named["a"][[120, 121]] = np.nan   # target missing: not evaluated
    named["c"][[122, 123, 124]] = np.nan  # a query missing: evaluated with the fill
    paths = write(tmp_path / "f", named, "npz")
    config = features_config(paths, split_key="split", missing_prob=0.2)
    entry, _ = loop.train_run(config)
    assert entry["test_queries"] == 38 and entry["test_candidates"] == 38
    assert entry["missing_prob"] == 0.2
    # --missing-prob hides training rows with the same stream as the synthetic tasks.
    train = loop.make_split(config, "train")
    gen = data.generator(0, "train-missing")
    for m in ("a", "b", "c"):  # one draw per modality, in order
        assert torch.equal(train.missing[m].bool(), data.draw_hidden(120, 0.2, gen)), m


def test_eval_missing_prob_hides_test_queries_only(tmp_path):
    paths = write(tmp_path / "f", arrays(100), "npz")
    config = features_config(paths, eval_missing_prob=0.5, target="c")
    test = loop.make_split(config, "test")
    assert test.missing["c"].sum() == 0
    assert 0 < test.missing["a"].sum() < len(test) and 0 < test.missing["b"].sum() < len(test)


# ---------------------------------------------------------------- metrics

def test_ranks_and_metrics_on_a_hand_computed_example():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    queries = [torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[3.0, 1.0], [0.0, 1.0]])]
    labels = torch.tensor([0, 1])
    # Symile: q1 * q2 = [3, 2] and [0, 1]. Row 0 scores (3, 2, 5, -3): candidate 0 is second.
    # Row 1 scores (0, 1, 1, 0): candidate 1 ties with 2, and a tie counts against the item.
    # CLIP: q1 + q2 = [4, 3] and [1, 2]. Row 0 scores (4, 3, 7, -4); row 1 (1, 2, 3, -1).
    for budget in (1, 3, 8, 1 << 20):
        assert retrieval.ranks(candidates, queries, labels, "symile", budget).tolist() == [2, 2]
        assert retrieval.ranks(candidates, queries, labels, "clip", budget).tolist() == [2, 2]
    assert retrieval.metrics(torch.tensor([2, 1])) == {"top1": 0.5, "top5": 1.0, "top10": 1.0, "mrr": 0.75,
                                                        "queries": 2}
    found = retrieval.metrics(torch.tensor([1, 3, 6, 12]), prefix="test_")
    assert found["test_top1"] == 0.25 and found["test_top5"] == 0.5 and found["test_top10"] == 0.75
    assert found["test_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 12) / 4, abs=1e-15)


def test_ranks_never_form_a_block_over_the_budget(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randn(37, 6, generator=gen)
    queries = [torch.randn(23, 6, generator=gen) for _ in range(2)]
    labels = torch.randint(0, 37, (23,), generator=gen)
    full = retrieval.ranks(candidates, queries, labels, "symile")
    seen = []
    original = retrieval.score_matrix

    def spy(c, q, loss):
        out = original(c, q, loss)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(retrieval, "score_matrix", spy)
    for budget in (1, 10, 100):
        seen.clear()
        assert torch.equal(retrieval.ranks(candidates, queries, labels, "symile", budget), full)
        assert max(seen) <= budget
    # Against the dense scores: rank = 1 + the number of other candidates scoring at least as high.
    scores = original(candidates, queries, "symile")
    own = scores[torch.arange(23), labels]
    assert torch.equal(full, (scores >= own[:, None]).sum(1))


def test_distinct_target_rows_are_the_default_candidates(tmp_path):
    named = arrays(60)
    named["b"][40:] = np.tile(named["b"][40:45], (4, 1))  # 20 test rows, 5 distinct targets
    named["split"] = np.array(["train"] * 40 + ["test"] * 20)
    paths = write(tmp_path / "f", named, "npz")
    prepared = features.prepare(features.FeatureSpec(tuple(paths), split_key="split", target="b"))
    targets = prepared.targets("test")
    assert targets.count == 5 and targets.labels.tolist() == [0, 1, 2, 3, 4] * 4
    assert torch.equal(targets.candidates(0, 5), torch.from_numpy(named["b"][40:45]))


# ---------------------------------------------------------------- bad input

BAD = {
    "row counts": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((9, 3), np.float32)}, [],
                   "key 'b' has 9 rows"),
    "1-D": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros(10, np.float32)}, [], "key 'b': must be a 2-D"),
    "3-D": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 2, 2), np.float32)}, [],
            "key 'b': must be a 2-D"),
    "integer": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.int64)}, [],
                "key 'b': must hold floats"),
    "object": ({"a": np.zeros((10, 3), np.float32), "b": np.array([[None] * 3] * 10, dtype=object)}, [],
               "key 'b'"),
    "unknown key": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32)},
                    ["--modalities", "a", "x"], "no key 'x' (--modalities)"),
    "one modality": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32)},
                     ["--modalities", "a"], "at least two modalities"),
    "inf": ({"a": np.zeros((10, 3), np.float32), "b": np.where(np.eye(10, 3) > 0, np.inf, 0).astype(np.float32)},
            [], "key 'b': row 0 holds Inf"),
    "partial nan": ({"a": np.zeros((10, 3), np.float32),
                     "b": np.where(np.eye(10, 3) > 0, np.nan, 0).astype(np.float32)}, [],
                    "key 'b': row 0 is NaN in some columns"),
    "empty split": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32)},
                    ["--test-fraction", "0.01"], "the test split is empty"),
    "empty labelled split": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32),
                              "s": np.array(["train"] * 10)}, ["--split-key", "s"], "the test split is empty"),
    "bad split label": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32),
                         "s": np.array(["train"] * 9 + ["dev"])}, ["--split-key", "s"], "key 's': row 9"),
    "unknown target": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32)},
                       ["--target", "z"], "--target 'z'"),
    "small train split": ({"a": np.zeros((10, 3), np.float32), "b": np.zeros((10, 3), np.float32)},
                          ["--batch-size", "64"], "fewer than the batch size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_and_key_and_writes_nothing(case, tmp_path, capsys):
    named, argv, message = BAD[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **named)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--task", "features", "--features", str(path), "--batch-size", "4", *argv, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "key" in message:
        assert str(path) in err, err
    assert not out.exists()


def test_bad_input_in_one_npy_per_modality_names_the_file(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((10, 3), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((10, 3), np.int32))
    with pytest.raises(SystemExit):
        cli.main(["--task", "features", "--features", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                  "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'b.npy'}': must hold floats" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, option", [
    (["--task", "features"], "--features"),
    (["--features", "x.npz"], "--features"),
    (["--task", "features", "--features", "/nonexistent.npz"], "--features"),
    (["--task", "features", "--features", "x.npz", "--split-key", "s", "--test-fraction", "0.1"],
     "--test-fraction"),
    (["--task", "features", "--features", "x.npz", "--test-fraction", "0.6", "--val-fraction", "0.5"],
     "--test-fraction"),
    (["--task", "features", "--features", "x.npz", "--eval-budget", "0"], "--eval-budget"),
])
def test_bad_feature_options(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file_or_candidates_not_matching(tmp_path):
    named = arrays(30)
    named["cands"] = named["a"][:5].copy()
    paths = write(tmp_path / "f", named, "npz")
    with pytest.raises(FeatureError, match="is not among the candidates"):
        features.check(features_config(paths, modalities=["a", "b"], candidates_key="cands", batch_size=4))


# ---------------------------------------------------------------- the example

M3_TINY = dict(w=4, classes=100, class_dim=16, noise=0.1, train_n=4000, test_n=1000, seed=0)
M3_MODEL = dict(d=64, lr=0.05, batch_size=128, epochs=3, logit_scale_init=0.0, negative_sampling="n")


@pytest.mark.slow
def test_example_file_reproduces_m3_synthetic(tmp_path, capsys):
    """make_features + --task features repeats --task m3-synthetic: same rows,
    batches and initialisation, so the same top-1 accuracy."""
    path = tmp_path / "m3.npz"
    argv = ["--out", str(path)] + [f"--{k.replace('_', '-')}={v}" for k, v in M3_TINY.items()]
    assert make_features.main(argv) == 0
    assert "--split-key split --candidates-key candidates" in capsys.readouterr().out
    found = {}
    for loss in ("symile", "clip"):
        synthetic, _ = loop.train_run(RunConfig(task="m3-synthetic", loss=loss, **M3_TINY, **M3_MODEL))
        entry, _ = loop.train_run(RunConfig(task="features", loss=loss, features=[str(path)], target="image",
                                            modalities=["audio", "text", "image"], split_key="split",
                                            candidates_key="candidates", **M3_MODEL, seed=0))
        assert entry["test_candidates"] == M3_TINY["classes"] and entry["test_queries"] == M3_TINY["test_n"]
        assert entry["test_top1"] == pytest.approx(synthetic["test_accuracy"], abs=2 / M3_TINY["test_n"])
        found[loss] = entry["test_top1"]
    assert found["symile"] >= 1 / M3_TINY["w"] + 0.2
    assert found["clip"] <= 1 / M3_TINY["w"] + 0.1


def test_two_processes_train_on_features_like_one(tmp_path):
    """Under torchrun every process reads the same splits from the file; rank 0 reports."""
    from test_train_distributed import _torchrun
    path = tmp_path / "m3.npz"
    assert make_features.main(["--out", str(path), "--classes", "20", "--class-dim", "8", "--train-n", "1024",
                               "--test-n", "200"]) == 0
    argv = ["--task", "features", "--features", str(path), "--target", "image", "--split-key", "split",
            "--candidates-key", "candidates", "--loss", "symile", "--dim", "16", "--epochs", "1",
            "--batch-size", "64", "--quiet"]
    done = _torchrun(2, [*argv, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-5000:]
    [two] = json.loads((tmp_path / "two" / "results.json").read_text())["runs"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    [one] = json.loads((tmp_path / "one" / "results.json").read_text())["runs"]
    assert two["world_size"] == 2 and two["test_candidates"] == one["test_candidates"] == 20
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
    assert abs(two["test_top1"] - one["test_top1"]) <= 0.02 and abs(two["test_mrr"] - one["test_mrr"]) <= 0.02


def test_a_table_mixing_tasks_lists_every_run():
    from symile_kernels.train import report
    common = dict(loss="symile", negative_sampling="n", missing_prob=0.0, test_accuracy=0.5, chance_accuracy=0.25,
                  train_seconds=1.0)
    runs = [dict(task="xor", p_hat=1.0, **common), dict(task="features", target="img", **common)]
    lines = report.format_table(runs).splitlines()
    assert "setting" in lines[0] and len(lines) == 4
    assert "| 1 " in lines[2] and "target img" in lines[3]
