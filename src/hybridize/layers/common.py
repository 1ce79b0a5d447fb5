"""Building blocks shared by every mixer: RMSNorm, the SwiGLU MLP and rotary position embeddings.

Parameter names follow transformers' Llama/Qwen3 modules so that teacher weights copy over by name.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

__all__ = ["RMSNorm", "MLP", "RotaryEmbedding", "apply_rope"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``.

    Computed in fp32 and cast back to the input dtype, as transformers' LlamaRMSNorm does.
    Input ``[..., dim]``; output same shape and dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """The teacher's gated MLP: ``down(act(gate(x)) * up(x))``. Input/output ``[B, T, hidden]``."""

    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """RoPE tables (Su et al. 2021) with the teacher's ``rope_parameters``.

    ``rope_type == "default"`` uses ``inv_freq = theta^(-2i/d)``; other types (llama3, yarn, ...) use
    transformers' ``ROPE_INIT_FUNCTIONS``. The frequencies are recomputed per device rather than stored
    as a buffer, so they survive meta-device initialisation.

    forward(positions ``[B, T]`` int64, dtype) -> ``(cos, sin)`` each ``[B, T, head_dim]``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def _inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if device not in self._cache:
            rope = self.config.rope_parameters
            if rope.get("rope_type", "default") == "default":
                dim = self.config.head_dim
                inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
                self._cache[device] = (inv.to(device), 1.0)
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](self.config, device)
                self._cache[device] = (inv.to(device), scaling)
        return self._cache[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self._inv_freq(positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, d]`` by the tables ``cos``/``sin`` ``[B, T, d]`` (half-split convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin
