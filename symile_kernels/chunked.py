"""The "chunked" backend: pure PyTorch, any device, never holds the cube.

It tiles the M = 3 cube ``tau * T[i,j,k]`` over blocks of anchor rows i and
partner rows j, each tile a (BLOCK_I, BLOCK_J, K) slab computed as one matrix
product of the (i, j) row products ``x[i] * y[j]`` with z. The forward keeps
running log-sum-exps (float64 vectors); the backward recomputes each tile from the saved LSE
vectors (docs/math.md section 2). Tile sizes come from a memory budget
(``SYMILE_KERNELS_CHUNK_BYTES``, default 128 MiB of tile workspace), not from
the machine. This module is the blueprint the compiled kernels follow.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._math import shift_and_weight
from .backends import Backend

DEFAULT_BUDGET_BYTES = 128 * 2 ** 20
# A tile holds about this many (BLOCK_I * BLOCK_J * K)-sized temporaries at once
# (logits, exponentials, G): the budget is divided by it.
_LIVE_TILES = 4


def budget_bytes() -> int:
    """Tile workspace budget in bytes (environment variable SYMILE_KERNELS_CHUNK_BYTES)."""
    value = os.environ.get("SYMILE_KERNELS_CHUNK_BYTES")
    if value is None:
        return DEFAULT_BUDGET_BYTES
    try:
        budget = int(value)
    except ValueError:
        raise ValueError(f"SYMILE_KERNELS_CHUNK_BYTES must be an integer number of bytes; got {value!r}") from None
    if budget <= 0:
        raise ValueError(f"SYMILE_KERNELS_CHUNK_BYTES must be positive; got {budget}")
    return budget


def tile_shape(I: int, J: int, K: int, d: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J) so that a tile's temporaries fit the budget (at least 1 x 1)."""
    per_pair = element_size * (_LIVE_TILES * K + 2 * d)  # one (i, j) row: K logit-sized values + products
    pairs = max(1, budget_bytes() // per_pair)
    BLOCK_J = min(J, pairs)
    BLOCK_I = min(I, max(1, pairs // BLOCK_J))
    return BLOCK_I, BLOCK_J


def _tiles(x: Tensor, y: Tensor, z: Tensor):
    I, J = x.shape[0], y.shape[0]
    BLOCK_I, BLOCK_J = tile_shape(I, J, z.shape[0], x.shape[1], x.element_size())
    for i0 in range(0, I, BLOCK_I):
        for j0 in range(0, J, BLOCK_J):
            yield slice(i0, min(i0 + BLOCK_I, I)), slice(j0, min(j0 + BLOCK_J, J))


def _tile_T(x: Tensor, y: Tensor, z: Tensor, I: slice, J: slice) -> tuple[Tensor, Tensor]:
    """T[i, j, k] for i in I, j in J, all k: (bi, bj, K), and the row products (bi*bj, d)."""
    xy = (x[I, None, :] * y[None, J, :]).reshape(-1, x.shape[1])
    return (xy @ z.T).view(I.stop - I.start, J.stop - J.start, z.shape[0]), xy


def _lse64(S: Tensor, dim) -> Tensor:
    """float64 log-sum-exp of S over ``dim``: the maximum m and the sum of exp(S - m) in S's
    dtype, joined as ``m + log(sum)`` in float64 (docs/math.md section 6.4: a float32
    ``torch.logsumexp`` rounds log(sum) away at logits near 1e8)."""
    m = S.amax(dim=dim, keepdim=True)
    m = torch.where(m.isinf(), 0, m)  # all -inf (or an overflowed +inf): the sum says so
    total = torch.sub(S, m).exp_().sum(dim=dim)
    return m.squeeze(dim).to(torch.float64) + total.to(torch.float64).log()


def cube_lse_forward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The running log-sum-exps are float64 (N-vectors: cheap): Lc combines one partial per
    # tile, and a float32 running logaddexp over ~10^4 tiles drifts (a 6e-4 bias at N = 4096).
    acc = torch.float64
    La = x.new_full((x.shape[0],), -torch.inf, dtype=acc)
    Lb = y.new_full((y.shape[0],), -torch.inf, dtype=acc)
    Lc = z.new_full((z.shape[0],), -torch.inf, dtype=acc)
    for I, J in _tiles(x, y, z):
        S = tau * _tile_T(x, y, z, I, J)[0]
        La[I] = torch.logaddexp(La[I], _lse64(S, (1, 2)))
        Lb[J] = torch.logaddexp(Lb[J], _lse64(S, (0, 2)))
        Lc = torch.logaddexp(Lc, _lse64(S, (0, 1)))
    return La, Lb, Lc


def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor, *, needs: tuple = (True,) * 4):
    """dx, dy, dz, dtau (docs/math.md section 2); the ones ``needs`` marks False are None
    and their contractions are skipped (W for dx and dy, G^T XY for dz, <G, T> for dtau)."""
    need_dx, need_dy, need_dz, need_dtau = needs
    dx = torch.zeros_like(x) if need_dx else None
    dy = torch.zeros_like(y) if need_dy else None
    dz = torch.zeros_like(z) if need_dz else None
    dtau = torch.zeros_like(tau) if need_dtau else None
    for I, J in _tiles(x, y, z):
        T, xy = _tile_T(x, y, z, I, J)
        S = tau * T
        # G = sum over anchors of g_L * exp(S - L), built in place: one tile-sized temporary.
        G = (S - La[I, None, None]).exp_().mul_(gLa[I, None, None])
        E = (S - Lb[None, J, None]).exp_().mul_(gLb[None, J, None])
        G += E
        torch.sub(S, Lc[None, None, :], out=E).exp_().mul_(gLc[None, None, :])
        G += E
        if need_dx or need_dy:
            W = G @ z  # (bi, bj, d): W[i, j] = sum_k G[i, j, k] z[k]
            if need_dx:
                dx[I] += (W * y[None, J]).sum(dim=1)  # N^2 d work in all: small next to the cube's N^3 d
            if need_dy:
                dy[J] += (W * x[I, None]).sum(dim=0)
        if need_dz:
            dz += G.view(-1, z.shape[0]).T @ xy
        if need_dtau:
            # float64 accumulation: <G, T> sums N^3 terms that largely cancel (docs/math.md section 6.1).
            dtau += torch.dot(G.view(-1).double(), T.view(-1).double()).to(dtau.dtype)
    return tuple(None if g is None else g * s for g, s in ((dx, tau), (dy, tau), (dz, tau), (dtau, 1)))


def _pair_tiles(a: Tensor, b: Tensor):
    I, J = a.shape[0], b.shape[0]
    BLOCK_I = max(1, min(I, budget_bytes() // (a.element_size() * _LIVE_TILES * J)))
    for i0 in range(0, I, BLOCK_I):
        yield slice(i0, min(i0 + BLOCK_I, I))


def _pair_tile_logits(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, I: slice,
                      shift: "Tensor | None" = None) -> tuple[Tensor, Tensor]:
    """Logits ``l[i, j]`` for i in I (bi, J): ``tau <a[i], b[j]>``, ``pos[i]`` on the
    diagonal, minus ``shift[i]`` when given (the backward's L). Also returns the flat
    indices of the diagonal entries in the tile. One tile-sized tensor, written by
    the matrix product itself (the shift is its ``beta`` term).
    """
    bi, J = I.stop - I.start, b.shape[0]
    scaled = tau * a[I]  # (bi, d): cheaper than scaling the tile
    if shift is None:
        S = torch.mm(scaled, b.T)
    else:
        S = torch.addmm(shift[I, None].neg().expand(bi, J), scaled, b.T)
    rows = torch.arange(bi, device=a.device)
    diagonal = rows * J + rows + I.start  # flat index of (i, i) in the (bi, J) tile
    S.view(-1)[diagonal] = pos[I] if shift is None else pos[I] - shift[I]
    return S, diagonal


def pair_lse_forward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
    L = a.new_empty(a.shape[0], dtype=torch.float64)
    for I in _pair_tiles(a, b):
        S, _ = _pair_tile_logits(a, b, pos, tau, I)
        L[I] = _lse64(S, 1)
    return L


def pair_lse_forward_grads(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, need_U: bool,
                           need_V: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """L with the parts of its gradient that do not depend on gL (``Backend.pair_lse_forward_grads``,
    docs/math.md section 5): per i-block, the logit tile, its LSEs, then its row softmax P
    contracted with b (U) and a (V), so no backward recomputes the tile."""
    L = a.new_empty(a.shape[0], dtype=torch.float64)
    U = torch.empty_like(a) if need_U else a.new_empty(0)
    V = torch.zeros_like(b) if need_V else b.new_empty(0)
    Pd = torch.empty_like(pos)
    rowdot = a.new_empty(a.shape[0] if need_U else 0, dtype=torch.float64)
    for I in _pair_tiles(a, b):
        P, diagonal = _pair_tile_logits(a, b, pos, tau, I)
        L[I] = _lse64(P, 1)
        shift, weight = shift_and_weight(L[I], torch.ones_like(L[I]), P.dtype)
        P.sub_(shift[:, None]).exp_().mul_(weight[:, None])
        flat = P.view(-1)
        Pd[I] = flat[diagonal]
        flat[diagonal] = 0  # the diagonal's logit is pos: its gradient is dpos, not da or db
        if need_U:
            torch.mm(P, b, out=U[I])
            rowdot[I] = (a[I] * U[I]).sum(1, dtype=torch.float64)
        if need_V:
            V.addmm_(P.T, a[I])
    return L, U, V, Pd, rowdot


def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor, *,
                      needs: tuple = (True,) * 4):
    """da, db, dpos, dtau (docs/math.md section 3); the ones ``needs`` marks False are None
    and their products are skipped (da is formed for dtau too)."""
    need_da, need_db, need_dpos, need_dtau = needs
    da = torch.empty_like(a) if need_da or need_dtau else None
    db = torch.zeros_like(b) if need_db else None
    dpos = torch.empty_like(pos) if need_dpos else None
    dtau = torch.zeros_like(tau) if need_dtau else None
    for I in _pair_tiles(a, b):
        # E = e^(l - L[i]) in place (the product writes l - L); P = gL[i] E is applied
        # to the (bi, d) operands and results instead of the (bi, J) tile.
        E, diagonal = _pair_tile_logits(a, b, pos, tau, I, shift=L)
        E.exp_()
        flat = E.view(-1)
        if need_dpos:
            dpos[I] = gL[I] * flat[diagonal]
        flat[diagonal] = 0  # the diagonal's logit is pos, not tau <a, b>
        if da is not None:
            torch.mm(E, b, out=da[I])
            da[I] *= gL[I, None]
        if need_db:
            db.addmm_(E.T, gL[I, None] * a[I])
        if need_dtau:
            # sum_{j != i} P[i, j] <a[i], b[j]> = sum_i <a[i], (P b)[i]>: no pass over the tile.
            dtau += (a[I] * da[I]).sum()
    return (tau * da if need_da else None, tau * db if need_db else None, dpos, dtau)


class ChunkedBackend(Backend):
    """The module's functions as a backend: every device and floating dtype (bf16/fp16 rows as float32)."""

    name = "chunked"
    description = "pure PyTorch, any device: tiles over (i, j) blocks, recomputes tiles in backward"

    def cube_lse_forward(self, x, y, z, tau):
        return cube_lse_forward(x, y, z, tau)

    def cube_lse_backward(self, x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs):
        return cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, needs=needs)

    def pair_lse_forward(self, a, b, pos, tau):
        return pair_lse_forward(a, b, pos, tau)

    def pair_lse_backward(self, a, b, pos, tau, L, gL, needs):
        return pair_lse_backward(a, b, pos, tau, L, gL, needs=needs)

    def pair_lse_forward_grads(self, a, b, pos, tau, need_U, need_V):
        return pair_lse_forward_grads(a, b, pos, tau, need_U, need_V)


BACKEND = ChunkedBackend()
