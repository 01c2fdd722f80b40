"""Public API: drop-in behaviour, dispatch, and the errors bad input gets."""
import sys
import warnings

import pytest
import torch

import symile_kernels
from symile_kernels import (MIPSimilarity, Symile, SymileLoss, available_backends, backends, clip_loss,
                            mip_similarity, symile_loss)

from harness import make_inputs


def reps3(N=5, d=4, dtype=torch.float32):
    return [r.to(dtype) for r in make_inputs("unit", 3, N, d)]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn", [symile_loss, clip_loss, lambda r, s: Symile("n_squared")(r, s),
                                lambda r, s: SymileLoss()(r, s)])
@pytest.mark.parametrize("representations,logit_scale,error,match", [
    ([torch.randn(4, 3)], 1.0, ValueError, "at least 2"),
    (torch.randn(3, 4, 2), 1.0, TypeError, "list or tuple"),
    ([torch.randn(4, 3), "x"], 1.0, TypeError, r"representations\[1\] must be a torch.Tensor"),
    ([torch.randn(4, 3), torch.randn(4, 3, 1)], 1.0, ValueError, r"representations\[1\] must be 2-D"),
    ([torch.randn(4, 3), torch.randn(5, 3)], 1.0, ValueError, r"representations\[1\] has shape \(5, 3\)"),
    ([torch.randn(4, 3), torch.randn(4, 2)], 1.0, ValueError, r"representations\[1\] has shape \(4, 2\)"),
    ([torch.randn(4, 3), torch.randint(0, 3, (4, 3))], 1.0, TypeError, "floating dtype"),
    ([torch.randn(4, 3), torch.randn(4, 3, dtype=torch.complex64)], 1.0, TypeError, "floating dtype"),
    ([torch.randn(0, 3), torch.randn(0, 3)], 1.0, ValueError, "N >= 1"),
    ([torch.randn(4, 3), torch.randn(4, 3, device="meta")], 1.0, ValueError, "is on meta"),
    ([torch.randn(4, 3)] * 2, 0.0, ValueError, "logit_scale must be a positive finite"),
    ([torch.randn(4, 3)] * 2, -2.0, ValueError, "logit_scale must be a positive finite"),
    ([torch.randn(4, 3)] * 2, float("nan"), ValueError, "logit_scale must be a positive finite"),
    ([torch.randn(4, 3)] * 2, torch.tensor(float("inf")), ValueError, "logit_scale must be a positive finite"),
    ([torch.randn(4, 3)] * 2, torch.tensor([1.0, 2.0]), ValueError, "logit_scale must be a scalar"),
    ([torch.randn(4, 3)] * 2, torch.tensor(2), TypeError, "logit_scale must be a floating tensor"),
    ([torch.randn(4, 3)] * 2, "14", TypeError, "logit_scale must be a float"),
    ([torch.randn(4, 3)] * 2, True, TypeError, "logit_scale must be a float"),
])
def test_bad_input(fn, representations, logit_scale, error, match):
    with pytest.raises(error, match=match):
        fn(representations, logit_scale)


