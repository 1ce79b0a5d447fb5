"""Model FLOPs per trained token of each conversion stage, and model FLOPs utilisation (MFU).

Counting convention (the PaLM paper's MFU, appendix B): a matrix product of an ``[n, a]`` input with an
``[a, b]`` weight is ``2 n a b`` FLOPs; a training step is forward + backward = 3x the forward FLOPs of the
trained model; frozen models that only run forward (the teacher) count 1x; recomputation from activation
checkpointing is not counted (it is hardware work, not model work). Token mixing cores per token of a
causal sequence of ``T`` tokens, per query head of dimension ``d``:

* softmax attention: ``4 d (T + 1) / 2`` (``QK^T`` and ``PV`` over the causal half);
* Lightning (SPEC 1a, chunked form, chunk ``C``): ``4 d^2`` (read and update of the ``d x d`` state) plus
  ``2 d (C + 1)`` (the causal intra-chunk products);
* sparse (InfLLM-V2, SPEC 1c): counted as dense softmax attention (an upper bound; the stages train at
  lengths at or below ``dense_len``, where the layer *is* dense).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["linear_flops_per_token", "mixing_flops_per_token", "forward_flops_per_token", "peak_flops", "mfu"]

#: dense bf16 tensor-core peak (FLOP/s) of common training GPUs, from the vendors' data sheets (SXM parts)
_PEAK_BF16 = (("H200", 989.4e12), ("H100", 989.4e12), ("B200", 2.25e15), ("A100", 312e12), ("L40S", 362.05e12))


def linear_flops_per_token(module: nn.Module) -> int:
    """Forward FLOPs per token of every ``nn.Linear`` inside ``module``: ``2 * sum(weight.numel())``.

    A weight shared by two Linear modules (tied embeddings and LM head) counts once per module that runs it.
    """
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def mixing_flops_per_token(layer_types: Sequence[str], num_heads: int, head_dim: int, seq_len: int, chunk_size: int = 64) -> float:
    """Forward FLOPs per token of the token-mixing cores (no projections) of layers of ``layer_types``
    (``attention``, ``sparse`` or ``lightning``), averaged over a causal sequence of ``seq_len`` tokens.

    Raises:
        ValueError: an unknown layer type, or a non-positive size.
    """
    if min(num_heads, head_dim, seq_len, chunk_size) < 1:
        raise ValueError("num_heads, head_dim, seq_len and chunk_size must be >= 1")
    total = 0.0
    for kind in layer_types:
        if kind in ("attention", "sparse"):
            total += 4 * num_heads * head_dim * (seq_len + 1) / 2
        elif kind == "lightning":
            c = min(chunk_size, seq_len)
            total += num_heads * (4 * head_dim * head_dim + 2 * head_dim * (c + 1))
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return total


def forward_flops_per_token(model: nn.Module, seq_len: int, include_head: bool = True) -> float:
    """Forward FLOPs per token of a causal LM (HF Llama/Qwen3 teacher or :class:`HybridForCausalLM`) at
    ``seq_len`` tokens: its Linear layers (the LM head only with ``include_head``) plus its mixing cores.
    """
    cfg = model.config
    body = model.model if hasattr(model, "model") else model
    flops = linear_flops_per_token(body)
    if include_head and getattr(model, "lm_head", None) is not None:
        flops += linear_flops_per_token(model.lm_head)
    types = getattr(cfg, "layer_types", None) or ["attention"] * cfg.num_hidden_layers
    types = ["attention" if t in ("full_attention", "sliding_attention") else t for t in types]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return flops + mixing_flops_per_token(types, cfg.num_attention_heads, head_dim, seq_len,
                                          getattr(cfg, "lightning_chunk_size", 64))


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` from :data:`_PEAK_BF16` by device name; None for the CPU or
    a GPU not in the table (then no MFU is reported)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16:
        if key in name:
            return value
    return None


def mfu(flops_per_token: float | None, tokens_per_s: float, device: torch.device | str, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: ``flops_per_token * tokens_per_s / (peak_flops(device) * world_size)``,
    with ``tokens_per_s`` the global throughput of all ``world_size`` GPUs; None where the peak is unknown."""
    peak = peak_flops(device)
    if peak is None or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)
