"""The backward computes only the gradients some input needs (docs/math.md section 2)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from symile_kernels import chunked, symile_loss

from harness import make_inputs

_CONTRACTIONS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.dot.default}


class CountContractions(TorchDispatchMode):
    """Counts matrix products and dot products by op."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _CONTRACTIONS:
            name = func._schema.name.split("::")[-1]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_counts(needs):
    x, y, z = (r.float() for r in make_inputs("unit", 3, 9, 5))
    tau = torch.tensor(14.3)
    L = [l.float() for l in chunked.cube_lse_forward(x, y, z, tau)]
    g = [torch.rand(9) for _ in range(3)]
    with CountContractions() as mode:
        grads = chunked.cube_lse_backward(x, y, z, tau, *L, *g, needs=needs)
    assert [t is not None for t in grads] == list(needs)
    return mode.counts


def test_chunked_skips_the_dz_and_dtau_passes():
    # One tile at this size: the backward recomputes T (mm), contracts W = G z (mm, giving dx and dy),
    # dz = G^T XY (mm) and dtau = <G, T> (dot). (tests/test_conformance.py checks the flags the ops pass to every backend.)
    assert _backward_counts((True, True, True, True)) == {"mm": 3, "dot": 1}
    assert _backward_counts((True, True, False, True)) == {"mm": 2, "dot": 1}  # z frozen
    assert _backward_counts((True, True, True, False)) == {"mm": 3}  # tau a float
    assert _backward_counts((False, False, True, False)) == {"mm": 2}  # x, y frozen: T and dz only
    assert _backward_counts((False, True, False, False)) == {"mm": 2}  # W serves dy alone


def test_frozen_gradients_still_match_all_gradients():
    reps = make_inputs("unit", 3, 9, 5)
    full = [r.clone().requires_grad_() for r in reps]
    tau = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(symile_loss(full, tau, backend="chunked"), full + [tau])
    partial = [reps[0].clone().requires_grad_(), reps[1].clone(), reps[2].clone().requires_grad_()]
    got = torch.autograd.grad(symile_loss(partial, 14.3, backend="chunked"), [partial[0], partial[2]])
    assert torch.allclose(got[0], expected[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(got[1], expected[2], rtol=1e-12, atol=1e-14)
