"""Task ``features``: Symile on the user's own precomputed embeddings.

The input is one 2-D float array per modality, all with the same N rows (row
i of every array describes item i), in the files ``feature_files`` opens.
``prepare`` checks them once, streaming over the rows one chunk at a time
(a mapped file stays on disk; an .npz member is in memory once read, see
``feature_files``):

- shapes, dtypes (float16/32/64 or bfloat16), row counts and the chosen keys;
- a row that is NaN in every column means "this modality is missing for this
  item"; a row with some NaN and some numbers, or an Inf in a non-missing
  row, is an error naming the file, key and row;
- the neutral fill of each modality: the mean of its non-missing training
  rows (the same "neutral fill plus missing flag" as ``--missing-prob``; see
  ``data``).

Splits: ``split_key`` names a 1-D column of labels ("train", "val" or
"validation", "test", or the integers 0, 1, 2), else a permutation seeded by
``seed`` puts ``round(N * test_fraction)`` rows in test, ``round(N *
val_fraction)`` in val and the rest in train. Rows stay on disk: a split is
an int64 array of row numbers, and ``FeatureSplit.batch`` reads its rows.

Zero-shot evaluation retrieves the target modality: its candidates are the
distinct target rows of the split (rows compared bit for bit, by a 128-bit
hash), or the rows of the ``candidates_key`` array; the label of an item is
the candidate equal to its target row. Items whose target is missing are
not evaluated.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import data
from .feature_files import Array, FeatureError, open_arrays

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": 0, "val": 1, "validation": 1, "test": 2}
# Rows are read in chunks of about this many bytes (float32) when scanning a whole array.
CHUNK_BYTES = 64 << 20
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class FeatureSpec:
    """What ``prepare`` needs: the files and how to read them (hashable, for the cache)."""

    paths: Tuple[str, ...]
    modalities: Optional[Tuple[str, ...]] = None
    target: Optional[str] = None
    val_fraction: Optional[float] = None
    test_fraction: Optional[float] = None
    split_key: Optional[str] = None
    candidates_key: Optional[str] = None
    seed: int = 0

    @classmethod
    def of(cls, config) -> "FeatureSpec":
        """The spec of a ``loop.RunConfig`` with ``task="features"``."""
        tup = (lambda v: None if v is None else tuple(v))
        return cls(paths=tuple(config.features or ()), modalities=tup(config.modalities), target=config.target,
                   val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                   split_key=config.split_key, candidates_key=config.candidates_key, seed=config.seed)


@dataclass
class Targets:
    """The retrieval problem of one split: ``labels`` (n,) int64 candidate of
    each item (-1: target missing, not evaluated) and the candidates, rows
    ``rows`` of ``array`` (all rows when ``rows`` is None)."""

    labels: np.ndarray
    array: Array
    rows: Optional[np.ndarray]

    @property
    def count(self) -> int:
        return self.array.shape[0] if self.rows is None else len(self.rows)

    def candidates(self, start: int, stop: int) -> Tensor:
        """(stop - start, F_target) float32 inputs of candidates start..stop-1."""
        index = slice(start, stop) if self.rows is None else self.rows[start:stop]
        return torch.from_numpy(np.ascontiguousarray(self.array.rows(index)))


@dataclass
class FeatureData:
    """Validated feature files (see the module docstring).

    arrays: modality -> Array (N, F_m), in loss order; target / queries: names.
    rows: split -> sorted int64 row numbers. missing: modality -> (N,) bool,
    rows that are all NaN. fill: modality -> (F_m,) float32 neutral fill.
    """

    spec: FeatureSpec
    arrays: Dict[str, Array]
    target: str
    queries: List[str]
    rows: Dict[str, np.ndarray]
    missing: Dict[str, np.ndarray]
    fill: Dict[str, np.ndarray]
    candidates: Optional[Array] = None
    _targets: Dict[str, Targets] = field(default_factory=dict)

    @property
    def modalities(self) -> List[str]:
        return list(self.arrays)

    def input_sizes(self) -> Dict[str, int]:
        return {m: a.shape[1] for m, a in self.arrays.items()}

    def targets(self, which: str) -> Targets:
        """The retrieval labels and candidates of split ``which`` (computed once)."""
        if which not in self._targets:
            self._targets[which] = _targets(self, which)
        return self._targets[which]


class FeatureSplit:
    """One split of a FeatureData, with the trainer's ``Split`` interface
    (``len``, ``batch``, ``target``, ``queries``) and rows left on disk.

    missing: modality -> (n,) float32 0/1 indicator (all-NaN rows, plus any
    hidden by ``hide``); hidden rows are given the modality's fill.
    """

    def __init__(self, features: FeatureData, which: str, missing: Optional[Dict[str, Tensor]] = None):
        self.features, self.which = features, which
        self.rows = features.rows[which]
        self.target, self.queries = features.target, features.queries
        self.missing = missing if missing is not None else {
            m: torch.from_numpy(features.missing[m][self.rows].astype(np.float32)) for m in features.arrays}
        self.fill = {m: torch.from_numpy(v) for m, v in features.fill.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: Tensor) -> Dict[str, Dict[str, Tensor]]:
        """Items ``index`` (positions in the split) as ``{"inputs": {m: (B, F_m)}, "missing": {m: (B,)}}``."""
        rows = self.rows[index.numpy()]
        # Read in file order (sequential on a memory map), then put back in batch order.
        order = np.argsort(rows, kind="stable")
        inputs, missing = {}, {}
        for m, array in self.features.arrays.items():
            block = np.empty((len(rows), array.shape[1]), dtype=np.float32)
            block[order] = array.rows(rows[order])
            flags = self.missing[m][index]
            inputs[m] = torch.where(flags[:, None] > 0, self.fill[m], torch.from_numpy(block))
            missing[m] = flags
        return {"inputs": inputs, "missing": missing}

    def hide(self, q: float, gen: torch.Generator, modalities: Optional[List[str]] = None) -> "FeatureSplit":
        """A copy with each listed modality (default: all) of each item also hidden with probability q."""
        if q <= 0:
            return self
        missing = dict(self.missing)
        for m in (modalities if modalities is not None else list(self.missing)):
            missing[m] = torch.maximum(missing[m], data.draw_hidden(len(self), q, gen).float())
        return FeatureSplit(self.features, self.which, missing)

    def targets(self) -> Targets:
        return self.features.targets(self.which)


def _mtime(path: str) -> Tuple[str, float, int]:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_mtime, stat.st_size


def prepare(spec: FeatureSpec) -> FeatureData:
    """Opens and validates the files of ``spec`` (cached while the files are unchanged).
    Raises FeatureError naming the file and key."""
    for path in spec.paths:
        if not os.path.isfile(path):
            raise FeatureError(f"no such file {path!r}")
    return _prepare(spec, tuple(_mtime(p) for p in spec.paths))


@functools.lru_cache(maxsize=4)
def _prepare(spec: FeatureSpec, stamps) -> FeatureData:
    arrays = open_arrays(spec.paths)
    where = repr(spec.paths[0]) if len(spec.paths) == 1 else "the feature files"
    for name, key in (("split_key", spec.split_key), ("candidates_key", spec.candidates_key)):
        if key is not None and key not in arrays:
            raise FeatureError(f"{where} has no key {key!r} (--{name.replace('_', '-')}); "
                               f"keys: {', '.join(arrays)}", option="--" + name.replace("_", "-"))
    special = {spec.split_key, spec.candidates_key}
    if spec.modalities is not None:
        names = list(spec.modalities)
        unknown = [m for m in names if m not in arrays]
        if unknown:
            raise FeatureError(f"{where} has no key {unknown[0]!r} (--modalities); keys: {', '.join(arrays)}",
                               option="--modalities")
        if len(set(names)) != len(names):
            raise FeatureError(f"--modalities lists a key twice: {names}", option="--modalities")
        if special & set(names):
            raise FeatureError(f"key {sorted(special & set(names), key=str)[0]!r} is the split or candidates "
                               f"key and cannot also be a modality", option="--modalities")
    else:
        names = [k for k in arrays if k not in special]
    if len(names) < 2:
        raise FeatureError(f"{where}: Symile needs at least two modalities; got {len(names)} ({', '.join(names)})",
                           option="--modalities" if spec.modalities is not None else "--features")
    chosen = {m: arrays[m] for m in names}
    n = _check_shapes(chosen)
    target = spec.target if spec.target is not None else names[0]
    if target not in chosen:
        raise FeatureError(f"--target {target!r} is not one of the modalities ({', '.join(names)})",
                           option="--target")
    rows = _splits(spec, arrays, n)
    train = np.zeros(n, dtype=bool)
    train[rows["train"]] = True
    missing, fill = {}, {}
    for m, array in chosen.items():
        missing[m], fill[m] = _scan(array, train)
    candidates = None
    if spec.candidates_key is not None:
        candidates = arrays[spec.candidates_key]
        _check_candidates(candidates, chosen[target])
    return FeatureData(spec=spec, arrays=chosen, target=target, queries=[m for m in names if m != target],
                       rows=rows, missing=missing, fill=fill, candidates=candidates)


def _check_matrix(array: Array) -> None:
    if len(array.shape) != 2:
        hint = "; if it holds split labels, pass --split-key" if len(array.shape) == 1 else ""
        raise FeatureError(f"{array.where}: must be a 2-D (rows, features) array; got shape {array.shape}{hint}")
    if not array.is_float:
        raise FeatureError(f"{array.where}: must hold floats (float16/32/64 or bfloat16); got {array.dtype_name}")
    if array.shape[1] < 1:
        raise FeatureError(f"{array.where}: has no feature columns (shape {array.shape})")


def _check_shapes(arrays: Dict[str, Array]) -> int:
    first = None
    for array in arrays.values():
        _check_matrix(array)
        if first is None:
            first = array
        elif array.shape[0] != first.shape[0]:
            raise FeatureError(f"{array.where} has {array.shape[0]} rows but {first.where} has {first.shape[0]}; "
                               f"every modality needs one row per item")
    if first.shape[0] < 1:
        raise FeatureError(f"{first.where}: has no rows")
    return first.shape[0]


def _chunk_rows(columns: int) -> int:
    return max(1, CHUNK_BYTES // (4 * columns))


def _scan(array: Array, train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One pass over ``array``: (all-NaN rows (N,) bool, mean of the non-missing
    training rows (F,) float32, zeros when there are none). Raises on partial
    NaN rows and on Inf in a non-missing row."""
    n, columns = array.shape
    missing = np.zeros(n, dtype=bool)
    total, count = np.zeros(columns, dtype=np.float64), 0
    step = _chunk_rows(columns)
    for start in range(0, n, step):
        block = array.rows(slice(start, min(start + step, n)))
        nan = np.isnan(block)
        all_nan, any_nan = nan.all(axis=1), nan.any(axis=1)
        partial = np.flatnonzero(any_nan & ~all_nan)
        if partial.size:
            raise FeatureError(f"{array.where}: row {start + partial[0]} is NaN in some columns but not all; "
                               f"a missing modality is a row that is NaN in every column")
        inf = np.flatnonzero(np.isinf(block).any(axis=1) & ~all_nan)
        if inf.size:
            raise FeatureError(f"{array.where}: row {start + inf[0]} holds Inf (or a value beyond float32's range); "
                               f"only missing rows (all NaN) may be non-finite")
        missing[start:start + len(block)] = all_nan
        used = train[start:start + len(block)] & ~all_nan
        total += block[used].sum(axis=0, dtype=np.float64)
        count += int(used.sum())
    fill = (total / count if count else total).astype(np.float32)
    return missing, fill


