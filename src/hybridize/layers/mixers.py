"""The token mixers of a hybrid decoder layer (SPEC 1a, 1b).

Every mixer has the same call::

    mixer(x, rope=(cos, sin), positions=positions, attention_mask=mask_2d, cache=cache, cu_seqlens=None) -> y

with ``x``/``y`` ``[B, T, hidden]``, ``positions`` ``[B, T]`` int64 absolute token positions (padding
excluded; restarting at 0 in each packed sequence), ``attention_mask`` ``[B, past + T]`` (1 = real token,
left padding) or None, ``cache`` a :class:`~hybridize.models.cache.HybridCache` or None, and the keyword
``cu_seqlens`` ``[N + 1]`` int offsets of sequences packed into a batch of 1 (no mask, no cache), or None.
The model passes ``cu_seqlens`` only when it is set, so a mixer without packed support keeps working.
Parameter names follow transformers' attention modules (``q_proj`` ... ``o_proj``, ``q_norm``/``k_norm``)
so that teacher weights map by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import backend
from ..ops.attention import attention_mask_4d, decode_attention, hype_scale, softmax_attention
from ..ops.lightning import check_log_decay, lightning_attention, lightning_log_decay
from .common import RMSNorm, apply_rope

__all__ = ["LightningAttention", "HyPEAttention", "build_mixer"]


class LightningAttention(nn.Module):
    """Lightning Attention layer (SPEC 1a): the RNN mixer.

    ``q, k, v`` over ``H = num_attention_heads`` heads of ``head_dim`` each (K/V expanded from the
    teacher's GQA heads to full multi-head), per-head QK RMSNorm, RoPE, fixed decay ``exp(-m_h)``
    (ALiBi slopes), output RMSNorm over ``H * d`` (``o_norm``), output gate ``sigmoid(x W_z)``
    (``output_gate``), then ``o_proj``. Decode state per layer: ``[B, H, d, d]`` fp32.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.use_rope = config.lightning_rope
        self.chunk_size = config.lightning_chunk_size
        inner, hidden, bias = self.num_heads * self.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, inner, bias=bias)
        self.k_proj = nn.Linear(hidden, inner, bias=bias)
        self.v_proj = nn.Linear(hidden, inner, bias=bias)
        self.o_proj = nn.Linear(inner, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_norm = RMSNorm(inner, eps=config.rms_norm_eps)
        self.output_gate = nn.Linear(hidden, inner, bias=False) if config.lightning_output_gate else None
        # The decay is a constant of the head count: check it once here, on the CPU, so the per-call path
        # never reads it back from an accelerator. Kept out of the state dict and of dtype casts (a bf16
        # decay would be visibly wrong over long contexts), one fp32 copy per device.
        decay = lightning_log_decay(self.num_heads)
        check_log_decay(decay)
        self._log_decay = {torch.device("cpu"): decay}

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """``[H]`` fp32 log-decays ``-m_h`` (SPEC 1a, strictly negative, checked at init) on ``device``."""
        device = torch.device(device)
        if device not in self._log_decay:
            self._log_decay[device] = self._log_decay[torch.device("cpu")].to(device)
        return self._log_decay[device]

    def forward(self, x, rope=None, positions=None, attention_mask=None, cache=None, *, cu_seqlens=None):
        """``x`` ``[B, T, hidden]`` -> ``[B, T, hidden]``; reads and writes this layer's cache state.

        Padding (``attention_mask`` 0, left padding) gets zero keys and values, so it adds nothing to the
        state. Raises ValueError for ``cu_seqlens`` combined with a cache.
        """
        b, t, _ = x.shape
        if cu_seqlens is not None and cache is not None:
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a cache")
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape))
        k = self.k_norm(self.k_proj(x).view(shape))
        v = self.v_proj(x).view(shape)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if attention_mask is not None:
            # padding never enters the state: a zero key/value adds nothing to S
            real = attention_mask[:, -t:].to(k.dtype)[:, :, None, None]
            k, v = k * real, v * real
        state = cache.get_state(self.layer_idx) if cache is not None else None
        o, state = lightning_attention(
            q,
            k,
            v,
            self.log_decay(x.device),
            initial_state=state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            cu_seqlens=cu_seqlens,
            check_decay=False,
        )
        if cache is not None:
            cache.set_state(state, self.layer_idx)
        o = self.o_norm(o.reshape(b, t, -1))
        if self.output_gate is not None:
            o = o * torch.sigmoid(self.output_gate(x))
        return self.o_proj(o)


