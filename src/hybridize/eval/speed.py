"""Decode speed and cache footprint of a causal LM with a cache.

The model contract: ``forward(input_ids, attention_mask, past_key_values | cache, use_cache)`` returns
``.logits`` and the updated cache (``.past_key_values``, or ``.cache`` in transformers >= 5.24). The cache
is either a transformers ``DynamicCache`` (the teacher) or any object with ``nbytes() -> int`` (ours).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._common import accepts_kwarg, cache_kwarg_name, model_device, output_cache, output_logits, timed_clock

__all__ = ["decode_speed", "cache_nbytes", "cache_footprint"]


def _tensor_nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a generation cache (tensor storage only, no Python overhead).

    Resolution order:
      1. ``cache.nbytes()`` when the object has it (our hybrid cache);
      2. a transformers cache with ``.layers`` (transformers >= 4.56, incl. 5.17 and 5.24): the sum of
         each layer's ``keys`` and ``values`` tensors (empty or uninitialised layers count 0; a static
         layer counts its whole preallocated buffer);
      3. the legacy ``key_cache`` / ``value_cache`` lists of older transformers caches;
      4. a legacy tuple of per-layer ``(key, value)`` tensor tuples.

    Returns:
        int, bytes.

    Raises:
        TypeError: for any other object (the message names its type).
    """
    fn = getattr(cache, "nbytes", None)
    if callable(fn):
        return int(fn())
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(_tensor_nbytes(getattr(layer, "keys", None)) + _tensor_nbytes(getattr(layer, "values", None))
                   for layer in layers)
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return sum(_tensor_nbytes(t) for t in list(cache.key_cache) + list(cache.value_cache))
    if isinstance(cache, (tuple, list)) and all(isinstance(x, (tuple, list)) for x in cache):
        return sum(_tensor_nbytes(t) for layer in cache for t in layer)
    raise TypeError(
        f"cannot measure a cache of type {type(cache).__module__}.{type(cache).__qualname__}: "
        "expected an object with nbytes(), a transformers Cache with .layers, or legacy tuples"
    )


def _random_prompt(batch_size: int, length: int, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=gen).to(device)


def _vocab(model: nn.Module, vocab_size: int | None) -> int:
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is None or vocab_size < 1:
        raise ValueError("vocab_size not given and model.config.vocab_size is missing")
    return int(vocab_size)


