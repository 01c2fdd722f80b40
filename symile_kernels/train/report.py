"""What a sweep leaves behind: a progress display, results.json, the summary
table and accuracy.png (when matplotlib is installed)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

SCHEMA_VERSION = 1


class Progress:
    """Progress of one run's optimisation steps with the running loss.

    Uses tqdm when it is installed and a plain one-line display on stderr
    otherwise (rewritten in place on a terminal, a line every few seconds when
    redirected); with ``quiet`` it shows nothing. Reading the loss value is a
    host sync, so it is done at most a few times per second.
    """

    def __init__(self, total: int, description: str, quiet: bool = False, stream=None):
        self.total, self.description, self.quiet = total, description, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.step, self.running = 0, None
        self._last_show = 0.0
        self._bar = None
        if not quiet:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=description, file=self.stream, leave=False,
                                 dynamic_ncols=True)

    def update(self, loss) -> None:
        self.step += 1
        if self.quiet:
            return
        now = time.monotonic()
        interval = 0.2 if (self._bar is not None or self._tty()) else 5.0
        if now - self._last_show < interval and self.step < self.total:
            if self._bar is not None:
                self._bar.update(1)
            return
        self._last_show = now
        value = float(loss)
        self.running = value if self.running is None else 0.9 * self.running + 0.1 * value
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.running:.4f}", refresh=False)
            self._bar.update(1)
        else:
            line = f"{self.description}: step {self.step}/{self.total} loss {self.running:.4f}"
            self.stream.write(("\r" + line + "\033[K") if self._tty() else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet and self._tty() and self.step:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()


def _git_revision() -> Optional[str]:
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_results(path: str, runs: List[Dict], argv: Optional[List[str]] = None) -> Dict:
    """Writes ``{"runs": [...], ...metadata}`` as JSON to ``path``; returns the object."""
    from .. import __version__
    doc = {"schema_version": SCHEMA_VERSION, "runs": runs,
           "command": ["symile-train", *argv] if argv is not None else None,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "symile_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": platform.processor() or None,
           "cpu_threads": torch.get_num_threads(), "git_revision": _git_revision()}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return doc


def _setting(run: Dict) -> str:
    if run["task"] == "features":  # only in a table that mixes tasks
        return f"target {run['target']}"
    return f"{run['p_hat']:g}" if run["task"] == "xor" else f"{run['w']}"


def summary(run: Dict) -> str:
    """One line of a run's test metrics, for the per-run progress message."""
    if run["task"] == "features":
        return (f"top-1 {run['test_top1']:.4f}, top-5 {run['test_top5']:.4f}, top-10 {run['test_top10']:.4f}, "
                f"MRR {run['test_mrr']:.4f} ({run['test_candidates']} candidates)")
    return f"test accuracy {run['test_accuracy']:.4f} (chance {run['chance_accuracy']:.4g})"


def format_table(runs: List[Dict]) -> str:
    """A Markdown table, one row per run, in the order given (retrieval
    metrics when every run is of task "features")."""
    if runs and all(r["task"] == "features" for r in runs):
        return _features_table(runs)
    tasks = {r["task"] for r in runs}
    task_col = {frozenset({"xor"}): "p_hat", frozenset({"m3-synthetic"}): "w"}.get(frozenset(tasks), "setting")
    show_eval_missing = any(r.get("eval_missing_prob", 0) for r in runs)
    header = ["task", "loss", "negatives", task_col, "missing_prob"]
    if show_eval_missing:
        header.append("eval_missing_prob")
    header += ["test accuracy", "chance", "train s"]
    rows = []
    for r in runs:
        row = [r["task"], r["loss"], r["negative_sampling"] or "-", _setting(r), f"{r['missing_prob']:g}"]
        if show_eval_missing:
            row.append(f"{r.get('eval_missing_prob', 0):g}")
        row += [f"{r['test_accuracy']:.4f}", f"{r['chance_accuracy']:.4g}", f"{r['train_seconds']:.1f}"]
        rows.append(row)
    return _markdown(header, rows, numeric=("test accuracy", "chance", "train s"))