def _check_candidates(candidates: Array, target: Array) -> None:
    _check_matrix(candidates)
    if candidates.shape[1] != target.shape[1]:
        raise FeatureError(f"{candidates.where}: candidates have {candidates.shape[1]} columns but the target "
                           f"{target.where} has {target.shape[1]}")
    step = _chunk_rows(candidates.shape[1])
    for start in range(0, candidates.shape[0], step):
        bad = np.flatnonzero(~np.isfinite(candidates.rows(slice(start, start + step))).all(axis=1))
        if bad.size:
            raise FeatureError(f"{candidates.where}: candidate row {start + bad[0]} is not finite")


def _split_codes(array: Array, n: int) -> np.ndarray:
    if len(array.shape) != 1 or array.shape[0] != n:
        raise FeatureError(f"{array.where}: split labels must be a 1-D array of {n} entries (one per row); "
                           f"got shape {array.shape}")
    values = array.values()
    if values.dtype.kind in "US":
        text = np.char.lower(np.char.strip(values.astype(str)))
        codes = np.full(n, -1, dtype=np.int64)
        for name, code in _SPLIT_NAMES.items():
            codes[text == name] = code
    elif values.dtype.kind in "iu":
        codes = values.astype(np.int64)
    else:
        raise FeatureError(f"{array.where}: split labels must be strings (train, val, test) or the integers "
                           f"0, 1, 2; got dtype {array.dtype_name}")
    bad = np.flatnonzero((codes < 0) | (codes > 2))
    if bad.size:
        raise FeatureError(f"{array.where}: row {bad[0]} has split label {values[bad[0]]!r}; expected train, val "
                           f"(or validation), test, or 0, 1, 2")
    return codes


