"""Build settings of the compiled backends, in one place.

Torch-free and import-free so that ``setup.py`` can load it by path before the
package (or torch) is importable. ``setup.py``, the JIT loaders in ``cpu.py`` and
``cuda.py``, and the CUDA tests all read these; ``MATH_MODES`` must equal the
``Mode`` enum of csrc/cuda/plan.h (a test checks it).
"""
from __future__ import annotations

import os
import sys

CPU_SOURCES = ("csrc/cpu/symile_cpu.cpp",)  # relative to source_root()
CUDA_SOURCE_DIR = "csrc/cuda"
CUDA_SOURCES = ("binding.cpp", "cube.cu", "pair.cu")  # in CUDA_SOURCE_DIR

# Files of csrc/ that a wheel carries (as symile_kernels/csrc/) for JIT builds on first use.
CSRC_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_root(package_dir) -> str:
    """The directory that holds ``csrc/``: the package itself when installed from a wheel
    (setup.py copies csrc/ into it), else the checkout above it (editable installs)."""
    if os.path.isdir(os.path.join(package_dir, "csrc")):
        return str(package_dir)
    return os.path.dirname(os.path.abspath(package_dir))


# TORCH_CUDA_ARCH_LIST when the user sets none: sm_80 cubins also run on sm_86/sm_89;
# the sm_90 PTX lets newer GPUs JIT.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
CUDA_CXX_FLAGS = ("-O3",)
# The defines torch's CUDAExtension adds to every nvcc command: a stand-alone nvcc
# check (tests) passes them too, so that it compiles what the build compiles.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")

# The ``mode`` argument of the CUDA operators: how float32 tile products are computed.
MATH_MODES = {"ieee": 0, "tf32": 1, "bf16": 2}


def openmp_flags(platform: str = sys.platform) -> list[str]:
    """-fopenmp on Linux: at::parallel_for only runs in parallel when the extension is
    compiled with OpenMP (torch's CPU builds use GNU OpenMP there); elsewhere it is serial."""
    return ["-fopenmp"] if platform.startswith("linux") else []


def cpu_cxx_flags(platform: str = sys.platform) -> list[str]:
    """C++ flags of the CPU extension: -O3, -march=native unless SYMILE_KERNELS_PORTABLE=1
    (a binary for any x86-64/arm64 CPU), and OpenMP on Linux; none with MSVC."""
    if platform == "win32":
        return []
    flags = ["-O3"]
    if os.environ.get("SYMILE_KERNELS_PORTABLE") != "1":
        flags.append("-march=native")
    return flags + openmp_flags(platform)


def gencode_flags(arch_list: str = DEFAULT_CUDA_ARCH_LIST, ptx: bool = True) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST-style string ("8.0;9.0+PTX"):
    a cubin per architecture, and PTX for those marked +PTX when ``ptx``."""
    flags = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        number = arch.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if ptx and arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags
