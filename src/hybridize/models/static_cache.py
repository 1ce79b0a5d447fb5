"""StaticHybridCache: preallocated cache buffers so that a decode step can be captured in a CUDA graph.

A :class:`~hybridize.models.cache.HybridCache` grows its KV tensors with ``torch.cat`` and replaces its
recurrent states each step: new allocations and new addresses every token, which a CUDA graph cannot
replay. This cache allocates everything once, for a capacity of ``max_len`` tokens:

* ``attention`` / ``sparse`` layers: keys and values ``[B, Hkv, L, d]`` in the model dtype (zero-filled,
  ``L`` = ``max_len`` rounded up to a multiple of 256);
* ``sparse`` layers also: compressed keys ``[B, Hkv, Nc + 1, d]`` (InfLLM-V2 scoring, SPEC 1c; ``Nc`` windows
  of the capacity plus one spare row that absorbs the write of a step that completes no window);
* ``lightning`` layers: the recurrent state ``[B, H, d, d]`` in fp32 (SPEC 1a);
* ``position``: a 0-d int64 device tensor, the number of tokens processed (the next token's position).

It has two modes, switched by :attr:`StaticHybridCache.graph_mode`:

* eager (default; prefill, plain forward calls): it behaves exactly like a ``HybridCache`` -- the layers
  get views of the filled prefix ``[:, :, :past + T]``, padding masks work -- but writes into the buffers
  (no ``torch.cat``) and keeps the compressed keys up to date chunk by chunk;
* graph mode (one token per row, no padding): :meth:`update_kv` writes the new K/V with ``index_copy_`` at
  the device ``position`` and returns the whole buffers; the layers ask :meth:`decode_position` and attend to
  keys ``0 .. position`` with a length mask (:func:`~hybridize.ops.attention.decode_attention`, and for
  sparse layers :func:`~hybridize.ops.sparse_attention.sparse_decode_static`, which reads only the selected
  blocks). Nothing reads the host, nothing changes shape: the step is capturable. The caller passes
  ``position_ids`` (the device position), advances ``position`` (``position.add_(1)``, inside the graph) and
  the host mirror (:meth:`StaticHybridCache.count_steps`) -- :class:`~hybridize.inference.GraphDecoder` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.sparse_attention import SparseConfig, compress_keys, compress_last_window, num_windows
from .cache import HybridCache

__all__ = ["StaticHybridCache", "CAPACITY_MULTIPLE"]

#: Buffer lengths are rounded up to a multiple of this (flex decode tiles of 128, split-KV slices).
CAPACITY_MULTIPLE = 256


class StaticHybridCache(HybridCache):
    """Preallocated decode cache (see the module docstring); a drop-in :class:`HybridCache` for the model.

    Args:
        layer_types: the model's ``config.layer_types``.
        max_len: tokens the cache must hold (prompt + generated); the buffers hold ``capacity`` >= max_len.
        batch_size: rows.
        num_key_value_heads, head_dim: KV shape of attention/sparse layers.
        num_attention_heads: heads of the Lightning state (``[B, H, d, d]``).
        dtype: dtype of K/V (the model's); Lightning states are fp32 whatever this is.
        device: where the buffers live.
        sparse_config: the model's ``sparse_config`` dict (needed when a layer is ``sparse``).

    Raises:
        ValueError: ``max_len < 1``, ``batch_size < 1`` or an unknown layer type.

    Use :meth:`from_config` to size it from a :class:`~hybridize.models.HybridConfig`. Beam-search reordering
    is not supported (the buffers are fixed).
    """

    def __init__(
        self,
        layer_types: Sequence[str],
        *,
        max_len: int,
        batch_size: int = 1,
        num_key_value_heads: int,
        num_attention_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sparse_config: dict | None = None,
    ):
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len} and {batch_size}")
        device = torch.device(device)
        self.graph_mode = False
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._seen = 0
        super().__init__(layer_types)
        self.max_len = int(max_len)
        self.capacity = -(-self.max_len // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.sparse = SparseConfig.from_dict(sparse_config)
        #: decode attention of ``attention`` layers in graph mode (see hybridize.ops.attention.decode_attention)
        self.decode_attention = "split"
        n = len(self.layer_types)
        self.compressed: list[torch.Tensor | None] = [None] * n
        self._written = [0] * n  # eager mode: keys written per layer in the current forward
        kv_shape = (batch_size, num_key_value_heads, self.capacity, head_dim)
        for i, kind in enumerate(self.layer_types):
            if kind in ("attention", "sparse"):
                self.key_cache[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                self.value_cache[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                if kind == "sparse":
                    rows = num_windows(self.capacity, self.sparse.kernel_size, self.sparse.kernel_stride) + 1
                    self.compressed[i] = torch.zeros(
                        batch_size, num_key_value_heads, rows, head_dim, dtype=dtype, device=device
                    )
            elif kind == "lightning":
                self.recurrent_states[i] = torch.zeros(
                    batch_size, num_attention_heads, head_dim, head_dim, dtype=torch.float32, device=device
                )
            else:
                raise ValueError(f"unknown layer type {kind!r} at layer {i}")

    @classmethod
    def from_config(
        cls,
        config,
        max_len: int,
        batch_size: int = 1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "StaticHybridCache":
        """A cache for a model with this :class:`~hybridize.models.HybridConfig` (sizes as in ``__init__``)."""
        return cls(
            config.layer_types,
            max_len=max_len,
            batch_size=batch_size,
            num_key_value_heads=config.num_key_value_heads,
            num_attention_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            dtype=dtype,
            device=device,
            sparse_config=getattr(config, "sparse_config", None),
        )

    # ------------------------------------------------------------------------------- position
    @property
    def seen_tokens(self) -> int:
        """Tokens processed so far (host mirror of :attr:`position`).

        Setting it in eager mode also sets the device ``position``; in graph mode only the host mirror
        changes. The model does not touch either in graph mode: the caller advances ``position`` on the
        device and the mirror with :meth:`count_steps`.
        """
        return self._seen

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self._seen = int(value)
        if not self.graph_mode:
            self.position.fill_(self._seen)
            self._written = [0] * len(self.layer_types)

    def count_steps(self, n: int = 1) -> None:
        """Host mirror only: ``seen_tokens += n`` after ``n`` graph-mode steps advanced the device position."""
        self._seen += n

    def decode_position(self) -> torch.Tensor | None:
        """The device position of the current token in graph mode (see :meth:`HybridCache.decode_position`), else None."""
        return self.position if self.graph_mode else None

    def reset(self) -> None:
        """Forget the sequence: position 0, Lightning states zero (K/V past the position are never read)."""
        for state in self.recurrent_states:
            if state is not None:
                state.zero_()
        self.seen_tokens = 0

    # ------------------------------------------------------------------------------ KV and state
    def update_kv(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` ``[B, Hkv, T_new, d]`` of layer ``layer_idx``.

        Eager mode: at positions ``seen_tokens ..``; returns views ``[B, Hkv, seen_tokens + T_new, d]``.
        Graph mode (``T_new == 1``): at the device ``position``; returns the whole buffers ``[B, Hkv, L, d]``.

        Raises:
            ValueError: a layer without KV, a batch other than the cache's, more tokens than the capacity,
                or ``T_new != 1`` in graph mode.
        """
        kbuf, vbuf = self.key_cache[layer_idx], self.value_cache[layer_idx]
        if kbuf is None:
            raise ValueError(f"layer {layer_idx} is {self.layer_types[layer_idx]!r}: it has no KV cache")
        b, h, t, d = key.shape
        if (b, h, d) != (kbuf.shape[0], kbuf.shape[1], kbuf.shape[3]):
            raise ValueError(f"key {tuple(key.shape)} does not fit the static cache {tuple(kbuf.shape)}")
        if self.graph_mode:
            if t != 1:
                raise ValueError(f"graph mode takes one token per step, got {t}")
            idx = self.position.reshape(1)
            kbuf.index_copy_(2, idx, key.to(kbuf.dtype))
            vbuf.index_copy_(2, idx, value.to(vbuf.dtype))
            if self.compressed[layer_idx] is not None:
                cbuf = self.compressed[layer_idx]
                ckey, complete, j = compress_last_window(kbuf, self.position, self.sparse)
                row = torch.where(complete, j, cbuf.shape[2] - 1).reshape(1)
                cbuf.index_copy_(2, row, ckey)
            return kbuf, vbuf
        start = self._seen
        end = start + t
        if end > self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} tokens; {end} requested (build it with a larger max_len)"
            )
        kbuf[:, :, start:end].copy_(key)
        vbuf[:, :, start:end].copy_(value)
        self._written[layer_idx] = end
        cbuf = self.compressed[layer_idx]
        if cbuf is not None:
            ks, st = self.sparse.kernel_size, self.sparse.kernel_stride
            old, total = num_windows(start, ks, st), num_windows(end, ks, st)
            if total > old:
                cbuf[:, :, old:total].copy_(compress_keys(kbuf[:, :, old * st : end], ks, st))
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def compressed_keys(self, layer_idx: int) -> torch.Tensor | None:
        """Compressed keys of sparse layer ``layer_idx`` (None for other layers).

        Eager mode: the complete windows of the keys written so far ``[B, Hkv, num_windows(T), d]`` (call after
        :meth:`update_kv` of the same forward). Graph mode: every window row of the capacity (the scoring masks
        the windows the position cannot see yet).
        """
        cbuf = self.compressed[layer_idx]
        if cbuf is None:
            return None
        if self.graph_mode:
            return cbuf[:, :, :-1]
        written = self._written[layer_idx] or self._seen
        return cbuf[:, :, : num_windows(written, self.sparse.kernel_size, self.sparse.kernel_stride)]

    def set_state(self, state: torch.Tensor, layer_idx: int) -> None:
        """Copy the new recurrent state ``[B, H, d, d]`` into layer ``layer_idx``'s fp32 buffer (in place)."""
        buf = self.recurrent_states[layer_idx]
        if buf is None:
            raise ValueError(f"layer {layer_idx} is {self.layer_types[layer_idx]!r}: it has no recurrent state")
        if state is not buf:
            buf.copy_(state)

    def nbytes(self) -> int:
        """Bytes of every preallocated buffer (K/V at full capacity, states, compressed keys)."""
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.compressed if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Not supported: the buffers are fixed (use :class:`HybridCache` for beam search)."""
        raise NotImplementedError("StaticHybridCache does not reorder rows; use HybridCache for beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not supported (fixed batch); see :meth:`reorder_cache`."""
        raise NotImplementedError("StaticHybridCache has a fixed batch size; use HybridCache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Not supported (fixed batch); see :meth:`reorder_cache`."""
        raise NotImplementedError("StaticHybridCache has a fixed batch size; use HybridCache")
