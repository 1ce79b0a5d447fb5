"""Batched inference is exact (issue 3): cache carried across pieces, left padding, packed sequences
(cu_seqlens), HF generate (greedy, sampling, stop tokens, batches, continuation) and chunked prefill.
Also the kernel-dispatch switch and the log-decay checks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import hybridize  # noqa: F401  (registers the Auto classes)
from hybridize import HybridCache
from hybridize.convert.transfer import build_student
from hybridize.inference import chunked_prefill
from hybridize.layers import mixers
from hybridize.models.modeling import positions_from_cu_seqlens
from hybridize.ops import backend
from hybridize.ops.attention import eager_attention, softmax_attention, varlen_causal_mask
from hybridize.ops.lightning import (
    check_cu_seqlens,
    chunk_lightning_ref,
    lightning_attention,
    lightning_log_decay,
    recurrent_lightning_ref,
)

HYBRID = ["lightning", "attention", "lightning", "attention"]
# generate's name for a cache passed in: `cache` since transformers 5.24 (`past_key_values` warns), before
# that `past_key_values`
GEN_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TOL = 1e-4
LENGTHS = (37, 91)  # packed: cu_seqlens = [0, 37, 128]


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _ids(b: int, t: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _student(make_teacher, kind: str = "llama", hype_base: float | None = 3.0, layer_types=HYBRID):
    """Hybrid with every path on: Lightning, NoPE attention with output gate and HyPE (a small base makes
    wrong positions very visible)."""
    teacher = make_teacher(kind)
    student, _ = build_student(teacher, list(layer_types), attention_output_gate=True, hype_base=hype_base)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("o_norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return student.eval()


def _random_pieces(total: int, seed: int) -> list[int]:
    """Split ``total`` into pieces: many of 1-3 tokens, some longer ones crossing the 64-token chunk."""
    gen = torch.Generator().manual_seed(seed)
    pieces, left = [], total
    while left:
        n = int(torch.randint(1, 4, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.6 else int(
            torch.randint(4, 80, (1,), generator=gen)
        )
        n = min(n, left)
        pieces.append(n)
        left -= n
    return pieces


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[-1] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[-1] :] = r.reshape(-1)
        mask[i, width - r.shape[-1] :] = 1
    return ids, mask


def _greedy(model, ids: torch.Tensor, n: int, **kw) -> torch.Tensor:
    mask = kw.pop("attention_mask", torch.ones_like(ids))
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


# ---------------------------------------------------------------------------------------- dispatch switch


def test_cpu_uses_reference_and_sdpa():
    assert backend.lightning_backend(torch.device("cpu")) == "reference"
    assert backend.attention_backend(torch.device("cpu")) == "sdpa"
    with backend.force_reference():
        assert backend.reference_forced()
        with backend.force_reference():  # nests
            assert backend.attention_backend(torch.device("cpu")) == "reference"
        assert backend.reference_forced()
    assert not backend.reference_forced()
    with backend.force_reference(enabled=False):
        assert not backend.reference_forced()


def test_force_reference_env_and_no_fla_import_on_cpu():
    """A fresh interpreter: importing hybridize (and running a model) never imports fla or our Triton kernels (torch
    may import triton itself where it is installed); the env switch works."""
    code = (
        "import sys, torch, hybridize\n"
        "from hybridize.ops import backend\n"
        "from hybridize import HybridConfig, HybridForCausalLM\n"
        "cfg = HybridConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,\n"
        "    num_attention_heads=2, layer_types=['lightning', 'attention'])\n"
        "HybridForCausalLM(cfg)(torch.zeros(1, 3, dtype=torch.long))\n"
        "assert 'fla' not in sys.modules and 'hybridize.ops._triton_select_kernels' not in sys.modules, 'GPU kernels imported'\n"
        "print(backend.reference_forced(), backend.attention_backend(torch.device('cpu')))\n"
    )
    env = dict(os.environ, HYBRIDIZE_FORCE_REFERENCE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "reference"]


def test_dispatch_logged_once(caplog):
    backend._logged.discard("lightning-cpu")
    q = torch.randn(1, 3, 2, 4)
    with caplog.at_level(logging.INFO, logger="hybridize"):
        for _ in range(3):
            lightning_attention(q, q, q, lightning_log_decay(2))
    assert sum("Lightning on cpu" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("force", [False, True])
def test_attention_paths_agree(force):
    """SDPA (is_causal / enable_gqa / masks) == eager reference in every mask case."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k = torch.randn(2, 2, 9, 8, generator=gen)
    v = torch.randn(2, 2, 9, 8, generator=gen)
    mask2d = torch.ones(2, 9, dtype=torch.long)
    mask2d[0, :3] = 0
    from hybridize.ops.attention import attention_mask_4d

    cases = [
        (q, None),  # full causal
        (q[:, :, -1:], None),  # one decode token over a cache
        (q[:, :, -4:], None),  # chunk over a cache: lower-right causal
        (q, attention_mask_4d(mask2d, 9, 9, q.device)),
        (q[:, :, -2:], attention_mask_4d(mask2d, 2, 9, q.device)),
    ]
    for qq, mask in cases:
        with backend.force_reference(force):
            got = softmax_attention(qq, k, v, mask)
        expected = eager_attention(qq.double(), k.double(), v.double(), mask).float()
        assert _max_diff(got, expected) < 1e-5


