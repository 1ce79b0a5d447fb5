"""Triton kernels of :mod:`hybridize.ops.triton_select` (imports triton: load it only through that module).

Module-level ``@triton.jit`` functions, so that both the compiler and the CPU interpreter resolve the helper
``_round`` from the module globals. Design, shapes and numerics: :mod:`hybridize.ops.triton_select`.
"""

import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr, ROUND: tl.constexpr):
    """fp32 ``x`` rounded (to nearest even) to the inputs' dtype, back in fp32; ROUND: 0 none, 1 a cast,
    2 bf16 through the bits (the CPU interpreter's fp32 -> bf16 cast truncates)."""
    if ROUND == 1:
        x = x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
    elif ROUND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _stats_kernel(
    q_ptr, k_ptr, vis_ptr, m_ptr, l_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skn, skd,
    Hq, Tq, Nc, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr,
    ROUND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    bi = pid_bh // Hq
    hq = pid_bh % Hq
    hk = hq // G
    t = pid_q * BQ + tl.arange(0, BQ)
    t_ok = t < Tq
    vis = tl.load(vis_ptr + t, mask=t_ok, other=0)
    # visible is non-decreasing: the tile's last query sees the most windows
    hi = tl.minimum(tl.load(vis_ptr + tl.minimum(pid_q * BQ + BQ, Tq) - 1), Nc)
    dd = tl.arange(0, BD)
    d_ok = dd < D
    # int64 head offsets: q of 32 heads x 1M tokens x 128 has more than 2**31 elements
    q_head = q_ptr + bi.to(tl.int64) * sqb + hq.to(tl.int64) * sqh
    q = tl.load(
        q_head + t[:, None] * sqt + dd[None, :] * sqd,
        mask=t_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BQ], -1.0e30, tl.float32)
    l = tl.zeros([BQ], tl.float32)
    for n0 in range(0, hi, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < Nc
        kt = tl.load(
            k_ptr + bi.to(tl.int64) * skb + hk.to(tl.int64) * skh + n[None, :] * skn + dd[:, None] * skd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC)
        s = _round(s, q_ptr.dtype.element_ty, ROUND) * scale
        s = tl.where(n_ok[None, :] & (n[None, :] < vis[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    # a query with no visible window: m = 0, l = 1 (finite; pass 2 masks all its windows anyway)
    seen = l > 0
    m = tl.where(seen, m, 0.0)
    l = tl.where(seen, l, 1.0)
    row = pid_bh * Tq + t
    tl.store(m_ptr + row, m, mask=t_ok)
    tl.store(l_ptr + row, l, mask=t_ok)


@triton.jit
def _pool_kernel(
    q_ptr, k_ptr, vis_ptr, m_ptr, l_ptr, out_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skn, skd,
    Hkv, Tq, Nc, NB, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BB: tl.constexpr,
    PB: tl.constexpr, PB2: tl.constexpr, OVER: tl.constexpr, NSHIFT: tl.constexpr,
    ROUND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_b = tl.program_id(2)
    bi = pid_bh // Hkv
    hk = pid_bh % Hkv
    t = pid_q * BQ + tl.arange(0, BQ)
    t_ok = t < Tq
    vis = tl.load(vis_ptr + t, mask=t_ok, other=0)
    # visible is non-decreasing: the tile's last query sees the most windows
    hi = tl.minimum(tl.load(vis_ptr + tl.minimum(pid_q * BQ + BQ, Tq) - 1), Nc)
    blk = pid_b * BB + tl.arange(0, BB)
    col = tl.arange(0, PB2)
    dd = tl.arange(0, BD)
    d_ok = dd < D
    # first window any block of the tile pools; a tile past every visible window is all zeros
    g_hi = tl.where(pid_b * BB * PB - OVER < hi, G, 0)
    best = tl.zeros([BQ, BB], tl.float32)
    for s in tl.static_range(NSHIFT + 1):
        # shift s: the own windows of block (b - s); keep columns >= PB*s - OVER (all of them for s = 0)
        w = PB * (blk[:, None] - s) + col[None, :]  # [BB, PB2]
        keep = (col[None, :] >= PB * s - OVER) & (col[None, :] < PB) & (w >= 0) & (w < Nc)
        w = tl.reshape(w, [BB * PB2])
        keep = tl.reshape(keep, [BB * PB2])
        kt = tl.load(
            k_ptr + bi.to(tl.int64) * skb + hk.to(tl.int64) * skh + w[None, :] * skn + dd[:, None] * skd,
            mask=keep[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        visible = keep[None, :] & (w[None, :] < vis[:, None])  # [BQ, BB*PB2]
        acc = tl.zeros([BQ, BB * PB2], tl.float32)
        for h in range(0, g_hi):
            hq = hk * G + h
            q = tl.load(  # int64 head offset, as in _stats_kernel
                q_ptr + bi.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + t[:, None] * sqt + dd[None, :] * sqd,
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            row = (bi * Hkv * G + hq) * Tq + t
            m = tl.load(m_ptr + row, mask=t_ok, other=0.0)
            l = tl.load(l_ptr + row, mask=t_ok, other=1.0)
            sc = tl.dot(q, kt, input_precision=PREC)
            sc = _round(sc, q_ptr.dtype.element_ty, ROUND) * scale
            acc += tl.where(visible, tl.exp(sc - m[:, None]) / l[:, None], 0.0)
        best = tl.maximum(best, tl.max(tl.reshape(acc, [BQ, BB, PB2]), axis=2))
    out = out_ptr + (pid_bh * Tq + t[:, None]).to(tl.int64) * NB + blk[None, :]  # > 2**31 at 1M tokens
    tl.store(out, best, mask=t_ok[:, None] & (blk[None, :] < NB))
