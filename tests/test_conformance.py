"""The conformance suite: one battery that every backend passes on every device it runs on.

Each test body is parametrised over ``TARGETS``, (backend, device) pairs: the loss and every
gradient against the float64 oracle (``symile_kernels.testing``: the harness's input kinds,
awkward sizes, tau up to 100, float64, float32 and the low-precision dtypes), the ops under
``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, determinism, bad input, the
needed gradients reaching the backend, no mutation of the inputs, the edges (N = 1 and
non-finite inputs), torch.func, and a second derivative's error. A backend of your own gets the
whole battery by adding one line to ``TARGETS``, as ``wrapped`` (tests/wrapped_backend.py: a
registered wrapper of chunked) shows.

Targets that need a machine this one lacks are skipped with the reason; the CUDA ones are marked
``gpu`` (the GPU suite selects them with ``-m gpu``). The triton backend on the CPU runs in
Triton's interpreter, which must be switched on before the kernels are decorated:
tests/test_triton_backend.py::test_interpreter_run reruns this file in a TRITON_INTERPRET=1
child, where only that target runs (at interpreter sizes).
"""
from __future__ import annotations

import os

import pytest
import torch

from symile_kernels import backends, chunked, symile_loss

from harness import INPUT_KINDS, Case, check_compile_matches_eager, make_inputs, _test_correctness
from wrapped_backend import Wrapped