# ---------------------------------------------------------------------------------------- log-decay checks


def test_layer_rejects_non_negative_decay_at_init(make_teacher, monkeypatch):
    teacher = make_teacher("llama")
    from hybridize import HybridConfig

    config = HybridConfig.from_teacher_config(teacher.config, layer_types=HYBRID)
    monkeypatch.setattr(mixers, "lightning_log_decay", lambda h: torch.zeros(h))
    with pytest.raises(ValueError, match="strictly negative"):
        mixers.LightningAttention(config, 0)


@pytest.mark.parametrize("bad", [0.0, 0.3, float("nan"), float("-inf")])
def test_op_rejects_bad_decay_even_unchecked_on_cpu(bad):
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="strictly negative"):
        lightning_attention(q, q, q, torch.tensor([-0.5, bad]), check_decay=False)


# ---------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_random_pieces_with_carried_state_equal_one_pass(seed):
    heads, d, t = 5, 8, 170
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, t, heads, d, generator=gen) for _ in range(3))
    decay = lightning_log_decay(heads)
    o_full, s_full = chunk_lightning_ref(q, k, v, decay, output_final_state=True)
    state, outs, start = None, [], 0
    for n in _random_pieces(t, seed):
        o, state = lightning_attention(
            q[:, start : start + n], k[:, start : start + n], v[:, start : start + n], decay,
            initial_state=state, output_final_state=True,
        )
        outs.append(o)
        start += n
    assert _max_diff(torch.cat(outs, 1), o_full) < 1e-4
    assert _max_diff(state, s_full) < 1e-4


