"""Measurements of one model at one context length: time to first token, decode speed, peak memory, and the
memory-bandwidth roofline of a decode step.

Definitions (all batch 1, random token ids, after a per-preset warm-up):

* **time to first token** (``ttft_s``): wall time from the prompt's ids on the device to the first generated
  token's id on the device (prefill + last-position logits + argmax, then a device sync). Ours: chunked
  prefill (:func:`~hybridize.inference.chunked_prefill`) into a preallocated
  :class:`~hybridize.models.static_cache.StaticHybridCache` (allocated, and the decode step captured, before
  the clock starts: a server does both once). The transformers peer: one forward over the whole prompt with
  ``logits_to_keep=1`` (its ``DynamicCache`` is allocated inside the clock, as a user would run it).
* **decode** (``decode_ms_per_token``): mean wall time per token over ``decode_tokens`` greedy steps after two
  untimed ones. Ours: :class:`~hybridize.inference.GraphDecoder` replays (one CUDA graph per token); peer:
  eager forward calls on its ``DynamicCache``.
* **peak memory** (``peak_memory_bytes``): CUDA ``max_memory_allocated`` from before the cache allocation to
  the end of decode (weights included); on CPU the process's maximum resident set size (monotonic).
* **roofline**: bytes a decode step must move (:func:`decode_bytes_per_token`) over the measured copy
  bandwidth (:func:`copy_bandwidth`); ``achieved_fraction = roofline_ms / decode_ms``.
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict

import torch
from torch import nn

from ..eval._common import cache_kwarg_name, output_cache
from ..ops.sparse_attention import SparseConfig, num_windows

__all__ = [
    "is_oom",
    "sync",
    "copy_bandwidth",
    "decode_bytes_per_token",
    "weight_bytes",
    "measure_hybrid",
    "measure_hf",
    "peak_memory",
    "reset_peak_memory",
    "predict_seconds",
    "static_cache_bytes",
    "profile_steps",
]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (``torch.cuda.OutOfMemoryError`` or a RuntimeError saying so)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (no-op on CPU, whose figure is the process maximum)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA ``max_memory_allocated`` since the last reset, or the process max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@torch.no_grad()
def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int | None = None) -> dict:
    """Device-to-device copy bandwidth: ``2 * nbytes * iters / seconds`` (every byte read once, written once).

    Args:
        device: where to measure.
        nbytes: bytes per copy (default 2 GiB on CUDA, 64 MiB on CPU).
        iters: timed copies (default 20 on CUDA, 5 on CPU), after one untimed.

    Returns:
        ``{"bytes_per_s", "bytes", "iters", "method"}``.
    """
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if cuda else 64 << 20)
    iters = iters or (20 if cuda else 5)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return {
        "bytes_per_s": 2 * nbytes * iters / seconds,
        "bytes": nbytes,
        "iters": iters,
        "method": "dst.copy_(src) of a uint8 tensor, bytes read + bytes written per second (CUDA events)"
        if cuda
        else "dst.copy_(src) of a uint8 tensor, bytes read + bytes written per second (wall clock)",
    }


def weight_bytes(model: nn.Module) -> dict:
    """Parameter bytes, and the bytes a decode step reads: every weight once, but of an untied input
    embedding only the looked-up row (a tied table is read whole by the LM head)."""
    params = list(model.parameters())  # shared (tied) parameters are listed once
    total = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb is head or (emb.device.type != "meta" and emb.data_ptr() == head.data_ptr())
    read = total if tied else total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    return {"parameters": sum(p.numel() for p in params), "bytes": total, "read_per_token": read, "tied": tied}


def decode_bytes_per_token(model: nn.Module, context: int, layer_types: list[str] | None = None) -> dict:
    """Bytes one decode step must move at ``context`` tokens in the cache (batch 1): the roofline numerator.

    * ``weights``: :func:`weight_bytes` ``read_per_token``;
    * ``attention_kv``: K and V of every ``attention`` layer at ``context`` tokens (read);
    * ``lightning_state``: every ``lightning`` state, fp32, read and written;
    * ``sparse_selected_kv``: K and V of the selected blocks only (``(init + local + topk) * block_size`` tokens,
      or every token below that / below ``dense_len``) of every ``sparse`` layer;
    * ``sparse_compressed_keys``: the compressed keys the block scoring reads (``num_windows(context)`` rows);
    * ``logits``: the ``[vocab]`` output row.

    Args:
        model: the benchmarked model (its ``config`` gives the shapes; the KV dtype is the weights' dtype).
        context: tokens in the cache.
        layer_types: per layer (default ``config.layer_types``, or all ``attention`` for a transformers model).

    Returns:
        dict of the components and their ``total`` (bytes).
    """
    cfg = model.config
    layer_types = layer_types or list(getattr(cfg, "layer_types", None) or ["attention"] * cfg.num_hidden_layers)
    if any(t not in ("attention", "lightning", "sparse") for t in layer_types):  # transformers' full_attention etc.
        layer_types = ["attention"] * cfg.num_hidden_layers
    elt = model.get_input_embeddings().weight.element_size()
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_token = 2 * hkv * d * elt
    out = {"weights": weight_bytes(model)["read_per_token"]}
    out["attention_kv"] = layer_types.count("attention") * context * kv_token
    out["lightning_state"] = layer_types.count("lightning") * 2 * cfg.num_attention_heads * d * d * 4
    n_sparse = layer_types.count("sparse")
    if n_sparse:
        sc = SparseConfig.from_dict(getattr(cfg, "sparse_config", None))
        if context < sc.dense_len:
            selected = context
        else:
            selected = min(context, (sc.init_blocks + sc.local_blocks + sc.topk) * sc.block_size)
        out["sparse_selected_kv"] = n_sparse * selected * kv_token
        out["sparse_compressed_keys"] = n_sparse * num_windows(context, sc.kernel_size, sc.kernel_stride) * hkv * d * elt
    out["logits"] = cfg.vocab_size * elt
    out["total"] = sum(out.values())
    return out


class _Breakdown:
    """Per-module-kind wall time of a prefill, from CUDA events (device time) or the CPU clock.

    Hooks the ``self_attn`` (kind = the layer's mixer type) and ``mlp`` modules of every decoder layer.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.events: dict[str, list] = defaultdict(list)
        self.handles = []
        layers = model.model.layers
        for layer in layers:
            kind = getattr(layer, "mixer_type", "attention")
            for module, name in ((layer.self_attn, kind), (layer.mlp, "mlp")):
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
                self.handles.append(module.register_forward_hook(self._post(name)))

    def _stamp(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _pre(self, name):
        def hook(module, args):
            self.events[name].append([self._stamp(), None])

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.events[name][-1][1] = self._stamp()

        return hook

    def close(self) -> dict[str, float]:
        """Remove the hooks; seconds per kind (call after a device sync)."""
        for h in self.handles:
            h.remove()
        out = {}
        for name, pairs in self.events.items():
            if self.device.type == "cuda":
                out[name] = sum(a.elapsed_time(b) for a, b in pairs if b is not None) / 1000
            else:
                out[name] = sum(b - a for a, b in pairs if b is not None)
        return out


def _random_ids(vocab: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen).to(device)


def _rounded(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


@torch.no_grad()
def measure_hybrid(
    model: nn.Module,
    context: int,
    decode_tokens: int,
    *,
    chunk_size: int,
    decode_attention: str = "auto",
    prefill_attention: str | None = None,
    use_graph: bool | None = None,
    compile: bool = False,
    seed: int = 0,
    breakdown: bool = True,
    profile: bool = False,
    state: dict | None = None,
) -> dict:
    """Time to first token, decode ms/token and peak memory of a hybridize model at ``context`` tokens.

    Args:
        model: a :class:`~hybridize.HybridForCausalLM` on its device.
        context: prompt tokens.
        decode_tokens: timed greedy steps (>= 1).
        chunk_size: prefill chunk.
        decode_attention, use_graph, compile: passed to :class:`~hybridize.inference.GraphDecoder`.
        prefill_attention: ``"sdpa"``, ``"split"`` or ``"flex"``: the attention of each prefill chunk over the
            cache (:func:`~hybridize.ops.attention.prefill_chunk_attention`, applied with
            :func:`~hybridize.ops.attention.use_prefill_attention`); None = ``$HYBRIDIZE_PREFILL_ATTENTION`` or
            ``"sdpa"``. The row records it (``prefill_attention``) and, when the candidate failed and ``sdpa``
            ran instead, why (``prefill_attention_error``).
        seed: prompt ids seed.
        breakdown: also time the prefill per module kind (``prefill_breakdown_s``).
        profile: after the timed steps, profile 3 more (graph replays when captured) with ``torch.profiler``:
            ``decode_profile`` gets the kernels per step and the top kernels by device time (see
            :func:`profile_steps`).
        state: a dict the function keeps up to date with ``stage`` (``"cache"``, ``"prefill"``, ``"decode"``)
            so that a caller catching an out-of-memory error knows where it happened.

    Returns:
        the measurement row (see the module docstring); errors propagate (out-of-memory included).
    """
    from ..inference import GraphDecoder
    from ..ops.attention import prefill_attention_error, use_prefill_attention
    from ..ops import sparse_attention as sparse_ops
    from ..ops.attention import prefill_attention as current_prefill_attention

    state = state if state is not None else {}
    device = model.get_input_embeddings().weight.device
    reset_peak_memory(device)
    state["stage"] = "cache"
    decoder = GraphDecoder(
        model,
        context + decode_tokens + 4,
        1,
        chunk_size=chunk_size,
        use_graph=use_graph,
        decode_attention=decode_attention,
        compile=compile,
    )
    try:
        ids = _random_ids(model.config.vocab_size, context, device, seed)
        state["stage"] = "prefill"
        hooks = _Breakdown(model, device) if breakdown else None
        try:
            with use_prefill_attention(prefill_attention):
                prefill_impl = current_prefill_attention(device, model.get_input_embeddings().weight.dtype)
                has_sparse = "sparse" in model.config.layer_types
                sparse_ops.prefill_kernels_used.clear()  # this row's kernels only
                sync(device)
                t0 = time.perf_counter()
                decoder.prefill(ids)
                _ = decoder.next_token
                sync(device)
                ttft = time.perf_counter() - t0
            state["ttft_s"] = _rounded(ttft)
        finally:
            parts = hooks.close() if hooks is not None else None
        state["stage"] = "decode"
        for _ in range(2):
            decoder.step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            decoder.step()
        sync(device)
        decode_s = time.perf_counter() - t0
        row = {
            **_timing_row(ttft, decode_s, decode_tokens, context, device),
            "prefill_attention": prefill_impl,
            "prefill_attention_error": prefill_attention_error(prefill_impl),
            "sparse_prefill_kernels": list(sparse_ops.prefill_kernels_used) if has_sparse else None,
            "cache_bytes": decoder.cache.nbytes(),
            "graph": decoder.graph is not None,
            "graph_error": decoder.graph_error,
            "decode_attention": decoder.decode_attention,
            "compiled_step": decoder.compiled,
            "graph_setup_s": _rounded(decoder.setup_s),
        }
        if parts is not None:
            parts = {k: _rounded(v) for k, v in sorted(parts.items())}
            parts["other"] = _rounded(max(0.0, ttft - sum(parts.values())))
            row["prefill_breakdown_s"] = parts
        if profile:
            row["decode_profile"] = profile_steps(decoder.step, 3, device)
        return row
    finally:
        del decoder


@torch.no_grad()
def measure_hf(
    model: nn.Module, context: int, decode_tokens: int, *, seed: int = 0, state: dict | None = None
) -> dict:
    """The same measurement for a transformers causal LM, run as a user would: one forward over the prompt
    (``logits_to_keep=1``) creating its own cache, then eager one-token forward calls (greedy).

    Arguments and return as :func:`measure_hybrid`; errors (out-of-memory included) propagate.
    """
    state = state if state is not None else {}
    device = model.get_input_embeddings().weight.device
    cache_arg = cache_kwarg_name(model)
    reset_peak_memory(device)
    ids = _random_ids(model.config.vocab_size, context, device, seed)
    state["stage"] = "prefill"
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    ttft = time.perf_counter() - t0
    state["ttft_s"] = _rounded(ttft)
    cache = output_cache(out)
    del out
    state["stage"] = "decode"

    def step(tok):
        o = model(input_ids=tok, use_cache=True, **{cache_arg: cache})
        return o.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(2):
        token = step(token)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = step(token)
    sync(device)
    decode_s = time.perf_counter() - t0
    from ..eval.speed import cache_nbytes

    try:
        cache_bytes = cache_nbytes(cache)
    except TypeError:  # a cache type this transformers version lays out differently
        cache_bytes = None
    row = {
        **_timing_row(ttft, decode_s, decode_tokens, context, device),
        "cache_bytes": cache_bytes,
        "graph": False,
        "prefill_attention": "sdpa (transformers)",
        "decode_attention": "sdpa (transformers)",
    }
    del cache
    return row


def _timing_row(ttft: float, decode_s: float, decode_tokens: int, context: int, device: torch.device) -> dict:
    """The fields every measured row shares: status, time to first token (s), decode ms per token, peak
    memory (bytes) and prefill tokens/s."""
    return {
        "status": "ok",
        "ttft_s": _rounded(ttft),
        "decode_ms_per_token": _rounded(1000 * decode_s / decode_tokens),
        "peak_memory_bytes": peak_memory(device),
        "prefill_tokens_per_s": _rounded(context / ttft),
    }


def predict_seconds(history: list[tuple[int, float]], context: int) -> float | None:
    """Extrapolated time to first token at ``context`` from earlier ``(context, seconds)`` points of a preset.

    Power law through the last two points (exponent clamped to [1, 2]); from one point, exponent 2 (attention
    is quadratic: a conservative guess). None without points.
    """
    pts = [(c, s) for c, s in history if c > 0 and s > 0]
    if not pts:
        return None
    pts.sort()
    c1, s1 = pts[-1]
    exponent = 2.0
    if len(pts) >= 2:
        c0, s0 = pts[-2]
        if c1 != c0:
            exponent = min(2.0, max(1.0, math.log(s1 / s0) / math.log(c1 / c0)))
    return s1 * (context / c1) ** exponent


def static_cache_bytes(config, max_len: int, element_size: int) -> int:
    """Bytes a :class:`~hybridize.models.static_cache.StaticHybridCache` of ``max_len`` tokens allocates for a
    model with this config (K/V at the rounded capacity, fp32 Lightning states, compressed keys)."""
    from ..models.static_cache import CAPACITY_MULTIPLE

    cap = -(-max_len // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    d = config.head_dim
    kv = 2 * config.num_key_value_heads * cap * d * element_size
    types = list(getattr(config, "layer_types", None) or ["attention"] * config.num_hidden_layers)
    sc = SparseConfig.from_dict(getattr(config, "sparse_config", None))
    comp = (num_windows(cap, sc.kernel_size, sc.kernel_stride) + 1) * config.num_key_value_heads * d * element_size
    state = config.num_attention_heads * d * d * 4
    return (
        types.count("attention") * kv
        + types.count("sparse") * (kv + comp)
        + types.count("lightning") * state
    )


def profile_steps(step, steps: int, device: torch.device, top: int = 15) -> dict:
    """Profile ``steps`` calls of ``step()`` with ``torch.profiler``: where a decode step's time goes.

    On CUDA the device kernels are counted and ranked (kernels inside a replayed CUDA graph included); on CPU
    the leaf ``aten`` operators stand in for kernels.

    Returns:
        ``{"steps", "kernels_per_step", "device_ms_per_step", "top": [{"name", "calls_per_step",
        "ms_per_step"}, ...]}`` (``top`` sorted by time, at most ``top`` entries).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if cuda:
            kind = getattr(ev, "device_type", None)
            if kind is None or "CUDA" not in str(kind):
                continue
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        else:
            if not ev.name.startswith("aten::") or any(c.name.startswith("aten::") for c in ev.cpu_children):
                continue
            us = ev.cpu_time
        entry = per_name[ev.name]
        entry[0] += 1
        entry[1] += float(us or 0.0)
    total_calls = sum(v[0] for v in per_name.values())
    total_us = sum(v[1] for v in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "steps": steps,
        "kernels_per_step": round(total_calls / steps, 1),
        "device_ms_per_step": round(total_us / steps / 1000, 4),
        "top": [
            {"name": name[:120], "calls_per_step": round(calls / steps, 2), "ms_per_step": round(us / steps / 1000, 4)}
            for name, (calls, us) in ranked
        ],
    }