def _prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """One cached forward over the prompt, keeping only the last position's logits where supported."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    if accepts_kwarg(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


def _step(model: nn.Module, cache_arg: str, token: torch.Tensor, mask: torch.Tensor, cache: Any) -> Any:
    return model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_arg: cache})


def _timed_pass(
    model: nn.Module, cache_arg: str, ids: torch.Tensor, new_tokens: int, device: torch.device, keep_tokens: bool
) -> tuple[float, float, Any, list[torch.Tensor]]:
    """Prefill ``ids`` then decode ``new_tokens`` greedy steps; returns (prefill s, decode s, cache, fed tokens)."""
    batch_size, prompt_len = ids.shape
    mask = torch.ones(batch_size, prompt_len + new_tokens, dtype=torch.long, device=device)
    t0 = timed_clock(device)
    out = _prefill(model, ids, mask[:, :prompt_len])
    tok = output_logits(out)[:, -1].argmax(-1, keepdim=True)
    t1 = timed_clock(device)
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no cache with use_cache=True")
    del out
    fed: list[torch.Tensor] = []
    t2 = timed_clock(device)
    for i in range(new_tokens):
        if keep_tokens:
            fed.append(tok)
        out = _step(model, cache_arg, tok, mask[:, : prompt_len + i + 1], cache)
        cache = output_cache(out)
        tok = output_logits(out)[:, -1].argmax(-1, keepdim=True)
    t3 = timed_clock(device)
    return t1 - t0, t3 - t2, cache, fed


@torch.inference_mode()
def decode_speed(
    model: nn.Module,
    prompt_len: int,
    new_tokens: int,
    batch_size: int = 1,
    vocab_size: int | None = None,
    seed: int = 0,
    warmup: str | bool = "full",
    return_tokens: bool = False,
) -> dict[str, Any]:
    """Time one prefill and a greedy token-by-token decode through the model's cache.

    A random prompt [batch_size, prompt_len] (token ids drawn from ``torch.Generator().manual_seed(seed)``)
    is prefilled once with ``use_cache=True`` (only the last logits kept when the forward accepts
    ``logits_to_keep``); then ``new_tokens`` forward calls each feed the previous greedy (argmax) token
    of shape [batch_size, 1], a growing all-ones ``attention_mask`` and the cache. Clocks are
    ``time.perf_counter`` read after synchronising the device (CUDA).

    Warm-up matters on GPU: with torch's cuDNN SDPA backend (Hopper) every new KV length builds a new
    plan, so the first pass over a set of lengths ran about 9x slower per decode step (H200, measured:
    48 ms vs 5.7 ms per step for an 8-layer model at 4K). ``warmup="full"`` (default) therefore runs the
    identical prefill + decode once untimed and reports its numbers as ``cold_*``; ``"short"`` only runs
    a 16-token prefill + 2 steps (lazy init); ``False``/``"none"`` runs nothing (cold numbers only).

    Args:
        model: causal LM (eval mode for the call).
        prompt_len: prompt tokens (>= 1).
        new_tokens: decode steps to time (>= 1).
        batch_size: sequences decoded together (>= 1).
        vocab_size: range of random token ids; default ``model.config.vocab_size``.
        seed: seed of the random prompt.
        warmup: ``"full"`` (True), ``"short"`` or ``"none"`` (False); see above.
        return_tokens: also return ``prompt_ids`` (LongTensor [batch_size, prompt_len]) and ``tokens``
            (LongTensor [batch_size, new_tokens], the greedy tokens fed to the decode steps, CPU) for
            checking the decode against ``model.generate``.

    Returns:
        dict with ``prefill_seconds`` (float, s, time to the first token's logits), ``decode_seconds``
        (float, s, all ``new_tokens`` steps), ``decode_tokens_per_s`` (``batch_size * new_tokens /
        decode_seconds``, tokens/s over the batch), ``decode_ms_per_step`` (ms per step),
        ``prefill_tokens_per_s``, ``prompt_len``, ``new_tokens``, ``batch_size``, ``warmup``,
        ``cache_bytes`` (bytes after decoding, None when the cache cannot be measured),
        ``peak_memory_bytes`` (CUDA only, else None) and, with ``warmup="full"``,
        ``cold_prefill_seconds`` and ``cold_decode_ms_per_step`` from the untimed pass.

    Raises:
        ValueError: ``prompt_len``, ``new_tokens`` or ``batch_size`` < 1, bad ``warmup``, or no vocabulary size.
        RuntimeError: the model returned no cache with ``use_cache=True``.
    """
    if prompt_len < 1 or new_tokens < 1 or batch_size < 1:
        raise ValueError(f"prompt_len, new_tokens and batch_size must be >= 1, got {prompt_len}, {new_tokens}, {batch_size}")
    mode = ("full" if warmup else "none") if isinstance(warmup, bool) else warmup
    if mode not in ("full", "short", "none"):
        raise ValueError(f'warmup must be "full", "short", "none" or a bool, got {warmup!r}')
    vocab = _vocab(model, vocab_size)
    device = model_device(model)
    cache_arg = cache_kwarg_name(model)
    ids = _random_prompt(batch_size, prompt_len, vocab, seed, device)
    cold: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        if mode == "short":
            w_ids = _random_prompt(batch_size, min(prompt_len, 16), vocab, seed + 1, device)
            _timed_pass(model, cache_arg, w_ids, 2, device, False)
        elif mode == "full":
            p_s, d_s, cache, _ = _timed_pass(model, cache_arg, ids, new_tokens, device, False)
            del cache
            cold = {"cold_prefill_seconds": p_s, "cold_decode_ms_per_step": 1000.0 * d_s / new_tokens}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill_s, decode_s, cache, fed = _timed_pass(model, cache_arg, ids, new_tokens, device, return_tokens)
        try:
            nbytes: int | None = cache_nbytes(cache)
        except TypeError:
            nbytes = None
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        model.train(was_training)

    extra = {"prompt_ids": ids.cpu(), "tokens": torch.cat(fed, dim=1).cpu()} if return_tokens else {}
    return {
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s if decode_s > 0 else float("inf"),
        "decode_ms_per_step": 1000.0 * decode_s / new_tokens,
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s if prefill_s > 0 else float("inf"),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "warmup": mode,
        "cache_bytes": nbytes,
        "peak_memory_bytes": peak,
        **cold,
        **extra,
    }


@torch.inference_mode()
def cache_footprint(
    model: nn.Module,
    lengths: tuple[int, int] = (256, 512),
    at_tokens: int = 8192,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Cache bytes per token and fixed bytes, fitted from prefills at two lengths (batch 1).

    The cache after prefilling ``lengths[0]`` and ``lengths[1]`` random tokens is measured with
    :func:`cache_nbytes`; ``bytes_per_token = (b1 - b0) / (l1 - l0)`` and ``fixed_bytes = b0 -
    bytes_per_token * l0``; ``bytes_at_tokens = fixed_bytes + bytes_per_token * at_tokens``. This is exact
    for caches whose size is linear in length (full-attention KV grows per token; Lightning/RNN states
    are fixed). It is NOT exact for sliding-window caches, for caches preallocated to a maximum length,
    or for sparse caches that keep extra per-block data beyond the lengths measured: measure those at
    ``at_tokens`` directly.

    Args:
        model: causal LM returning its cache with ``use_cache=True``.
        lengths: two distinct prompt lengths in tokens (>= 1).
        at_tokens: context length to extrapolate to, tokens.
        vocab_size: range of random token ids; default ``model.config.vocab_size``.
        seed: seed of the random prompts.

    Returns:
        dict with ``bytes_per_token`` (float, bytes), ``fixed_bytes`` (float, bytes), ``bytes_at_tokens``
        (int, bytes), ``at_tokens`` and ``measured`` ({length: bytes}).

    Raises:
        ValueError: lengths not two distinct positive ints, ``at_tokens`` < 1, or no vocabulary size.
        RuntimeError: the model returned no cache.
        TypeError: the cache type cannot be measured (see :func:`cache_nbytes`).
    """
    if len(lengths) != 2 or lengths[0] == lengths[1] or min(lengths) < 1:
        raise ValueError(f"lengths must be two distinct positive token counts, got {lengths}")
    if at_tokens < 1:
        raise ValueError(f"at_tokens must be >= 1, got {at_tokens}")
    vocab = _vocab(model, vocab_size)
    device = model_device(model)
    was_training = model.training
    model.eval()
    measured: dict[int, int] = {}
    try:
        for i, length in enumerate(lengths):
            ids = _random_prompt(1, int(length), vocab, seed + i, device)
            out = _prefill(model, ids, torch.ones_like(ids))
            cache = output_cache(out)
            if cache is None:
                raise RuntimeError(f"{type(model).__name__} returned no cache with use_cache=True")
            measured[int(length)] = cache_nbytes(cache)
            del out, cache
    finally:
        model.train(was_training)
    (l0, b0), (l1, b1) = sorted(measured.items())
    per_token = (b1 - b0) / (l1 - l0)
    fixed = b0 - per_token * l0
    return {
        "bytes_per_token": per_token,
        "fixed_bytes": fixed,
        "bytes_at_tokens": int(round(fixed + per_token * at_tokens)),
        "at_tokens": at_tokens,
        "measured": measured,
    }
