"""A backend of a user's own: a ``Backend`` subclass that delegates to another backend's object.

The conformance suite registers one (a wrapper of chunked) to show that a registered backend gets
the whole battery by adding one line, and wraps the backend under test to record what the ops pass
it (the ``needs`` flags).
"""
from __future__ import annotations

from symile_kernels.backends import Backend


class Wrapped(Backend):
    """Backend ``inner`` under another ``name``; ``calls`` records (kernel, needs) of each backward."""

    def __init__(self, inner: Backend, name: str):
        self.inner, self.name, self.calls = inner, name, []
        self.description = f"{inner.name}, wrapped"

    def unavailable_reason(self, device):
        return self.inner.unavailable_reason(device)

    def row_dtype(self, dtype):
        return self.inner.row_dtype(dtype)

    def for_dtype(self, dtype):
        routed = self.inner.for_dtype(dtype)
        return self if routed is self.inner else routed

    def fuses_pair_forward(self):
        return self.inner.fuses_pair_forward()

    def cube_lse_forward(self, x, y, z, tau):
        return self.inner.cube_lse_forward(x, y, z, tau)

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs):
        self.calls.append(("cube", tuple(needs)))
        return self.inner.cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs)

    def pair_lse_forward(self, a, b, pos, tau):
        return self.inner.pair_lse_forward(a, b, pos, tau)

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs):
        self.calls.append(("pair", tuple(needs)))
        return self.inner.pair_lse_backward(a, b, pos, tau, L, gL, needs)

    def pair_lse_forward_grads(self, a, b, pos, tau, need_U, need_V):
        self.calls.append(("fused", (need_U, need_V)))
        return self.inner.pair_lse_forward_grads(a, b, pos, tau, need_U, need_V)
