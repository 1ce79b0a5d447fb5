"""One call that produces the standard report metrics of one model (see :mod:`hybridize.eval.report`)."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .passkey import passkey_accuracy
from .perplexity import heldout_perplexity
from .speed import cache_footprint, decode_speed

__all__ = ["evaluate_model", "model_layer_types", "passkey_key"]

log = logging.getLogger("hybridize")

#: the pass-key filler form whose metric keys carry no form name (``passkey_1k``), as before forms existed
DEFAULT_PASSKEY_FORM = "repeated"


def _len_tag(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def passkey_key(form: str, length: int) -> str:
    """Metric key of pass-key accuracy at ``length`` tokens with filler ``form``.

    The repeated-filler form keeps the historical keys (``passkey_1k``, ``passkey_128``); any other
    form is named in the key: ``passkey_essay_32k``.
    """
    tag = _len_tag(int(length))
    return f"passkey_{tag}" if form == DEFAULT_PASSKEY_FORM else f"passkey_{form}_{tag}"


def _timed(fn, key: str, what: str):
    start = time.perf_counter()
    r = fn()
    r["seconds"] = time.perf_counter() - start
    log.info("%s: %s in %.1f s", key, what.format(**r), r["seconds"])
    return r


def model_layer_types(model: nn.Module) -> list[str]:
    """``model.config.layer_types`` when present, else ``["attention"] * num_hidden_layers`` (a plain
    Transformer), else an empty list."""
    cfg = getattr(model, "config", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    n = getattr(cfg, "num_hidden_layers", None)
    return ["attention"] * int(n) if n else []


def evaluate_model(
    model: nn.Module,
    tokenizer: Any = None,
    heldout: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
    filler: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    ppl_lengths: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (1024, 2048),
    passkey_trials: int = 10,
    speed_prompt_len: int = 512,
    speed_new_tokens: int = 32,
    footprint_at: int = 8192,
    seed: int = 0,
    progress: bool = True,
    bucket_edges: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the standard metrics on one model.

    Args:
        model: causal LM (see :mod:`hybridize.eval`).
        tokenizer: needed for pass-key; without it (or without ``filler``) pass-key is skipped.
        heldout: LongTensor [N, T] of held-out token ids, cut to each length of ``ppl_lengths`` (lengths
            > T are skipped), or ``{length: LongTensor [N, length]}``; None skips perplexity.
        filler: pass-key filler (:func:`~hybridize.eval.passkey.repeated_filler` output or essay text),
            or ``{form: filler}`` to run pass-key once per filler form (e.g. ``{"repeated": ...,
            "essay": ...}``); see :func:`passkey_key` for the metric keys of each form.
        ppl_lengths: perplexity lengths in tokens -> metric keys ``ppl_{L}``.
        passkey_lengths: pass-key context lengths in tokens -> ``passkey_{L/1024}k`` (or ``passkey_{L}``)
            for a single filler or the ``repeated`` form, ``passkey_{form}_{L/1024}k`` for other forms.
        passkey_trials: trials per pass-key length.
        speed_prompt_len, speed_new_tokens: :func:`decode_speed` prompt tokens and decode steps; set
            ``speed_new_tokens=0`` to skip.
        footprint_at: context length (tokens) for ``cache_bytes_at_{L/1024}k``; 0 skips the footprint.
        seed: seed for pass-key draws and random prompts.
        progress: progress bars (tqdm, one per perplexity length and per pass-key length and form).
        bucket_edges: increasing token positions, e.g. ``[0, 2048, 8192, 16384, 32768]``: at every
            perplexity length, ``details["ppl_{L}"]["buckets"]`` holds the mean loss (nats/token) of the
            predicted tokens in each position bucket (see
            :func:`~hybridize.eval.perplexity.heldout_perplexity`). The last bucket ends at the longest
            perplexity length, and every length reports the same buckets: those starting at or beyond
            ``L`` have ``tokens`` 0 and ``loss`` None.

    Each metric logs one line (logger ``hybridize``, INFO) with its value and elapsed seconds; the
    seconds are also in its details dict (``seconds``).

    Returns:
        ``{"metrics": {key: scalar or str}, "details": {key: full result dict}}``; ``metrics`` is a row of
        :func:`~hybridize.eval.report.compare_table`.

    Raises:
        ValueError: as :func:`heldout_perplexity` (e.g. bad ``bucket_edges``) and
            :func:`~hybridize.eval.passkey.passkey_accuracy`.
    """
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    edges = None
    if bucket_edges is not None:
        # close the last bucket at the longest length, so every length reports the same buckets
        edges = [int(e) for e in bucket_edges]
        if ppl_lengths and edges and max(ppl_lengths) > edges[-1]:
            edges.append(int(max(ppl_lengths)))
    if heldout is not None:
        for length in ppl_lengths:
            if isinstance(heldout, Mapping):
                seqs = heldout.get(length)
            else:
                seqs = heldout[:, :length] if heldout.shape[1] >= length else None
            if seqs is None:
                continue
            key = f"ppl_{length}"
            r = _timed(lambda: heldout_perplexity(model, seqs, bucket_edges=edges, progress=progress),
                       key, "perplexity {perplexity:.4g} on {sequences} x {seq_len} tokens")
            metrics[key] = r["perplexity"]
            details[key] = r
    if tokenizer is not None and filler is not None:
        forms = filler if isinstance(filler, Mapping) else {DEFAULT_PASSKEY_FORM: filler}
        for form, text in forms.items():
            for length in passkey_lengths:
                key = passkey_key(form, length)
                r = _timed(lambda: passkey_accuracy(model, tokenizer, text, length, trials=passkey_trials,
                                                    seed=seed, progress=progress, desc=key),
                           key, "accuracy {accuracy:.3f} ({correct}/{trials})")
                if isinstance(filler, Mapping):
                    r["form"] = form
                metrics[key] = r["accuracy"]
                details[key] = r
    if speed_new_tokens > 0:
        r = _timed(lambda: decode_speed(model, speed_prompt_len, speed_new_tokens, seed=seed),
                   "decode_tokens_per_s", "{decode_tokens_per_s:.1f} tokens/s")
        metrics["decode_tokens_per_s"] = r["decode_tokens_per_s"]
        details["decode_speed"] = r
    if footprint_at > 0:
        r = _timed(lambda: cache_footprint(model, at_tokens=footprint_at, seed=seed),
                   "cache_footprint", "{bytes_per_token} bytes/token")
        metrics["cache_bytes_per_token"] = r["bytes_per_token"]
        metrics[f"cache_bytes_at_{_len_tag(footprint_at)}"] = r["bytes_at_tokens"]
        details["cache_footprint"] = r
    types = model_layer_types(model)
    if types:
        from .report import layer_types_string

        metrics["layer_types"] = layer_types_string(types)
    return {"metrics": metrics, "details": details}
