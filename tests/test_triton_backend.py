"""What only the Triton backend has: its shared exponentials and their fallback, every
configuration of its lists, its low-precision operands, its tuning and device rules.

The battery every backend passes (the oracle cases, opcheck, compile, determinism, ...) is
tests/test_conformance.py. With CUDA the tests run the compiled kernels on the GPU at larger
sizes. Without CUDA they run the same kernels on CPU tensors through Triton's interpreter at
small sizes. ``TRITON_INTERPRET=1`` must be set before the kernels are decorated (when
``symile_kernels.triton`` is first imported), and setting it in this process would leak into
other test modules, so ``test_interpreter_run`` reruns this file and the conformance suite in
a child pytest with it set; in the parent the kernel tests skip with a pointer to that child.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from symile_kernels import available_backends, backends, symile_loss  # noqa: E402
from symile_kernels import chunked  # noqa: E402

from harness import check_against_oracle, make_inputs, relative_error  # noqa: E402

_CHILD_ENV = "SYMILE_KERNELS_TRITON_TEST_CHILD"
CUDA = torch.cuda.is_available()
CHILD = not CUDA and os.environ.get(_CHILD_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNELS = CUDA or CHILD
DEVICE = "cuda" if CUDA else "cpu"

ALL = (True, True, True, True)  # every gradient (the backward kernels' needs)
kernels = pytest.mark.skipif(not RUN_KERNELS, reason="ran in the TRITON_INTERPRET=1 child of test_interpreter_run")


def gpu_only(test):
    """Needs CUDA: marked ``gpu`` (selectable with ``-m gpu``) and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


# The interpreter evaluates log(0) on masked lanes in numpy; the kernels mask those results.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

def _adversarial(N: int, d: int) -> list:
    """Unit rows concentrated on one feature with alternating signs: logits near +-tau,
    so at tau = 100 tiles span 200 in the logits and the shared exponential must fall back."""
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    signs = torch.tensor([1.0 if i % 3 else -1.0 for i in range(N)], dtype=torch.float64)
    reps = [signs[:, None] * e + 0.05 * torch.randn(N, d, dtype=torch.float64) for _ in range(3)]
    reps[2] = reps[2].flip(0)
    return [torch.nn.functional.normalize(r, dim=1) for r in reps]


@kernels
@pytest.mark.parametrize("force_fallback", (False, True))
def test_shared_exponential_and_its_fallback(monkeypatch, force_fallback):
    from symile_kernels.triton import cube

    if force_fallback:  # no tile may share: every tile takes the second-exponential path
        monkeypatch.setattr(cube, "FORWARD_SHARE_SPREAD", -1.0)
        monkeypatch.setattr(cube, "BACKWARD_SHARE_SPREAD", -1.0)
        reps = make_inputs("unit", 3, 19, 48)
    else:  # logits span [-100, 100]: some tiles share, the wide ones fall back
        reps = _adversarial(19 if not CUDA else 300, 48)
    check_against_oracle("triton", reps, 100.0, dtype=torch.float32, device=DEVICE)


def _close(out, ref, tol):
    for o, r in zip(out, ref):
        err = relative_error(o, r)
        assert err <= tol, f"relative error {err:.3g} > {tol}"


