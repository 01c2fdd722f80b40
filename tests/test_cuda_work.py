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
* the per-vector exponentials (``vexp_``) are lower order: per 64 x 64 tile 3 x 64
  in the forward (row weights, running-LSE merges, the partial Lc), 64 in pass
  "pairs" and 4 x 64 in pass "z" (G's per-pair and per-column factors), plus
  O(N^2) for the partial LSEs: 0.168 per element at N = 128, 0.125 + O(1/N).
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
    assert counts["vexp_per_element"] <= 0.17
    by_kernel = {p["kernel"]: p for p in counts["passes"]}
    # One recomputation of the logits per pass: forward 2 N^3 d; each backward pass 2 N^3 d + its contraction.
    assert by_kernel["forward_pass"]["flops"] == 2 * 128 ** 3 * d
    assert by_kernel["pairs_pass"]["flops"] == by_kernel["z_pass"]["flops"] == 4 * 128 ** 3 * d
    for name in ("forward_pass", "pairs_pass", "z_pass"):
        assert by_kernel[name]["exps"] == 128 ** 3, name  # one shared exponential per element


@pytest.fixture
def emulated_backend(lib):
    from test_cuda_emulation import _Emulated

    state = _Emulated(lib, 0, 2)
    backends.register(state.backend(), replace=True)
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
    limit = 74000 if dtype == torch.float32 else 86000  # one 64-column chunk fits, two do not
    reps = make_inputs("unit", 3, 9, 130)
    emulated_backend.mode, emulated_backend.num_sms = mode, 3
    lib.emu_set_smem_limit.restype = ctypes.c_int64
    flops = []
    for slab_limit in (None, limit):
        old = lib.emu_set_smem_limit(ctypes.c_int64(slab_limit or 10 ** 9))
        try:
            lib.emu_work_reset()
            check_against_oracle("cuda_emu", reps, 14.3, dtype=dtype, tolerance="tf32" if mode == 1 else None)
        finally:
            lib.emu_set_smem_limit(ctypes.c_int64(old))
        flops.append({r["kernel"]: r["flops"] for r in count_work_cuda._launches(lib) if r["flops"]})
    whole, slabs = flops
    assert set(whole) == set(slabs) and whole["forward_pass"] == slabs["forward_pass"]
    for name in ("pairs_pass", "z_pass"):
        # Same contraction work, the logits (the forward's tile products) three times instead of once.
        assert slabs[name] - whole[name] == 2 * whole["forward_pass"] > 0, name


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
    grads = emulated_backend.cube_lse_backward(*rows, tau, *L, *g)
    loads = {r["kernel"]: r["vector_loads"] for r in count_work_cuda._launches(lib)}
    for name in ("forward_pass", "pairs_pass", "z_pass"):
        assert (loads[name] > 0) == vector, (name, loads)
    want = chunked.cube_lse_forward(*reps, tau)
    want_grads = chunked.cube_lse_backward(*reps, tau, *want, *g)
    for got, ref in zip([*L, *grads], [*want, *want_grads]):
        assert torch.allclose(got, ref.to(got.dtype), rtol=2e-2, atol=2e-3)  # bf16 tiles
