"""Softmax attention with optional HyPE query scaling (SPEC 1b), on torch SDPA.

HyPE (HypeNet paper, arXiv 2601.22156, Sec. 3.2): attention layers are NoPE and their queries are
multiplied by ``s_t = log(t + a) / log(a)`` at absolute position t, which keeps attention entropy in check
past the training length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hype_scale", "attention_mask_4d", "softmax_attention"]


def hype_scale(positions: torch.Tensor, base: float) -> torch.Tensor:
    """HyPE factors ``log(t + a) / log(a)`` (fp32, same shape as ``positions``, which are token indices >= 0).

    Raises:
        ValueError: if ``base <= 1``.
    """
    if base <= 1:
        raise ValueError(f"HyPE base a must be > 1, got {base}")
    return torch.log(positions.float() + base) / torch.log(torch.tensor(float(base)))


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean ``[B, 1, q_len, kv_len]`` mask (True = may attend) for causal attention over a cache.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``attention_mask`` is the 2-D ``[B, kv_len]``
    padding mask (1 = real token) or None. A query whose every key is masked (a padding query) is allowed
    to see itself so SDPA stays finite; real queries never see padded keys. Returns None when plain causal
    attention from position 0 suffices (``is_causal=True`` in SDPA).

    Raises:
        ValueError: if ``attention_mask`` does not have ``kv_len`` columns.
    """
    if attention_mask is None and q_len == kv_len:
        return None
    past = kv_len - q_len
    qpos = torch.arange(past, kv_len, device=device).view(q_len, 1)
    kpos = torch.arange(kv_len, device=device).view(1, kv_len)
    mask = (kpos <= qpos)[None, None]  # [1, 1, q, kv]
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} columns but past + current tokens = {kv_len}; "
                "pass the mask for the whole sequence so far (as generate does)"
            )
        mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | (kpos == qpos)[None, None]
    return mask


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal GQA softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` with Hq a multiple of Hkv (GQA: query head i reads
            KV head i // (Hq/Hkv)).
        mask: from :func:`attention_mask_4d`; None means causal with Tq == Tk.
        scale: softmax temperature; default ``d ** -0.5``.

    Returns:
        ``[B, Hq, Tq, d]`` in q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
