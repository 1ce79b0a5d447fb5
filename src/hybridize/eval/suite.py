"""One call that produces the standard report metrics of one model (see :mod:`hybridize.eval.report`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .passkey import passkey_accuracy
from .perplexity import heldout_perplexity
from .speed import cache_footprint, decode_speed

__all__ = ["evaluate_model", "model_layer_types"]


def _len_tag(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


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
    filler: str | Sequence[str] | None = None,
    ppl_lengths: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (1024, 2048),
    passkey_trials: int = 10,
    speed_prompt_len: int = 512,
    speed_new_tokens: int = 32,
    footprint_at: int = 8192,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the standard metrics on one model.

    Args:
        model: causal LM (see :mod:`hybridize.eval`).
        tokenizer: needed for pass-key; without it (or without ``filler``) pass-key is skipped.
        heldout: LongTensor [N, T] of held-out token ids, cut to each length of ``ppl_lengths`` (lengths
            > T are skipped), or ``{length: LongTensor [N, length]}``; None skips perplexity.
        filler: pass-key filler (:func:`~hybridize.eval.passkey.repeated_filler` output or essay text).
        ppl_lengths: perplexity lengths in tokens -> metric keys ``ppl_{L}``.
        passkey_lengths: pass-key context lengths in tokens -> ``passkey_{L/1024}k`` (or ``passkey_{L}``).
        passkey_trials: trials per pass-key length.
        speed_prompt_len, speed_new_tokens: :func:`decode_speed` prompt tokens and decode steps; set
            ``speed_new_tokens=0`` to skip.
        footprint_at: context length (tokens) for ``cache_bytes_at_{L/1024}k``; 0 skips the footprint.
        seed: seed for pass-key draws and random prompts.
        progress: progress bars.

    Returns:
        ``{"metrics": {key: scalar or str}, "details": {key: full result dict}}``; ``metrics`` is a row of
        :func:`~hybridize.eval.report.compare_table`.
    """
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    if heldout is not None:
        for length in ppl_lengths:
            if isinstance(heldout, Mapping):
                seqs = heldout.get(length)
            else:
                seqs = heldout[:, :length] if heldout.shape[1] >= length else None
            if seqs is None:
                continue
            r = heldout_perplexity(model, seqs, progress=progress)
            metrics[f"ppl_{length}"] = r["perplexity"]
            details[f"ppl_{length}"] = r
    if tokenizer is not None and filler is not None:
        for length in passkey_lengths:
            r = passkey_accuracy(model, tokenizer, filler, length, trials=passkey_trials, seed=seed,
                                 progress=progress)
            metrics[f"passkey_{_len_tag(length)}"] = r["accuracy"]
            details[f"passkey_{_len_tag(length)}"] = r
    if speed_new_tokens > 0:
        r = decode_speed(model, speed_prompt_len, speed_new_tokens, seed=seed)
        metrics["decode_tokens_per_s"] = r["decode_tokens_per_s"]
        details["decode_speed"] = r
    if footprint_at > 0:
        r = cache_footprint(model, at_tokens=footprint_at, seed=seed)
        metrics["cache_bytes_per_token"] = r["bytes_per_token"]
        metrics[f"cache_bytes_at_{_len_tag(footprint_at)}"] = r["bytes_at_tokens"]
        details["cache_footprint"] = r
    types = model_layer_types(model)
    if types:
        from .report import layer_types_string

        metrics["layer_types"] = layer_types_string(types)
    return {"metrics": metrics, "details": details}
