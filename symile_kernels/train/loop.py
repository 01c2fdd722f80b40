"""Training and zero-shot evaluation of one run.

Under torchrun (``symile_kernels.train.parallel``) ``train_run`` wraps the
model in ``torch.nn.parallel.DistributedDataParallel``; the pieces it uses are
kept apart for that:

- ``batch_indices`` is the only place that decides which rows a process sees
  (``rank`` / ``world_size`` slice every global batch);
- ``train_step`` takes the (possibly wrapped) model, the optimizer, one batch
  and the loss function, and calls the model's ``forward`` once;
- ``evaluate`` unwraps the model and scores every candidate.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import backends, clip_loss, symile_loss
from . import data, features, parallel, retrieval
from .model import ENCODERS, Encoders, unwrap

LOSSES = ("symile", "clip")
CHECKPOINT_FORMAT = 1


class ConfigError(ValueError):
    """A bad RunConfig value; ``field`` names the option, ``reason`` says what was expected and what came."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


@dataclass
class RunConfig:
    """Everything that defines one run (one point of a sweep).

    ``p_hat`` and ``d_v`` apply to task "xor"; ``w``, ``classes``,
    ``class_dim`` and ``noise`` to "m3-synthetic"; ``features`` (the file
    paths), ``modalities``, ``target``, ``val_fraction``, ``test_fraction``,
    ``split_key``, ``candidates_key`` and ``eval_budget`` to "features" (see
    ``symile_kernels.train.features``), where ``train_n`` and ``test_n`` are
    unused (the file decides). ``negative_sampling`` applies to the Symile
    loss only.
    """

    task: str = "xor"
    loss: str = "symile"
    negative_sampling: str = "n_squared"
    backend: str = "auto"
    p_hat: float = 1.0
    d_v: int = 2
    w: int = 4
    classes: int = 1000
    class_dim: int = 32
    noise: float = 0.1
    missing_prob: float = 0.0
    eval_missing_prob: float = 0.0
    d: int = 16
    encoder: str = "linear"
    hidden: int = 64
    batch_size: int = 100
    epochs: int = 4
    lr: float = 0.1
    weight_decay: float = 0.01
    logit_scale_init: float = -0.3
    train_n: int = 10000
    test_n: int = 5000
    seed: int = 0
    device: str = "cpu"
    features: Optional[List[str]] = None
    modalities: Optional[List[str]] = None
    target: Optional[str] = None
    val_fraction: Optional[float] = None
    test_fraction: Optional[float] = None
    split_key: Optional[str] = None
    candidates_key: Optional[str] = None
    eval_budget: int = retrieval.DEFAULT_BUDGET

    def validate(self) -> "RunConfig":
        """Raises ValueError naming the offending option; returns self."""
        def bad(name: str, expected: str, value) -> ConfigError:
            return ConfigError(name, f"must be {expected}; got {value!r}")

        if self.task not in data.TASKS:
            raise bad("task", "one of " + ", ".join(map(repr, data.TASKS)), self.task)
        if self.loss not in LOSSES:
            raise bad("loss", "one of " + ", ".join(map(repr, LOSSES)), self.loss)
        if self.negative_sampling not in ("n", "n_squared"):
            raise bad("negative_sampling", "'n' or 'n_squared'", self.negative_sampling)
        if self.backend not in backends.NAMES:
            raise bad("backend", "one of " + ", ".join(map(repr, backends.NAMES)), self.backend)
        if self.encoder not in ENCODERS:
            raise bad("encoder", "one of " + ", ".join(map(repr, ENCODERS)), self.encoder)
        for name, lo, hi, closed in (("p_hat", 0.0, 1.0, True), ("missing_prob", 0.0, 1.0, False),
                                     ("eval_missing_prob", 0.0, 1.0, False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and lo <= value and (
                value <= hi if closed else value < hi)
            if not ok:
                raise bad(name, f"in [{lo:g}, {hi:g}{']' if closed else ')'}", value)
        for name, low in (("d_v", 1), ("w", 2), ("classes", 2), ("class_dim", 1), ("d", 1), ("hidden", 1),
                          ("batch_size", 2), ("epochs", 1), ("test_n", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}", value)
        if self.d_v > 16:
            raise bad("d_v", "at most 16 (the test scores all 2^d_v candidates)", self.d_v)
        if self.task == "features":
            self._validate_features(bad)
        elif isinstance(self.train_n, bool) or not isinstance(self.train_n, int) or self.train_n < self.batch_size:
            raise bad("train_n", f"an integer >= batch_size ({self.batch_size})", self.train_n)
        for name in ("lr", "noise", "weight_decay"):
            value = getattr(self, name)
            positive = name == "lr"
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise bad(name, "a positive finite number" if positive else "a finite number >= 0", value)
        if not math.isfinite(self.logit_scale_init):
            raise bad("logit_scale_init", "finite", self.logit_scale_init)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise bad("device", "a torch device such as 'cpu' or 'cuda:0'", self.device) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise bad("device", "available; CUDA is not available here, use 'cpu'", self.device)
        return self

    def _validate_features(self, bad: Callable) -> None:
        if not self.features or not all(isinstance(p, str) for p in self.features):
            raise bad("features", "one feature file, or one .npy file per modality", self.features)
        fractions = []
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.split_key is not None:
                raise ConfigError(name, "cannot be used with --split-key (the split labels decide)")
            if not isinstance(value, (int, float)) or not (0 <= value < 1):
                raise bad(name, "in [0, 1)", value)
            fractions.append(value)
        if sum(fractions) >= 1:
            raise ConfigError("test_fraction", f"plus val_fraction must be below 1 (train needs rows); "
                                               f"got {sum(fractions):g}")
        if isinstance(self.eval_budget, bool) or not isinstance(self.eval_budget, int) or self.eval_budget < 1:
            raise bad("eval_budget", "an integer >= 1", self.eval_budget)

    def input_sizes(self) -> Dict[str, int]:
        if self.task == "features":
            return features.prepare(features.FeatureSpec.of(self)).input_sizes()
        return data.input_sizes(self.task, d_v=self.d_v, w=self.w, class_dim=self.class_dim)

    @property
    def chance_accuracy(self) -> float:
        """1 / the number of candidates (for "features" it depends on the data: see ``evaluate_run``)."""
        if self.task == "features":
            return math.nan
        return 2.0 ** -self.d_v if self.task == "xor" else 1.0 / self.classes

    @classmethod
    def from_dict(cls, values: Dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def make_split(config: RunConfig, which: str):
    """The "train" split (missing_prob applied to every modality) or the "test"
    split (eval_missing_prob applied to the query modalities) of ``config``: a
    ``data.Split``, or for task "features" a ``features.FeatureSplit`` (which
    also has a "val" split)."""
    if config.task == "features":
        return features.load_split(config, which)
    gen = data.generator(config.seed, which)
    if config.task == "xor":
        split = data.xor_split(config.train_n if which == "train" else config.test_n, config.d_v, config.p_hat, gen)
    else:
        table = data.class_vectors(config.classes, config.class_dim, config.seed)
        split = data.m3_split(config.train_n if which == "train" else config.test_n, config.w, config.noise,
                              table, gen)
    if which == "train":
        return data.hide(split, config.missing_prob, data.generator(config.seed, "train-missing"))
    return data.hide(split, config.eval_missing_prob, data.generator(config.seed, "test-missing"),
                     modalities=split.queries)


def train_rows(config: RunConfig) -> int:
    """Rows of the training split (``train_n``, or the file's train split for task "features")."""
    if config.task == "features":
        return len(features.prepare(features.FeatureSpec.of(config)).rows["train"])
    return config.train_n


def make_model(config: RunConfig) -> Encoders:
    """Fresh encoders; initialised from torch's global generator (seed it first)."""
    return Encoders(config.input_sizes(), config.d, encoder=config.encoder, hidden=config.hidden,
                    logit_scale_init=config.logit_scale_init)


def make_loss_fn(config: RunConfig, gather: bool = False) -> Callable:
    """``loss_fn(reps, logit_scale) -> 0-dim loss`` through the public API.

    With ``gather`` each process passes its local rows and gets its share of
    the global-batch loss (the mean over processes is the global loss)."""
    if config.loss == "symile":
        return functools.partial(symile_loss, negative_sampling=config.negative_sampling, backend=config.backend,
                                 gather=gather)
    return functools.partial(clip_loss, backend=config.backend, gather=gather)


def batch_indices(n: int, batch_size: int, gen: torch.Generator, rank: int = 0,
                  world_size: int = 1) -> Iterator[Tensor]:
    """One epoch of shuffled row indices: global batches of ``batch_size`` rows,
    each split into ``world_size`` equal slices of which this process takes
    slice ``rank``. The last incomplete global batch is dropped (a smaller
    batch would change the loss's number of negatives)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of world_size ({world_size})")
    order = torch.randperm(n, generator=gen)
    per_rank = batch_size // world_size
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start + rank * per_rank:start + (rank + 1) * per_rank]


def to_device(batch: Dict[str, Dict[str, Tensor]], device: torch.device) -> Dict[str, Dict[str, Tensor]]:
    return {key: {m: v.to(device) for m, v in part.items()} for key, part in batch.items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Dict[str, Dict[str, Tensor]],
               loss_fn: Callable) -> Tensor:
    """One optimisation step on one batch; returns the detached loss, NaN when
    the loss or any representation is not finite (no host sync: the caller
    decides when to look)."""
    optimizer.zero_grad(set_to_none=True)
    reps, logit_scale = model(batch["inputs"], batch["missing"])
    loss = loss_fn(reps, logit_scale)
    loss.backward()
    optimizer.step()
    # One value to watch instead of M tensors: the reps are finite exactly when this flag is set.
    finite = torch.stack([torch.isfinite(r).all() for r in reps]).all()
    return torch.where(finite, loss.detach(), torch.nan)


class NonFiniteError(RuntimeError):
    """Training stopped: the loss or a representation became NaN or Inf."""


def _check_finite(loss: Tensor, epoch: int, step: int) -> None:
    """Raises NonFiniteError unless the step's loss (from ``train_step``) is finite.

    Reading it is a host sync, as the loss's own check of the logit scale
    already is; the next step would fail on a NaN logit scale anyway, with a
    message about tau instead of the cause."""
    if not math.isfinite(float(loss)):
        raise NonFiniteError(
            f"training stopped at step {step} of epoch {epoch}: the loss or a representation became NaN or "
            f"Inf. The inputs may be too large for float32 arithmetic (features near 3e38 overflow the "
            f"encoders), or the learning rate too high (--lr)")


@torch.no_grad()
def evaluate(model: nn.Module, split: data.Split, loss: str, device: torch.device, batch_size: int = 4096) -> float:
    """Zero-shot accuracy: the fraction of rows whose true candidate ranks first
    among every candidate (``retrieval.ranks``: a tie or a non-finite score
    counts against the row).

    Symile scores by the MIP of the query representations with the
    candidate's; CLIP by the sum over query modalities of the pairwise dot
    products with the candidate (the query-query term is the same for every
    candidate)."""
    encoders = unwrap(model)
    was_training = model.training
    model.eval()
    candidates = encoders.encode(split.target, split.candidates.to(device),
                                 torch.zeros(split.candidates.shape[0], device=device))
    correct = 0
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        queries = [encoders.encode(m, split.inputs[m][index].to(device), split.missing[m][index].to(device))
                   for m in split.queries]
        correct += int((retrieval.ranks(candidates, queries, split.labels[index], loss) == 1).sum())
    model.train(was_training)
    return correct / len(split)


def evaluate_run(model: nn.Module, config: RunConfig, device: torch.device) -> Dict:
    """The test metrics of a run: ``{"test_accuracy", "chance_accuracy"}``, and
    for task "features" the retrieval metrics of the test split (``test_top1``,
    ``test_top5``, ``test_top10``, ``test_mrr``, ``test_queries``,
    ``test_candidates``; ``test_accuracy`` is top-1) and the same with
    ``val_`` for a non-empty val split."""
    if config.task != "features":
        return {"test_accuracy": evaluate(model, make_split(config, "test"), config.loss, device),
                "chance_accuracy": config.chance_accuracy}
    out = {}
    for which in ("test", "val"):
        split = make_split(config, which)
        if len(split):
            found = retrieval.evaluate_split(model, split, config.loss, device, budget=config.eval_budget)
            out.update({f"{which}_{k}": v for k, v in found.items()})
    out["test_accuracy"] = out["test_top1"]
    out["chance_accuracy"] = 1.0 / out["test_candidates"]
    return out


def record(config: RunConfig, resolved_backend: str, metrics: Dict, train_seconds: float,
           final_loss: Optional[float], logit_scale: float, world_size: int = 1) -> Dict:
    """One entry of results.json's ``runs``; ``metrics`` comes from
    ``evaluate_run``; ``world_size`` is the number of training processes
    (``config.batch_size`` is the global batch)."""
    entry = {"task": config.task, "loss": config.loss,
             "negative_sampling": config.negative_sampling if config.loss == "symile" else None,
             "backend": resolved_backend}
    if config.task == "xor":
        entry.update(p_hat=config.p_hat, d_v=config.d_v)
    elif config.task == "features":
        prepared = features.prepare(features.FeatureSpec.of(config))
        entry.update(features=list(config.features), modalities=prepared.modalities, target=prepared.target,
                     **{f"{which}_rows": len(rows) for which, rows in prepared.rows.items()})
    else:
        entry.update(w=config.w, classes=config.classes, noise=config.noise)
    entry.update(missing_prob=config.missing_prob, eval_missing_prob=config.eval_missing_prob, seed=config.seed,
                 **metrics, train_seconds=train_seconds, final_train_loss=final_loss, logit_scale=logit_scale,
                 world_size=world_size, config=asdict(config))
    return entry


def train_run(config: RunConfig, progress=None) -> Tuple[Dict, Encoders]:
    """Trains one run from scratch and evaluates it on its held-out test split.

    Deterministic on the CPU for a given config: data come from generators
    seeded by ``config.seed``; model init and the "n" sampling permutations use
    torch's global generator, seeded here and restored afterwards.

    Data-parallel when a default process group of several processes is
    initialised (torchrun; see ``parallel``): every process builds the same
    data and model from the same seeds, trains a DistributedDataParallel
    wrapper on its ``config.batch_size / world_size`` rows of every global
    batch with the global-batch loss (``gather=True``), and the same seed at
    every loss call keeps "n" sampling's permutations identical everywhere.
    Rank 0 evaluates; every process returns the same entry.

    Args:
        config: the run (validated here); ``batch_size`` is the global batch.
        progress: optional ``report.Progress``-like object with ``update(loss)``;
            it receives the global-batch loss.

    Returns:
        (the results.json entry, the trained Encoders, unwrapped).
    """
    config.validate()
    context = parallel.current()
    if config.batch_size % context.world_size:
        raise ConfigError("batch_size", f"must be a multiple of the number of processes ({context.world_size}): "
                                        f"it is the global batch; got {config.batch_size}")
    device = torch.device(config.device)
    resolved = backends.resolve(config.backend, device)
    train = make_split(config, "train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoders = make_model(config).to(device)
        model = encoders
        if context.distributed:
            # Same seed, same init everywhere; DDP also broadcasts rank 0's weights.
            # One device per process: DDP needs its index on CUDA (None: the module's own device).
            model = DistributedDataParallel(
                encoders, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loss_fn = make_loss_fn(config, gather=context.distributed)
        shuffle = data.generator(config.seed, "train")
        model.train()
        start = time.perf_counter()
        final_loss = None
        for epoch in range(1, config.epochs + 1):
            total, steps = torch.zeros((), device=device), 0
            for index in batch_indices(len(train), config.batch_size, shuffle, context.rank, context.world_size):
                # This process's share of the loss; the mean over processes is the global-batch loss,
                # NaN on every process when one had a non-finite loss, so all of them stop alike.
                loss = parallel.mean(train_step(model, optimizer, to_device(train.batch(index), device), loss_fn),
                                     context)
                steps += 1
                _check_finite(loss, epoch, steps)
                total += loss
                if progress is not None:
                    progress.update(loss)
            final_loss = float(total) / steps
        train_seconds = time.perf_counter() - start
    # The weights are identical on every process (same averaged gradients, same optimizer).
    metrics = evaluate_run(encoders, config, device) if context.is_main else None
    metrics = parallel.broadcast_object(metrics, context)
    entry = record(config, resolved, metrics, train_seconds, final_loss, float(encoders.log_tau.detach().exp()),
                   world_size=context.world_size)
    return entry, encoders


def evaluate_checkpoint(path: str, device: Optional[str] = None,
                        eval_missing_prob: Optional[float] = None) -> Tuple[Dict, Encoders]:
    """Loads a checkpoint written by ``save_checkpoint`` and evaluates it on its
    test split, drawn again from the stored seed. Returns (entry, model); the
    entry carries the checkpoint's train_seconds and ``"eval_only": True``."""
    checkpoint = _read_checkpoint(path)
    config = RunConfig.from_dict(checkpoint["config"])
    if device is not None:
        config.device = device
    if eval_missing_prob is not None:
        config.eval_missing_prob = eval_missing_prob
    config.validate()
    dev = torch.device(config.device)
    model = make_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit the model its config describes "
                         f"({_one_line(exc)})") from None
    model.to(dev)
    entry = record(config, backends.resolve(config.backend, dev), evaluate_run(model, config, dev),
                   checkpoint["train_seconds"], checkpoint.get("final_train_loss"),
                   float(model.log_tau.detach().exp()), world_size=checkpoint.get("world_size", 1))
    entry["eval_only"] = True
    entry["checkpoint"] = str(path)
    return entry, model


def _read_checkpoint(path: str) -> Dict:
    """The dict ``save_checkpoint`` wrote; ValueError (one line, naming ``path``) for anything else."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file makes torch raise RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"checkpoint {path!r} cannot be read: it is truncated, corrupt or not a torch file "
                         f"({_one_line(exc)})") from None
    fields_ok = isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict) and isinstance(
        checkpoint.get("model"), dict) and isinstance(checkpoint.get("train_seconds"), (int, float))
    if not fields_ok or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a symile_kernels.train checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def _one_line(exc: Exception, limit: int = 240) -> str:
    """``exc`` as one line of at most ``limit`` characters, for messages."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def save_checkpoint(path, model: nn.Module, config: RunConfig, entry: Dict) -> None:
    """Writes the weights, the config and the training time (loadable with weights_only=True)."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(config), "model": unwrap(model).state_dict(),
                "train_seconds": entry["train_seconds"], "final_train_loss": entry["final_train_loss"],
                "world_size": entry.get("world_size", 1)}, path)
