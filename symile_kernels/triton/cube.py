"""Triton kernels for the M = 3 cube: La, Lb, Lc and their gradients (docs/math.md section 2).

The cube ``S[i,j,k] = tau * sum_d x[i,d] y[j,d] z[k,d]`` is never written to
memory. A tile has BLOCK_P = BLOCK_I * BLOCK_J rows, the (i, j) pairs of an
i-block and a j-block, and BLOCK_K columns: the ``tl.dot`` of the row products
``x[i] * y[j]`` (BLOCK_P, d) with a block of z transposed (d, BLOCK_K). d is
split into one to five compile-time feature segments SEGS, sum(SEGS) >= d (powers
of two from 16 to 256, masked loads; 48 = 32 + 16, 200 -> 128 + 64 + 16,
496 = 256 + 128 + 64 + 32 + 16, ``_launch.d_segments``), each with its own operand
tiles and accumulators (tuples, ``_segments.py``): a tile covers the whole feature
axis, its products execute over sum(SEGS) features (d itself for every multiple
of 16 up to 512, not d padded to a power of two), and the row products are built
once per (i-block, j-block) and reused for every k-block.
Logits and LSEs stay in natural-log units; every exponential is ``exp2`` of a
difference of them scaled by log2(e) (``_exp``), never of a base-2 logit, which
would round away what the difference keeps at logits near 1e8.

Forward (one pass, grid = (i-blocks, j-splits)): each program owns BLOCK_I rows
of x and a range of j, and walks every k. Per (i, j) row it keeps an online
log-sum-exp over k (running maximum); after each j-block those rows give a
partial Lb for the j-block (reduced over the program's i) and feed the partial
La. Lc needs a reduction over (i, j): each program keeps its own partial-Lc
row in a workspace (programs x K pairs) that only it reads and writes. Every
partial is a float32 (max, sum) pair, merged as pairs; the launcher combines a
line's partials and forms ``L = max + log(sum)`` in float64 (docs/math.md
section 6.4: a float32 max + log(sum) loses log(sum) near 1e8), in a fixed
order, so results do not depend on scheduling (no atomics).

Backward (two passes, each owning its outputs, no atomics; each recomputes every
tile once over the whole d, so forward+backward executes 10 N^3 d FLOPs against
the model's 6 N^3 d):
* Rows pass (grid = (i-splits, j-splits)): for each (i-block, j-block) it
  accumulates ``W[i,j] = sum_k G[i,j,k] z[k]`` (BLOCK_P, d) over all k, then
  adds ``y[j] * W[i,j]`` to ``Ux[i]`` (registers, over the program's j) and
  ``x[i] * W[i,j]`` to ``Uy[j]`` (the program's own workspace rows, read and
  written only by it). dx = tau Ux, dy = tau Uy, dtau = sum_i <x[i], Ux[i]>.
* dz pass (grid = (k-blocks, i-splits)): owns rows of z and accumulates
  ``sum_{i,j} G[i,j,k] (x[i] * y[j])`` (BLOCK_K, d), a tl.dot of G^T with the
  row products.
``needs`` skips the dz pass when dz is not wanted, and the rows pass when none
of dx, dy, dtau is.

Workspace (float32): forward 2 (I / BLOCK_I) * (J + splits * K) + 2 splits * I (pairs);
backward (splits_j * I + splits_i * J + splits_k * K) * d with about
sqrt(4 * SMs) splits of each axis in the rows pass (about 190 MiB at N = 4096,
d = 256 on 132 SMs); never N^3.

Shared exponentials (docs/math.md section 5: for d <= 128 the exponentials, not
the products, bound this kernel). Spreads below are in natural-log units, as are
the kernels' logits.
* Forward: one exponential per cube element, ``E = e^(S - m_p)`` with m_p the
  row's running maximum (online LSE), serves the row (La, Lb) reduction and the
  column (Lc) reduction: the column sums are ``sum_p e^(m_p - c) E[p,k]`` with c
  the largest m_p, BLOCK_P extra exponentials per tile instead of BLOCK_P *
  BLOCK_K. Float32 exp flushes results below e^-87.3 to zero, so a column whose
  largest logit lies far below c would lose terms or vanish. The shared path is
  taken only when every column maximum of the tile is within
  FORWARD_SHARE_SPREAD = 60 of c: then a flushed term is below e^(60-87.3) =
  1.4e-12 of its column's largest term, below float32 rounding even summed over
  the tile's rows. Other tiles use a second, per-column-referenced exponential,
  and the result stays exact. Masked rows have m_p = -inf, so their column
  weight is e^(-inf) = 0 (a reference of 0 once overflowed when c < -88.7).
* Backward, rows pass: ``G = gLa e^(S-La) + gLb e^(S-Lb) + gLc e^(S-Lc)`` uses
  one exponential ``E = e^(S - r_p)``, ``r_p = min(La[i], Lb[j])`` (so E <= 1,
  since an LSE bounds every logit it covers): the La, Lb terms are E times a
  per-row factor <= 1, the Lc term is ``E * e^(r_p - c0) * e^(c0 - Lc[k])`` with
  c0 the block's largest r_p. Sharing is used only when ``c0 - min Lc <=
  BACKWARD_SHARE_SPREAD = 40``: the per-column factor is then at most e^40 (no
  overflow) and a flushed term is below gLc e^(40-87.3), so the flushed part of
  a column's total is below N^2 e^-47.3 (1e-11 relative at N = 65536). Other
  tiles compute the Lc term with its own exponential.
* Backward, dz pass: the same sharing referenced to the columns, ``E = e^(S -
  Lc[k])`` <= 1 and ``G = E (gLc + e^(Lc[k] - c1) (gLa e^(c1 - La[i]) + gLb
  e^(c1 - Lb[j])))`` with c1 the k-block's largest Lc: BLOCK_I + BLOCK_J factor
  exponentials per tile. Shared only when c1 minus the smallest of the tile's
  La, Lb and the block's Lc is at most BACKWARD_SHARE_SPREAD (the same bound);
  otherwise the tile takes the rows pass's exact form.

Dtypes: float32 inputs use IEEE products, or TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is True; bf16/fp16 inputs (when a
caller passes them) use that dtype's tensor-core products for the logits with
float32 accumulation, (max, sum) pairs and G; the LSE vectors are returned in
float64. G's contractions take bf16 operands for bf16 inputs and float32
operands (TF32) for fp16 inputs, whose range cannot hold G
(``_launch.grad_dot``). float64 is not supported by ``tl.dot`` and is routed to
the "chunked" backend (see ``symile_kernels.triton``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch as _cfg
from ._launch import BACKWARD_SHARE_SPREAD, FORWARD_SHARE_SPREAD, LOG2E, loop_bound
from ._segments import (_add_rows, _load_rows, seg_accumulate, seg_dot_t, seg_products, seg_products_dot,
                        seg_rows_t, seg_store, seg_zeros)

# Kernels may only read constexpr globals (Triton >= 3.2 rejects plain Python globals).
NEG_INF = tl.constexpr(float("-inf"))
K_LOG2E = tl.constexpr(LOG2E)


# ---------------------------------------------------------------- device helpers
#
# The feature axis is split into the compile-time segments SEGS (_segments.py: one to five powers of
# two, each with its own operand tiles and accumulators, held as tuples), so the executed FLOPs follow
# d rounded up to sum(SEGS) (48 = 32 + 16), not to the next power of two (_launch.d_segments).


@triton.jit
def _fold_segment(X, Y, i_idx, j_idx, p_valid, D, w, OFF: tl.constexpr, SEG: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """(sum_j y[j] * W[i, j], sum_i x[i] * W[i, j]) over one feature segment, w = W's (BLOCK_P, SEG)
    columns: (BLOCK_I, SEG) and (BLOCK_J, SEG) float32."""
    y = _load_rows(Y, j_idx, p_valid, D, OFF, SEG).to(tl.float32)
    x = _load_rows(X, i_idx, p_valid, D, OFF, SEG).to(tl.float32)
    ux = tl.sum(tl.reshape(w * y, (BLOCK_I, BLOCK_J, SEG)), axis=1)
    uy = tl.sum(tl.reshape(w * x, (BLOCK_I, BLOCK_J, SEG)), axis=0)
    return ux, uy


@triton.jit
def _fold_w(X, Y, UY_PART, i_idx, j_idx, p_valid, D, ws, uxs, uy_rows, uy_ok, i0, i_start,
            SEGS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """The rows pass's use of W (tuples ws, uxs over the segments): returns uxs + sum_j y[j] * W[i, j]
    (registers) and writes UY_PART[uy_rows] (+)= sum_i x[i] * W[i, j] (fresh when i0 == i_start)."""
    out = ()
    OFF = 0
    for s in tl.static_range(len(SEGS)):
        ux, uy = _fold_segment(X, Y, i_idx, j_idx, p_valid, D, ws[s], OFF, SEGS[s], BLOCK_I, BLOCK_J)
        _add_rows(UY_PART, uy_rows, uy_ok, D, uy, i0, i_start, OFF, SEGS[s])
        out = out + (uxs[s] + ux,)
        OFF += SEGS[s]
    return out


@triton.jit
def _exp(x):
    """e^x as the hardware evaluates it, 2^(x log2(e)). x is always a difference of two logits or
    LSEs (natural log units), formed before the scaling: at logits near 1e8 a base-2 logit
    tau log2(e) T would round to a multiple of 16 and lose what the difference keeps."""
    return tl.exp2(x * K_LOG2E)


@triton.jit
def _merge(m1, s1, m2, s2):
    """The running-maximum merge of two (max, sum) pairs, elementwise, with one exponential:
    (M, s1 e^(m1 - M) + s2 e^(m2 - M)), M = max(m1, m2); (-inf, 0) when both are empty."""
    m = tl.maximum(m1, m2)
    e = _exp(tl.minimum(m1, m2) - tl.where(m == NEG_INF, 0.0, m))  # 0 when the smaller is -inf
    return m, tl.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)


@triton.jit
def _row_factor(la_p, lb_p, gla_p, glb_p, p_valid):
    """(ref, a): ref = min(La, Lb) (0 on masked rows) and a = gLa e^(ref-La) + gLb e^(ref-Lb),
    with one exponential per row (one of the two exponents is 0)."""
    ref = tl.where(p_valid, tl.minimum(la_p, lb_p), 0.0)
    e = _exp(tl.where(p_valid, -tl.abs(la_p - lb_p), NEG_INF))
    a = tl.where(la_p <= lb_p, gla_p + glb_p * e, gla_p * e + glb_p)
    return ref, tl.where(p_valid, a, 0.0)


# ---------------------------------------------------------------- kernels

@triton.jit
def _cube_fwd_kernel(X, Y, Z, TAU, LA_M, LA_S, LB_M, LB_S, LC_M, LC_S, I, J, K, D, J_PER_SPLIT,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
                     PRECISION: tl.constexpr, SHARE_SPREAD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """Partial La (splits, I), Lb (i-blocks, J) and Lc (i-blocks * splits, K) of the cube, each as a
    (max, sum) pair: LSE = max + log(sum), formed in float64 by the launcher (docs/math.md section 6.4).

    Program (pid_i, pid_s) owns x rows [pid_i*BLOCK_I, +BLOCK_I) and j in its split; it writes
    LA_*[pid_s, its i], LB_*[pid_i, its j] and its own LC_* row. Every merge keeps (max, sum) pairs:
    a float32 max + log(sum) would round log(sum) away at logits near 1e8.
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
    lc_row = (pid_i.to(tl.int64) * tl.num_programs(1) + pid_s) * K
    la_m = tl.full((BLOCK_P,), NEG_INF, tl.float32)  # (max, sum) over (j, k) so far, per row p = (i, j)
    la_s = tl.zeros((BLOCK_P,), tl.float32)
    for j0 in range(loop_bound(j_start), loop_bound(j_stop), BLOCK_J):
        j_idx = j0 + offs_p % BLOCK_J
        p_valid = i_valid & (j_idx < j_stop)
        # The row products once per (i-block, j-block), reused by every k-block.
        xy = seg_products(X, Y, i_idx, j_idx, p_valid, D, SEGS, DOT_DTYPE)
        r_max = tl.full((BLOCK_P,), NEG_INF, tl.float32)  # online LSE over k of row p
        r_sum = tl.zeros((BLOCK_P,), tl.float32)
        for k0 in range(0, loop_bound(K), BLOCK_K):
            k_idx = k0 + tl.arange(0, BLOCK_K)
            k_valid = k_idx < K
            T, _ = seg_dot_t(xy, Z, k_idx, k_valid, D, SEGS, DOT_DTYPE, PRECISION)
            S = tl.where(p_valid[:, None] & k_valid[None, :], tau * T, NEG_INF)
            new = tl.maximum(r_max, tl.max(S, axis=1))  # -inf on masked rows
            ref = tl.where(new == NEG_INF, 0.0, new)
            E = _exp(S - ref[:, None])  # the one shared exponential per element, <= 1
            r_sum = r_sum * _exp(r_max - ref) + tl.sum(E, axis=1)
            r_max = new
            # Columns (Lc) reuse E when every column maximum is within SHARE_SPREAD of the rows' reference.
            c = tl.max(new, axis=0)  # finite: the tile has a valid row with a valid column
            col_max = tl.max(S, axis=0)
            lowest = tl.min(tl.where(k_valid, col_max, c), axis=0)
            if lowest >= c - SHARE_SPREAD:
                w = _exp(new - c)  # <= 1; 0 on masked rows (new = -inf: no overflow, no 0 * inf)
                col_sum = tl.sum(E * w[:, None], axis=0)
                col_ref = tl.zeros((BLOCK_K,), tl.float32) + c
            else:
                col_ref = tl.where(k_valid, col_max, 0.0)
                col_sum = tl.sum(_exp(S - col_ref[None, :]), axis=0)
            col_ref = tl.where(k_valid, col_ref, NEG_INF)
            # The program's own Lc row: started afresh at its first j-block, so relaunches (tuning) are safe.
            started = (k_idx * 0 + j0) > j_start  # a block, not a scalar: the interpreter wants block masks
            old_m = tl.load(LC_M + lc_row + k_idx, mask=k_valid & started, other=NEG_INF)
            old_s = tl.load(LC_S + lc_row + k_idx, mask=k_valid & started, other=0.0)
            lc_m, lc_s = _merge(old_m, old_s, col_ref, col_sum)
            tl.store(LC_M + lc_row + k_idx, lc_m, mask=k_valid)
            tl.store(LC_S + lc_row + k_idx, lc_s, mask=k_valid)
        la_m, la_s = _merge(la_m, la_s, r_max, r_sum)
        # Lb of the j-block: row (i, j)'s pair reduced over the block's i. Per-row quantities stay
        # 1-D vectors (BLOCK_P,) through their exponentials.
        m_j = tl.max(tl.reshape(r_max, (BLOCK_I, BLOCK_J)), axis=0)
        m_j_safe = tl.where(m_j == NEG_INF, 0.0, m_j)
        m_p = tl.reshape(tl.broadcast_to(m_j_safe[None, :], (BLOCK_I, BLOCK_J)), (BLOCK_P,))
        s_j = tl.sum(tl.reshape(r_sum * _exp(r_max - m_p), (BLOCK_I, BLOCK_J)), axis=0)
        j_cols = j0 + tl.arange(0, BLOCK_J)
        lb_at = pid_i.to(tl.int64) * J + j_cols
        tl.store(LB_M + lb_at, m_j, mask=j_cols < j_stop)
        tl.store(LB_S + lb_at, s_j, mask=j_cols < j_stop)
    m_i = tl.max(tl.reshape(la_m, (BLOCK_I, BLOCK_J)), axis=1)
    m_i_safe = tl.where(m_i == NEG_INF, 0.0, m_i)
    m_p = tl.reshape(tl.broadcast_to(m_i_safe[:, None], (BLOCK_I, BLOCK_J)), (BLOCK_P,))
    s_i = tl.sum(tl.reshape(la_s * _exp(la_m - m_p), (BLOCK_I, BLOCK_J)), axis=1)
    i_rows = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(LA_M + pid_s.to(tl.int64) * I + i_rows, m_i, mask=i_rows < I)
    tl.store(LA_S + pid_s.to(tl.int64) * I + i_rows, s_i, mask=i_rows < I)


