"""The pure-PyTorch ``chunked`` backend against the float64 oracle."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from symile_kernels import ops, symile_loss
from symile_kernels.chunked import tile_shape

from harness import check_against_oracle, make_inputs

# Its loss and gradients against the oracle, opcheck, compile and the edges: tests/test_conformance.py.


@pytest.mark.parametrize("budget", (1, 5000, 40000))
def test_many_tiles(monkeypatch, budget):
    # A tiny workspace budget forces tiles smaller than the cube in both i and j.
    monkeypatch.setenv("SYMILE_KERNELS_CHUNK_BYTES", str(budget))
    block_i, block_j = tile_shape(33, 33, 33, 5, 8)
    assert block_i * block_j < 33 * 33
    check_against_oracle("chunked", make_inputs("unit", 3, 33, 5), 100.0)
    check_against_oracle("chunked", make_inputs("unit", 4, 7, 5), 14.3)
    check_against_oracle("chunked", make_inputs("gaussian", 3, 33, 5), 1.0, negative_sampling="n")


def test_bad_budget(monkeypatch):
    monkeypatch.setenv("SYMILE_KERNELS_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="SYMILE_KERNELS_CHUNK_BYTES"):
        symile_loss(make_inputs("unit", 3, 4, 2), 1.0, backend="chunked")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("negative_sampling", ("n_squared", "n"))
def test_never_holds_the_cube(monkeypatch, negative_sampling):
    N, d = 64, 8
    monkeypatch.setenv("SYMILE_KERNELS_CHUNK_BYTES", str(4 * 8 * N * N))  # room for about N^2 values per tile
    reps = [r.requires_grad_() for r in make_inputs("unit", 3, N, d)]
    with LargestTensor() as mode:
        symile_loss(reps, 14.3, negative_sampling=negative_sampling, backend="chunked").backward()
    assert mode.largest <= 2 * N * N, f"a tensor of {mode.largest} elements (the cube has {N ** 3})"


def test_gradcheck_ops():
    x, y, z = (torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (4, 3, 5))  # rectangular cube
    tau = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.cube_lse(*a, "chunked"), (x, y, z, tau))
    a, b = (torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.pair_lse(*t, "chunked"), (a, b, pos, tau))


@pytest.mark.parametrize("negative_sampling", ("n_squared", "n"))
@pytest.mark.parametrize("M", (2, 3, 4))
def test_gradcheck_loss(M, negative_sampling):
    reps = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(M)]
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def loss(*args):
        torch.manual_seed(0)
        return symile_loss(list(args[:-1]), args[-1], negative_sampling=negative_sampling, backend="chunked")

    assert torch.autograd.gradcheck(loss, (*reps, tau))


def test_non_contiguous_inputs():
    reps = make_inputs("unit", 3, 33, 48)
    strided = [torch.randn(96, 33, dtype=torch.float64).T[:, ::2] for _ in reps]  # (33, 48), non-contiguous
    for s, r in zip(strided, reps):
        s.copy_(r)
    assert not strided[0].is_contiguous()
    check_against_oracle("chunked", strided, 14.3)


def test_logit_scale_float_and_tensor_agree():
    reps = make_inputs("unit", 3, 9, 5)
    as_float = symile_loss(reps, 14.3, backend="chunked")
    as_tensor = symile_loss(reps, torch.tensor(14.3, dtype=torch.float64), backend="chunked")
    assert float(as_float) == float(as_tensor)


def test_mixed_dtypes_promote():
    reps = make_inputs("unit", 3, 7, 5)
    mixed = [reps[0].float().requires_grad_(), reps[1].bfloat16().requires_grad_(), reps[2].float().requires_grad_()]
    loss = symile_loss(mixed, 14.3, backend="chunked")
    loss.backward()
    assert loss.dtype == torch.float32
    assert [r.grad.dtype for r in mixed] == [torch.float32, torch.bfloat16, torch.float32]
