"""Work of the "cuda" backend's cube kernels, counted in the CPU emulation (exact counts, no timing).

benchmarks/count_work_cuda.py runs csrc/cuda/cube.cu through csrc/cuda/emu, whose
counters record the tile-product FLOPs of every ``mma_sync`` (and SIMT FMA) and
the calls of ``exp_`` (per cube element) and ``vexp_`` (per row, column, tile or
partial LSE). The bounds (docs/math.md section 5):

* forward + backward execute at most 1.7x the model FLOPs 6 N^3 d: the forward's
  logits, one recomputation in each of the backward's two passes and the two
  contractions are 10 N^3 d = 1.667x;
* at most 3 exponentials per cube element: one shared by the forward's row and
  column reductions, one shared by G's three terms in each backward pass, where
  the logit spreads allow sharing (always for unit rows at tau = 14.3);
* the row products x[i] * y[j] are built once per pair block in the forward and in
  pass "pairs", once per pair block and k-block in pass "z" (where they fit shared memory);
* the per-vector exponentials (``vexp_``) are lower order: per 64 x 64 tile 3 x 64
  in the forward (row weights, running-LSE merges, the partial Lc); per 32-pair x
  64 tile 64 in pass "pairs" (G's column factors); per 64-pair x 32 tile 32 + 2 x 64
  in pass "z" (column factors, and the per-pair factors its k-block units recompute),
  plus O(N^2) for the partial LSEs and the pairs' factors: 0.189 per element at
  N = 128, 0.156 + O(1/N) (0.168 and 0.125 with the forward's tiles in the backward,
  one CTA per SM).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from symile_kernels import backends

from harness import check_against_oracle, make_inputs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import count_work_cuda  # noqa: E402

no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation: the GPU suite runs the kernels")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    try:
        path = count_work_cuda.build_emulation(tmp_path_factory.mktemp("cuda_emu"))
    except RuntimeError as err:
        pytest.skip(str(err))
    return ctypes.CDLL(str(path))


@no_gpu_only
@pytest.mark.parametrize("d", [64, 256])
def test_work_bounds_at_n128(lib, d):
    counts = count_work_cuda.cuda_work_counts(128, d, "bf16", lib=lib)
    print(count_work_cuda.markdown([counts]))
    assert counts["flops_per_model"] <= 1.7
    assert counts["exp_per_element"] <= 3.0
    assert counts["vexp_per_element"] <= 0.19
    by_kernel = {p["kernel"]: p for p in counts["passes"]}
    # One recomputation of the logits per pass: forward 2 N^3 d; each backward pass 2 N^3 d + its contraction.
    assert by_kernel["forward_pass"]["flops"] == 2 * 128 ** 3 * d
    assert by_kernel["pairs_pass"]["flops"] == by_kernel["z_pass"]["flops"] == 4 * 128 ** 3 * d
    for name in ("forward_pass", "pairs_pass", "z_pass"):
        assert by_kernel[name]["exps"] == 128 ** 3, name  # one shared exponential per element
    # Row products x[i] * y[j]: each pass builds a pair block's once over all of d where they fit two
    # CTAs' share of the SM (here the emulated H100's): the forward and pass "pairs" reuse them for
    # every 64-row tile of z, pass "z" (one unit per 32-row k-block: 4 here) for its logits and its
    # contraction.
    pairs = 128 * 128 * d
    assert by_kernel["forward_pass"]["pair_products"] == pairs
    assert by_kernel["pairs_pass"]["pair_products"] == pairs
    assert by_kernel["z_pass"]["pair_products"] == 4 * pairs


@pytest.fixture
def emulated_backend(lib):
    from test_cuda_emulation import _Emulated

    state = _Emulated(lib, 0, 2)
    backends.register(state, replace=True)
    yield state
    backends.unregister("cuda_emu")


def _element_exps(lib, kernel: str) -> int:
    return sum(r["exps"] for r in count_work_cuda._launches(lib) if r["kernel"] == kernel)


@no_gpu_only
def test_share_path_counts_at_wide_spread_baseline(lib, emulated_backend):
    # The baseline the exact-path test compares against: the same sizes with unit rows at tau = 14.3
    # share every tile, so each kernel takes exactly its shared count.
    N, d = 20, 6
    lib.emu_work_reset()
    check_against_oracle("cuda_emu", make_inputs("unit", 3, N, d), 14.3, dtype=torch.float32)
    assert _element_exps(lib, "forward_pass") == N * N * 64  # one 64-wide k-tile covers K = 20
    assert _element_exps(lib, "pairs_pass") == _element_exps(lib, "z_pass") == N ** 3


@no_gpu_only
@pytest.mark.parametrize("mode", [0, 2])
def test_wide_spreads_take_the_exact_paths(lib, emulated_backend, mode):
    # A pair with logit tau = 100 (x0 = y0 = z0) puts La, Lb near 100 while the zero row of z has
    # Lc = log(I J): G's shared exponential would need e^(100 - 7) > e^40, and the forward's tile
    # holds columns near 100 and near 0 (spread > 60). Both take their second exponential, and the
    # results still match the oracle.
    N, d = 20, 6
    reps = make_inputs("unit", 3, N, d)
    for r in reps:
        r[0] = 0.0
        r[0, 0] = 1.0
    reps[2][1] = 0.0
    emulated_backend.mode = mode
    lib.emu_work_reset()
    check_against_oracle("cuda_emu", reps, 100.0, dtype=torch.float32,
                         tolerance=None if mode == 0 else torch.bfloat16)
    cube = N ** 3
    # The forward's row pass exponentiates every column of a 64-wide k-tile (padding included) for each
    # valid (i, j) pair, N^2 x 64 when every tile shares; the exact column path adds calls. The backward
    # passes exponentiate valid elements only: N^3 each when sharing, more with G's own Lc exponential.
    assert _element_exps(lib, "forward_pass") > N * N * 64
    assert _element_exps(lib, "pairs_pass") > cube
    assert _element_exps(lib, "z_pass") > cube


@no_gpu_only
@pytest.mark.parametrize("dtype,mode", [(torch.float32, 1), (torch.float64, 0)], ids=str)
def test_backward_slabs_when_shared_memory_is_short(lib, emulated_backend, dtype, mode):
    # d = 130 needs three 64-column chunks; a small limit leaves one chunk per slab, so every pass
    # recomputes the logits once per slab (three times) and writes only its slab's columns.
    limit = 45000 if dtype == torch.float32 else 55000  # one 64-column chunk fits, two do not (plan.h layouts)
    reps = make_inputs("unit", 3, 9, 130)
    emulated_backend.mode, emulated_backend.num_sms = mode, 3
    lib.emu_set_smem_limit.restype = ctypes.c_int64
    flops = []
    for slab_limit in (None, limit):  # None: the emulated device's own limit (H100's 227 KiB)
        old = lib.emu_set_smem_limit(ctypes.c_int64(slab_limit)) if slab_limit else None
        try:
            lib.emu_work_reset()
            check_against_oracle("cuda_emu", reps, 14.3, dtype=dtype, tolerance="tf32" if mode == 1 else None)
        finally:
            if old is not None:
                lib.emu_set_smem_limit(ctypes.c_int64(old))
        flops.append({r["kernel"]: r["flops"] for r in count_work_cuda._launches(lib) if r["flops"]})
    whole, slabs = flops
    assert set(whole) == set(slabs) and whole["forward_pass"] == slabs["forward_pass"]
    # The passes' logit tiles (plan.h cube_backward_config): pass "pairs" 2 x 16 pairs against BLOCK_K
    # rows of z, pass "z" 4 x 16 pairs against BLOCK_K / 2 (BLOCK_K = 64, or 32 in float64), d padded to
    # BLOCK_D (32, or 16 in float64). At N = 9 one tile spans j and k: ceil(9 / 2) and ceil(9 / 4) i-blocks.
    block_k, block_d = (64, 32) if dtype == torch.float32 else (32, 16)
    d_pad = -(-130 // block_d) * block_d
    logits = {"pairs_pass": 5 * 2 * 32 * block_k * d_pad, "z_pass": 3 * 2 * 64 * (block_k // 2) * d_pad}
    for name in ("pairs_pass", "z_pass"):
        # Same contraction work, the logits three times instead of once.
        assert slabs[name] - whole[name] == 2 * logits[name], name


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts 4 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@no_gpu_only
@pytest.mark.parametrize("d,aligned,vector", [(64, True, True), (33, True, False), (64, False, False)])
def test_global_rows_load_in_16_byte_pieces_where_aligned(lib, emulated_backend, d, aligned, vector):
    # 16-byte loads need every piece 16-byte aligned (the emulation aborts on a misaligned one);
    # odd d or an offset base take the element-by-element path. Results agree either way.
    from symile_kernels import chunked

    reps = [r.float() for r in make_inputs("unit", 3, 9, d)]
    rows = reps if aligned else [_misaligned(r) for r in reps]
    tau = torch.tensor(14.3)
    emulated_backend.mode = 2
    lib.emu_work_reset()
    L = emulated_backend.cube_lse_forward(*rows, tau)
    g = [torch.randn(9) for _ in range(3)]
    grads = emulated_backend.cube_lse_backward(*rows, tau, *(v.float() for v in L), *g)  # float64 LSEs out
    loads = {r["kernel"]: r["vector_loads"] for r in count_work_cuda._launches(lib)}
    for name in ("forward_pass", "pairs_pass", "z_pass"):
        assert (loads[name] > 0) == vector, (name, loads)
    want = chunked.cube_lse_forward(*reps, tau)
    want_grads = chunked.cube_lse_backward(*reps, tau, *(w.float() for w in want), *g)  # float64 LSEs in
    for got, ref in zip([*L, *grads], [*want, *want_grads]):
        assert torch.allclose(got, ref.to(got.dtype), rtol=2e-2, atol=2e-3)  # bf16 tiles


def _async_copies(lib) -> dict:
    lib.emu_work_async_copies.restype = ctypes.c_int64
    out: dict = {}
    for n, r in enumerate(count_work_cuda._launches(lib)):
        out[r["kernel"]] = out.get(r["kernel"], 0) + lib.emu_work_async_copies(ctypes.c_int64(n))
    return out


@no_gpu_only
@pytest.mark.parametrize("dtype,mode,aligned,copies", [
    (torch.bfloat16, 2, True, True),    # bf16 rows, bf16 tiles: z rows copied as they are
    (torch.float32, 1, True, True),     # float32 rows, TF32 tiles (float32 in shared memory)
    (torch.float32, 2, True, False),    # float32 rows rounded to bf16 tiles: converted through registers
    (torch.bfloat16, 2, False, False),  # offset base: the element-by-element path
])
def test_z_tiles_double_buffered_through_cp_async(lib, emulated_backend, dtype, mode, aligned, copies):
    # The logit tile product's z rows (and the pair forward's columns) are double-buffered with
    # cp.async when the rows already have the tiles' type and every 16-byte piece is aligned. The
    # emulation lands a copy only at its wait_group (NaN before), so results that match the
    # reference also show the waits and barriers are in place. Odd N exercises the zero fills.
    from symile_kernels import chunked

    N, d = 37, 64
    reps = [r.to(dtype) for r in make_inputs("unit", 3, N, d)]
    rows = reps if aligned else [_misaligned(r) for r in reps]
    tau = torch.tensor(14.3)
    emulated_backend.mode = mode
    lib.emu_work_reset()
    L = emulated_backend.cube_lse_forward(*rows, tau)
    g = [torch.randn(N) for _ in range(3)]
    grads = emulated_backend.cube_lse_backward(*rows, tau, *(v.float() for v in L), *g)  # float64 LSEs out
    cube = _async_copies(lib)
    lib.emu_work_reset()
    P = emulated_backend.pair_lse_forward(rows[0], rows[1], torch.zeros(N), tau)
    pair = _async_copies(lib)
    for got, name in [(cube, "forward_pass"), (cube, "pairs_pass"), (cube, "z_pass"), (pair, "forward_pass")]:
        assert (got[name] > 0) == copies, (name, cube, pair)
    f32 = [r.float() for r in reps]
    want = chunked.cube_lse_forward(*f32, tau)
    want_grads = chunked.cube_lse_backward(*f32, tau, *(w.float() for w in want), *g)  # float64 LSEs in
    want_pair = chunked.pair_lse_forward(f32[0], f32[1], torch.zeros(N), tau)
    for got_t, ref in zip([*L, *grads, P], [*want, *want_grads, want_pair]):
        assert torch.isfinite(got_t).all()
        assert torch.allclose(got_t.float(), ref.float(), rtol=3e-2, atol=3e-3)


@pytest.fixture(scope="module")
def async_selftest(tmp_path_factory):
    import shutil
    import subprocess

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    exe = tmp_path_factory.mktemp("async") / "async_selftest"
    done = subprocess.run([gxx, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
                           "-DSYMILE_CUDA_EMULATE", "-I.", "emu/async_selftest.cpp", "-o", str(exe)],
                          cwd=ROOT / "csrc" / "cuda", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return exe


@pytest.mark.parametrize("case,rc,out", [
    ("ok", 0, "1 2 3 4 0 0 0 0"),                  # copy at wait_group 1, zero fill at wait_group 0
    ("early_read", 0, " ".join(["nan"] * 8)),      # read before the wait: poison
    ("misaligned", None, "cp.async 16-byte copy to a shared address not 16-byte aligned"),
    ("unwaited", None, "the kernel ended with cp.async copies not waited for"),
    # ldmatrix x4 + mma.sync m16n8k16, modelled warp-wide (MmaTile): exact on small multiples of 1/8
    ("mma_col", 0, "max_err 0"),
    ("mma_row", 0, "max_err 0"),
    ("ldsm_misaligned", None, "ldmatrix row address not 16-byte aligned"),
    # The same in TF32 tiles (ldmatrix of 32-bit elements, LDS for B by rows of k, mma.sync m16n8k8)
    ("mma_col_tf32", 0, "max_err 0"),
    ("mma_row_tf32", 0, "max_err 0"),
])
def test_emulated_cp_async_and_ldmatrix_semantics(async_selftest, case, rc, out):
    import subprocess

    done = subprocess.run([str(async_selftest), case], capture_output=True, text=True, timeout=60)
    if rc is None:  # aborts
        assert done.returncode != 0 and out in done.stderr, (done.returncode, done.stderr)
    else:
        assert done.returncode == rc and done.stdout.strip() == out, (done.returncode, done.stdout, done.stderr)
