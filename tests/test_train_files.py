"""Feature files that lie or are damaged, and keys that are awkward names.

Every malformed file gives one FeatureError naming the file (and key) and
the trainer stops before creating --out; any string key works as a modality
name, in training, reports and checkpoints. The files are a few hundred
bytes; the one training run is a handful of steps.
"""
from __future__ import annotations

import io
import json
import re
import struct
import sys
import zipfile

import numpy as np
import pytest
import torch

from symile_kernels.train import cli, model
from symile_kernels.train.feature_files import FeatureError, open_arrays
from test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one torch thread)

ROWS = np.arange(24, dtype=np.float32).reshape(8, 3)


def read_everything(paths):
    """Opens ``paths`` and reads every array's shape and rows, as the trainer's checks do."""
    for array in open_arrays([str(p) for p in paths]).values():
        if len(array.shape) == 2 and array.is_float:
            array.rows(slice(0, array.shape[0]))


def cli_refuses(paths, tmp_path, capsys) -> str:
    """Runs the trainer on ``paths``; asserts it stops with status 2 before --out exists; returns stderr."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--task", "features", "--features", *map(str, paths), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- .safetensors

def safetensors_file(path, header, data=ROWS.tobytes()):
    """A .safetensors file with this header and data, written by the format's published layout: a
    little-endian u64 header length, the JSON header, the data."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def tensor(offsets, shape=(8, 3), dtype="F32"):
    entry = {"dtype": dtype, "data_offsets": offsets}
    if shape is not None:
        entry["shape"] = list(shape)
    return entry


# case -> (header, data). Data is ROWS (96 bytes) unless said otherwise.
SAFETENSORS_LIES = {
    "negative begin offset": ({"a": tensor([-16, 80])}, None),  # 96 bytes long, the first 16 in the header
    "aliased offsets": ({"a": tensor([0, 96]), "b": tensor([0, 96])}, None),
    "list header": ([1, 2], None),
    "entry not a dict": ({"a": 5}, None),
    "no shape": ({"a": tensor([0, 96], shape=None)}, None),
    "string offsets": ({"a": tensor(["0", "96"])}, None),
    "shape overflows int64": ({"a": tensor([0, 0], shape=(2 ** 32, 2 ** 32))}, b""),  # 2^64 wraps to 0
    "negative dimension": ({"a": tensor([0, 96], shape=(-8, -3))}, None),
    "offsets past the data": ({"a": tensor([0, 192])}, None),
    "unknown dtype": ({"a": tensor([0, 96], dtype="F31")}, None),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_LIES))
def test_safetensors_that_lie_are_refused(case, tmp_path, capsys):
    pytest.importorskip("safetensors")
    header, data = SAFETENSORS_LIES[case]
    path = safetensors_file(tmp_path / "bad.safetensors", header, ROWS.tobytes() if data is None else data)
    with pytest.raises(FeatureError, match="not a valid safetensors file") as exc:
        read_everything([path])
    assert str(path) in str(exc.value)
    assert "not a valid safetensors file" in cli_refuses([path], tmp_path, capsys)


def test_safetensors_without_the_package_names_the_install(tmp_path, monkeypatch):
    path = safetensors_file(tmp_path / "f.safetensors", {"a": tensor([0, 96])})
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    with pytest.raises(FeatureError, match=r"needs the safetensors package: pip install safetensors"):
        open_arrays([str(path)])


# ---------------------------------------------------------------- .npz

def npz_member(path, members):
    """A stored .npz written with zipfile itself (so every CRC is right): ``members`` maps
    key -> the member's bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, blob in members.items():
            archive.writestr(key + ".npy", blob)
    return path


def npy_bytes(array, header_shape=None):
    """The .npy bytes of ``array``; with ``header_shape`` the header claims that shape instead."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape if header_shape is None else header_shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + array.tobytes()


def test_npz_bit_flip_fails_the_crc(tmp_path, capsys):
    path = tmp_path / "flip.npz"
    np.savez(path, a=ROWS, b=ROWS + 100)
    blob = bytearray(path.read_bytes())
    at = blob.find(np.float32(105).tobytes())  # a value of b's data
    blob[at] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(FeatureError, match=r"key 'b': damaged zip member \(Bad CRC-32"):
        read_everything([path])
    assert "Bad CRC-32" in cli_refuses([path], tmp_path, capsys)


