"""Builds symile_kernels and, where a toolchain is present, its compiled backends.

Install with ``pip install --no-build-isolation -e ".[test]"`` so that the build
sees the torch already installed (an isolated build would fetch its own).
Environment switches: SYMILE_KERNELS_NO_EXTENSIONS=1 skips every compiled
extension (the package then JIT-builds on first use where it can).
"""
import os

from setuptools import find_packages, setup


def _cpu_extensions():
    """The C++ CPU backend's extension ``symile_kernels._cpu_kernels`` (csrc/cpu/).

    Built with -O3, -fopenmp (Linux) and -march=native (the build machine's vector instructions);
    SYMILE_KERNELS_PORTABLE=1 drops -march=native for a binary that runs on any
    x86-64/arm64 CPU (the kernels then use plain loops). Skipped, with a note,
    when no C++ compiler is found: the package then JIT-builds on first use
    where it can, else reports the "cpu" backend as unavailable.
    """
    import shutil
    import sys

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        print(f"symile_kernels: no C++ compiler ({compiler!r}) found; skipping the CPU extension", file=sys.stderr)
        return []
    from torch.utils.cpp_extension import CppExtension

    flags = [] if sys.platform == "win32" else ["-O3"]
    if os.environ.get("SYMILE_KERNELS_PORTABLE") != "1" and sys.platform != "win32":
        flags.append("-march=native")
    # at::parallel_for only runs in parallel when the extension itself is compiled
    # with OpenMP (torch's CPU builds use GNU OpenMP on Linux); elsewhere it is serial.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return [CppExtension("symile_kernels._cpu_kernels", ["csrc/cpu/symile_cpu.cpp"],
                         extra_compile_args={"cxx": flags + openmp}, extra_link_args=openmp)]


def _cuda_extensions():
    """The CUDA backend's extension ``symile_kernels._cuda_kernels`` (csrc/cuda/).

    Built when torch has CUDA and nvcc is found (CUDA_HOME, else PATH); skipped,
    with a note, otherwise or when SYMILE_KERNELS_NO_CUDA=1 (the package then
    JIT-builds it on first use on a CUDA machine, see symile_kernels/cuda.py).
    Architectures: TORCH_CUDA_ARCH_LIST, torch's standard switch; when unset,
    "8.0;9.0+PTX" (sm_80 cubins also run on sm_86/sm_89; the PTX lets newer GPUs
    JIT). The nvcc flags match symile_kernels.cuda.nvcc_flags().
    """
    import sys

    if os.environ.get("SYMILE_KERNELS_NO_CUDA") == "1":
        return []
    import torch

    if torch.version.cuda is None:
        print("symile_kernels: torch has no CUDA; skipping the CUDA extension", file=sys.stderr)
        return []
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if CUDA_HOME is None:
        print("symile_kernels: nvcc not found (set CUDA_HOME); skipping the CUDA extension", file=sys.stderr)
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/cuda/binding.cpp", "csrc/cuda/cube.cu", "csrc/cuda/pair.cu"]
    return [CUDAExtension("symile_kernels._cuda_kernels", sources,
                          include_dirs=[os.path.join(here, "csrc", "cuda")],
                          extra_compile_args={"cxx": ["-O3"],
                                              "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]})]


def _extensions():
    if os.environ.get("SYMILE_KERNELS_NO_EXTENSIONS") == "1":
        return [], {}
    ext_modules = _cpu_extensions() + _cuda_extensions()
    if not ext_modules:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return ext_modules, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["symile_kernels", "symile_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
