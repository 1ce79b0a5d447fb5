"""HybridForCausalLM: a decoder whose layers are softmax attention or Lightning Attention (SPEC 1).

Pre-norm blocks ``h = x + Mixer(RMSNorm(x)); y = h + MLP(RMSNorm(h))``; embeddings, norms and MLP are
the teacher's. The model is a transformers ``PreTrainedModel`` (safetensors save/load, AutoModel
registration) and works with ``model.generate`` through :class:`~hybridize.models.cache.HybridCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers.common import MLP, RMSNorm, RotaryEmbedding
from ..layers.mixers import build_mixer
from ..ops.lightning import check_cu_seqlens
from .cache import HybridCache
from .configuration import HybridConfig

# transformers >= 5.24 renamed the output field `past_key_values` to `cache` (the old name still works, with a
# warning); write whichever this version declares.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = [
    "HybridDecoderLayer",
    "HybridModel",
    "HybridForCausalLM",
    "HybridPreTrainedModel",
    "positions_from_mask",
    "positions_from_cu_seqlens",
]


def positions_from_mask(attention_mask: torch.Tensor | None, past: int, t: int, batch: int, device) -> torch.Tensor:
    """Absolute positions ``[B, t]`` (int64) of the current tokens.

    With a 2-D padding mask ``[B, past + t]`` positions count real tokens only (left padding starts each
    row at 0); without one they are ``past .. past + t - 1``.
    """
    if attention_mask is None:
        return torch.arange(past, past + t, device=device).unsqueeze(0).expand(batch, t)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -t:]


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Positions ``[1, total]`` (int64) of packed sequences: each restarts at 0 at its offset.

    ``cu_seqlens`` is ``[N + 1]`` int offsets ending at ``total``. Raises ValueError on bad offsets.
    """
    offsets = check_cu_seqlens(cu_seqlens, total)
    starts = torch.tensor(offsets[:-1], device=device)
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=device)
    return (torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths)).unsqueeze(0)


