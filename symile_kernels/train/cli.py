"""Command line of the reference trainer: ``python -m symile_kernels.train`` or ``symile-train``.

Trains every combination of ``--loss`` x ``--p-hat`` (task xor) or ``--loss`` x
``--w`` (task m3-synthetic), evaluates each zero-shot on held-out data, and
writes to ``--out`` (default: ``symile-train-out`` in the current directory):
``results.json``, ``checkpoints/<run>.pt`` and ``accuracy.png`` (with the
optional ``matplotlib``). A summary table and the absolute path of
``results.json`` go to stdout at the end; progress goes to stderr unless
``--quiet``. A run whose loss or representations become NaN or Inf stops the
command with an error (status 1).

``--task features --features FILE`` trains on the user's own embeddings
(``symile_kernels.train.features``) and reports retrieval metrics (top-1, 5,
10 and MRR) of the ``--target`` modality for each ``--loss``. Its inputs are
checked in full before anything is written to ``--out``.

``--eval-only --checkpoint PATH [PATH ...]`` evaluates saved runs again on
their test split (drawn again from the stored seed); every checkpoint is read
and evaluated before ``--out`` is created, so a bad one writes nothing.

Under ``torchrun --nproc_per_node=P -m symile_kernels.train ...`` the runs are
data-parallel (``symile_kernels.train.parallel``): gloo on the CPU, NCCL with
``--device cuda`` (process i on ``cuda:LOCAL_RANK``); ``--batch-size`` is the
global batch and must be a multiple of P; rank 0 alone shows progress, prints
and writes ``--out``. ``--eval-only`` runs on rank 0 alone.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from dataclasses import fields, replace
from typing import List, Optional

import torch

from .. import backends
from . import data, features, loop, parallel, report
from .loop import RunConfig
from .model import ENCODERS

# Defaults that differ between tasks; everything else is RunConfig's default.
TASK_DEFAULTS = {
    "xor": {},
    "m3-synthetic": {"d": 64, "lr": 0.05, "epochs": 3, "batch_size": 128, "train_n": 10000,
                     "logit_scale_init": 0.0},
    # Fixed pretrained features with small heads: m3-synthetic's settings (no train_n: the file decides).
    "features": {"d": 64, "lr": 0.05, "epochs": 3, "batch_size": 128, "logit_scale_init": 0.0},
}
# RunConfig fields of task "features" (options that other tasks reject).
FEATURE_FIELDS = ("features", "modalities", "target", "val_fraction", "test_fraction", "split_key",
                  "candidates_key", "eval_budget")
_DEFAULT = RunConfig()
DEFAULT_OUT = "symile-train-out"


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; ``prog`` is the name shown in usage (default: how
    the program was invoked, e.g. ``symile-train``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train Symile and CLIP encoders with symile_kernels' losses on synthetic data where "
                    "higher-order information matters, or on your own precomputed features, and report "
                    "zero-shot test accuracy (retrieval metrics for features).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    task = p.add_argument_group("task")
    task.add_argument("--task", choices=data.TASKS, default="xor", help="data-generating process")
    task.add_argument("--p-hat", type=float, nargs="+", default=[1.0], metavar="P",
                      help="xor: probability that c = a XOR b (else c = a); several values make a sweep")
    task.add_argument("--d-v", type=int, default=_DEFAULT.d_v, help="xor: bits per vector (2^d_v candidates)")
    task.add_argument("--w", type=int, nargs="+", default=[_DEFAULT.w], metavar="W",
                      help="m3-synthetic: number of languages; several values make a sweep")
    task.add_argument("--classes", type=int, default=_DEFAULT.classes, help="m3-synthetic: number of classes C")
    task.add_argument("--class-dim", type=int, default=_DEFAULT.class_dim, help="m3-synthetic: class vector size")
    task.add_argument("--noise", type=float, default=_DEFAULT.noise,
                      help="m3-synthetic: std of the Gaussian noise on audio and image")
    task.add_argument("--missing-prob", type=float, default=0.0, metavar="Q",
                      help="hide each modality of each training sample with probability Q (in [0, 1))")
    task.add_argument("--eval-missing-prob", type=float, default=0.0, metavar="Q",
                      help="hide each query modality of each test sample with probability Q (in [0, 1))")
    task.add_argument("--train-n", type=int, default=None, help="training samples [task default]")
    task.add_argument("--test-n", type=int, default=_DEFAULT.test_n, help="held-out test samples")

    feats = p.add_argument_group("task features (your own embeddings)")
    feats.add_argument("--features", nargs="+", metavar="FILE",
                       help="one .npz, .safetensors or torch .pt file with one (N, F_m) float array per modality, "
                            "or one .npy file per modality (keys: file names); a row that is all NaN marks a "
                            "missing modality")
    feats.add_argument("--modalities", nargs="+", metavar="KEY",
                       help="keys to use, in this order [every key but --split-key and --candidates-key]")
    feats.add_argument("--target", metavar="KEY", help="modality to retrieve in evaluation [the first]")
    feats.add_argument("--val-fraction", type=float, metavar="F",
                       help="fraction of rows in a seeded validation split [0]")
    feats.add_argument("--test-fraction", type=float, metavar="F",
                       help=f"fraction of rows in a seeded test split [{features.DEFAULT_TEST_FRACTION:g}]")
    feats.add_argument("--split-key", metavar="KEY",
                       help="1-D array of split labels (train/val/test or 0/1/2) instead of the fractions")
    feats.add_argument("--candidates-key", metavar="KEY",
                       help="(K, F_target) array of retrieval candidates [the distinct target rows of the split]")
    feats.add_argument("--eval-budget", type=int, default=None, metavar="ENTRIES",
                       help=f"largest (queries x candidates) score block formed in evaluation "
                            f"[{_DEFAULT.eval_budget}]")

    model = p.add_argument_group("model and loss")
    model.add_argument("--loss", choices=loop.LOSSES, nargs="+", default=["symile", "clip"],
                       help="losses to train; several make a sweep")
    model.add_argument("--negative-sampling", choices=("n", "n_squared"), default=_DEFAULT.negative_sampling,
                       help="Symile negatives: N per anchor ('n') or all N^2 ('n_squared')")
    model.add_argument("--backend", choices=backends.NAMES, default="auto", help="symile_kernels backend")
    # --dim: torchrun's own parser rejects "--d" as an ambiguous abbreviation of its options.
    model.add_argument("--d", "--dim", dest="d", type=int, default=None,
                       help="representation size; spell it --dim under torchrun [task default]")
    model.add_argument("--encoder", choices=ENCODERS, default=_DEFAULT.encoder, help="encoder per modality")
    model.add_argument("--hidden", type=int, default=_DEFAULT.hidden, help="hidden units of the mlp encoder")
    model.add_argument("--logit-scale-init", type=float, default=None,
                       help="initial log tau (learned; logit_scale = exp) [task default]")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="batch size N, the global batch under torchrun [task default]")
    opt.add_argument("--epochs", type=int, default=None, help="passes over the training set [task default]")
    opt.add_argument("--lr", type=float, default=None, help="AdamW learning rate [task default]")
    opt.add_argument("--weight-decay", type=float, default=_DEFAULT.weight_decay, help="AdamW weight decay")
    opt.add_argument("--seed", type=int, default=_DEFAULT.seed, help="seed of data, init and sampling")
    opt.add_argument("--device", default="cpu",
                     help="torch device; under torchrun 'cuda' puts each process on cuda:LOCAL_RANK")
    opt.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads while the command runs (0: torch's default); the models are "
                          "small, so more threads mostly add synchronisation, badly so on a busy machine")

    out = p.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                     help="directory for results.json, checkpoints/ and accuracy.png, also with --eval-only; "
                          "relative to the current directory, created if need be")
    out.add_argument("--quiet", action="store_true", help="no progress display")
    out.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint instead of training")
    out.add_argument("--checkpoint", nargs="+", metavar="PATH", help="checkpoints to evaluate (--eval-only)")
    return p


def configs_from_args(args: argparse.Namespace) -> List[RunConfig]:
    """One validated RunConfig per point of the sweep, in table order
    (setting outer, loss inner). Raises loop.ConfigError naming the field."""
    defaults = {f.name: getattr(_DEFAULT, f.name) for f in fields(RunConfig)}
    defaults.update(TASK_DEFAULTS[args.task])
    chosen = {}
    for f in fields(RunConfig):
        if f.name in ("p_hat", "w", "loss", "task"):
            continue
        value = getattr(args, f.name, None)
        chosen[f.name] = defaults[f.name] if value is None else value
    if args.task != "features":
        for name in FEATURE_FIELDS:
            if getattr(args, name) is not None:
                raise loop.ConfigError(name, "is only used with --task features")
    elif chosen["features"]:
        # Absolute, so that --eval-only finds the files from another directory.
        chosen["features"] = [os.path.abspath(path) for path in chosen["features"]]
    base = RunConfig(task=args.task, **chosen)
    settings = ([("p_hat", v) for v in args.p_hat] if args.task == "xor" else
                [("w", v) for v in args.w] if args.task == "m3-synthetic" else [("seed", args.seed)])
    configs = [replace(base, **{name: value}, loss=loss) for name, value in settings for loss in args.loss]
    for config in configs:
        config.validate()
    return configs


def run_name(config: RunConfig) -> str:
    """The run's name, also its checkpoint's file name: only letters, digits, '.', '_' and '-'."""
    setting = (f"p_hat{config.p_hat:g}" if config.task == "xor" else f"w{config.w}" if config.task == "m3-synthetic"
               else "target-first" if config.target is None else f"target-{_file_part(config.target)}")
    negatives = f"-{config.negative_sampling}" if config.loss == "symile" else ""
    return f"{config.task}-{config.loss}{negatives}-{setting}-q{config.missing_prob:g}-seed{config.seed}"


def _file_part(key: str) -> str:
    """``key`` (a feature key: any string) as part of a file name: kept when it
    is plain (letters, digits, '_', '-'; at most 40), else a plain spelling
    plus a hash of the key, so that different keys get different names."""
    plain = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:40]
    if plain == key:
        return key
    return f"{plain}-{hashlib.blake2b(key.encode('utf-8', 'surrogatepass'), digest_size=4).hexdigest()}"


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point; returns the exit status (errors in arguments exit with status 2).
    ``prog``: the program name in usage and errors (default: as invoked)."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.checkpoint and not args.eval_only:
        parser.error("argument --checkpoint: only used with --eval-only")
    if args.eval_only and not args.checkpoint:
        parser.error("argument --eval-only: needs --checkpoint PATH")
    if args.threads < 0:
        parser.error(f"argument --threads: must be >= 0; got {args.threads}")
    try:
        configs = configs_from_args(args)
    except loop.ConfigError as exc:
        parser.error(f"argument {_option(exc.field)}: {exc.reason}")
    for path in args.checkpoint or ():
        if not os.path.isfile(path):
            parser.error(f"argument --checkpoint: no such file {path!r}")
    if args.task == "features" and not args.eval_only:
        # Every file, key, row and split is checked here, before --out is created.
        try:
            for config in configs:
                features.check(config)
        except features.FeatureError as exc:
            parser.error(f"argument {exc.option}: {exc}")
    # Every process of a torchrun job parses the same argv, so all of them stop
    # here alike, before any of them waits on the others.
    context = parallel.environment()
    if args.eval_only and not context.is_main:
        return 0  # evaluation needs one process: rank 0 does it
    distributed = parallel.launched() and not args.eval_only
    if distributed:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is not None and context.world_size > 1:
            parser.error(f"argument --device: under torchrun each process uses cuda:LOCAL_RANK; "
                         f"pass 'cuda', not {args.device!r}")
        for config in configs:
            if config.batch_size % context.world_size:
                parser.error(f"argument --batch-size: the global batch must be a multiple of the number of "
                             f"processes ({context.world_size}); got {config.batch_size}")
        device = parallel.process_device(args.device, context)
        configs = [replace(config, device=str(device)) for config in configs]
    if context.is_main and not args.eval_only:  # --eval-only creates it once every checkpoint is read
        os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if distributed:
            context = parallel.init(device)
        return _run(args, argv, configs, parser, context)
    finally:
        if distributed:
            parallel.shutdown()
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: List[str], configs: List[RunConfig],
         parser: argparse.ArgumentParser, context: parallel.Context) -> int:
    runs = []
    main_process = context.is_main
    if args.eval_only:
        for path in args.checkpoint:
            try:
                entry, _ = loop.evaluate_checkpoint(
                    path, device=args.device, eval_missing_prob=args.eval_missing_prob or None)
            except loop.ConfigError as exc:
                parser.error(f"argument {_option(exc.field)}: {exc.reason}")
            except features.FeatureError as exc:
                parser.error(f"argument --checkpoint: {path!r} was trained on features that cannot be read "
                             f"now: {exc}")
            except ValueError as exc:
                parser.error(f"argument --checkpoint: {exc}")
            runs.append(entry)
            if not args.quiet:
                print(f"{path}: {report.summary(entry)}", file=sys.stderr)
        os.makedirs(args.out, exist_ok=True)
    else:
        checkpoints = os.path.join(args.out, "checkpoints")
        if main_process:
            os.makedirs(checkpoints, exist_ok=True)
        for number, config in enumerate(configs, 1):
            name = run_name(config)
            steps = config.epochs * (loop.train_rows(config) // config.batch_size)
            progress = report.Progress(steps, f"[{number}/{len(configs)}] {name}",
                                       quiet=args.quiet or not main_process)
            try:
                entry, model = loop.train_run(config, progress)
            except loop.NonFiniteError as exc:
                parser.exit(1, f"{parser.prog}: error: {name}: {exc}\n" if main_process else None)
            finally:
                progress.close()
            if not main_process:
                continue
            path = os.path.join(checkpoints, name + ".pt")
            loop.save_checkpoint(path, model, config, entry)
            entry["checkpoint"] = path
            runs.append(entry)
            if not args.quiet:
                print(f"[{number}/{len(configs)}] {name}: {report.summary(entry)}, {entry['train_seconds']:.1f} s",
                      file=sys.stderr)

    if not main_process:
        return 0
    # Absolute, so that a default --out is plain to see.
    results = os.path.abspath(os.path.join(args.out, "results.json"))
    report.write_results(results, runs, argv)
    print(report.format_table(runs))
    print(f"results: {results}")
    if not args.eval_only and args.task != "features":
        plot = os.path.abspath(os.path.join(args.out, "accuracy.png"))
        if report.plot_accuracy(runs, plot):
            print(f"plot: {plot}")
        else:
            print("plot: skipped (install matplotlib, e.g. pip install 'symile_kernels[train]')")
    return 0
