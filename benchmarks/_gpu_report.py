"""The GPU suite's report: ``results.md`` rendered from the rows of ``results.jsonl``.

``render(rows)`` needs nothing but the rows, so a report can be rebuilt from the
file of a run that was cut short (``gpu_suite.py --render OUT_DIR``). The verdict
(correctness pass/fail per backend, and whether the reference package was
there) comes first; the machine-info block comes last.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: the rows before it stand
                    pass
    return rows


def verdict(rows: list[dict]) -> dict:
    """{"failing": {backend: [reasons]}, "incomplete": [what did not run], "checks": number of cases,
    "notes": [optional jobs that could not run here]}."""
    failing, incomplete, notes = defaultdict(list), [], []
    cases = [r for r in rows if r.get("kind") == "check"]
    bad = defaultdict(int)
    for r in cases:
        if not r["ok"]:
            bad[r["backend"]] += 1
    for backend, count in bad.items():
        total = sum(1 for r in cases if r["backend"] == backend)
        failing[backend].append(f"{count} of {total} oracle cases")
    for r in rows:
        kind, status = r.get("kind"), r.get("status", "ok")
        if kind == "check_job" and status != "ok":
            (failing[r["backend"]] if r.get("required") else notes if r.get("optional") else incomplete).append(
                f"{r['backend']} {r['mode']} config {r.get('config')}: {status}")
        elif kind == "build" and status != "ok" and r.get("required"):
            failing[r["backend"]].append(f"build: {status}")
        elif kind == "pytest":
            for backend, ids in r.get("failed", {}).items():
                failing[backend].append(f"{len(ids)} pytest failures")
            if r.get("status", "ok") != "ok" and not r.get("failed"):
                incomplete.append(f"pytest: {r['status']}")
        elif kind == "sanitizer":
            if r.get("errors"):
                failing[r["backend"]].append(f"{r['tool']}: {r['summary']}")
            elif status != "ok" and "not found" not in status:  # no tool on the machine: reported, not owed
                incomplete.append(f"{r['tool']}: {status}")
    return dict(failing={k: v for k, v in failing.items()}, incomplete=incomplete, checks=len(cases), notes=notes)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bench_table(rows: list[dict], mm: dict, reference: Optional[dict] = None) -> list[str]:
    """One line per row. "loss rel. diff": against the reference package's row of the same
    mode, N, sampling (same inputs), else the table's first measured row of them."""
    lines = ["| backend | mode | M | N | d | sampling | fwd ms | fwd+bwd ms | peak MiB | model TFLOP/s "
             "| % of mm | loss | loss rel. diff | vs symile: time | vs symile: memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    anchors = dict(reference or {})
    for r in rows:
        if r["status"] == "ok":
            anchors.setdefault((r["mode"], r["N"], r["sampling"]), r)
    for r in rows:
        head = f"| {r['backend']} | {r['mode']} | {r['M']} | {r['N']} | {r['d']} | {r['sampling']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']} | | | | | | | | |")
            continue
        share = None if not r.get("model_tflops") or not mm.get(r["mode"]) else 100 * r["model_tflops"] / mm[r["mode"]]
        ref = (reference or {}).get((r["mode"], r["N"], r["sampling"]))
        time_ratio = None if not ref else ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        mem_ratio = None if not ref or r["peak_mb"] <= 0 else ref["peak_mb"] / r["peak_mb"]
        anchor = anchors[(r["mode"], r["N"], r["sampling"])]
        diff = None if anchor is r else abs(r["loss"] - anchor["loss"]) / max(abs(anchor["loss"]), 1e-30)
        lines.append(head + f"| {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['peak_mb']:.0f} "
                     f"| {_fmt(r.get('model_tflops'), '.2f')} | {_fmt(share, '.0f')} | {r['loss']:.6g} | {_fmt(diff, '.1e')} "
                     f"| {_fmt(time_ratio, '.1f')}{'x' if time_ratio else ''} "
                     f"| {_fmt(mem_ratio, '.1f')}{'x' if mem_ratio else ''} |")
    return lines


