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

    Built with -O3 and -march=native (the build machine's vector instructions);
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
    return [CppExtension("symile_kernels._cpu_kernels", ["csrc/cpu/symile_cpu.cpp"],
                         extra_compile_args={"cxx": flags})]


def _cuda_extensions():
    """The CUDA backend's extension (issue: fused CUDA kernels); none yet."""
    return []


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
