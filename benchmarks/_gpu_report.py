"""The GPU suite's report: ``results.md`` rendered from the rows of ``results.jsonl``.

``render(rows)`` needs nothing but the rows, so a report can be rebuilt from the
file of a run that was cut short (``gpu_suite.py --render OUT_DIR``). The verdict
(correctness pass/fail per backend, and whether the reference package was
there) comes first; the machine-info block comes last.
"""
from __future__ import annotations

import json
from collections import defaultdict


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
            elif status.startswith("not run: compute-sanitizer"):  # no tool, or it cannot attach: reported, not owed
                notes.append(f"{r['tool']}: {status}")
            elif status != "ok":
                incomplete.append(f"{r['tool']}: {status}")
    missing = unchecked_configs(rows)
    if missing and cases:
        incomplete.append(f"{len(missing)} Triton configurations no pinned check launched: {', '.join(missing[:8])}"
                          + (" ..." if len(missing) > 8 else ""))
    return dict(failing={k: v for k, v in failing.items()}, incomplete=incomplete, checks=len(cases), notes=notes)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# Rows of these backends are the package's own; the others are peers (peers.py, the reference package).
OURS = ("triton", "cuda", "chunked", "cpu")


def _bench_table(rows: list[dict], mm: dict) -> list[str]:
    """One line per row. Rows of one mode, M, N and sampling saw the same inputs: "loss rel. diff"
    is against the reference package's row of them where there is one, else their first measured
    row; "x fastest" divides a row's time and peak by those of the fastest of our backends there."""
    lines = ["| backend | mode | M | N | d | sampling | fwd ms | fwd+bwd ms | peak MiB | model TFLOP/s "
             "| % of mm | loss | loss rel. diff | time x fastest | memory x fastest |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ok = [r for r in rows if r["status"] == "ok"]

    def group(r):
        return r["mode"], r["M"], r["N"], r["sampling"]

    anchors, fastest = {}, {}
    for r in ok:
        if group(r) not in anchors or r["backend"] == "symile":
            anchors[group(r)] = r
        if r["backend"] in OURS and (group(r) not in fastest or r["fwd_bwd_ms"] < fastest[group(r)]["fwd_bwd_ms"]):
            fastest[group(r)] = r
    for r in rows:
        head = f"| {r['backend']} | {r['mode']} | {r['M']} | {r['N']} | {r['d']} | {r['sampling']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']} | | | | | | | | |")
            continue
        share = None if not r.get("model_tflops") or not mm.get(r["mode"]) else 100 * r["model_tflops"] / mm[r["mode"]]
        best = fastest.get(group(r))
        time_ratio = None if best is None else r["fwd_bwd_ms"] / best["fwd_bwd_ms"]
        mem_ratio = None if best is None or best["peak_mb"] <= 0 else r["peak_mb"] / best["peak_mb"]
        anchor = anchors[group(r)]
        diff = None if anchor is r else abs(r["loss"] - anchor["loss"]) / max(abs(anchor["loss"]), 1e-30)
        lines.append(head + f"| {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['peak_mb']:.0f} "
                     f"| {_fmt(r.get('model_tflops'), '.2f')} | {_fmt(share, '.0f')} | {r['loss']:.6g} | {_fmt(diff, '.1e')} "
                     f"| {_fmt(time_ratio, '.2f')} | {_fmt(mem_ratio, '.2f')} |")
    return lines


def lists_checked(rows: list[dict]) -> dict:
    """{list name: {mode: [configuration indices]}} that the Triton jobs' pins launched
    (``configs_used`` of their summaries): what the sweep checked of each list."""
    checked = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if r.get("kind") == "check_job" and r.get("status", "ok") == "ok":
            for name, index in (r.get("configs_used") or {}).items():
                checked[name][r["mode"]].add(index)
    return {name: {mode: sorted(i) for mode, i in modes.items()} for name, modes in checked.items()}