@kernels
@pytest.mark.parametrize("grad_scale", ("rand", "loss"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision_backend_functions(dtype, grad_scale):
    # The backend functions take bf16/fp16 tensors directly (tensor-core products on a
    # GPU; float32 products under the interpreter) with float32 arithmetic and float64 LSEs:
    # compared with the chunked backend in float64 on the same rounded values (docs/math.md
    # section 6: 2e-2 loss, 5e-2 grads).
    from symile_kernels.triton import BACKEND

    I, J, K, d = (13, 11, 9, 20) if not CUDA else (301, 129, 257, 200)
    x, y, z = (torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(DEVICE, dtype) for n in (I, J, K))
    tau = torch.tensor(14.3, device=DEVICE)
    exact = [t.double().cpu() for t in (x, y, z)]
    L = BACKEND.cube_lse_forward(x, y, z, tau)
    assert all(v.dtype == torch.float64 for v in L)  # docs/math.md section 6.4
    L_ref = chunked.cube_lse_forward(*exact, tau.double().cpu())
    _close(L, L_ref, 2e-2)
    # Upstream gradients from rand, or at the mean loss's scale (1 / (3 N) per LSE).
    g = [torch.rand(n, device=DEVICE) / (3 * n if grad_scale == "loss" else 1) for n in (I, J, K)]
    grads = BACKEND.cube_lse_backward(x, y, z, tau, *L, *g, ALL)
    assert [t.dtype for t in grads[:3]] == [dtype] * 3
    _close(grads, chunked.cube_lse_backward(*exact, tau.double().cpu(), *L_ref, *[v.double().cpu() for v in g]),
           5e-2)
    pos = tau * (x.float() * y[:1].float()).sum(1)
    a, b = x, x.flip(0).contiguous()
    P = BACKEND.pair_lse_forward(a, b, pos, tau)
    P_ref = chunked.pair_lse_forward(a.double().cpu(), b.double().cpu(), pos.double().cpu(), tau.double().cpu())
    _close([P], [P_ref], 2e-2)


@kernels
def test_float64_lse_at_huge_logits():
    # docs/math.md section 6.4 (issue 14 items 10 and 12c): at logits near 1e8 the kernels keep
    # (max, sum) pairs through every merge and return float64 LSEs, so a tie's log 2 survives and
    # the backward's e^(S - L) sums to 1 (a float32 max + log(sum) gave twice the tie's gradient).
    from test_numerics_edges import check_cube_tie, check_n_sampling_norm_1e4, check_pair_tie

    check_cube_tie("triton", DEVICE)
    check_pair_tie("triton", DEVICE)
    check_n_sampling_norm_1e4("triton", DEVICE)


@kernels
def test_forward_finite_when_masked_rows_meet_low_logits():
    # A ragged tile whose largest logit is -100: masked rows once took the reference 0, so their
    # column weight exp(0 - (-100)) overflowed and 0 * inf made Lc NaN.
    from symile_kernels.triton import BACKEND

    x = torch.zeros(7, 4, device=DEVICE)
    x[:, 0] = 1.0
    tau = torch.tensor(100.0, device=DEVICE)
    L = BACKEND.cube_lse_forward(x, x.clone(), -x, tau)
    L_ref = chunked.cube_lse_forward(x.double().cpu(), x.double().cpu(), -x.double().cpu(), tau.double().cpu())
    assert abs(float(L_ref[2][0]) + 96.108) < 1e-3
    _close(L, L_ref, 1e-6)


@kernels
def test_fp16_gradients_at_the_loss_scale(monkeypatch):
    # G scales like 1 / (3 N^3) under the mean loss: about 2e-8 at N = 256, below fp16's range.
    # A 16-row cube with upstream gradients of 1 / (3 * 256) * (16 / 256)^2 has G of that size.
    # fp16 operands for G's contractions flush it to zero (checked below as a control); the kernels
    # contract G in float32 operands for fp16 inputs.
    from symile_kernels.triton import BACKEND, _launch
    import triton.language as tl

    N, d = 16, 32
    x, y, z = (torch.nn.functional.normalize(torch.randn(N, d), dim=1).to(DEVICE, torch.float16) for _ in range(3))
    tau = torch.tensor(14.3, device=DEVICE)
    exact = [t.double().cpu() for t in (x, y, z)]
    L = BACKEND.cube_lse_forward(x, y, z, tau)
    L_ref = chunked.cube_lse_forward(*exact, tau.double().cpu())
    g = [torch.full((N,), (16 / 256) ** 2 / (3 * 256), device=DEVICE) for _ in range(3)]
    ref = chunked.cube_lse_backward(*exact, tau.double().cpu(), *L_ref, *[v.double().cpu() for v in g])
    grads = BACKEND.cube_lse_backward(x, y, z, tau, *L, *g, ALL)
    _close(grads, ref, 5e-2)
    if not CUDA:  # the control: G in fp16 operands (the kernels before the fix) misses the tolerance
        monkeypatch.setattr(_launch, "grad_dot", lambda dtype: (tl.float16, None))
        bad = BACKEND.cube_lse_backward(x, y, z, tau, *L, *g, ALL)
        assert max(relative_error(b, r) for b, r in zip(bad[:3], ref[:3])) > 5e-2


def _config_cases():
    """(family, arch, variant, index): every configuration of every GPU list, each reached by the
    feature size that makes a launch take it (a kernel without a "-seg3" list runs its bucket's)."""
    from symile_kernels.triton import _launch, kernel_configs

    cases = []
    for family in ("cube", "pair"):
        kernels = sorted({n.split("/")[0] for n in kernel_configs() if n.startswith(family + "_")})
        for arch in ("sm90", "sm80"):
            for variant, d in _launch.VARIANT_D.items():
                names = {_launch.list_name(k, arch, d) for k in kernels}
                if variant.endswith("-seg3") and not any(n.endswith("-seg3") for n in names):
                    continue  # no kernel of the family has this variant: the bucket's lists are checked already
                count = max(len(kernel_configs()[n]) for n in names)
                cases += [(family, arch, variant, i) for i in range(count)]
    return cases


@kernels
@pytest.mark.parametrize("family,arch,variant,index", _config_cases() if RUN_KERNELS else [], ids=str)
def test_every_config(family, arch, variant, index):
    # Each configuration of each GPU list runs under the interpreter against the oracle: the forward
    # and both backward passes of the family, each launched from the list a GPU of ``arch`` takes at
    # this feature size, pinned to configuration ``index`` (a shorter list: its last one).
    from contextlib import ExitStack

    from symile_kernels.triton import _launch, interpret_as, kernel_configs, pinned_config

    d = _launch.VARIANT_D[variant]
    kernels = sorted({n.split("/")[0] for n in kernel_configs() if n.startswith(family + "_")})
    with ExitStack() as stack:
        stack.enter_context(interpret_as(arch))
        pins = [stack.enter_context(pinned_config(name, min(index, len(kernel_configs()[name]) - 1)))
                for name in sorted({_launch.list_name(k, arch, d) for k in kernels})]
        if family == "cube":  # 17-37 rows against blocks of 16-128: ragged tiles
            check_against_oracle("triton", make_inputs("unit", 3, 300 if CUDA else 37 if d <= 32 else 17, d), 14.3,
                                 dtype=torch.float32, device=DEVICE)
        else:
            check_against_oracle("triton", make_inputs("unit", 2, 70 if not CUDA else 300, d), 14.3,
                                 dtype=torch.float32, device=DEVICE, negative_sampling="n")
    assert all(pin.launches > 0 for pin in pins), [(p.name, p.launches) for p in pins]


@kernels
@pytest.mark.parametrize("I,J,d", [(5, 19, 20), (19, 19, 3)] + ([(300, 1031, 256)] if CUDA else []))
def test_rectangular_pair_lse(I, J, d):
    # Distributed runs pass a process's I local rows against the J rows of the gathered batch.
    from symile_kernels.triton import BACKEND

    a, b = (torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(DEVICE) for n in (I, J))
    tau = torch.tensor(100.0, device=DEVICE)
    pos = tau * (a * b[:I]).sum(1)
    L = BACKEND.pair_lse_forward(a, b, pos, tau)
    exact = [t.double().cpu() for t in (a, b, pos, tau)]
    L_ref = chunked.pair_lse_forward(*exact)
    _close([L], [L_ref], 1e-5)
    gL = torch.rand(I, device=DEVICE)
    _close(BACKEND.pair_lse_backward(a, b, pos, tau, L, gL, ALL),
           chunked.pair_lse_backward(*exact, L_ref, gL.double().cpu()), 1e-4)


@kernels
def test_backward_skips_unneeded_passes():
    # needs=(dx, dy, dz, dtau): the passes nobody needs are skipped (None), the others unchanged.
    from symile_kernels.triton import cube, pair

    x, y, z = (torch.nn.functional.normalize(torch.randn(9, 20), dim=1).to(DEVICE) for _ in range(3))
    tau = torch.tensor(14.3, device=DEVICE)
    L = cube.cube_lse_forward(x, y, z, tau)
    g = [torch.rand(9, device=DEVICE) for _ in range(3)]
    full = cube.cube_lse_backward(x, y, z, tau, *L, *g)
    only_dz = cube.cube_lse_backward(x, y, z, tau, *L, *g, needs=(False, False, True, False))
    assert only_dz[0] is None and only_dz[1] is None and only_dz[3] is None and torch.equal(only_dz[2], full[2])
    no_dz = cube.cube_lse_backward(x, y, z, tau, *L, *g, needs=(True, True, False, True))
    assert no_dz[2] is None and all(torch.equal(a, b) for a, b in zip(no_dz[:2], full[:2]))
    pos = tau * (x * y).sum(1)
    P = pair.pair_lse_forward(x, y, pos, tau)
    full = pair.pair_lse_backward(x, y, pos, tau, P, g[0])
    only_db = pair.pair_lse_backward(x, y, pos, tau, P, g[0], needs=(False, True, False, False))
    assert only_db[0] is None and only_db[2] is None and torch.equal(only_db[1], full[1])


@kernels
def test_listed_but_never_auto_on_cpu():
    assert "triton" in available_backends(DEVICE)
    if not CUDA:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's one-time fallback warning
            assert backends.resolve("auto", torch.device("cpu")) != "triton"


@gpu_only
def test_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_against_oracle("triton", make_inputs("unit", 3, 257, 256), 100.0, dtype=torch.float32,
                             tolerance="tf32", device=DEVICE)
        check_against_oracle("triton", make_inputs("unit", 3, 513, 64), 14.3, dtype=torch.float32,
                             tolerance="tf32", device=DEVICE, negative_sampling="n")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@gpu_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_large_cube_against_chunked_float64(dtype):
    # Many programs, splits and autotuned tiles: compared with the chunked backend in float64.
    N, d = 1031, 256
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    x, y, z = (torch.nn.functional.normalize(torch.randn(N, d, device="cuda"), dim=1).to(dtype) for _ in range(3))
    tau = torch.tensor(14.3, device="cuda")
    exact = [t.double() for t in (x, y, z)]
    from symile_kernels.triton import BACKEND

    L = BACKEND.cube_lse_forward(x, y, z, tau)
    L_ref = chunked.cube_lse_forward(*exact, tau.double())
    _close(L, L_ref, tol_loss)
    g = [torch.rand(N, device="cuda") / N for _ in range(3)]
    grads = BACKEND.cube_lse_backward(x, y, z, tau, *L, *g, ALL)
    _close(grads, chunked.cube_lse_backward(*exact, tau.double(), *L_ref, *[v.double() for v in g]), tol_grad)


@pytest.mark.skipif(CUDA or CHILD, reason="the CPU parent only")
def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        symile_loss(make_inputs("unit", 3, 4, 3), 1.0, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.resolve("auto", torch.device("cpu")) != "triton"


@pytest.mark.skipif(CHILD, reason="the parent only")
def test_an_older_triton_names_the_version_needed():
    # A fresh process, as the version is checked when symile_kernels.triton is first imported.
    code = ("import torch, triton; triton.__version__ = '3.5.1'; from symile_kernels import backends; "
            "print(backends.unavailable_reason('triton', torch.device('cpu')))")
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs triton >= 3.6, found triton 3.5.1" in done.stdout
    from symile_kernels.triton import _launch

    assert _launch.triton_version("3.9.0+git0c3a7e1") == (3, 9) and _launch.TRITON_VERSION >= _launch.MIN_TRITON


@pytest.mark.skipif(CUDA or CHILD, reason="the CPU parent only; with CUDA the tests run directly")
def test_interpreter_run():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_ENV: "1"})
    env.pop(backends.ENV_VAR, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conformance = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_conformance.py")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), conformance], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    print(done.stdout[-6000:])
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout and " failed" not in done.stdout
