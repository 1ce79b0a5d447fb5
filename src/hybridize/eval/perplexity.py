"""Held-out perplexity of a causal LM, with bounded memory at long sequence lengths.

The model runs once per batch; the vocabulary projection and the fp32 log-softmax are done on chunks of
positions, so a 64K-token sequence never materialises a [T, vocab] fp32 tensor. This needs a model with
a decoder body that returns hidden states (``model.model`` or ``model.get_decoder()``) and an output
projection (``model.get_output_embeddings()`` / ``model.lm_head``). The split is checked once per call
against the model's own logits on a short prefix; if it does not reproduce them (e.g. a model that scales
or soft-caps logits after ``lm_head``), the function falls back to the model's full logits (still with
the log-softmax in fp32 chunks).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._common import model_device, output_logits

__all__ = ["heldout_perplexity"]

# elements of one fp32 logits chunk (64M floats = 256 MiB) when chunk_size is left to the default
_CHUNK_ELEMENTS = 1 << 26
_CHECK_PREFIX = 32


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """Find (decoder body, hidden -> logits function), or None when the model has no such structure."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        return None
    decoder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        decoder = None
        if hasattr(model, "get_decoder"):
            try:
                decoder = model.get_decoder()
            except (AttributeError, NotImplementedError, ValueError):
                decoder = None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return decoder, head