def unchecked_configs(rows: list[dict]) -> list[str]:
    """"<list> config <i>" for each configuration of the GPU's lists that no passing job launched."""
    configs = next((r for r in rows if r.get("kind") == "configs"), {})
    checked = lists_checked(rows)
    return [f"{name} config {i}" for name, count in sorted((configs.get("counts") or {}).items())
            for i in range(count) if not any(i in done for done in checked.get(name, {}).values())]


def _lists_table(rows: list[dict]) -> list[str]:
    configs = next((r for r in rows if r.get("kind") == "configs"), {})
    checked = lists_checked(rows)
    lines = ["| Triton list | configurations | checked (mode: indices) |", "| --- | --- | --- |"]
    for name, count in sorted((configs.get("counts") or {}).items()):
        done = "; ".join(f"{mode}: {', '.join(map(str, i))}" for mode, i in sorted(checked.get(name, {}).items()))
        lines.append(f"| {name} | {count} | {done or 'NONE'} |")
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


STAGES = (("headline", "Headline: every fused backend, bf16, M = 3 n_squared"),
          ("peers", "Against the reference package symile 0.1.0 and plain PyTorch (M = 3 n_squared, where they fit)"),
          ("n", 'Sampled negatives, "n" (M = 3): the reference package and materialised cross-entropy'),
          ("clip", "CLIP (M = 2): materialised logits with F.cross_entropy (open_clip's ClipLoss formula)"),
          ("fused", "Fused backends in the other float32 modes (M = 3 n_squared)"),
          ("scale", "Scale rows (time guard: skipped rows did not fit the budget)"))


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
            out.append(f"- Triton configuration lists of {r.get('arch', '?')}: {r['how']}; {r.get('counts') or {}}; "
                       f"d = 256 takes {', '.join(r.get('headline') or []) or '-'}")
        elif r.get("kind") in ("pytest", "sanitizer"):
            what, log = ((f"pytest (`{r.get('command', '-')}`)", "tests.log") if r["kind"] == "pytest" else
                         (f"compute-sanitizer --tool {r['tool']} ({r['backend']})", "sanitizer.log"))
            out.append(f"- {what}: {r['status']}; {r.get('summary', '')} in {r.get('seconds', 0):.0f} s; log: {log}")
    out += ["", "## Correctness against the float64 oracle (docs/math.md section 6.1)", ""] + _check_table(rows)
    if (next((r for r in rows if r.get("kind") == "configs"), {}).get("counts")):
        out += ["", "Triton configurations launched by pinned oracle checks (each list of this GPU's "
                "architecture, pinned by list):", ""] + _lists_table(rows)
    failed = [r for r in rows if r.get("kind") == "check" and not r["ok"]]
    if failed:
        out += ["", "Failing cases (first 20):", ""]
        out += [f"- {r['backend']} {r['mode']} config {r.get('config')}: M={r['M']} N={r['N']} d={r['d']} "
                f"{r['sampling']} {r['inputs']} tau={r['tau']}: " + (r.get("error") or
                f"loss {r['loss_err']:.3g} (tol {r['loss_tol']}), {r['worst_grad']} {r['grad_err']:.3g} "
                f"(tol {r['grad_tol']})") for r in failed[:20]]

    mm = {r["mode"]: r["tflops"] for r in rows if r.get("kind") == "mm"}
    bench = [r for r in rows if r.get("kind") == "bench"]
    for stage, title in STAGES:
        selected = [r for r in bench if r.get("stage") == stage]
        if selected:
            out += ["", f"## {title}", ""] + _bench_table(selected, mm)
    if mm:
        out += ["", "Dense matrix product rate (torch.mm, same run), TFLOP/s: "
                + ", ".join(f"{mode} {rate:.1f}" for mode, rate in mm.items())]
    out += ["", "Times: medians of CUDA-event timings after a warm-up; peak: torch.cuda.max_memory_allocated of "
            "one forward+backward above the inputs; model FLOPs: 6 N^3 d (n_squared) or 6 M N^2 d (n), "
            "docs/math.md section 5; tau = 14.3, unit rows; loss: the value on the row's inputs at a fixed seed."]
    out += ["", "## Machine", "", "```"] + [f"{k}: {v}" for k, v in info.items() if k != "kind"] + ["```"]
    return "\n".join(out)
