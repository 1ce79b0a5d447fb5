"""Static cache, capturable decode step and GraphDecoder against the dynamic HybridCache (issue 6), on CPU.

The graph-mode step (device position, fixed-size buffers, length masks, static sparse selection) is the code
a CUDA graph captures; here it runs eagerly and must reproduce the dynamic cache's logits token by token.
The capture itself is tested in ``test_graph_decode_gpu.py``.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import TINY_SPARSE as SPARSE, tiny_mixed_hybrid

from hybridize import HybridCache, HybridForCausalLM
from hybridize.inference import GraphDecoder, chunked_prefill
from hybridize.models.static_cache import StaticHybridCache
from hybridize.ops import attention as attention_ops
from hybridize.ops.attention import decode_attention, eager_attention, softmax_attention
from hybridize.ops.sparse_attention import (
    SparseConfig,
    compress_keys,
    compress_last_window,
    num_windows,
    select_block_indices,
    select_block_indices_static,
)



@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.attention.flex_attention")
        yield


def _model(seed: int = 0, layer_types=("sparse", "lightning", "attention", "lightning", "sparse")) -> HybridForCausalLM:
    return tiny_mixed_hybrid(layer_types, SPARSE, seed)


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _dynamic_reference(model, ids, prompt_len, chunk):
    """Chunked prefill into a HybridCache, then token-by-token decode of the rest of ``ids``."""
    last, cache = chunked_prefill(model, ids[:, :prompt_len], chunk_size=chunk)
    steps = []
    for i in range(prompt_len, ids.shape[1]):
        steps.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits[:, -1])
    return last, steps


# ----------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("impl", ["split", "flex"])
@pytest.mark.parametrize("position", [0, 1, 255, 256, 700, 1023])
def test_decode_attention_equals_attention_over_the_prefix(impl, position):
    torch.manual_seed(position)
    q = torch.randn(2, 8, 1, 16)
    k, v = torch.randn(2, 2, 1024, 16), torch.randn(2, 2, 1024, 16)
    ref = eager_attention(q, k[:, :, : position + 1], v[:, :, : position + 1], None)
    out = decode_attention(q, k, v, torch.tensor(position), impl=impl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_ignores_stale_keys_and_rejects_bad_input():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 512, 8), torch.randn(1, 2, 512, 8)
    out = decode_attention(q, k, v, torch.tensor(100))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 101:], v2[:, :, 101:] = 1e4, -1e4  # whatever sits after the position must not matter
    torch.testing.assert_close(decode_attention(q, k2, v2, torch.tensor(100)), out)
    with pytest.raises(ValueError, match="decode_attention expects"):
        decode_attention(torch.randn(1, 4, 2, 8), k, v, torch.tensor(3))
    with pytest.raises(ValueError, match="unknown decode attention"):
        decode_attention(q, k, v, torch.tensor(3), impl="nope")
    with pytest.raises(ValueError, match="multiple of 128"):
        decode_attention(q, k[:, :, :200], v[:, :, :200], torch.tensor(3), impl="flex")
    for bad in (torch.tensor(512), torch.tensor(-1)):
        with pytest.raises(ValueError, match="outside the KV buffer of 512"):
            decode_attention(q, k, v, bad)
    for bad in (torch.tensor([3, 200]), torch.tensor(3.0), 3):
        with pytest.raises(ValueError, match="0-d integer tensor"):
            decode_attention(q, k, v, bad)


def test_chunk_over_cache_uses_lower_right_bias_not_a_repeated_kv(monkeypatch):
    """A chunk of queries over a longer cache: torch's lower-right CausalBias (flash on CUDA), no [chunk, T] mask
    built by us, K/V never repeated; equal to the reference."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    calls = []
    real_bias = attention_ops._LOWER_RIGHT

    def bias(*size):
        calls.append(size)
        return real_bias(*size)

    monkeypatch.setattr(attention_ops, "_LOWER_RIGHT", bias)
    monkeypatch.setattr(attention_ops, "_causal_mask", lambda *a: pytest.fail("materialised a causal mask"))
    monkeypatch.setattr(attention_ops, "_repeat_kv", lambda *a: pytest.fail("repeated K/V heads"))
    out = softmax_attention(q, k, v, None)
    assert calls == [(5, 40)]
    monkeypatch.undo()
    torch.testing.assert_close(out, eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_compress_last_window_matches_compress_keys():
    cfg = SparseConfig(**SPARSE)
    torch.manual_seed(0)
    k = torch.randn(2, 2, 64, 12)
    full = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    completed = 0
    for pos in range(64):
        key, complete, j = compress_last_window(k, torch.tensor(pos), cfg)
        if bool(complete):
            assert int(j) == completed
            torch.testing.assert_close(key[:, :, 0], full[:, :, completed], atol=0, rtol=0)
            completed += 1
    assert completed == num_windows(64, cfg.kernel_size, cfg.kernel_stride)


@pytest.mark.parametrize("position", [3, 39, 40, 63, 64, 150, 255])
def test_static_selection_equals_dynamic(position):
    cfg = SparseConfig(**SPARSE)
    torch.manual_seed(position)
    cap = 256
    k = torch.randn(1, 2, cap, 12)
    q = torch.randn(1, 4, 1, 12)
    ck = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    dyn = select_block_indices(q, k[:, :, : position + 1], cfg)
    stat = select_block_indices_static(q, ck, torch.tensor(position), -(-cap // cfg.block_size), cfg)
    as_set = lambda idx: [sorted(x for x in row.tolist() if x >= 0) for row in idx.reshape(-1, idx.shape[-1])]  # noqa: E731
    assert as_set(stat) == as_set(dyn)


# ------------------------------------------------------------------------------------- static cache


@pytest.mark.parametrize("chunk", [7, 32])
def test_static_cache_eager_equals_dynamic(chunk):
    """Chunked prefill + token-by-token decode through the StaticHybridCache in eager mode (views of buffers)."""
    model = _model()
    ids = _ids(2, 90)
    last, steps = _dynamic_reference(model, ids, 70, chunk)
    cache = StaticHybridCache.from_config(model.config, 90, 2)
    with torch.no_grad():
        got, _ = chunked_prefill(model, ids[:, :70], chunk_size=chunk, cache=cache)
        torch.testing.assert_close(got, last, atol=1e-5, rtol=1e-5)
        for i, ref in enumerate(steps):
            out = model(ids[:, 70 + i : 71 + i], cache=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens == 90 and int(cache.position) == 90


def test_static_cache_eager_left_padding_equals_dynamic():
    model = _model()
    ids = _ids(2, 50)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        ref, _ = chunked_prefill(model, ids, chunk_size=16, attention_mask=mask)
        cache = StaticHybridCache.from_config(model.config, 60, 2)
        got, _ = chunked_prefill(model, ids, chunk_size=16, attention_mask=mask, cache=cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["split", "flex"])
@pytest.mark.parametrize("prompt_len", [25, 77])  # 25: decode crosses the sparse dense_len (40); 77: sparse from the start
def test_graph_mode_decode_equals_dynamic_decode(impl, prompt_len):
    """The capturable step (device position, whole buffers, length masks, static sparse selection) reproduces
    the dynamic cache's logits at every token after a chunked prefill: attention + lightning + sparse layers."""
    model = _model()
    n_new = 30
    ids = _ids(2, prompt_len + n_new, seed=prompt_len)
    last, steps = _dynamic_reference(model, ids, prompt_len, 20)
    dec = GraphDecoder(model, prompt_len + n_new, batch=2, chunk_size=20, decode_attention=impl, use_graph=False)
    assert dec.graph is None and dec.decode_attention == impl
    got = dec.prefill(ids[:, :prompt_len])
    torch.testing.assert_close(got, last, atol=1e-5, rtol=1e-5)
    for i, ref in enumerate(steps):
        out = dec.step(ids[:, prompt_len + i])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
    assert dec.cache.seen_tokens == prompt_len + n_new and int(dec.cache.position) == prompt_len + n_new


def test_graph_decoder_generate_is_greedy_and_reusable():
    model = _model(layer_types=("attention", "lightning", "sparse"))
    ids = _ids(1, 50)
    dec = GraphDecoder(model, 64, use_graph=False)
    for _ in range(2):  # the same decoder serves a second prompt (reset by prefill)
        out = dec.generate(ids, 8)
        with torch.no_grad():
            ref = ids
            for _ in range(8):
                nxt = model(ref).logits[:, -1].argmax(-1, keepdim=True)
                ref = torch.cat([ref, nxt], dim=1)
        assert torch.equal(out, ref[:, 50:])


def test_graph_decoder_errors():
    model = _model(layer_types=("attention", "lightning"))
    dec = GraphDecoder(model, 40, use_graph=True)  # no CUDA: records why and decodes eagerly
    assert dec.graph is None and "CUDA" in dec.graph_error
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(_ids(1, dec.cache.capacity))
    with pytest.raises(ValueError, match=r"input_ids must be \[1"):
        dec.prefill(_ids(2, 5))
    with pytest.raises(ValueError, match="decode_attention"):
        GraphDecoder(model, 40, decode_attention="nope")
    dec.prefill(_ids(1, dec.cache.capacity - 1))
    dec.step()
    with pytest.raises(ValueError, match="full"):
        dec.step()
    seen = dec.cache.seen_tokens
    with pytest.raises(ValueError, match="larger max_len"):  # checked before the prefill: nothing is lost
        dec.generate(_ids(1, dec.cache.capacity - 5), 7)
    assert dec.cache.seen_tokens == seen
    assert dec.generate(_ids(1, dec.cache.capacity - 5), 6).shape == (1, 6)
    two = GraphDecoder(model, 40, batch=2, use_graph=False)
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), torch.ones(2, 1, 1, dtype=torch.long), [1, 2]):
        with pytest.raises(ValueError, match=r"one integer token id per row: a \[2\]"):
            two.step(bad)
    for kw in ({"max_len": 64.5}, {"batch": True}, {"batch": 2.5}, {"chunk_size": 0}, {"chunk_size": None}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            GraphDecoder(model, **{"max_len": 40, **kw})


def test_static_cache_guards():
    model = _model(layer_types=("attention", "lightning"))
    cache = StaticHybridCache.from_config(model.config, 10, 1)
    assert cache.capacity == 256 and cache.nbytes() > 0
    k = torch.zeros(1, 2, 300, 12)
    with pytest.raises(ValueError, match="holds 256 tokens"):
        cache.update_kv(k, k, 0)
    with pytest.raises(ValueError, match="no KV cache"):
        cache.update_kv(k[:, :, :1], k[:, :, :1], 1)
    cache.graph_mode = True
    with pytest.raises(ValueError, match="one token per step"):
        cache.update_kv(k[:, :, :2], k[:, :, :2], 0)
    cache.seen_tokens = 5  # graph mode: host mirror only, the device position is the caller's
    assert int(cache.position) == 0
    cache.graph_mode = False
    cache.seen_tokens = 5
    assert int(cache.position) == 5
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="padding mask"):
        cache.graph_mode = True
        model(_ids(1, 1), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]), cache=cache, use_cache=True,
              position_ids=cache.position.view(1, 1))


