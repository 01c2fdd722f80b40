"""Device helpers over the feature segments shared by the cube and pair kernels.

The kernels split the feature axis into ``SEGS``, a compile-time tuple of one to five sizes
(powers of two from 16, tl.dot's smallest K, to ``_launch.MAX_SEGMENT``; ``_launch.d_segments``:
48 -> (32, 16), 496 -> (256, 128, 64, 32, 16)). Segment s covers features [OFF, OFF + SEGS[s]) with
OFF the sum of the sizes before it. A tile's operands and accumulators are tuples with one entry
per segment, and its products are the segments' products accumulated in one tl.dot chain, so the
executed FLOPs follow d rounded up to sum(SEGS), not to the next power of two.

Every loop over the segments is a ``tl.static_range``, unrolled at compile time: each segment
keeps its own registers, as separately written code would. Two spellings keep these helpers
compiling on Triton 3.6 as well as 3.9: a size used in a shape inside a loop is written
``tl.constexpr(SEGS[s])`` (3.6 returns a tuple argument's entries as plain ints), and a segment's
offset is the running sum ``OFF += SEGS[s]`` (a constexpr may not be declared in an unrolled loop).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(X, idx, valid, D, OFF: tl.constexpr, SEG: tl.constexpr):
    """x[idx, OFF:OFF+SEG] in x's dtype: (len(idx), SEG), 0 where masked or beyond d."""
    offs_d = OFF + tl.arange(0, SEG)
    mask = valid[:, None] & (offs_d < D)[None, :]
    return tl.load(X + idx[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _rows_t(Z, k_idx, k_valid, D, OFF: tl.constexpr, SEG: tl.constexpr):
    """z[k, OFF:OFF+SEG]^T for the k-block: (SEG, BLOCK_K) in z's dtype, 0 where masked."""
    offs_d = OFF + tl.arange(0, SEG)
    return tl.load(Z + k_idx[None, :].to(tl.int64) * D + offs_d[:, None],
                   mask=k_valid[None, :] & (offs_d < D)[:, None], other=0.0)


@triton.jit
def _store_rows(OUT, idx, valid, D, value, OFF: tl.constexpr, SEG: tl.constexpr):
    """OUT[idx, OFF:OFF+SEG] = value (float32 rows of width D), where valid."""
    offs_d = OFF + tl.arange(0, SEG)
    tl.store(OUT + idx[:, None] * D + offs_d[None, :], value, mask=valid[:, None] & (offs_d < D)[None, :])


@triton.jit
def _add_rows(OUT, idx, valid, D, value, at, start, OFF: tl.constexpr, SEG: tl.constexpr):
    """OUT[idx, OFF:OFF+SEG] = value, plus its old contents unless ``at == start``, where valid."""
    offs_d = OFF + tl.arange(0, SEG)
    ptr = OUT + idx[:, None] * D + offs_d[None, :]
    mask = valid[:, None] & (offs_d < D)[None, :]
    keep = (mask.to(tl.int32) * 0 + at) > start  # a block, not a scalar: the interpreter wants block masks
    tl.store(ptr, value + tl.load(ptr, mask=mask & keep, other=0.0), mask=mask)


@triton.jit
def _product(X, Y, i_idx, j_idx, p_valid, D, OFF: tl.constexpr, SEG: tl.constexpr):
    """x[i_p, OFF:OFF+SEG] * y[j_p, OFF:OFF+SEG]: (BLOCK_P, SEG) float32, 0 where masked or beyond d."""
    return (_load_rows(X, i_idx, p_valid, D, OFF, SEG).to(tl.float32)
            * _load_rows(Y, j_idx, p_valid, D, OFF, SEG).to(tl.float32))


# ---------------------------------------------------------------- one tuple entry per segment

@triton.jit
def seg_rows_t(Z, k_idx, k_valid, D, SEGS: tl.constexpr, DTYPE: tl.constexpr):
    """(z[k_idx, segment s]^T as DTYPE for each s): tiles (SEGS[s], len(k_idx)), 0 where masked."""
    out = ()
    OFF = 0
    for s in tl.static_range(len(SEGS)):
        out = out + (_rows_t(Z, k_idx, k_valid, D, OFF, SEGS[s]).to(DTYPE),)
        OFF += SEGS[s]
    return out


@triton.jit
def seg_products(X, Y, i_idx, j_idx, p_valid, D, SEGS: tl.constexpr, DTYPE: tl.constexpr):
    """(x[i_p] * y[j_p] over segment s, as DTYPE, for each s): float32 products (BLOCK_P, SEGS[s]),
    0 where masked."""
    out = ()
    OFF = 0
    for s in tl.static_range(len(SEGS)):
        out = out + (_product(X, Y, i_idx, j_idx, p_valid, D, OFF, SEGS[s]).to(DTYPE),)
        OFF += SEGS[s]
    return out


@triton.jit
def seg_zeros(M: tl.constexpr, SEGS: tl.constexpr):
    """(zeros (M, SEGS[s]) float32 for each s): a tile's accumulators."""
    out = ()
    for s in tl.static_range(len(SEGS)):
        out = out + (tl.zeros((M, tl.constexpr(SEGS[s])), tl.float32),)
    return out


# The dot chains below load each segment's operand right before its product, as separately written
# code would: loading every segment first keeps all of them live at once, which on sm_80/sm_90 raised
# the shared memory of the 512-wide forward kernels past sm_80's limit and the dz pass's spills.

@triton.jit
def seg_dot_t(As, Z, k_idx, k_valid, D, SEGS: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(T, zt): T = sum_s As[s] @ zt[s] (operands cast to DTYPE, float32 accumulation), the logits of a
    tile, and zt = (z[k_idx, segment s]^T for each s) in z's dtype, loaded segment by segment."""
    zt = (_rows_t(Z, k_idx, k_valid, D, 0, SEGS[0]),)
    T = tl.dot(As[0].to(DTYPE), zt[0].to(DTYPE), input_precision=PRECISION)
    OFF = SEGS[0]
    for s in tl.static_range(1, len(SEGS)):
        b = _rows_t(Z, k_idx, k_valid, D, OFF, SEGS[s])
        T = tl.dot(As[s].to(DTYPE), b.to(DTYPE), T, input_precision=PRECISION)
        zt = zt + (b,)
        OFF += SEGS[s]
    return T, zt


@triton.jit
def seg_products_dot(X, Y, i_idx, j_idx, p_valid, D, Bs, SEGS: tl.constexpr, DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr):
    """(T, xy): xy = (x[i_p] * y[j_p] over segment s, float32, for each s) built segment by segment,
    and T = sum_s xy[s] @ Bs[s] (operands cast to DTYPE, float32 accumulation)."""
    xy = (_product(X, Y, i_idx, j_idx, p_valid, D, 0, SEGS[0]),)
    T = tl.dot(xy[0].to(DTYPE), Bs[0].to(DTYPE), input_precision=PRECISION)
    OFF = SEGS[0]
    for s in tl.static_range(1, len(SEGS)):
        a = _product(X, Y, i_idx, j_idx, p_valid, D, OFF, SEGS[s])
        T = tl.dot(a.to(DTYPE), Bs[s].to(DTYPE), T, input_precision=PRECISION)
        xy = xy + (a,)
        OFF += SEGS[s]
    return T, xy


@triton.jit
def seg_rows_dot_t(A, rows, r_valid, B, cols, c_valid, D, SEGS: tl.constexpr, DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """sum_s a[rows, segment s] @ b[cols, segment s]^T (operands cast to DTYPE, float32 accumulation):
    (len(rows), len(cols)) logits, 0 where masked."""
    T = tl.dot(_load_rows(A, rows, r_valid, D, 0, SEGS[0]).to(DTYPE),
               _rows_t(B, cols, c_valid, D, 0, SEGS[0]).to(DTYPE), input_precision=PRECISION)
    OFF = SEGS[0]
    for s in tl.static_range(1, len(SEGS)):
        T = tl.dot(_load_rows(A, rows, r_valid, D, OFF, SEGS[s]).to(DTYPE),
                   _rows_t(B, cols, c_valid, D, OFF, SEGS[s]).to(DTYPE), T, input_precision=PRECISION)
        OFF += SEGS[s]
    return T


@triton.jit
def seg_accumulate(G, Bs, accs, SEGS: tl.constexpr, TRANS_B: tl.constexpr, DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """(accs[s] + G @ Bs[s] for each s), with Bs[s] transposed first when TRANS_B; G (already in
    DTYPE) and Bs[s] (cast to DTYPE) multiply with float32 accumulation."""
    out = ()
    for s in tl.static_range(len(SEGS)):
        if TRANS_B:
            b = tl.trans(Bs[s]).to(DTYPE)
        else:
            b = Bs[s].to(DTYPE)
        out = out + (tl.dot(G, b, accs[s], input_precision=PRECISION),)
    return out


@triton.jit
def seg_accumulate_rows(G, B, idx, valid, D, accs, SEGS: tl.constexpr, DTYPE: tl.constexpr,
                        PRECISION: tl.constexpr):
    """(accs[s] + G @ b[idx, segment s] for each s), each segment of b loaded (and cast to DTYPE) right
    before its product; G is already in DTYPE, accumulation in float32."""
    out = ()
    OFF = 0
    for s in tl.static_range(len(SEGS)):
        b = _load_rows(B, idx, valid, D, OFF, SEGS[s]).to(DTYPE)
        out = out + (tl.dot(G, b, accs[s], input_precision=PRECISION),)
        OFF += SEGS[s]
    return out


@triton.jit
def seg_store(OUT, idx, valid, D, values, SEGS: tl.constexpr):
    """OUT[idx, segment s] = values[s] for each s (float32 rows of width D), where valid."""
    OFF = 0
    for s in tl.static_range(len(SEGS)):
        _store_rows(OUT, idx, valid, D, values[s], OFF, SEGS[s])
        OFF += SEGS[s]
