"""Triton kernels for the pair LSE ("n" sampling and M = 2, SPEC section 3).

``L[i] = LSE_j l[i, j]`` over the J rows of b, with ``l[i, j] = tau <a[i], b[j]>``
off the diagonal and ``l[i, i] = pos[i]`` (a: (I, d), b: (J, d), I <= J; I < J
for a process's local rows against a gathered batch), computed as a tiled row
LSE (online maximum over blocks of columns, as in tiled CLIP losses): the I x J
logits are never held. The backward recomputes tiles from L: a row pass owns
rows of a (da, dpos), a column pass owns rows of b (db); dtau =
sum_i <a[i], da[i]> / tau is plain torch. I * J exponentials per pass are small
next to the cube's N^3; no sharing is needed here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch as _cfg

# Kernels may only read constexpr globals (Triton >= 3.2 rejects plain Python globals).
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _pair_logits(A, B, POS, tau, rows, r_valid, cols, c_valid, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):
    """(l, T, diagonal): the logits (BLOCK_M, BLOCK_N) float32 (-inf where masked), tau-free products, i == j."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        a = tl.load(A + rows[:, None] * D + offs_d[None, :],
                    mask=r_valid[:, None] & d_valid[None, :], other=0.0)
        bt = tl.load(B + cols[None, :].to(tl.int64) * D + offs_d[:, None],
                     mask=c_valid[None, :] & d_valid[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    pos = tl.load(POS + rows, mask=r_valid, other=0.0).to(tl.float32)
    diagonal = rows[:, None] == cols[None, :]
    logits = tl.where(diagonal, pos[:, None], tau * acc)
    return tl.where(r_valid[:, None] & c_valid[None, :], logits, NEG_INF), acc, diagonal


@triton.jit
def _pair_fwd_kernel(A, B, POS, TAU, L, I, J, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """L[i] for the program's BLOCK_M rows, online over blocks of BLOCK_N columns."""
    tau = tl.load(TAU).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_valid = rows < I
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, J, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        l, _, _ = _pair_logits(A, B, POS, tau, rows, r_valid, cols, cols < J, D,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, DOT_DTYPE)
        new = tl.maximum(m, tl.where(r_valid, tl.max(l, axis=1), 0.0))
        s = s * tl.exp(m - new) + tl.sum(tl.exp(l - new[:, None]), axis=1)
        m = new
    tl.store(L + rows, m + tl.log(s), mask=r_valid)


@triton.jit
def _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """(P off the diagonal, P on the diagonal) with P = gL[i] exp(l[i, j] - L[i]), 0 where masked."""
    l, _, diagonal = _pair_logits(A, B, POS, tau, rows, r_valid, cols, c_valid, D,
                                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, DOT_DTYPE)
    Lr = tl.load(L + rows, mask=r_valid, other=0.0)
    g = tl.load(GL + rows, mask=r_valid, other=0.0).to(tl.float32)
    P = g[:, None] * tl.exp(l - Lr[:, None])
    return tl.where(diagonal, 0.0, P), tl.where(diagonal, P, 0.0)


@triton.jit
def _pair_bwd_rows_kernel(A, B, POS, TAU, L, GL, UA, DPOS, I, J, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """UA[i, chunk] = sum_{j != i} P[i, j] b[j, chunk]; DPOS[i] = P[i, i] (written by chunk 0)."""
    tau = tl.load(TAU).to(tl.float32)
    pid_d = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_valid = rows < I
    d_out = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d_out < D
    u = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dpos = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, J, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        c_valid = cols < J
        P, P_diag = _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, DOT_DTYPE)
        dpos += tl.sum(P_diag, axis=1)
        b = tl.load(B + cols[:, None].to(tl.int64) * D + d_out[None, :],
                    mask=c_valid[:, None] & d_valid[None, :], other=0.0)
        u = tl.dot(P.to(DOT_DTYPE), b.to(DOT_DTYPE), u, input_precision=PRECISION)
    tl.store(UA + rows[:, None] * D + d_out[None, :], u, mask=r_valid[:, None] & d_valid[None, :])
    tl.store(DPOS + rows, dpos, mask=r_valid & ((rows * 0 + pid_d) == 0))


@triton.jit
def _pair_bwd_cols_kernel(A, B, POS, TAU, L, GL, UB, I, J, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """UB[j, chunk] = sum_{i != j} P[i, j] a[i, chunk] for the program's BLOCK_N columns j."""
    tau = tl.load(TAU).to(tl.float32)
    pid_d = tl.program_id(1)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_valid = cols < J
    d_out = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d_out < D
    u = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i0 in range(0, I, BLOCK_M):
        rows = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_valid = rows < I
        P, _ = _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D,
                       BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, DOT_DTYPE)
        a = tl.load(A + rows[:, None] * D + d_out[None, :],
                    mask=r_valid[:, None] & d_valid[None, :], other=0.0)
        u = tl.dot(tl.trans(P).to(DOT_DTYPE), a.to(DOT_DTYPE), u, input_precision=PRECISION)
    tl.store(UB + cols[:, None] * D + d_out[None, :], u, mask=c_valid[:, None] & d_valid[None, :])


_INTERPRETER_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32)
_TUNE_KEY = ["D", "PRECISION", "DOT_DTYPE"]  # see cube.py


def _configs(hopper: bool) -> list:
    shapes = ([(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2)] if hopper
              else [(64, 64, 64, 4, 2), (64, 32, 64, 4, 2)])
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=bd), num_warps=w, num_stages=s)
            for m, n, bd, w, s in shapes]


