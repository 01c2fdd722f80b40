"""The torch operators every backend runs behind.

``symile_kernels::cube_lse`` and ``symile_kernels::pair_lse`` are
``torch.library`` custom ops with fake implementations and autograd, so
``opcheck`` and ``torch.compile(fullgraph=True)`` see one opaque node per LSE
whatever backend computes it. The ``backend`` argument names a registered
backend (see ``symile_kernels.backends``); the op calls the plain forward and
backward functions of the Backend that runs the inputs' dtype
(``backends.for_dtype``: its ``float64_route`` for float64).

The backward computes only the gradients some input needs
(``ctx.needs_input_grad``, docs/math.md section 2): the ``needs`` flags go to
backends with ``skips_unneeded_grads``, which skip those passes, and an output
not needed comes back from the backward op as an empty (0,) tensor.

Only the log-normalisers are custom (as in Inf-CLIP): the positive logits, the
means and the average over anchors are plain torch in ``symile_kernels.loss``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends


def _backward(name: str, kind: str, inputs: Sequence[Tensor], rest: Sequence[Tensor],
              needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """Runs ``kind`` ("cube_lse_backward" or "pair_lse_backward") of the backend for the inputs'
    dtype; outputs whose ``needs`` flag is False come back as empty (0,) tensors."""
    backend = backends.for_dtype(name, inputs[0].dtype)
    fn = getattr(backend, kind)
    needs = tuple(bool(n) for n in needs)
    if backend.skips_unneeded_grads:
        grads = fn(*inputs, *rest, needs=needs)
    else:
        grads = fn(*inputs, *rest)
    return tuple(g if need and g is not None else t.new_empty(0) for g, t, need in zip(grads, inputs, needs))


def _fake_grads(inputs: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(inputs, needs))


@torch.library.custom_op("symile_kernels::cube_lse", mutates_args=())
def cube_lse(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """La (I,), Lb (J,), Lc (K,) of the cube ``tau * sum_d x[i,d] y[j,d] z[k,d]`` (docs/math.md section 2).

    x: (I, d), y: (J, d), z: (K, d), float32 or float64 (bf16/fp16 for backends that
    accept low precision), contiguous, one device.
    tau: 0-dim tensor of the compute dtype (float32 or float64), same device; the
    LSE vectors come back in that dtype.
    """
    return tuple(backends.for_dtype(backend, x.dtype).cube_lse_forward(x, y, z, tau))


@cube_lse.register_fake
def _(x, y, z, tau, backend):
    return tuple(t.new_empty(t.shape[0], dtype=tau.dtype) for t in (x, y, z))


@torch.library.custom_op("symile_kernels::cube_lse_backward", mutates_args=())
def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor, backend: str,
                      needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dy, dz (shaped like x, y, z) and dtau (0-dim) of ``sum gLa*La + gLb*Lb + gLc*Lc``.

    needs: four flags for dx, dy, dz, dtau; an output whose flag is False is an empty (0,) tensor.
    """
    return _backward(backend, "cube_lse_backward", (x, y, z, tau), (La, Lb, Lc, gLa, gLb, gLc), needs)


@cube_lse_backward.register_fake
def _(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, backend, needs):
    return _fake_grads((x, y, z, tau), needs)


def _cube_setup(ctx, inputs, output):
    x, y, z, tau, backend = inputs
    ctx.save_for_backward(x, y, z, tau, *output)
    ctx.backend = backend


def _cube_backward(ctx, gLa, gLb, gLc):
    x, y, z, tau, La, Lb, Lc = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if not any(needs):
        return None, None, None, None, None
    gLa, gLb, gLc = (torch.zeros_like(L) if g is None else g.contiguous()
                     for g, L in ((gLa, La), (gLb, Lb), (gLc, Lc)))
    grads = cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


cube_lse.register_autograd(_cube_backward, setup_context=_cube_setup)


@torch.library.custom_op("symile_kernels::pair_lse", mutates_args=())
def pair_lse(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, backend: str) -> Tensor:
    """L (I,): ``L[i] = LSE_j l[i,j]``, ``l[i,j] = tau <a[i], b[j]>`` for j != i, ``l[i,i] = pos[i]``.

    a: (I, d), b: (J, d) with I <= J, float32 or float64 (bf16/fp16 for backends that
    accept low precision), contiguous, one device.
    pos: (I,) and tau (0-dim), of the compute dtype (float32 or float64); L comes back in it.
    """
    return backends.for_dtype(backend, a.dtype).pair_lse_forward(a, b, pos, tau)


@pair_lse.register_fake
def _(a, b, pos, tau, backend):
    return pos.new_empty(a.shape[0])


@torch.library.custom_op("symile_kernels::pair_lse_backward", mutates_args=())
def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor,
                      backend: str, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """da (I, d), db (J, d), dpos (I,) and dtau (0-dim) of ``sum_i gL[i] L[i]``.

    needs: four flags for da, db, dpos, dtau; an output whose flag is False is an empty (0,) tensor.
    """
    return _backward(backend, "pair_lse_backward", (a, b, pos, tau), (L, gL), needs)


@pair_lse_backward.register_fake
def _(a, b, pos, tau, L, gL, backend, needs):
    return _fake_grads((a, b, pos, tau), needs)


def _pair_setup(ctx, inputs, output):
    a, b, pos, tau, backend = inputs
    ctx.save_for_backward(a, b, pos, tau, output)
    ctx.backend = backend


def _pair_backward(ctx, gL):
    a, b, pos, tau, L = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if not any(needs):
        return None, None, None, None, None
    grads = pair_lse_backward(a, b, pos, tau, L, gL.contiguous(), ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


pair_lse.register_autograd(_pair_backward, setup_context=_pair_setup)
