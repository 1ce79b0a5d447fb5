"""Released checkpoints (HypeNet, MiniCPM-SALA): import, export, strict name maps; HyPE tuning.

The real checkpoints cannot be downloaded here, so tiny ones are written in their exact config and weight-name
format (random weights, safetensors) and our imported model is compared with an independent plain-torch forward
written below from the math of their public modelling code (thunlp/hybrid-linear-attention
``modeling_hypenet.py`` / ``lightning_attn.py`` / ``modeling_qwen3.py``; openbmb MiniCPM-SALA
``modeling_minicpm_sala.py``). Nothing here imports our layers for the reference.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from hybridize.cli import main
from hybridize.convert.hype import long_sequences, parse_grid, tune_hype
from hybridize.errors import CheckpointFormatError
from hybridize.loading import load_model
from hybridize.models import HybridConfig, HybridForCausalLM
from hybridize.models.released import (
    config_from_released,
    export_released,
    import_released,
    read_safetensors,
    released_format,
)

WORDS = ("the a river city king music science history war water light old new north south early late year people "
         "government language book school church field island mountain village road train ship art").split()
VOCAB = 48
TOL = 2e-4


# ----------------------------------------------------------------------------------- tiny checkpoints


def hypenet_config(**over) -> dict:
    """A tiny config.json in HypeNet's format (keys of their HypeNetConfig / released hypenet-2b.json)."""
    cfg = {
        "architectures": ["HypeNetForCausalLM"], "model_type": "hypenet", "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 24, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "mixer_types": ["lightning-attn", "attn", "lightning-attn", "attn"],
        "attn_use_rope": False, "attn_use_output_gate": True, "attn_logits_scaling": "hype 5",
        "lightning_nh": 4, "lightning_nkv": 4, "lightning_head_dim": 24, "lightning_scale": "1/sqrt(d)",
        "lightning_use_rope": True, "lightning_rope_scaling": None, "lightning_use_qk_norm": True,
        "lightning_use_output_norm": True, "lightning_use_output_gate": True, "expand_kv_proj": True,
        "bos_token_id": None, "eos_token_id": 0, "torch_dtype": "float32", "use_cache": True,
    }
    cfg.update(over)
    return cfg


def sala_config(**over) -> dict:
    """A tiny config.json in MiniCPM-SALA's format (keys of the released openbmb/MiniCPM-SALA config.json).
    6 heads (not a power of two: the ALiBi fallback rule), GQA 3:1 in the sparse layers."""
    cfg = {
        "architectures": ["MiniCPMSALAForCausalLM"], "model_type": "minicpm_sala", "vocab_size": VOCAB,
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0,
        "mixer_types": ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"],
        "attn_use_rope": False, "attn_use_output_gate": True, "lightning_nh": 6, "lightning_nkv": 6,
        "lightning_head_dim": 8, "lightning_scale": "1/sqrt(d)", "lightning_use_rope": True, "qk_norm": True,
        "use_output_norm": True, "use_output_gate": True, "scale_emb": 12, "scale_depth": 1.4,
        "dim_model_base": 16, "mup_denominator": 32, "pretraining_tp": 1,
        "sparse_config": {"block_size": 64, "dense_len": 8192, "init_blocks": 1, "kernel_size": 32,
                          "kernel_stride": 16, "topk": 64, "use_nope": False, "window_size": 2048},
        "bos_token_id": 1, "eos_token_id": [0, 2], "pad_token_id": 0, "torch_dtype": "float32", "use_cache": True,
    }
    cfg.update(over)
    return cfg


