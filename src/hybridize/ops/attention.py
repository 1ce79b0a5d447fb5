"""Softmax attention with optional HyPE query scaling (SPEC 1b), on torch SDPA.

HyPE (HypeNet paper, arXiv 2601.22156, Sec. 3.2): attention layers are NoPE and their queries are
multiplied by ``s_t = log(t + a) / log(a)`` at absolute position t, which keeps attention entropy in check
past the training length.

Dispatch (:mod:`hybridize.ops.backend`): the fast path is torch SDPA everywhere (flash / memory-efficient
kernels on CUDA, with ``is_causal=True`` when no mask is needed and ``enable_gqa=True`` instead of copying
KV heads); the reference path (:func:`eager_attention`) is plain matmul + softmax in fp32. Packed
variable-length batches (``cu_seqlens``, batch of 1) are block-diagonal causal: the fast path runs one
causal SDPA call per sequence, the reference applies the block-diagonal mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend
from .lightning import check_cu_seqlens

__all__ = ["hype_scale", "attention_mask_4d", "varlen_causal_mask", "softmax_attention", "eager_attention"]

# SDPA grew `enable_gqa` in torch 2.5; before that KV heads are repeated.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def hype_scale(positions: torch.Tensor, base: float) -> torch.Tensor:
    """HyPE factors ``log(t + a) / log(a)`` (fp32, same shape as ``positions``, which are token indices >= 0).

    Raises:
        ValueError: if ``base <= 1``.
    """
    if base <= 1:
        raise ValueError(f"HyPE base a must be > 1, got {base}")
    return torch.log(positions.float() + base) / math.log(base)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean ``[B, 1, q_len, kv_len]`` mask (True = may attend) for causal attention over a cache.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``attention_mask`` is the 2-D ``[B, kv_len]``
    padding mask (1 = real token) or None. A query whose every key is masked (a padding query) is allowed
    to see itself so SDPA stays finite; real queries never see padded keys. Returns None when there is no
    padding: :func:`softmax_attention` then applies plain causal attention aligned to the last key
    (``is_causal=True`` for a full pass, no mask at all for one decode token).

    Raises:
        ValueError: if ``attention_mask`` does not have ``kv_len`` columns.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but past + current tokens = {kv_len}; "
            "pass the mask for the whole sequence so far (as generate does)"
        )
    mask = _causal_mask(q_len, kv_len, device)[None, None]  # [1, 1, q, kv]
    mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    past = kv_len - q_len
    qpos = torch.arange(past, kv_len, device=device).view(q_len, 1)
    kpos = torch.arange(kv_len, device=device).view(1, kv_len)
    return mask | (kpos == qpos)[None, None]


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[q_len, kv_len]`` bool, causal with the queries aligned to the last keys (lower-right)."""
    past = kv_len - q_len
    qpos = torch.arange(past, kv_len, device=device).view(q_len, 1)
    kpos = torch.arange(kv_len, device=device).view(1, kv_len)
    return kpos <= qpos


def varlen_causal_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, 1, T, T]`` (bool, True = may attend) of packed sequences.

    Token i may attend to token j iff both lie in the same sequence of ``cu_seqlens`` (``[N + 1]`` int
    offsets ending at ``total``) and j <= i.

    Raises:
        ValueError: on invalid offsets (see :func:`~hybridize.ops.lightning.check_cu_seqlens`).
    """
    offsets = check_cu_seqlens(cu_seqlens, total)
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return ((seg[:, None] == seg[None, :]) & _causal_mask(total, total, device))[None, None]


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return k, v


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference softmax attention: ``softmax(q k^T * scale + mask) v`` computed in fp32.

    Arguments and result as :func:`softmax_attention` (``mask`` None = causal aligned to the last key).
    Memory is O(B Hq Tq Tk): for tests and small inputs.
    """
    k, v = _repeat_kv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is None:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def _sdpa(q, k, v, mask, scale):
    tq, tk = q.shape[2], k.shape[2]
    if mask is None and tq not in (1, tk):
        mask = _causal_mask(tq, tk, q.device)  # chunked prefill over a cache: lower-right causal
    if mask is None:
        kwargs = {"is_causal": tq > 1}
        if q.shape[1] != k.shape[1]:
            if _SDPA_GQA:
                kwargs["enable_gqa"] = True
            else:
                k, v = _repeat_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)
    # an explicit mask rules out the flash kernel; the memory-efficient one needs equal head counts
    k, v = _repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA softmax attention (SDPA fast path, :func:`eager_attention` reference).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` with Hq a multiple of Hkv (GQA: query head i reads
            KV head i // (Hq/Hkv)). Any float dtype; the result has q's dtype.
        mask: from :func:`attention_mask_4d` (bool, True = may attend), or None for causal attention with
            the queries being the last Tq of the Tk keys (``is_causal=True`` when Tq == Tk, no mask when
            Tq == 1).
        scale: softmax temperature; default ``d ** -0.5``.
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B = 1, Tq == Tk, mask None): attention is
            causal within each sequence and never crosses a boundary.

    Returns:
        ``[B, Hq, Tq, d]`` in q's dtype.

    Raises:
        ValueError: on bad ``cu_seqlens``, ``cu_seqlens`` combined with a mask or a cache, or head counts
            that do not divide.
    """
    if cu_seqlens is not None:
        if mask is not None or q.shape[2] != k.shape[2]:
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a padding mask or a KV cache")
        offsets = check_cu_seqlens(cu_seqlens, q.shape[2], q.shape[0])
        if backend.attention_backend(q.device) == "reference":
            return eager_attention(q, k, v, varlen_causal_mask(cu_seqlens, q.shape[2], q.device), scale)
        pieces = [
            _sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scale) for a, b in zip(offsets, offsets[1:])
        ]
        return torch.cat(pieces, dim=2)
    if backend.attention_backend(q.device) == "reference":
        return eager_attention(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale)
