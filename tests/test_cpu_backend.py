"""The fused C++ CPU backend (backend="cpu", csrc/cpu/) against the float64 oracle.

Skipped as a whole, with the reason, when the extension can neither be loaded
nor JIT-built here.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import symile_kernels
from symile_kernels import cpu as cpu_backend

from harness import TOLERANCES, make_inputs, rel

_REASON = cpu_backend.load_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

OPS = torch.ops.symile_kernels

TOL = TOLERANCES  # docs/math.md section 6: (loss, gradients) relative tolerances per compute mode
DTYPES = (torch.float64, torch.float32)
# Its loss and gradients against the oracle: tests/test_correctness.py.


def make_reps(M, N, d, kind, dtype=torch.float64):
    """M fresh (N, d) representations of a harness input kind, cast to ``dtype``."""
    return [r.to(dtype) for r in make_inputs(kind, M, N, d)]


@pytest.mark.parametrize("M,negative_sampling", [(3, "n_squared"), (4, "n_squared"), (3, "n"), (2, "n_squared")])
def test_gradcheck_float64(M, negative_sampling):
    reps = [r.requires_grad_(True) for r in make_reps(M, 4, 3, "gaussian")]
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        torch.manual_seed(0)  # the same permutations at every evaluation ("n")
        return symile_kernels.symile_loss(list(args[:-1]), args[-1], negative_sampling=negative_sampling,
                                          backend="cpu")

    assert torch.autograd.gradcheck(fn, (*reps, tau))


def test_raw_ops_gradcheck_rectangular():
    """The cube ops alone on a rectangular cube (I != J != K), with random incoming gradients."""
    x, y, z = (torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (5, 3, 4))
    tau = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    gL = [torch.randn(n, dtype=torch.float64) for n in (5, 3, 4)]

    def fn(x, y, z, tau):
        La, Lb, Lc = OPS.cube_lse(x, y, z, tau, "cpu")
        return (La * gL[0]).sum() + (Lb * gL[1]).sum() + (Lc * gL[2]).sum()

    assert torch.autograd.gradcheck(fn, (x, y, z, tau))
    # The pair ops on I < J: a process's local rows against the global batch.
    a, b = (torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (4, 6))
    pos = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, pos, tau: (OPS.pair_lse(a, b, pos, tau, "cpu") * gL[0][:4]).sum(),
                                    (a, b, pos, tau))


def test_rectangular_cube_matches_chunked():
    from symile_kernels import chunked
    x, y, z = (F.normalize(torch.randn(n, 48, dtype=torch.float64), dim=1) for n in (300, 7, 33))
    tau = torch.tensor(100.0, dtype=torch.float64)
    g = [torch.randn(n, dtype=torch.float64) for n in (300, 7, 33)]
    ref = chunked.cube_lse_forward(x, y, z, tau)
    ref_grads = chunked.cube_lse_backward(x, y, z, tau, *ref, *g)
    for dtype in DTYPES:
        c = [t.to(dtype) for t in (x, y, z, tau)]
        out = OPS.cpu_cube_lse_forward(*c)
        grads = OPS.cpu_cube_lse_backward(*c, *[t.to(dtype) for t in (*ref, *g)])
        loss_tol, grad_tol = TOL[dtype]
        for o, r in zip(out, ref):
            assert rel(o, r) < loss_tol
        for o, r in zip(grads, ref_grads):
            assert rel(o, r) < grad_tol


def test_thread_count_does_not_change_results():
    x, y, z = (F.normalize(torch.randn(129, 48), dim=1) for _ in range(3))
    tau = torch.tensor(14.3)
    g = [torch.randn(129) for _ in range(3)]
    a, b = x, y
    pos = tau * (a * b).sum(1)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            L = OPS.cpu_cube_lse_forward(x, y, z, tau)  # float64 LSEs; the backward takes float32 ones
            grads = OPS.cpu_cube_lse_backward(x, y, z, tau, *(l.float() for l in L), *g)
            P = OPS.cpu_pair_lse_forward(a, b, pos, tau)
            pgrads = OPS.cpu_pair_lse_backward(a, b, pos, tau, P.float(), g[0])
            results.append([*L, *grads, P, *pgrads])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert rel(two, one) < 1e-6  # float32 rounding, nothing more


def test_opcheck_raw_cpp_ops():
    x, y, z = (torch.randn(n, 5) for n in (7, 4, 6))
    tau = torch.tensor(3.0)
    L = [l.float() for l in OPS.cpu_cube_lse_forward(x, y, z, tau)]  # the backward's dtype
    g = [torch.randn(n) for n in (7, 4, 6)]
    torch.library.opcheck(OPS.cpu_cube_lse_forward, (x, y, z, tau))
    torch.library.opcheck(OPS.cpu_cube_lse_backward, (x, y, z, tau, *L, *g))
    a, b = torch.randn(9, 5), torch.randn(9, 5)
    pos = torch.randn(9)
    P = OPS.cpu_pair_lse_forward(a, b, pos, tau).float()
    torch.library.opcheck(OPS.cpu_pair_lse_forward, (a, b, pos, tau))
    torch.library.opcheck(OPS.cpu_pair_lse_backward, (a, b, pos, tau, P, g[0][:1].expand(9).contiguous()))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set size")
def test_repeated_calls_do_not_grow_memory():
    reps = [r.requires_grad_(True) for r in make_reps(3, 256, 64, "unit", torch.float32)]

    def step():
        for r in reps:
            r.grad = None
        symile_kernels.symile_loss(reps, 14.3, backend="cpu").backward()
        symile_kernels.symile_loss(reps[:2], 14.3, backend="cpu").backward()

    for _ in range(3):
        step()
    before = _rss_bytes()
    for _ in range(15):
        step()
    growth = _rss_bytes() - before
    # The per-call workspace at this size is about 3 MB; a leak of it per call would be 45 MB.
    assert growth < 16 * 2 ** 20, f"resident memory grew by {growth / 2 ** 20:.1f} MiB over 15 calls"


def test_bad_inputs_to_raw_ops_name_the_tensor():
    x, y, z = (torch.randn(5, 4) for _ in range(3))
    tau = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        OPS.cpu_cube_lse_forward(torch.randn(4, 5).t(), y, z, tau)
    with pytest.raises(RuntimeError, match="y must have the dtype of x"):
        OPS.cpu_cube_lse_forward(x, y.double(), z, tau)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        OPS.cpu_cube_lse_forward(x.int(), y, z, tau)
    with pytest.raises(RuntimeError, match="z must have shape"):
        OPS.cpu_cube_lse_forward(x, y, torch.randn(5, 3), tau)
    with pytest.raises(RuntimeError, match="tau must have shape"):
        OPS.cpu_cube_lse_forward(x, y, z, tau.reshape(1))
    L = [l.float() for l in OPS.cpu_cube_lse_forward(x, y, z, tau)]
    with pytest.raises(RuntimeError, match="gLb must have the dtype of x"):
        OPS.cpu_cube_lse_backward(x, y, z, tau, *L, L[0], L[1].double(), L[2])
    with pytest.raises(RuntimeError, match="pos must have shape"):
        OPS.cpu_pair_lse_forward(x, y, torch.randn(4), tau)
    with pytest.raises(RuntimeError, match="b must be contiguous"):
        OPS.cpu_pair_lse_forward(x, torch.randn(4, 5).t(), torch.randn(5), tau)


def test_nan_input_gives_nan_not_a_number():
    x, y, z = (torch.randn(33, 8) for _ in range(3))
    x[3, 2] = float("nan")
    La, Lb, Lc = OPS.cpu_cube_lse_forward(x, y, z, torch.tensor(1.0))
    assert torch.isnan(La[3]) and torch.isnan(Lb).all() and torch.isnan(Lc).all()


def test_backend_is_listed_and_refuses_other_devices():
    assert "cpu" in symile_kernels.available_backends("cpu")
    reason = cpu_backend.BACKEND.unavailable_reason(torch.device("meta"))
    assert reason is not None and "CPU tensors only" in reason


def test_production_library_has_no_test_operators():
    # cpu_exp_test and cpu_tile_mm_test live in csrc/cpu/test_ops.cpp, built only for the tests
    # (tests/cpu_test_ops.py): a fresh process that loads the backend alone does not have them.
    import subprocess
    import sys

    code = ("import torch\nfrom symile_kernels import cpu\nassert cpu.load_reason() is None\n"
            "print(sorted(n for n in ('cpu_exp_test', 'cpu_tile_mm_test', 'cpu_cube_lse_forward')\n"
            "             if hasattr(torch.ops.symile_kernels, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cpu_cube_lse_forward']"