def their_weights(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the parameter names of their modules (written from their __init__s)."""
    g = torch.Generator().manual_seed(seed)
    sala = cfg["model_type"] == "minicpm_sala"
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def mat(*shape, std=0.15):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n):
        return (1 + 0.2 * torch.randn(n, generator=g)).to(dtype)

    w = {"model.embed_tokens.weight": mat(V, D, std=0.5 if not sala else 0.05)}
    bias = cfg["attention_bias"]
    for i, m in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(D)
        w[p + "post_attention_layernorm.weight"] = norm(D)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = mat(I, D), mat(I, D)
        w[p + "mlp.down_proj.weight"] = mat(D, I)
        a = p + "self_attn."
        if m in ("attn", "minicpm4"):
            H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
            d = D // H if sala else cfg["head_dim"]
            gate = cfg["attn_use_output_gate"]
        else:
            H = cfg["num_attention_heads"] if sala else cfg["lightning_nh"]
            KV, d = cfg["lightning_nkv"], (cfg["head_dim"] if sala else cfg["lightning_head_dim"])
            gate = cfg["use_output_gate"] if sala else cfg["lightning_use_output_gate"]
        w[a + "q_proj.weight"], w[a + "k_proj.weight"] = mat(H * d, D), mat(KV * d, D)
        w[a + "v_proj.weight"], w[a + "o_proj.weight"] = mat(KV * d, D), mat(D, H * d)
        if bias:
            for n, size in (("q", H * d), ("k", KV * d), ("v", KV * d), ("o", D)):
                w[a + f"{n}_proj.bias"] = mat(size)
        if m == "attn" or (m not in ("attn", "minicpm4") and cfg.get("qk_norm" if sala else "lightning_use_qk_norm")):
            w[a + "q_norm.weight"], w[a + "k_norm.weight"] = norm(d), norm(d)
        if m in ("attn", "minicpm4"):
            if gate:
                w[a + "o_gate.weight"] = mat(H * d, D)
        else:
            if cfg.get("use_output_norm" if sala else "lightning_use_output_norm"):
                w[a + "o_norm.weight"] = norm(H * d)
            if gate:
                w[a + "z_proj.weight"] = mat(H * d, D)
    w["model.norm.weight"] = norm(D)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(V, D, std=0.3)
    return w


def write_checkpoint(path, cfg: dict, weights: dict, tokenizer=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<s>", "<unk>", "."] + WORDS)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


# ---------------------------------------------------------------------- the independent reference forward


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, pos, theta):
    """x [B, T, H, d]; rotate-half RoPE with inv_freq theta^(-2i/d)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[None, :, None], torch.cat([f, f], -1).sin()[None, :, None]
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def alibi(n):
    """ALiBi slopes: 2^(-8(i+1)/n) for n a power of two, else those of the largest power of two p < n then
    every other slope of 2p."""
    def pow2(k):
        return [2.0 ** (-8.0 * (i + 1) / k) for i in range(k)]

    if n & (n - 1) == 0:
        return pow2(n)
    p = 2 ** int(math.log2(n))
    return pow2(p) + alibi(2 * p)[0::2][: n - p]


def lin(x, w, p):
    y = x @ w[p + ".weight"].T
    return y + w[p + ".bias"] if p + ".bias" in w else y


def ref_softmax_attention(q, k, v):
    """Causal softmax attention, q [B,T,H,d], k/v [B,T,KV,d] (query head i reads KV head i // g)."""
    H, KV, d = q.shape[2], k.shape[2], q.shape[3]
    k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    T = q.shape[1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def ref_lightning(q, k, v, scale):
    """S_t = exp(-m_h) S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t, step by step, fp32."""
    B, T, H, d = q.shape
    decay = torch.exp(-torch.tensor(alibi(H)))[None, :, None, None]
    S = torch.zeros(B, H, d, v.shape[-1])
    out = []
    for t in range(T):
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return torch.stack(out, 1)


def reference_logits(cfg: dict, w: dict, ids: torch.Tensor) -> torch.Tensor:
    """Their forward, written from the public code's math: HypeNet (Qwen3 attention with QK norm, optional
    RoPE, HyPE query scaling 'hype a', o_gate; Lightning with QK norm, RoPE, ALiBi decay, o_norm, z_proj gate)
    or MiniCPM-SALA (scale_emb, residual branches times scale_depth/sqrt(L), dense minicpm4 attention without
    QK norm, logits of h / (hidden/dim_model_base))."""
    w = {k: v.float() for k, v in w.items()}
    sala = cfg["model_type"] == "minicpm_sala"
    D, L, eps, theta = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
    B, T = ids.shape
    pos = torch.arange(T)
    h = w["model.embed_tokens.weight"][ids]
    if sala:
        h = h * cfg["scale_emb"]
    branch = cfg["scale_depth"] / math.sqrt(L) if sala else 1.0
    for i, m in enumerate(cfg["mixer_types"]):
        a = f"model.layers.{i}.self_attn."
        x = rms(h, w[f"model.layers.{i}.input_layernorm.weight"], eps)
        if m in ("attn", "minicpm4"):
            H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
            d = D // H if sala else cfg["head_dim"]
            q, k, v = (lin(x, w, a + n).view(B, T, -1, d) for n in ("q_proj", "k_proj", "v_proj"))
            if not sala:
                q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
            if cfg["attn_use_rope"]:
                q, k = rope(q, pos, theta), rope(k, pos, theta)
            scaling = None if sala else cfg.get("attn_logits_scaling")
            if scaling is not None:
                base = float(scaling.split()[1])
                q = q * (torch.log(pos + base) / math.log(base))[None, :, None, None]
            o = ref_softmax_attention(q, k, v).reshape(B, T, H * d)
            if cfg["attn_use_output_gate"]:
                o = o * torch.sigmoid(lin(x, w, a + "o_gate"))
        else:
            d = cfg["head_dim"] if sala else cfg["lightning_head_dim"]
            q, k, v = (lin(x, w, a + n).view(B, T, -1, d) for n in ("q_proj", "k_proj", "v_proj"))
            if cfg.get("qk_norm" if sala else "lightning_use_qk_norm"):
                q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
            if cfg["lightning_use_rope"]:
                q, k = rope(q, pos, theta), rope(k, pos, theta)
            g = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
            o = ref_lightning(q, k, v, d ** -0.5).reshape(B, T, -1)
            o = rms(o, w[a + "o_norm.weight"], eps)
            if cfg.get("use_output_gate" if sala else "lightning_use_output_gate"):
                o = o * torch.sigmoid(lin(x, w, a + "z_proj"))
        h = h + branch * lin(o, w, a + "o_proj")
        x = rms(h, w[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
        p = f"model.layers.{i}.mlp."
        y = (torch.nn.functional.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T
        h = h + branch * y
    h = rms(h, w["model.norm.weight"], eps)
    if sala:
        h = h / (D / cfg["dim_model_base"])
    return h @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def _ids(t=37, b=2, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ import vs reference


HYPENET_VARIANTS = {
    "released-like": {},
    "gqa-lightning-kv": {"lightning_nkv": 2, "expand_kv_proj": False},
    "tied-rope-bias": {"tie_word_embeddings": True, "attn_use_rope": True, "attention_bias": True,
                       "lightning_use_output_gate": False, "attn_logits_scaling": None},
    "all-lightning": {"mixer_types": ["lightning-attn"] * 4, "attn_logits_scaling": None},
}


@pytest.mark.parametrize("variant", list(HYPENET_VARIANTS))
def test_hypenet_import_matches_reference(tmp_path, variant):
    cfg = hypenet_config(**HYPENET_VARIANTS[variant])
    w = their_weights(cfg)
    path = write_checkpoint(tmp_path / "ckpt", cfg, w)
    assert released_format(path) == "hypenet"
    model = import_released(path)
    assert isinstance(model, HybridForCausalLM) and not model.training
    assert model.config.layer_types == ["attention" if m == "attn" else "lightning" for m in cfg["mixer_types"]]
    if cfg["attn_logits_scaling"] and "attention" in model.config.layer_types:
        assert model.config.hype_base == 5.0
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
    ref = reference_logits(cfg, w, ids)
    assert (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def test_hypenet_bare_hype_string_means_362():
    config, _ = config_from_released(hypenet_config(attn_logits_scaling="hype"))
    assert config.hype_base == 362.0


@pytest.mark.parametrize("variant", ["released-like", "gqa-lightning-kv", "bias-tied"])
def test_sala_import_matches_reference(tmp_path, variant):
    over = {"gqa-lightning-kv": {"lightning_nkv": 3},
            "bias-tied": {"attention_bias": False, "tie_word_embeddings": True, "attn_use_rope": True}}.get(variant, {})
    cfg = sala_config(**over)
    w = their_weights(cfg, seed=1)
    path = write_checkpoint(tmp_path / "ckpt", cfg, w)
    assert released_format(path) == "minicpm_sala"
    model = import_released(path)
    c = model.config
    assert c.layer_types == ["sparse", "lightning", "lightning", "sparse"]
    assert c.embedding_multiplier == 12 and c.logits_divisor == 3.0
    assert math.isclose(c.residual_multiplier, 1.4 / 2)
    # SALA's selection: init + (window/block + 1) local blocks + (topk - init - 1) scored (module docstring)
    assert c.sparse_config["window_size"] == 2048 + 64 and c.sparse_config["topk"] == 62
    ids = _ids(t=45)  # shorter than dense_len: the sparse layers are dense attention
    with torch.no_grad():
        ours = model(ids).logits
    ref = reference_logits(cfg, w, ids)
    assert (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def test_sala_sparse_regime_small_dense_len(tmp_path):
    """Past dense_len the minicpm4 layers run our InfLLM-V2 path; with topk covering every block it must equal
    dense attention (SPEC 1c), and with a small topk it must differ (the sparse path is really taken)."""
    small = {"block_size": 8, "dense_len": 16, "init_blocks": 1, "kernel_size": 8, "kernel_stride": 4,
             "topk": 64, "use_nope": False, "window_size": 16}
    cfg = sala_config(sparse_config=small)
    w = their_weights(cfg, seed=2)
    ids = _ids(t=120, b=1)
    ref = reference_logits(cfg, w, ids)
    model = import_released(write_checkpoint(tmp_path / "all", cfg, w))
    assert model.config.sparse_config["dense_len"] == 16
    with torch.no_grad():
        ours = model(ids).logits
    assert (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
    cfg_few = sala_config(sparse_config={**small, "topk": 2})
    model_few = import_released(write_checkpoint(tmp_path / "few", cfg_few, w))
    assert model_few.config.sparse_config["topk"] == 0
    with torch.no_grad():
        few = model_few(ids).logits
    assert (few[:, :16] - ref[:, :16]).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
    assert (few - ref).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------- round trip


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("fmt", ["hypenet", "minicpm_sala"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_export_round_trip_is_byte_identical(tmp_path, fmt, dtype):
    cfg = hypenet_config() if fmt == "hypenet" else sala_config()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    src = write_checkpoint(tmp_path / "src", cfg, their_weights(cfg, seed=3, dtype=dtype))
    model = import_released(src)
    assert next(model.parameters()).dtype == dtype
    out = export_released(model, fmt, tmp_path / "out")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert _raw_bytes(a[key]) == _raw_bytes(b[key]), key
    # the exported config describes the same model
    again, _ = config_from_released(json.loads((out / "config.json").read_text()))
    for field in ("layer_types", "hype_base", "qk_norm", "attention_rope", "attention_output_gate", "lightning_rope",
                  "lightning_output_gate", "sparse_config", "embedding_multiplier", "logits_divisor",
                  "rope_parameters", "head_dim", "num_key_value_heads"):
        assert getattr(again, field) == getattr(model.config, field), field
    assert math.isclose(again.residual_multiplier, model.config.residual_multiplier)
    exported = json.loads((out / "config.json").read_text())
    for key in ("model_type", "mixer_types", "attn_use_rope", "attn_use_output_gate", "lightning_scale"):
        assert exported[key] == cfg[key], key
    if fmt == "minicpm_sala":
        for key in ("scale_emb", "scale_depth", "dim_model_base", "sparse_config"):
            assert exported[key] == cfg[key], key
    else:
        assert exported["attn_logits_scaling"] == cfg["attn_logits_scaling"]


def test_tied_round_trip_and_untied_head_is_refused(tmp_path):
    cfg = hypenet_config(tie_word_embeddings=True)
    w = their_weights(cfg)
    model = import_released(write_checkpoint(tmp_path / "tied", cfg, w))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = export_released(model, "hypenet", tmp_path / "out")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    # an explicit lm_head equal to the embeddings is accepted (and used); a different one is an error
    import_released(write_checkpoint(tmp_path / "eq", cfg, {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}))
    bad = {**w, "lm_head.weight": w["model.embed_tokens.weight"] + 1}
    with pytest.raises(CheckpointFormatError, match="lm_head.weight differs"):
        import_released(write_checkpoint(tmp_path / "ne", cfg, bad))


def test_sharded_checkpoint_is_read(tmp_path):
    cfg = hypenet_config()
    w = their_weights(cfg)
    path = tmp_path / "sharded"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    keys = sorted(w)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: w[k] for k in ks}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    assert sorted(read_safetensors(path)) == keys
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(import_released(path)(ids).logits, reference_logits(cfg, w, ids), atol=1e-4)


# ------------------------------------------------------------------------------------------ bad inputs


def _broken(tmp_path, fmt, cfg_over=None, edit=None):
    cfg = (hypenet_config if fmt == "hypenet" else sala_config)(**(cfg_over or {}))
    w = their_weights(cfg)
    if edit:
        edit(w)
    return write_checkpoint(tmp_path / "bad", cfg, w)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing tensor model\.layers\.1\.self_attn\.o_gate\.weight"),
    ("extra", r"unexpected tensor model\.layers\.0\.self_attn\.extra_proj\.weight"),
    ("shape", r"tensor model\.layers\.2\.self_attn\.q_proj\.weight has shape \[95, 64\], expected \[96, 64\]"),
    ("dtype", r"tensor model\.norm\.weight has dtype torch\.int64"),
])
def test_bad_tensors_are_named(tmp_path, case, pattern):
    edits = {
        "missing": lambda w: w.pop("model.layers.1.self_attn.o_gate.weight"),
        "extra": lambda w: w.__setitem__("model.layers.0.self_attn.extra_proj.weight", torch.zeros(3, 3)),
        "shape": lambda w: w.__setitem__("model.layers.2.self_attn.q_proj.weight", torch.zeros(95, 64)),
        "dtype": lambda w: w.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.long)),
    }
    path = _broken(tmp_path, "hypenet", edit=edits[case])
    with pytest.raises(CheckpointFormatError, match=pattern):
        import_released(path)


def test_all_problems_reported_at_once(tmp_path):
    def edit(w):
        w.pop("model.layers.0.self_attn.z_proj.weight")
        w["model.layers.3.self_attn.q_norm.bias"] = torch.zeros(24)
    with pytest.raises(CheckpointFormatError) as err:
        import_released(_broken(tmp_path, "hypenet", edit=edit))
    assert "2 problems" in str(err.value)
    assert "model.layers.0.self_attn.z_proj.weight" in str(err.value) and "model.layers.3.self_attn.q_norm.bias" in str(err.value)


@pytest.mark.parametrize("fmt, over, pattern", [
    ("hypenet", {"mixer_types": ["lightning-attn", "attn", "gdn", "attn"]}, r"mixer_types\[2\]='gdn'"),
    ("minicpm_sala", {"mixer_types": ["minicpm4", "attn", "lightning-attn", "minicpm4"]}, r"mixer_types\[1\]='attn'"),
    ("hypenet", {"mixer_types": ["attn"] * 3}, r"mixer_types has 3 entries but num_hidden_layers is 4"),
    ("hypenet", {"lightning_scale": "1/d"}, r"lightning_scale='1/d'"),
    ("hypenet", {"attn_logits_scaling": 2.0}, r"attn_logits_scaling=2\.0"),
    ("hypenet", {"attn_logits_scaling": "hype 1"}, r"attn_logits_scaling='hype 1'"),
    ("hypenet", {"lightning_use_short_conv": True}, r"lightning_use_short_conv=True"),
    ("hypenet", {"lightning_use_output_norm": False}, r"lightning_use_output_norm=False"),
    ("hypenet", {"lightning_use_qk_norm": None}, r"lightning_use_qk_norm=None"),
    ("hypenet", {"lightning_nh": 8}, r"lightning_nh=8"),
    ("minicpm_sala", {"head_dim": 12}, r"head_dim=12"),
    ("minicpm_sala", {"qk_norm": False}, r"qk_norm=False"),
    ("minicpm_sala", {"rope_scaling": {"rope_type": "longrope"}}, r"rope_scaling="),
    ("minicpm_sala", {"scale_emb": None}, r"scale_emb=None"),
    ("minicpm_sala", {"attention_bias": True}, r"attention_bias=True"),
    ("minicpm_sala", {"sparse_config": {"topk": 64, "stride": 3}}, r"unknown keys \['stride'\]"),
])
def test_unsupported_configs_are_refused_by_key(tmp_path, fmt, over, pattern):
    cfg = (hypenet_config if fmt == "hypenet" else sala_config)(**over)
    path = tmp_path / "c"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=pattern):
        import_released(path)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hypenet_config()))
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        import_released(tmp_path)


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    model = import_released(write_checkpoint(tmp_path / "h", hypenet_config(), their_weights(hypenet_config())))
    with pytest.raises(CheckpointFormatError, match=r"no mixer type for our \['attention'\]"):
        export_released(model, "minicpm_sala", tmp_path / "x")
    sala = import_released(write_checkpoint(tmp_path / "s", sala_config(), their_weights(sala_config())))
    with pytest.raises(CheckpointFormatError, match=r"no mixer type for our \['sparse'\]"):
        export_released(sala, "hypenet", tmp_path / "y")
    llama_like = HybridForCausalLM(HybridConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, layer_types=["attention", "lightning"]))
    with pytest.raises(CheckpointFormatError, match="qk_norm=False"):
        export_released(llama_like, "hypenet", tmp_path / "z")
    with pytest.raises(CheckpointFormatError, match="unknown released format"):
        export_released(model, "mamba", tmp_path / "w")


# ------------------------------------------------------------------------------------ loading + generate


@pytest.mark.parametrize("fmt", ["hypenet", "minicpm_sala"])
def test_load_model_and_cli_generate(tmp_path, word_tokenizer, capsys, fmt):
    cfg = hypenet_config() if fmt == "hypenet" else sala_config()
    path = write_checkpoint(tmp_path / fmt, cfg, their_weights(cfg), tokenizer=word_tokenizer)
    model, tok = load_model(str(path))
    assert isinstance(model, HybridForCausalLM) and next(model.parameters()).dtype == torch.float32
    assert tok.eos_token == "<|endoftext|>"
    assert main(["generate", "--model", str(path), "--prompt", "the river", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the river")


def test_cli_generate_reports_bad_checkpoint(tmp_path, word_tokenizer, capsys):
    cfg = hypenet_config()
    w = their_weights(cfg)
    w.pop("model.layers.3.self_attn.k_norm.weight")
    path = write_checkpoint(tmp_path / "bad", cfg, w, tokenizer=word_tokenizer)
    assert main(["generate", "--model", str(path), "--prompt", "the", "--max-new-tokens", "2"]) == 2
    assert "model.layers.3.self_attn.k_norm.weight" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- tune-hype


def _hybrid_dir(tmp_path, tokenizer, layer_types, name="hybrid"):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                          num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types, qk_norm=True,
                          attention_output_gate=True, eos_token_id=0, initializer_range=0.3)
    model = HybridForCausalLM(config)
    path = tmp_path / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (150, 30, 40, 140, 25)]
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


def _table(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s*(\S+)\s+(\d+\.\d{6})\s+\d+\.\d+", out, re.M)}


def test_tune_hype_cli_picks_argmin_and_writes_config(tmp_path, word_tokenizer, text_file, capsys):
    path = _hybrid_dir(tmp_path, word_tokenizer, ["lightning", "attention", "lightning", "attention"])
    code = main(["tune-hype", "--model", str(path), "--seq-len", "96", "--sequences", "3", "--data", str(text_file),
                 "--grid", "1.5", "4", "50", "none", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    losses = _table(out)
    assert list(losses) == ["1.5", "4", "50", "none"]
    assert len(set(losses.values())) > 1  # HyPE changes the loss
    chosen = re.search(r"chosen a = (\S+)", out).group(1)
    assert losses[chosen] == min(losses.values())
    assert "2 documents of >= 96 tokens, 1 glued from shorter documents joined by EOS" in out
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hype_base"] == (None if chosen == "none" else float(chosen))
    sweep = json.loads((path / "hype_sweep.json").read_text())
    assert sweep["best"] == cfg["hype_base"] and len(sweep["losses"]) == 4 and sweep["glued_sequences"] == 1
    assert HybridForCausalLM.from_pretrained(path).config.hype_base == cfg["hype_base"]


def test_tune_hype_library_matches_argmin(tmp_path, word_tokenizer):
    path = _hybrid_dir(tmp_path, word_tokenizer, ["attention", "lightning", "sparse"])
    model = HybridForCausalLM.from_pretrained(path).eval()
    seqs = torch.randint(1, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))
    result = tune_hype(model, seqs, [2, 10, None, 1000])
    losses = [r["loss"] for r in result["losses"]]
    assert result["best"] == result["losses"][losses.index(min(losses))]["hype_base"]
    assert model.config.hype_base is None and all(
        layer.self_attn.hype_base is None for layer in model.model.layers if layer.mixer_type != "lightning")
    # the loss with a = 2 is the model's loss when hype_base = 2 is set
    model2 = HybridForCausalLM.from_pretrained(path, hype_base=2.0).eval()
    from hybridize.eval import heldout_perplexity
    assert math.isclose(heldout_perplexity(model2, seqs, progress=False)["loss"], losses[0], rel_tol=1e-6)


def test_tune_hype_without_attention_is_a_clear_error(tmp_path, word_tokenizer, text_file, capsys):
    path = _hybrid_dir(tmp_path, word_tokenizer, ["lightning", "lightning"], name="rnn")
    model = HybridForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="no attention layers"):
        tune_hype(model, torch.ones(1, 8, dtype=torch.long))
    code = main(["tune-hype", "--model", str(path), "--seq-len", "32", "--data", str(text_file), "--no-progress"])
    assert code == 2 and "no attention layers" in capsys.readouterr().err
    assert "hype_base" in json.loads((path / "config.json").read_text())  # untouched (still the saved null)


def test_tune_hype_on_hypenet_writes_attn_logits_scaling(tmp_path, word_tokenizer, text_file, capsys):
    cfg = hypenet_config(attn_logits_scaling=None)
    path = write_checkpoint(tmp_path / "hn", cfg, their_weights(cfg), tokenizer=word_tokenizer)
    assert main(["tune-hype", "--model", str(path), "--seq-len", "64", "--sequences", "2", "--data", str(text_file),
                 "--grid", "3", "none", "--no-progress"]) == 0
    chosen = re.search(r"chosen a = (\S+)", capsys.readouterr().out).group(1)
    written = json.loads((path / "config.json").read_text())["attn_logits_scaling"]
    assert written == (None if chosen == "none" else f"hype {chosen}")
    assert import_released(path).config.hype_base == (None if chosen == "none" else float(chosen))
    sala = write_checkpoint(tmp_path / "sala", sala_config(), their_weights(sala_config()), tokenizer=word_tokenizer)
    assert main(["tune-hype", "--model", str(sala), "--data", str(text_file)]) == 2
    assert "no HyPE scaling field" in capsys.readouterr().err


def test_grid_and_sequences_helpers():
    assert parse_grid(["100", "none", "100", "NONE", 2.5]) == [100.0, None, 2.5]
    for bad in (["1"], ["abc"], [], ["-3"]):
        with pytest.raises(ValueError):
            parse_grid(bad)
    docs = [list(range(10)), list(range(3)), list(range(4)), list(range(12))]
    seqs, glued = long_sequences(docs, 8, 3, eos_id=99)
    assert glued == 1 and seqs.shape == (3, 8)
    assert seqs[2].tolist() == [0, 1, 2, 99, 0, 1, 2, 3]
    seqs, glued = long_sequences(docs, 8, 2, eos_id=99)
    assert glued == 0 and seqs.shape == (2, 8)
    with pytest.raises(ValueError, match="too short"):
        long_sequences([[1, 2]], 8, 1, eos_id=0)
