"""pytest-benchmark plumbing of the loss benchmarks (benchmarks/test_bench_loss.py).

    python -m pytest benchmarks/ --benchmark-only -m small      # CI's tiny set
    python -m pytest benchmarks/ --benchmark-only               # the full set (README figures)

The rate of a dense ``torch.mm`` (the denominator of every "fraction of
torch.mm" figure) is measured just before and just after each configuration; with
``--benchmark-disable`` (plumbing only) a small product stands in for it. At the
end, a markdown table of the rows (the README's format) follows pytest-benchmark's
own tables.
"""
import pytest
import torch

from timing import DTYPES, mm_tflops

_ROWS: list = []


@pytest.fixture(scope="session")
def bench_rows() -> list:
    """The benchmark tests append their ``extra_info`` here for the summary table."""
    return _ROWS


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("| configuration | backend | fwd+bwd ms (median) | peak MiB | model TFLOP/s | torch.mm TFLOP/s "
          "| % of torch.mm |")
    write("| --- | --- | --- | --- | --- | --- | --- |")
    for r in _ROWS:
        mode = "CLIP" if r["loss"] == "clip" else f'"{r["sampling"]}"'
        write(f"| {mode}, M = {r['M']}, N = {r['N']}, d = {r['d']} | {r['backend']} "
              f"| {1e3 * r['fwd_bwd_median_s']:.0f} | {r['peak_mib']:.0f} | {r['model_tflops']:.3f} "
              f"| {r['mm_tflops']:.3f} | {100 * r['fraction_of_mm']:.0f} |")
    write(f"torch.mm: float32 4096 x 4096, {_ROWS[0]['threads']} threads, the mean of its rates measured "
          "just before and just after each configuration")


@pytest.fixture(scope="session")
def mm_rate(request):
    """A function ``(device, dtype) -> TFLOP/s`` that measures torch.mm's rate when called.

    The benchmark tests call it just before and just after each configuration's rounds: on a
    shared machine the rate drifts by a few percent over minutes, so a rate measured once at the
    start of a session would turn that drift into error in the configurations' fractions.
    """
    disabled = request.config.getoption("benchmark_disable", False)

    def rate(device: str, dtype: str) -> float:
        dev = torch.device(device)
        # On the CPU, float32 (the README's denominator); on a GPU, the run's dtype.
        mm_dtype = DTYPES[dtype] if dev.type == "cuda" else torch.float32
        return mm_tflops(dev, mm_dtype, size=256 if disabled else 4096, repeats=1 if disabled else 3)

    return rate
