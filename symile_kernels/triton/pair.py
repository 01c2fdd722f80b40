"""Triton kernels for the pair LSE ("n" sampling and M = 2, docs/math.md section 3).

``L[i] = LSE_j l[i, j]`` over the J rows of b, with ``l[i, j] = tau <a[i], b[j]>``
off the diagonal and ``l[i, i] = pos[i]`` (a: (I, d), b: (J, d), I <= J; I < J
for a process's local rows against a gathered batch), computed as a tiled row
LSE (online maximum over blocks of columns, as in tiled CLIP losses): the I x J
logits are never held. The backward recomputes tiles from L: a row pass owns
rows of a (da, dpos), a column pass owns rows of b (db); each recomputes a tile
once over the whole feature axis (d split into compile-time feature segments, as
in cube.py) and holds its d-wide accumulator in registers: 2 I J d FLOPs
forward, 8 I J d backward (model: 4), one exponential per logit and pass. The forward
returns L in float64, formed from a float32 (max, sum) pair per row (docs/math.md section 6.4).
dtau = sum_i <a[i], da[i]> / tau is plain torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch as _cfg
from ._launch import loop_bound
from ._segments import seg_accumulate_rows, seg_rows_dot_t, seg_store, seg_zeros
from .cube import _exp

# Kernels may only read constexpr globals (Triton >= 3.2 rejects plain Python globals).
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _pair_logits(A, B, POS, tau, rows, r_valid, cols, c_valid, D, SEGS: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):
    """(l, diagonal): logits (BLOCK_M, BLOCK_N) float32 (-inf where masked) and i == j.
    The feature axis is split into the segments SEGS (_segments.py: the products of each, summed)."""
    T = seg_rows_dot_t(A, rows, r_valid, B, cols, c_valid, D, SEGS, DOT_DTYPE, PRECISION)
    pos = tl.load(POS + rows, mask=r_valid, other=0.0).to(tl.float32)
    diagonal = rows[:, None] == cols[None, :]
    logits = tl.where(diagonal, pos[:, None], tau * T)
    return tl.where(r_valid[:, None] & c_valid[None, :], logits, NEG_INF), diagonal


@triton.jit
def _pair_fwd_kernel(A, B, POS, TAU, L_M, L_S, I, J, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGS: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """L[i] = L_M[i] + log(L_S[i]) for the program's BLOCK_M rows, online over blocks of BLOCK_N
    columns: the (max, sum) pair is stored, and L formed in float64 by the launcher (docs/math.md
    section 6.4: a float32 max + log(sum) loses log(sum) at logits near 1e8)."""
    tau = tl.load(TAU).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_valid = rows < I
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, loop_bound(J), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        l, _ = _pair_logits(A, B, POS, tau, rows, r_valid, cols, cols < J, D, SEGS, PRECISION, DOT_DTYPE)
        new = tl.maximum(m, tl.max(l, axis=1))
        ref = tl.where(new == NEG_INF, 0.0, new)
        s = s * _exp(m - ref) + tl.sum(_exp(l - ref[:, None]), axis=1)
        m = new
    tl.store(L_M + rows, m, mask=r_valid)
    tl.store(L_S + rows, s, mask=r_valid)


@triton.jit
def _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D, SEGS: tl.constexpr,
            PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(P off the diagonal, P on the diagonal) with P = gL[i] e^(l[i, j] - L[i]), 0 where masked."""
    l, diagonal = _pair_logits(A, B, POS, tau, rows, r_valid, cols, c_valid, D, SEGS, PRECISION, DOT_DTYPE)
    Lr = tl.load(L + rows, mask=r_valid, other=0.0)
    g = tl.load(GL + rows, mask=r_valid, other=0.0).to(tl.float32)
    P = g[:, None] * _exp(l - Lr[:, None])
    return tl.where(diagonal, 0.0, P), tl.where(diagonal, P, 0.0)


@triton.jit
def _pair_bwd_rows_kernel(A, B, POS, TAU, L, GL, UA, DPOS, I, J, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGS: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """UA[i] = sum_{j != i} P[i, j] b[j] (whole rows); DPOS[i] = P[i, i]."""
    tau = tl.load(TAU).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_valid = rows < I
    u = seg_zeros(BLOCK_M, SEGS)
    dpos = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, loop_bound(J), BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        c_valid = cols < J
        P, P_diag = _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D, SEGS, PRECISION, DOT_DTYPE)
        dpos += tl.sum(P_diag, axis=1)
        u = seg_accumulate_rows(P.to(GRAD_DTYPE), B, cols, c_valid, D, u, SEGS, GRAD_DTYPE, GRAD_PRECISION)
    seg_store(UA, rows, r_valid, D, u, SEGS)
    tl.store(DPOS + rows, dpos, mask=r_valid)


