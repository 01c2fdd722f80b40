"""What the compiler made of the CUDA kernels: SASS and ptxas resource reports, no GPU needed.

cube.cu and pair.cu are compiled for sm_80 and sm_90 with ``-Xptxas -v`` (the
flags of the extension build) and disassembled with ``cuobjdump -sass`` (the
CUDA toolkit's, else the copy shipped with Triton). Per kernel:

* the bf16 and TF32 kernels run their tile products on tensor cores (HMMA);
* their global rows load in 16-byte pieces (LDG.E.128) where aligned;
* no kernel's static shared memory exceeds the 48 KiB a launch gets without
  opting in (dynamic shared memory is planned per device in plan.h, checked by
  plan_test.cpp against the device's limit);
* no kernel spills registers (the bf16 kernels are issue 13's requirement;
  every kernel holds today): each asks ptxas for its planned CTAs per SM
  through ``__launch_bounds__`` (plan.h ``kMinCtas*``);
* the pair kernels and the cube forward (every mode) fit 128
  registers per thread: two 256-thread CTAs per SM;
* so do both cube backward passes, in every mode, and on sm_80 their static shared memory
  plus the dynamic shared memory plan.h plans for an A100 (bf16, TF32 and IEEE float32 at
  d = 256, float64 at d = 192) fit two CTAs per SM (issue 13);
* z tiles (and the pair forward's column tiles) in the tiles' own type (bf16 rows in
  bf16 tiles, float32 rows in TF32 tiles) reach shared memory through cp.async
  (LDGSTS.E.BYPASS.128, committed by LDGDEPBAR, waited by DEPBAR);
* the bf16 and TF32 kernels load their fragments with ``ldmatrix`` (LDSM.16.M88.4)
  into ``mma.sync`` (HMMA.16816 / HMMA.1688); built with ``-DSK_BF16_WMMA``
  (the WMMA fragments kept to compare) the bf16 kernels have no LDSM and still do not
  spill.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"]
ARCHS = ("sm_80", "sm_90")
STATIC_SMEM_LIMIT = 48 * 1024


def _cuobjdump() -> "str | None":
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _policy(name: str) -> str:
    return "bf16" if "Bf16Policy" in name else "tf32" if "Tf32Policy" in name else "other"


class Kernel:
    def __init__(self, name: str, arch: str):
        self.name, self.arch, self.policy = name, arch, _policy(name)
        self.sass = ""
        self.spill_bytes = 0
        self.static_smem = 0
        self.registers = 0


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict:
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA sources were not compiled")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's copy)")
    out = tmp_path_factory.mktemp("sass")
    found: dict = {}
    for source in ("cube.cu", "pair.cu"):
        obj = out / (source + ".o")
        done = subprocess.run([NVCC, "-c", source, "-o", str(obj), *FLAGS], cwd=CSRC, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        current = None
        for line in (done.stdout + done.stderr).splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
            if m:
                current = found.setdefault((m.group(1), m.group(2)), Kernel(m.group(1), m.group(2)))
            elif current is not None:
                if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                    current.spill_bytes = int(m.group(1)) + int(m.group(2))
                if m := re.search(r"Used (\d+) registers", line):
                    current.registers = int(m.group(1))
                if m := re.search(r"(\d+) bytes smem", line):
                    current.static_smem = int(m.group(1))
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
        assert sass.returncode == 0, sass.stderr
        arch = None
        for block in re.split(r"\n(?=\s*(?:code for sm_\d+|Function : ))", sass.stdout):
            if m := re.match(r"\s*code for (sm_\d+)", block):
                arch = m.group(1)
            elif m := re.match(r"\s*Function : (\S+)", block):
                found.setdefault((m.group(1), arch), Kernel(m.group(1), arch)).sass = block
    assert found, "no kernels found in the ptxas report"
    return found


def _of(kernels: dict, policy: str, arch: str) -> list:
    chosen = [k for k in kernels.values() if k.policy == policy and k.arch == arch]
    assert chosen, f"no {policy} kernels for {arch}"
    return chosen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy,hmma", [("bf16", "HMMA.16816.F32.BF16"), ("tf32", "HMMA.1688.F32.TF32")])
def test_tensor_core_kernels_use_hmma(kernels, arch, policy, hmma):
    for k in _of(kernels, policy, arch):
        assert k.sass, f"{k.name} missing from the SASS"
        assert hmma in k.sass, f"{k.name} ({arch}) has no {hmma}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["bf16", "tf32"])
def test_tile_kernels_load_rows_in_16_byte_pieces(kernels, arch, policy):
    for k in _of(kernels, policy, arch):
        assert re.search(r"LDG\.E\.128", k.sass), f"{k.name} ({arch}) has no 16-byte global load"


@pytest.mark.parametrize("arch", ARCHS)
def test_static_shared_memory_within_limit(kernels, arch):
    for k in kernels.values():
        if k.arch == arch:
            assert k.static_smem <= STATIC_SMEM_LIMIT, f"{k.name}: {k.static_smem} bytes"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["bf16", "tf32"])
def test_fragments_load_with_ldmatrix(kernels, arch, policy):
    for k in _of(kernels, policy, arch):
        assert "LDSM.16.M88.4" in k.sass, f"{k.name} ({arch}) has no LDSM"
        if policy == "bf16" and "backward" in k.name:  # contractions G (x) z, G^T (x) (x * y): B by rows of k
            assert "LDSM.16.MT88.4" in k.sass, f"{k.name} ({arch}) has no transposed LDSM"


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_kernels_do_not_spill(kernels, arch):
    spilled = {k.name: k.spill_bytes for k in _of(kernels, "bf16", arch) if k.spill_bytes}
    assert not spilled, spilled


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_spills(kernels, arch):
    chosen = [k for k in kernels.values() if k.arch == arch and k.registers]
    assert chosen, f"no ptxas report for {arch}"
    spilled = {k.name: k.spill_bytes for k in chosen if k.spill_bytes}
    assert not spilled, spilled


@pytest.mark.parametrize("arch", ARCHS)
def test_pair_kernels_fit_two_ctas_per_sm_in_registers(kernels, arch):
    # plan.h kMinCtasPairForward / kMinCtasPairBackward = 2: 65536 registers / (2 x 256 threads).
    pair = [k for k in kernels.values() if k.arch == arch and re.search(r"pair_(forward|backward)_kernel", k.name)]
    assert len(pair) >= 2 * 6, [k.name for k in pair]  # forward and backward per (rows, policy)
    over = {k.name: k.registers for k in pair if not 0 < k.registers <= 128}
    assert not over, over


@pytest.mark.parametrize("arch", ARCHS)
def test_cube_forward_fits_two_ctas_per_sm_in_registers(kernels, arch):
    # plan.h kMinCtasCubeForward = 2 (128 registers) for every forward, float32 rows in TF32 tiles included.
    fwd = [k for k in kernels.values() if k.arch == arch and "cube_forward_kernel" in k.name]
    assert len(fwd) == 6, [k.name for k in fwd]  # (float, float) x 3 policies, double, bf16 rows, fp16 rows
    over = {k.name: k.registers for k in fwd if not 0 < k.registers <= 128}
    assert not over, over


@pytest.mark.parametrize("arch", ARCHS)
def test_z_tiles_copy_through_cp_async(kernels, arch):
    pattern = r"(cube_\w+|pair_forward)_kernelI(f13__nv_bfloat16NS_10Bf16|ffNS_10Tf32)Policy"
    chosen = [k for k in kernels.values() if k.arch == arch and re.search(pattern, k.name)]
    assert len(chosen) == 8, [k.name for k in chosen]  # 3 cube kernels and the pair forward, 2 (rows, tiles)
    for k in chosen:
        assert "LDGSTS.E.BYPASS.128" in k.sass and "LDGDEPBAR" in k.sass, f"{k.name} ({arch}) has no cp.async"


def test_wmma_bf16_tiles_compile_without_spills(tmp_path):
    # The WMMA fragments (-DSK_BF16_WMMA, csrc/cuda/tile_engines.cuh kBf16Ldmatrix) stay buildable to compare:
    # pair.cu built with them for sm_80 has HMMA but no LDSM in its bf16 kernels, and no spills.
    if NVCC is None or _cuobjdump() is None:
        pytest.skip("nvcc or cuobjdump not found")
    obj = tmp_path / "pair_wmma.o"
    flags = [f for f in FLAGS if "compute_90" not in f and "sm_90" not in f]
    flags = [f for i, f in enumerate(flags) if not (f == "-gencode" and i + 1 < len(flags) and flags[i + 1] == "-Xptxas")]
    done = subprocess.run([NVCC, "-c", "pair.cu", "-o", str(obj), "-DSK_BF16_WMMA", *flags], cwd=CSRC,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", done.stdout + done.stderr)
    sass = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    bf16 = [b for b in re.split(r"\n(?=\s*Function : )", sass) if "Bf16Policy" in b.split("\n", 1)[0]]
    assert len(bf16) == 6, len(bf16)
    for block in bf16:
        assert "LDSM" not in block and "HMMA.16816.F32.BF16" in block, block.split("\n", 1)[0]


# Two CTAs per A100 SM: 164 KiB of shared memory per SM, 1 KiB reserved per CTA (plan.h two_cta_smem).
A100_SMEM_PER_SM, A100_OPTIN, CTA_RESERVE = 167936, 166912, 1024
_PLAN_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "plan.h"
int main(int argc, char** argv) {
  using namespace symile_cuda;
  const long long D = std::atoll(argv[3]);
  const CubeBackwardPlan p = plan_cube_backward(4096, 4096, 4096, D, config_for(std::atoi(argv[1]), std::atoi(argv[2])),
                                                108, std::atoll(argv[4]));
  std::printf("%zu %zu %lld\n", p.pair_smem, p.z_smem, (long long)p.num_slabs);
}
"""


