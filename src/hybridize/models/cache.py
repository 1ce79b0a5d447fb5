"""HybridCache: one slot per layer, shaped by ``layer_types`` (SPEC 1).

* ``attention`` and ``sparse`` layers keep a KV cache: keys and values ``[batch, kv_heads, tokens,
  head_dim]``, growing with the context.
* ``lightning`` layers keep a recurrent state ``[batch, heads, head_dim, head_dim]`` in fp32, whose size
  does not depend on the context length (SPEC 1a).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["HybridCache"]


class HybridCache:
    """Decode-time cache of a hybrid model.

    Args:
        layer_types: the model's ``config.layer_types``.

    Attributes:
        key_cache / value_cache: per layer, ``[B, Hkv, T, d]`` tensors for attention layers (None elsewhere).
        recurrent_states: per layer, ``[B, H, d, d]`` fp32 tensors for lightning layers (None elsewhere).
        seen_tokens: tokens (per row, padding included) processed so far.

    The object is passed to and returned from the model's forward (``past_key_values=`` or ``cache=``) and
    works with ``model.generate``.
    """

    is_compileable = False

    def __init__(self, layer_types: Sequence[str]):
        self.layer_types = list(layer_types)
        n = len(self.layer_types)
        self.key_cache: list[torch.Tensor | None] = [None] * n
        self.value_cache: list[torch.Tensor | None] = [None] * n
        self.recurrent_states: list[torch.Tensor | None] = [None] * n
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layer_types)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, False: read by transformers' ``generate`` (>= 5.2x) when a cache is passed in.

        generate slices the tokens already in the cache off ``input_ids`` (by :meth:`get_seq_length`) only
        when some layer is not "linear", on the assumption that a purely recurrent cache cannot say how
        many tokens it holds. This cache always knows (``seen_tokens``), so slicing is exact for every layer
        type, Lightning included, and every entry is False.
        """
        return [False] * len(self.layer_types)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far (the position of the next token), padding included."""
        return self.seen_tokens

    def update_kv(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key``/``value`` ``[B, Hkv, T_new, d]`` to layer ``layer_idx``; return the full ``[B, Hkv, T, d]``."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key, value
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """Recurrent state ``[B, H, d, d]`` fp32 of lightning layer ``layer_idx`` (None before the first token)."""
        return self.recurrent_states[layer_idx]

    def set_state(self, state: torch.Tensor, layer_idx: int) -> None:
        """Store the recurrent state of lightning layer ``layer_idx``."""
        self.recurrent_states[layer_idx] = state

    def decode_position(self) -> torch.Tensor | None:
        """None: :meth:`update_kv` returns exactly the keys so far (this cache).

        A static cache (:class:`~hybridize.models.static_cache.StaticHybridCache`) in graph mode returns
        the 0-d int64 device position of the current token instead, and :meth:`update_kv` then returns its
        whole fixed-size buffers, of which only ``0 .. position`` are valid.
        """
        return None

    def compressed_keys(self, layer_idx: int) -> torch.Tensor | None:
        """Cached InfLLM-V2 compressed keys of a ``sparse`` layer, or None (this cache: recomputed per call)."""
        return None

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        total = 0
        for group in (self.key_cache, self.value_cache, self.recurrent_states):
            total += sum(t.numel() * t.element_size() for t in group if t is not None)
        return total

    def _tensors(self):
        for group in (self.key_cache, self.value_cache, self.recurrent_states):
            for i, t in enumerate(group):
                if t is not None:
                    yield group, i, t

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows of the batch (beam search): every tensor becomes ``t[beam_idx]``."""
        for group, i, t in list(self._tensors()):
            group[i] = t.index_select(0, beam_idx.to(t.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (``num_return_sequences`` / beams in generate)."""
        for group, i, t in list(self._tensors()):
            group[i] = t.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``."""
        self.reorder_cache(indices)