@triton.jit
def _pair_bwd_cols_kernel(A, B, POS, TAU, L, GL, UB, I, J, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGS: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """UB[j] = sum_{i != j} P[i, j] a[i] (whole rows) for the program's BLOCK_N columns j."""
    tau = tl.load(TAU).to(tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_valid = cols < J
    u = seg_zeros(BLOCK_N, SEGS)
    for i0 in range(0, loop_bound(I), BLOCK_M):
        rows = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_valid = rows < I
        P, _ = _pair_P(A, B, POS, L, GL, tau, rows, r_valid, cols, c_valid, D, SEGS, PRECISION, DOT_DTYPE)
        u = seg_accumulate_rows(tl.trans(P).to(GRAD_DTYPE), A, rows, r_valid, D, u, SEGS, GRAD_DTYPE,
                                GRAD_PRECISION)
    seg_store(UB, cols, c_valid, D, u, SEGS)


def _configs(shapes) -> list:
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps, stages). The backward passes hold a d-wide float32 accumulator for the
# rows they own (BLOCK_M rows of a, or BLOCK_N rows of b) and walk the other axis in narrower blocks;
# at each bucket's largest feature size (128, 256, 512 = 256 + 256) these shapes compile with at
# most 24 bytes of stack in bf16; the "xlarge" backward lists take 16-32 rows (no wgmma on sm_90).
# Multi-segment sizes spill more on some lists (tests/test_triton_compile.py pins every case).
# Triton 3.6 runs pair_fwd/sm90/xlarge from its own list (_launch.TRITON_CONFIGS: shared memory).
_PAIR_LISTS = {
    "pair_fwd": {
        "sm90/small": _configs([(128, 64, 8, 3), (64, 64, 4, 3)]),
        "sm90/large": _configs([(64, 64, 8, 2), (64, 32, 4, 2)]),
        "sm80/small": _configs([(64, 64, 4, 2), (64, 32, 4, 2)]),
        "sm80/large": _configs([(64, 32, 4, 2), (32, 32, 4, 2)]),
        "sm90/xlarge": _configs([(64, 32, 8, 2)]),
        "sm80/xlarge": _configs([(32, 32, 4, 2)]),
    },
    "pair_bwd_rows": {
        "sm90/small": _configs([(64, 32, 8, 2), (64, 64, 8, 2)]),
        "sm90/large": _configs([(64, 16, 4, 2)]),
        "sm80/small": _configs([(64, 32, 4, 2), (64, 16, 4, 2)]),
        "sm80/large": _configs([(64, 32, 8, 2)]),
        "sm90/xlarge": _configs([(16, 32, 4, 2)]),
        "sm80/xlarge": _configs([(16, 32, 4, 2)]),
        # Three to five segments: 112 and 224/240 spill-free with 16-column blocks over 4-8 warps (sm_90
        # keeps wgmma with 64 rows); at 448/496, 16 x 16 tiles over 8 warps cut the stack at 496 from
        # 5744 to 272 bytes on sm_80 (the least among the shapes tried).
        "sm80/small-seg3": _configs([(64, 16, 4, 2)]),
        "sm90/large-seg3": _configs([(64, 16, 8, 2)]),
        "sm80/large-seg3": _configs([(64, 16, 8, 1)]),
        "sm90/xlarge-seg3": _configs([(16, 16, 8, 2)]),
        "sm80/xlarge-seg3": _configs([(16, 16, 8, 2)]),
    },
    "pair_bwd_cols": {
        "sm90/small": _configs([(32, 64, 8, 2), (32, 64, 4, 2)]),
        "sm90/large": _configs([(32, 64, 8, 2), (16, 64, 4, 2)]),
        "sm80/small": _configs([(32, 64, 4, 2), (64, 64, 8, 2)]),
        "sm80/large": _configs([(32, 64, 4, 2), (32, 64, 8, 2)]),
        "sm90/xlarge": _configs([(16, 32, 8, 2)]),
        "sm80/xlarge": _configs([(32, 32, 8, 2)]),
        # Three to five segments: 224/240 spill-free with 16-row blocks (sm_90: 64 columns, wgmma); at
        # 448/496, 16 x 16 tiles over 4 warps, 392 bytes of stack at 496 on sm_80 (least tried).
        "sm90/large-seg3": _configs([(16, 64, 8, 2)]),
        "sm80/large-seg3": _configs([(16, 32, 4, 2)]),
        "sm90/xlarge-seg3": _configs([(16, 16, 4, 2)]),
        "sm80/xlarge-seg3": _configs([(16, 16, 4, 2)]),
    },
}
KERNELS = {"pair_fwd": _pair_fwd_kernel, "pair_bwd_rows": _pair_bwd_rows_kernel,
           "pair_bwd_cols": _pair_bwd_cols_kernel}
for _name, _lists in _PAIR_LISTS.items():
    _cfg.register(_name, dict(_lists, interpreter=_configs([(16, 16, 4, 1)])))


def _run(name: str, grid_of, args: tuple, device, dtype, d: int, rows: int, grads: bool) -> None:
    meta = dict(SEGS=_cfg.d_segments(d), PRECISION=_cfg.dot_precision(dtype), DOT_DTYPE=_cfg.dot_dtype(dtype))
    if grads:
        meta["GRAD_DTYPE"], meta["GRAD_PRECISION"] = _cfg.grad_dot(dtype)

    def run(config):
        _cfg.launch(KERNELS[name], grid_of(config.kwargs), args, config, **meta)

    run(_cfg.pick(name, device, dtype, d, rows, run))


def pair_lse_forward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor) -> Tensor:
    """L (I,) float64: ``LSE_j l[i, j]`` over the J rows of b (float32 arithmetic, log(sum) kept).

    a: (I, d), b: (J, d) with I <= J, contiguous, one dtype (float32, bf16 or fp16);
    pos: (I,); tau: 0-dim tensor on the same device (read by the kernel, no host sync).
    """
    rows = _cfg.tune_on_prefix("pair_fwd", a, b)
    if rows:
        pair_lse_forward(a[:rows], b[:rows], pos[:rows], tau)
    I, D = a.shape
    J = b.shape[0]
    m, s = (torch.empty(I, device=a.device, dtype=torch.float32) for _ in range(2))
    _run("pair_fwd", lambda c: (triton.cdiv(I, c["BLOCK_M"]),), (a, b, pos, tau, m, s, I, J, D), a.device, a.dtype,
         D, J, grads=False)
    return _cfg.lse_from_pairs(m, s)


