"""Chunk-over-cache attention candidates (``split``, ``flex``) against today's ``sdpa`` path on CUDA, in bf16.

Run on the device machine (never in CI)::

    python -m pytest -q -m gpu tests/test_prefill_attention_gpu.py -s

``-s`` prints which SDPA kernel each part of ``split`` runs (``cudnn`` / ``flash`` / ``efficient``) and the
kernels the profiler sees for each implementation, so a later timing can be read against them. Errors are
relative RMS ``||x - ref|| / ||ref||`` against the fp32 eager reference on the same GPU.
"""

from __future__ import annotations

import pytest
import torch

from hybridize import HybridConfig, HybridForCausalLM
from hybridize.inference import chunked_prefill
from hybridize.models.static_cache import StaticHybridCache
from hybridize.ops import attention as attention_ops
from hybridize.ops.attention import (
    LSE_KERNELS,
    eager_attention,
    prefill_attention_error,
    prefill_chunk_attention,
    sdpa_backend,
    sdpa_with_lse,
    use_prefill_attention,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
BF16_TOL = 2e-2  # bf16 outputs (8 mantissa bits): ~4e-3 typical; the split merge adds one more rounding


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _qkv(chunk: int, past: int, *, hq: int = 32, hkv: int = 8, d: int = 128, dtype=torch.bfloat16, seed: int = 0):
    """Qwen3-8B-shaped heads; k/v are views of a longer buffer (as the static cache passes them)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(1, hq, chunk, d, device=DEVICE, dtype=dtype, generator=gen)
    buf = torch.randn(2, 1, hkv, past + chunk + 100, d, device=DEVICE, dtype=dtype, generator=gen)
    return q, buf[0][:, :, : past + chunk], buf[1][:, :, : past + chunk]


@pytest.fixture(autouse=True)
def _no_recorded_failure(monkeypatch):
    monkeypatch.setattr(attention_ops, "_prefill_errors", {})


@pytest.mark.parametrize("chunk,past", [(7, 5), (64, 100), (1000, 3000), (2048, 4096), (1, 4096), (4096, 0)])
@pytest.mark.parametrize("impl", ["split", "flex"])
def test_candidate_matches_sdpa_in_bf16(impl, chunk, past):
    q, k, v = _qkv(chunk, past, seed=chunk + past)
    ref = eager_attention(q.float(), k.float(), v.float(), None)
    today = prefill_chunk_attention(q, k, v, impl="sdpa")
    try:
        out = prefill_chunk_attention(q, k, v, impl=impl)
    except Exception as exc:
        # torch 2.11 + H200: inductor found no flex kernel for a 64-query chunk over 100 keys (NoValidChoicesError);
        # the model's prefill then runs sdpa for the rest of the process (test_chunked_prefill_...). Only that
        # known compile failure of the flex candidate is tolerated: a wrong result, or any split failure, fails.
        if impl == "flex" and "NoValidChoices" in str(exc):
            pytest.xfail(f"flex candidate does not compile for chunk {chunk} over {past}: {str(exc)[:200]}")
        raise
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    e_out, e_today = rel_err(out, ref), rel_err(today, ref)
    print(f"{impl} chunk {chunk} over {past}: rel err {e_out:.2e} (sdpa {e_today:.2e})")
    assert e_out < BF16_TOL and e_out < 2 * e_today + 1e-3


@pytest.mark.parametrize("kernel", [k for k in LSE_KERNELS if k != "math"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_each_lse_kernel_returns_the_natural_log_sum_exp(kernel, is_causal):
    """The private aten ops split relies on: output and LSE (natural log, [B, H, Tq]) of every kernel."""
    t = 1000
    q, k, v = _qkv(t, 0, seed=7)
    try:
        out, lse = sdpa_with_lse(q, k, v, is_causal=is_causal, kernel=kernel)
    except RuntimeError as exc:
        pytest.skip(f"{kernel} cannot run here: {str(exc)[:200]}")
    kr, vr = k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1)
    scores = (q.float() @ kr.transpose(-1, -2)) * 128**-0.5
    if is_causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    assert lse.shape == (1, 32, t) and lse.dtype == torch.float32
    assert (lse - torch.logsumexp(scores, -1)).abs().max().item() < 5e-2
    assert rel_err(out, torch.softmax(scores, -1) @ vr) < BF16_TOL


def test_split_kernel_choice_is_printed():
    q, k, v = _qkv(2048, 4096)
    prefix = sdpa_backend(q, k[:, :, :4096], v[:, :, :4096], False)
    own = sdpa_backend(q, k[:, :, 4096:], v[:, :, 4096:], True)
    print(f"split on {torch.cuda.get_device_name()}: prefix part -> {prefix}, own chunk -> {own}")
    assert prefix in LSE_KERNELS and own in LSE_KERNELS


def test_kernels_each_implementation_runs():
    """Profiler view of one chunk over a cache per implementation (printed; checks only that each ran)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _qkv(2048, 8192)
    for impl in ("sdpa", "split", "flex"):
        prefill_chunk_attention(q, k, v, impl=impl)  # compile / plan first
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill_chunk_attention(q, k, v, impl=impl)
            torch.cuda.synchronize()
        names = sorted({e.name[:90] for e in prof.events() if "CUDA" in str(getattr(e, "device_type", ""))})
        print(f"{impl}: {names}")
        assert names


def test_flex_does_not_recompile_as_the_cache_grows():
    import torch._dynamo

    prefill_chunk_attention(*_qkv(1024, 1024), impl="flex")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for past in (2048, 3072, 5000):
        q, k, v = _qkv(1024, past, seed=past)
        out = prefill_chunk_attention(q, k, v, impl="flex")
        assert rel_err(out, eager_attention(q.float(), k.float(), v.float(), None)) < BF16_TOL
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("impl", ["split", "flex"])
@torch.no_grad()
def test_chunked_prefill_with_candidate_matches_sdpa(impl):
    """A small bf16 model (HyPE attention, Lightning, attention) through a static cache: same last logits."""
    config = HybridConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        layer_types=["attention", "lightning", "attention"], attention_output_gate=True, hype_base=500.0,
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    ids = torch.randint(0, 512, (1, 3000), device=DEVICE)
    results = {}
    for name in ("sdpa", impl):
        cache = StaticHybridCache.from_config(config, 3072, 1, dtype=torch.bfloat16, device=DEVICE)
        with use_prefill_attention(name):
            results[name], _ = chunked_prefill(model, ids, chunk_size=1024, cache=cache)
    assert prefill_attention_error(impl) is None
    assert rel_err(results[impl], results["sdpa"]) < BF16_TOL
