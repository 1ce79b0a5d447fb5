"""Distillation and language-model losses computed in chunks of positions, so the ``[tokens, vocab]`` logits
never exist all at once (SPEC 2, stage 2: "Compute the KL in chunks to bound memory").

Each chunk's logits are recomputed in the backward pass (activation checkpointing), so peak memory is one
chunk's logits whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_kl", "chunked_cross_entropy"]


def _kl_rows(s_hidden, t_logits_fn_input, s_head_weight, t_head_weight, s_bias, t_bias):
    s_logits = F.linear(s_hidden, s_head_weight, s_bias).float()
    with torch.no_grad():
        t_logp = F.log_softmax(F.linear(t_logits_fn_input, t_head_weight, t_bias).float(), dim=-1)
    s_logp = F.log_softmax(s_logits, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_head: torch.nn.Linear,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean ``KL(p_teacher || p_student)`` per real position, temperature 1 (SPEC 2, stage 2).

    Args:
        student_hidden, teacher_hidden: final hidden states ``[B, T, D]`` (before the LM head).
        student_head, teacher_head: the LM heads (``[vocab, D]`` weights).
        mask: ``[B, T]`` 1 for positions that count, 0 for padding; None = all count. Masked positions
            contribute exactly nothing, whatever their hidden states hold.
        chunk_size: positions per chunk. Every position falls in exactly one chunk.

    Returns:
        fp32 scalar: sum of per-position KL (nats) over counted positions / number of counted positions.

    Raises:
        ValueError: on shape mismatch or if the mask selects no position.
    """
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} hidden states differ")
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        raise ValueError("the mask selects no position: nothing to distil")
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (s[rows], t[rows], student_head.weight, teacher_head.weight, student_head.bias, teacher_head.bias)
        kl = checkpoint(_kl_rows, *args, use_reentrant=False) if s.requires_grad else _kl_rows(*args)
        total = total + kl.sum()
    return total / s.shape[0]


def _ce_rows(hidden, labels, weight, bias):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, chunk_size: int = 1024
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) with the LM head applied in chunks (stage 3, long context).

    Args:
        hidden: ``[B, T, D]`` final hidden states; labels: ``[B, T]`` int64 token ids; position t predicts
            ``labels[:, t + 1]``; -100 is ignored.
        head: the LM head.

    Returns:
        fp32 scalar mean over counted targets.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = int((y != -100).sum())
    if count == 0:
        raise ValueError("no target token to predict (all labels are -100 or the sequence has one token)")
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (h[rows], y[rows], head.weight, head.bias)
        total = total + (checkpoint(_ce_rows, *args, use_reentrant=False) if h.requires_grad else _ce_rows(*args))
    return total / count
