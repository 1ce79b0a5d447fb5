"""Stage 0 weight transfer (SPEC 2 "Stage 0", SPEC 1a/1b): exactly what is copied, expanded and fresh."""

from __future__ import annotations

import pytest
import torch

from hybridize.convert.transfer import build_student, expand_kv, transfer_weights
from hybridize.models import HybridForCausalLM

SCHEDULES = {
    "ALLA": ["attention", "lightning", "lightning", "attention"],
    "LALA": ["lightning", "attention", "lightning", "attention"],
}


def _expected_report(student, teacher_kind: str, attention_output_gate: bool):
    """The SPEC's partition of the student's parameter names into copied / expanded / fresh."""
    cfg = student.config
    copied, expanded, fresh = set(), set(), set()
    has_qk_norm = teacher_kind == "qwen3"
    bias = cfg.attention_bias
    for name in student.state_dict():
        if not name.startswith("model.layers."):
            copied.add(name)  # embed_tokens, final norm, lm_head
            continue
        i = int(name.split(".")[2])
        kind = cfg.layer_types[i]
        sub = name.split(".", 3)[3]  # e.g. "self_attn.k_proj.weight"
        if not sub.startswith("self_attn."):
            copied.add(name)  # MLP and the two block norms
        elif sub in ("self_attn.k_proj.weight", "self_attn.v_proj.weight") and kind == "lightning":
            expanded.add(name)
        elif sub in ("self_attn.k_proj.bias", "self_attn.v_proj.bias") and kind == "lightning":
            assert bias
            expanded.add(name)
        elif sub.split(".")[1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            copied.add(name)
        elif sub.split(".")[1] in ("q_norm", "k_norm"):
            (copied if has_qk_norm else fresh).add(name)
        elif sub.split(".")[1] in ("o_norm", "output_gate"):
            assert kind == "lightning" or (attention_output_gate and sub.startswith("self_attn.output_gate"))
            fresh.add(name)
        else:
            raise AssertionError(f"unexpected student parameter {name}")
    return copied, expanded, fresh


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_stage0_copies_exactly_what_spec_says(make_teacher, teacher_kind, schedule, gate):
    teacher = make_teacher(teacher_kind)
    layer_types = SCHEDULES[schedule]
    student, report = build_student(teacher, layer_types, attention_output_gate=gate)
    cfg, tcfg = student.config, teacher.config
    t = teacher.state_dict()
    s = student.state_dict()
    hq, hkv, d, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    g = hq // hkv
    assert (hq, hkv, d) == (tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim)
    assert cfg.layer_types == layer_types

    # --- the report partitions every student parameter as the SPEC says
    copied, expanded, fresh = _expected_report(student, teacher_kind, gate)
    assert set(report.copied) == copied
    assert set(report.expanded) == expanded
    assert set(report.fresh) == fresh
    assert len(report.copied) + len(report.expanded) + len(report.fresh) == len(s)

    # --- embeddings, final norm, head, per-block norms, MLP: identical
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]:
        assert torch.equal(s[name], t[name]), name
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for sub in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]:
            assert torch.equal(s[p + sub], t[p + sub]), p + sub
        a = p + "self_attn."
        bias_suffixes = ["weight", "bias"] if cfg.attention_bias else ["weight"]
        assert (a + "q_proj.bias" in s) == cfg.attention_bias

        if layer_types[i] == "attention":
            # --- attention layers: q/k/v/o (+ biases, + QK-norm) identical, GQA shapes kept
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for suf in bias_suffixes:
                    expect = t[f"{a}{proj}.{suf}"]
                    if gate and (proj, suf) == ("o_proj", "weight"):
                        expect = 2 * expect  # identity gate init: W_g = 0 (sigmoid 1/2) and W_o doubled
                    assert torch.equal(s[f"{a}{proj}.{suf}"], expect), f"{a}{proj}.{suf}"
            assert s[a + "k_proj.weight"].shape == (hkv * d, hidden)
            if teacher_kind == "qwen3":
                assert torch.equal(s[a + "q_norm.weight"], t[a + "q_norm.weight"])
                assert torch.equal(s[a + "k_norm.weight"], t[a + "k_norm.weight"])
            else:
                assert a + "q_norm.weight" not in s
            assert a + "o_norm.weight" not in s
            if gate:
                assert s[a + "output_gate.weight"].shape == (hq * d, hidden)
                assert torch.equal(s[a + "output_gate.weight"], torch.zeros(hq * d, hidden))
            else:
                assert a + "output_gate.weight" not in s
            continue

        # --- lightning layers
        for proj in ("q_proj", "o_proj"):
            for suf in bias_suffixes:
                assert torch.equal(s[f"{a}{proj}.{suf}"], t[f"{a}{proj}.{suf}"]), f"{a}{proj}.{suf}"
        for proj in ("k_proj", "v_proj"):
            for suf in bias_suffixes:
                student_p, teacher_p = s[f"{a}{proj}.{suf}"], t[f"{a}{proj}.{suf}"]
                assert student_p.shape[0] == hq * d and teacher_p.shape[0] == hkv * d
                for head in range(hq):
                    kv = head // g
                    assert torch.equal(student_p[head * d : (head + 1) * d], teacher_p[kv * d : (kv + 1) * d]), (
                        f"{a}{proj}.{suf} head {head} should be teacher KV head {kv}"
                    )
                # and not a plain tile (head i from KV head i % Hkv): heads 0 and 1 share KV head 0
                assert torch.equal(student_p[:d], student_p[d : 2 * d])
                assert not torch.equal(student_p[:d], student_p[(hq - 1) * d :])
        for norm in ("q_norm", "k_norm"):
            w = s[f"{a}{norm}.weight"]
            assert w.shape == (d,)
            if teacher_kind == "qwen3":
                assert torch.equal(w, t[f"{a}{norm}.weight"])
                assert not torch.equal(w, torch.ones(d))  # the conftest perturbs teacher norms
            else:
                assert torch.equal(w, torch.ones(d))
        assert torch.equal(s[a + "o_norm.weight"], torch.ones(hq * d))
        gate_w = s[a + "output_gate.weight"]
        assert gate_w.shape == (hq * d, hidden)
        assert torch.isfinite(gate_w).all() and gate_w.abs().max() > 0
        assert 0.5 * cfg.initializer_range < gate_w.std().item() < 1.5 * cfg.initializer_range
        assert (a + "output_gate.bias") not in s