@pytest.mark.parametrize("claimed, problem", [((9, 3), "truncated"), ((7, 3), "size mismatch")])
def test_npz_header_must_describe_its_member(claimed, problem, tmp_path, capsys):
    path = npz_member(tmp_path / "lie.npz", {"a": npy_bytes(ROWS), "b": npy_bytes(ROWS, header_shape=claimed)})
    with pytest.raises(FeatureError, match=re.escape(f"key 'b': {problem}: its header describes a {claimed} float32")):
        read_everything([path])
    assert problem in cli_refuses([path], tmp_path, capsys)


def test_npz_object_member_is_not_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "objects.npz"
    np.savez(path, a=ROWS, b=np.array([{"x": 1}] * 8, dtype=object))
    import pickle
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(FeatureError, match="key 'b': holds Python objects"):
        read_everything([path])


# ---------------------------------------------------------------- .npy

@pytest.mark.parametrize("cut, problem", [(-5, "truncated"), (12, "size mismatch")])
def test_npy_length_must_match_its_header(cut, problem, tmp_path, capsys):
    good = npy_bytes(ROWS)
    blob = good[:cut] if cut < 0 else good + bytes(cut)
    (tmp_path / "a.npy").write_bytes(npy_bytes(ROWS))
    path = tmp_path / "b.npy"
    path.write_bytes(blob)
    with pytest.raises(FeatureError) as exc:
        read_everything([tmp_path / "a.npy", path])
    message = str(exc.value)
    assert message.startswith(f"'{path}': {problem}: its header describes a (8, 3) float32 array of 96 bytes")
    assert "object" not in message
    assert problem in cli_refuses([tmp_path / "a.npy", path], tmp_path, capsys)


def test_npy_that_is_not_an_array(tmp_path):
    path = tmp_path / "b.npy"
    path.write_bytes(b"hello, world" * 20)
    with pytest.raises(FeatureError, match="not a .npy array"):
        open_arrays([str(path)])


# ---------------------------------------------------------------- .pt

def test_pt_with_a_key_that_is_not_a_string(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"a": torch.zeros(8, 3), 1: torch.zeros(8, 3)}, path)
    with pytest.raises(FeatureError, match="key 1 is a int; feature keys must be strings"):
        open_arrays([str(path)])


# ---------------------------------------------------------------- keys are data

def test_module_names_keep_plain_keys_and_number_the_rest():
    keys = ["a", "0", "keys", "", "a.b", "training", "x/y", "1"]
    names = model.module_names(keys)
    assert names == {"a": "a", "0": "1", "keys": "2", "": "3", "a.b": "4", "training": "5", "x/y": "x/y",
                     "1": "7"}
    assert len(set(names.values())) == len(keys)
    encoders = model.Encoders({k: 2 for k in keys}, d=4)
    assert encoders.encode("a.b", torch.randn(5, 2), torch.zeros(5)).shape == (5, 4)


def test_any_key_is_a_modality_and_a_target(tmp_path):
    rng = np.random.default_rng(0)
    keys = ["x.y", "", "a/b"]
    path = tmp_path / "keys.npz"
    np.savez(path, **{k: rng.standard_normal((60, 3)).astype(np.float32) for k in keys})
    out = tmp_path / "out"
    argv = ["--task", "features", "--features", str(path), "--target", "a/b", "--loss", "symile", "--batch-size",
            "16", "--epochs", "1", "--d", "4", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["modalities"] == keys and run["target"] == "a/b"
    checkpoint = run["checkpoint"]
    assert checkpoint.startswith(str(out / "checkpoints" / "features-symile-n_squared-target-a_b-"))
    again = tmp_path / "again"
    assert cli.main(["--eval-only", "--checkpoint", checkpoint, "--out", str(again), "--quiet"]) == 0
    [rerun] = json.loads((again / "results.json").read_text())["runs"]
    assert rerun["test_mrr"] == run["test_mrr"]