def test_bad_negative_sampling_and_backend():
    with pytest.raises(ValueError, match="negative_sampling must be 'n' or 'n_squared'; got 'all'"):
        symile_loss(reps3(), 1.0, negative_sampling="all")
    with pytest.raises(ValueError, match="negative_sampling"):
        Symile(negative_sampling="N")
    with pytest.raises(ValueError, match="negative_sampling"):
        SymileLoss(negative_sampling=2)
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        symile_loss(reps3(), 1.0, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        Symile(backend="fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        symile_loss(reps3(), 1.0, backend=None)


def test_unavailable_backend_says_why():
    backends.register_module("broken", "symile_kernels._no_such_module")
    try:
        with pytest.raises(ValueError, match=r"backend='broken' cannot run on cpu: importing .* failed"):
            symile_loss(reps3(), 1.0, backend="broken")
        assert "broken" not in available_backends()
    finally:
        backends.unregister("broken")
    assert "broken" not in backends.NAMES


def test_missing_triton_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails as if it were not installed
    for module in [m for m in sys.modules if m.startswith("symile_kernels.triton")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "triton"})
    monkeypatch.setattr(backends, "_load_errors", {})
    reason = backends.unavailable_reason("triton", torch.device("cpu"))
    assert "ModuleNotFoundError" in reason, reason  # why
    assert "pip install 'symile_kernels[triton]'" in reason and "CUDA" in reason, reason  # how
    with pytest.raises(ValueError, match=r"symile_kernels\[triton\]"):
        symile_loss(make_inputs("unit", 3, 4, 3), 2.0, backend="triton")


def test_register_and_unregister_a_backend():
    from symile_kernels import chunked

    class Mine(chunked.ChunkedBackend):
        name = "mine"

    mine = Mine()
    backends.register(mine)
    try:
        assert "mine" in available_backends() and "mine" in backends.NAMES
        reps = make_inputs("unit", 3, 6, 4)
        assert float(symile_loss(reps, 14.3, backend="mine")) == float(symile_loss(reps, 14.3, backend="chunked"))
        assert SymileLoss(backend="mine").backend == "mine"
        with pytest.raises(ValueError, match="already registered"):
            backends.register(mine)
        backends.register(mine, replace=True)
    finally:
        backends.unregister("mine")
    assert "mine" not in backends.NAMES
    with pytest.raises(ValueError, match="backend must be one of"):
        symile_loss(make_inputs("unit", 3, 6, 4), 1.0, backend="mine")

    class Reserved(chunked.ChunkedBackend):
        name = "reference"

    with pytest.raises(ValueError, match="reserved"):
        backends.register(Reserved())
    with pytest.raises(TypeError, match="Backend"):
        backends.register(chunked)
    with pytest.raises(ValueError, match="built-in backends cannot be removed"):
        backends.unregister("chunked")


def test_a_backend_must_implement_the_four_kernels():
    class Half(backends.Backend):
        name = "half"

        def cube_lse_forward(self, x, y, z, tau):
            return x

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_registry_routes_float64():
    from symile_kernels import chunked

    class NoFloat64(chunked.ChunkedBackend):
        name = "no_f64"

        def for_dtype(self, dtype):
            return chunked.BACKEND if dtype == torch.float64 else self

        def cube_lse_forward(self, *args):
            raise AssertionError("float64 reached a backend without a float64 path")

    no_f64 = NoFloat64()
    backends.register(no_f64)
    try:
        assert backends.kernels("no_f64", torch.float64) is chunked.BACKEND
        assert backends.kernels("no_f64", torch.float32) is no_f64
        reps = make_inputs("unit", 3, 6, 4)
        assert float(symile_loss(reps, 14.3, backend="no_f64")) == float(symile_loss(reps, 14.3, backend="chunked"))
        with pytest.raises(AssertionError, match="without a float64 path"):
            symile_loss([r.float() for r in reps], 14.3, backend="no_f64")
    finally:
        backends.unregister("no_f64")


def test_environment_override(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="environment variable SYMILE_KERNELS_BACKEND"):
        symile_loss(reps3(), 1.0)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("not_built", "chunked"))
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch 'chunked' backend"):
        assert backends.resolve("auto", torch.device("cpu")) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cpu")) == "chunked"


def test_available_backends():
    names = available_backends()
    assert "chunked" in names and names[-1] == "reference"
    assert set(names) <= set(backends.NAMES)


# ---------------------------------------------------------------- drop-ins
symile = pytest.importorskip("symile", reason="the reference package symile==0.1.0 is a test dependency")


@pytest.mark.parametrize("negative_sampling", ["n", "n_squared"])
@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_symile_drop_in_same_value_same_seed(negative_sampling, backend):
    reps = make_inputs("unit", 3, 12, 8)
    torch.manual_seed(5)
    ours = Symile(negative_sampling, backend=backend)(reps, 14.3)
    torch.manual_seed(5)
    theirs = symile.Symile(negative_sampling)(reps, 14.3)
    assert abs(float(ours) - float(theirs)) <= 1e-12


