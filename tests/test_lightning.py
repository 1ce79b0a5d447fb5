"""Lightning Attention references (SPEC 1a): chunked == recurrent == a naive double loop; ALiBi slopes."""

from __future__ import annotations

import math

import pytest
import torch

from hybridize.ops.lightning import (
    chunk_lightning_ref,
    lightning_attention,
    lightning_log_decay,
    lightning_slopes,
    recurrent_lightning_ref,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 5e-6) -> None:
    """fp32-tight comparison: elementwise rtol 1e-5 plus an absolute floor relative to the tensor's scale."""
    scale = expected.detach().abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=rel * scale)


def _inputs(b, t, h, dk, dv, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, s0)]


def naive_lightning(q, k, v, log_decay, scale, s0):
    """Double loop in float64: o_t = scale * (sum_{s<=t} g^(t-s) (q_t.k_s) v_s + g^(t+1) q_t S0)."""
    q, k, v, s0 = (x.detach().double() for x in (q, k, v, s0))
    b, t, h, _ = q.shape
    gamma = torch.exp(log_decay.double())
    o = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    final = torch.zeros_like(s0)
    for bi in range(b):
        for hi in range(h):
            g = gamma[hi].item()
            for ti in range(t):
                acc = g ** (ti + 1) * (q[bi, ti, hi] @ s0[bi, hi])
                for si in range(ti + 1):
                    acc = acc + g ** (ti - si) * torch.dot(q[bi, ti, hi], k[bi, si, hi]) * v[bi, si, hi]
                o[bi, ti, hi] = scale * acc
            st = g**t * s0[bi, hi]
            for si in range(t):
                st = st + g ** (t - 1 - si) * torch.outer(k[bi, si, hi], v[bi, si, hi])
            final[bi, hi] = st
    return o, final


@pytest.mark.parametrize("heads", [4, 5, 9])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 200])
def test_chunk_equals_recurrent_forward_and_grads(t, heads):
    b, d = 2, 16
    q, k, v, s0 = _inputs(b, t, heads, d, d, seed=t * 10 + heads, requires_grad=True)
    log_decay = lightning_log_decay(heads)
    gen = torch.Generator().manual_seed(7)
    w_o = torch.randn(b, t, heads, d, generator=gen)
    w_s = torch.randn(b, heads, d, d, generator=gen)

    results = []
    for fn in (chunk_lightning_ref, recurrent_lightning_ref):
        o, s = fn(q, k, v, log_decay, initial_state=s0, output_final_state=True)
        loss = (o * w_o).sum() + (s * w_s).sum()
        grads = torch.autograd.grad(loss, (q, k, v, s0))
        results.append((o.detach(), s.detach(), grads))

    (o_c, s_c, g_c), (o_r, s_r, g_r) = results
    assert o_c.shape == (b, t, heads, d) and s_c.shape == (b, heads, d, d)
    assert s_c.dtype == torch.float32
    _close(o_c, o_r)
    _close(s_c, s_r)
    for name, gc, gr in zip("q k v initial_state".split(), g_c, g_r):
        assert gc.abs().max() > 0, name
        _close(gc, gr)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("t", [63, 65, 200])
def test_chunk_size_does_not_change_result(t, chunk_size):
    heads, d = 5, 8
    q, k, v, s0 = _inputs(1, t, heads, d, d, seed=3)
    log_decay = lightning_log_decay(heads)
    o_ref, s_ref = recurrent_lightning_ref(q, k, v, log_decay, initial_state=s0, output_final_state=True)
    o, s = chunk_lightning_ref(q, k, v, log_decay, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    _close(o, o_ref)
    _close(s, s_ref)


@pytest.mark.parametrize("dk,dv", [(4, 4), (6, 3)])
@pytest.mark.parametrize("use_s0", [True, False])
def test_naive_double_loop(dk, dv, use_s0):
    b, t, heads = 2, 11, 3
    q, k, v, s0 = _inputs(b, t, heads, dk, dv, seed=11)
    if not use_s0:
        s0 = torch.zeros_like(s0)
    log_decay = torch.tensor([-0.05, -0.5, -1.3])
    scale = 0.37
    o_n, s_n = naive_lightning(q, k, v, log_decay, scale, s0)
    for kw in ({}, {"chunk_size": 4}):
        o, s = chunk_lightning_ref(
            q, k, v, log_decay, scale=scale, initial_state=s0 if use_s0 else None, output_final_state=True, **kw
        )
        _close(o.double(), o_n)
        _close(s.double(), s_n)
    o, s = recurrent_lightning_ref(
        q, k, v, log_decay, scale=scale, initial_state=s0 if use_s0 else None, output_final_state=True
    )
    _close(o.double(), o_n)
    _close(s.double(), s_n)


def test_default_scale_is_inverse_sqrt_dk():
    q, k, v, s0 = _inputs(1, 9, 2, 16, 16, seed=5)
    log_decay = lightning_log_decay(2)
    o_default, _ = chunk_lightning_ref(q, k, v, log_decay, initial_state=s0)
    o_explicit, _ = chunk_lightning_ref(q, k, v, log_decay, scale=0.25, initial_state=s0)
    torch.testing.assert_close(o_default, o_explicit, rtol=0, atol=0)
    o_n, _ = naive_lightning(q, k, v, log_decay, 1 / math.sqrt(16), s0)
    _close(o_default.double(), o_n)


def test_split_sequence_with_carried_state_equals_whole():
    """Prefill in two pieces (state carried) == one pass: the cache contract of the layer."""
    heads, d, t = 4, 8, 90
    q, k, v, _ = _inputs(2, t, heads, d, d, seed=9)
    log_decay = lightning_log_decay(heads)
    o_full, s_full = chunk_lightning_ref(q, k, v, log_decay, output_final_state=True)
    o1, s1 = chunk_lightning_ref(q[:, :70], k[:, :70], v[:, :70], log_decay, output_final_state=True)
    o2, s2 = lightning_attention(q[:, 70:], k[:, 70:], v[:, 70:], log_decay, initial_state=s1, output_final_state=True)
    _close(torch.cat([o1, o2], 1), o_full)
    _close(s2, s_full)
    # and one token at a time through the dispatcher (recurrent form)
    state, outs = None, []
    for i in range(t):
        o, state = lightning_attention(
            q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], log_decay, initial_state=state, output_final_state=True
        )
        outs.append(o)
    _close(torch.cat(outs, 1), o_full)
    _close(state, s_full)


