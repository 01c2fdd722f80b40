"""The CUDA backend's kernel sources on the CPU, through a host-thread emulation (csrc/cuda/emu).

The emulation covers the CUDA subset the kernels use (one thread per CUDA
thread, barriers, warp shuffles, ldmatrix/mma.sync and WMMA fragments with their alignment rules). The
real ``cube.cu`` and ``pair.cu`` match the float64 oracle through ``symile_loss``
in every mode (IEEE float32 and float64, TF32, bf16 tiles), including tau = 100,
odd sizes, a rectangular cube, "n" sampling and M = 2. Skipped where a GPU runs
the compiled kernels instead (tests/test_cuda_gpu.py).
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from symile_kernels import _build, backends, symile_loss
from symile_kernels.backends import Backend
from symile_kernels._math import shift_and_weight

from cuda_common import check_rectangular_pairs, no_gpu_only, start_builds
from harness import check_against_oracle, make_inputs


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return start_builds(tmp_path_factory.mktemp("cuda_emu_build"), ("emu",))


MODES = _build.MATH_MODES
MODE_TOLERANCE = {"ieee": None, "tf32": "tf32", "bf16": torch.bfloat16}


class _Emulated(Backend):
    """The emulated launchers (CPU tensors) as backend "cuda_emu"; ``mode`` and ``num_sms`` are
    read at each launch, so a test can change them after registering. The launchers compute every
    gradient: ``needs`` is ignored, as the CUDA backend does."""

    name = "cuda_emu"

    def __init__(self, lib: ctypes.CDLL, mode: int, num_sms: int):
        self.lib, self.mode, self.num_sms = lib, mode, num_sms

    SUFFIX = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

    def row_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the launchers take bf16 and fp16 rows, as the CUDA kernels do

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self.lib, f"emu_{name}_{self.SUFFIX[dtype]}")

    def _mode(self, dtype):
        return self.mode if dtype == torch.float32 else 0

    @staticmethod
    def _p(*tensors):
        for t in tensors:
            assert t.is_contiguous() and t.device.type == "cpu"
        return [ctypes.c_void_p(t.data_ptr()) for t in tensors]

    @staticmethod
    def _nan(*shapes_like):
        return [torch.full_like(t, float("nan")) for t in shapes_like]

    def cube_lse_forward(self, x, y, z, tau):
        out = [tau.new_full((t.shape[0],), float("nan"), dtype=torch.float64) for t in (x, y, z)]
        sizes = map(ctypes.c_int64, (x.shape[0], y.shape[0], z.shape[0], x.shape[1]))
        rc = self._fn("cube_forward", x.dtype)(*self._p(x, y, z, tau), *sizes, ctypes.c_int(self._mode(x.dtype)),
                                               ctypes.c_int(self.num_sms), *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)

    @staticmethod
    def _compute_dtype(tau, *vectors):
        # ctypes passes pointers unchecked: the backward launchers read LSEs and gL in the compute dtype.
        assert all(v.dtype == tau.dtype for v in vectors), [v.dtype for v in vectors]

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs=(True,) * 4):
        self._compute_dtype(tau, La, Lb, Lc, gLa, gLb, gLc)
        out = self._nan(x, y, z, tau)
        sizes = map(ctypes.c_int64, (x.shape[0], y.shape[0], z.shape[0], x.shape[1]))
        rc = self._fn("cube_backward", x.dtype)(*self._p(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc), *sizes,
                                                ctypes.c_int(self._mode(x.dtype)), ctypes.c_int(self.num_sms),
                                                *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)

    def pair_lse_forward(self, a, b, pos, tau):
        out = pos.new_full((a.shape[0],), float("nan"), dtype=torch.float64)
        sizes = map(ctypes.c_int64, (a.shape[0], b.shape[0], a.shape[1]))
        rc = self._fn("pair_forward", a.dtype)(*self._p(a, b, pos, tau), *sizes, ctypes.c_int(self._mode(a.dtype)),
                                               ctypes.c_int(self.num_sms), *self._p(out))
        assert rc == 0, f"launcher returned {rc}"
        return out

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs=(True,) * 4):
        self._compute_dtype(tau, L, gL)
        out = self._nan(a, b, pos, tau)
        sizes = map(ctypes.c_int64, (a.shape[0], b.shape[0], a.shape[1]))
        rc = self._fn("pair_backward", a.dtype)(*self._p(a, b, pos, tau, L, gL), *sizes,
                                                ctypes.c_int(self._mode(a.dtype)), ctypes.c_int(self.num_sms),
                                                *self._p(*out))
        assert rc == 0, f"launcher returned {rc}"
        return tuple(out)


@pytest.fixture(scope="module")
def emu_lib(builds):
    rc, output, _ = builds.result("emu")
    assert rc == 0, f"the emulation build of cube.cu/pair.cu failed:\n{output}"
    return ctypes.CDLL(str(builds.out / "libsymile_emu.so"))


@pytest.fixture
def emulated(emu_lib, monkeypatch):
    """Registers the emulated kernels as backend "cuda_emu" for CPU tensors; returns a
    function that sets its mode and launch geometry."""
    state = _Emulated(emu_lib, 0, 2)
    backends.register(state, replace=True)

    def configure(mode: str = "ieee", num_sms: int = 2):
        state.mode, state.num_sms = MODES[mode], num_sms
        return "cuda_emu"
    yield configure
    backends.unregister("cuda_emu")


# (N, d, tau, dtype, mode, num_sms): odd sizes crossing the 4 x 16 pair tiles and 64 (32) column tiles.
EMU_CUBE_CASES = [
    (1, 3, 1.0, torch.float64, "ieee", 1),
    (7, 70, 100.0, torch.float64, "ieee", 3),  # d = 70 crosses float64's 64-column W chunk
    (17, 5, 100.0, torch.float32, "ieee", 2),
    (18, 33, 14.3, torch.float32, "tf32", 1),
    (18, 33, 14.3, torch.float32, "bf16", 16),
]


@no_gpu_only
@pytest.mark.parametrize("N,d,tau,dtype,mode,num_sms", EMU_CUBE_CASES, ids=str)
def test_emulated_cube_matches_oracle(emulated, N, d, tau, dtype, mode, num_sms):
    name = emulated(mode, num_sms)
    check_against_oracle(name, make_inputs("unit", 3, N, d), tau, dtype=dtype, tolerance=MODE_TOLERANCE[mode])


@no_gpu_only
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_emulated_low_precision_rows(emulated, dtype):
    # bf16/fp16 rows reach the kernels unconverted (accepts_low_precision): bf16 or TF32
    # tiles, float32 LSEs, gradients in the rows' dtype.
    name = emulated("ieee", 2)
    check_against_oracle(name, make_inputs("unit", 3, 18, 33), 100.0, dtype=dtype)
    check_against_oracle(name, make_inputs("unit", 3, 70, 20), 14.3, dtype=dtype, negative_sampling="n", seed=2)


@no_gpu_only
def test_emulated_rectangular_cube_and_input_kinds(emulated):
    name = emulated("ieee", 3)
    # M = 4 folds the fourth modality into x's rows: a 25 x 5 x 5 cube.
    check_against_oracle(name, make_inputs("unit", 4, 5, 7), 100.0, dtype=torch.float32)
    check_against_oracle(name, make_inputs("gaussian", 3, 9, 3), 1.0, dtype=torch.float64)
    check_against_oracle(name, make_inputs("huge_row", 3, 9, 3), 1.0, dtype=torch.float32)


@no_gpu_only
@pytest.mark.parametrize("mode", ["ieee", "tf32", "bf16"])
def test_emulated_pairs_n_sampling_and_clip(emulated, mode):
    name = emulated(mode)
    tol = MODE_TOLERANCE[mode]
    # N = 70 crosses a 64-row tile; d = 130 crosses a 128-column W chunk.
    check_against_oracle(name, make_inputs("unit", 3, 70, 130 if mode != "ieee" else 5), 100.0,
                         dtype=torch.float32, negative_sampling="n", tolerance=tol, seed=3)
    check_against_oracle(name, make_inputs("unit", 2, 9, 48), 14.3, dtype=torch.float64 if mode == "ieee"
                         else torch.float32, tolerance=tol)


@no_gpu_only
@pytest.mark.parametrize("I,J,d,dtype", [(5, 70, 3, torch.float64), (66, 67, 130, torch.float32)], ids=str)
def test_emulated_rectangular_pairs_match_chunked(emu_lib, I, J, d, dtype):
    emu = _Emulated(emu_lib, 0, 2)
    # float64: 1e-10, ten times tighter than docs/math.md section 6's 1e-9. chunked forms dtau as
    # sum_i <a[i], (P b)[i]> and the kernel as sum P * T; where the random gL's terms cancel the
    # two float64 roundings differ by about 1.5e-12 relative (chunked's is within 2e-14 of a
    # materialised autograd dtau on such inputs).
    check_rectangular_pairs(emu.pair_lse_forward, emu.pair_lse_backward, I, J, d, dtype,
                            1e-10 if dtype == torch.float64 else 1e-5)


@no_gpu_only
def test_emulated_results_are_deterministic(emulated):
    name = emulated("ieee", 3)
    reps = [r.float().requires_grad_() for r in make_inputs("unit", 3, 11, 7)]
    runs = []
    for _ in range(2):
        loss = symile_loss(reps, 100.0, backend=name)
        runs.append([loss.detach()] + list(torch.autograd.grad(loss, reps)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@no_gpu_only
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float64, "ieee")],
                         ids=str)
def test_emulated_lse_keeps_log2_of_a_tie_at_logit_1e8(emu_lib, dtype, mode):
    # x[0] meets two (j, k) pairs at logit 1e8 (a tie) and the other two at -1e8 (1e4 is exact in
    # TF32 and float32, so are the logits). La[0] = 1e8 + log 2: float64 LSEs keep the log 2 that a
    # float32 1e8 + log 2 rounds away (ulp(1e8) = 8). The backward, given the shift and weight ops
    # passes, gets dLa[0]/dx[0] = the tie's average of y_j z_k = 1e8 (a float32 L: 2e8).
    emu = _Emulated(emu_lib, MODES[mode], 2)
    x = torch.tensor([[1.0], [1e-3]], dtype=dtype)
    y = torch.tensor([[1e4], [1e4]], dtype=dtype)
    z = torch.tensor([[1e4], [-1e4]], dtype=dtype)
    tau = torch.tensor(1.0, dtype=dtype)
    La, Lb, Lc = emu.cube_lse_forward(x, y, z, tau)
    assert La.dtype == Lb.dtype == Lc.dtype == torch.float64
    assert abs(float(La[0]) - (1e8 + math.log(2))) < 1e-6, float(La[0]) - 1e8
    gs = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
          torch.zeros(2, dtype=torch.float64)]
    shifted = [shift_and_weight(L, g, dtype) for L, g in zip((La, Lb, Lc), gs)]  # as ops passes them
    dx, dy, dz, _ = emu.cube_lse_backward(x, y, z, tau, *(s for s, _ in shifted), *(w for _, w in shifted))
    assert float(dx[0, 0]) == pytest.approx(1e8, rel=1e-6)
    # dLa[0]/dy[j] = sum_k softmax x[0] z[k]: 0.5 * 1e4 for each tied j; dz[0] = sum_j 0.5 * 1e4.
    assert dy[:, 0].tolist() == pytest.approx([5e3, 5e3], rel=1e-6)
    assert dz[:, 0].tolist() == pytest.approx([1e4, 0.0], rel=1e-6, abs=1e-6)

    # The pair op ("n" sampling, M = 2): a[0] against b[1], b[2] tied at 1e8, the diagonal at -1e8.
    a = torch.tensor([[1e4]], dtype=dtype)
    b = torch.tensor([[-1e4], [1e4], [1e4]], dtype=dtype)
    pos = torch.tensor([-1e8], dtype=dtype)
    L = emu.pair_lse_forward(a, b, pos, tau)
    assert L.dtype == torch.float64 and abs(float(L[0]) - (1e8 + math.log(2))) < 1e-6
    shift, weight = shift_and_weight(L, torch.ones(1, dtype=torch.float64), dtype)
    da, db, dpos, _ = emu.pair_lse_backward(a, b, pos, tau, shift, weight)
    assert float(da[0, 0]) == pytest.approx(1e4, rel=1e-6)  # the tie's average of b[j]: a float32 L gives 2e4
    assert db[:, 0].tolist() == pytest.approx([0.0, 5e3, 5e3], rel=1e-6, abs=1e-6)
    assert float(dpos[0]) == 0.0


@no_gpu_only
@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_emulated_huge_logits_through_ops(emulated, mode):
    # tests/test_numerics_edges.py's checks (issue 14 items 10 and 12c) through ops with the
    # emulated kernels: ties at logit 1e8 (cube and pair), and "n" sampling with rows of norm 1e4
    # against the float64 oracle at float32's tolerance (IEEE tiles only: TF32's is 1e-2).
    from test_numerics_edges import check_cube_tie, check_n_sampling_norm_1e4, check_pair_tie

    name = emulated(mode)
    check_cube_tie(name)
    check_pair_tie(name)
    if mode == "ieee":
        check_n_sampling_norm_1e4(name)