@triton.jit
def _cube_bwd_rows_kernel(X, Y, Z, TAU, LA, LB, LC, GLA, GLB, GLC, UX_PART, UY_PART, I, J, K, D,
                          I_PER_SPLIT, J_PER_SPLIT,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                          SEGS: tl.constexpr, PRECISION: tl.constexpr,
                          SHARE_SPREAD: tl.constexpr, DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                          GRAD_PRECISION: tl.constexpr):
    """W[i, j] = sum_k G[i, j, k] z[k] for the program's (i, j) rows, recomputing each tile once over
    the whole feature axis, and from it UX_PART[s_j, i] = sum_{j in split} y[j] * W[i, j] and
    UY_PART[s_i, j] = sum_{i in split} x[i] * W[i, j] (float32, (splits, rows, D)).

    Program (s_i, s_j) owns the i-split s_i and the j-split s_j, hence the rows UX_PART[s_j, its i]
    and UY_PART[s_i, its j]: no other program writes them (deterministic, no atomics).
    """
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid_si = tl.program_id(0)
    pid_sj = tl.program_id(1)
    tau = tl.load(TAU).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    i_start = pid_si.to(tl.int64) * I_PER_SPLIT
    i_stop = tl.minimum(i_start + I_PER_SPLIT, I)
    j_start = pid_sj.to(tl.int64) * J_PER_SPLIT
    j_stop = tl.minimum(j_start + J_PER_SPLIT, J)
    ux_row0 = pid_sj.to(tl.int64) * I  # the program's rows of UX_PART
    uy_row0 = pid_si.to(tl.int64) * J  # the program's rows of UY_PART
    for i0 in range(loop_bound(i_start), loop_bound(i_stop), BLOCK_I):
        i_idx = i0 + offs_p // BLOCK_J
        i_valid = i_idx < i_stop
        la_p = tl.load(LA + i_idx, mask=i_valid, other=float("inf"))
        gla_p = tl.load(GLA + i_idx, mask=i_valid, other=0.0).to(tl.float32)
        ux = seg_zeros(BLOCK_I, SEGS)
        for j0 in range(loop_bound(j_start), loop_bound(j_stop), BLOCK_J):
            j_idx = j0 + offs_p % BLOCK_J
            p_valid = i_valid & (j_idx < j_stop)
            lb_p = tl.load(LB + j_idx, mask=p_valid, other=float("inf"))
            glb_p = tl.load(GLB + j_idx, mask=p_valid, other=0.0).to(tl.float32)
            xy = seg_products(X, Y, i_idx, j_idx, p_valid, D, SEGS, DOT_DTYPE)
            # Per-row factors, once per (i-block, j-block): G = E * (a + u * b_col) with
            # E = e^(S - ref) <= 1 (every LSE bounds the logits it covers).
            ref, a_row = _row_factor(la_p, lb_p, gla_p, glb_p, p_valid)
            c0 = tl.max(tl.where(p_valid, ref, NEG_INF), axis=0)
            u = _exp(tl.where(p_valid, ref, c0) - c0)  # <= 1
            w = seg_zeros(BLOCK_P, SEGS)
            for k0 in range(0, loop_bound(K), BLOCK_K):
                k_idx = k0 + tl.arange(0, BLOCK_K)
                k_valid = k_idx < K
                T, zt = seg_dot_t(xy, Z, k_idx, k_valid, D, SEGS, DOT_DTYPE, PRECISION)
                S = tl.where(p_valid[:, None] & k_valid[None, :], tau * T, NEG_INF)
                lc_k = tl.load(LC + k_idx, mask=k_valid, other=float("inf"))
                glc_k = tl.load(GLC + k_idx, mask=k_valid, other=0.0).to(tl.float32)
                E = _exp(S - ref[:, None])  # the one exponential per element; 0 where masked
                lowest = tl.min(tl.where(k_valid, lc_k, c0), axis=0)
                if c0 - lowest <= SHARE_SPREAD:
                    b_col = glc_k * _exp(c0 - lc_k)  # <= gLc e^SHARE_SPREAD; 0 on masked columns
                    G = E * (a_row[:, None] + u[:, None] * b_col[None, :])
                else:  # exact fallback: the Lc term with its own exponential
                    G = E * a_row[:, None] + glc_k[None, :] * _exp(S - lc_k[None, :])
                w = seg_accumulate(G.to(GRAD_DTYPE), zt, w, SEGS, True, GRAD_DTYPE, GRAD_PRECISION)
            # Ux[i] += sum_j y[j] * W[i, j] (registers); Uy[j] = sum_i x[i] * W[i, j] (the program's rows,
            # started afresh at the split's first i-block).
            j_rows = j0 + tl.arange(0, BLOCK_J)
            ux = _fold_w(X, Y, UY_PART, i_idx, j_idx, p_valid, D, w, ux, uy_row0 + j_rows, j_rows < j_stop, i0,
                         i_start, SEGS, BLOCK_I, BLOCK_J)
        i_rows = i0 + tl.arange(0, BLOCK_I)
        i_ok = i_rows < i_stop
        seg_store(UX_PART, ux_row0 + i_rows, i_ok, D, ux, SEGS)


