"""Loading a compiled library of ``symile_kernels::`` torch operators, once.

The compiled backends ("cpu", "cuda") each register four operators from a C++
library that comes from, in order: the extension ``pip install
--no-build-isolation -e .`` built, else a JIT build of the sources with
``torch.utils.cpp_extension.load`` (ninja, into torch's extension cache), which
prints one line when it compiles (not when it loads a cached build).
SYMILE_KERNELS_NO_JIT=1 disables the JIT build.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from typing import Callable, Optional

import torch

NO_JIT_ENV = "SYMILE_KERNELS_NO_JIT"
# Seconds after which a JIT load is taken to be compiling (a cached load takes about 0.2 s).
_COMPILE_NOTICE_S = 2.0


def jit_build(label: str, sources: list, failure_hint: str, **load_kwargs) -> Optional[str]:
    """JIT-builds and loads a library of operators; returns why not, or None when loaded.

    label names the backend in the one line printed; sources are paths;
    load_kwargs go to ``torch.utils.cpp_extension.load`` (``name`` among them).
    """
    if os.environ.get(NO_JIT_ENV) == "1":
        return f"the JIT build is disabled ({NO_JIT_ENV}=1)"
    missing = [str(s) for s in sources if not os.path.exists(s)]
    if missing:
        return f"its sources {', '.join(missing)} are not there to JIT-build (install from a source checkout)"
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
    except Exception as exc:
        return f"JIT-building needs ninja ({exc}); pip install ninja"
    # A cached, up-to-date build loads in a fraction of a second; only a load still running
    # after _COMPILE_NOTICE_S is compiling, and only then is the one line printed.
    # Its time depends on the machine and the backend, so the line promises none; a second line
    # gives the time it took.
    notice = threading.Timer(_COMPILE_NOTICE_S, print, args=(
        f"symile_kernels: JIT-building the {label} from {os.path.dirname(str(sources[0]))} "
        "(once; later runs load the cached build)...",), kwargs={"file": sys.stderr, "flush": True})
    notice.daemon = True
    start = time.perf_counter()
    notice.start()
    try:
        load(sources=[str(s) for s in sources], is_python_module=False, **load_kwargs)
    except Exception as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return f"JIT-building it failed ({failure_hint}): " + " | ".join(lines[-3:])
    finally:
        notice.cancel()
    elapsed = time.perf_counter() - start
    if elapsed > _COMPILE_NOTICE_S:  # the first line was printed
        print(f"symile_kernels: built the {label} in {elapsed:.0f} s", file=sys.stderr,
              flush=True)
    return None


class CompiledOps:
    """The operators of one compiled library, loaded on first use.

    Args:
        label: the backend's name in messages ("C++ CPU extension", say).
        extension: module name of the setup.py-built library.
        probe: one operator of the library, to tell whether a copy is already loaded.
        dispatch_key: "CPU" or "CUDA", the key the library registers kernels for.
        jit: builds and loads the library, returning why not or None (see ``jit_build``).
        register_fakes: registers the operators' fake implementations, once loaded.
        build_hint: how to build the extension, appended to the reason it is missing.
    """

    def __init__(self, label: str, extension: str, probe: str, dispatch_key: str, jit: Callable[[], Optional[str]],
                 register_fakes: Callable[[], None], build_hint: str):
        self.label, self.extension, self.probe, self.dispatch_key = label, extension, probe, dispatch_key
        self.jit, self.register_fakes, self.build_hint = jit, register_fakes, build_hint
        self.origin: Optional[str] = None
        self._reason: Optional[str] = None
        self._done = False
        self._lock = threading.Lock()

    def load_reason(self) -> Optional[str]:
        """Loads the library once; None when its operators are usable, else why not and how to fix it."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._reason = self._load()
                    if self._reason is None:
                        self.register_fakes()
                    self._done = True
        return self._reason

    def ops(self):
        """``torch.ops.symile_kernels``, after loading; raises RuntimeError with the reason if it cannot."""
        reason = self.load_reason()
        if reason is not None:
            raise RuntimeError(f"symile_kernels: {reason}")
        return torch.ops.symile_kernels

    def _load(self) -> Optional[str]:
        if self._registered():
            self.origin = "already loaded"
            return None
        prebuilt = self._load_prebuilt()
        if prebuilt is None:
            return None
        jit = self.jit()
        if jit is None:
            self.origin = "JIT build (torch extension cache)"
            return None
        return f"the {self.label} is unavailable: {prebuilt}, and {jit}. {self.build_hint}"

    def _registered(self) -> bool:
        # Loading a second copy of the library would register the operators twice.
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"symile_kernels::{self.probe}", self.dispatch_key)
        except RuntimeError:  # the operator does not exist yet
            return False

    def _load_prebuilt(self) -> Optional[str]:
        spec = importlib.util.find_spec(self.extension)
        if spec is None or spec.origin is None:
            return f"the extension {self.extension} was not built"
        try:
            torch.ops.load_library(spec.origin)
        except Exception as exc:  # built against another torch, say
            return f"loading {spec.origin} failed: {exc}"
        self.origin = spec.origin
        return None
