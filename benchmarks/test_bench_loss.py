"""The loss benchmarks as pytest-benchmark tests, one per configuration.

Each test times forward+backward with ``benchmark.pedantic`` (one warm-up round,
then ``rounds`` timed rounds) and records in ``extra_info`` the peak memory of
one forward+backward above the inputs, the model FLOP/s (docs/math.md section
5, ``timing.model_flops``) and their fraction of
``torch.mm``'s rate, measured just before and just after the rounds (their mean). Inputs, losses and the memory
window are ``bench_loss.py``'s (``setup``, ``peak_above``, ``config_flops``), so
the CLI and these tests measure the same way.

Marks: ``small`` (seconds; CI runs them with ``--benchmark-disable``) and
``large`` (the README's figures; minutes each on a 2-core machine). Tests are
grouped by configuration, so each group compares the backends of one size:

    python -m pytest benchmarks/ --benchmark-only -m small
    python -m pytest benchmarks/ --benchmark-only -m large --benchmark-json benchmarks/results/run.json
    python -m pytest benchmarks/ --benchmark-only -m small --benchmark-storage benchmarks/results/pytest \\
        --benchmark-compare --benchmark-compare-fail median:15%

Note: in one process the CPU peak is the process's RSS window
(``benchmarking.reset_peak``), which starts above memory a previous test freed
but did not return; ``bench_loss.py`` (one subprocess per configuration) is the
stricter memory measurement.
"""
from __future__ import annotations

import pytest
import torch

import bench_loss
from symile_kernels import available_backends
from timing import time_ms

TAU = 14.3


def _case(mark, backend, M, N, d, sampling="n", loss="symile", rounds=3):
    config = dict(backend=backend, loss=loss, M=M, N=N, d=d, dtype="float32", sampling=sampling,
                  device="cpu", tau=TAU)
    mode = "clip" if loss == "clip" else sampling
    return pytest.param(config, rounds, marks=mark, id=f"{mode}-M{M}-N{N}-d{d}-{backend}")


def _cases():
    small, large = pytest.mark.small, pytest.mark.large
    cases = []
    for backend in ("symile", "chunked", "cpu"):  # the code paths, at toy sizes
        cases.append(_case(small, backend, 3, 64, 16, sampling="n"))
        cases.append(_case(small, backend, 3, 24, 8, sampling="n_squared"))
    for backend in ("chunked", "cpu"):
        cases.append(_case(small, backend, 2, 64, 16, loss="clip"))
    # The README's tables: "n" sampling (the default of Symile()), CLIP, the cube at d = 64 and d = 128.
    for backend in ("symile", "chunked", "cpu"):
        cases.append(_case(large, backend, 3, 4096, 256, sampling="n"))
    cases.append(_case(large, "cpu", 2, 8192, 512, loss="clip"))
    for backend in ("symile", "chunked", "cpu"):
        cases.append(_case(large, backend, 3, 512, 64, sampling="n_squared"))
    cases.append(_case(large, "cpu", 3, 1024, 64, sampling="n_squared"))
    cases.append(_case(large, "cpu", 3, 1024, 128, sampling="n_squared"))
    return cases


@pytest.mark.parametrize("config,rounds", _cases())
def test_loss(benchmark, mm_rate, bench_rows, config, rounds):
    reason = bench_loss.skip_reason(dict(config), bench_loss.memory_limit_bytes(torch.device(config["device"])))
    if reason is None and config["backend"] != "symile" and config["backend"] not in available_backends("cpu"):
        reason = f"backend {config['backend']} unavailable here"
    if reason is not None:
        pytest.skip(reason)
    device = torch.device(config["device"])
    _, forward_backward = bench_loss.setup(config)
    peak = bench_loss.peak_above(forward_backward, device)  # also the warm-up of compiled kernels
    benchmark.group = f"{'clip' if config['loss'] == 'clip' else config['sampling']} M={config['M']} " \
                      f"N={config['N']} d={config['d']} {config['dtype']}"
    rate_before = mm_rate(config["device"], config["dtype"])
    benchmark.pedantic(forward_backward, rounds=rounds, warmup_rounds=1, iterations=1)
    rate_after = mm_rate(config["device"], config["dtype"])
    if benchmark.disabled:  # plumbing only: one call's time stands in for the median
        seconds = time_ms(forward_backward, device) * 1e-3
    else:
        seconds = benchmark.stats.stats.median
    flops = bench_loss.config_flops(config)
    rate = (rate_before + rate_after) / 2
    model_tflops = flops / seconds / 1e12
    benchmark.extra_info.update(peak_mib=peak / 2 ** 20, model_tflops=model_tflops, mm_tflops=rate,
                                mm_tflops_before=rate_before, mm_tflops_after=rate_after,
                                fraction_of_mm=model_tflops / rate, fwd_bwd_median_s=seconds,
                                threads=torch.get_num_threads(), **config)
    bench_rows.append(dict(benchmark.extra_info))
    assert peak >= 0 and seconds > 0
