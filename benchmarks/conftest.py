"""pytest-benchmark plumbing of the loss benchmarks (benchmarks/test_bench_loss.py).

    python -m pytest benchmarks/ --benchmark-only -m small      # CI's tiny set
    python -m pytest benchmarks/ --benchmark-only               # the full set (README figures)

The rate of a dense ``torch.mm`` (the denominator of every "fraction of
torch.mm" figure) is measured once per session, before the configurations; with
``--benchmark-disable`` (plumbing only) a small product stands in for it.
"""
import pytest
import torch

from symile_kernels.benchmarking import DTYPES, mm_tflops


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