@pytest.mark.parametrize("kind,seed", [("llama_bias", 0), ("qwen3", 1), ("llama", 2)])
def test_model_random_pieces_with_cache_equal_one_pass(make_teacher, kind, seed):
    student = _student(make_teacher, kind)
    ids = _ids(2, 150, seed=seed)
    pieces = _random_pieces(ids.shape[1], seed)
    assert any(n <= 3 for n in pieces) and any(n > 3 for n in pieces)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        cache, outs, start = HybridCache(student.config.layer_types), [], 0
        for n in pieces:
            outs.append(student(ids[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
    assert cache.get_seq_length() == ids.shape[1]
    assert _max_diff(torch.cat(outs, 1), full) < TOL


def test_model_random_pieces_left_padded_batch(make_teacher):
    """Left-padded rows fed in random pieces (mask for the whole sequence so far) == each row alone."""
    student = _student(make_teacher, "qwen3")
    rows = [_ids(1, 70, seed=3), _ids(1, 41, seed=4)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        cache, outs, start = HybridCache(student.config.layer_types), [], 0
        for n in _random_pieces(ids.shape[1], 5):
            end = start + n
            outs.append(student(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
            start = end
        got = torch.cat(outs, 1)
        for i, row in enumerate(rows):
            alone = student(row, use_cache=False).logits[0]
            assert _max_diff(got[i, ids.shape[1] - row.shape[1] :], alone) < TOL


def test_right_padding_with_cache_rejected(make_teacher):
    student = _student(make_teacher)
    ids = _ids(1, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left"):
        student(ids, attention_mask=mask, use_cache=True)
    student(ids, attention_mask=mask, use_cache=False)  # fine without a cache


# ---------------------------------------------------------------------------------------- left padding


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_five_left_pads_equal_unpadded(make_teacher, kind):
    student = _student(make_teacher, kind)
    ids = _ids(1, 30, seed=6)
    padded = torch.cat([torch.full((1, 5), 7), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        ref = student(ids, use_cache=False).logits
        got = student(padded, attention_mask=mask, use_cache=False).logits
    assert _max_diff(got[:, 5:], ref) < TOL
    expected = _greedy(student, ids, 8)
    out = _greedy(student, padded, 8, attention_mask=mask)
    assert torch.equal(out[:, 5:], expected)


def test_padding_never_reaches_state_or_kv(make_teacher):
    """Changing the pad tokens' ids changes nothing for real tokens, in the Lightning state or the logits."""
    student = _student(make_teacher, "llama")
    ids = _ids(1, 20, seed=8)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        results = []
        for pad_id in (0, 99):
            padded = torch.cat([torch.full((1, 5), pad_id), ids], 1)
            out = student(padded, attention_mask=mask, use_cache=True)
            results.append((out.logits[:, 5:], _cache_of(out)))
    (l1, c1), (l2, c2) = results
    assert _max_diff(l1, l2) < 1e-6
    for i, kind in enumerate(HYBRID):
        if kind == "lightning":
            assert _max_diff(c1.recurrent_states[i], c2.recurrent_states[i]) < 1e-6


@pytest.mark.parametrize("kind", ["llama_bias", "qwen3"])
def test_batch_of_four_generate_matches_each_alone(make_teacher, kind):
    student = _student(make_teacher, kind)
    rows = [_ids(1, n, seed=10 + n) for n in (5, 17, 33, 70)]  # 70 crosses a 64-token Lightning chunk
    ids, mask = _left_pad(rows)
    out = _greedy(student, ids, 8, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = _greedy(student, row, 8)
        assert torch.equal(out[i, ids.shape[1] :], alone[0, row.shape[1] :]), i


# ---------------------------------------------------------------------------------------- generate


def test_generate_sampling(make_teacher):
    student = _student(make_teacher)
    ids = _ids(2, 10, seed=12)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, pad_token_id=0)
    greedy = student.generate(ids, do_sample=False, **kw)
    torch.manual_seed(5)
    a = student.generate(ids, do_sample=True, temperature=1.5, **kw)
    torch.manual_seed(5)
    b = student.generate(ids, do_sample=True, temperature=1.5, **kw)
    assert torch.equal(a, b) and a.shape == greedy.shape
    assert not torch.equal(a, greedy)
    torch.manual_seed(6)
    assert torch.equal(student.generate(ids, do_sample=True, top_k=1, **kw), greedy)


def test_generate_stop_tokens(make_teacher):
    student = _student(make_teacher)
    rows = [_ids(1, 9, seed=13), _ids(1, 14, seed=14)]
    ids, mask = _left_pad(rows)
    free = _greedy(student, ids, 10, attention_mask=mask)
    width = ids.shape[1]
    stop = int(free[0, width + 3])  # row 0's 4th new token
    other = int(free[1, width:].max()) + 1 if int(free[1, width:].max()) < 127 else 127
    out = _greedy(student, ids, 10, attention_mask=mask, eos_token_id=[other, stop])
    new0 = out[0, width:].tolist()
    first = new0.index(stop)
    assert first <= 3 and all(t == 0 for t in new0[first + 1 :])  # pad after the stop token
    assert out[0, width : width + first + 1].tolist() == free[0, width : width + first + 1].tolist()
    new1, free1 = out[1, width:].tolist(), free[1, width:].tolist()
    end1 = next((i for i, t in enumerate(free1) if t in (stop, other)), len(free1) - 1)
    assert new1[: end1 + 1] == free1[: end1 + 1]  # row 1 unaffected by row 0 stopping


def test_generate_continues_from_returned_cache(make_teacher):
    student = _student(make_teacher, "qwen3")
    rows = [_ids(1, 11, seed=15), _ids(1, 6, seed=16)]
    ids, mask = _left_pad(rows)
    full = _greedy(student, ids, 10, attention_mask=mask)
    first = student.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache = _cache_of(first)
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == ids.shape[1] + 3
    seq = first.sequences
    mask2 = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=torch.long)], 1)
    second = student.generate(
        seq, attention_mask=mask2, max_new_tokens=6, do_sample=False, pad_token_id=0, **{GEN_CACHE: cache}
    )
    assert torch.equal(second, full)


def test_chunked_prefill_then_generate(make_teacher):
    """A prompt prefilled in chunks, then handed to generate with its cache == generate from scratch."""
    student = _student(make_teacher)
    ids = _ids(2, 90, seed=17)
    full = _greedy(student, ids, 6)
    _, cache = chunked_prefill(student, ids[:, :-1], chunk_size=16)
    out = _greedy(student, ids, 6, **{GEN_CACHE: cache})
    assert torch.equal(out, full)


def test_generate_with_hf_prefill_chunking(make_teacher):
    student = _student(make_teacher)
    ids = _ids(2, 50, seed=18)
    full = _greedy(student, ids, 5)
    cache = HybridCache(student.config.layer_types)
    try:
        out = _greedy(student, ids, 5, prefill_chunk_size=16, **{GEN_CACHE: cache})
    except (TypeError, ValueError) as exc:  # transformers without prefill_chunk_size
        pytest.skip(f"this transformers has no generate(prefill_chunk_size=): {exc}")
    assert torch.equal(out, full)


# ---------------------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_prefill_equals_one_forward(make_teacher, chunk_size):
    student = _student(make_teacher, "qwen3")
    rows = [_ids(1, 77, seed=19), _ids(1, 50, seed=20)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        full = student(ids, attention_mask=mask, use_cache=True)
        last, cache = chunked_prefill(student, ids, chunk_size=chunk_size, attention_mask=mask)
        assert last.shape == (2, student.config.vocab_size)
        assert _max_diff(last, full.logits[:, -1]) < TOL
        # the caches agree: one more step from each gives the same logits
        nxt = _ids(2, 1, seed=21)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        a = student(nxt, attention_mask=mask2, cache=_cache_of(full)).logits
        b = student(nxt, attention_mask=mask2, cache=cache).logits
    assert _max_diff(a, b) < TOL


def test_chunked_prefill_bad_input(make_teacher):
    student = _student(make_teacher)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(student, _ids(1, 4), chunk_size=0)
    with pytest.raises(ValueError, match="attention_mask"):
        chunked_prefill(student, _ids(1, 4), attention_mask=torch.ones(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------- packed sequences


def _packed_qkv(heads=4, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    return [torch.randn(1, t, heads, d, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fn", [chunk_lightning_ref, recurrent_lightning_ref, lightning_attention])
def test_lightning_packed_equals_separate(fn, index_dtype):
    q, k, v = _packed_qkv()
    decay = lightning_log_decay(4)
    cu = torch.tensor([0, 37, 128], dtype=index_dtype)
    gen = torch.Generator().manual_seed(1)
    s0 = torch.randn(2, 4, 8, 8, generator=gen)
    for init in (None, s0):
        o, s = fn(q, k, v, decay, initial_state=init, output_final_state=True, cu_seqlens=cu)
        assert o.shape == q.shape and s.shape == (2, 4, 8, 8) and s.dtype == torch.float32
        for i, (a, b) in enumerate([(0, 37), (37, 128)]):
            o_i, s_i = fn(
                q[:, a:b], k[:, a:b], v[:, a:b], decay,
                initial_state=None if init is None else init[i : i + 1], output_final_state=True,
            )
            assert _max_diff(o[:, a:b], o_i) < 1e-5
            assert _max_diff(s[i : i + 1], s_i) < 1e-5


def test_lightning_packed_no_leak():
    """Changing sequence 1 changes nothing of sequence 2 (outputs or state)."""
    q, k, v = _packed_qkv(seed=2)
    decay = lightning_log_decay(4)
    cu = torch.tensor([0, 37, 128])
    o1, s1 = lightning_attention(q, k, v, decay, output_final_state=True, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, :37] += 5.0
    v2[:, :37] -= 3.0
    o2, s2 = lightning_attention(q, k2, v2, decay, output_final_state=True, cu_seqlens=cu)
    assert _max_diff(o1[:, 37:], o2[:, 37:]) == 0 and _max_diff(s1[1], s2[1]) == 0
    assert _max_diff(o1[:, :37], o2[:, :37]) > 1e-2


def test_cu_seqlens_validation():
    q, k, v = _packed_qkv()
    decay = lightning_log_decay(4)
    for bad in ([0, 37, 127], [1, 37, 128], [0, 37, 37, 128], [0, 91, 37, 128]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            lightning_attention(q, k, v, decay, cu_seqlens=torch.tensor(bad))
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attention(q, k, v, decay, cu_seqlens=torch.tensor([0.0, 128.0]))
    with pytest.raises(ValueError, match="batch"):
        check_cu_seqlens(torch.tensor([0, 4]), 4, batch=2)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, decay, initial_state=torch.zeros(1, 4, 8, 8), cu_seqlens=torch.tensor([0, 37, 128]))


@pytest.mark.parametrize("force", [False, True])
def test_attention_packed_equals_separate(force):
    gen = torch.Generator().manual_seed(3)
    t = sum(LENGTHS)
    q = torch.randn(1, 4, t, 8, generator=gen)
    k = torch.randn(1, 2, t, 8, generator=gen)
    v = torch.randn(1, 2, t, 8, generator=gen)
    cu = torch.tensor([0, 37, 128], dtype=torch.int32)
    with backend.force_reference(force):
        o = softmax_attention(q, k, v, None, cu_seqlens=cu)
        for a, b in [(0, 37), (37, 128)]:
            o_i = softmax_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)
            assert _max_diff(o[:, :, a:b], o_i) < 1e-5
    mask = varlen_causal_mask(cu, t, q.device)
    assert mask.shape == (1, 1, t, t) and not bool(mask[0, 0, 40, 10]) and bool(mask[0, 0, 40, 37])


@pytest.mark.parametrize("kind", ["llama_bias", "qwen3"])
def test_model_packed_equals_separate(make_teacher, kind):
    student = _student(make_teacher, kind)
    seqs = [_ids(1, n, seed=30 + n) for n in LENGTHS]
    packed = torch.cat(seqs, 1)
    cu = torch.tensor([0, 37, 128])
    with torch.no_grad():
        out = student(packed, cu_seqlens=cu)
        assert _cache_of(out) is None  # packed runs keep no cache
        for (a, b), seq in zip([(0, 37), (37, 128)], seqs):
            alone = student(seq, use_cache=False).logits
            assert _max_diff(out.logits[:, a:b], alone) < TOL
        # positions restart at 0 in each sequence
        assert positions_from_cu_seqlens(cu, 128, "cpu")[0, [0, 36, 37, 127]].tolist() == [0, 36, 0, 90]
        # the loss never predicts across a boundary: equal to the two losses weighted by their targets
        loss = student(packed, labels=packed, cu_seqlens=cu).loss
        parts = [student(s, labels=s, use_cache=False).loss for s in seqs]
        expected = (parts[0] * 36 + parts[1] * 90) / 126
    assert abs(loss.item() - expected.item()) < 1e-5


def test_model_packed_gradients_do_not_leak(make_teacher):
    student = _student(make_teacher, "llama")
    packed = torch.cat([_ids(1, n, seed=40 + n) for n in LENGTHS], 1)
    emb = student.get_input_embeddings()(packed).detach().requires_grad_(True)
    out = student(inputs_embeds=emb, cu_seqlens=torch.tensor([0, 37, 128])).logits
    out[:, 37:].sum().backward()
    assert emb.grad[:, :37].abs().max() == 0 and emb.grad[:, 37:].abs().max() > 0


def test_model_packed_bad_combinations(make_teacher):
    student = _student(make_teacher)
    packed = _ids(1, 128)
    cu = torch.tensor([0, 37, 128])
    with pytest.raises(ValueError, match="cache"):
        student(packed, cu_seqlens=cu, use_cache=True)
    with pytest.raises(ValueError, match="batch"):
        student(_ids(2, 128), cu_seqlens=cu)
    mask = torch.ones(1, 128, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        student(packed, cu_seqlens=cu, attention_mask=mask)
