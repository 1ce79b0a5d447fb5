"""Fused Triton block scoring for InfLLM-V2 selection (SPEC 1c, steps 2-5 of :mod:`.sparse_attention`).

:func:`fused_block_scores` returns exactly what the torch reference
:func:`hybridize.ops.sparse_attention._window_block_scores` returns -- per query and KV head, the per-head
softmax over the visible compressed-key windows, summed over the ``g`` query heads of the GQA group and
max-pooled onto key blocks -- without materialising the ``[B, Hkv, g, Tq, Nc]`` logits/probabilities. Its
memory is the output ``[B, Hkv, Tq, n_blocks]`` (fp32) plus two ``[B, Hq, Tq]`` fp32 softmax statistics.

Two passes (flash-attention style):

1. ``_stats_kernel``, one program per (batch, query head, tile of ``BQ`` queries): the softmax statistics of
   ``scale * q . Kc_j`` over the visible windows ``j < visible[t]``, i.e. the running max ``m`` and the sum
   ``l = sum_j exp(s_j - m)``, with an online max/sum over tiles of ``BN`` windows. Only the windows the
   tile's last query can see are read (causal).
2. ``_pool_kernel``, one program per (batch * KV head, tile of ``BQ`` queries, tile of ``BB`` blocks). Block
   ``b`` pools the windows ``j = per_block*b + o`` for ``o`` in ``[-(r-1), per_block)`` (``r =
   kernel_size // kernel_stride``, ``per_block = block_size // kernel_stride``): that is the window range
   of ``_pool_to_blocks`` (its left padding of ``r - 1``). They are evaluated as ``1 + ceil((r-1) /
   per_block)`` *shifted* window tiles: shift ``s`` holds the ``per_block`` own windows of block ``b - s``
   (laid out ``[BB, PB2]``, ``PB2`` = ``per_block`` rounded up to a power of two, extra columns masked), of
   which shift 0 keeps all and shift ``s >= 1`` keeps those at or after ``per_block*b - (r-1)``. For each
   shift and each of the ``g`` heads the ``[BQ, BB*PB2]`` score tile is one ``tl.dot``;
   ``exp(s - m) / l`` (0 where the window is not visible, does not exist or is not kept) is summed over
   the heads in head order, and the max over the ``PB2`` columns of each block, then over the shifts, is
   the pooled block score (0 where no window counts, as in the reference; probabilities are >= 0). Block
   tiles that start after every window the query tile can see are written as zeros without a dot.

Numerics: fp32 accumulation; for bf16/fp16 inputs the dot product is rounded to the input dtype before the
scale, as the reference's ``torch.matmul`` in that dtype does, so both see the same logits. fp32 inputs use
an IEEE fp32 dot (TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch would). The
result matches the reference to fp32 rounding (different softmax summation order), not bit for bit. Ties:
a window shared by two neighbouring blocks is computed by the same arithmetic for both, so equal pooled
scores stay exactly equal and the selection's tie rule (earlier block wins) sees the same ties as the
reference.

Status: checked against the reference in Triton's CPU interpreter (``TRITON_INTERPRET=1``, CI) and on an
H200 (``tests/test_triton_select.py``, fp32 and bf16: passed 2026-11-30); 350 ms against 2,168 ms for the torch
scoring at 256K queries (``benchmarks/results/sparse_attention_h200.json``). :mod:`.sparse_attention` dispatches to it
on CUDA when triton imports and the reference is not forced (:func:`hybridize.ops.backend.force_reference`).

triton is imported lazily (importing this module does not import it); the kernels are built on first use,
so ``TRITON_INTERPRET`` must be set before the first call, not before the import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

__all__ = ["triton_available", "fused_block_scores"]

#: query tile of both passes; window tile of pass 1; window columns of one pass-2 dot (BB * PB2)
_BQ, _BN, _BW = 64, 64, 64


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (probed once with find_spec; triton is not imported)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernels():
    """``(stats_kernel, pool_kernel)``; imports triton (first call only)."""
    from . import _triton_select_kernels as k

    return k._stats_kernel, k._pool_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fused_block_scores(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    visible: torch.Tensor,
    n_blocks: int,
    cfg,
    scale: float,
) -> torch.Tensor:
    """Group-summed, block-pooled window scores (SPEC 1c), fused: equals ``_window_block_scores``.

    Args:
        q: queries ``[B, Hq, Tq, d]``, fp32/bf16/fp16, any strides, on CUDA (or on CPU under
            ``TRITON_INTERPRET=1``).
        compressed_k: ``[B, Hkv, Nc, d]`` compressed keys (:func:`~.sparse_attention.compress_keys`), same
            dtype and device as ``q``; ``Hkv`` divides ``Hq``.
        visible: ``[Tq]`` integer count of windows each query may use (window ``j`` iff ``j < visible[t]``;
            counts above ``Nc`` are clamped to ``Nc``); non-decreasing (queries in position order, as
            ``_visible_windows`` of consecutive positions gives): a tile reads up to its last query's count.
        n_blocks: key blocks to score.
        cfg: the :class:`~.sparse_attention.SparseConfig` (kernel_size, kernel_stride, block_size).
        scale: softmax scale of the scores.

    Returns:
        fp32 ``[B, Hkv, Tq, n_blocks]``, contiguous: for KV head ``h`` and block ``b``, the max over the
        windows ``j`` overlapping block ``b`` (``j`` in ``[b*bs/stride - (ks/stride - 1), (b+1)*bs/stride)``)
        of ``sum over the g query heads of h`` of ``softmax_j(scale * q . Kc_j)`` restricted to the visible
        windows; 0 where no visible window overlaps the block or the query sees no window.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices.
    """
    b, hq, tq, d = q.shape
    bk, hkv, nc, dk = compressed_k.shape
    if (bk, dk) != (b, d) or hkv == 0 or hq % hkv or visible.shape != (tq,):
        raise ValueError(
            f"expected q [B, Hq, Tq, d], compressed_k [B, Hkv, Nc, d] with Hkv | Hq and visible [Tq]; got "
            f"{tuple(q.shape)}, {tuple(compressed_k.shape)}, {tuple(visible.shape)}"
        )
    if q.dtype != compressed_k.dtype or q.device != compressed_k.device:
        raise ValueError(f"q and compressed_k differ: {q.dtype}/{q.device} vs {compressed_k.dtype}/{compressed_k.device}")
    out = torch.zeros(b, hkv, tq, n_blocks, device=q.device, dtype=torch.float32)
    if b == 0 or tq == 0 or n_blocks == 0 or nc == 0:
        return out
    g = hq // hkv
    r = cfg.kernel_size // cfg.kernel_stride
    per_block = cfg.block_size // cfg.kernel_stride
    pb2 = _next_pow2(per_block)
    bb = max(1, _BW // pb2)
    bd = max(16, _next_pow2(d))
    half = q.dtype != torch.float32
    # Triton's CPU interpreter multiplies bf16 as raw uint16 bits: give its dot fp32 operands (exact
    # products of bf16/fp16 values, fp32 sums: what the GPU's fp32-accumulating MMA computes)
    upcast = half and not q.is_cuda
    rnd = 0 if not half else 2 if (upcast and q.dtype == torch.bfloat16) else 1
    # the precision choice applies to fp32 operands only (half operands: Triton's default MMA)
    prec = None if half else "tf32" if (q.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    vis = visible.to(device=q.device, dtype=torch.int32).contiguous()
    m = torch.empty(b, hq, tq, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    stats_kernel, pool_kernel = _kernels()
    strides = (*q.stride(), *compressed_k.stride())
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        stats_kernel[(b * hq, -(-tq // _BQ))](
            q, compressed_k, vis, m, l, *strides, hq, tq, nc, float(scale),
            G=g, D=d, BD=bd, BQ=_BQ, BN=_BN, ROUND=rnd, PREC=prec, UPCAST=upcast,
        )  # fmt: skip
        pool_kernel[(b * hkv, -(-tq // _BQ), -(-n_blocks // bb))](
            q, compressed_k, vis, m, l, out, *strides, hkv, tq, nc, n_blocks, float(scale),
            G=g, D=d, BD=bd, BQ=_BQ, BB=bb, PB=per_block, PB2=pb2, OVER=r - 1, NSHIFT=-(-(r - 1) // per_block),
            ROUND=rnd, PREC=prec, UPCAST=upcast,
        )  # fmt: skip
    return out
