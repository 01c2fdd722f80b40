"""Writes a synthetic task as a features file, a ready input for ``--task features``.

    python -m symile_kernels.train.make_features --task m3-synthetic --out runs/m3.npz

The file holds the task's modalities as float32 arrays (m3-synthetic: audio,
text, image; xor: a, b, c), one row per sample: first the task's training
samples, then its test samples, exactly those ``symile-train --task
m3-synthetic`` draws for the same settings and seed. Two more keys:

- ``split``: the split label of each row ("train" / "test"; the integers 0 /
  2 in .safetensors and .pt files);
- ``candidates``: the task's candidates for the target modality (the clean
  class vectors; all bit vectors for xor). A test row's target is written as
  its candidate (the label is all the evaluation uses of it), so retrieving
  it among ``candidates`` is the task's own zero-shot test.

Training with ``--task features --split-key split --candidates-key candidates
--target image`` (and the same model settings) then repeats the synthetic
run: same rows, same batches, same initialisation. ``--nan-prob Q`` writes
rows as all NaN (missing) with probability Q: every modality of a training
row, the query modalities of a test row.

``.npz`` is written uncompressed (the trainer reads each member into memory
when first used); ``.pt`` needs nothing more and stays memory-mapped;
``.safetensors`` needs the optional ``safetensors`` package to write and to
read, and is read lazily.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Dict, List, Optional

import numpy as np

from . import data, loop
from .loop import RunConfig

FORMATS = (".npz", ".safetensors", ".pt")


def task_arrays(config: RunConfig, nan_prob: float = 0.0) -> Dict[str, np.ndarray]:
    """The train and test splits of a synthetic ``config`` as features arrays:
    modality -> (train_n + test_n, F_m) float32, plus ``split`` (int64 0 =
    train, 2 = test) and ``candidates`` (K, F_target)."""
    train, test = loop.make_split(config, "train"), loop.make_split(config, "test")
    out = {}
    for m in train.inputs:
        test_rows = test.candidates[test.labels] if m == test.target else test.inputs[m]
        rows = np.concatenate([train.inputs[m].numpy(), test_rows.numpy()]).astype(np.float32)
        if nan_prob > 0:
            hidden = np.concatenate([
                data.draw_hidden(len(train), nan_prob, data.generator(config.seed, "train-missing")).numpy(),
                data.draw_hidden(len(test), nan_prob if m != test.target else 0.0,
                                 data.generator(config.seed, "test-missing")).numpy()])
            rows[hidden] = np.nan
        out[m] = rows
    out["split"] = np.concatenate([np.zeros(len(train), np.int64), np.full(len(test), 2, np.int64)])
    out["candidates"] = test.candidates.numpy().astype(np.float32)
    return out


def write(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` in the format its suffix names."""
    if path.endswith(".npz"):
        named = dict(arrays)
        named["split"] = np.where(arrays["split"] == 0, "train", "test")
        np.savez(path, **named)
    elif path.endswith(".pt"):
        import torch
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    default = RunConfig()
    p = argparse.ArgumentParser(prog=prog, description="Write a synthetic task as a features file for "
                                "'symile-train --task features'.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("m3-synthetic", "xor"), default="m3-synthetic")
    p.add_argument("--out", required=True, metavar="FILE", help="output file: " + ", ".join(FORMATS))
    p.add_argument("--w", type=int, default=default.w, help="m3-synthetic: number of languages")
    p.add_argument("--classes", type=int, default=default.classes, help="m3-synthetic: number of classes")
    p.add_argument("--class-dim", type=int, default=default.class_dim, help="m3-synthetic: class vector size")
    p.add_argument("--noise", type=float, default=default.noise, help="m3-synthetic: noise std")
    p.add_argument("--p-hat", type=float, default=default.p_hat, help="xor: probability that c = a XOR b")
    p.add_argument("--d-v", type=int, default=default.d_v, help="xor: bits per vector")
    p.add_argument("--train-n", type=int, default=None, help="training rows [the trainer's task default]")
    p.add_argument("--test-n", type=int, default=default.test_n, help="test rows")
    p.add_argument("--seed", type=int, default=default.seed, help="seed of the task's data")
    p.add_argument("--nan-prob", type=float, default=0.0, metavar="Q",
                   help="write rows as all-NaN (missing) with probability Q (test: query modalities only)")
    return p


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    from .cli import TASK_DEFAULTS
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.out.endswith(FORMATS):
        parser.error(f"argument --out: must end with one of {', '.join(FORMATS)}; got {args.out!r}")
    if not 0 <= args.nan_prob < 1:
        parser.error(f"argument --nan-prob: must be in [0, 1); got {args.nan_prob}")
    if args.out.endswith(".safetensors"):
        try:
            import safetensors  # noqa: F401
        except ImportError:
            parser.error("argument --out: writing .safetensors needs the optional package safetensors "
                         "(pip install safetensors); or write .npz")
    settings = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    settings["train_n"] = args.train_n or TASK_DEFAULTS[args.task].get("train_n", RunConfig.train_n)
    config = RunConfig(batch_size=2, **settings)
    try:
        config.validate()
    except loop.ConfigError as exc:
        parser.error(f"argument --{exc.field.replace('_', '-')}: {exc.reason}")
    arrays = task_arrays(config, args.nan_prob)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write(args.out, arrays)
    target = "image" if args.task == "m3-synthetic" else "b"
    modalities = [k for k in arrays if k not in ("split", "candidates")]
    print(f"wrote {args.out}: {', '.join(f'{k} {arrays[k].shape}' for k in arrays)}")
    print(f"train on it: python -m symile_kernels.train --task features --features {args.out} "
          f"--modalities {' '.join(modalities)} --target {target} --split-key split --candidates-key candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m symile_kernels.train.make_features"))
