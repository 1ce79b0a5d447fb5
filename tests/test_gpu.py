"""GPU kernels against the PyTorch reference (issue 3). Needs CUDA and fla; skipped elsewhere.

Run on a CUDA machine with fla-core and flash-linear-attention installed::

    python -m pytest -q -m gpu tests/test_gpu.py

Every fast path (fla ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` for Lightning, SDPA for softmax
attention) is compared with the reference path (:func:`hybridize.ops.backend.force_reference`) on the same
GPU, by relative RMS error ``||fast - ref|| / ||ref||``, forward and gradients, fp32 and bf16, over
awkward lengths. Fresh allocations are filled with NaN (torch's deterministic mode) so a kernel that reads
memory it never wrote (a ragged tail chunk, say) shows up as a non-finite result.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from hybridize import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.layers.common import RotaryEmbedding
from hybridize.layers.mixers import HyPEAttention, LightningAttention
from hybridize.ops import backend
from hybridize.ops.attention import softmax_attention
from hybridize.ops.lightning import lightning_attention, lightning_log_decay

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and importlib.util.find_spec("fla") is not None),
        reason="needs a CUDA GPU and fla (pip install 'hybridize[gpu]')",
    ),
]

DEVICE = "cuda"
LENGTHS = [1, 63, 64, 65, 100, 500, 4097]
DTYPES = [torch.float32, torch.bfloat16]
# fp32 runs through tf32 tensor cores inside fla's Triton kernels: measured 1.5e-3 on an H200 (fla 0.6.0,
# outputs and gradients, every T); bf16 rounds every stored intermediate: measured 2-3e-3
TOL = {torch.float32: 3e-3, torch.bfloat16: 2e-2}
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2's attention shape (9 heads: non-power-of-two ALiBi slopes)


@pytest.fixture(autouse=True)
def _nan_filled_allocations():
    """Fill every uninitialised allocation with NaN for the duration of a test (deterministic mode, warn only)."""
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    old_det, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "... does not have a deterministic implementation"
        yield
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``||fast - ref|| / ||ref||`` in float64."""
    fast, ref = fast.detach().double(), ref.detach().double()
    return ((fast - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _assert_close(name: str, fast: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert fast.shape == ref.shape, (name, fast.shape, ref.shape)
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    if not ref.detach().any():
        # a mathematically zero gradient (one query over one key: softmax is constant, dq = dk = 0); the
        # fast kernel leaves rounding noise there, which no relative measure can judge
        return
    err = rel_err(fast, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_fast_paths_are_selected():
    assert backend.lightning_backend(torch.device(DEVICE)) == "fla"
    assert backend.attention_backend(torch.device(DEVICE)) == "sdpa"
    with backend.force_reference():
        assert backend.lightning_backend(torch.device(DEVICE)) == "reference"


# ---------------------------------------------------------------------------------------- Lightning op


def _lightning_inputs(b, t, dtype, seed, n_states=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(b, t, HEADS, HEAD_DIM, device=DEVICE, generator=gen).to(dtype) for _ in range(3))
    h0 = 0.1 * torch.randn(n_states or b, HEADS, HEAD_DIM, HEAD_DIM, device=DEVICE, generator=gen)
    return [x.requires_grad_(True) for x in (q, k, v, h0)]


def _lightning_run(q, k, v, h0, reference: bool, **kw):
    decay = lightning_log_decay(HEADS).to(DEVICE)
    with backend.force_reference(reference):
        o, s = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator(device=DEVICE).manual_seed(99)
    w_o = torch.randn(o.shape, device=DEVICE, generator=gen)
    w_s = torch.randn(s.shape, device=DEVICE, generator=gen)
    loss = (o.float() * w_o).sum() + (s * w_s).sum()
    return o, s, _grads(loss, (q, k, v, h0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", LENGTHS)
def test_lightning_op_fla_vs_reference(t, dtype):
    q, k, v, h0 = _lightning_inputs(2, t, dtype, seed=t)
    o, s, grads = _lightning_run(q, k, v, h0, reference=False)
    # the reference sees the same (rounded) values, upcast to fp32
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v, h0)]
    o_r, s_r, grads_r = _lightning_run(*ref_in, reference=True)
    assert o.dtype == dtype and s.dtype == torch.float32 and s.shape == (2, HEADS, HEAD_DIM, HEAD_DIM)
    tol = TOL[dtype]
    _assert_close("o", o, o_r, tol)
    _assert_close("final_state", s, s_r, tol)
    for name, g, g_r in zip(("dq", "dk", "dv", "dh0"), grads, grads_r):
        _assert_close(name, g, g_r, tol)


@pytest.mark.parametrize("t", [65, 100])
def test_lightning_bf16_tail_chunk_finite(t):
    """The ragged last chunk (64 < t < 128) stays finite and accurate in bf16, forward and backward."""
    q, k, v, h0 = _lightning_inputs(2, t, torch.bfloat16, seed=7 * t)
    o, s, grads = _lightning_run(q, k, v, h0, reference=False)
    tail = o[:, 64:]
    assert torch.isfinite(tail).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(g).all() for g in grads)
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v, h0)]
    o_r, _, _ = _lightning_run(*ref_in, reference=True)
    _assert_close("tail", tail, o_r[:, 64:], TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [[0, 37, 128], [0, 37, 128, 1100, 4097], [0, 1, 65, 66]])
def test_lightning_varlen_fla_vs_reference(offsets, dtype):
    cu = torch.tensor(offsets, device=DEVICE)
    q, k, v, h0 = _lightning_inputs(1, offsets[-1], dtype, seed=len(offsets), n_states=len(offsets) - 1)
    o, s, grads = _lightning_run(q, k, v, h0, reference=False, cu_seqlens=cu)
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v, h0)]
    o_r, s_r, grads_r = _lightning_run(*ref_in, reference=True, cu_seqlens=cu)
    assert s.shape == (len(offsets) - 1, HEADS, HEAD_DIM, HEAD_DIM)
    tol = TOL[dtype]
    _assert_close("o", o, o_r, tol)
    _assert_close("final_state", s, s_r, tol)
    for name, g, g_r in zip(("dq", "dk", "dv", "dh0"), grads, grads_r):
        _assert_close(name, g, g_r, tol)


