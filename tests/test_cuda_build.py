"""The CUDA backend's sources built without a GPU, and its registration (csrc/cuda, symile_kernels/cuda.py).

* every ``.cu`` file compiles with nvcc for sm_80 and sm_90 with warnings as
  errors (skipped with a message where nvcc is absent), and ``binding.cpp``
  compiles (syntax only) against torch's headers;
* ``plan.h``'s host logic (tile configurations, shared-memory layouts, launch
  geometry, argument checks) passes ``csrc/cuda/plan_test.cpp`` (g++);
* the backend is registered, not preferred automatically, and says why it cannot
  run on CPU tensors.

The kernels' results: tests/test_cuda_emulation.py (CPU) and tests/test_cuda_gpu.py.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from symile_kernels import _build, backends, symile_loss

from cuda_common import CSRC, CU_FILES, CUDA, no_gpu_only, start_builds


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return start_builds(tmp_path_factory.mktemp("cuda_build"), ("nvcc", "plan", "binding"))


@no_gpu_only
@pytest.mark.parametrize("cu_file", CU_FILES)
def test_cu_file_compiles_for_sm80_sm90_without_warnings(builds, cu_file):
    rc, output, seconds = builds.result(f"nvcc:{cu_file}")
    assert rc == 0, f"nvcc failed on {cu_file}:\n{output}"
    assert "warning" not in output.lower(), f"nvcc warned on {cu_file}:\n{output}"
    print(f"{cu_file}: compiled for sm_80 + sm_90 in {seconds:.0f} s")


def test_mode_map_matches_plan_h():
    import re

    enum = (CSRC / "plan.h").read_text().split("enum Mode", 1)[1].split("};", 1)[0]
    found = {name.lower(): int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert found == _build.MATH_MODES


def test_every_cu_file_is_built_by_the_extension():
    import symile_kernels.cuda as cuda_backend

    assert CU_FILES and set(CU_FILES) <= set(cuda_backend.SOURCES)
    assert all((CSRC / s).exists() for s in cuda_backend.SOURCES)


@no_gpu_only
def test_binding_compiles_against_torch_headers(builds):
    rc, output, seconds = builds.result("binding")
    assert rc == 0, f"binding.cpp does not compile against torch's headers:\n{output}"


@no_gpu_only
def test_host_planning_logic(builds):
    rc, output, _ = builds.result("plan")
    assert rc == 0, f"plan_test.cpp does not compile:\n{output}"
    run = subprocess.run([str(builds.out / "plan_test")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr


def test_registered_and_not_auto_preferred():
    assert backends._MODULES.get("cuda") == "symile_kernels.cuda"
    order = backends._AUTO_ORDER["cuda"]
    assert order.index("cuda") > order.index("triton")


def test_cpu_tensors_are_refused_with_a_reason():
    reason = backends.unavailable_reason("cuda", torch.device("cpu"))
    assert reason is not None and "CUDA tensors only" in reason
    assert "cuda" not in backends.available_backends("cpu")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        symile_loss([torch.randn(3, 4) for _ in range(3)], 1.0, backend="cuda")


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_no_cuda_reason():
    reason = backends.unavailable_reason("cuda", torch.device("cuda"))
    assert reason is not None and ("no CUDA" in reason or "no CUDA device" in reason), reason


def test_math_mode_switch(monkeypatch):
    import symile_kernels.cuda as cuda_backend

    assert cuda_backend.math_mode(torch.float64) == 0
    monkeypatch.setenv(cuda_backend.MATH_ENV, "bf16")
    assert cuda_backend.math_mode(torch.float32) == 2 and cuda_backend.math_mode(torch.float64) == 0
    monkeypatch.setenv(cuda_backend.MATH_ENV, "fast")
    with pytest.raises(ValueError, match=cuda_backend.MATH_ENV):
        cuda_backend.math_mode(torch.float32)