def test_chunked_prefill_keeps_only_last_logits():
    """The LM head sees one position per chunk: logits are never [T, vocab]."""
    model = _model(layer_types=("attention", "lightning"))
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    try:
        logits, _ = chunked_prefill(model, _ids(2, 45), chunk_size=10)
    finally:
        handle.remove()
    assert shapes == [(2, 1, 97)] * 5 and logits.shape == (2, 97)


def test_dynamic_cache_interface_defaults():
    cache = HybridCache(["attention", "sparse"])
    assert cache.decode_position() is None and cache.compressed_keys(1) is None


def test_lower_right_failure_falls_back_to_an_explicit_mask(monkeypatch):
    """If a torch build cannot run the lower-right causal kernel, chunks still attend correctly (explicit mask)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)

    def broken(*size):
        raise RuntimeError("no kernel for lower-right causal attention")

    monkeypatch.setattr(attention_ops, "_LOWER_RIGHT", broken)
    monkeypatch.setattr(attention_ops, "_lower_right_error", None)
    out = softmax_attention(q, k, v, None)
    assert "no kernel" in attention_ops._lower_right_error
    torch.testing.assert_close(out, eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_flex_decode_traces_and_does_not_recompile_per_position():
    """The function the GPU compiles (BlockMask built from the device position inside the graph) traces with
    fullgraph=True and is exact at every position and cache length."""
    torch._dynamo.reset()
    attention_ops._load_flex()
    fn = torch.compile(attention_ops._flex_decode, fullgraph=True)
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1, 16)
    for length, positions in ((512, (3, 200, 511)), (768, (700,))):
        k, v = torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16)
        for pos in positions:
            out = fn(q, k, v, torch.tensor(pos), 0.25)
            ref = eager_attention(q, k[:, :, : pos + 1], v[:, :, : pos + 1], None, 0.25)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_decode_check_accepts_a_matching_flex_and_reports_a_wrong_one(monkeypatch):
    """GraphDecoder's "auto" asks flex_decode_mismatch before choosing flex on CUDA: None when flex equals split
    (CPU: eager flex, exact), a message when flex disagrees or raises; cached per shape."""
    from hybridize.ops import attention as attention_ops

    monkeypatch.setattr(attention_ops, "_flex_decode_checks", {})
    cpu = torch.device("cpu")
    assert attention_ops.flex_decode_mismatch(cpu, torch.float32, 4, 2, 16) is None
    real = attention_ops.decode_attention

    def wrong(q, k, v, position, *, scale=None, impl="split"):
        out = real(q, k, v, position, scale=scale, impl="split")
        return out + 1.0 if impl == "flex" else out

    monkeypatch.setattr(attention_ops, "decode_attention", wrong)
    assert "differs from split" in attention_ops.flex_decode_mismatch(cpu, torch.float32, 8, 2, 16)
    assert attention_ops.flex_decode_mismatch(cpu, torch.float32, 4, 2, 16) is None  # cached result

    def broken(q, k, v, position, *, scale=None, impl="split"):
        if impl == "flex":
            raise RuntimeError("no kernel")
        return real(q, k, v, position, scale=scale, impl=impl)

    monkeypatch.setattr(attention_ops, "decode_attention", broken)
    assert "failed: RuntimeError" in attention_ops.flex_decode_mismatch(cpu, torch.bfloat16, 8, 2, 16)


def test_decode_attention_refuses_a_scale_that_is_not_positive():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 128, 16)
    for scale in (0.0, -0.5):
        with pytest.raises(ValueError, match="scale > 0"):
            decode_attention(q, k, k, torch.tensor(5), scale=scale)


def test_flex_decode_check_runs_at_the_callers_batch(monkeypatch):
    """The check compiles the kernel the decoder then replays, so it runs at the decoder's batch size (a batch-1
    check followed by a batch-2 decoder made torch 2.11 replay a symbolic-batch kernel: illegal memory access)."""
    from hybridize.ops import attention as attention_ops

    monkeypatch.setattr(attention_ops, "_flex_decode_checks", {})
    seen = []
    real = attention_ops.decode_attention

    def spy(q, k, v, position, *, scale=None, impl="split"):
        seen.append((impl, q.shape[0], k.shape[0]))
        return real(q, k, v, position, scale=scale, impl=impl)

    monkeypatch.setattr(attention_ops, "decode_attention", spy)
    assert attention_ops.flex_decode_mismatch(torch.device("cpu"), torch.float32, 4, 2, 16, batch=3) is None
    assert ("flex", 3, 3) in seen and ("split", 3, 3) in seen