TARGETS = [
    ("chunked", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
    ("chunked", "cuda"), ("triton", "cuda"), ("cuda", "cuda"),
    ("wrapped", "cpu"),  # a registered backend of a user's own (the fixture below registers it)
]
INTERPRETER = ("triton", "cpu")
CHILD = os.environ.get("SYMILE_KERNELS_TRITON_TEST_CHILD") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
OPS = torch.ops.symile_kernels
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module", autouse=True)
def _wrapped_backend():
    backends.register(Wrapped(chunked.BACKEND, "wrapped"), replace=True)
    yield
    backends.unregister("wrapped")


def _marks(target):
    backend, device = target
    marks = []
    if device == "cuda":
        marks += [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    if target == INTERPRETER:
        marks.append(pytest.mark.skipif(not CHILD, reason="runs in the TRITON_INTERPRET=1 child of "
                                        "tests/test_triton_backend.py::test_interpreter_run"))
    elif CHILD:
        marks.append(pytest.mark.skip(reason="the interpreter child runs the triton target only"))
    return marks


def _targets(*extra_marks):
    return [pytest.param(t, marks=_marks(t) + list(extra_marks), id=f"{t[0]}-{t[1]}") for t in TARGETS]


def _usable(target):
    backend, device = target
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable on {device}: {reason}")
    return backend, device


STRICT = 1e-3
CASES = [
    # M = 3 cubes: awkward sizes, tau up to 100 with unit rows, ties, one huge row, faint rows.
    *[Case(3, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (1, 3, 1.0, "unit"), (7, 48, 100.0, "unit"), (33, 200, 100.0, "unit"),
        (129, 48, 14.3, "unit"), (33, 3, 1.0, "gaussian"), (7, 48, 1.0, "ties_alternating"),
        (33, 48, 100.0, "ties_alternating"), (33, 48, 14.3, "huge_unit"), (33, 48, 100.0, "huge_unit"),
        (33, 48, 100.0, "faint")]],
    *[Case(3, N, d, "unit", 100.0, dtype) for dtype in (F64, F32, BF16) for N in (1, 2, 7, 33, 130)
      for d in (1, 3, 48)],
    # d = 1 unit rows: every gradient is the difference of two equal float32 numbers of size ~tau,
    # exactly 0 only if both round alike, so the floor is docs/math.md section 6.1's (5% of the
    # positive part), not STRICT's 1e-3, which would ask float32 for 1e-8 relative accuracy.
    *[Case(3, 2, 1, "unit", 14.3, dtype) for dtype in (F64, F32)],
    # One repeated row in y and z at a small tau: equal logits per anchor row, and dtau a small
    # difference of large sums (float32 sums of equal terms bias it: docs/math.md section 6.1).
    *[Case(3, 130, d, "repeated", 0.01, dtype) for dtype in (F64, F32) for d in (1, 48)],
    *[Case(3, 33, 48, kind, tau, dtype) for kind, tau in INPUT_KINDS for dtype in (F64, F32)],
    # Other modality counts (M = 2 is the CLIP-shaped pair path, M >= 4 folds modalities).
    *[Case(4, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (7, 5, 14.3, "unit"), (5, 48, 100.0, "unit"), (6, 3, 1.0, "gaussian"), (6, 8, 100.0, "faint")]],
    *[Case(2, N, d, kind, tau, dtype, floor=STRICT) for dtype in (F64, F32) for N, d, tau, kind in [
        (1, 3, 1.0, "unit"), (33, 48, 100.0, "unit"), (129, 200, 14.3, "ties_alternating"),
        (600, 7, 1.0, "gaussian"), (33, 8, 100.0, "faint")]],
    *[Case(M, N, d, "unit", 14.3, dtype) for dtype in (F64, F32)
      for M, N, d in [(2, 33, 48), (2, 1, 3), (4, 7, 3), (4, 13, 48), (5, 5, 3)]],
    # Negative sampling "n": the backend and the oracle draw the same permutations from one seed.
    *[Case(M, N, d, kind, tau, dtype, "n", seed=1234 + N, floor=STRICT) for dtype in (F64, F32)
      for M, N, d, tau, kind in [(3, 33, 48, 100.0, "unit"), (3, 129, 200, 14.3, "unit"),
                                 (4, 7, 3, 1.0, "gaussian"), (3, 33, 48, 14.3, "huge_unit")]],
    *[Case(M, N, d, "unit", 100.0, dtype, "n", seed=7) for dtype in (F64, F32, BF16)
      for M, N, d in [(2, 33, 5), (3, 130, 48), (3, 7, 1), (5, 33, 3)]],
    # Low-precision inputs give gradients in their own dtypes.
    *[Case(3, 33, 48, "unit", 14.3, dtype, floor=STRICT) for dtype in (BF16, F16)],
    *[Case(3, 33, 48, "unit", 14.3, dtype, "n", seed=7, floor=STRICT) for dtype in (BF16, F16)],
    # The CLIP loss.
    *[Case(M, 33, 48, "unit", 14.3, F64, loss="clip") for M in (2, 3, 4)],
    Case(3, 33, 48, "unit", 14.3, F64, loss="clip", floor=STRICT),
]
# The interpreter is slow: N <= 33, d <= 48.
INTERPRETER_CASES = [
    *[Case(3, N, d, "unit", tau, dtype) for N, d, tau, dtype in [
        (1, 3, 1.0, F32), (7, 48, 100.0, F32), (33, 3, 100.0, F32), (20, 48, 1.0, F32), (7, 48, 100.0, BF16),
        (7, 3, 14.3, F16), (7, 3, 100.0, F64)]],
    *[Case(3, 13, 5, kind, tau, F32) for kind, tau in (("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0))],
    Case(4, 5, 3, "unit", 14.3, F32),
    *[Case(M, N, d, "unit", 100.0, dtype, "n", seed=7) for M, N, d in [(3, 33, 48), (2, 33, 5), (4, 7, 3)]
      for dtype in (F32, BF16)],
    Case(3, 20, 48, "unit", 14.3, F64, loss="clip"),
    Case(2, 20, 48, "unit", 14.3, F32, loss="clip"),
]
# On a GPU, sizes that cross the kernels' blocks too.
GPU_CASES = [
    *[Case(3, N, d, "unit", tau, dtype) for N in (129, 257) for d in (3, 200, 256) for tau in (1.0, 100.0)
      for dtype in (F32, BF16)],
    *[Case(3, 131, 5, kind, tau, dtype) for kind, tau in (("gaussian", 1.0), ("ties", 14.3), ("huge_row", 1.0))
      for dtype in (F64, F32)],
    *[Case(M, N, d, "unit", 14.3, F32) for M, N, d in [(4, 23, 48), (5, 9, 17)]],
    *[Case(M, N, d, "unit", 100.0, dtype, "n", seed=7) for M, N, d in [(3, 1025, 59), (2, 4097, 256)]
      for dtype in (F64, F32, BF16)],
]


def _cases(target):
    if target == INTERPRETER:
        return INTERPRETER_CASES
    return CASES + (GPU_CASES if target[1] == "cuda" else [])


@pytest.mark.parametrize("target,case", [pytest.param(t, c, marks=_marks(t), id=f"{t[0]}-{t[1]}-{c.id()}")
                                         for t in TARGETS for c in _cases(t)])
def test_correctness(target, case):
    backend, device = _usable(target)
    _test_correctness(backend, case, device=device)


def _reps(target, M=3, N=5, d=4, dtype=F32, grad=True):
    return [r.to(target[1], dtype).requires_grad_(grad) for r in make_inputs("unit", M, N, d)]


@pytest.mark.parametrize("dtype", (F32, F64), ids=str)
@pytest.mark.parametrize("target", _targets())
def test_opcheck(target, dtype):
    # Every op on this backend: schema, fake (the one torch.compile traces), autograd registration.
    backend, device = _usable(target)
    x, y, z = (t.to(device, dtype).requires_grad_() for t in (torch.randn(n, 6, dtype=F64) for n in (5, 4, 3)))
    tau = torch.tensor(3.0, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(OPS.cube_lse.default, (x, y, z, tau, backend))
    L = [v.detach().to(dtype) for v in OPS.cube_lse(x, y, z, tau, backend)]
    g = [torch.rand(t.shape[0], dtype=dtype, device=device) for t in (x, y, z)]
    plain = [t.detach() for t in (x, y, z, tau)]  # the backward ops have no derivative of their own
    for needs in ([True] * 4, [True, False, True, False], [False, False, False, True]):
        torch.library.opcheck(OPS.cube_lse_backward.default, (*plain, *L, *g, backend, needs))
    a, b = x.detach()[:4].requires_grad_(), y
    pos = (tau * (a * b).sum(1)).detach().requires_grad_()
    torch.library.opcheck(OPS.pair_lse.default, (a, b, pos, tau, backend))
    P = OPS.pair_lse(a, b, pos, tau, backend).detach().to(dtype)
    torch.library.opcheck(OPS.pair_lse_backward.default, (*(t.detach() for t in (a, b, pos, tau)), P, g[0][:4],
                                                          backend, [True, False, True, True]))
    if backends.kernels(backend, dtype).fuses_pair_forward():
        for needs in ([True] * 4, [False, True, False, False]):
            torch.library.opcheck(OPS.pair_lse_fused.default, (a, b, pos, tau, backend, needs))


@pytest.mark.parametrize("negative_sampling", ["n_squared", "n"])
@pytest.mark.parametrize("target", _targets())
def test_compile_fullgraph(target, negative_sampling):
    backend, device = _usable(target)

    def step(x, y, z, log_tau):
        return 2 * symile_loss([x, y, z], log_tau.exp(), negative_sampling=negative_sampling, backend=backend)

    check_compile_matches_eager(step, [r.detach() for r in _reps(target, N=9, d=6)])


@pytest.mark.parametrize("target", _targets())
def test_deterministic(target):
    backend, device = _usable(target)
    reps = _reps(target, N=13 if device == "cpu" else 700, d=40)
    tau = torch.tensor(30.0, device=device, requires_grad=True)
    results = []
    for _ in range(2):
        for sampling in ("n_squared", "n"):
            torch.manual_seed(0)
            loss = symile_loss(reps, tau, negative_sampling=sampling, backend=backend)
            results.append([loss.detach()] + list(torch.autograd.grad(loss, reps + [tau])))
    for first, second in zip(results[:2], results[2:]):
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("target", _targets())
def test_bad_input_names_the_argument(target):
    backend, device = _usable(target)
    x, y, z = (r.detach() for r in _reps(target, N=4, d=3))
    tau = torch.tensor(2.0, device=device)
    with pytest.raises(ValueError, match="y must be 2-D"):
        OPS.cube_lse(x, y[:0], z, tau, backend)
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        OPS.cube_lse(x, y.double(), z, tau, backend)
    with pytest.raises(ValueError, match="positive finite"):
        OPS.cube_lse(x, y, z, torch.tensor(0.0, device=device), backend)
    with pytest.raises(TypeError, match="tau must be a 0-dim torch.float32"):
        OPS.cube_lse(x, y, z, tau.double(), backend)
    with pytest.raises(ValueError, match="a has 4 rows but b only 3"):
        OPS.pair_lse(x, y[:3].contiguous(), torch.zeros(4, device=device), tau, backend)
    with pytest.raises(ValueError, match="pos must have shape"):
        OPS.pair_lse(x, y, torch.zeros(3, device=device), tau, backend)
    La, Lb, Lc = (v.float() for v in OPS.cube_lse(x, y[:3].contiguous(), z, tau, backend))  # rectangular is fine
    assert (La.shape, Lb.shape, Lc.shape) == ((4,), (3,), (4,))
    with pytest.raises(ValueError, match="gLb must have shape"):
        OPS.cube_lse_backward(x, y[:3].contiguous(), z, tau, La, Lb, Lc, *[torch.ones(4, device=device)] * 3,
                              backend, [True] * 4)
    with pytest.raises(ValueError, match="representations must hold at least 2"):
        symile_loss([x], 2.0, backend=backend)
    with pytest.raises(ValueError, match=r"logit_scale"):
        symile_loss([x, y, z], -1.0, backend=backend)


@pytest.mark.parametrize("M,frozen,expected", [
    (3, {2}, ("cube", (True, True, False, False))),
    (3, {0}, ("cube", (False, True, True, False))),
    # M = 4 folds modality 4 into x's rows: with x frozen the folded rows still need a gradient.
    (4, {0}, ("cube", (True, True, True, False))),
    (4, {0, 3}, ("cube", (False, True, True, False))),
])
@pytest.mark.parametrize("target", _targets())
def test_needed_gradients_reach_the_backend(target, M, frozen, expected):
    # The backend under test, wrapped to record the flags each backward receives; tau is a float.
    backend, device = _usable(target)
    recorder = Wrapped(backends.kernels(backend, F32), "recording")
    backends.register(recorder)
    try:
        reps = [r.detach().requires_grad_(m not in frozen) for m, r in enumerate(_reps(target, M=M, N=4, d=3))]
        symile_loss(reps, 14.3, backend="recording").backward()
    finally:
        backends.unregister("recording")
    assert recorder.calls and all(call == expected for call in recorder.calls), recorder.calls
    assert all((r.grad is None) == (m in frozen) for m, r in enumerate(reps))


@pytest.mark.parametrize("target", _targets())
def test_pair_needs_reach_the_backend(target):
    backend, device = _usable(target)
    recorder = Wrapped(backends.kernels(backend, F32), "recording")
    backends.register(recorder)
    try:
        a, b = _reps(target, M=2, N=5, d=3, grad=False)
        a.requires_grad_()
        symile_loss([a, b], torch.tensor(14.3, device=device, requires_grad=True), backend="recording").backward()
    finally:
        backends.unregister("recording")
    if recorder.fuses_pair_forward():  # the forward computes U (da and dtau) and V (db) only where needed:
        # pair_lse(a, b, pos): U for a and tau, no V (b is frozen); pair_lse(b, a, pos): U for tau, V for a.
        assert sorted(recorder.calls) == [("fused", (True, False)), ("fused", (True, True))]
    else:  # pair_lse(b, a, pos): b's rows need none, a's, pos and tau do; pair_lse(a, b, pos) the other way
        assert sorted(recorder.calls) == [("pair", (False, True, True, True)), ("pair", (True, False, True, True))]


@pytest.mark.parametrize("target", _targets())
def test_inputs_left_unmodified(target):
    backend, device = _usable(target)
    reps = _reps(target, M=4, N=7, d=5)
    tau = torch.tensor(10.0, device=device, requires_grad=True)
    before = [t.detach().clone() for t in reps + [tau]]
    for sampling in ("n_squared", "n"):
        symile_loss(reps, tau, negative_sampling=sampling, backend=backend).backward()
    symile_loss(reps[:2], tau, backend=backend).backward()
    for t, b in zip(reps + [tau], before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("target", _targets())
def test_one_tuple_gives_exactly_zero(target):
    # docs/math.md section 6.5: each LSE runs over the positive alone.
    backend, device = _usable(target)
    for M in (2, 3, 4):
        for sampling in ("n_squared", "n"):
            reps = [torch.randn(1, 5, device=device, requires_grad=True) for _ in range(M)]
            tau = torch.tensor(30.0, device=device, requires_grad=True)
            loss = symile_loss(reps, tau, negative_sampling=sampling, backend=backend)
            grads = torch.autograd.grad(loss, reps + [tau])
            assert float(loss) == 0.0 and all(bool((g == 0).all()) for g in grads), (M, sampling)


@pytest.mark.parametrize("target", _targets())
def test_non_finite_inputs_give_nan(target):
    # docs/math.md section 6.5: the loss and every gradient, whatever the backend's arithmetic.
    backend, device = _usable(target)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for M, sampling in ((2, "n_squared"), (3, "n_squared"), (3, "n")):
            for m in range(M):
                reps = [r.detach() for r in _reps(target, M=M, N=4, d=5)]
                reps[m][1, 2] = bad
                reps = [r.requires_grad_() for r in reps]
                loss = symile_loss(reps, 14.3, negative_sampling=sampling, backend=backend)
                loss.backward()
                assert torch.isnan(loss), (bad, M, sampling, m)
                assert all(bool(torch.isnan(r.grad).all()) for r in reps), (bad, M, sampling, m)


@pytest.mark.parametrize("target", _targets())
def test_torch_func_grad_and_vjp(target):
    backend, device = _usable(target)
    for M, sampling in ((3, "n_squared"), (3, "n"), (2, "n_squared")):
        reps = [r.detach() for r in _reps(target, M=M, N=6, d=5)]
        tau = torch.tensor(3.0, device=device)

        def loss(x, t):
            torch.manual_seed(1)
            return symile_loss([x] + reps[1:], t, negative_sampling=sampling, backend=backend)

        gx, gt = torch.func.grad(loss, argnums=(0, 1))(reps[0], tau)
        x, t = reps[0].clone().requires_grad_(), tau.clone().requires_grad_()
        loss(x, t).backward()
        assert torch.equal(gx, x.grad) and torch.equal(gt, t.grad)
        value, vjp = torch.func.vjp(loss, reps[0], tau)
        assert torch.equal(vjp(torch.ones_like(value))[0], x.grad)


@pytest.mark.parametrize("target", _targets())
def test_a_second_derivative_says_what_to_do(target):
    backend, device = _usable(target)
    for M, sampling in ((3, "n_squared"), (3, "n"), (2, "n_squared")):
        reps = _reps(target, M=M)
        grads = torch.autograd.grad(symile_loss(reps, 2.0, negative_sampling=sampling, backend=backend), reps,
                                    create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
            sum(g.square().sum() for g in grads).backward()
    x = reps[0].detach()
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        torch.func.jacrev(torch.func.grad(lambda r: symile_loss([r, x, x], 2.0, backend=backend)))(x)