def test_output_dtype_follows_q_and_state_is_fp32():
    q, k, v, s0 = _inputs(1, 5, 2, 4, 4, seed=1)
    log_decay = lightning_log_decay(2)
    for fn in (chunk_lightning_ref, recurrent_lightning_ref):
        o, s = fn(q.double(), k.double(), v.double(), log_decay, initial_state=s0, output_final_state=True)
        assert o.dtype == torch.float64 and s.dtype == torch.float32
        o, s = fn(q, k, v, log_decay, initial_state=s0)
        assert s is None


# ---------------------------------------------------------------------------------------------- slopes


def test_slopes_power_of_two_h8():
    expected = [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7, 2.0**-8]  # 2^(-8(h+1)/8)
    torch.testing.assert_close(lightning_slopes(8), torch.tensor(expected), rtol=0, atol=0)


def test_slopes_non_power_of_two_h9():
    # the 8 slopes of H=8, then every other slope of H=16 (2^(-0.5), 2^(-1.5), ...) until 9 are filled
    expected = [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7, 2.0**-8, 2.0**-0.5]
    torch.testing.assert_close(lightning_slopes(9), torch.tensor(expected), rtol=0, atol=0)


def test_slopes_non_power_of_two_h12_and_h1():
    expected = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(lightning_slopes(12), torch.tensor(expected), rtol=0, atol=0)
    torch.testing.assert_close(lightning_slopes(1), torch.tensor([2.0**-8]), rtol=0, atol=0)
    # H = 4 (power of two): 2^(-2), 2^(-4), 2^(-6), 2^(-8)
    torch.testing.assert_close(lightning_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]), rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, 3, 4, 5, 8, 9, 16, 24, 32])
def test_log_decay_strictly_negative(heads):
    log_decay = lightning_log_decay(heads)
    assert log_decay.shape == (heads,) and log_decay.dtype == torch.float32
    assert bool((log_decay < 0).all())
    assert bool((log_decay > -1).all())  # slopes are <= 2^-0.5 < 1
    torch.testing.assert_close(log_decay, -lightning_slopes(heads), rtol=0, atol=0)
    assert len(set(log_decay.tolist())) == heads  # every head has its own decay


def test_slopes_bad_head_count():
    with pytest.raises(ValueError, match="num_heads"):
        lightning_slopes(0)


@pytest.mark.parametrize("bad", [0.0, 0.1])
@pytest.mark.parametrize("fn", [chunk_lightning_ref, recurrent_lightning_ref, lightning_attention])
def test_non_negative_log_decay_raises(fn, bad):
    q, k, v, _ = _inputs(1, 4, 3, 4, 4)
    log_decay = torch.tensor([-0.5, bad, -0.1])
    with pytest.raises(ValueError, match="strictly negative"):
        fn(q, k, v, log_decay)


def test_bad_shapes_raise():
    q, k, v, s0 = _inputs(1, 4, 3, 4, 4)
    with pytest.raises(ValueError, match="log_decay"):
        chunk_lightning_ref(q, k, v, lightning_log_decay(2))
    with pytest.raises(ValueError, match="q, k"):
        chunk_lightning_ref(q, k[:, :3], v, lightning_log_decay(3))
    with pytest.raises(ValueError, match="initial_state"):
        recurrent_lightning_ref(q, k, v, lightning_log_decay(3), initial_state=s0[:, :2])


def test_fla_path_gets_one_dtype(monkeypatch):
    """Under autocast the RMS-normed q/k reach the op in fp32 while v is bf16; fla's kernels need one dtype
    (the H200 conversion failed with 'Both operands must be same dtype'). A stand-in kernel checks the cast."""
    from hybridize.ops import backend
    from hybridize.ops import lightning as L

    seen = {}

    def fake_kernel(q, k, v, g_gamma=None, scale=None, initial_state=None, output_final_state=False, **kw):
        seen["dtypes"] = {q.dtype, k.dtype, v.dtype}
        return torch.zeros_like(v), None

    monkeypatch.setattr(backend, "fla_lightning_kernels", lambda: (fake_kernel, fake_kernel))
    q = torch.randn(1, 5, 2, 4)
    v = torch.randn(1, 5, 2, 4).bfloat16()
    L._fla_lightning(q, q.clone(), v, L.lightning_log_decay(2), 0.5, None, False, None)
    assert seen["dtypes"] == {torch.bfloat16}