def _hidden_states(decoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
        raise RuntimeError("decoder did not return hidden states of shape [B, T, D]")
    return hidden


def _split_reproduces_logits(model: nn.Module, decoder: nn.Module, head: nn.Module, ids: torch.Tensor) -> bool:
    """True when head(decoder(ids)) equals model(ids).logits on a short prefix (ids: [1, P])."""
    mask = torch.ones_like(ids)
    try:
        ref_raw = output_logits(model(input_ids=ids, attention_mask=mask, use_cache=False))
        got_raw = head(_hidden_states(decoder, ids, mask))
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot use the split"
        warnings.warn(f"heldout_perplexity: decoder/lm_head split unusable ({exc!r}); using full logits")
        return False
    if ref_raw.shape != got_raw.shape:
        return False
    ref, got = ref_raw.float(), got_raw.float()
    scale = ref.abs().max().clamp_min(1.0)
    tol = 1e-4 if ref_raw.dtype == torch.float32 and got_raw.dtype == torch.float32 else 2e-2
    return bool(((ref - got).abs().max() / scale) <= tol)


def _bucket_ranges(bucket_edges: list[int] | None, seq_len: int) -> list[tuple[int, int]]:
    if bucket_edges is None:
        return []
    edges = [int(e) for e in bucket_edges]
    if not edges:
        raise ValueError("bucket_edges must be a non-empty list of increasing non-negative ints")
    if any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket_edges must be strictly increasing and non-negative, got {edges}")
    ranges = list(zip(edges, edges[1:]))
    if edges[-1] < seq_len:
        ranges.append((edges[-1], seq_len))
    return ranges


@torch.inference_mode()
def heldout_perplexity(
    model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 1,
    bucket_edges: list[int] | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    use_hidden: bool | None = None,
) -> dict[str, Any]:
    """Mean next-token loss and perplexity of ``model`` on fixed-length held-out sequences.

    Every position ``t`` in ``0..T-2`` predicts token ``t+1`` (the same shift transformers applies with
    ``labels=``), so ``N * (T - 1)`` tokens are scored. The model runs without a cache, all tokens
    attended (no padding). Logits are cast to fp32 before the log-softmax, which runs over chunks of
    ``chunk_size`` positions.

    Args:
        model: a causal LM (``forward(input_ids, attention_mask, use_cache)`` returning ``.logits``
            [B, T, vocab]). Put into eval mode for the call; its training flag is restored afterwards.
        sequences: LongTensor [N, T] of token ids (any integer dtype, any device), N >= 1, T >= 2.
        batch_size: sequences per forward call (>= 1).
        bucket_edges: optional increasing token positions, e.g. ``[0, 2048, 8192]``; gives the mean loss
            of the predicted tokens whose position ``p`` (index in the sequence, 1..T-1, i.e. ``p`` tokens
            of context) lies in ``[a, b)`` for consecutive edges, plus a last bucket ``[edges[-1], T)``
            when ``edges[-1] < T``.
        progress: show a tqdm bar over sequences.
        chunk_size: positions per fp32 log-softmax chunk; default keeps one chunk at about 256 MiB.
        use_hidden: True forces the decoder + lm_head split (ValueError if the model has none), False
            forces full logits, None (default) uses the split when it reproduces the model's logits.

    Returns:
        dict with ``loss`` (mean token loss, nats), ``perplexity`` (exp(loss)), ``tokens`` (int, tokens
        scored), ``sequences`` (N), ``seq_len`` (T), ``method`` ("hidden-chunked" or "full-logits") and,
        when ``bucket_edges`` is given, ``buckets``: a list of dicts ``{start, end, tokens, loss,
        perplexity}`` (``loss``/``perplexity`` None for an empty bucket).

    Raises:
        ValueError: ``sequences`` not a 2-D integer tensor, N == 0, T < 2, token ids outside
            ``[0, vocab)``, ``batch_size`` or ``chunk_size`` < 1, bad ``bucket_edges``, or
            ``use_hidden=True`` on a model without a decoder/lm_head split.
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences must be a 2-D tensor [N, T], got {type(sequences).__name__} "
                         f"of shape {tuple(getattr(sequences, 'shape', ()))}")
    if sequences.dtype.is_floating_point or sequences.dtype.is_complex or sequences.dtype == torch.bool:
        raise ValueError(f"sequences must hold integer token ids, got dtype {sequences.dtype}")
    n_seq, seq_len = sequences.shape
    if n_seq == 0:
        raise ValueError("sequences is empty (N == 0)")
    if seq_len < 2:
        raise ValueError(f"sequences need at least 2 tokens each to score one, got T={seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if sequences.min() < 0 or (vocab is not None and sequences.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got [{int(sequences.min())}, {int(sequences.max())}]")
    ranges = _bucket_ranges(bucket_edges, seq_len)

    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        split = _decoder_and_head(model)
        if use_hidden is True and split is None:
            raise ValueError(f"{type(model).__name__} exposes no decoder body + lm_head to compute logits in chunks")
        if use_hidden is False:
            split = None
        elif split is not None and use_hidden is None:
            prefix = sequences[:1, : min(seq_len, _CHECK_PREFIX)].to(device=device, dtype=torch.long)
            if not _split_reproduces_logits(model, split[0], split[1], prefix):
                split = None

        # per-position sums of the loss (float64) over all sequences; index i = predicted position i+1
        pos_sum = torch.zeros(seq_len - 1, dtype=torch.float64, device=device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_seq, unit="seq", desc=f"perplexity T={seq_len}")
        for start in range(0, n_seq, batch_size):
            ids = sequences[start : start + batch_size].to(device=device, dtype=torch.long)
            bsz = ids.shape[0]
            mask = torch.ones_like(ids)
            if split is not None:
                decoder, head = split
                source = _hidden_states(decoder, ids, mask)
                project: Callable[[torch.Tensor], torch.Tensor] = head
            else:
                source = output_logits(model(input_ids=ids, attention_mask=mask, use_cache=False))
                project = lambda x: x  # noqa: E731
            width = chunk_size
            if width is None:
                vocab_out = vocab or (source.shape[-1] if split is None else 1 << 16)
                width = max(16, _CHUNK_ELEMENTS // max(1, bsz * vocab_out))
            for s in range(0, seq_len - 1, width):
                e = min(s + width, seq_len - 1)
                logits = project(source[:, s:e]).float()
                targets = ids[:, s + 1 : e + 1]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                pos_sum[s:e] += nll.view(bsz, e - s).sum(0, dtype=torch.float64)
                del logits, nll
            del source
            if bar is not None:
                bar.update(bsz)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)

    pos_sum = pos_sum.cpu()
    tokens = n_seq * (seq_len - 1)
    loss = float(pos_sum.sum() / tokens)
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "sequences": n_seq,
        "seq_len": seq_len,
        "method": "hidden-chunked" if split is not None else "full-logits",
    }
    if bucket_edges is not None:
        buckets = []
        for a, b in ranges:
            lo, hi = max(a, 1), min(b, seq_len)  # predicted positions are 1..T-1
            count = max(0, hi - lo) * n_seq
            bucket_loss = float(pos_sum[lo - 1 : hi - 1].sum() / count) if count else None
            buckets.append({
                "start": a,
                "end": b,
                "tokens": count,
                "loss": bucket_loss,
                "perplexity": math.exp(bucket_loss) if bucket_loss is not None else None,
            })
        result["buckets"] = buckets
    return result
