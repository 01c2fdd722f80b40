"""Build settings of the compiled backends, in one place.

Torch-free and import-free so that ``setup.py`` can load it by path before the
package (or torch) is importable. ``setup.py``, the JIT loaders in ``cpu.py`` and
``cuda.py``, and the CUDA tests all read these; ``MATH_MODES`` must equal the
``Mode`` enum of csrc/cuda/plan.h (a test checks it).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Callable, Mapping, Optional

CPU_SOURCES = ("csrc/cpu/binding.cpp", "csrc/cpu/cube.cpp", "csrc/cpu/pair.cpp")  # relative to source_root()
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


# ``exec /path/to/cuda/bin/nvcc "$@"``: the line of a wrapper script that hands over to the real compiler.
_EXEC_NVCC = re.compile(r"""^\s*exec\s+["']?([^\s"']*/bin/nvcc)["']?(?:\s|$)""", re.MULTILINE)


def _has_runtime_header(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _wrapped_nvcc(script: str) -> Optional[str]:
    """The compiler a shell-script ``nvcc`` execs, or None when it is not such a script."""
    try:
        with open(script, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None  # a binary: the real compiler itself
    match = _EXEC_NVCC.search(head.decode("utf-8", "replace"))
    return match.group(1) if match else None


def resolve_cuda_home(environ: Mapping[str, str] = os.environ,
                      which: Callable[[str], Optional[str]] = shutil.which,
                      default: str = "/usr/local/cuda") -> Optional[str]:
    """The CUDA toolkit's root for the builds, or None when no toolkit is found.

    torch.utils.cpp_extension takes the parent of ``which nvcc``'s directory, which is wrong
    when nvcc is a symlink or a wrapper script in another prefix (``/usr/local/bin/nvcc``
    that execs ``/usr/local/cuda-13.0/bin/nvcc`` gives CUDA_HOME=/usr/local, and builds fail
    with "cuda_runtime.h: No such file or directory"). Order: CUDA_HOME or CUDA_PATH as set;
    else the nvcc on PATH, its symlinks followed, then the compiler a wrapper script execs,
    the first whose root has include/cuda_runtime.h; else ``default`` if it has the header.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return environ[name]
    nvcc = which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(nvcc)
        real = os.path.realpath(nvcc)
        candidates.append(real)
        wrapped = _wrapped_nvcc(real)
        if wrapped:
            candidates += [wrapped, os.path.realpath(wrapped)]
    for compiler in candidates:
        home = os.path.dirname(os.path.dirname(os.path.abspath(compiler)))
        if _has_runtime_header(home):
            return home
    return default if _has_runtime_header(default) else None


def apply_cuda_home(environ=os.environ, which: Callable[[str], Optional[str]] = shutil.which) -> Optional[str]:
    """Sets CUDA_HOME to ``resolve_cuda_home()`` when the user set neither CUDA_HOME nor CUDA_PATH,
    for torch.utils.cpp_extension. That module reads CUDA_HOME once, at import: when it is already
    imported, its ``CUDA_HOME`` global is updated too. Returns the root in use (None: no toolkit)."""
    home = resolve_cuda_home(environ, which)
    if home and not environ.get("CUDA_HOME"):
        environ["CUDA_HOME"] = home
        cpp_extension = sys.modules.get("torch.utils.cpp_extension")
        if cpp_extension is not None and getattr(cpp_extension, "CUDA_HOME", None) != home:
            cpp_extension.CUDA_HOME = home
    return home