class HybridDecoderLayer(nn.Module):
    """One pre-norm block; its mixer type is ``config.layer_types[layer_idx]``."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.layer_types[layer_idx]
        self.self_attn = build_mixer(config, layer_idx)
        self.mlp = MLP(config)
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)  # MiniCPM muP; 1.0 = none
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, rope, positions, attention_mask=None, cache=None, cu_seqlens=None):
        """``x`` ``[B, T, hidden]`` -> same; arguments as the mixer call (see :mod:`hybridize.layers.mixers`)."""
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        y = self.self_attn(self.input_layernorm(x), rope, positions, attention_mask, cache, **extra)
        r = self.residual_multiplier
        h = x + (y if r == 1.0 else y * r)
        y = self.mlp(self.post_attention_layernorm(h))
        return h + (y if r == 1.0 else y * r)


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our cache is built by the model itself (recurrent states do not fit a DynamicCache).
        return False


class HybridModel(HybridPreTrainedModel):
    """Embeddings, the decoder layers and the final norm. Returns hidden states ``[B, T, hidden]``.

    With the muP fields of :class:`HybridConfig` (MiniCPM-SALA) the embeddings of ``input_ids`` are multiplied
    by ``embedding_multiplier`` and the returned hidden states are already divided by ``logits_divisor``, so
    ``lm_head(last_hidden_state)`` gives the logits everywhere (chunked losses included).
    """

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def _check_padding(attention_mask: torch.Tensor, cached: bool) -> torch.Tensor | None:
        """None when the mask has no padding (fast causal path); the mask otherwise. One host sync."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, past + tokens], got shape {tuple(attention_mask.shape)}")
        real = attention_mask != 0
        left_padded = (real[:, 1:] >= real[:, :-1]).all() if cached else real.new_ones(())
        no_padding, left_padded = torch.stack([real.all(), left_padded]).tolist()
        if no_padding:
            return None
        if not left_padded:
            raise ValueError(
                "with a cache, padding must be on the left (each attention_mask row zeros then ones): a pad "
                "after real tokens would decay the Lightning state. Use tokenizer.padding_side='left'"
            )
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        cache: HybridCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, hidden]``).
            attention_mask: ``[B, past + T]`` 1 for real tokens, 0 for left padding; None = no padding.
                With a cache the padding must be on the left (each row zeros then ones), since a pad after
                real tokens would still decay the recurrent state; without a cache right padding is fine.
            position_ids: ``[B, T]`` absolute positions; derived from the mask (or ``cu_seqlens``) when None.
            past_key_values / cache: a :class:`HybridCache` to continue from (both names accepted:
                transformers >= 5.24 calls it ``cache``).
            use_cache: create/extend a cache and return it (default ``config.use_cache``; False with
                ``cu_seqlens``).
            cu_seqlens: ``[N + 1]`` int32/int64 offsets of N sequences packed into a batch of 1 (as in
                flash-attn/fla). Each sequence is processed as if alone: positions (RoPE, HyPE) restart at 0,
                Lightning states reset and attention is block-diagonal causal. No mask, no cache.

        Raises:
            ValueError: bad argument combinations, a cache of the wrong type/length, padding that is not on
                the left while a cache is used, or bad ``cu_seqlens``.
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as `past_key_values` or as `cache`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embedding_multiplier != 1.0:  # MiniCPM muP scale_emb (ids only, as MiniCPM does)
                inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        if cu_seqlens is not None:
            if cache is not None or use_cache:
                raise ValueError(
                    "cu_seqlens (packed sequences) cannot be combined with a cache: pack for training and "
                    "scoring; for generation use a left-padded batch with attention_mask"
                )
            use_cache = False
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if cache is not None and not isinstance(cache, HybridCache):
            raise ValueError(
                f"expected a HybridCache, got {type(cache).__name__}; let the model create its cache "
                "(use_cache=True) or pass HybridCache(config.layer_types)"
            )
        if cache is None and use_cache:
            cache = HybridCache(self.config.layer_types)
        if cache is not None and len(cache) != self.config.num_hidden_layers:
            raise ValueError(f"cache has {len(cache)} layers, model has {self.config.num_hidden_layers}")

        b, t, _ = inputs_embeds.shape
        # A static cache in graph mode (CUDA-graph decode) keeps its position on the device: the caller passes
        # position_ids and advances the counters, so this forward neither reads nor writes a host-side count
        # (which a captured or compiled step would bake in as a constant).
        graph_step = cache is not None and cache.decode_position() is not None
        if graph_step and position_ids is None:
            raise ValueError("a static cache in graph mode needs position_ids (its device position)")
        past = cache.get_seq_length() if cache is not None and not graph_step else 0
        if attention_mask is not None:
            attention_mask = self._check_padding(attention_mask, cache is not None)
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with padding (attention_mask zeros)")
        if position_ids is None and cu_seqlens is not None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, t, inputs_embeds.device)
        elif position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, t, b, inputs_embeds.device)
        elif position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, -1)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)

        h = inputs_embeds
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            if self.gradient_checkpointing and self.training:
                h = checkpoint(
                    layer, h, rope, position_ids, attention_mask, None, cu_seqlens=cu_seqlens, use_reentrant=False
                )
            else:
                h = layer(h, rope, position_ids, attention_mask, cache, cu_seqlens=cu_seqlens)
        h = self.norm(h)
        if self.config.logits_divisor != 1.0:  # MiniCPM muP: lm_head(h / (hidden / dim_model_base)), folded here
            h = h / self.config.logits_divisor
        if output_hidden_states:
            hidden_states.append(h)
        if cache is not None and not graph_step:
            cache.seen_tokens += t
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Hybrid decoder with a language-model head; see :class:`HybridConfig` for the layer schedule."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        cache: HybridCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, vocab]`` (fp32 math in the head's dtype) and, with ``labels`` ``[B, T]``, the
        next-token cross-entropy (mean over positions whose shifted label is not -100).

        ``logits_to_keep = n > 0`` computes logits for the last n positions only. With ``cu_seqlens`` the
        first token of each packed sequence after the first is not a target (nothing predicts across a
        boundary). Other arguments as :meth:`HybridModel.forward`.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache=cache,
            cu_seqlens=cu_seqlens,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if cu_seqlens is not None:
                labels = labels.clone()
                labels[:, check_cu_seqlens(cu_seqlens, labels.shape[1])[1:-1]] = -100
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )
