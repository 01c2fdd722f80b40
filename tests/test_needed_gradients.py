"""The backward computes only the gradients some input needs (docs/math.md section 2)."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from symile_kernels import backends, chunked, symile_loss

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
    # dz = G^T XY (mm) and dtau = <G, T> (dot). (test_needs_reach_the_backend checks the flags the ops pass.)
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


@pytest.fixture
def recording():
    """Registers "recording": chunked, recording the ``needs`` flags each backward receives."""
    seen = []

    def cube_backward(*args, needs):
        seen.append(("cube", tuple(needs)))
        return chunked.cube_lse_backward(*args, needs=needs)

    def pair_backward(*args, needs):
        seen.append(("pair", tuple(needs)))
        return chunked.pair_lse_backward(*args, needs=needs)

    def pair_forward_grads(a, b, pos, tau, need_U, need_V):
        seen.append(("fused", (need_U, need_V)))
        return chunked.pair_lse_forward_grads(a, b, pos, tau, need_U, need_V)

    backends.register(dataclasses.replace(chunked.BACKEND, name="recording", cube_lse_backward=cube_backward,
                                          pair_lse_backward=pair_backward, pair_lse_forward_grads=pair_forward_grads))
    backends.register(dataclasses.replace(chunked.BACKEND, name="recording_unfused", cube_lse_backward=cube_backward,
                                          pair_lse_backward=pair_backward, pair_lse_forward_grads=None))
    yield seen
    backends.unregister("recording")
    backends.unregister("recording_unfused")


@pytest.mark.parametrize("M,frozen,expected", [
    (3, {2}, ("cube", (True, True, False, False))),
    (3, {0}, ("cube", (False, True, True, False))),
    # M = 4 folds modality 4 into x's rows: with x frozen the folded rows still need a gradient.
    (4, {0}, ("cube", (True, True, True, False))),
    (4, {0, 3}, ("cube", (False, True, True, False))),
])
def test_needs_reach_the_backend(recording, M, frozen, expected):
    reps = [r.requires_grad_(m not in frozen) for m, r in enumerate(make_inputs("unit", M, 4, 3))]
    symile_loss(reps, 14.3, backend="recording").backward()
    assert recording and all(call == expected for call in recording), recording


@pytest.mark.parametrize("fused", [False, True])
def test_pair_needs(recording, fused):
    a, b = make_inputs("unit", 2, 5, 3)
    a.requires_grad_()
    tau = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    symile_loss([a, b], tau, backend="recording" if fused else "recording_unfused").backward()
    if fused:  # the forward computes U (for da and dtau) and V (for db) only where they are needed
        # pair_lse(a, b, pos): U for a and tau, no V (b is frozen); pair_lse(b, a, pos): U for tau, V for a.
        assert sorted(recording) == [("fused", (True, False)), ("fused", (True, True))]
        return
    # pair_lse(b, a, pos): b's rows need none, a's and pos (a function of a and tau) and tau do;
    # pair_lse(a, b, pos): the other way round.
    assert sorted(recording) == [("pair", (False, True, True, True)), ("pair", (True, False, True, True))]


def test_backends_without_the_flag_get_no_needs_argument():
    def cube_backward(*args):
        return chunked.cube_lse_backward(*args)

    backends.register(dataclasses.replace(chunked.BACKEND, name="plain", skips_unneeded_grads=False,
                                          cube_lse_backward=cube_backward))
    try:
        reps = [r.requires_grad_(m != 1) for m, r in enumerate(make_inputs("unit", 3, 5, 3))]
        symile_loss(reps, 2.0, backend="plain").backward()
        assert reps[1].grad is None and reps[0].grad is not None and reps[2].grad is not None
    finally:
        backends.unregister("plain")
