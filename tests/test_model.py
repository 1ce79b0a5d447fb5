"""HybridForCausalLM (SPEC 1): teacher equivalence, cache consistency, generate, padding, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import hybridize  # noqa: F401  (registers the Auto classes)
from hybridize import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.convert.transfer import build_student

HYBRID = ["lightning", "attention", "lightning", "attention"]
TOL = 1e-4


def _cache_of(out):
    """The cache returned by forward (transformers >= 5.24 names the field `cache`, older `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _hybrid_student(make_teacher, kind: str, layer_types=HYBRID, hype_base: float = 500.0, **teacher_overrides):
    """Hybrid student exercising every path: NoPE attention with output gate and HyPE, Lightning layers."""
    teacher = make_teacher(kind, **teacher_overrides)
    student, _ = build_student(teacher, list(layer_types), attention_output_gate=True, hype_base=hype_base)
    # o_norm is ones after stage 0: perturb so a bug in how it is applied would show
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("o_norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return student.eval()


def _ids(b: int, t: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ 3. teacher equivalence

ROPE_VARIANTS = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_VARIANTS))
def test_all_attention_with_rope_reproduces_teacher(make_teacher, teacher_kind, rope):
    overrides = {} if ROPE_VARIANTS[rope] is None else {"rope_parameters": ROPE_VARIANTS[rope]}
    teacher = make_teacher(teacher_kind, **overrides)
    student, report = build_student(teacher, ["attention"] * teacher.config.num_hidden_layers, attention_rope=True)
    student.eval()
    assert report.fresh == [] and report.expanded == []
    ids = _ids(2, 37)
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids, use_cache=False).logits
    assert got.dtype == torch.float32
    assert _max_diff(got, expected) < TOL


def test_all_attention_with_rope_cached_decode_matches_teacher(make_teacher, teacher_kind):
    teacher = make_teacher(teacher_kind)
    student, _ = build_student(teacher, ["attention"] * 4, attention_rope=True)
    ids = _ids(2, 30)
    with torch.no_grad():
        expected = teacher(ids).logits
        out = student(ids[:, :25], use_cache=True)
        cache = _cache_of(out)
        steps = [student(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(25, 30)]
    assert _max_diff(torch.cat(steps, 1), expected[:, 25:]) < TOL


@pytest.mark.teacher
def test_all_attention_with_rope_reproduces_smollm2():
    from hybridize.convert.teachers import load_teacher

    teacher, tokenizer = load_teacher()
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= 10
    student, report = build_student(teacher, ["attention"] * teacher.config.num_hidden_layers, attention_rope=True)
    student.eval()
    assert report.fresh == []
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids, use_cache=False).logits
    assert _max_diff(got, expected) < TOL
    assert torch.equal(got[0, -1].argmax(), expected[0, -1].argmax())


# ------------------------------------------------------------------------------ 4. cache consistency


@pytest.mark.parametrize("kind", ["llama_bias", "qwen3"])
@pytest.mark.parametrize("prefill", [37, 70])  # 70 + 16 crosses the 64-token Lightning chunk boundary
def test_prefill_then_chunk_equals_full_forward(make_teacher, kind, prefill):
    student = _hybrid_student(make_teacher, kind)
    ids = _ids(2, prefill + 16, seed=1)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :prefill], use_cache=True)
        cache = _cache_of(out)
        assert isinstance(cache, HybridCache) and cache.get_seq_length() == prefill
        assert _max_diff(out.logits, full[:, :prefill]) < TOL
        nxt = student(ids[:, prefill:], past_key_values=cache, use_cache=True)
    assert _cache_of(nxt) is cache and cache.get_seq_length() == prefill + 16
    assert _max_diff(nxt.logits, full[:, prefill:]) < TOL


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("prefill", [1, 20])
def test_full_forward_equals_token_by_token_decode(make_teacher, kind, prefill):
    student = _hybrid_student(make_teacher, kind)
    ids = _ids(2, 40, seed=2)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :prefill], use_cache=True)
        cache, pieces = _cache_of(out), [out.logits]
        for i in range(prefill, ids.shape[1]):
            pieces.append(student(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    assert _max_diff(torch.cat(pieces, 1), full) < TOL


def test_cached_path_is_not_trivially_equal(make_teacher):
    """Guard: a wrong cache (fresh instead of carried) must change the logits, else the tests above prove nothing."""
    student = _hybrid_student(make_teacher, "llama")
    ids = _ids(1, 53, seed=3)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        fresh = student(ids[:, 37:], use_cache=False).logits
    assert _max_diff(fresh, full[:, 37:]) > 1e-2


def _greedy_no_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_generate_greedy_equals_manual_loop(make_teacher, kind):
    student = _hybrid_student(make_teacher, kind)
    ids = _ids(2, 12, seed=4)
    expected = _greedy_no_cache(student, ids, 10)
    out = student.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert isinstance(cache, HybridCache)


def test_cache_nbytes_formula(make_teacher):
    student = _hybrid_student(make_teacher, "qwen3")  # head_dim 24 != hidden / heads
    cfg = student.config
    b, t = 2, 37
    hkv, h, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    n_attn, n_light = HYBRID.count("attention"), HYBRID.count("lightning")

    def expected(tokens: int) -> int:
        return n_attn * 2 * b * hkv * tokens * d * 4 + n_light * b * h * d * d * 4

    with torch.no_grad():
        cache = _cache_of(student(_ids(b, t), use_cache=True))
        assert cache.nbytes() == expected(t)
        for i, kind in enumerate(HYBRID):
            if kind == "attention":
                assert cache.key_cache[i].shape == (b, hkv, t, d) and cache.recurrent_states[i] is None
            else:
                assert cache.recurrent_states[i].shape == (b, h, d, d) and cache.key_cache[i] is None
                assert cache.recurrent_states[i].dtype == torch.float32
        student(_ids(b, 1, seed=9), past_key_values=cache, use_cache=True)
        assert cache.nbytes() == expected(t + 1)
    assert HybridCache(HYBRID).nbytes() == 0


# ------------------------------------------------------------------------------ 6. save / load


@pytest.mark.parametrize("kind", ["llama_tied", "qwen3"])
def test_save_load_roundtrip(make_teacher, kind, tmp_path):
    student = _hybrid_student(make_teacher, kind)
    tied = student.config.tie_word_embeddings
    assert tied == (kind == "llama_tied")
    if tied:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    ids = _ids(2, 21, seed=5)
    with torch.no_grad():
        expected = student(ids, use_cache=False).logits
    student.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, HybridConfig)
    assert config.layer_types == HYBRID and config.schedule == "LALA"

    for loader in (HybridForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is HybridForCausalLM
        assert loaded.config.layer_types == HYBRID
        assert loaded.config.hype_base == 500.0 and loaded.config.attention_output_gate is True
        assert loaded.config.attention_rope is False
        assert loaded.config.qk_norm == (kind == "qwen3")
        assert loaded.config.head_dim == student.config.head_dim
        assert [layer.mixer_type for layer in loaded.model.layers] == HYBRID
        if tied:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        else:
            assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        for (n1, p1), (n2, p2) in zip(student.state_dict().items(), loaded.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), n1
        with torch.no_grad():
            got = loaded(ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 7. left padding


@pytest.mark.parametrize("hype_base", [500.0, 3.0])  # a small base makes wrong positions very visible
@pytest.mark.parametrize("kind", ["llama_bias", "qwen3"])
def test_left_padding_matches_unpadded(make_teacher, kind, hype_base):
    student = _hybrid_student(make_teacher, kind, hype_base=hype_base)
    ids = _ids(1, 23, seed=6)
    pad = 5
    padded = torch.cat([torch.full((1, pad), 3), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    nxt = _ids(1, 1, seed=7)
    with torch.no_grad():
        ref = student(ids, use_cache=True)
        got = student(padded, attention_mask=mask, use_cache=True)
        assert _max_diff(got.logits[:, -1], ref.logits[:, -1]) < TOL
        assert _max_diff(got.logits[:, pad:], ref.logits) < TOL
        # one cached decode step after the padded prefill, mask extended as generate does
        ref2 = student(nxt, past_key_values=_cache_of(ref), use_cache=True).logits
        mask2 = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        got2 = student(nxt, past_key_values=_cache_of(got), attention_mask=mask2, use_cache=True).logits
    assert _max_diff(got2, ref2) < TOL


def test_left_padded_batch_generate_matches_rows_alone(make_teacher):
    student = _hybrid_student(make_teacher, "llama")
    a, b = _ids(1, 9, seed=10), _ids(1, 14, seed=11)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b], 0)
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    out = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 5:], _greedy_no_cache(student, a, 6)[0])
    assert torch.equal(out[1], _greedy_no_cache(student, b, 6)[0])


# ------------------------------------------------------------------------------ 8. bad input


def test_config_wrong_length_layer_types():
    with pytest.raises(ValueError, match=r"layer_types has 3 entries .* 4 layers"):
        HybridConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, layer_types=["attention"] * 3)


def test_config_unknown_mixer():
    with pytest.raises(ValueError, match=r"unknown mixer types \['mamba'\].*supported"):
        HybridConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["attention", "mamba"]
        )


def test_config_bad_heads_and_hype():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        HybridConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hype_base"):
        HybridConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, hype_base=1.0)


@pytest.mark.parametrize("argname", ["past_key_values", "cache"])
def test_dynamic_cache_rejected(make_teacher, argname):
    student = _hybrid_student(make_teacher, "llama")
    with pytest.raises(ValueError, match="HybridCache"):
        student(_ids(1, 4), use_cache=True, **{argname: DynamicCache()})


def test_cache_with_wrong_layer_count_rejected(make_teacher):
    student = _hybrid_student(make_teacher, "llama")
    with pytest.raises(ValueError, match="layers"):
        student(_ids(1, 4), past_key_values=HybridCache(["attention"] * 3), use_cache=True)


def test_lightning_chunk_size_config_is_used(make_teacher, monkeypatch):
    """config.lightning_chunk_size must reach the chunked kernel (it is documented as the chunk length)."""
    import hybridize.ops.lightning as lightning

    seen = []
    original = lightning.chunk_lightning_ref

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_size", args[7] if len(args) > 7 else 64))
        return original(*args, **kwargs)

    monkeypatch.setattr(lightning, "chunk_lightning_ref", spy)
    teacher = make_teacher("llama")
    config = HybridConfig.from_teacher_config(teacher.config, layer_types=HYBRID, lightning_chunk_size=16)
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        model(_ids(1, 40), use_cache=False)
    assert seen and all(c == 16 for c in seen), seen
