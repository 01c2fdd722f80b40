"""Writes docs/benchmarks.md from the result files under benchmarks/results/, so a rerun of any
benchmark followed by this script regenerates the page.

    python benchmarks/render_docs.py            # rewrites docs/benchmarks.md
    python benchmarks/render_docs.py --check    # exit 1 if docs/benchmarks.md is not what it would write

Each table names its command, date, machine, CPU model, torch threads and git revision, as the
result file recorded them ("not recorded" where an older file did not). Kinds read:

* pytest-benchmark JSON (``python -m pytest benchmarks/ --benchmark-only -m large --benchmark-json F``):
  the newest run in full, the older ones as a history of fwd+bwd medians;
* ``bench_loss.py --json`` and ``bench_distributed.py --json`` files (they record their argv);
* ``tile_rate.py --json`` files;
* GPU suite folders (``gpu-*/results.jsonl``): their headline, peers, "n" and CLIP tables.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PAGE = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
sys.path.insert(0, HERE)


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _kind(data) -> str:
    if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
        return "pytest-benchmark"
    if isinstance(data, dict) and "argv" in data:
        script = os.path.basename(data["argv"][0])
        return {"bench_loss.py": "bench_loss", "bench_distributed.py": "bench_distributed",
                "tile_rate.py": "tile_rate"}.get(script, "other")
    return "other"


def _cpu_of_info(info: dict) -> str:
    processor = info.get("processor") or ""
    return processor if processor not in ("", "x86_64", "aarch64", "i386") else "CPU model not recorded"


def _header(command: str, date: str, machine: str, cpu: str, threads, revision, source: str) -> list[str]:
    return ["", f"`{command}`", "",
            f"- {date[:16].replace('T', ' ')} UTC; machine {machine}; CPU: {cpu}; torch threads: {threads}; "
            f"git revision {revision or 'not recorded'}; raw: `benchmarks/results/{source}`", ""]


def _pytest_benchmark_cpu(data: dict) -> str:
    cpu = data["machine_info"].get("cpu", {})
    brand = cpu.get("brand_raw") or "CPU model not recorded"
    family = f", family {cpu['family']} model {cpu.get('model')}" if cpu.get("family") is not None else ""
    return f"{brand}{family}, {cpu.get('count', '?')} cores"


def _config(bench: dict) -> str:
    e = bench["extra_info"]
    loss = "CLIP" if e.get("loss") == "clip" else f'"{e.get("sampling")}"'
    return f"{loss}, M = {e['M']}, N = {e['N']}, d = {e['d']}"


def _pytest_benchmark(paths: list[str]) -> list[str]:
    runs = sorted(((_load(p), os.path.basename(p)) for p in paths), key=lambda r: r[0]["datetime"])
    data, name = runs[-1]
    extra = data["benchmarks"][0]["extra_info"]
    out = ["## The loss on the CPU (pytest-benchmark, `-m large`)"]
    out += _header(f"python -m pytest benchmarks/ --benchmark-only -m large --benchmark-json benchmarks/results/{name}",
                   data["datetime"], data["machine_info"].get("node", "?"), _pytest_benchmark_cpu(data),
                   extra.get("threads", "?"), data["commit_info"].get("id", "")[:7], name)
    out += ["| configuration | backend | dtype | fwd+bwd ms (median) | peak MiB | model TFLOP/s | torch.mm TFLOP/s "
            "| % of torch.mm |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in data["benchmarks"]:
        e = b["extra_info"]
        out.append(f"| {_config(b)} | `{e['backend']}` | {e.get('dtype', '?')} | {1e3 * b['stats']['median']:.0f} "
                   f"| {e.get('peak_mib', 0):.0f} | {e.get('model_tflops', 0):.3f} | {e.get('mm_tflops', 0):.3f} "
                   f"| {100 * e.get('fraction_of_mm', 0):.0f} |")
    out += ["", "Model FLOPs: `M * 6 N^2 d` for \"n\" and CLIP, `6 N^3 d` for the cube (docs/math.md section 5); "
            "torch.mm is 4096 x 4096 in the same dtype, measured just before and after each configuration. "
            "Peaks are the RSS high-water mark above the inputs (a kernel that allocates little shows 0)."]
    if len(runs) > 1:
        configs = [f"{_config(b)}, `{b['extra_info']['backend']}`" for b in data["benchmarks"]]
        out += ["", "Earlier runs of the same command (fwd+bwd median ms; same machine kind unless the CPU says "
                "otherwise):", "", "| run | CPU | git revision | " + " | ".join(configs) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in configs) + " |"]
        for run, source in runs:
            by_name = {f"{_config(b)}, `{b['extra_info']['backend']}`": b for b in run["benchmarks"]}
            cells = [f"{1e3 * by_name[c]['stats']['median']:.0f}" if c in by_name else "-" for c in configs]
            out.append(f"| `{source}` ({run['datetime'][:16].replace('T', ' ')}) | {_pytest_benchmark_cpu(run)} "
                       f"| {run['commit_info'].get('id', '')[:7]} | " + " | ".join(cells) + " |")
    return out


def _bench_loss(data: dict, source: str) -> list[str]:
    info = data["info"]
    out = _header("python " + " ".join(data["argv"]), info["date"], info.get("machine", "?"), _cpu_of_info(info),
                  info.get("torch_threads", "?"), info.get("git_revision"), source)
    out += ["| backend | M | N | d | dtype | sampling | fwd ms | fwd+bwd ms | peak MiB | model TFLOP/s | % of torch.mm |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mm = data.get("mm_tflops")
    for r in data["rows"]:
        if r.get("status", "ok") != "ok":
            out.append(f"| `{r['backend']}` | {r['M']} | {r['N']} | {r['d']} | {r['dtype']} | {r['sampling']} "
                       f"| {r['status']} | | | | |")
            continue
        share = "-" if not mm or r.get("model_tflops") is None else f"{100 * r['model_tflops'] / mm:.0f}"
        tflops = "-" if r.get("model_tflops") is None else f"{r['model_tflops']:.3f}"
        out.append(f"| `{r['backend']}` | {r['M']} | {r['N']} | {r['d']} | {r['dtype']} | {r['sampling']} "
                   f"| {r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | {r['peak_mb']:.0f} | {tflops} | {share} |")
    if mm:
        out += ["", f"torch.mm (4096 x 4096, same dtype) ran at {mm:.3f} TFLOP/s in the same run."]
    return out


def _bench_distributed(data: dict, source: str) -> list[str]:
    info = data["info"]
    out = _header("python " + " ".join(data["argv"]), info["date"], info.get("machine", "?"), _cpu_of_info(info),
                  "1 per process", info.get("git_revision"), source)
    out += ["| backend | processes | fwd+bwd ms (slowest process) | peak MiB per process | cube elements per process "
            "| share of N^3 |", "| --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        share = r["cube_elements_per_process"] / r["N"] ** 3
        out.append(f"| `{r['backend']}` | {r['world_size']} | {r['fwd_bwd_ms']:.0f} | {r['peak_mb_per_process']:.0f} "
                   f"| {r['cube_elements_per_process']} | {share:.2f} |")
    return out


def _tile_rate(data: dict, source: str) -> list[str]:
    info = data["info"]
    out = _header("python " + " ".join(data["argv"]), info["date"], info.get("machine", "?"), _cpu_of_info(info),
                  data.get("threads", 1), info.get("git_revision"), source)
    out += ["| m x n x k | tile products GFLOP/s | torch.mm GFLOP/s | ratio |", "| --- | --- | --- | --- |"]
    for r in data["rows"]:
        out.append(f"| {r['m']} x {r['n']} x {r['k']} | {r['tile_gflops']:.0f} | {r['mm_gflops']:.0f} "
                   f"| {r['tile_gflops'] / r['mm_gflops']:.2f} |")
    return out


def _gpu_runs(folders: list[str]) -> list[str]:
    import _gpu_report

    out = []
    for folder in sorted(folders, reverse=True):
        rows = _gpu_report.read_rows(os.path.join(folder, "results.jsonl"))
        info = next((r for r in rows if r.get("kind") == "info"), {})
        verdict = _gpu_report.verdict(rows)
        state = "FAIL" if verdict["failing"] else "INCOMPLETE" if verdict["incomplete"] else "PASS"
        name = os.path.basename(folder)
        out += ["", f"### {info.get('gpu', '?')}, {info.get('date', '?')[:10]}: correctness {state}", "",
                f"`{info.get('command', '?')}`; torch {info.get('torch')}, triton {info.get('triton')}, CUDA "
                f"{info.get('cuda')}, driver {info.get('driver')}; host CPU {info.get('processor')}; git revision "
                f"{info.get('git_revision')}; the full report: `benchmarks/results/{name}/results.md`."]
        mm = {r["mode"]: r["tflops"] for r in rows if r.get("kind") == "mm"}
        bench = [r for r in rows if r.get("kind") == "bench"]
        for stage, title in _gpu_report.STAGES:
            selected = [r for r in bench if r.get("stage") == stage]
            if selected:
                out += ["", f"{title}:", ""] + _gpu_report._bench_table(selected, mm)
    return out


def render() -> str:
    files = sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    by_kind: dict = {}
    for path in files:
        by_kind.setdefault(_kind(_load(path)), []).append(path)
    gpu = sorted(p for p in glob.glob(os.path.join(RESULTS, "gpu-*")) if os.path.isfile(os.path.join(p, "results.jsonl")))
    out = ["# Benchmarks", "",
           "Generated by `python benchmarks/render_docs.py` from the files under `benchmarks/results/`; do not edit "
           "by hand. Times are medians; machines here are shared, so compare ratios measured in one run. Work "
           "counts (exact, machine-independent) are in [kernels.md](kernels.md).", "", "## GPU runs"]
    out += _gpu_runs(gpu) if gpu else ["", "None yet: no GPU has been lent to this project. docs/gpu.md says how a "
                                       "lease runs `benchmarks/gpu_suite.py`."]
    if "pytest-benchmark" in by_kind:
        out += [""] + _pytest_benchmark(by_kind["pytest-benchmark"])
    for kind, title, fn in (("bench_loss", "## `bench_loss.py` runs", _bench_loss),
                            ("bench_distributed", "## `gather=True` across processes (`bench_distributed.py`)",
                             _bench_distributed),
                            ("tile_rate", "## The CPU backend's tile products (`tile_rate.py`, one thread)", _tile_rate)):
        paths = sorted(by_kind.get(kind, []), key=lambda p: _load(p)["info"]["date"], reverse=True)
        if paths:
            out += ["", title]
            for path in paths:
                out += fn(_load(path), os.path.basename(path))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/benchmarks.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(PAGE) as f:
            if f.read() != text:
                print("docs/benchmarks.md is out of date: run python benchmarks/render_docs.py", file=sys.stderr)
                return 1
        return 0
    with open(PAGE, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(PAGE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