def _splits(spec: FeatureSpec, arrays: Dict[str, Array], n: int) -> Dict[str, np.ndarray]:
    if spec.split_key is not None:
        codes = _split_codes(arrays[spec.split_key], n)
        rows = {name: np.flatnonzero(codes == code) for code, name in enumerate(SPLITS)}
        source = f"split labels {arrays[spec.split_key].where}"
        required = ("train", "test")
    else:
        test_fraction = DEFAULT_TEST_FRACTION if spec.test_fraction is None else spec.test_fraction
        val_fraction = spec.val_fraction or 0.0
        order = torch.randperm(n, generator=data.generator(spec.seed, "split")).numpy()
        n_test, n_val = round(n * test_fraction), round(n * val_fraction)
        rows = {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
                "train": np.sort(order[n_test + n_val:])}
        source = f"{n} rows with test fraction {test_fraction:g}, val fraction {val_fraction:g}"
        required = ("train", "test", "val") if val_fraction > 0 else ("train", "test")
    for name in required:
        if not len(rows[name]):
            raise FeatureError(f"the {name} split is empty ({source})")
    return rows


def _digests(array: Array, rows: np.ndarray) -> List[bytes]:
    """128-bit hashes of rows ``rows`` (bit patterns, with -0.0 read as 0.0)."""
    out = []
    step = _chunk_rows(array.shape[1])
    for start in range(0, len(rows), step):
        block = np.ascontiguousarray(array.rows(rows[start:start + step]) + np.float32(0))
        out.extend(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block)
    return out


