"""Triton kernels for the M = 3 cube: La, Lb, Lc and their gradients (SPEC section 2).

The cube ``S[i,j,k] = tau * sum_d x[i,d] y[j,d] z[k,d]`` is never written to
memory. A tile has BLOCK_P = BLOCK_I * BLOCK_J rows, the (i, j) pairs of an
i-block and a j-block, and BLOCK_K columns: it is one ``tl.dot`` of the row
products ``x[i] * y[j]`` (BLOCK_P, d) with a block of z transposed (d, BLOCK_K),
the feature axis walked in BLOCK_D chunks with masks (any d, no padded copies).

Forward (one pass, grid = (i-blocks, j-splits)): each program owns BLOCK_I rows
of x and a range of j, and walks every k. Per (i, j) row it keeps an online
log-sum-exp over k (running maximum); after each j-block those rows give a
partial Lb for the j-block (reduced over the program's i) and feed the partial
La. Lc needs a reduction over (i, j): each program keeps its own partial-Lc
row in a workspace (programs x K floats) that only it reads and writes. The
partials are combined with ``torch.logsumexp``, so results do not depend on
scheduling (no atomics).

Backward (three passes, each owning its output rows, no atomics): the tile and
G are recomputed from the saved La, Lb, Lc. Pass "u" owns rows of x and gives
``U[i] = sum_j y[j] * W[i,j]`` with ``W[i,j] = sum_k G[i,j,k] z[k]`` (one tl.dot per
tile); the same kernel with x and y swapped gives the dy rows; pass "dz" owns
rows of z and gives ``sum_{i,j} G[i,j,k] (x[i] * y[j])`` (a tl.dot of G^T with the
row products). dx = tau U, and dtau = sum G T = sum_i <x[i], U[i]> (SPEC section 2)
is a plain torch reduction over U.

Workspace (float32): forward (I / BLOCK_I) * (J + splits * K) partial LSEs (N^2 / 4 at
BLOCK_I = 8 on Hopper: 256 MiB at N = 16384), backward splits * (I + J + K) * d; never
N^3. Splits (of the looped axis) are chosen so that a launch has about 4 programs per SM.

Shared exponentials (SPEC section 5: for d <= 128 the exponentials, not the
products, bound this kernel):
* Forward: one exponential per cube element, ``E = exp(S - rowmax_p)``, serves
  the row (La, Lb) reduction and the column (Lc) reduction: the column sums are
  ``sum_p exp(rowmax_p - c) E[p,k]`` with c the tile maximum, BLOCK_P extra
  exponentials per tile instead of BLOCK_P * BLOCK_K. Float32 exp flushes
  results below e^-87.3 to zero, so a column whose largest logit lies far below
  c would lose terms or vanish. The shared path is taken only when every
  column maximum of the tile is within FORWARD_SHARE_SPREAD = 60 of c: then a
  flushed term is below e^(60-87.3) = 1.4e-12 of its column's largest term,
  which is below float32 rounding even summed over the tile's rows. Other tiles
  use a second, per-column-referenced exponential. With unit rows the logits
  lie in [-tau, tau]: for tau <= 30 every tile shares; at tau = 100 (logits in
  [-100, 100], beyond float32 exp's range without a running maximum) a tile
  whose columns' maxima spread more than 60 apart pays the second exponential,
  and the result stays exact.
* Backward: ``G = gLa e^(S-La) + gLb e^(S-Lb) + gLc e^(S-Lc)`` uses one
  exponential ``E = exp(S - r_p)``, ``r_p = min(La[i], Lb[j])`` (so E <= 1,
  since an LSE bounds every logit it covers): the La, Lb terms are E times a
  per-row factor <= 1, the Lc term is ``E * exp(r_p - c0) * exp(c0 - Lc[k])``
  with c0 the tile's largest r_p. Sharing is used only when ``c0 - min Lc <=
  BACKWARD_SHARE_SPREAD = 40``: the per-column factor is then at most e^40 (no
  overflow) and a flushed term is below gLc e^(40-87.3), so the flushed part of
  a column's total is below N^2 e^-47.3 (1e-11 relative at N = 65536). Other
  tiles compute the Lc term with its own exponential.

Dtypes: float32 inputs use IEEE products, or TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is True; bf16/fp16 inputs (when a
caller passes them) use that dtype's tensor-core products with float32
accumulation, LSE and G; float64 is not supported by ``tl.dot`` in Triton 3.6
and is routed to the "chunked" backend (see ``symile_kernels.triton``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch as _cfg
from ._launch import BACKWARD_SHARE_SPREAD, FORWARD_SHARE_SPREAD

# Kernels may only read constexpr globals (Triton >= 3.2 rejects plain Python globals).
NEG_INF = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------- device helpers

@triton.jit
def _pair_rows(X, Y, i_idx, j_idx, p_valid, d0, D, BLOCK_D: tl.constexpr):
    """Row products ``x[i_p, d0:d0+BLOCK_D] * y[j_p, ...]`` in float32: (BLOCK_P, BLOCK_D), 0 where masked."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = p_valid[:, None] & (offs_d < D)[None, :]
    xv = tl.load(X + i_idx[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    yv = tl.load(Y + j_idx[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return xv.to(tl.float32) * yv.to(tl.float32)


@triton.jit
def _cube_logits(X, Y, Z, tau, i_idx, j_idx, p_valid, k_idx, k_valid, D,
                 BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """S = tau * T for the tile: (BLOCK_P, BLOCK_K) float32, -inf outside the valid rows/columns."""
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xy = _pair_rows(X, Y, i_idx, j_idx, p_valid, d0, D, BLOCK_D)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        zt = tl.load(Z + k_idx[None, :].to(tl.int64) * D + offs_d[:, None],
                     mask=k_valid[None, :] & (offs_d < D)[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
        acc = tl.dot(xy.to(DOT_DTYPE), zt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    valid = p_valid[:, None] & k_valid[None, :]
    return tl.where(valid, tau * acc, NEG_INF)


@triton.jit
def _logaddexp(a, b):
    """log(e^a + e^b), elementwise, -inf when both are -inf."""
    m = tl.maximum(a, b)
    m = tl.where(m == NEG_INF, 0.0, m)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _cube_G(S, p_valid, k_valid, la_p, lb_p, gla_p, glb_p, lc_k, glc_k, SHARE_SPREAD: tl.constexpr):
    """G for a tile (BLOCK_P, BLOCK_K) float32 from its logits S and the saved LSEs (0 where masked).

    la_p, lb_p: La[i_p], Lb[j_p] (+inf on masked rows); lc_k: Lc[k] (+inf on masked columns).
    One exponential per element when the tile's LSE spread allows it (module docstring).
    """
    ref = tl.where(p_valid, tl.minimum(la_p, lb_p), 0.0)
    E = tl.exp(S - ref[:, None])  # <= 1: every LSE bounds the logits it covers; 0 where S = -inf
    a_row = gla_p * tl.exp(ref - la_p) + glb_p * tl.exp(ref - lb_p)
    c0 = tl.max(tl.where(p_valid, ref, NEG_INF), axis=0)
    lowest = tl.min(tl.where(k_valid, lc_k, c0), axis=0)
    if c0 - lowest <= SHARE_SPREAD:
        u = tl.exp(ref - c0)
        b_col = glc_k * tl.exp(c0 - lc_k)  # <= gLc e^SHARE_SPREAD; 0 on masked columns (lc = +inf)
        G = E * (a_row[:, None] + u[:, None] * b_col[None, :])
    else:
        G = E * a_row[:, None] + glc_k[None, :] * tl.exp(S - lc_k[None, :])
    return tl.where(p_valid[:, None] & k_valid[None, :], G, 0.0)


# ---------------------------------------------------------------- kernels

@triton.jit
def _cube_fwd_kernel(X, Y, Z, TAU, LA_PART, LB_PART, LC_PART, I, J, K, D, J_PER_SPLIT,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SHARE_SPREAD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """Partial La (splits, I), Lb (i-blocks, J) and Lc (i-blocks * splits, K) of the cube.

    Program (pid_i, pid_s) owns x rows [pid_i*BLOCK_I, +BLOCK_I) and j in its split;
    it writes LA_PART[pid_s, its i], LB_PART[pid_i, its j] and its own LC_PART row.
    """
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    tau = tl.load(TAU).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    i_idx = pid_i.to(tl.int64) * BLOCK_I + offs_p // BLOCK_J
    i_valid = i_idx < I
    j_start = pid_s.to(tl.int64) * J_PER_SPLIT
    j_stop = tl.minimum(j_start + J_PER_SPLIT, J)
    lc_row = LC_PART + (pid_i.to(tl.int64) * tl.num_programs(1) + pid_s) * K
    la = tl.full((BLOCK_P,), NEG_INF, tl.float32)  # LSE over (j, k) so far, per row p = (i, j)
    for j0 in range(j_start, j_stop, BLOCK_J):
        j_idx = j0 + offs_p % BLOCK_J
        p_valid = i_valid & (j_idx < j_stop)
        r_max = tl.full((BLOCK_P,), NEG_INF, tl.float32)  # online LSE over k of row p
        r_sum = tl.zeros((BLOCK_P,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_idx = k0 + tl.arange(0, BLOCK_K)
            k_valid = k_idx < K
            S = _cube_logits(X, Y, Z, tau, i_idx, j_idx, p_valid, k_idx, k_valid, D,
                             BLOCK_P, BLOCK_K, BLOCK_D, PRECISION, DOT_DTYPE)
            row_max = tl.max(S, axis=1)
            row_ref = tl.where(p_valid, row_max, 0.0)
            E = tl.exp(S - row_ref[:, None])  # the one shared exponential per element
            new_max = tl.maximum(r_max, row_ref)
            r_sum = r_sum * tl.exp(r_max - new_max) + tl.sum(E, axis=1) * tl.exp(row_ref - new_max)
            r_max = new_max
            # Columns (Lc): reuse E when the tile's column maxima are within SHARE_SPREAD of its maximum.
            c = tl.max(tl.where(p_valid, row_max, NEG_INF), axis=0)
            col_max = tl.max(S, axis=0)
            lowest = tl.min(tl.where(k_valid, col_max, c), axis=0)
            if lowest >= c - SHARE_SPREAD:
                w = tl.exp(row_ref - c)
                col_sum = tl.sum(E * w[:, None], axis=0)
                col_ref = tl.zeros((BLOCK_K,), tl.float32) + c
            else:
                col_ref = tl.where(k_valid, col_max, 0.0)
                col_sum = tl.sum(tl.exp(S - col_ref[None, :]), axis=0)
            tile_lc = col_ref + tl.log(col_sum)
            # The program's own Lc row: started afresh at its first j-block, so relaunches (autotuning) are safe.
            started = (k_idx * 0 + j0) > j_start  # a block, not a scalar: the interpreter wants block masks
            old = tl.load(lc_row + k_idx, mask=k_valid & started, other=NEG_INF)
            tl.store(lc_row + k_idx, _logaddexp(old, tile_lc), mask=k_valid)
        R = r_max + tl.log(r_sum)  # LSE over k of row (i, j); -inf on masked rows
        la = _logaddexp(la, R)
        R2 = tl.reshape(R, (BLOCK_I, BLOCK_J))
        m_j = tl.max(R2, axis=0)
        m_j = tl.where(m_j == NEG_INF, 0.0, m_j)
        lb = m_j + tl.log(tl.sum(tl.exp(R2 - m_j[None, :]), axis=0))
        j_cols = j0 + tl.arange(0, BLOCK_J)
        tl.store(LB_PART + pid_i.to(tl.int64) * J + j_cols, lb, mask=j_cols < j_stop)
    la2 = tl.reshape(la, (BLOCK_I, BLOCK_J))
    m_i = tl.max(la2, axis=1)
    m_i = tl.where(m_i == NEG_INF, 0.0, m_i)
    la_i = m_i + tl.log(tl.sum(tl.exp(la2 - m_i[:, None]), axis=1))
    i_rows = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(LA_PART + pid_s.to(tl.int64) * I + i_rows, la_i, mask=i_rows < I)


@triton.jit
def _cube_bwd_u_kernel(X, Y, Z, TAU, LA, LB, LC, GLA, GLB, GLC, U_PART, I, J, K, D, J_PER_SPLIT,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SHARE_SPREAD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """U_PART[s, i, :] = sum_{j in split s} y[j] * W[i, j], W[i, j] = sum_k G[i, j, k] z[k] (float32).

    Program (pid_i, pid_d, pid_s) owns rows i of its block and the feature chunk pid_d.
    """
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    tau = tl.load(TAU).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    i_idx = pid_i.to(tl.int64) * BLOCK_I + offs_p // BLOCK_J
    i_valid = i_idx < I
    la_p = tl.load(LA + i_idx, mask=i_valid, other=float("inf"))
    gla_p = tl.load(GLA + i_idx, mask=i_valid, other=0.0).to(tl.float32)
    d_out = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d_out < D
    j_start = pid_s.to(tl.int64) * J_PER_SPLIT
    j_stop = tl.minimum(j_start + J_PER_SPLIT, J)
    u = tl.zeros((BLOCK_I, BLOCK_D), tl.float32)
    for j0 in range(j_start, j_stop, BLOCK_J):
        j_idx = j0 + offs_p % BLOCK_J
        p_valid = i_valid & (j_idx < j_stop)
        lb_p = tl.load(LB + j_idx, mask=p_valid, other=float("inf"))
        glb_p = tl.load(GLB + j_idx, mask=p_valid, other=0.0).to(tl.float32)
        w = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_idx = k0 + tl.arange(0, BLOCK_K)
            k_valid = k_idx < K
            S = _cube_logits(X, Y, Z, tau, i_idx, j_idx, p_valid, k_idx, k_valid, D,
                             BLOCK_P, BLOCK_K, BLOCK_D, PRECISION, DOT_DTYPE)
            lc_k = tl.load(LC + k_idx, mask=k_valid, other=float("inf"))
            glc_k = tl.load(GLC + k_idx, mask=k_valid, other=0.0).to(tl.float32)
            G = _cube_G(S, p_valid, k_valid, la_p, lb_p, gla_p, glb_p, lc_k, glc_k, SHARE_SPREAD)
            z_out = tl.load(Z + k_idx[:, None].to(tl.int64) * D + d_out[None, :],
                            mask=k_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
            w = tl.dot(G.to(DOT_DTYPE), z_out.to(DOT_DTYPE), w, input_precision=PRECISION)
        y_out = tl.load(Y + j_idx[:, None] * D + d_out[None, :],
                        mask=p_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        u += tl.sum(tl.reshape(w * y_out, (BLOCK_I, BLOCK_J, BLOCK_D)), axis=1)
    i_rows = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    out = U_PART + (pid_s.to(tl.int64) * I + i_rows[:, None]) * D + d_out[None, :]
    tl.store(out, u, mask=(i_rows < I)[:, None] & d_valid[None, :])


@triton.jit
def _cube_bwd_dz_kernel(X, Y, Z, TAU, LA, LB, LC, GLA, GLB, GLC, V_PART, I, J, K, D, I_PER_SPLIT,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SHARE_SPREAD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """V_PART[s, k, :] = sum_{i in split s, j} G[i, j, k] (x[i] * y[j]) (float32).

    Program (pid_k, pid_d, pid_s) owns rows k of its block and the feature chunk pid_d.
    """
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    tau = tl.load(TAU).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    k_idx = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k_idx < K
    lc_k = tl.load(LC + k_idx, mask=k_valid, other=float("inf"))
    glc_k = tl.load(GLC + k_idx, mask=k_valid, other=0.0).to(tl.float32)
    d0_out = pid_d * BLOCK_D
    i_start = pid_s.to(tl.int64) * I_PER_SPLIT
    i_stop = tl.minimum(i_start + I_PER_SPLIT, I)
    v = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for i0 in range(i_start, i_stop, BLOCK_I):
        i_idx = i0 + offs_p // BLOCK_J
        i_valid = i_idx < i_stop
        la_p = tl.load(LA + i_idx, mask=i_valid, other=float("inf"))
        gla_p = tl.load(GLA + i_idx, mask=i_valid, other=0.0).to(tl.float32)
        for j0 in range(0, J, BLOCK_J):
            j_idx = j0 + offs_p % BLOCK_J
            p_valid = i_valid & (j_idx < J)
            lb_p = tl.load(LB + j_idx, mask=p_valid, other=float("inf"))
            glb_p = tl.load(GLB + j_idx, mask=p_valid, other=0.0).to(tl.float32)
            S = _cube_logits(X, Y, Z, tau, i_idx, j_idx, p_valid, k_idx, k_valid, D,
                             BLOCK_P, BLOCK_K, BLOCK_D, PRECISION, DOT_DTYPE)
            G = _cube_G(S, p_valid, k_valid, la_p, lb_p, gla_p, glb_p, lc_k, glc_k, SHARE_SPREAD)
            xy_out = _pair_rows(X, Y, i_idx, j_idx, p_valid, d0_out, D, BLOCK_D)
            v = tl.dot(tl.trans(G).to(DOT_DTYPE), xy_out.to(DOT_DTYPE), v, input_precision=PRECISION)
    d_out = d0_out + tl.arange(0, BLOCK_D)
    out = V_PART + (pid_s.to(tl.int64) * K + k_idx[:, None]) * D + d_out[None, :]
    tl.store(out, v, mask=k_valid[:, None] & (d_out < D)[None, :])


# ---------------------------------------------------------------- configurations

# BLOCK_I x BLOCK_J is fixed per device kind (it sizes the partial-LSE workspaces);
# BLOCK_K, BLOCK_D, warps and stages are tuned. BLOCK_P = 128 rows suits Hopper's
# wgmma (M = 64 per warpgroup); older GPUs get 64-row tiles.
_HOPPER_PAIR_BLOCK = (8, 16)
_DEFAULT_PAIR_BLOCK = (4, 16)
_INTERPRETER_BLOCKS = dict(BLOCK_I=8, BLOCK_J=8, BLOCK_K=32, BLOCK_D=32)
# Tuned once per feature size, precision and dtype (not per N): ``_tune_on_prefix`` makes
# large problems tune on a 2048-row prefix, where one tuning run takes milliseconds.
_TUNE_KEY = ["D", "PRECISION", "DOT_DTYPE"]


def _configs(hopper: bool, bwd: bool) -> list:
    # Two configurations each: a fresh process retunes (each config runs about 8 times).
    # On sm_90 with bf16 these compile (Triton 3.9, ptxas) to <= 254 registers and no
    # spills; 4-warp variants of the same tiles spill.
    if hopper:
        shapes = [(32, 64, 8, 2), (64, 32, 8, 2)] if bwd else [(64, 64, 8, 3), (32, 64, 8, 3)]
    else:
        shapes = [(32, 64, 8, 2), (64, 32, 4, 2)]
    return [triton.Config(dict(BLOCK_K=bk, BLOCK_D=bd), num_warps=w, num_stages=s) for bk, bd, w, s in shapes]


def _tuned(kernel, bwd: bool) -> dict:
    return {hopper: triton.autotune(configs=_configs(hopper, bwd), key=_TUNE_KEY)(kernel) for hopper in (True, False)}


_FWD = _tuned(_cube_fwd_kernel, bwd=False)
_BWD_U = _tuned(_cube_bwd_u_kernel, bwd=True)
_BWD_DZ = _tuned(_cube_bwd_dz_kernel, bwd=True)


def _launch(kernels: dict, kernel, grid, args: tuple, device: torch.device, dtype: torch.dtype,
            spread: float, pair_block: tuple, rows: int) -> None:
    """Runs ``kernel`` compiled on CUDA (autotuned unless the problem is small, see
    ``_cfg.should_tune``), or with a small fixed config under the interpreter."""
    common = dict(PRECISION=_cfg.dot_precision(dtype), SHARE_SPREAD=spread, DOT_DTYPE=_cfg.dot_dtype(dtype))
    if device.type == "cuda" and not _cfg.INTERPRETED:
        tuned = kernels[_cfg.is_hopper(device)]
        blocks = dict(BLOCK_I=pair_block[0], BLOCK_J=pair_block[1])
        if _cfg.should_tune(rows):
            tuned[grid](*args, **blocks, **common)
        else:
            config = tuned.configs[0]
            meta = dict(config.kwargs, **blocks, **common)
            kernel[grid(meta) if callable(grid) else grid](*args, **meta, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)
    else:
        meta = dict(_INTERPRETER_BLOCKS, **common)
        kernel[grid(meta) if callable(grid) else grid](*args, **meta)


def _pair_block(device: torch.device) -> tuple:
    if device.type != "cuda" or _cfg.INTERPRETED:
        return _INTERPRETER_BLOCKS["BLOCK_I"], _INTERPRETER_BLOCKS["BLOCK_J"]
    return _HOPPER_PAIR_BLOCK if _cfg.is_hopper(device) else _DEFAULT_PAIR_BLOCK


# ---------------------------------------------------------------- launchers

def cube_lse_forward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """La (I,), Lb (J,), Lc (K,) in float32 (float64 for float64 inputs) of ``tau * T``.

    x: (I, d), y: (J, d), z: (K, d): contiguous, one dtype (float32, bf16 or fp16), one device.
    tau: 0-dim tensor on that device, read by the kernel (no host sync).
    """
    rows = _cfg.tune_on_prefix("cube_fwd", x, y, z)
    if rows:  # first large call: tune on a prefix (cheap), then run with the cached choice
        cube_lse_forward(x[:rows], y[:rows], z[:rows], tau)
    I, D = x.shape
    J, K = y.shape[0], z.shape[0]
    device = x.device
    BLOCK_I, BLOCK_J = _pair_block(device)
    i_blocks, j_blocks = triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J)
    splits = _cfg.split_count(i_blocks, j_blocks, device)
    j_per_split = triton.cdiv(j_blocks, splits) * BLOCK_J
    splits = triton.cdiv(J, j_per_split)
    f32 = dict(device=device, dtype=torch.float32)
    La_part = torch.empty(splits, I, **f32)
    Lb_part = torch.empty(i_blocks, J, **f32)
    Lc_part = torch.empty(i_blocks * splits, K, **f32)
    args = (x, y, z, tau, La_part, Lb_part, Lc_part, I, J, K, D, j_per_split)
    _launch(_FWD, _cube_fwd_kernel, (i_blocks, splits), args, device, x.dtype, FORWARD_SHARE_SPREAD,
            (BLOCK_I, BLOCK_J), max(I, J, K))
    return (torch.logsumexp(La_part, dim=0), torch.logsumexp(Lb_part, dim=0), torch.logsumexp(Lc_part, dim=0))


def _rows_u(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> Tensor:
    """U (I, d) float32: ``U[i] = sum_j y[j] * W[i, j]`` (x's rows of SPEC's W contraction)."""
    I, D = x.shape
    J, K = y.shape[0], z.shape[0]
    device = x.device
    BLOCK_I, BLOCK_J = _pair_block(device)
    i_blocks, j_blocks = triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J)
    splits = _cfg.split_count(i_blocks, j_blocks, device)
    j_per_split = triton.cdiv(j_blocks, splits) * BLOCK_J
    splits = triton.cdiv(J, j_per_split)
    U_part = torch.empty(splits, I, D, device=device, dtype=torch.float32)
    grid = lambda meta: (i_blocks, triton.cdiv(D, meta["BLOCK_D"]), splits)  # noqa: E731
    args = (x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, U_part, I, J, K, D, j_per_split)
    _launch(_BWD_U, _cube_bwd_u_kernel, grid, args, device, x.dtype, BACKWARD_SHARE_SPREAD, (BLOCK_I, BLOCK_J),
            max(I, J, K))
    return U_part.sum(dim=0)


def _rows_dz(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> Tensor:
    """V (K, d) float32: ``V[k] = sum_{i,j} G[i, j, k] (x[i] * y[j])``."""
    I, D = x.shape
    J, K = y.shape[0], z.shape[0]
    device = x.device
    BLOCK_I, BLOCK_J = _pair_block(device)
    block_k = _INTERPRETER_BLOCKS["BLOCK_K"] if device.type != "cuda" or _cfg.INTERPRETED else 32
    k_blocks, i_blocks = triton.cdiv(K, block_k), triton.cdiv(I, BLOCK_I)
    splits = _cfg.split_count(k_blocks, i_blocks, device)
    i_per_split = triton.cdiv(i_blocks, splits) * BLOCK_I
    splits = triton.cdiv(I, i_per_split)
    V_part = torch.empty(splits, K, D, device=device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(D, meta["BLOCK_D"]), splits)  # noqa: E731
    args = (x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, V_part, I, J, K, D, i_per_split)
    _launch(_BWD_DZ, _cube_bwd_dz_kernel, grid, args, device, x.dtype, BACKWARD_SHARE_SPREAD, (BLOCK_I, BLOCK_J),
            max(I, J, K))
    return V_part.sum(dim=0)


def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dy, dz (shaped and typed like x, y, z) and dtau (0-dim, tau's dtype) of
    ``sum gLa*La + gLb*Lb + gLc*Lc`` (SPEC section 2 without the positive term).

    La (I,), Lb (J,), Lc (K,): the forward's float32 LSEs; gLa, gLb, gLc: their gradients.
    """
    f32 = [t.float().contiguous() for t in (La, Lb, Lc, gLa, gLb, gLc)]
    La, Lb, Lc, gLa, gLb, gLc = f32
    rows = _cfg.tune_on_prefix("cube_bwd", x, y, z)
    if rows:  # the prefix's saved LSEs bound its logits too: G stays finite while tuning
        cube_lse_backward(x[:rows], y[:rows], z[:rows], tau, *(t[:rows] for t in f32))
    Ux = _rows_u(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc)
    Uy = _rows_u(y, x, z, tau, Lb, La, Lc, gLb, gLa, gLc)  # T is symmetric in the roles of x and y
    V = _rows_dz(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc)
    tau32 = tau.float()
    dtau = (x.float() * Ux).sum()  # = sum_{i,j,k} G T (SPEC section 2)
    return ((tau32 * Ux).to(x.dtype), (tau32 * Uy).to(y.dtype), (tau32 * V).to(z.dtype), dtau.to(tau.dtype))
