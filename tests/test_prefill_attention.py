"""Chunk-over-cache attention candidates of the chunked prefill (``sdpa`` / ``split`` / ``flex``), on CPU.

Every candidate must equal today's path (one SDPA call with torch's lower-right ``CausalBias``) and the fp32
eager reference, op by op and through a whole chunked prefill; the selector (environment variable, context
manager, ``hybridize bench --prefill-attention``) must pick, log and record the implementation. The CUDA
comparison in bf16 is ``test_prefill_attention_gpu.py``.
"""

from __future__ import annotations

import logging
import shutil
import warnings

import pytest
import torch
from conftest import TINY_SPARSE as SPARSE, tiny_mixed_hybrid

from hybridize import HybridForCausalLM
from hybridize.inference import chunked_prefill
from hybridize.models.static_cache import StaticHybridCache
from hybridize.ops import attention as attention_ops
from hybridize.ops import backend
from hybridize.ops.attention import (
    PREFILL_ATTENTION_ENV,
    eager_attention,
    hype_scale,
    offset_causal_block_mask,
    prefill_attention,
    prefill_attention_error,
    prefill_chunk_attention,
    sdpa_backend,
    sdpa_with_lse,
    softmax_attention,
    use_prefill_attention,
)

CANDIDATES = ["split", "flex"]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """No inherited choice, no failure recorded by an earlier test; quiet eager-flex warnings."""
    monkeypatch.delenv(PREFILL_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(attention_ops, "_prefill_errors", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.attention.flex_attention")
        yield


def _qkv(groups: int, chunk: int, past: int, *, d: int = 16, kv_heads: int = 2, hype: bool = False, seed: int = 0):
    """q ``[2, kv_heads * groups, chunk, d]`` and k/v views ``[2, kv_heads, past + chunk, d]`` of a longer buffer
    (as a static cache hands them over: not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, kv_heads * groups, chunk, d, generator=gen)
    if hype:  # HyPE: queries scaled by log(t + a) / log(a) at their absolute positions
        q = q * hype_scale(torch.arange(past, past + chunk), 20.0)[None, None, :, None]
    buf = torch.randn(2, 2, kv_heads, past + chunk + 13, d, generator=gen)
    return q, buf[0][:, :, : past + chunk], buf[1][:, :, : past + chunk]


# ----------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("hype", [False, True], ids=["plain", "hype"])
@pytest.mark.parametrize("past", [0, 5, 100])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("impl", CANDIDATES)
def test_candidate_equals_lower_right_sdpa(impl, groups, chunk, past, hype):
    q, k, v = _qkv(groups, chunk, past, hype=hype)
    today = prefill_chunk_attention(q, k, v, impl="sdpa")
    out = prefill_chunk_attention(q, k, v, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, today, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", CANDIDATES)
def test_candidate_with_scale_and_awkward_tiles(impl):
    """Explicit softmax scale; chunks and caches that cut 128-token flex tiles anywhere."""
    for chunk, past in [(129, 0), (130, 127), (200, 300), (37, 1000)]:
        q, k, v = _qkv(2, chunk, past, d=8, seed=chunk + past)
        ref = eager_attention(q, k, v, None, scale=0.3)
        torch.testing.assert_close(prefill_chunk_attention(q, k, v, scale=0.3, impl=impl), ref, atol=1e-5, rtol=1e-5)


def test_prefill_chunk_attention_rejects_bad_input():
    q, k, v = _qkv(2, 7, 5)
    with pytest.raises(ValueError, match="unknown prefill attention"):
        prefill_chunk_attention(q, k, v, impl="nope")
    with pytest.raises(ValueError, match="1 <= Tq <= Tk"):
        prefill_chunk_attention(torch.randn(2, 4, 20, 16), k, v)  # more queries than keys
    with pytest.raises(ValueError, match="Hkv | Hq"):
        prefill_chunk_attention(torch.randn(2, 3, 7, 16), k, v)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kernel", [None, "flash", "math"])
def test_sdpa_with_lse_returns_the_log_sum_exp(kernel, is_causal):
    gen = torch.Generator().manual_seed(1)
    t = 9
    q, k, v = torch.randn(2, 8, t, 16, generator=gen), torch.randn(2, 2, t, 16, generator=gen), torch.randn(2, 2, t, 16, generator=gen)
    out, lse = sdpa_with_lse(q, k, v, is_causal=is_causal, scale=0.2, kernel=kernel)
    kr = k.repeat_interleave(4, dim=1)
    scores = (q @ kr.transpose(-1, -2)) * 0.2
    if is_causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    assert lse.shape == (2, 8, t) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v.repeat_interleave(4, dim=1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown SDPA kernel"):
        sdpa_with_lse(q, k, v, is_causal=False, kernel="nope")


def test_sdpa_backend_on_cpu():
    q, k, v = _qkv(2, 7, 0)
    assert sdpa_backend(q, k, v, True) == "flash"  # torch's CPU flash kernel (native GQA, returns the LSE)


@pytest.mark.parametrize("past", [0, 5, 127, 128, 250, 1000])
@pytest.mark.parametrize("chunk", [1, 7, 127, 128, 129, 256, 300])
def test_offset_causal_block_mask_equals_create_block_mask(chunk, past):
    """The block tables built by arithmetic are create_block_mask's (which evaluates the [Tq, Tk] mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    attention_ops._load_flex()
    ours = offset_causal_block_mask(chunk, chunk + past, torch.tensor(past))
    ref = create_block_mask(lambda b, h, qi, ki: ki <= qi + past, None, None, chunk, chunk + past, device="cpu")

    def used(num, idx):
        return [sorted(idx[0, 0, i, :n].tolist()) for i, n in enumerate(num[0, 0].tolist())]

    assert used(ours.kv_num_blocks, ours.kv_indices) == used(ref.kv_num_blocks, ref.kv_indices)
    assert used(ours.full_kv_num_blocks, ours.full_kv_indices) == used(ref.full_kv_num_blocks, ref.full_kv_indices)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_flex_prefill_traces_once_for_growing_caches():
    """The function CUDA compiles (fullgraph, dynamic) traces on CPU too, is exact, and does not recompile as the
    cache grows chunk after chunk (the first call with a one-tile cache may specialise once)."""
    import torch._dynamo

    torch._dynamo.reset()
    attention_ops._load_flex()
    fn = torch.compile(attention_ops._flex_prefill, fullgraph=True, dynamic=True)
    frames = []
    for past in (256, 500, 1000, 1500):
        q, k, v = _qkv(4, 64, past, seed=past)
        out = fn(q, k, v, torch.tensor(past), 0.25)
        torch.testing.assert_close(out, eager_attention(q, k, v, None, scale=0.25), atol=1e-5, rtol=1e-5)
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[-1] == frames[0], frames


# ------------------------------------------------------------------------------------------ selector


def test_selector_env_context_manager_and_errors(monkeypatch):
    assert prefill_attention() == "sdpa"
    cuda = torch.device("cuda", 0)
    assert prefill_attention("cpu", torch.bfloat16) == "sdpa" and prefill_attention(cuda, torch.bfloat16) == "split"
    assert prefill_attention(cuda, torch.float32) == "sdpa" and prefill_attention(cuda) == "sdpa"
    monkeypatch.setenv(PREFILL_ATTENTION_ENV, " Split ")
    assert prefill_attention() == "split"
    with use_prefill_attention("flex"):
        assert prefill_attention() == "flex"
        with use_prefill_attention(None):
            assert prefill_attention() == "flex"
        with use_prefill_attention("sdpa"):
            assert prefill_attention() == "sdpa"
        assert prefill_attention() == "flex"
    assert prefill_attention() == "split"
    monkeypatch.setenv(PREFILL_ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=PREFILL_ATTENTION_ENV):
        prefill_attention()
    with pytest.raises(ValueError, match="unknown prefill attention"):
        with use_prefill_attention("fast"):
            pass


@pytest.mark.parametrize("impl", CANDIDATES)
def test_softmax_attention_dispatches_chunks_over_a_cache_and_logs_once(impl, monkeypatch, caplog):
    """Only chunks over a cache (1 < Tq < Tk, no mask) reach the candidate; the choice is logged once."""
    calls = []
    name = {"split": "_split_prefill", "flex": "_flex_prefill"}[impl]
    real = getattr(attention_ops, name)

    def spy(*args):
        calls.append(args[0].shape[2])
        return real(*args)

    monkeypatch.setattr(attention_ops, name, spy)
    monkeypatch.setattr(backend, "_logged", set())
    q, k, v = _qkv(2, 7, 30)
    with caplog.at_level(logging.INFO, logger="hybridize"), use_prefill_attention(impl):
        out = softmax_attention(q, k, v, None)
        softmax_attention(q, k, v, None)
        softmax_attention(q[:, :, -1:], k, v, None)  # one decode token: no mask, not the chunk path
        softmax_attention(*_qkv(2, 7, 0), None)  # no cache: plain is_causal
    assert calls == [7, 7]
    torch.testing.assert_close(out, eager_attention(q, k, v, None), atol=1e-5, rtol=1e-5)
    logged = [r.getMessage() for r in caplog.records if "chunk over a cache" in r.getMessage()]
    assert len(logged) == 1 and f"cpu: {impl} (" in logged[0], logged


def test_failing_candidate_falls_back_to_sdpa_once(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(attention_ops, "_split_prefill", broken)
    q, k, v = _qkv(2, 7, 30)
    with caplog.at_level(logging.WARNING, logger="hybridize"), use_prefill_attention("split"):
        out = softmax_attention(q, k, v, None)
        softmax_attention(q, k, v, None)
    assert "no kernel image" in prefill_attention_error("split") and prefill_attention_error("flex") is None
    assert sum("prefill attention 'split' failed" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(out, prefill_chunk_attention(q, k, v, impl="sdpa"))


def test_out_of_memory_in_a_candidate_is_not_swallowed(monkeypatch):
    def oom(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(attention_ops, "_split_prefill", oom)
    q, k, v = _qkv(2, 7, 30)
    with use_prefill_attention("split"), pytest.raises(RuntimeError, match="out of memory"):
        softmax_attention(q, k, v, None)
    assert prefill_attention_error("split") is None


# --------------------------------------------------------------------------------- chunked prefill




def _model() -> HybridForCausalLM:
    """HyPE attention (NoPE, scaled queries, output gate), Lightning, and a sparse layer whose first chunks
    run its dense regime (below ``dense_len`` = 40 tokens) through the same softmax attention."""
    return tiny_mixed_hybrid(("attention", "lightning", "sparse", "attention"), SPARSE)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("impl", CANDIDATES)
@torch.no_grad()
def test_chunked_prefill_with_candidate_equals_full_forward(impl, static, monkeypatch):
    model = _model()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits[:, -1]
    name = {"split": "_split_prefill", "flex": "_flex_prefill"}[impl]
    real, calls = getattr(attention_ops, name), []
    monkeypatch.setattr(attention_ops, name, lambda *a: calls.append(a[0].shape[2]) or real(*a))
    cache = StaticHybridCache.from_config(model.config, 72, 2, dtype=torch.float32) if static else None
    with use_prefill_attention(impl):
        last, _ = chunked_prefill(model, ids, chunk_size=16, cache=cache)
    torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)
    # chunks 2-5 in both attention layers, chunks 2 (cache 32 < dense_len 40) in the sparse layer's dense regime
    assert len(calls) == 2 * 4 + 1 and prefill_attention_error(impl) is None