@triton.jit
def _cube_bwd_dz_kernel(X, Y, Z, TAU, LA, LB, LC, GLA, GLB, GLC, V_PART, I, J, K, D, I_PER_SPLIT,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        SEGS: tl.constexpr, PRECISION: tl.constexpr,
                        SHARE_SPREAD: tl.constexpr, DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                        GRAD_PRECISION: tl.constexpr):
    """V_PART[s, k, :] = sum_{i in split s, j} G[i, j, k] (x[i] * y[j]) (float32), each tile
    recomputed once over the whole feature axis.

    Program (pid_k, pid_s) owns rows k of its block (z's block and the accumulator stay in
    registers) and the i-split s. The shared exponential is referenced to the columns:
    G = E * (gLc + v[k] * (A[i] + B[j])) with E = e^(S - Lc[k]) <= 1, v[k] = e^(Lc[k] - c1),
    A[i] = gLa e^(c1 - La[i]), B[j] = gLb e^(c1 - Lb[j]), c1 the block's largest Lc: BLOCK_I +
    BLOCK_J exponentials per tile besides the one per element.
    """
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    tau = tl.load(TAU).to(tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    k_idx = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k_idx < K
    lc_k = tl.load(LC + k_idx, mask=k_valid, other=float("inf"))
    glc_k = tl.load(GLC + k_idx, mask=k_valid, other=0.0).to(tl.float32)
    zt = seg_rows_t(Z, k_idx, k_valid, D, SEGS, DOT_DTYPE)
    acc = seg_zeros(BLOCK_K, SEGS)
    c1 = tl.max(tl.where(k_valid, lc_k, NEG_INF), axis=0)
    low_c = tl.min(tl.where(k_valid, lc_k, c1), axis=0)
    v = _exp(tl.where(k_valid, lc_k, c1) - c1)  # <= 1
    i_start = pid_s.to(tl.int64) * I_PER_SPLIT
    i_stop = tl.minimum(i_start + I_PER_SPLIT, I)
    for i0 in range(loop_bound(i_start), loop_bound(i_stop), BLOCK_I):
        i_blk = i0 + tl.arange(0, BLOCK_I)
        ib_valid = i_blk < i_stop
        la_i = tl.load(LA + i_blk, mask=ib_valid, other=float("inf"))
        gla_i = tl.load(GLA + i_blk, mask=ib_valid, other=0.0).to(tl.float32)
        low_a = tl.min(tl.where(ib_valid, la_i, c1), axis=0)
        A_i = gla_i * _exp(tl.where(ib_valid, tl.minimum(c1 - la_i, SHARE_SPREAD), NEG_INF))
        i_idx = i0 + offs_p // BLOCK_J
        i_valid = i_idx < i_stop
        for j0 in range(0, loop_bound(J), BLOCK_J):
            j_blk = j0 + tl.arange(0, BLOCK_J)
            jb_valid = j_blk < J
            lb_j = tl.load(LB + j_blk, mask=jb_valid, other=float("inf"))
            glb_j = tl.load(GLB + j_blk, mask=jb_valid, other=0.0).to(tl.float32)
            j_idx = j0 + offs_p % BLOCK_J
            p_valid = i_valid & (j_idx < J)
            T, xy = seg_products_dot(X, Y, i_idx, j_idx, p_valid, D, zt, SEGS, DOT_DTYPE, PRECISION)
            valid = p_valid[:, None] & k_valid[None, :]
            S = tl.where(valid, tau * T, NEG_INF)
            low_b = tl.min(tl.where(jb_valid, lb_j, c1), axis=0)
            if c1 - tl.minimum(tl.minimum(low_a, low_b), low_c) <= SHARE_SPREAD:
                B_j = glb_j * _exp(tl.where(jb_valid, c1 - lb_j, NEG_INF))
                AB = tl.reshape(A_i[:, None] + B_j[None, :], (BLOCK_P,))
                E = _exp(S - tl.where(k_valid, lc_k, 0.0)[None, :])  # one exponential per element
                G = E * (glc_k[None, :] + v[None, :] * AB[:, None])
            else:  # exact fallback: row-referenced La/Lb terms and the Lc term with its own exponential
                la_p = tl.load(LA + i_idx, mask=p_valid, other=float("inf"))
                gla_p = tl.load(GLA + i_idx, mask=p_valid, other=0.0).to(tl.float32)
                lb_p = tl.load(LB + j_idx, mask=p_valid, other=float("inf"))
                glb_p = tl.load(GLB + j_idx, mask=p_valid, other=0.0).to(tl.float32)
                ref, a_row = _row_factor(la_p, lb_p, gla_p, glb_p, p_valid)
                G = _exp(S - ref[:, None]) * a_row[:, None] + glc_k[None, :] * _exp(S - lc_k[None, :])
            Gt = tl.trans(tl.where(valid, G, 0.0)).to(GRAD_DTYPE)
            acc = seg_accumulate(Gt, xy, acc, SEGS, False, GRAD_DTYPE, GRAD_PRECISION)
    seg_store(V_PART + pid_s.to(tl.int64) * K * D, k_idx, k_valid, D, acc, SEGS)


# ---------------------------------------------------------------- configurations

def _configs(shapes) -> list:
    return [triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bi, bj, bk, w, s in shapes]


# (BLOCK_I, BLOCK_J, BLOCK_K, warps, stages). BLOCK_P = BLOCK_I * BLOCK_J rows of 64-128 suit
# Hopper's wgmma (M = 64 per warpgroup). The backward passes hold d-wide row products and a d-wide
# float32 accumulator in registers, so they take fewer rows or columns, and feature sizes above 128
# fewer still. Each shape was chosen by compiling candidates for its target (Triton 3.9, bf16).
# At d = 128 and 256 all compile without spills except cube_bwd_rows/sm90/large (112 bytes of
# stack), where no candidate kept both wgmma and zero spills; cube_bwd_dz's "large" lists take
# BLOCK_K = 16, spill-free at 256 and at 224 = 128 + 64 + 32, and cube_bwd_rows/sm80/large offers
# the tuner a 16-row shape spill-free at 224 too. Above 256 ("xlarge", 512 = 256 + 256) no
# candidate avoided spills in the backward passes: the lists hold the least-spilling shapes found
# (16-32 rows: no wgmma in cube_bwd_rows/sm90). Sizes that take two to five segments (96, 112,
# 224, 240, 448, 496) spill on several lists where the single segment does not, four and five
# segments most (tests/test_triton_compile.py pins every case). The "-seg3" lists take those sizes
# where that cut the stack (_launch.list_name), with 16-32-row tiles: at 112 the dz pass on sm_80 is
# spill-free, at 240 the stack falls from 5.2 and 3.0 KiB to 0.9 and 0.3 KiB on sm_80, and at 496
# by about half; the sm_90 dz lists then run mma.sync (16 rows: too few for wgmma), while the sm_90
# rows pass keeps wgmma at 496 with 64 rows over 16 warps (1.4 KiB instead of 6 KiB of stack). Lists
# without a "-seg3" list spilled no more at those sizes than any candidate tried. The interpreter's
# default is small, so that the tests at N <= 33 cross block edges.
_CONFIG_LISTS = {
    "cube_fwd": {
        "sm90/small": _configs([(8, 16, 64, 8, 3), (8, 16, 32, 8, 3)]),
        "sm90/large": _configs([(4, 16, 64, 8, 2), (4, 16, 32, 8, 2)]),
        "sm80/small": _configs([(4, 16, 32, 8, 2), (8, 8, 32, 8, 2)]),
        "sm80/large": _configs([(4, 16, 32, 4, 2), (2, 16, 64, 4, 2)]),
        "sm90/xlarge": _configs([(4, 16, 32, 8, 1)]),
        "sm80/xlarge": _configs([(4, 16, 32, 4, 1)]),
        "interpreter": _configs([(4, 8, 16, 4, 1)]),
    },
    "cube_bwd_rows": {
        "sm90/small": _configs([(4, 16, 32, 8, 2), (4, 16, 64, 8, 1)]),
        "sm90/large": _configs([(4, 16, 32, 8, 1)]),
        "sm80/small": _configs([(4, 16, 32, 8, 2), (8, 8, 32, 8, 2)]),
        "sm80/large": _configs([(2, 16, 64, 8, 1), (2, 8, 16, 4, 1)]),
        "sm90/xlarge": _configs([(2, 16, 16, 8, 1)]),
        "sm80/xlarge": _configs([(2, 16, 16, 8, 1)]),
        "sm80/small-seg3": _configs([(1, 16, 16, 8, 1)]),
        "sm80/large-seg3": _configs([(1, 16, 16, 4, 1)]),
        "sm80/xlarge-seg3": _configs([(1, 16, 16, 8, 1)]),
        "sm90/xlarge-seg3": _configs([(4, 16, 16, 16, 1)]),
        "interpreter": _configs([(4, 8, 16, 4, 1)]),
    },
    "cube_bwd_dz": {
        "sm90/small": _configs([(4, 16, 64, 8, 1), (2, 32, 64, 8, 2)]),
        "sm90/large": _configs([(2, 32, 16, 8, 1)]),
        "sm80/small": _configs([(4, 8, 32, 4, 2)]),
        "sm80/large": _configs([(4, 8, 16, 8, 1)]),
        "sm90/xlarge": _configs([(2, 32, 16, 8, 1)]),
        "sm80/xlarge": _configs([(2, 16, 16, 8, 1)]),
        "sm80/small-seg3": _configs([(2, 8, 16, 8, 1)]),
        "sm80/large-seg3": _configs([(1, 16, 16, 8, 1)]),
        "sm90/large-seg3": _configs([(1, 16, 16, 8, 1)]),
        "sm80/xlarge-seg3": _configs([(1, 16, 16, 8, 1)]),
        "sm90/xlarge-seg3": _configs([(1, 16, 16, 4, 1)]),
        "interpreter": _configs([(4, 8, 16, 4, 1)]),
    },
}
for _name, _lists in _CONFIG_LISTS.items():
    _cfg.register(_name, _lists)
KERNELS = {"cube_fwd": _cube_fwd_kernel, "cube_bwd_rows": _cube_bwd_rows_kernel, "cube_bwd_dz": _cube_bwd_dz_kernel}


def _constexprs(dtype: torch.dtype, d: int, spread: float, grads: bool) -> dict:
    meta = dict(SEGS=_cfg.d_segments(d), PRECISION=_cfg.dot_precision(dtype), SHARE_SPREAD=spread,
                DOT_DTYPE=_cfg.dot_dtype(dtype))
    if grads:
        meta["GRAD_DTYPE"], meta["GRAD_PRECISION"] = _cfg.grad_dot(dtype)
    return meta


def _splits(owned: int, looped: int, device: torch.device) -> tuple:
    """(blocks per split, splits) of the looped axis."""
    splits = _cfg.split_count(owned, looped, device)
    per = triton.cdiv(looped, splits)
    return per, triton.cdiv(looped, per)


# ---------------------------------------------------------------- launchers

def cube_lse_forward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """La (I,), Lb (J,), Lc (K,) in float64 of ``tau * T`` (float32 arithmetic, log(sum) kept).

    x: (I, d), y: (J, d), z: (K, d): contiguous, one dtype (float32, bf16 or fp16), one device.
    tau: 0-dim tensor on that device, read by the kernel (no host sync).
    """
    rows = _cfg.tune_on_prefix("cube_fwd", x, y, z)
    if rows:  # first large call: tune on a prefix (cheap), then run with the cached choice
        cube_lse_forward(x[:rows], y[:rows], z[:rows], tau)
    I, D = x.shape
    J, K = y.shape[0], z.shape[0]
    device = x.device
    meta = _constexprs(x.dtype, D, FORWARD_SHARE_SPREAD, grads=False)
    out = {}

    def run(config):
        bi, bj = config.kwargs["BLOCK_I"], config.kwargs["BLOCK_J"]
        i_blocks = triton.cdiv(I, bi)
        per, splits = _splits(i_blocks, triton.cdiv(J, bj), device)
        f32 = dict(device=device, dtype=torch.float32)
        out["parts"] = (torch.empty(splits, I, **f32), torch.empty(splits, I, **f32),
                        torch.empty(i_blocks, J, **f32), torch.empty(i_blocks, J, **f32),
                        torch.empty(i_blocks * splits, K, **f32), torch.empty(i_blocks * splits, K, **f32))
        _cfg.launch(_cube_fwd_kernel, (i_blocks, splits), (x, y, z, tau, *out["parts"], I, J, K, D, per * bj),
                    config, **meta)

    run(_cfg.pick("cube_fwd", device, x.dtype, D, max(I, J, K), run))
    parts = out["parts"]
    return tuple(_cfg.lse_from_pairs(parts[n], parts[n + 1]) for n in (0, 2, 4))


def _rows_u(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> tuple[Tensor, Tensor]:
    """(Ux (I, d), Uy (J, d)) float32: ``Ux[i] = sum_j y[j] * W[i, j]``, ``Uy[j] = sum_i x[i] * W[i, j]``."""
    I, D = x.shape
    J, K = y.shape[0], z.shape[0]
    device = x.device
    meta = _constexprs(x.dtype, D, BACKWARD_SHARE_SPREAD, grads=True)
    out = {}

    def run(config):
        bi, bj = config.kwargs["BLOCK_I"], config.kwargs["BLOCK_J"]
        i_blocks, j_blocks = triton.cdiv(I, bi), triton.cdiv(J, bj)
        # About sqrt(target) splits of each axis: the workspace is (splits_i * J + splits_j * I) * d.
        side = max(1, math.isqrt(_cfg.target_programs(device)))
        i_per = triton.cdiv(i_blocks, min(side, i_blocks))
        si = triton.cdiv(i_blocks, i_per)
        j_per, sj = _splits(si, j_blocks, device)
        f32 = dict(device=device, dtype=torch.float32)
        out["parts"] = (torch.empty(sj, I, D, **f32), torch.empty(si, J, D, **f32))
        args = (x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, *out["parts"], I, J, K, D, i_per * bi, j_per * bj)
        _cfg.launch(_cube_bwd_rows_kernel, (si, sj), args, config, **meta)

    run(_cfg.pick("cube_bwd_rows", device, x.dtype, D, max(I, J, K), run))
    Ux_part, Uy_part = out["parts"]
    return Ux_part.sum(dim=0), Uy_part.sum(dim=0)


def _rows_dz(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc) -> Tensor:
    """V (K, d) float32: ``V[k] = sum_{i,j} G[i, j, k] (x[i] * y[j])``."""
    I, D = x.shape
    K = z.shape[0]
    device = x.device
    meta = _constexprs(x.dtype, D, BACKWARD_SHARE_SPREAD, grads=True)
    out = {}

    def run(config):
        bi, bk = config.kwargs["BLOCK_I"], config.kwargs["BLOCK_K"]
        k_blocks = triton.cdiv(K, bk)
        per, splits = _splits(k_blocks, triton.cdiv(I, bi), device)
        out["part"] = torch.empty(splits, K, D, device=device, dtype=torch.float32)
        args = (x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, out["part"], I, y.shape[0], K, D, per * bi)
        _cfg.launch(_cube_bwd_dz_kernel, (k_blocks, splits), args, config, **meta)

    run(_cfg.pick("cube_bwd_dz", device, x.dtype, D, max(I, y.shape[0], K), run))
    return out["part"].sum(dim=0)


def cube_lse_backward(x: Tensor, y: Tensor, z: Tensor, tau: Tensor, La: Tensor, Lb: Tensor, Lc: Tensor,
                      gLa: Tensor, gLb: Tensor, gLc: Tensor, *,
                      needs: tuple = (True, True, True, True)) -> tuple:
    """dx, dy, dz (shaped and typed like x, y, z) and dtau (0-dim, tau's dtype) of
    ``sum gLa*La + gLb*Lb + gLc*Lc`` (docs/math.md section 2 without the positive term).

    La (I,), Lb (J,), Lc (K,) and gLa, gLb, gLc (read as float32): the LSEs and their gradients, or,
    from ``symile_kernels/ops.py``, each LSE rounded down to float32 and its gradient reweighted
    (docs/math.md section 6.4); the kernels use them only as ``gL * e^(S - L)``.
    needs: which of (dx, dy, dz, dtau) the caller uses; a pass none of them needs is skipped
    and its outputs are None (dx, dy and dtau share the rows pass, dz has its own).
    """
    f32 = [t.float().contiguous() for t in (La, Lb, Lc, gLa, gLb, gLc)]
    La, Lb, Lc, gLa, gLb, gLc = f32
    rows = _cfg.tune_on_prefix("cube_bwd", x, y, z)
    if rows:  # the prefix's saved LSEs bound its logits too: G stays finite while tuning
        cube_lse_backward(x[:rows], y[:rows], z[:rows], tau, *(t[:rows] for t in f32))
    need_dx, need_dy, need_dz, need_dtau = needs
    tau32 = tau.float()
    dx = dy = dz = dtau = None
    if need_dx or need_dy or need_dtau:
        Ux, Uy = _rows_u(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc)
        dx, dy = (tau32 * Ux).to(x.dtype), (tau32 * Uy).to(y.dtype)
        dtau = (x.float() * Ux).sum().to(tau.dtype)  # = sum_{i,j,k} G T (docs/math.md section 2)
    if need_dz:
        dz = (tau32 * _rows_dz(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc)).to(z.dtype)
    return dx, dy, dz, dtau
