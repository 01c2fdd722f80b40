"""The CPU kernels' vectorised float32 exponential (csrc/cpu/vec_rows.h).

Through the internal op ``symile_kernels::cpu_exp_test(x, isa)``: every
instruction set this CPU runs must be within 2 ulp of torch.exp evaluated in
float64 and rounded to float32, on a sweep over [-110, 92] that covers the
subnormal results, and exact on the special values. The kernels themselves are
checked against the oracle at each instruction set (SYMILE_KERNELS_CPU_ISA,
read once per process, hence the subprocesses).
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from symile_kernels import cpu as cpu_backend

_REASON = cpu_backend.load_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

ISAS = ("avx512", "avx2", "scalar")


def _runs(isa: str) -> bool:
    try:
        torch.ops.symile_kernels.cpu_exp_test(torch.zeros(1), isa)
        return True
    except RuntimeError as exc:
        assert "does not run" in str(exc)
        return False


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as integers that are consecutive for consecutive floats."""
    i = t.view(torch.int32).long()
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


@pytest.mark.parametrize("isa", ISAS)
def test_exp_within_two_ulp(isa):
    if not _runs(isa):
        pytest.skip(f"this CPU does not run {isa}")
    # Odd length: the last elements go through the padded remainder path.
    x = torch.cat([torch.linspace(-110.0, 92.0, 3_000_001), -torch.logspace(-30, 30, 10_001),
                   torch.logspace(-30, 1, 10_001)])
    y = torch.ops.symile_kernels.cpu_exp_test(x, isa)
    expected = torch.exp(x.double()).float()
    ulp = (_ordered(y) - _ordered(expected)).abs()
    worst = int(ulp.argmax())
    assert ulp.max() <= 2, f"{isa}: {int(ulp.max())} ulp at x = {x[worst].item()!r}"
    assert (y[x < -104] == 0).all() and (y[x > 89] == float("inf")).all()


@pytest.mark.parametrize("isa", ISAS)
def test_exp_special_values(isa):
    if not _runs(isa):
        pytest.skip(f"this CPU does not run {isa}")
    x = torch.tensor([float("-inf"), -1e30, -200.0, -0.0, 0.0, float("inf"), float("nan")] * 3)
    y = torch.ops.symile_kernels.cpu_exp_test(x, isa)
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, float("inf"), float("nan")] * 3)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])


def test_exp_test_op_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.symile_kernels.cpu_exp_test(torch.zeros(3), "sse9")
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.symile_kernels.cpu_exp_test(torch.zeros(3, dtype=torch.float64), "scalar")


_KERNELS_AT_ISA = """
import torch
from harness import check_against_oracle, make_inputs
g = torch.Generator().manual_seed(0)
check_against_oracle("cpu", make_inputs("unit", 3, 37, 20, g), 100.0, dtype=torch.float32)
check_against_oracle("cpu", make_inputs("unit", 3, 300, 20, g), 100.0, dtype=torch.float32, negative_sampling="n")
check_against_oracle("cpu", make_inputs("huge_row", 3, 29, 7, g), 1.0, dtype=torch.float32)
"""


@pytest.mark.parametrize("isa", ("avx2", "scalar"))
def test_kernels_match_oracle_at_each_isa(isa):
    """The cube and pair kernels with the narrower instruction sets (the default run tests the widest)."""
    if not _runs(isa):
        pytest.skip(f"this CPU does not run {isa}")
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, SYMILE_KERNELS_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _KERNELS_AT_ISA], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tests.parent)
    assert done.returncode == 0, done.stderr[-2000:]
