"""Inference helpers: chunked prefill with bounded activation memory, and CUDA-graph decoding.

A hybrid model's cache is small for its Lightning layers (a fixed ``[B, H, d, d]`` state) and grows
linearly only for its few attention layers, but one forward over a long prompt still materialises every
layer's activations and ``[B, T, vocab]`` logits. :func:`chunked_prefill` feeds the prompt through the
cache ``chunk_size`` tokens at a time and keeps only the last position's logits, so peak activation memory
is set by the chunk, not the prompt. The result continues with ``model.generate(..., past_key_values=cache)``
or with plain forward calls.

What grows with the context during a chunked prefill is only the cache itself (the KV of attention/sparse
layers; Lightning states are fixed): logits are computed for the last position only (``logits_to_keep=1``,
never ``[T, vocab]``); positions, RoPE tables and HyPE factors are per chunk; attention over the cache is
causal aligned to the last key (:func:`~hybridize.ops.attention.prefill_chunk_attention`; by default
``sdpa``: torch's lower-right ``CausalBias``, FlashAttention-2 on CUDA with K/V never repeated, a ``[chunk, T]``
boolean mask per chunk and layer on CPU; the candidates ``split`` and ``flex`` are chosen with
``HYBRIDIZE_PREFILL_ATTENTION`` or :func:`~hybridize.ops.attention.use_prefill_attention`). With a :class:`~hybridize.models.static_cache.StaticHybridCache` the KV is
written in place instead of being concatenated (no copy of the whole cache per chunk).

:class:`GraphDecoder` decodes over a static cache with the one-token step captured in a CUDA graph.
"""

from __future__ import annotations

import logging

import torch

from .models.cache import HybridCache
from .models.static_cache import StaticHybridCache
from .ops.attention import DECODE_ATTENTION_IMPLS, flex_decode_mismatch

__all__ = ["chunked_prefill", "GraphDecoder"]

_log = logging.getLogger("hybridize")


