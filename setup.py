"""Builds symile_kernels and, where a toolchain is present, its compiled backends.

``pip install -e ".[test]"`` (build isolation: pip's build environment has no
torch, see pyproject.toml) installs pure Python, and the package JIT-builds its
extensions on first use. ``pip install --no-build-isolation -e ".[test]"`` lets
this script import the torch already installed and build them ahead of time.
Environment switches: SYMILE_KERNELS_NO_EXTENSIONS=1 skips every compiled
extension (the package then JIT-builds on first use where it can).
"""
import importlib.util
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


def _load_build_settings():
    """symile_kernels/_build.py (compiler flags, architectures, sources), loaded by path: it is
    torch-free, and importing the package itself here would need it installed."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "symile_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("symile_kernels_build_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build_settings()


def _cpu_extensions():
    """The C++ CPU backend's extension ``symile_kernels._cpu_kernels`` (csrc/cpu/).

    Flags from symile_kernels/_build.py: -O3, -fopenmp (Linux), -march=native;
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

    return [CppExtension("symile_kernels._cpu_kernels", list(BUILD.CPU_SOURCES),
                         extra_compile_args={"cxx": BUILD.cpu_cxx_flags()}, extra_link_args=BUILD.openmp_flags())]


def _cuda_extensions():
    """The CUDA backend's extension ``symile_kernels._cuda_kernels`` (csrc/cuda/).

    Built when torch has CUDA and nvcc is found (CUDA_HOME, else PATH); skipped,
    with a note, otherwise or when SYMILE_KERNELS_NO_CUDA=1 (the package then
    JIT-builds it on first use on a CUDA machine, see symile_kernels/cuda.py).
    Architectures: TORCH_CUDA_ARCH_LIST, torch's standard switch; when unset,
    "8.0;9.0+PTX" (sm_80 cubins also run on sm_86/sm_89; the PTX lets newer GPUs
    JIT). Flags and sources: symile_kernels/_build.py, which the JIT build reads too.
    """
    import sys

    if os.environ.get("SYMILE_KERNELS_NO_CUDA") == "1":
        return []
    import torch

    if torch.version.cuda is None:
        print("symile_kernels: torch has no CUDA; skipping the CUDA extension", file=sys.stderr)
        return []
    # The toolkit root from the real compiler when nvcc is a symlink or wrapper script, set before
    # torch.utils.cpp_extension reads CUDA_HOME (symile_kernels/_build.py, resolve_cuda_home).
    BUILD.apply_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if CUDA_HOME is None:
        print("symile_kernels: nvcc not found (set CUDA_HOME); skipping the CUDA extension", file=sys.stderr)
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD.DEFAULT_CUDA_ARCH_LIST)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [f"{BUILD.CUDA_SOURCE_DIR}/{name}" for name in BUILD.CUDA_SOURCES]
    return [CUDAExtension("symile_kernels._cuda_kernels", sources,
                          include_dirs=[os.path.join(here, BUILD.CUDA_SOURCE_DIR)],
                          extra_compile_args={"cxx": list(BUILD.CUDA_CXX_FLAGS), "nvcc": list(BUILD.NVCC_FLAGS)})]


def _torch_importable() -> bool:
    """True when the build can see torch (``--no-build-isolation``, or a build environment
    that has it); pip's isolated build environment does not, by design (pyproject.toml)."""
    import sys

    try:
        import torch  # noqa: F401
    except ImportError:
        print("symile_kernels: torch is not importable in this build environment; installing pure Python. "
              "The compiled backends JIT-build on first use (or reinstall with --no-build-isolation).",
              file=sys.stderr)
        return False
    return True


def _extensions():
    if os.environ.get("SYMILE_KERNELS_NO_EXTENSIONS") == "1" or not _torch_importable():
        return [], {}
    ext_modules = _cpu_extensions() + _cuda_extensions()
    if not ext_modules:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return ext_modules, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the built package as symile_kernels/csrc/, so that a wheel
    without compiled extensions (build isolation: no torch) can JIT-build them on first use.
    Editable installs read csrc/ in the checkout instead (symile_kernels/_build.source_root)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        import shutil

        here = os.path.dirname(os.path.abspath(__file__))
        for folder, _, names in os.walk(os.path.join(here, "csrc")):
            for name in names:
                if name.endswith(BUILD.CSRC_SUFFIXES):
                    relative = os.path.relpath(os.path.join(folder, name), here)
                    target = os.path.join(self.build_lib, "symile_kernels", relative)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(os.path.join(here, relative), target)


ext_modules, cmdclass = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    packages=find_packages(include=["symile_kernels", "symile_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
