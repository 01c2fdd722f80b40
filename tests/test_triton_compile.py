"""Every Triton kernel x configuration x {fp32 IEEE, TF32, bf16} compiles for sm_80 and sm_90.

No GPU needed: ``triton.compile`` of an ``ASTSource`` for a ``GPUTarget`` runs Triton's compiler
and the ptxas of its wheel on the CPU (symile_kernels/triton/_compile.py). Each configuration
list compiles for its own target at its feature bucket's largest executed size (128, 256, and
512 = 256 + 256 for d of 257-512) and, for the backward kernels in bf16, at sizes taking three to
five feature segments (112; 224 and 240; 448 and 496; the forward kernels, not compiled there,
spilled at most 88 bytes when tried at three). Asserted: every case compiles; shared memory stays
within the target's per-block limit; bf16 kernels use no stack (no register spills) except the pinned cases below,
which may not grow; the sm_90 bf16 PTX uses wgmma except on the named lists whose tiles have
too few rows.

The compiles (about 2 s each) run in parallel in a child process with a Triton cache of its
own under the system temp directory, so a rerun on the same machine takes seconds.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    code = ("import json, sys; from symile_kernels.triton import _compile; "
            "json.dump(_compile.compile_all(jobs=int(sys.argv[1])), sys.stdout)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "symile_kernels_triton_compile_cache")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(max(2, os.cpu_count() or 2))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_every_case_compiles(rows):
    from symile_kernels.triton import _compile

    assert len(rows) == len(_compile.cases()) > 0
    assert {r["capability"] for r in rows} == {80, 90}
    assert {r["mode"] for r in rows} == {"fp32-ieee", "tf32", "bf16"}
    failed = [(r["list"], r["index"], r["mode"], r["error"]) for r in rows if "error" in r]
    assert not failed, failed


@pytest.mark.slow
def test_shared_memory_within_the_target_limit(rows):
    over = [(r["list"], r["index"], r["mode"], r["shared"]) for r in rows
            if "error" not in r and r["shared"] > r["shared_limit"]]
    assert not over, over


# Known spills (bytes of stack, bf16, per list and feature size; Triton 3.9's ptxas). At the buckets'
# power-of-two sizes only the cube's rows pass on sm_90 at d = 256 spills (it holds a d-wide float32
# accumulator and d-wide row products in registers; no candidate shape avoided it with wgmma kept), and above
# 256 ("xlarge", 512 = 256 + 256 and 448 = 256 + 128 + 64) every backward shape tried spills: these
# are the least-spilling ones found. Feature sizes that take three to five segments (112 = 64 + 32 + 16,
# 224 = 128 + 64 + 32, 240 = 128 + 64 + 32 + 16, 496 = 256 + 128 + 64 + 32 + 16) spill on lists where the
# single segment does not, most at four and five segments (up to 8320 bytes at 496, whose register tiles
# were sized for 512 = two segments): the price of executing d's own FLOPs instead of padding d
# (240 and 496 ran 256 and 512 before), not yet measured on a GPU. Pinned so that any growth, or a
# spill anywhere else, fails.
KNOWN_SPILLS = {
    ("cube_bwd_dz/sm80/large", 240): 3336,
    ("cube_bwd_dz/sm80/small", 112): 312,
    ("cube_bwd_dz/sm80/xlarge", 448): 232,
    ("cube_bwd_dz/sm80/xlarge", 496): 6464,
    ("cube_bwd_dz/sm80/xlarge", 512): 400,
    ("cube_bwd_dz/sm90/large", 240): 1296,
    ("cube_bwd_dz/sm90/xlarge", 448): 136,
    ("cube_bwd_dz/sm90/xlarge", 496): 4528,
    ("cube_bwd_dz/sm90/xlarge", 512): 288,
    ("cube_bwd_rows/sm80/large", 224): 4224,
    ("cube_bwd_rows/sm80/large", 240): 4528,
    ("cube_bwd_rows/sm80/small", 112): 392,
    ("cube_bwd_rows/sm80/xlarge", 448): 176,
    ("cube_bwd_rows/sm80/xlarge", 496): 5464,
    ("cube_bwd_rows/sm80/xlarge", 512): 184,
    ("cube_bwd_rows/sm90/large", 224): 152,  # 120 with the per-segment code before the tuple helpers
    ("cube_bwd_rows/sm90/large", 240): 272,
    ("cube_bwd_rows/sm90/large", 256): 112,
    ("cube_bwd_rows/sm90/xlarge", 448): 200,
    ("cube_bwd_rows/sm90/xlarge", 496): 5368,
    ("cube_bwd_rows/sm90/xlarge", 512): 232,
    ("cube_fwd/sm90/xlarge", 512): 8,
    ("pair_bwd_cols/sm80/large", 224): 232,
    ("pair_bwd_cols/sm80/large", 240): 280,
    ("pair_bwd_cols/sm80/small", 112): 232,
    ("pair_bwd_cols/sm80/xlarge", 448): 8,
    ("pair_bwd_cols/sm80/xlarge", 496): 1912,
    ("pair_bwd_cols/sm90/large", 224): 608,
    ("pair_bwd_cols/sm90/large", 240): 688,
    ("pair_bwd_cols/sm90/small", 112): 32,
    ("pair_bwd_cols/sm90/xlarge", 448): 24,
    ("pair_bwd_cols/sm90/xlarge", 496): 1184,
    ("pair_bwd_rows/sm80/large", 224): 272,
    ("pair_bwd_rows/sm80/large", 240): 344,
    ("pair_bwd_rows/sm80/small", 112): 232,
    ("pair_bwd_rows/sm80/xlarge", 448): 160,
    ("pair_bwd_rows/sm80/xlarge", 496): 8320,
    ("pair_bwd_rows/sm80/xlarge", 512): 16,
    ("pair_bwd_rows/sm90/large", 224): 752,
    ("pair_bwd_rows/sm90/large", 240): 792,
    ("pair_bwd_rows/sm90/xlarge", 448): 128,
    ("pair_bwd_rows/sm90/xlarge", 496): 7552,
    ("pair_bwd_rows/sm90/xlarge", 512): 24,
}


@pytest.mark.slow
def test_bf16_spills_no_more_than_pinned(rows):
    spills = [(r["list"], r["d"], r["index"], r["reg"], r["stack"]) for r in rows
              if "error" not in r and r["mode"] == "bf16"
              and (r["stack"] > KNOWN_SPILLS.get((r["list"], r["d"]), 0) or r.get("local", 0))]
    assert not spills, spills
    assert any(r["mode"] == "bf16" and r["d"] == 512 for r in rows)  # d of 257-512 is compiled too


# Lists whose tiles have fewer than wgmma's 64 rows per warpgroup (the "xlarge" backward passes: 16-32
# rows spill least at d = 512), so sm_90 runs them on mma.sync.
NO_WGMMA = {"cube_bwd_rows/sm90/xlarge", "pair_bwd_rows/sm90/xlarge", "pair_bwd_cols/sm90/xlarge"}


@pytest.mark.slow
def test_sm90_bf16_uses_wgmma(rows):
    bf16 = [r for r in rows if "error" not in r and r["mode"] == "bf16" and r["capability"] == 90]
    assert bf16
    missing = [(r["list"], r["index"], r["d"]) for r in bf16 if not r["wgmma"] and r["list"] not in NO_WGMMA]
    assert not missing, missing