def _check_table(rows: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for r in rows:
        if r.get("kind") == "check":
            groups[(r["backend"], r["mode"])].append(r)
    lines = ["| backend | mode | cases passed | configs | worst loss err / tol | worst grad err / tol |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (backend, mode), group in sorted(groups.items()):
        measured = [r for r in group if "loss_err" in r]
        loss = max((r["loss_err"] / r["loss_tol"] for r in measured), default=None)
        grad = max((r["grad_err"] / r["grad_tol"] for r in measured), default=None)
        configs = sorted({str(r.get("config")) for r in group})
        lines.append(f"| {backend} | {mode} | {sum(r['ok'] for r in group)} / {len(group)} | {', '.join(configs)} "
                     f"| {_fmt(loss, '.3g')} | {_fmt(grad, '.3g')} |")
    return lines


def render(rows: list[dict]) -> str:
    info = next((r for r in rows if r.get("kind") == "info"), {})
    result = verdict(rows)
    out = [f"# Symile GPU suite: {info.get('gpu') or info.get('processor', '?')}", ""]
    if result["failing"]:
        out.append("**CORRECTNESS: FAIL** (the timings below include failing backends): " + "; ".join(
            f"{b}: {', '.join(why)}" for b, why in sorted(result["failing"].items())))
    elif result["incomplete"] or not result["checks"]:
        out.append(f"**CORRECTNESS: INCOMPLETE**: no failure in {result['checks']} oracle cases, but not every "
                   "check ran (below).")
    else:
        out.append(f"**CORRECTNESS: PASS**: {result['checks']} oracle cases, the pytest step and the "
                   "sanitizers that ran found no error.")
    if result["incomplete"]:
        out += ["", "**Not complete**: " + "; ".join(result["incomplete"])]
    if result["notes"]:
        out += ["", "Optional checks that could not run here: " + "; ".join(result["notes"])]
    symile_rows = [r for r in rows if r.get("kind") == "bench" and r.get("backend") == "symile"]
    if symile_rows and all(r["status"] != "ok" for r in symile_rows):
        out += ["", f"**Reference package symile: {symile_rows[0]['status']}**: no comparison with it in this run."]
    end = next((r for r in rows if r.get("kind") == "end"), None)
    out += ["", f"- command: `{info.get('command', '?')}`; budget {info.get('budget_s', '?')} s; "
            f"ran {end['elapsed_s'] if end else '? (no end row: the run was cut short)'} s"]
    for r in rows:
        if r.get("kind") == "build":
            out.append(f"- build of the {r['backend']} backend: {r['status']} in {r.get('seconds', 0):.1f} s "
                       f"({r.get('origin') or '-'}; log: build.log)")
        elif r.get("kind") == "configs":
            out.append(f"- Triton configurations: {r['how']}; {r.get('counts') or {}}")
        elif r.get("kind") == "pytest":
            out.append(f"- pytest (`{r.get('command', '-')}`): {r['status']}; {r.get('summary', '')} "
                       f"in {r.get('seconds', 0):.0f} s; log: tests.log")
        elif r.get("kind") == "sanitizer":
            out.append(f"- compute-sanitizer --tool {r['tool']} ({r['backend']}): {r['status']}; {r.get('summary', '')}"
                       f" in {r.get('seconds', 0):.0f} s; log: sanitizer.log")
    out += ["", "## Correctness against the float64 oracle (docs/math.md section 6.1)", ""] + _check_table(rows)
    failed = [r for r in rows if r.get("kind") == "check" and not r["ok"]]
    if failed:
        out += ["", "Failing cases (first 20):", ""]
        out += [f"- {r['backend']} {r['mode']} config {r.get('config')}: M={r['M']} N={r['N']} d={r['d']} "
                f"{r['sampling']} {r['inputs']} tau={r['tau']}: " + (r.get("error") or
                f"loss {r['loss_err']:.3g} (tol {r['loss_tol']}), {r['worst_grad']} {r['grad_err']:.3g} "
                f"(tol {r['grad_tol']})") for r in failed[:20]]

    mm = {r["mode"]: r["tflops"] for r in rows if r.get("kind") == "mm"}
    bench = [r for r in rows if r.get("kind") == "bench"]
    reference = {(r["mode"], r["N"], r["sampling"]): r for r in bench if r["backend"] == "symile" and r["status"] == "ok"}
    for stage, title in (("vs_symile", "Reference package symile 0.1.0 vs every backend (M = 3, n_squared)"),
                         ("fused", "Fused backends (M = 3, n_squared)"),
                         ("n", 'Sampled negatives, "n" (M = 3), against the reference package on the same inputs'),
                         ("scale", "Scale rows (time guard: skipped rows did not fit the budget)")):
        selected = [r for r in bench if r.get("stage") == stage]
        if selected:
            out += ["", f"## {title}", ""] + _bench_table(selected, mm, reference)
    if mm:
        out += ["", "Dense matrix product rate (torch.mm, same run), TFLOP/s: "
                + ", ".join(f"{mode} {rate:.1f}" for mode, rate in mm.items())]
    out += ["", "Times: medians of CUDA-event timings after a warm-up; peak: torch.cuda.max_memory_allocated of "
            "one forward+backward above the inputs; model FLOPs: 6 N^3 d (n_squared) or 6 M N^2 d (n), "
            "docs/math.md section 5; tau = 14.3, unit rows; loss: the value on the row's inputs at a fixed seed."]
    out += ["", "## Machine", "", "```"] + [f"{k}: {v}" for k, v in info.items() if k != "kind"] + ["```"]
    return "\n".join(out)
