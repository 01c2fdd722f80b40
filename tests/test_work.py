"""The work the triton backend executes, counted in Triton's interpreter (benchmarks/count_work.py).

Exact counts, not timings: every ``tl.dot``'s 2 M N K FLOPs and every element passed to an
exponential, over one forward+backward of the loss with the Hopper configurations' tile shapes.
Sizes where no tile is padded (N = 128: d = 48, 256; N = 64: d = 112, 240, 496: multiples of 16 that the kernels'
feature segments cover exactly, 32 + 16, 64 + 32 + 16, 256, 128 + 64 + 32 + 16 and
256 + 128 + 64 + 32 + 16), so that the counts are the kernels' own.
Bounds: executed FLOPs at most 1.7x the model (6 N^3 d for the cube, 6 M N^2 d for pair losses:
one recompute of the logits per backward pass); one exponential per logit in the forward and two
in the backward (on tiles: the per-element exponentials), plus per-row/per-column factors, at most
0.1 per logit per pass.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "count_work.py"


def test_feature_segments_cover_every_multiple_of_16_exactly():
    from symile_kernels.triton._launch import MAX_SEGMENT, MAX_SEGMENTS, d_exec, d_segments

    for d in range(1, 513):
        segments = d_segments(d)
        assert 1 <= len(segments) <= MAX_SEGMENTS, (d, segments)
        assert all(16 <= s <= MAX_SEGMENT and s & (s - 1) == 0 for s in segments), (d, segments)
        assert list(segments) == sorted(segments, reverse=True), (d, segments)
        # tl.dot's K granularity is 16: d runs as d rounded up to a multiple of 16, and no further.
        assert d_exec(d) == -(-d // 16) * 16, (d, segments)
    # The fewest segments: one per set bit of d / 16 below 256, plus the 256-wide ones.
    assert d_segments(496) == (256, 128, 64, 32, 16) and d_segments(240) == (128, 64, 32, 16)
    assert d_segments(512) == (256, 256) and d_segments(48) == (32, 16) and d_segments(17) == (32,)


def _count(tmp_path, *args) -> list:
    out = tmp_path / "work.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--backends", "triton", "--json", str(out),
                           *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _check(row, factors: bool = True):
    q = row["ratios"]
    where = f"{row['loss']} N={row['N']} d={row['d']}: {q}"
    # The tile products run over d's feature segments, not d padded to a power of two: exactly the
    # model's forward once, and the backward's two recomputes plus its two contractions.
    assert q["forward"]["flops"] == pytest.approx(1.0, rel=1e-12), where
    assert q["backward"]["flops"] == pytest.approx(2.0, rel=1e-12), where
    assert q["total"]["flops"] <= 1.7, where
    assert q["forward"]["flops"] <= 1.0 + 1e-9, where
    assert q["forward"]["exp_tile"] <= 1.0 + 1e-9, where
    assert q["backward"]["exp_tile"] <= 2.0 + 1e-9, where
    for name in ("forward", "backward"):  # per-row/per-column factors: a share that shrinks as 1/N
        assert not factors or q[name]["exp_all"] - q[name]["exp_tile"] <= 0.1, where
    # Not vacuous: every logit was computed and exponentiated in each pass.
    assert q["forward"]["flops"] >= 1.0 - 1e-9 and q["forward"]["exp_tile"] >= 1.0 - 1e-9, where
    assert q["backward"]["exp_tile"] >= 1.0, where


def test_cube_work_at_the_floor(tmp_path):
    rows = _count(tmp_path, "--loss", "symile", "--N", "128", "--d", "48", "256")
    assert [(r["N"], r["d"], r["status"]) for r in rows] == [(128, 48, "ok"), (128, 256, "ok")]
    for row in rows:
        _check(row)


def test_cube_work_at_three_to_five_segments(tmp_path):
    # 112 = 64 + 32 + 16, 240 = 128 + 64 + 32 + 16 and 496 = 256 + 128 + 64 + 32 + 16 (240 and 496 ran
    # 256 and 512 with three segments at most). N = 64 keeps the run short (the interpreter's cost
    # grows as N^3) and still pads no tile: the lists these sizes take ("small-seg3", "large-seg3",
    # "xlarge-seg3" where a kernel has them) have blocks of 1-64 rows and columns. The factor
    # exponentials' share (0.11 per logit at N = 64, d = 496) shrinks as 1/N; it is bounded at
    # N = 128 above, not here.
    rows = _count(tmp_path, "--loss", "symile", "--N", "64", "--d", "112", "240", "496")
    assert [(r["N"], r["d"], r["status"]) for r in rows] == [(64, 112, "ok"), (64, 240, "ok"), (64, 496, "ok")]
    for row in rows:
        _check(row, factors=False)
        assert row["ratios"]["total"]["flops"] == pytest.approx(10 / 6, rel=1e-12), row


def test_pair_work_at_the_floor(tmp_path):
    rows = _count(tmp_path, "--loss", "n", "clip", "--N", "128", "--d", "48")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        _check(row)
