"""The hurried install (issue 14 item 1): building with pip's build isolation must not fetch
torch, and gives a pure-Python package that installs next to the torch already there and
JIT-builds its C++ backend from the sources the wheel carries."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from symile_kernels import _build

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_isolated_wheel_is_pure_python_and_installs(tmp_path):
    src = tmp_path / "src"  # the tracked files only: no prebuilt .so, no build/ of the checkout
    files = _run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "whl"), str(src)])
    log = built.stdout + built.stderr
    assert "torch" not in "".join(line for line in log.splitlines() if "Collecting" in line or "Downloading" in line), log
    wheels = list((tmp_path / "whl").glob("symile_kernels-*.whl"))
    assert len(wheels) == 1, log
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "symile_kernels/ops.py" in names
    assert all(f"symile_kernels/{name}" in names for name in _build.CPU_SOURCES)  # for the JIT build on first use
    assert "symile_kernels/csrc/cuda/cube.cu" in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
    assert "-py3-none-any.whl" in wheels[0].name, wheels[0].name

    # A venv that sees this interpreter's torch, as a user's venv with torch would, through a plain
    # path entry: .pth files there are not run, so the checkout's editable install (whose finder
    # would serve its prebuilt extension) stays out of it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    venv_site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    torch_site = str(Path(__import__("torch").__file__).resolve().parents[1])
    Path(venv_site, "outer_site.pth").write_text(torch_site + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          str(wheels[0])])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SYMILE_KERNELS_BACKEND",
                                                               "SYMILE_KERNELS_NO_JIT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # a real compile, not a cached one
    proc = _run([str(py), "-c", "import torch, symile_kernels as sk\n"
                 "print(sk.__file__)\n"
                 "x = [torch.randn(4, 3) for _ in range(3)]\n"
                 "print(float(sk.symile_loss(x, 2.0, backend='chunked')))\n"
                 "print(float(sk.symile_loss(x, 2.0, backend='cpu')))"], cwd=tmp_path, env=env)
    out = proc.stdout.splitlines()
    assert out[0].startswith(str(venv)), out
    assert float(out[1]) > 0
    assert abs(float(out[2]) - float(out[1])) < 1e-5 * float(out[1]), out  # the JIT-built C++ backend
    assert "JIT-building the C++ CPU backend" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("seconds,printed", [(0.0, False), (0.6, True)], ids=["cached", "compiling"])
def test_jit_line_only_when_it_compiles(monkeypatch, capsys, tmp_path, seconds, printed):
    # Issue 14 item 4: a cached build loads quickly and prints nothing; a load that takes longer is compiling.
    import time

    import torch.utils.cpp_extension as cpp
    from symile_kernels import _extension

    monkeypatch.setattr(_extension, "_COMPILE_NOTICE_S", 0.3)
    monkeypatch.setattr(cpp, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpp, "load", lambda **kwargs: time.sleep(seconds))
    monkeypatch.delenv(_extension.NO_JIT_ENV, raising=False)
    source = tmp_path / "k.cpp"
    source.write_text("")
    assert _extension.jit_build("test backend", [source], "hint", name="x") is None
    time.sleep(0.4)  # past the notice's timer: a cancelled one must stay silent
    assert ("JIT-building the test backend" in capsys.readouterr().err) == printed
