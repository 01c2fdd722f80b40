"""CUDA_HOME from the real compiler when nvcc is a symlink or a wrapper script (symile_kernels/_build.py).

Pure Python, nothing is built: fake toolkits in a temporary directory, a fake PATH lookup.
"""
import os
import sys

import pytest

from symile_kernels import _build


def _toolkit(root):
    """A fake CUDA toolkit at ``root``: bin/nvcc and include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho real nvcc\n")
    return root


def _wrapper(tmp_path, real_nvcc, line='exec {} "$@"'):
    """A wrapper script tmp_path/wrap/bin/nvcc (no headers beside it) that execs ``real_nvcc``."""
    (tmp_path / "wrap" / "bin").mkdir(parents=True)
    script = tmp_path / "wrap" / "bin" / "nvcc"
    script.write_text("#!/bin/sh\n# a site's wrapper\n" + line.format(real_nvcc) + "\n")
    return str(script)


def _which(path):
    return lambda name: path if name == "nvcc" else None


def test_wrapper_script_resolves_to_the_toolkit_it_execs(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0")
    script = _wrapper(tmp_path, real / "bin" / "nvcc")
    assert _build.resolve_cuda_home({}, _which(script), default=str(tmp_path / "none")) == str(real)


def test_quoted_exec_line_and_symlinked_wrapper(tmp_path):
    real = _toolkit(tmp_path / "cuda-12.4")
    script = _wrapper(tmp_path, real / "bin" / "nvcc", line="exec '{}' \"$@\"")
    (tmp_path / "links").mkdir()
    os.symlink(script, tmp_path / "links" / "nvcc")
    assert _build.resolve_cuda_home({}, _which(str(tmp_path / "links" / "nvcc")),
                                    default=str(tmp_path / "none")) == str(real)


def test_symlinked_compiler_resolves_through_the_link(tmp_path):
    real = _toolkit(tmp_path / "cuda")
    (tmp_path / "usrbin").mkdir()
    os.symlink(real / "bin" / "nvcc", tmp_path / "usrbin" / "nvcc")
    assert _build.resolve_cuda_home({}, _which(str(tmp_path / "usrbin" / "nvcc")),
                                    default=str(tmp_path / "none")) == str(real)


def test_plain_toolkit_and_the_users_setting_win(tmp_path):
    real = _toolkit(tmp_path / "cuda")
    nvcc = str(real / "bin" / "nvcc")
    assert _build.resolve_cuda_home({}, _which(nvcc), default=str(tmp_path / "none")) == str(real)
    # CUDA_HOME, else CUDA_PATH, as the user set it: never second-guessed.
    assert _build.resolve_cuda_home({"CUDA_HOME": "/opt/mine"}, _which(nvcc)) == "/opt/mine"
    assert _build.resolve_cuda_home({"CUDA_PATH": "/opt/path"}, _which(nvcc)) == "/opt/path"


def test_default_root_then_none(tmp_path):
    fallback = _toolkit(tmp_path / "usr-local-cuda")
    script = _wrapper(tmp_path, tmp_path / "missing" / "bin" / "nvcc")  # execs a compiler without headers
    assert _build.resolve_cuda_home({}, _which(script), default=str(fallback)) == str(fallback)
    assert _build.resolve_cuda_home({}, _which(None), default=str(tmp_path / "none")) is None


def test_apply_sets_the_environment_and_torchs_imported_global(tmp_path, monkeypatch):
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    real = _toolkit(tmp_path / "cuda-13.0")
    script = _wrapper(tmp_path, real / "bin" / "nvcc")
    # What torch inferred at import from the wrapper's directory: a root without the headers.
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "wrap"))
    environ = {}
    assert _build.apply_cuda_home(environ, _which(script)) == str(real)
    assert environ["CUDA_HOME"] == str(real)
    assert sys.modules["torch.utils.cpp_extension"].CUDA_HOME == str(real)
    # A CUDA_HOME the user set is left alone, in the environment and in torch.
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/mine")
    environ = {"CUDA_HOME": "/opt/mine"}
    assert _build.apply_cuda_home(environ, _which(script)) == "/opt/mine"
    assert cpp_extension.CUDA_HOME == "/opt/mine"