def test_lightning_decode_steps_match_chunked():
    """fla's chunk kernel state feeds its fused-recurrent decode kernel (same [N, H, K, V] layout)."""
    q, k, v, _ = (x.detach() for x in _lightning_inputs(2, 200, torch.float32, seed=3))
    decay = lightning_log_decay(HEADS).to(DEVICE)
    with torch.no_grad():
        o_full, _ = lightning_attention(q, k, v, decay, output_final_state=True)
        o1, state = lightning_attention(q[:, :150], k[:, :150], v[:, :150], decay, output_final_state=True)
        outs = [o1]
        for i in range(150, 200):
            o, state = lightning_attention(
                q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], decay, initial_state=state, output_final_state=True
            )
            outs.append(o)
    _assert_close("decode", torch.cat(outs, 1), o_full, TOL[torch.float32])


# ---------------------------------------------------------------------------------------- layers


def _config(**kw) -> HybridConfig:
    base = dict(
        vocab_size=512,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layer_types=["lightning", "attention", "lightning", "attention"],
        attention_output_gate=True,
        hype_base=500.0,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.05,
    )
    base.update(kw)
    return HybridConfig(**base)


def _layer_fast_vs_reference(layer_cls, t, dtype, seed):
    config = _config()
    torch.manual_seed(seed)
    layer = layer_cls(config, 0).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # perturb norm weights away from ones so their use is checked
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    rotary = RotaryEmbedding(config)
    x = torch.randn(2, t, config.hidden_size, device=DEVICE, dtype=dtype)
    positions = torch.arange(t, device=DEVICE).unsqueeze(0).expand(2, t)
    rope = rotary(positions, dtype)
    params = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.o_proj.weight]
    results = []
    for reference in (False, True):
        xi = x.clone().requires_grad_(True)
        with backend.force_reference(reference):
            y = layer(xi, rope, positions, None, None)
        w = torch.randn(y.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
        grads = _grads((y.float() * w).sum(), [xi, *params])
        results.append((y, grads))
    (y, grads), (y_r, grads_r) = results
    tol = TOL[dtype]
    _assert_close("y", y, y_r, tol)
    for name, g, g_r in zip(("dx", "dWq", "dWk", "dWv", "dWo"), grads, grads_r):
        _assert_close(name, g, g_r, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", LENGTHS)
def test_lightning_layer_fast_vs_reference(t, dtype):
    _layer_fast_vs_reference(LightningAttention, t, dtype, seed=t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", LENGTHS)
def test_attention_layer_fast_vs_reference(t, dtype):
    _layer_fast_vs_reference(HyPEAttention, t, dtype, seed=t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_varlen_fast_vs_reference(dtype):
    offsets = [0, 37, 128, 1100, 4097]
    cu = torch.tensor(offsets, device=DEVICE, dtype=torch.int32)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    t = offsets[-1]
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=DEVICE, generator=gen).to(dtype)
    k = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=DEVICE, generator=gen).to(dtype)
    o = softmax_attention(q, k, v, None, cu_seqlens=cu)
    with backend.force_reference():
        o_r = softmax_attention(q.float(), k.float(), v.float(), None, cu_seqlens=cu)
    _assert_close("o", o, o_r, TOL[dtype])
    # and equal to each sequence alone
    for a, b in zip(offsets, offsets[1:]):
        alone = softmax_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)
        _assert_close(f"seq {a}:{b}", o[:, :, a:b], alone, 1e-6)


# ---------------------------------------------------------------------------------------- whole model


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return HybridForCausalLM(_config()).to(device=DEVICE, dtype=dtype).eval()


def _ids(b, t, seed=0):
    return torch.randint(0, 512, (b, t), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_fast_vs_reference(dtype):
    model = _model(dtype)
    ids = _ids(2, 300)
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        with backend.force_reference():
            ref = model(ids, use_cache=False).logits
    _assert_close("logits", fast, ref, TOL[dtype])


def test_model_prefill_then_decode_equals_full_forward():
    """Chunk kernel prefill + fused-recurrent decode + SDPA over the cache == one pass; and the fast path's
    cache is readable by the reference path (same state layout)."""
    model = _model()
    ids = _ids(2, 150, seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :100], use_cache=True)
        cache, pieces = _cache_of(out), [out.logits]
        for i in range(100, 150):
            pieces.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
        _assert_close("decode", torch.cat(pieces, 1), full, TOL[torch.float32])
        cache = HybridCache(model.config.layer_types)
        model(ids[:, :120], cache=cache, use_cache=True)
        with backend.force_reference():
            tail = model(ids[:, 120:], cache=cache, use_cache=True).logits
    _assert_close("fast prefill, reference continuation", tail, full[:, 120:], TOL[torch.float32])


def test_model_left_padding_and_packing_on_gpu():
    model = _model()
    a, b = _ids(1, 37, seed=2), _ids(1, 91, seed=3)
    with torch.no_grad():
        alone = [model(x, use_cache=False).logits for x in (a, b)]
        padded = torch.cat([torch.zeros(1, 54, dtype=torch.long, device=DEVICE), a], 1)
        batch = torch.cat([padded, b], 0)
        mask = torch.ones_like(batch)
        mask[0, :54] = 0
        got = model(batch, attention_mask=mask, use_cache=True).logits
        _assert_close("padded row", got[0:1, 54:], alone[0], TOL[torch.float32])
        _assert_close("full row", got[1:2], alone[1], TOL[torch.float32])
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 37, 128], device=DEVICE)).logits
    _assert_close("packed 1", packed[:, :37], alone[0], TOL[torch.float32])
    _assert_close("packed 2", packed[:, 37:], alone[1], TOL[torch.float32])


def test_generate_batch_on_gpu():
    model = _model()
    rows = [_ids(1, n, seed=10 + n) for n in (5, 33, 70)]
    width = 70
    batch = torch.zeros(3, width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r, attention_mask=torch.ones_like(r), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, width:], alone[0, r.shape[1] :]), i
