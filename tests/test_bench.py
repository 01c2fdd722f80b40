"""The benchmark script's plumbing at a tiny size (timings are not checked: they are the script's job)."""
import json
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"


def test_bench_loss_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--backends", "chunked", "reference", "--N", "6",
                           "--d", "3", "--repeats", "1", "--warmup", "0", "--no-mm", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["chunked", "reference"]
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["peak_mb"] >= 0 for r in result["rows"])
    assert result["info"]["torch"]
    assert "| chunked | 3 | 6 | 3 | float32 |" in done.stdout


def test_benchmarks_page_is_what_the_results_give():
    # docs/benchmarks.md is generated from benchmarks/results/: a new result file without a rerun of
    # the generator (python benchmarks/render_docs.py) fails here.
    script = BENCH.parent / "render_docs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
