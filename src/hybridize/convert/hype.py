"""Choosing HyPE's ``a`` after training (SPEC 1b, last step of SPEC 2).

Attention layers scale their queries by ``s_t = log(t + a) / log(a)`` at position t. The paper picks ``a``
by minimising the loss on long held-out documents (a = 500 / 600 / 900 for its 2B / 5B / 9B models);
:func:`tune_hype` does that search over a grid, ``None`` (no scaling) included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_GRID", "parse_grid", "hype_mixers", "long_sequences", "tune_hype"]

#: Candidates tried by default: the paper's range and beyond, plus no scaling.
DEFAULT_GRID: tuple[float | None, ...] = (100.0, 200.0, 300.0, 500.0, 700.0, 1000.0, 2000.0, 5000.0, None)


def parse_grid(values: Sequence[str | float | None]) -> list[float | None]:
    """Grid from strings: numbers > 1, and ``none`` (case-insensitive) for no scaling. Duplicates are dropped.

    Raises:
        ValueError: an entry that is neither a number > 1 nor ``none``, or an empty grid.
    """
    grid: list[float | None] = []
    for v in values:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null")):
            a = None
        else:
            try:
                a = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"HyPE grid entry {v!r} is not a number or 'none'") from None
            if not (math.isfinite(a) and a > 1):
                raise ValueError(f"HyPE grid entry {v!r}: a must be a finite number > 1 (log(a) > 0)")
        if a not in grid:
            grid.append(a)
    if not grid:
        raise ValueError("the HyPE grid is empty")
    return grid


def hype_mixers(model: nn.Module) -> list[nn.Module]:
    """The mixers whose queries HyPE scales: those of ``attention`` and ``sparse`` layers of a hybrid model.

    Raises:
        ValueError: ``model`` is not a hybrid model (no ``config.layer_types``) or has no attention layers.
    """
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layer_types, list) or layers is None or not hasattr(config, "hype_base"):
        raise ValueError(f"{type(model).__name__} is not a hybrid model: HyPE applies to the attention layers "
                         "of a hybridize (or released HypeNet) checkpoint")
    mixers = [layer.self_attn for layer, t in zip(layers, layer_types) if t in ("attention", "sparse")]
    if not mixers:
        raise ValueError(f"the model has no attention layers (schedule {''.join(t[0].upper() for t in layer_types)}): "
                         "HyPE's a has nothing to scale")
    return mixers


def long_sequences(
    token_docs: Sequence[Sequence[int]], seq_len: int, count: int, eos_id: int
) -> tuple[torch.Tensor, int]:
    """Up to ``count`` sequences of ``seq_len`` tokens for :func:`tune_hype`, from long documents first.

    Each genuine document of at least ``seq_len`` tokens gives one sequence (its first ``seq_len`` tokens).
    Only if there are fewer than ``count`` of them are shorter documents glued together, ``eos_id`` between
    them, to fill the rest.

    Returns:
        ``(LongTensor [n, seq_len], glued)``: ``glued`` of the n rows (the last ones) are glued documents.

    Raises:
        ValueError: ``seq_len < 2``, ``count < 1``, or not even one sequence can be made.
    """
    from ..data import long_documents

    if seq_len < 2 or count < 1:
        raise ValueError(f"need seq_len >= 2 and count >= 1, got seq_len={seq_len}, count={count}")
    genuine = [d[:seq_len] for d in long_documents(token_docs, seq_len)][:count]
    glued = []
    if len(genuine) < count:
        more = long_documents(token_docs, seq_len, concat_fallback=True, eos_id=eos_id, min_docs=count)
        glued = [d[:seq_len] for d in more[len(long_documents(token_docs, seq_len)):]][: count - len(genuine)]
    rows = genuine + glued
    if not rows:
        total = sum(len(d) for d in token_docs)
        raise ValueError(f"the held-out text has {total} tokens in all: too short for one sequence of {seq_len}; "
                         "pass a smaller --seq-len or more text with --data")
    return torch.tensor(rows, dtype=torch.long), len(glued)


@torch.inference_mode()
def tune_hype(
    model: nn.Module,
    sequences: torch.Tensor,
    grid: Sequence[float | None] = DEFAULT_GRID,
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Held-out loss of ``model`` for every HyPE ``a`` in ``grid``; the best is the smallest loss.

    The model is left as it was (its ``hype_base`` is restored); apply the result by setting
    ``config.hype_base`` (the ``hybridize tune-hype`` command writes it into the checkpoint's config.json).

    Args:
        model: a :class:`~hybridize.models.HybridForCausalLM` with at least one attention or sparse layer.
        sequences: LongTensor ``[N, T]`` of held-out token ids (long documents: HyPE matters at length).
        grid: candidate values of ``a`` (each > 1) and/or None for no scaling; tried in order.
        batch_size: sequences per forward.
        progress: show a progress bar per candidate.

    Returns:
        dict with ``best`` (the ``a`` with the lowest loss, None = no scaling; ties go to the earlier grid
        entry), ``losses``: list of ``{"hype_base", "loss", "perplexity"}`` in grid order, ``seq_len``,
        ``sequences``, ``tokens`` (scored per candidate) and ``previous`` (the model's ``hype_base``).

    Raises:
        ValueError: not a hybrid model or no attention layers (:func:`hype_mixers`), a bad grid entry
            (:func:`parse_grid`), bad ``sequences`` (as :func:`~hybridize.eval.heldout_perplexity`), or a
            non-finite loss for every candidate.
    """
    from ..eval.perplexity import heldout_perplexity

    mixers = hype_mixers(model)
    grid = parse_grid(list(grid))
    previous = model.config.hype_base
    rows, result = [], None
    try:
        for a in grid:
            for m in mixers:
                m.hype_base = a
            result = heldout_perplexity(model, sequences, batch_size=batch_size, progress=progress)
            rows.append({"hype_base": a, "loss": result["loss"], "perplexity": result["perplexity"]})
    finally:
        for m in mixers:
            m.hype_base = previous
    finite = [r for r in rows if math.isfinite(r["loss"])]
    if not finite:
        raise ValueError(f"every HyPE candidate gave a non-finite loss: {rows}")
    best = min(finite, key=lambda r: r["loss"])  # min keeps the first of equal losses
    return {
        "best": best["hype_base"],
        "losses": rows,
        "seq_len": result["seq_len"],
        "sequences": result["sequences"],
        "tokens": result["tokens"],
        "previous": previous,
    }