def test_fresh_modules_differ_between_seeds_and_copies_do_not(make_teacher):
    teacher = make_teacher("qwen3")
    torch.manual_seed(1)
    s1, _ = build_student(teacher, SCHEDULES["LALA"])
    torch.manual_seed(2)
    s2, _ = build_student(teacher, SCHEDULES["LALA"])
    gate = "model.layers.0.self_attn.output_gate.weight"
    assert not torch.equal(s1.state_dict()[gate], s2.state_dict()[gate])
    assert torch.equal(s1.state_dict()["model.layers.0.self_attn.k_proj.weight"], s2.state_dict()["model.layers.0.self_attn.k_proj.weight"])


def test_tied_teacher_gives_tied_student(make_teacher):
    teacher = make_teacher("llama_tied")
    student, report = build_student(teacher, SCHEDULES["ALLA"])
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_student_follows_teacher_dtype(make_teacher):
    teacher = make_teacher("llama").to(torch.bfloat16)
    student, _ = build_student(teacher, SCHEDULES["LALA"])
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        out = student(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.recurrent_states[0].dtype == torch.float32  # Lightning state stays fp32 (SPEC 1a)
    assert torch.isfinite(out.logits.float()).all()


def test_expand_kv_explicit():
    d, hidden = 3, 5
    w = torch.arange(2 * d * hidden, dtype=torch.float32).view(2 * d, hidden)  # two KV heads
    e = expand_kv(w, num_kv_heads=2, num_heads=6)
    assert e.shape == (6 * d, hidden)
    for head, kv in enumerate([0, 0, 0, 1, 1, 1]):
        assert torch.equal(e[head * d : (head + 1) * d], w[kv * d : (kv + 1) * d])
    b = torch.arange(2 * d, dtype=torch.float32)
    assert torch.equal(expand_kv(b, 2, 4), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5], dtype=torch.float32))
    assert torch.equal(expand_kv(w, 2, 2), w)
    with pytest.raises(ValueError):
        expand_kv(w, 2, 5)
    with pytest.raises(ValueError):
        expand_kv(torch.zeros(7, 4), 2, 4)


def test_transfer_from_mismatched_teacher_raises(make_teacher):
    student, _ = build_student(make_teacher("llama"), SCHEDULES["LALA"])
    other = make_teacher("llama", vocab_size=100)
    with pytest.raises(ValueError, match="shape"):
        transfer_weights(other.state_dict(), student)


def test_transfer_report_on_fresh_model_round_trip(make_teacher):
    """transfer_weights into a bare HybridForCausalLM gives the same weights as build_student."""
    teacher = make_teacher("llama_bias")
    student, report = build_student(teacher, SCHEDULES["ALLA"])
    bare = HybridForCausalLM(student.config)
    report2 = transfer_weights(teacher.state_dict(), bare)
    assert sorted(report2.copied) == sorted(report.copied) and sorted(report2.expanded) == sorted(report.expanded)
    for name, p in bare.state_dict().items():
        if name not in report2.fresh:
            assert torch.equal(p, student.state_dict()[name]), name