def _targets(features: FeatureData, which: str) -> Targets:
    rows = features.rows[which]
    target = features.arrays[features.target]
    present = ~features.missing[features.target][rows]
    labels = np.full(len(rows), -1, dtype=np.int64)
    digests = _digests(target, rows[present])
    positions = np.flatnonzero(present)
    if features.candidates is not None:
        index = {}
        for k, digest in enumerate(_digests(features.candidates, np.arange(features.candidates.shape[0]))):
            index.setdefault(digest, k)
        for position, digest in zip(positions, digests):
            if digest not in index:
                raise FeatureError(f"{target.where}: the target of row {rows[position]} ({which} split) is not "
                                   f"among the candidates {features.candidates.where}")
            labels[position] = index[digest]
        return Targets(labels, features.candidates, None)
    index, first_rows = {}, []
    for position, digest in zip(positions, digests):
        if digest not in index:
            index[digest] = len(first_rows)
            first_rows.append(rows[position])
        labels[position] = index[digest]
    if not first_rows:
        raise FeatureError(f"{target.where}: every target row of the {which} split is missing (all NaN); "
                           f"nothing to evaluate")
    return Targets(labels, target, np.asarray(first_rows, dtype=np.int64))


def load_split(config, which: str) -> FeatureSplit:
    """Split ``which`` of a ``task="features"`` RunConfig, with ``missing_prob``
    applied to every modality in "train" and ``eval_missing_prob`` to the query
    modalities in "val" and "test" (streams as in ``loop.make_split``)."""
    features = prepare(FeatureSpec.of(config))
    split = FeatureSplit(features, which)
    if which == "train":
        if len(split) < config.batch_size:
            raise FeatureError(f"the train split has {len(split)} rows, fewer than the batch size "
                               f"({config.batch_size}); lower --batch-size", option="--batch-size")
        return split.hide(config.missing_prob, data.generator(config.seed, "train-missing"))
    return split.hide(config.eval_missing_prob, data.generator(config.seed, f"{which}-missing"),
                      modalities=split.queries)


def check(config) -> FeatureData:
    """Everything about a features run's inputs that can fail, checked before
    anything is written: the files, the splits, the batch size and the
    evaluation targets. Raises FeatureError."""
    features = prepare(FeatureSpec.of(config))
    load_split(config, "train")
    for which in ("val", "test"):
        if len(features.rows[which]):
            features.targets(which)
    return features


def chance(targets: Targets) -> float:
    return 1.0 / targets.count if targets.count else math.nan
