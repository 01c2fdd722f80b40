"""README.md's Quickstart prints what the README says it prints, and the README stays short."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _quickstart() -> tuple[str, str]:
    """The Quickstart's python block and the plain block that follows it (its printed output)."""
    section = _readme().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    code = next(body for lang, body in blocks if lang == "python")
    printed = next(body for lang, body in blocks if lang == "")
    return code, printed


def test_quickstart_prints_what_the_readme_says():
    code, printed = _quickstart()
    env = {k: v for k, v in os.environ.items() if k not in ("SYMILE_KERNELS_BACKEND", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == printed.strip().splitlines(), done.stdout


def test_readme_is_at_most_300_lines():
    assert len(_readme().splitlines()) <= 300