def pair_lse_backward(a: Tensor, b: Tensor, pos: Tensor, tau: Tensor, L: Tensor, gL: Tensor, *,
                      needs: tuple = (True, True, True, True)) -> tuple:
    """da (I, d) like a, db (J, d) like b, dpos (I,) like pos, dtau (0-dim) like tau, of ``sum_i gL[i] L[i]``.

    needs: which of (da, db, dpos, dtau) the caller uses; a pass none of them needs is skipped
    and its outputs are None (da, dpos and dtau share the rows pass, db has the column pass).
    """
    L, gL = L.float().contiguous(), gL.float().contiguous()
    rows = _cfg.tune_on_prefix("pair_bwd", a, b)
    if rows:
        pair_lse_backward(a[:rows], b[:rows], pos[:rows], tau, L[:rows], gL[:rows])
    I, D = a.shape
    J = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    tau32 = tau.float()
    need_da, need_db, need_dpos, need_dtau = needs
    da = db = dpos_out = dtau = None
    if need_da or need_dpos or need_dtau:
        Ua, dpos = torch.empty(I, D, **f32), torch.empty(I, **f32)
        _run("pair_bwd_rows", lambda m: (triton.cdiv(I, m["BLOCK_M"]),), (a, b, pos, tau, L, gL, Ua, dpos, I, J, D),
             a.device, a.dtype, D, J, grads=True)
        da, dpos_out = (tau32 * Ua).to(a.dtype), dpos.to(pos.dtype)
        dtau = (a.float() * Ua).sum().to(tau.dtype)  # = sum_{i != j} P[i, j] <a[i], b[j]>
    if need_db:
        Ub = torch.empty(J, D, **f32)
        _run("pair_bwd_cols", lambda m: (triton.cdiv(J, m["BLOCK_N"]),), (a, b, pos, tau, L, gL, Ub, I, J, D),
             a.device, a.dtype, D, J, grads=True)
        db = (tau32 * Ub).to(b.dtype)
    return da, db, dpos_out, dtau