def _features_table(runs: List[Dict]) -> str:
    show_eval_missing = any(r.get("eval_missing_prob", 0) for r in runs)
    header = ["task", "loss", "negatives", "target", "missing_prob"]
    if show_eval_missing:
        header.append("eval_missing_prob")
    metrics = ["top-1", "top-5", "top-10", "MRR", "candidates", "train s"]
    rows = []
    for r in runs:
        row = [r["task"], r["loss"], r["negative_sampling"] or "-", r["target"], f"{r['missing_prob']:g}"]
        if show_eval_missing:
            row.append(f"{r.get('eval_missing_prob', 0):g}")
        row += [f"{r[f'test_{k}']:.4f}" for k in ("top1", "top5", "top10", "mrr")]
        row += [str(r["test_candidates"]), f"{r['train_seconds']:.1f}"]
        rows.append(row)
    return _markdown(header + metrics, rows, numeric=metrics)


def _markdown(header: List[str], rows: List[List[str]], numeric) -> str:
    """A Markdown table; the ``numeric`` columns are right-aligned."""
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(header)]
    numeric = {header.index(h) for h in numeric}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def plot_accuracy(runs: List[Dict], path: str) -> bool:
    """Writes the accuracy plot to ``path``; returns False (and writes nothing)
    when matplotlib is not installed.

    xor: test accuracy against p_hat, one line per loss (and missing_prob when
    it varies), chance as a dashed line, the best possible accuracy
    ``p_hat + (1 - p_hat) 2^-d_v`` dotted. m3-synthetic: accuracy against w,
    chance (1/C) dashed and the pairwise bound 1/w dotted.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    tasks = sorted({r["task"] for r in runs})
    xor = tasks == ["xor"]
    key_x = "p_hat" if xor else "w"
    runs = [r for r in runs if r["task"] == tasks[0]]
    vary_q = len({(r["missing_prob"], r.get("eval_missing_prob", 0)) for r in runs}) > 1
    groups: Dict[tuple, List[Dict]] = {}
    for r in runs:
        groups.setdefault((r["loss"], r["missing_prob"], r.get("eval_missing_prob", 0)), []).append(r)
    styles = {"symile": dict(color="tab:blue", marker="o"), "clip": dict(color="tab:orange", marker="s")}
    for (loss, q, eq), members in groups.items():
        members = sorted(members, key=lambda r: r[key_x])
        label = "Symile" if loss == "symile" else "CLIP"
        if vary_q:
            label += f" (missing {q:g}" + (f", eval missing {eq:g}" if eq else "") + ")"
        ax.plot([r[key_x] for r in members], [r["test_accuracy"] for r in members], label=label,
                linestyle="-" if q == 0 else "-.", **styles.get(loss, {}))
    xs = sorted({r[key_x] for r in runs})
    chance = sorted({r["chance_accuracy"] for r in runs})
    for c in chance:
        ax.axhline(c, color="gray", linestyle="--", linewidth=1, label="chance" if c == chance[0] else None)
    if xor:
        d_v = sorted({r.get("d_v") for r in runs})
        if len(d_v) == 1:
            # The Bayes-optimal accuracy: b = a XOR c with probability p_hat, else a coin flip.
            grid = [0.0, 1.0]
            ax.plot(grid, [p + (1 - p) * 2.0 ** -d_v[0] for p in grid], color="gray", linestyle=":",
                    label="best possible")
        ax.set_xlabel("p_hat (probability that c = a XOR b)")
        ax.set_title(f"Binary XOR, d_v = {', '.join(map(str, d_v))}: predict b from (a, c)")
        ax.set_xlim(-0.05, 1.05)
    else:
        ax.plot(xs, [1.0 / w for w in xs], color="gray", linestyle=":", label="pairwise bound 1/w")
        ax.set_xlabel("w (languages)")
        ax.set_title("m3-synthetic: retrieve the image class from (audio, text)")
    ax.set_ylabel("zero-shot test accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return True