@torch.no_grad()
def chunked_prefill(
    model,
    input_ids: torch.Tensor,
    chunk_size: int = 2048,
    attention_mask: torch.Tensor | None = None,
    cache: HybridCache | None = None,
) -> tuple[torch.Tensor, HybridCache]:
    """Run ``input_ids`` through ``model`` in chunks, carrying a :class:`HybridCache` between them.

    Equal (to float rounding) to one forward over the whole prompt: Lightning states and KV entries are
    carried exactly, and left padding is handled as in the model's forward.

    Args:
        model: a :class:`~hybridize.models.HybridForCausalLM` (any model whose forward takes ``cache=``,
            ``use_cache=``, ``attention_mask=`` and ``logits_to_keep=`` and returns ``logits``).
        input_ids: ``[B, T]`` int64 token ids, T >= 1.
        chunk_size: tokens per forward call (>= 1); activation memory is proportional to it.
        attention_mask: ``[B, past + T]`` with 1 for real tokens and 0 for left padding, or None (no padding).
            ``past`` is the length already in ``cache`` (0 without one).
        cache: a cache to continue from (e.g. an earlier chunked_prefill), or None for a fresh
            :class:`HybridCache`; a :class:`~hybridize.models.static_cache.StaticHybridCache` is written in place.

    The attention of each chunk over the cache runs the implementation in force
    (:func:`~hybridize.ops.attention.prefill_attention`: ``$HYBRIDIZE_PREFILL_ATTENTION`` or
    ``with use_prefill_attention("split"):`` around the call; ``sdpa`` by default).

    Returns:
        ``(last_logits, cache)``: ``last_logits`` ``[B, vocab]`` are the logits of the last prompt position
        (in the model's dtype); ``cache`` holds the whole prompt.

    Raises:
        ValueError: on ``chunk_size < 1``, an empty or non-2-D ``input_ids``, or a mask whose shape does not
            match ``[B, past + T]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1, got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if cache is None:
        cache = HybridCache(model.config.layer_types)
    past = cache.get_seq_length()
    if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
        raise ValueError(
            f"attention_mask must have shape [batch, past + tokens] = {(b, past + t)}, got {tuple(attention_mask.shape)}"
        )
    logits = None
    for start in range(0, t, chunk_size):
        end = min(start + chunk_size, t)
        mask = attention_mask[:, : past + end] if attention_mask is not None else None
        out = model(input_ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits, cache


class GraphDecoder:
    """Greedy/teacher-forced decoding over a :class:`StaticHybridCache`, one step captured in a CUDA graph.

    Usage::

        dec = GraphDecoder(model, max_len=prompt_len + new_tokens)   # allocates the cache, captures the step
        logits = dec.prefill(prompt_ids)                             # chunked prefill into the static cache
        for _ in range(new_tokens - 1):
            logits = dec.step()                                      # greedy: the last argmax is the input

    The step is ``model(token, position_ids=position)`` with the cache in graph mode, then the greedy next
    token (``argmax``) written into the static input and ``position += 1``, all on the device. On CUDA (and
    ``use_graph`` not False) it is captured once at construction -- two eager warm-up steps first (three
    with ``compile``; they compile FlexAttention when chosen and let Triton/cuBLAS pick their kernels; the
    cache is reset after them, so construct the decoder before prefilling) -- and replayed for every token: no Python, no launches, no host syncs per token. Anywhere else, or
    when capture fails, the same step runs eagerly (``graph_error`` says why); the results are the same.

    Args:
        model: a :class:`~hybridize.models.HybridForCausalLM` (batch rows unpadded).
        max_len: prompt + generated tokens the cache must hold.
        batch: rows.
        chunk_size: prefill chunk (tokens), see :func:`chunked_prefill`.
        use_graph: capture a CUDA graph (default: when the model is on CUDA).
        decode_attention: ``"auto"`` (``"flex"`` on CUDA when it agrees with ``"split"`` on a small random
            check (:func:`~hybridize.ops.attention.flex_decode_mismatch`), falling back to ``"split"`` if it
            disagrees or fails to compile or capture; ``"split"`` elsewhere), ``"flex"`` or ``"split"``; see
            :func:`~hybridize.ops.attention.decode_attention`.
        compile: also run the step's model forward through ``torch.compile`` (inductor; no inductor CUDA
            graphs: ours captures the result), fusing the many small element-wise kernels of a
            one-token step (norms, RoPE, gates); opt-in, falls back to the uncompiled step if compiling or
            capturing fails (``graph_error`` says so).

    Attributes:
        cache: the :class:`StaticHybridCache`.
        graph: the ``torch.cuda.CUDAGraph`` or None (eager steps).
        graph_error: why no graph was captured, or what fell back (None when all went as asked).
        decode_attention: the implementation the attention layers use.
        compiled: whether the step runs through ``torch.compile``.
        setup_s: seconds spent on warm-up and capture.

    Raises:
        ValueError: a model without ``layer_types``, ``max_len``, ``batch`` or ``chunk_size`` not an integer >= 1, an unknown
            ``decode_attention``.
        torch.cuda.OutOfMemoryError: the cache or the warm-up/capture does not fit (never swallowed).
    """

    def __init__(
        self,
        model,
        max_len: int,
        batch: int = 1,
        *,
        chunk_size: int = 8192,
        use_graph: bool | None = None,
        decode_attention: str = "auto",
        compile: bool = False,
    ):
        import time

        config = model.config
        if not hasattr(config, "layer_types"):
            raise ValueError("GraphDecoder needs a hybridize model (config.layer_types)")
        if decode_attention not in ("auto", *DECODE_ATTENTION_IMPLS):
            raise ValueError(f"decode_attention must be 'auto' or one of {DECODE_ATTENTION_IMPLS}, got {decode_attention!r}")
        for name, value in (("max_len", max_len), ("batch", batch), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GraphDecoder {name} must be an integer >= 1, got {value!r}")
        weight = model.get_input_embeddings().weight
        self.model = model
        self.batch = batch
        self.chunk_size = chunk_size
        self.device = weight.device
        self.cache = StaticHybridCache.from_config(config, max_len, batch, dtype=weight.dtype, device=weight.device)
        on_cuda = self.device.type == "cuda"
        self.decode_attention = ("flex" if on_cuda else "split") if decode_attention == "auto" else decode_attention
        self._fallback = decode_attention == "auto" and self.decode_attention == "flex"
        self.graph_error: str | None = None
        if self._fallback:
            mismatch = flex_decode_mismatch(
                self.device, weight.dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                batch,
            )
            if mismatch is not None:  # a kernel that gives wrong results is never chosen
                _log.warning("GraphDecoder: %s; decode attention uses split", mismatch)
                self.decode_attention, self._fallback = "split", False
                self.graph_error = f"{mismatch}; split used"
        self.cache.decode_attention = self.decode_attention
        self._token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._positions = self.cache.position.view(1, 1).expand(batch, 1)
        self._logits: torch.Tensor | None = None
        self.graph = None
        self.compiled = bool(compile)
        # dynamic=None: a second cache length recompiles once with a symbolic length, not once per length
        self._forward = torch.compile(self._forward_eager) if compile else self._forward_eager
        use_graph = on_cuda if use_graph is None else use_graph
        t0 = time.perf_counter()
        if use_graph and not on_cuda:
            self.graph_error = "CUDA graphs need a CUDA device; decoding eagerly"
        if (use_graph and on_cuda) or self.compiled:
            self._setup(capture=use_graph and on_cuda)
        self.setup_s = time.perf_counter() - t0

    # ----------------------------------------------------------------------------------- the step
    def _forward_eager(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        """The decode step (eager or under capture): logits ``[B, vocab]`` of the token in ``_token``; the greedy
        next token goes to ``_token`` and the device position advances. The host mirror is the caller's."""
        cache = self.cache
        cache.graph_mode = True
        try:
            logits = self._forward(self._token, self._positions)
            self._token.copy_(logits.argmax(-1, keepdim=True))
            cache.position.add_(1)
        finally:
            cache.graph_mode = False
        return logits

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` eager steps (compiles, autotunes, builds plans), then reset the cache to empty."""
        if self.device.type == "cuda":
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(steps):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
        else:
            for _ in range(steps):
                self._step()
        self.cache.reset()

    def _capture_graph(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step()
        self.cache.reset()
        self.graph, self._logits = graph, logits

    def _attempt(self, capture: bool) -> str | None:
        """Warm up (and capture); None on success, else the error (graph and cache state cleaned up)."""
        try:
            self._warm_up(3 if self.compiled else 2)  # a compiled step must not recompile during capture
            if capture:
                self._capture_graph()
            return None
        except Exception as exc:  # a kernel that cannot be compiled or captured must not stop decoding
            self.graph, self._logits = None, None
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
                raise  # not a capture problem: the caller decides (the bench records it)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.cache.reset()
            return f"{type(exc).__name__}: {exc}"

    def _setup(self, capture: bool) -> None:
        first = self._attempt(capture)
        if first is None:
            return
        if self.compiled:
            _log.warning("GraphDecoder: compiled step failed (%s); retrying uncompiled", first[:300])
            self.compiled, self._forward = False, self._forward_eager
            error = self._attempt(capture)
            if error is None:
                self.graph_error = f"torch.compile of the step failed, uncompiled step used: {first[:500]}"
                return
            first = error
        if self._fallback:
            _log.warning("GraphDecoder: flex decode attention failed (%s); retrying with split", first[:300])
            self.decode_attention = self.cache.decode_attention = "split"
            error = self._attempt(capture)
            if error is None:
                self.graph_error = f"flex decode attention failed, split used: {first[:500]}"
                return
            first = error
        self.graph_error = f"capture failed, decoding eagerly: {first[:500]}"
        _log.warning("GraphDecoder: %s", self.graph_error)

    # ------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Reset the cache and prefill ``input_ids`` ``[batch, T]`` (int64, unpadded) in chunks.

        Returns the last position's logits ``[batch, vocab]``; their argmax becomes the next step's input.

        Raises:
            ValueError: wrong batch, empty prompt, or ``T + 1`` tokens exceeding the cache.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [{self.batch}, tokens >= 1], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] + 1 > self.cache.capacity:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens leaves no room to decode in a cache of {self.cache.capacity}"
            )
        self.cache.reset()
        logits, _ = chunked_prefill(self.model, input_ids, chunk_size or self.chunk_size, cache=self.cache)
        self._token.copy_(logits.argmax(-1, keepdim=True))
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one token per row: ``tokens`` ``[batch]`` or ``[batch, 1]`` int64 (default: the last argmax).

        Returns logits ``[batch, vocab]`` -- with a graph, a buffer that the next step overwrites (clone it to
        keep it). The greedy next token is stored as the following step's input.

        Raises:
            ValueError: the cache is full, or ``tokens`` is not ``batch`` integer ids.
        """
        if self.cache.seen_tokens + 1 > self.cache.capacity:
            raise ValueError(f"the static cache is full ({self.cache.capacity} tokens)")
        if tokens is not None:
            if (not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool
                    or tokens.numel() != self.batch or tokens.dim() > 2):
                raise ValueError(
                    f"step() takes one integer token id per row: a [{self.batch}] or [{self.batch}, 1] integer tensor, "
                    f"got {tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                    f"{' ' + str(tokens.dtype) if isinstance(tokens, torch.Tensor) else ''}")
            self._token.copy_(tokens.reshape(self.batch, 1))
        if self.graph is not None:
            self.graph.replay()
            logits = self._logits
        else:
            logits = self._step()
        self.cache.count_steps(1)  # host mirror; the step advanced the device position
        return logits

    @property
    def next_token(self) -> torch.Tensor:
        """``[batch, 1]`` int64: the input of the next step (the greedy choice after the last prefill/step)."""
        return self._token

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: prefill, then ``max_new_tokens - 1`` steps. Returns ``[batch, max_new_tokens]`` int64.

        Raises:
            ValueError: ``max_new_tokens < 1``, or prompt + new tokens more than the static cache holds (checked
                before any work, so no generated token is lost to a full cache).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        need = input_ids.shape[-1] + max_new_tokens - 1
        if need > self.cache.capacity:
            raise ValueError(
                f"a {input_ids.shape[-1]}-token prompt and {max_new_tokens} new tokens need {need} cache entries, "
                f"the static cache holds {self.cache.capacity}: build the GraphDecoder with a larger max_len"
            )
        self.prefill(input_ids)
        out = [self._token.clone()]
        for _ in range(max_new_tokens - 1):
            self.step()
            out.append(self._token.clone())
        return torch.cat(out, dim=1)
