"""pytest-benchmark plumbing of the loss benchmarks (benchmarks/test_bench_loss.py).

    python -m pytest benchmarks/ --benchmark-only -m small      # CI's tiny set
    python -m pytest benchmarks/ --benchmark-only               # the full set (README figures)

The rate of a dense ``torch.mm`` (the denominator of every "fraction of
torch.mm" figure) is measured once per session, before the configurations; with
``--benchmark-disable`` (plumbing only) a small product stands in for it. At the
end, a markdown table of the rows (the README's format) follows pytest-benchmark's
own tables.
"""
import pytest
import torch

from symile_kernels.benchmarking import DTYPES, mm_tflops

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
    write("| configuration | backend | fwd+bwd ms (median) | peak MiB | model TFLOP/s | % of torch.mm |")
    write("| --- | --- | --- | --- | --- | --- |")
    for r in _ROWS:
        mode = "CLIP" if r["loss"] == "clip" else f'"{r["sampling"]}"'
        write(f"| {mode}, M = {r['M']}, N = {r['N']}, d = {r['d']} | {r['backend']} "
              f"| {1e3 * r['fwd_bwd_median_s']:.0f} | {r['peak_mib']:.0f} | {r['model_tflops']:.3f} "
              f"| {100 * r['fraction_of_mm']:.0f} |")
    write(f"torch.mm (float32 4096 x 4096) in this session: {_ROWS[0]['mm_tflops']:.3f} TFLOP/s, "
          f"{_ROWS[0]['threads']} threads")


@pytest.fixture(scope="session")
def mm_rate(request) -> dict:
    """``{(device, dtype): TFLOP/s}`` of torch.mm, filled on first use per device and dtype."""
    rates = {}
    disabled = request.config.getoption("benchmark_disable", False)

    def rate(device: str, dtype: str) -> float:
        key = (device, dtype)
        if key not in rates:
            dev = torch.device(device)
            # On the CPU, float32 (the README's denominator); on a GPU, the run's dtype.
            mm_dtype = DTYPES[dtype] if dev.type == "cuda" else torch.float32
            rates[key] = mm_tflops(dev, mm_dtype, size=256 if disabled else 4096, repeats=1 if disabled else 5)
        return rates[key]

    return rate
