"""The torch operators every backend runs behind, and the autograd the losses use.

``symile_kernels::cube_lse`` and ``symile_kernels::pair_lse`` are
``torch.library`` custom ops with fake implementations and autograd, so
``opcheck`` and ``torch.compile(fullgraph=True)`` see one opaque node per LSE
whatever backend computes it. The ``backend`` argument names a registered
backend (``symile_kernels.backends``); each op call looks it up once
(``backends.kernels``: the backend whose kernels run the rows' dtype) and calls
that object's kernels.

The backward computes only the gradients some input needs
(``ctx.needs_input_grad``, docs/math.md section 2): the ``needs`` flags go to the
backend, which may skip those passes, and an output not needed comes back from
the backward op as an empty (0,) tensor.

The forward ops return their LSE vectors in float64 whatever the compute dtype,
and the autograd formulas hand the backward ops each L as a shift in the compute
dtype plus a reweighted gL (``shift_and_weight``, docs/math.md section 6.4):
in float32 at logits near 1e8, ``L = m + log(s)`` would round ``log(s)`` away.

The losses call ``run_cube_lse`` and ``run_pair_lse``: ``torch.autograd.Function``s
over the ops with the ops' own setup and backward, which torch.func's transforms
(``grad``, ``vjp``) accept; they reject the generated Function behind an op's
registered autograd. For a caller that will need gradients, ``run_pair_lse`` runs
``symile_kernels::pair_lse_fused`` where the backend fuses the pair forward with its
gradient's parts: the backward op ``pair_lse_fused_backward`` then only scales them
(docs/math.md section 5). A second derivative raises, pointing to ``backend="reference"``.

Only the log-normalisers are custom (as in Inf-CLIP): the positive logits, the
means and the average over anchors are plain torch in ``symile_kernels.loss``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends
from ._math import shift_and_weight
from ._validation import check_tau_value


def _check_operands(op: str, rows: Sequence[tuple[str, Tensor]], tau: Tensor,
                    vectors: Sequence[tuple[str, Tensor, int]] = ()) -> None:
    """The structural checks every backend relies on, made once here so that every backend
    (and the fake implementations, hence torch.compile's trace) gets them.

    rows: (name, tensor) pairs that must be 2-D (n >= 1, d >= 1, one d), one floating dtype, one device.
    tau: 0-dim tensor of the compute dtype of the rows (float64 for float64, float32 otherwise).
    vectors: (name, tensor, length) of 1-D tensors in tau's dtype (pos, La, gL, ...).
    """
    first_name, first = rows[0]
    for name, t in rows:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{op}: {name} must be 2-D (n, d) with n >= 1 and d >= 1; got shape {tuple(t.shape)}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{op}: {name} has d = {t.shape[1]} but {first_name} has d = {first.shape[1]}")
        if t.dtype != first.dtype or not t.is_floating_point():
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; every row tensor needs one floating dtype "
                            f"({first_name} has {first.dtype})")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    if not isinstance(tau, Tensor) or tau.dim() != 0 or tau.dtype != compute or tau.device != first.device:
        got = (f"{type(tau).__name__}" if not isinstance(tau, Tensor)
               else f"shape {tuple(tau.shape)}, {tau.dtype} on {tau.device}")
        raise TypeError(f"{op}: tau must be a 0-dim {compute} tensor on {first.device} "
                        f"(the compute dtype of {first.dtype} rows); got {got}")
    for name, v, length in vectors:
        if v.shape != (length,) or v.dtype != compute or v.device != first.device:
            raise ValueError(f"{op}: {name} must have shape ({length},), dtype {compute} on {first.device}; "
                             f"got shape {tuple(v.shape)}, {v.dtype} on {v.device}")


def _check_cube(op, x, y, z, tau, vectors=()):
    _check_operands(op, (("x", x), ("y", y), ("z", z)), tau, vectors)


def _check_pair(op, a, b, pos, tau, vectors=()):
    _check_operands(op, (("a", a), ("b", b)), tau, (("pos", pos, a.shape[0]), *vectors))
    if a.shape[0] > b.shape[0]:
        raise ValueError(f"pair_lse: a has {a.shape[0]} rows but b only {b.shape[0]}; "
                         "row i's positive is column i of b, so a needs I <= J rows")


def _backward(kernel, inputs: Sequence[Tensor], rest: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """``kernel(*inputs, *rest, needs)`` (a backend's backward); outputs whose ``needs`` flag is False
    come back as empty (0,) tensors, whatever the backend returned for them."""
    needs = tuple(bool(n) for n in needs)
    grads = kernel(*inputs, *rest, needs)
    return tuple(g if need and g is not None else t.new_empty(0) for g, t, need in zip(grads, inputs, needs))


def _fake_grads(inputs: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(inputs, needs))


@torch.library.custom_op("symile_kernels::cube_lse", mutates_args=())
def cube_lse(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """La (I,), Lb (J,), Lc (K,) of the cube ``tau * sum_d x[i,d] y[j,d] z[k,d]`` (docs/math.md section 2).

    x: (I, d), y: (J, d), z: (K, d), float32 or float64 (bf16/fp16 for backends that
    accept low precision), contiguous, one device.
    tau: 0-dim tensor of the compute dtype (float32 or float64), same device.
    The LSE vectors come back in float64 (docs/math.md section 6.4).
    """
    _check_cube("cube_lse", x, y, z, tau)
    check_tau_value(tau)
    return tuple(L.to(torch.float64) for L in backends.kernels(backend, x.dtype).cube_lse_forward(x, y, z, tau))


@cube_lse.register_fake
def _(x, y, z, tau, backend):
    _check_cube("cube_lse", x, y, z, tau)
    return tuple(t.new_empty(t.shape[0], dtype=torch.float64) for t in (x, y, z))


@torch.library.custom_op("symile_kernels::cube_lse_backward", mutates_args=())
def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor, backend: str,
                      needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dy, dz (shaped like x, y, z) and dtau (0-dim) of ``sum gLa*La + gLb*Lb + gLc*Lc``.

    La, Lb, Lc and gLa, gLb, gLc are in the compute dtype: the autograd formula passes
    each L's shift and reweighted gradient (``shift_and_weight``), which the backends
    use only as ``gL * exp(S - L)``, exactly as they would the LSEs themselves.
    needs: four flags for dx, dy, dz, dtau; an output whose flag is False is an empty (0,) tensor.
    """
    _check_cube("cube_lse_backward", x, y, z, tau, _cube_vectors(x, y, z, La, Lb, Lc, gLa, gLb, gLc))
    return _backward(backends.kernels(backend, x.dtype).cube_lse_backward, (x, y, z, tau),
                     (La, Lb, Lc, gLa, gLb, gLc), needs)


def _cube_vectors(x, y, z, La, Lb, Lc, gLa, gLb, gLc):
    return (("La", La, x.shape[0]), ("Lb", Lb, y.shape[0]), ("Lc", Lc, z.shape[0]),
            ("gLa", gLa, x.shape[0]), ("gLb", gLb, y.shape[0]), ("gLc", gLc, z.shape[0]))


@cube_lse_backward.register_fake
def _(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, backend, needs):
    _check_cube("cube_lse_backward", x, y, z, tau, _cube_vectors(x, y, z, La, Lb, Lc, gLa, gLb, gLc))
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
    (La, gLa), (Lb, gLb), (Lc, gLc) = (shift_and_weight(L, g, tau.dtype)
                                       for L, g in ((La, gLa), (Lb, gLb), (Lc, gLc)))
    grads = _first_order(cube_lse_backward, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


cube_lse.register_autograd(_cube_backward, setup_context=_cube_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "symile_kernels: the fused losses have no second derivative (a backward of the backward, e.g. "
        "autograd.grad(..., create_graph=True) followed by another backward). For higher-order gradients "
        "use backend='reference' (the materialised float64-capable oracle, O(N^M) memory) or compute the "
        "loss with plain torch ops.")


def _no_setup(ctx, inputs, output):
    pass


cube_lse_backward.register_autograd(_no_double_backward, setup_context=_no_setup)


@torch.library.custom_op("symile_kernels::pair_lse", mutates_args=())
def pair_lse(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, backend: str) -> Tensor:
    """L (I,): ``L[i] = LSE_j l[i,j]``, ``l[i,j] = tau <a[i], b[j]>`` for j != i, ``l[i,i] = pos[i]``.

    a: (I, d), b: (J, d) with I <= J, float32 or float64 (bf16/fp16 for backends that
    accept low precision), contiguous, one device.
    pos: (I,) and tau (0-dim), of the compute dtype (float32 or float64).
    L comes back in float64 (docs/math.md section 6.4).
    """
    _check_pair("pair_lse", a, b, pos, tau)
    check_tau_value(tau)
    return backends.kernels(backend, a.dtype).pair_lse_forward(a, b, pos, tau).to(torch.float64)


@pair_lse.register_fake
def _(a, b, pos, tau, backend):
    _check_pair("pair_lse", a, b, pos, tau)
    return pos.new_empty(a.shape[0], dtype=torch.float64)


@torch.library.custom_op("symile_kernels::pair_lse_backward", mutates_args=())
def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor,
                      backend: str, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """da (I, d), db (J, d), dpos (I,) and dtau (0-dim) of ``sum_i gL[i] L[i]``; L and gL
    in the compute dtype, as the shift and weight of ``shift_and_weight`` (see cube_lse_backward).

    needs: four flags for da, db, dpos, dtau; an output whose flag is False is an empty (0,) tensor.
    """
    _check_pair("pair_lse_backward", a, b, pos, tau, (("L", L, a.shape[0]), ("gL", gL, a.shape[0])))
    return _backward(backends.kernels(backend, a.dtype).pair_lse_backward, (a, b, pos, tau), (L, gL), needs)


@pair_lse_backward.register_fake
def _(a, b, pos, tau, L, gL, backend, needs):
    _check_pair("pair_lse_backward", a, b, pos, tau, (("L", L, a.shape[0]), ("gL", gL, a.shape[0])))
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
    L, gL = shift_and_weight(L, gL, tau.dtype)
    grads = _first_order(pair_lse_backward, a, b, pos, tau, L, gL, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


pair_lse.register_autograd(_pair_backward, setup_context=_pair_setup)
pair_lse_backward.register_autograd(_no_double_backward, setup_context=_no_setup)


# The pair LSE fused with its gradient's parts (a backend's ``pair_lse_forward_grads``): for a
# caller that will need gradients, the forward also contracts the row softmax P with b and a,
# so no backward pass recomputes the logits (6 N^2 d executed instead of 8; docs/math.md section 5).

def _fused_needs(needs: Sequence[bool]) -> tuple[bool, bool]:
    """(need_U, need_V) from the four flags of (a, b, pos, tau): U serves da and dtau, V db."""
    return bool(needs[0] or needs[3]), bool(needs[1])


@torch.library.custom_op("symile_kernels::pair_lse_fused", mutates_args=())
def pair_lse_fused(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, backend: str,
                   needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``pair_lse``'s L (I,) float64, with U (I, d), V (J, d), Pd (I,) and rowdot (I,) float64 of
    ``Backend.pair_lse_forward_grads``, for the gradients of (a, b, pos, tau) flagged in ``needs``
    (U and rowdot are (0,) when neither a nor tau needs one, V when b does not)."""
    _check_pair("pair_lse_fused", a, b, pos, tau)
    check_tau_value(tau)
    L, U, V, Pd, rowdot = backends.kernels(backend, a.dtype).pair_lse_forward_grads(a, b, pos, tau,
                                                                                     *_fused_needs(needs))
    return L.to(torch.float64), U, V, Pd, rowdot


@pair_lse_fused.register_fake
def _(a, b, pos, tau, backend, needs):
    _check_pair("pair_lse_fused", a, b, pos, tau)
    return _forward_grads_like(a, b, pos, *_fused_needs(needs))


@torch.library.custom_op("symile_kernels::pair_lse_fused_backward", mutates_args=())
def pair_lse_fused_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, U: Tensor, V: Tensor,
                            Pd: Tensor, rowdot: Tensor, gL: Tensor, backend: str,
                            needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """da, db, dpos, dtau of ``sum_i gL[i] L[i]`` from ``pair_lse_fused``'s outputs; gL (I,) float64.

    da = tau gL U, dpos = gL Pd and dtau = sum gL rowdot hold for any gL; db = tau c V needs
    gL = c everywhere (a mean loss). What the forward's parts cannot give (db for other gL, or a
    gradient whose part the forward was not asked for) comes from the backend's recomputing
    ``pair_lse_backward``. An output whose ``needs`` flag is False is an empty (0,) tensor.
    """
    _check_pair("pair_lse_fused_backward", a, b, pos, tau, (("Pd", Pd, a.shape[0]),))
    if gL.shape != L.shape:
        raise ValueError(f"pair_lse_fused_backward: gL must have L's shape {tuple(L.shape)}; got {tuple(gL.shape)}")
    have_U, have_V = U.shape == a.shape, V.shape == b.shape
    g = gL.to(tau.dtype)
    uniform = bool(needs[1]) and have_V and bool((gL == gL[0]).all())
    recompute = (bool(needs[0]) and not have_U, bool(needs[1]) and not uniform, False,
                 bool(needs[3]) and not have_U)
    if any(recompute):
        shift, weight = shift_and_weight(L, gL, tau.dtype)
        redone = _backward(backends.kernels(backend, a.dtype).pair_lse_backward, (a, b, pos, tau),
                           (shift, weight), recompute)
    da, db, dpos, dtau = (t.new_empty(0) for t in (a, b, pos, tau))
    if needs[0]:
        da = redone[0] if recompute[0] else ((tau * g)[:, None] * U).to(a.dtype)
    if needs[1]:
        db = redone[1] if recompute[1] else ((tau * g[0]) * V).to(b.dtype)
    if needs[2]:
        dpos = g * Pd
    if needs[3]:
        dtau = redone[3] if recompute[3] else (gL.to(torch.float64) * rowdot).sum().to(tau.dtype)
    return da, db, dpos, dtau


@pair_lse_fused_backward.register_fake
def _(a, b, pos, tau, L, U, V, Pd, rowdot, gL, backend, needs):
    return _fake_grads((a, b, pos, tau), needs)


def _fused_setup(ctx, inputs, output):
    a, b, pos, tau, backend, _ = inputs
    ctx.save_for_backward(a, b, pos, tau, *output)
    ctx.backend = backend


def _fused_backward(ctx, gL, *_):
    a, b, pos, tau, L, U, V, Pd, rowdot = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if not any(needs) or gL is None:
        return None, None, None, None, None, None
    grads = _first_order(pair_lse_fused_backward, a, b, pos, tau, L, U, V, Pd, rowdot, gL, ctx.backend, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


pair_lse_fused.register_autograd(_fused_backward, setup_context=_fused_setup)
pair_lse_fused_backward.register_autograd(_no_double_backward, setup_context=_no_setup)


def _forward_grads_like(a: Tensor, b: Tensor, pos: Tensor, need_U: bool, need_V: bool) -> tuple[Tensor, ...]:
    """Empty outputs of ``pair_lse_forward_grads`` with their shapes and dtypes (the fake)."""
    f64 = dict(dtype=torch.float64, device=a.device)
    return (a.new_empty(a.shape[0], **f64), torch.empty_like(a) if need_U else a.new_empty(0),
            torch.empty_like(b) if need_V else b.new_empty(0), torch.empty_like(pos),
            a.new_empty(a.shape[0] if need_U else 0, **f64))


# ---------------------------------------------------------------- what the losses call

# The losses' autograd: Functions over the ops with the ops' own setup and backward. Each forward
# turns autograd off around its op (this Function is the autograd; under torch.func's transforms the
# op's registered one would run too) and calls the op's OpOverload, which torch.compile traces.

class _CubeLSE(torch.autograd.Function):
    @staticmethod
    def forward(x, y, z, tau, backend):
        with torch.no_grad():
            return torch.ops.symile_kernels.cube_lse.default(x, y, z, tau, backend)

    setup_context = staticmethod(_cube_setup)
    backward = staticmethod(_cube_backward)


class _PairLSE(torch.autograd.Function):
    @staticmethod
    def forward(a, b, pos, tau, backend):
        with torch.no_grad():
            return torch.ops.symile_kernels.pair_lse.default(a, b, pos, tau, backend)

    setup_context = staticmethod(_pair_setup)
    backward = staticmethod(_pair_backward)


class _PairLSEFused(torch.autograd.Function):
    @staticmethod
    def forward(a, b, pos, tau, backend, needs):
        with torch.no_grad():
            return torch.ops.symile_kernels.pair_lse_fused.default(a, b, pos, tau, backend, needs)

    setup_context = staticmethod(_fused_setup)
    backward = staticmethod(_fused_backward)


def _first_order_function(op) -> type:
    """Backward op ``op`` as a Function whose own backward raises (no second derivative)."""
    def forward(*args):
        with torch.no_grad():
            return op(*args)

    return type(f"_{op._name}", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(_no_setup),
        backward=staticmethod(_no_double_backward)))


_FIRST_ORDER = {op: _first_order_function(op) for op in (cube_lse_backward, pair_lse_backward, pair_lse_fused_backward)}


def _first_order(op, *args):
    """Backward op ``op`` on ``args``. Under torch.func's transforms the backward runs with autograd
    on, where an op's registered (generated) Function is refused: there it runs as a Function of
    ours. Elsewhere (autograd, torch.compile's traced backward) the op runs as it is; with
    ``create_graph=True`` its registered autograd raises the no-second-derivative error."""
    if torch._C._are_functorch_transforms_active():
        return _FIRST_ORDER[op].apply(*args)
    return op(*args)


def run_cube_lse(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``cube_lse(x, y, z, tau, backend)``'s La, Lb, Lc, differentiable (torch.func included)."""
    return _CubeLSE.apply(x, y, z, tau, backend)


def run_pair_lse(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, backend: str, fused: bool) -> Tensor:
    """``pair_lse(a, b, pos, tau, backend)``'s L, differentiable; through ``pair_lse_fused`` when
    ``fused`` (the backend fuses the pair forward, ``backends.resolve_for_loss``) and autograd
    will need a gradient of the inputs."""
    needs = [t.requires_grad for t in (a, b, pos, tau)]
    if fused and torch.is_grad_enabled() and any(needs):
        return _PairLSEFused.apply(a, b, pos, tau, backend, needs)[0]
    return _PairLSE.apply(a, b, pos, tau, backend)