def test_symile_default_is_n():
    assert Symile().negative_sampling == symile.Symile().negative_sampling == "n"


def test_symile_and_module_gradients_agree_with_package():
    reps = [r.requires_grad_() for r in make_inputs("unit", 3, 9, 6)]
    tau = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(SymileLoss("n_squared")(reps, tau), reps + [tau])
    theirs = torch.autograd.grad(symile.Symile("n_squared")(reps, tau), reps + [tau])
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("query_shape", [(6, 5), (5,)])
def test_mip_similarity_drop_in(query_shape):
    candidates = torch.randn(7, 5)
    queries = [torch.randn(*query_shape), torch.randn(*query_shape)]
    before = [q.clone() for q in queries]
    ours = MIPSimilarity()(candidates, queries)
    assert torch.allclose(ours, symile.MIPSimilarity()(candidates, [q.clone() for q in queries]))
    assert torch.allclose(ours, mip_similarity(candidates, queries))
    assert ours.shape == ((6, 7) if len(query_shape) == 2 else (1, 7))
    assert all(torch.equal(q, b) for q, b in zip(queries, before))


def test_mip_similarity_bad_input():
    with pytest.raises(ValueError, match=r"query_reps\[1\] must have shape"):
        mip_similarity(torch.randn(7, 5), [torch.randn(6, 5), torch.randn(6, 4)])
    with pytest.raises(TypeError, match="query_reps must be a non-empty list"):
        mip_similarity(torch.randn(7, 5), [])
    with pytest.raises(ValueError, match="candidates must be a floating"):
        mip_similarity(torch.randn(7), [torch.randn(5)])


@pytest.mark.parametrize("candidates, queries, error, message", [
    ((7, 5), [(6, 5), (4, 5)], ValueError, r"query_reps\[1\] has B = 4 rows but query_reps\[0\] has 6"),
    ((7, 5), [(5,), (6, 5), (3, 5)], ValueError, r"query_reps\[2\] has B = 3 rows but query_reps\[1\] has 6"),
    ((7, 5), [(6, 5), ("float64", 6, 5)], ValueError,
     r"query_reps\[1\] has dtype torch.float64 but candidates have torch.float32"),
    (("float64", 7, 5), [(6, 5)], ValueError, r"query_reps\[0\] has dtype torch.float32 but candidates have "
                                                r"torch.float64"),
    ((0, 5), [(6, 5)], ValueError, r"candidates must have K >= 1 rows and d >= 1 features; got shape \(0, 5\)"),
    ((7, 0), [(6, 0)], ValueError, r"candidates must have K >= 1 rows and d >= 1 features; got shape \(7, 0\)"),
])
def test_mip_similarity_checks_batch_sizes_dtypes_and_sizes(candidates, queries, error, message):
    def make(shape):
        dtype = torch.float64 if shape[0] == "float64" else torch.float32
        return torch.randn(*(shape[1:] if shape[0] == "float64" else shape), dtype=dtype)

    inputs = [make(q) for q in queries]
    before = [q.clone() for q in inputs]
    with pytest.raises(error, match=message):
        mip_similarity(make(candidates), inputs)
    assert all(torch.equal(q, b) for q, b in zip(inputs, before))


def test_module_shape_and_repr():
    module = SymileLoss("n", backend="chunked")
    assert "negative_sampling='n'" in repr(module)
    loss = module(reps3(), torch.tensor(3.0))
    assert loss.dim() == 0


def test_bf16_inputs_give_bf16_loss_and_gradients():
    reps = [r.requires_grad_() for r in reps3(dtype=torch.bfloat16)]
    loss = symile_loss(reps, 14.3)
    loss.backward()
    assert loss.dtype == torch.bfloat16
    assert all(r.grad.dtype == torch.bfloat16 for r in reps)


def test_version():
    assert symile_kernels.__version__
