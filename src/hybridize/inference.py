"""Inference helpers: prefill a long prompt in chunks with bounded activation memory.

A hybrid model's cache is small for its Lightning layers (a fixed ``[B, H, d, d]`` state) and grows
linearly only for its few attention layers, but one forward over a long prompt still materialises every
layer's activations and ``[B, T, vocab]`` logits. :func:`chunked_prefill` feeds the prompt through the
cache ``chunk_size`` tokens at a time and keeps only the last position's logits, so peak activation memory
is set by the chunk, not the prompt. The result continues with ``model.generate(..., past_key_values=cache)``
or with plain forward calls.
"""

from __future__ import annotations

import torch

from .models.cache import HybridCache

__all__ = ["chunked_prefill"]


@torch.no_grad()
def chunked_prefill(
    model,
    input_ids: torch.Tensor,
    chunk_size: int = 2048,
    attention_mask: torch.Tensor | None = None,
    cache: HybridCache | None = None,
) -> tuple[torch.Tensor, HybridCache]:
    """Run ``input_ids`` through ``model`` in chunks, carrying a :class:`HybridCache` between them.

    Equal (to float rounding) to one forward over the whole prompt: Lightning states and KV entries are
    carried exactly, and left padding is handled as in the model's forward.

    Args:
        model: a :class:`~hybridize.models.HybridForCausalLM` (any model whose forward takes ``cache=``,
            ``use_cache=``, ``attention_mask=`` and ``logits_to_keep=`` and returns ``logits``).
        input_ids: ``[B, T]`` int64 token ids, T >= 1.
        chunk_size: tokens per forward call (>= 1); activation memory is proportional to it.
        attention_mask: ``[B, past + T]`` with 1 for real tokens and 0 for left padding, or None (no padding).
            ``past`` is the length already in ``cache`` (0 without one).
        cache: a cache to continue from (e.g. an earlier chunked_prefill), or None for a fresh one.

    Returns:
        ``(last_logits, cache)``: ``last_logits`` ``[B, vocab]`` are the logits of the last prompt position
        (in the model's dtype); ``cache`` holds the whole prompt.

    Raises:
        ValueError: on ``chunk_size < 1``, an empty or non-2-D ``input_ids``, or a mask whose shape does not
            match ``[B, past + T]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1, got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if cache is None:
        cache = HybridCache(model.config.layer_types)
    past = cache.get_seq_length()
    if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
        raise ValueError(
            f"attention_mask must have shape [batch, past + tokens] = {(b, past + t)}, got {tuple(attention_mask.shape)}"
        )
    logits = None
    for start in range(0, t, chunk_size):
        end = min(start + chunk_size, t)
        mask = attention_mask[:, : past + end] if attention_mask is not None else None
        out = model(input_ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits, cache