def _backward_smem(tmp_path, mode: int, elem: int, d: int) -> "tuple[int, int, int]":
    """plan.h's dynamic shared memory of pass "pairs" and pass "z" (and the slab count) for a
    4096-row cube at feature size d on an A100 (g++, no GPU)."""
    gxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++) found")
    exe = tmp_path / "plan_probe"
    if not exe.exists():
        (tmp_path / "plan_probe.cpp").write_text(_PLAN_PROBE)
        done = subprocess.run([gxx, "-std=c++17", "-O1", "-I", str(CSRC), str(tmp_path / "plan_probe.cpp"), "-o",
                               str(exe)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    out = subprocess.run([str(exe), str(mode), str(elem), str(d), str(A100_OPTIN)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def test_cube_backward_fits_two_ctas_per_a100_sm(kernels, tmp_path):
    # plan.h kMinCtasCubePairs = kMinCtasCubeZ = 2: at most 128 registers per thread (65536 / (2 x 256))
    # and, at the planned shared memory, two CTAs' static + dynamic bytes plus their reserves per SM.
    backward = [k for k in kernels.values() if re.search(r"cube_backward_(pairs|z)_kernel", k.name)]
    assert len(backward) == 2 * 6 * len(ARCHS), [k.name for k in backward]  # 2 passes x (rows, policy) x archs
    over = {(k.name, k.arch): k.registers for k in backward if not 0 < k.registers <= 128}
    assert not over, over
    # (mode, element size, d) per kernel: T, TIn and the policy in the mangled name.
    configs = {"ffNS_10Bf16Policy": (2, 4, 256), "f13__nv_bfloat16NS_10Bf16Policy": (2, 4, 256),
               "ffNS_10Tf32Policy": (1, 4, 256), "f6__halfNS_10Tf32Policy": (1, 4, 256),
               "ffNS_10IeeePolicyIf": (0, 4, 256), "ddNS_10IeeePolicyId": (0, 8, 192)}
    too_big = {}
    for k in backward:
        if k.arch != "sm_80":
            continue
        key = [name for name in configs if f"kernelI{name}" in k.name]
        assert len(key) == 1, k.name
        mode, elem, d = configs[key[0]]
        pair_smem, z_smem, slabs = _backward_smem(tmp_path, mode, elem, d)
        assert slabs == 1, (k.name, slabs)  # full-d accumulators: the logits recomputed once per pass
        dynamic = pair_smem if "pairs" in k.name else z_smem
        if 2 * (k.static_smem + dynamic + CTA_RESERVE) > A100_SMEM_PER_SM:
            too_big[k.name] = k.static_smem + dynamic
    assert not too_big, too_big