class HyPEAttention(nn.Module):
    """Softmax attention kept from the teacher (SPEC 1b).

    GQA kept; RoPE removed unless ``config.attention_rope`` (NoPE is HypeNet); QK-norm where the teacher
    has it; queries scaled by HyPE ``log(t + a)/log(a)`` when ``config.hype_base`` is set; optional output
    gate ``o * sigmoid(x W_g)`` before ``o_proj`` (no norm before the gate, as in the public HypeNet code).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rope = config.attention_rope
        self.hype_base = config.hype_base
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.output_gate = (
            nn.Linear(hidden, self.num_heads * self.head_dim, bias=False) if config.attention_output_gate else None
        )

    def forward(self, x, rope=None, positions=None, attention_mask=None, cache=None, *, cu_seqlens=None):
        """``x`` ``[B, T, hidden]`` -> ``[B, T, hidden]``; appends this layer's K/V to the cache.

        HyPE scales queries by their pad-free ``positions``. Raises ValueError for ``cu_seqlens`` combined
        with a cache or a padding mask.
        """
        b, t, _ = x.shape
        if cu_seqlens is not None and (cache is not None or attention_mask is not None):
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a cache or a padding mask")
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.hype_base is not None:
            q = q * hype_scale(positions, self.hype_base).to(q.dtype)[:, :, None, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        position = None
        if cache is not None:
            k, v = cache.update_kv(k, v, self.layer_idx)
            position = cache.decode_position()
        if position is not None:
            # static cache in graph mode: k/v are whole fixed-size buffers, keys 0..position are valid
            if attention_mask is not None:
                raise ValueError("a static cache in graph mode takes no padding mask (rows must be unpadded)")
            o = self.attend_decode(q, k, v, position, cache)
        else:
            extra = {}
            compressed = cache.compressed_keys(self.layer_idx) if cache is not None else None
            if compressed is not None:
                extra["compressed_k"] = compressed
            o = self.attend(q, k, v, attention_mask, cu_seqlens=cu_seqlens, **extra)
        o = o.transpose(1, 2).reshape(b, t, -1)
        if self.output_gate is not None:
            o = o * torch.sigmoid(self.output_gate(x))
        return self.o_proj(o)

    def attend(self, q, k, v, attention_mask=None, *, cu_seqlens=None):
        """Attention core: ``q`` ``[B, Hq, T, d]``, ``k``/``v`` ``[B, Hkv, past + T, d]`` -> ``[B, Hq, T, d]``.

        The one thing :class:`~hybridize.layers.sparse.SparseAttention` replaces; projections, norms, HyPE,
        cache and output gate stay in :meth:`forward`.
        """
        mask = attention_mask_4d(attention_mask, q.shape[2], k.shape[2], q.device)
        return softmax_attention(q, k, v, mask, cu_seqlens=cu_seqlens)

    def attend_decode(self, q, k_buf, v_buf, position, cache):
        """Decode core over a static cache: ``q`` ``[B, Hq, 1, d]``, buffers ``[B, Hkv, L, d]`` of which keys
        ``0 .. position`` (0-d int64 device tensor) are valid -> ``[B, Hq, 1, d]``. No host syncs (capturable).

        Uses :func:`~hybridize.ops.attention.decode_attention` with the cache's ``decode_attention`` choice
        (``"split"`` or ``"flex"``); the reference path (:func:`~hybridize.ops.backend.force_reference`) always
        takes ``"split"``.
        """
        impl = "split" if backend.reference_forced() else getattr(cache, "decode_attention", "split")
        return decode_attention(q, k_buf, v_buf, position, impl=impl)


from .sparse import SparseAttention  # noqa: E402  (subclasses HyPEAttention, defined above)

_MIXERS = {"attention": HyPEAttention, "lightning": LightningAttention, "sparse": SparseAttention}


def build_mixer(config, layer_idx: int) -> nn.Module:
    """The mixer for layer ``layer_idx`` from ``config.layer_types`` (the single source of truth)."""
    return _MIXERS[config.layer_types[layer_idx]](config, layer_idx)