def _tuned(kernel) -> dict:
    return {hopper: triton.autotune(configs=_configs(hopper), key=_TUNE_KEY)(kernel) for hopper in (True, False)}


_FWD = _tuned(_pair_fwd_kernel)
_BWD_ROWS = _tuned(_pair_bwd_rows_kernel)
_BWD_COLS = _tuned(_pair_bwd_cols_kernel)


def _launch(kernels: dict, kernel, grid, args: tuple, device: torch.device, dtype: torch.dtype, rows: int) -> None:
    common = dict(PRECISION=_cfg.dot_precision(dtype), DOT_DTYPE=_cfg.dot_dtype(dtype))
    if device.type == "cuda" and not _cfg.INTERPRETED:
        tuned = kernels[_cfg.is_hopper(device)]
        if _cfg.should_tune(rows):
            tuned[grid](*args, **common)
        else:
            config = tuned.configs[0]
            meta = dict(config.kwargs, **common)
            kernel[grid(meta)](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        meta = dict(_INTERPRETER_META, **common)
        kernel[grid(meta)](*args, **meta)


def pair_lse_forward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
    """L (I,) float32: ``LSE_j l[i, j]`` over the J rows of b.

    a: (I, d), b: (J, d) with I <= J, contiguous, one dtype (float32, bf16 or fp16);
    pos: (I,); tau: 0-dim tensor on the same device (read by the kernel, no host sync).
    """
    rows = _cfg.tune_on_prefix("pair_fwd", a, b)
    if rows:
        pair_lse_forward(a[:rows], b[:rows], pos[:rows], tau)
    I, D = a.shape
    J = b.shape[0]
    L = torch.empty(I, device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]),)  # noqa: E731
    _launch(_FWD, _pair_fwd_kernel, grid, (a, b, pos, tau, L, I, J, D), a.device, a.dtype, J)
    return L


def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor,
                      gL: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """da (I, d) like a, db (J, d) like b, dpos (I,) like pos, dtau (0-dim) like tau, of ``sum_i gL[i] L[i]``."""
    L, gL = L.float().contiguous(), gL.float().contiguous()
    rows = _cfg.tune_on_prefix("pair_bwd", a, b)
    if rows:
        pair_lse_backward(a[:rows], b[:rows], pos[:rows], tau, L[:rows], gL[:rows])
    I, D = a.shape
    J = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    Ua, Ub, dpos = torch.empty(I, D, **f32), torch.empty(J, D, **f32), torch.empty(I, **f32)
    row_grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    col_grid = lambda meta: (triton.cdiv(J, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _launch(_BWD_ROWS, _pair_bwd_rows_kernel, row_grid, (a, b, pos, tau, L, gL, Ua, dpos, I, J, D),
            a.device, a.dtype, J)
    _launch(_BWD_COLS, _pair_bwd_cols_kernel, col_grid, (a, b, pos, tau, L, gL, Ub, I, J, D), a.device, a.dtype, J)
    tau32 = tau.float()
    dtau = (a.float() * Ua).sum()  # = sum_{i != j} P[i, j] <a[i], b[j]>
    return (tau32 * Ua).to(a.dtype), (tau32 * Ub).to(b.dtype), dpos.to(pos.dtype), dtau.to(tau.dtype)
