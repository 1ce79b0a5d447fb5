"""Import and export of released hybrid checkpoints: HypeNet (thunlp) and MiniCPM-SALA (OpenBMB).

Both formats are HuggingFace directories (``config.json`` + safetensors) whose modelling code lives in the
checkpoint (``trust_remote_code``). :func:`import_released` reads such a directory into a
:class:`~hybridize.models.HybridForCausalLM` without running their code; :func:`export_released` writes one
of ours back in their names. Weights are renamed by a declarative map (:data:`NAME_MAPS`, templates with
``{}`` for the layer index) with strict checks: every tensor of the checkpoint is used exactly once, every
shape is checked, and every problem is reported by key (:class:`~hybridize.errors.CheckpointFormatError`).

Formats (read from the public modelling code; semantics that differ from ours are converted or refused):

``hypenet`` (github thunlp/hybrid-linear-attention, ``modeling_hypenet.py``, ``lightning_attn.py``,
``modeling_qwen3.py``): ``model_type: hypenet``; ``mixer_types`` entries ``attn`` / ``lightning-attn``
(``lightning_attn``). Attention layers are Qwen3 attention: q/k/v/o, per-head ``q_norm``/``k_norm``
(always), RoPE only if ``attn_use_rope``, output gate ``o * sigmoid(o_gate(x))`` before ``o_proj`` if
``attn_use_output_gate``, HyPE query scaling ``log(t + a) / log(a)`` if ``attn_logits_scaling`` is a string
``"hype <a>"`` (a string without a number means a = 362). Lightning layers: q/k/v/o with ``lightning_nkv``
K/V heads repeated to ``lightning_nh`` (query head i reads K/V head i // g), ``q_norm``/``k_norm`` if
``lightning_use_qk_norm``, RoPE if ``lightning_use_rope``, ALiBi-slope decays ``exp(-m_h)`` (no per-layer
rescaling), scale from ``lightning_scale``, then ``o_norm`` (if ``lightning_use_output_norm``) and
``sigmoid(z_proj(x))`` (if ``lightning_use_output_gate``) before ``o_proj``. Missing config keys take the
defaults of their ``HypeNetConfig`` (e.g. ``attn_use_rope`` true, ``lightning_use_qk_norm`` false).

``minicpm_sala`` (huggingface openbmb/MiniCPM-SALA, ``modeling_minicpm_sala.py``): ``model_type:
minicpm_sala``; ``mixer_types`` entries ``minicpm4`` (InfLLM-V2 sparse attention, our ``sparse``) and
``lightning-attn``. Sparse layers have q/k/v/o with head dim ``hidden_size / num_attention_heads``, no QK
norm, RoPE only if ``attn_use_rope``, gate ``o_gate``, no HyPE scaling. Lightning layers use
``num_attention_heads`` heads of ``head_dim`` (``lightning_nh``/``lightning_head_dim`` are not read by
their code; we require them to agree), ``lightning_nkv`` K/V heads, ``q_norm``/``k_norm`` if ``qk_norm``,
``o_norm`` if ``use_output_norm``, ``z_proj`` if ``use_output_gate``. muP: embeddings times ``scale_emb``,
each residual branch times ``scale_depth / sqrt(num_hidden_layers)``, final hidden states divided by
``hidden_size / dim_model_base`` before ``lm_head`` (our ``embedding_multiplier``, ``residual_multiplier``,
``logits_divisor``).

``sparse_config`` conversion (SALA -> ours). Their selection ranks ``topk + window_size / block_size``
blocks per query, with the init blocks and the ``window_size / block_size + 1`` blocks ending at the
query's own block forced in (infllmv2 ``max_pooling_1d``: score +inf where ``qb - local <= b <= qb``). In
our :class:`~hybridize.ops.sparse_attention.SparseConfig` the local window counts the query's block and
``topk`` counts only scored blocks, so the same selection is ``window_size = theirs + block_size`` and
``topk = theirs - init_blocks - 1`` (SALA's 2048/64 -> our 2112/62). Their per-call dense switch and their
coarser LSE approximation are not reproduced (see :mod:`hybridize.ops.sparse_attention`).

Refused (clear error naming the option): short convolutions, ``lightning_scale`` other than ``1/sqrt(d)``,
a constant float ``attn_logits_scaling``, Lightning without QK norm or without output norm, Lightning heads
or head dim different from the attention's, biases on the output gates, sliding windows, MiniCPM rope
scaling, non-safetensors weights. Their bf16 cast of the HyPE-scaled query (HypeNet casts to bf16 whatever
the model dtype) is not reproduced: we keep the model dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError
from ..ops.sparse_attention import SparseConfig
from .configuration import HybridConfig
from .modeling import HybridForCausalLM

__all__ = [
    "FORMATS",
    "NAME_MAPS",
    "released_format",
    "config_from_released",
    "config_to_released",
    "read_safetensors",
    "convert_state_dict",
    "export_state_dict",
    "import_released",
    "export_released",
]

#: Released formats we read and write.
FORMATS = ("hypenet", "minicpm_sala")

_HYPENET_MIXERS = {"attn": "attention", "lightning-attn": "lightning", "lightning_attn": "lightning"}
_SALA_MIXERS = {
    "minicpm4": "sparse", "lightning-attn": "lightning", "lightning_attn": "lightning", "lightning": "lightning",
}
#: Our mixer type -> their ``mixer_types`` entry when exporting.
_EXPORT_MIXERS = {"hypenet": {"attention": "attn", "lightning": "lightning-attn"},
                  "minicpm_sala": {"sparse": "minicpm4", "lightning": "lightning-attn"}}


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


_PROJ = tuple(f"model.layers.{{}}.self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias"))
_QK_NORM = ("model.layers.{}.self_attn.q_norm.weight", "model.layers.{}.self_attn.k_norm.weight")
_LAYER = _same(
    "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight",
)
_LIGHTNING = {
    **_same(*_PROJ, *_QK_NORM, "model.layers.{}.self_attn.o_norm.weight"),
    "model.layers.{}.self_attn.output_gate.weight": "model.layers.{}.self_attn.z_proj.weight",
}
_MODEL = _same("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class NameMap:
    """Declarative weight-name map of one format: our name -> their name.

    Attributes:
        model: names outside the decoder layers.
        layer: per-layer names shared by every mixer type (templates, ``{}`` = layer index).
        mixers: per our mixer type, the per-layer names of its mixer (templates).

    Entries of parameters a given config does not have (biases, gates, QK norms) are simply unused.
    """

    model: Mapping[str, str]
    layer: Mapping[str, str]
    mixers: Mapping[str, Mapping[str, str]]


#: The weight-name maps of :data:`FORMATS`.
NAME_MAPS: dict[str, NameMap] = {
    "hypenet": NameMap(
        model=_MODEL,
        layer=_LAYER,
        mixers={
            "attention": {
                **_same(*_PROJ, *_QK_NORM),
                "model.layers.{}.self_attn.output_gate.weight": "model.layers.{}.self_attn.o_gate.weight",
            },
            "lightning": _LIGHTNING,
        },
    ),
    "minicpm_sala": NameMap(
        model=_MODEL,
        layer=_LAYER,
        mixers={
            "sparse": {
                **_same(*_PROJ),
                "model.layers.{}.self_attn.output_gate.weight": "model.layers.{}.self_attn.o_gate.weight",
            },
            "lightning": _LIGHTNING,
        },
    ),
}

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------ config


def _read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{cfg} is not valid JSON: {e}") from e


def released_format(path: str | Path | Mapping) -> str | None:
    """Which released format a checkpoint directory (or its parsed ``config.json``) is in, or None.

    ``model_type`` ``hypenet`` / ``minicpm_sala`` decide; otherwise a ``mixer_types`` list containing
    ``minicpm4`` means MiniCPM-SALA and one containing ``attn`` / ``lightning-attn`` means HypeNet.
    Returns None for anything else (our own checkpoints, teachers, a directory without config.json).
    """
    if isinstance(path, Mapping):
        raw = path
    else:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            return None
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    model_type = raw.get("model_type")
    if model_type in FORMATS:
        return model_type
    if model_type == "hybridize":
        return None
    mixers = raw.get("mixer_types")
    if isinstance(mixers, list):
        if "minicpm4" in mixers:
            return "minicpm_sala"
        if any(m in _HYPENET_MIXERS for m in mixers):
            return "hypenet"
    return None


def _refuse(fmt: str, key: str, value: Any, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{fmt} config {key}={value!r} is not supported: {why}")


def _layer_types(fmt: str, raw: Mapping, table: Mapping[str, str]) -> list[str]:
    n = raw.get("num_hidden_layers")
    mixers = raw.get("mixer_types") or (["attn"] * n if fmt == "hypenet" and n else None)
    if not isinstance(mixers, list):
        raise CheckpointFormatError(f"{fmt} config needs a mixer_types list (one entry per layer), got {mixers!r}")
    if len(mixers) != n:
        raise CheckpointFormatError(f"{fmt} config mixer_types has {len(mixers)} entries but num_hidden_layers is {n}")
    out = []
    for i, m in enumerate(mixers):
        if m not in table:
            raise CheckpointFormatError(
                f"{fmt} config mixer_types[{i}]={m!r} is not a supported mixer type; supported: {sorted(table)}"
            )
        out.append(table[m])
    return out


def _rope_parameters(fmt: str, raw: Mapping) -> dict:
    if raw.get("rope_parameters"):
        return dict(raw["rope_parameters"])
    scaling = raw.get("rope_scaling")
    theta = float(raw.get("rope_theta", 10000.0))
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    if fmt == "minicpm_sala":
        raise _refuse(fmt, "rope_scaling", scaling, "MiniCPM's own rope scaling classes are not reproduced; use null")
    rope = dict(scaling)
    rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    rope["rope_theta"] = theta
    return rope


def _require(fmt: str, raw: Mapping, key: str, default: Any, want: Any, why: str) -> None:
    value = raw.get(key, default)
    if value != want:
        raise _refuse(fmt, key, value, why)


def _sizes(fmt: str, raw: Mapping) -> dict:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if raw.get(k) is None]
    if missing:
        raise CheckpointFormatError(f"{fmt} config.json lacks {missing}")
    heads = raw["num_attention_heads"]
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        initializer_range=raw.get("initializer_range", 0.02),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=False,
        rope_parameters=_rope_parameters(fmt, raw),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _hype_base(fmt: str, value: Any) -> float | None:
    """HypeNet ``attn_logits_scaling`` -> our ``hype_base`` (their Qwen3Attention: a string ``"<name> <a>"``
    scales queries by ``log(t + a) / log(a)``, a bare string means a = 362; a float is a constant factor)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split()
        try:
            a = float(parts[1]) if len(parts) > 1 else 362.0
        except ValueError:
            raise _refuse(fmt, "attn_logits_scaling", value, "expected 'hype <a>' with a number a") from None
        if not (math.isfinite(a) and a > 1):
            raise _refuse(fmt, "attn_logits_scaling", value, "HyPE's a must be a finite number > 1")
        return a
    raise _refuse(fmt, "attn_logits_scaling", value, "only the length-dependent 'hype <a>' scaling is reproduced, "
                  "not a constant query factor")


def _lightning_common(fmt: str, raw: Mapping, sizes: dict, heads_key: str | None, dim_key: str | None) -> int:
    """Checks shared by both formats' Lightning layers; returns the K/V head count of their Lightning layers."""
    heads, head_dim = sizes["num_attention_heads"], sizes["head_dim"]
    if heads_key is not None and raw.get(heads_key, heads) != heads:
        raise _refuse(fmt, heads_key, raw.get(heads_key),
                      f"Lightning layers must have num_attention_heads ({heads}) heads")
    if dim_key is not None and raw.get(dim_key, head_dim) != head_dim:
        raise _refuse(fmt, dim_key, raw.get(dim_key), f"Lightning layers must have head_dim ({head_dim})")
    _require(fmt, raw, "lightning_scale", "1/sqrt(d)", "1/sqrt(d)", "our Lightning scale is 1/sqrt(head_dim)")
    nkv = raw.get("lightning_nkv", sizes["num_key_value_heads"] if fmt == "hypenet" else heads)
    if not isinstance(nkv, int) or nkv < 1 or heads % nkv:
        raise _refuse(fmt, "lightning_nkv", nkv, f"must divide the Lightning head count {heads}")
    return nkv


def config_from_released(raw: Mapping, fmt: str | None = None) -> tuple[HybridConfig, dict]:
    """Our :class:`HybridConfig` for a released ``config.json`` (parsed), plus format facts.

    Args:
        raw: the parsed ``config.json`` of a HypeNet or MiniCPM-SALA checkpoint.
        fmt: one of :data:`FORMATS`; default: :func:`released_format` of ``raw``.

    Returns:
        ``(config, facts)``; ``facts["lightning_kv_heads"]`` is the K/V head count of their Lightning
        projections (expanded to full multi-head on import).

    Raises:
        CheckpointFormatError: unknown format or mixer type, missing sizes, or an option we cannot reproduce
            (the message names the key and the value).
    """
    fmt = fmt or released_format(raw)
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"not a released checkpoint config (model_type {raw.get('model_type')!r}); "
                                    f"supported formats: {list(FORMATS)}")
    sizes = _sizes(fmt, raw)
    heads = sizes["num_attention_heads"]
    if fmt == "hypenet":
        layer_types = _layer_types(fmt, raw, _HYPENET_MIXERS)
        sizes["head_dim"] = raw.get("head_dim") or sizes["hidden_size"] // heads
        if raw.get("use_sliding_window") and raw.get("sliding_window") is not None:
            raise _refuse(fmt, "use_sliding_window", True, "sliding-window attention is not reproduced")
        fields = dict(
            qk_norm=True,  # Qwen3Attention always has q_norm/k_norm
            attention_rope=bool(raw.get("attn_use_rope", True)),
            attention_output_gate=bool(raw.get("attn_use_output_gate", False)),
            hype_base=_hype_base(fmt, raw.get("attn_logits_scaling")) if "attention" in layer_types else None,
            lightning_rope=bool(raw.get("lightning_use_rope", True)),
            lightning_output_gate=bool(raw.get("lightning_use_output_gate", False)),
        )
        flags = {"qk_norm": ("lightning_use_qk_norm", False), "output_norm": ("lightning_use_output_norm", False)}
        heads_key, dim_key = "lightning_nh", "lightning_head_dim"
        if raw.get("lightning_use_short_conv", False):
            raise _refuse(fmt, "lightning_use_short_conv", True, "short convolutions are not part of SPEC 1a")
    else:
        layer_types = _layer_types(fmt, raw, _SALA_MIXERS)
        head_dim = raw.get("head_dim") or sizes["hidden_size"] // heads
        if head_dim * heads != sizes["hidden_size"]:
            raise _refuse(fmt, "head_dim", head_dim, "their sparse layers use hidden_size / num_attention_heads "
                          f"= {sizes['hidden_size'] / heads:g} while their Lightning layers use head_dim; one "
                          "head size is required")
        sizes["head_dim"] = head_dim
        sparse = dict(raw.get("sparse_config") or {})
        use_nope = sparse.pop("use_nope", False)
        if use_nope and raw.get("attn_use_rope", False):
            raise _refuse(fmt, "sparse_config.use_nope", use_nope, "block scoring on un-roped keys while attention "
                          "is roped is not reproduced")
        fields = dict(
            qk_norm=False,  # their minicpm4 attention has no QK norm
            attention_rope=bool(raw.get("attn_use_rope", False)),
            attention_output_gate=bool(raw.get("attn_use_output_gate", True)),
            hype_base=None,
            lightning_rope=bool(raw.get("lightning_use_rope", True)),
            lightning_output_gate=bool(raw.get("use_output_gate", True)),
            sparse_config=_sparse_from_sala(sparse),
        )
        for key in ("scale_emb", "scale_depth", "dim_model_base"):
            if not isinstance(raw.get(key), (int, float)) or not raw[key] > 0:
                raise _refuse(fmt, key, raw.get(key), "MiniCPM muP scales must be given as numbers > 0")
        fields.update(
            embedding_multiplier=float(raw["scale_emb"]),
            residual_multiplier=float(raw["scale_depth"]) / math.sqrt(sizes["num_hidden_layers"]),
            logits_divisor=sizes["hidden_size"] / float(raw["dim_model_base"]),
        )
        flags = {"qk_norm": ("qk_norm", True), "output_norm": ("use_output_norm", True)}
        heads_key, dim_key = "lightning_nh", "lightning_head_dim"
    nkv = heads
    if "lightning" in layer_types:
        for what, (key, default) in flags.items():
            _require(fmt, raw, key, default, True, f"our Lightning layers always have the {what.replace('_', ' ')}")
        nkv = _lightning_common(fmt, raw, sizes, heads_key, dim_key)
        if fields["lightning_output_gate"] and sizes["attention_bias"]:
            raise _refuse(fmt, "attention_bias", True, "the Lightning output gate (z_proj) would have a bias")
    gated = any(t != "lightning" for t in layer_types) and fields["attention_output_gate"]
    if fmt == "minicpm_sala" and gated and sizes["attention_bias"]:  # HypeNet's o_gate never has a bias
        raise _refuse(fmt, "attention_bias", True, "the attention output gate (o_gate) would have a bias")
    try:
        config = HybridConfig(layer_types=layer_types, **sizes, **fields)
    except ValueError as e:
        raise CheckpointFormatError(f"{fmt} config cannot be represented: {e}") from e
    return config, {"format": fmt, "lightning_kv_heads": nkv}


def _sparse_from_sala(sparse: Mapping) -> dict:
    """SALA ``sparse_config`` -> our :class:`SparseConfig` dict (see the module docstring for the rule)."""
    theirs = {**SparseConfig().to_dict(), **{k: v for k, v in sparse.items()}}
    unknown = sorted(set(theirs) - set(SparseConfig().to_dict()))
    if unknown:
        raise CheckpointFormatError(f"minicpm_sala config sparse_config has unknown keys {unknown}")
    ours = dict(theirs)
    ours["window_size"] = theirs["window_size"] + theirs["block_size"]
    ours["topk"] = theirs["topk"] - theirs["init_blocks"] - 1
    if ours["topk"] < 0:
        raise _refuse("minicpm_sala", "sparse_config.topk", theirs["topk"],
                      f"must be at least init_blocks + 1 = {theirs['init_blocks'] + 1}")
    try:
        return SparseConfig.from_dict(ours).to_dict()
    except ValueError as e:
        raise CheckpointFormatError(f"minicpm_sala config sparse_config {dict(sparse)} is invalid: {e}") from e


def _sparse_to_sala(ours: Mapping) -> dict:
    """Inverse of :func:`_sparse_from_sala`."""
    theirs = dict(ours)
    theirs["window_size"] = ours["window_size"] - ours["block_size"]
    theirs["topk"] = ours["topk"] + ours["init_blocks"] + 1
    theirs["use_nope"] = False
    return theirs


def _short_float(x: float) -> float | int:
    """``x`` rounded to 12 significant digits (undoes float noise of derived values), int when integral."""
    y = float(f"{x:.12g}")
    return int(y) if y.is_integer() else y


def config_to_released(config: HybridConfig, fmt: str, dtype: torch.dtype | None = None) -> dict:
    """The ``config.json`` dict of ``fmt`` for a model with ``config`` (inverse of :func:`config_from_released`).

    Lightning layers are written full multi-head (``lightning_nkv = lightning_nh``), as the released
    checkpoints are (``expand_kv_proj: true``).

    Raises:
        CheckpointFormatError: a mixer type or option the format cannot express (e.g. ``sparse`` layers in
            HypeNet, ``attention`` layers, HyPE or QK norm in MiniCPM-SALA, muP scales in HypeNet, a
            MiniCPM-SALA model whose layer 0 is not sparse).
    """
    if fmt not in FORMATS:
        raise CheckpointFormatError(f"unknown released format {fmt!r}; supported: {list(FORMATS)}")
    c = config
    table = _EXPORT_MIXERS[fmt]
    bad = sorted({t for t in c.layer_types if t not in table})
    if bad:
        raise CheckpointFormatError(f"{fmt} has no mixer type for our {bad} layers; it supports {sorted(table)}")
    types = c.layer_types
    has_lightning = "lightning" in types
    gated = any(t != "lightning" for t in types) and c.attention_output_gate and fmt == "minicpm_sala"
    if c.attention_bias and ((has_lightning and c.lightning_output_gate) or gated):
        raise CheckpointFormatError(f"{fmt}: attention_bias with output gates would give the gates biases")
    rope = dict(c.rope_parameters)
    theta = rope.pop("rope_theta", 10000.0)
    rope_scaling = None if rope.get("rope_type", "default") == "default" else rope
    out: dict[str, Any] = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        attention_bias=bool(c.attention_bias),
        attention_dropout=0.0,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        mixer_types=[table[t] for t in types],
        attn_use_rope=bool(c.attention_rope),
        attn_use_output_gate=bool(c.attention_output_gate),
        lightning_nh=c.num_attention_heads,
        lightning_nkv=c.num_attention_heads,
        lightning_head_dim=c.head_dim,
        lightning_scale="1/sqrt(d)",
        lightning_use_rope=bool(c.lightning_rope),
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        use_cache=True,
    )
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    mup = (c.embedding_multiplier, c.residual_multiplier, c.logits_divisor)
    if fmt == "hypenet":
        if "attention" in types and not c.qk_norm:
            raise CheckpointFormatError("hypenet attention layers always have q_norm/k_norm (Qwen3): this model "
                                        "has qk_norm=False")
        if mup != (1.0, 1.0, 1.0):
            raise CheckpointFormatError(f"hypenet has no muP scales; this model has embedding_multiplier, "
                                        f"residual_multiplier, logits_divisor = {mup}")
        out.update(
            architectures=["HypeNetForCausalLM"],
            model_type="hypenet",
            attn_logits_scaling=None if c.hype_base is None else f"hype {_short_float(c.hype_base)}",
            lightning_use_qk_norm=True,
            lightning_use_output_norm=True,
            lightning_use_output_gate=bool(c.lightning_output_gate),
            lightning_use_short_conv=False,
            expand_kv_proj=True,
        )
    else:
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            raise CheckpointFormatError(f"minicpm_sala needs head_dim * num_attention_heads == hidden_size "
                                        f"({c.head_dim} * {c.num_attention_heads} != {c.hidden_size})")
        if "sparse" in types and (c.qk_norm or c.hype_base is not None):
            raise CheckpointFormatError("minicpm_sala sparse layers have no QK norm and no HyPE scaling: this "
                                        f"model has qk_norm={c.qk_norm}, hype_base={c.hype_base}")
        if types[0] != "sparse":
            raise CheckpointFormatError("minicpm_sala's cache requires layer 0 to be sparse ('minicpm4'); this "
                                        f"model's layer 0 is {types[0]!r}")
        if rope_scaling is not None:
            raise CheckpointFormatError(f"minicpm_sala: rope type {rope_scaling.get('rope_type')!r} is not "
                                        "expressible (MiniCPM has its own rope scaling classes)")
        out.update(
            architectures=["MiniCPMSALAForCausalLM"],
            model_type="minicpm_sala",
            qk_norm=True,
            use_output_norm=True,
            use_output_gate=bool(c.lightning_output_gate),
            scale_emb=_short_float(c.embedding_multiplier),
            scale_depth=_short_float(c.residual_multiplier * math.sqrt(c.num_hidden_layers)),
            dim_model_base=_short_float(c.hidden_size / c.logits_divisor),
            sparse_config=_sparse_to_sala(c.sparse_config),
            pretraining_tp=1,
        )
    return out


# --------------------------------------------------------------------------------------- tensors


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``. Tensors are CPU tensors in their stored dtype.

    Raises:
        CheckpointFormatError: no safetensors weights (e.g. only ``pytorch_model.bin``), a shard named by the
            index is missing, or a tensor name occurs in two shards.
    """
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointFormatError(f"{path} has no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointFormatError(f"shard {name} named by {index.name} is missing from {path}")
        for key, t in load_file(str(path / name)).items():
            if key in tensors:
                raise CheckpointFormatError(f"tensor {key} occurs in more than one shard of {path}")
            tensors[key] = t
    return tensors


def _expected_params(config: HybridConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for ``config`` (a model on the meta device: no memory)."""
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class _Entry:
    ours: str
    theirs: str
    their_shape: tuple[int, ...]
    kv_groups: int = 1  # > 1: their tensor has fewer K/V heads; expand (import) by repeating each head


def _plan(config: HybridConfig, fmt: str, lightning_kv_heads: int) -> list[_Entry]:
    """One entry per tensor of ``fmt`` for a model with ``config``, from :data:`NAME_MAPS`."""
    names = NAME_MAPS[fmt]
    groups = config.num_attention_heads // lightning_kv_heads
    plan = []
    for ours, shape in _expected_params(config).items():
        if config.tie_word_embeddings and ours == "lm_head.weight":
            continue
        m = _LAYER_KEY.match(ours)
        if m is None:
            theirs = names.model.get(ours)
            kind = None
        else:
            i, kind = int(m.group(1)), config.layer_types[int(m.group(1))]
            template = f"model.layers.{{}}.{m.group(2)}"
            found = names.layer.get(template) or names.mixers.get(kind, {}).get(template)
            theirs = found.format(i) if found else None
        if theirs is None:
            raise CheckpointFormatError(f"{fmt} has no name for our parameter {ours}: this model cannot be "
                                        "expressed in that format")
        g = 1
        if kind == "lightning" and groups > 1 and re.search(r"self_attn\.[kv]_proj\.", ours):
            g = groups
            shape = (shape[0] // g, *shape[1:])
        plan.append(_Entry(ours, theirs, tuple(shape), g))
    seen = [e.theirs for e in plan]
    assert len(seen) == len(set(seen)), "name map sends two of our parameters to one name"
    return plan


def _expand_heads(t: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    blocks = t.reshape(-1, head_dim, *t.shape[1:])
    return blocks.repeat_interleave(groups, dim=0).reshape(-1, *t.shape[1:])


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor], config: HybridConfig, fmt: str, lightning_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Rename a released checkpoint's tensors to ours, strictly.

    Args:
        tensors: their tensors by name (e.g. from :func:`read_safetensors`).
        config: our config for the checkpoint (from :func:`config_from_released`).
        fmt: one of :data:`FORMATS`.
        lightning_kv_heads: K/V heads of their Lightning projections; fewer than ``num_attention_heads`` are
            expanded to full multi-head (query head i reads K/V head i // g, as their forward repeats them).

    Returns:
        our state dict (same dtypes; ``lm_head.weight`` is the embedding tensor when embeddings are tied).

    Raises:
        CheckpointFormatError: naming every missing tensor, every unexpected (unused) tensor, every tensor
            with the wrong shape or a non-float dtype, or a tied ``lm_head.weight`` that differs from the
            embeddings.
    """
    plan = _plan(config, fmt, lightning_kv_heads or config.num_attention_heads)
    problems, used, out = [], set(), {}
    for e in plan:
        t = tensors.get(e.theirs)
        if t is None:
            problems.append(f"missing tensor {e.theirs} (for our {e.ours}, shape {list(e.their_shape)})")
            continue
        used.add(e.theirs)
        if tuple(t.shape) != e.their_shape:
            problems.append(f"tensor {e.theirs} has shape {list(t.shape)}, expected {list(e.their_shape)}")
            continue
        if not t.is_floating_point():
            problems.append(f"tensor {e.theirs} has dtype {t.dtype}, expected a floating-point dtype")
            continue
        out[e.ours] = _expand_heads(t, e.kv_groups, config.head_dim) if e.kv_groups > 1 else t
    if config.tie_word_embeddings and "model.embed_tokens.weight" in out:
        head = tensors.get("lm_head.weight")
        if head is not None:
            used.add("lm_head.weight")
            embed = out["model.embed_tokens.weight"]
            if head.shape != embed.shape or not torch.equal(head, embed):
                problems.append("tensor lm_head.weight differs from model.embed_tokens.weight although "
                                "tie_word_embeddings is true")
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    extra = sorted(set(tensors) - used)
    problems += [f"unexpected tensor {k} (shape {list(tensors[k].shape)}): no parameter of this config uses it"
                 for k in extra]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointFormatError(
            f"{fmt} checkpoint does not match its config.json ({len(problems)} problems):\n  {shown}"
        )
    return out


def export_state_dict(model: HybridForCausalLM, fmt: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our model's tensors under ``fmt``'s names (contiguous CPU tensors; ``dtype`` casts floats if given).

    A tied ``lm_head.weight`` is left out, as ``save_pretrained`` does. Raises CheckpointFormatError for a
    parameter the format has no name for.
    """
    state = model.state_dict()
    out = {}
    for e in _plan(model.config, fmt, model.config.num_attention_heads):
        t = state[e.ours].detach()
        if dtype is not None:
            t = t.to(dtype)
        out[e.theirs] = t.to("cpu").contiguous()
    return out


# ------------------------------------------------------------------------------- import / export


def _uniform_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def import_released(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> HybridForCausalLM:
    """Load a HypeNet or MiniCPM-SALA checkpoint directory as a :class:`HybridForCausalLM` (eval mode).

    Their modelling code is not run. The model is built on the meta device and takes the checkpoint's
    tensors (no random initialisation, no double copy); ``generation_config.json`` is read when present.

    Args:
        path: directory with ``config.json`` and safetensors weights.
        dtype: parameter dtype; None keeps the checkpoint's dtype (float32 if it mixes dtypes).
        device: where the model goes.

    Raises:
        FileNotFoundError: no ``config.json``.
        CheckpointFormatError: not a released format, an unsupported option, or tensors that do not match
            (see :func:`config_from_released`, :func:`convert_state_dict`).
    """
    path = Path(path)
    raw = _read_config(path)
    fmt = released_format(raw)
    if fmt is None:
        raise CheckpointFormatError(f"{path} is not a HypeNet or MiniCPM-SALA checkpoint "
                                    f"(model_type {raw.get('model_type')!r}, no recognised mixer_types)")
    config, facts = config_from_released(raw, fmt)
    tensors = read_safetensors(path)
    state = convert_state_dict(tensors, config, fmt, facts["lightning_kv_heads"])
    dtype = dtype or _uniform_dtype(tensors)
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(device=device, dtype=dtype)
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return model.eval()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def export_released(
    model: HybridForCausalLM, fmt: str, out_dir: str | Path, *, dtype: torch.dtype | None = None, tokenizer=None
) -> Path:
    """Write ``model`` as a ``fmt`` checkpoint: their ``config.json`` and ``model.safetensors`` names.

    Their modelling files are not written: copy ``modeling_*.py`` / ``configuration_*.py`` from the
    released checkpoint to load the result with ``trust_remote_code`` (we write no ``auto_map``).

    Args:
        model: a :class:`HybridForCausalLM`.
        fmt: one of :data:`FORMATS`.
        out_dir: created if needed; ``config.json`` and ``model.safetensors`` are replaced atomically.
        dtype: cast floating tensors (default: keep the model's dtypes, so import -> export round-trips
            byte for byte).
        tokenizer: also saved there when given.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CheckpointFormatError: the model uses a mixer type or option the format cannot express
            (see :func:`config_to_released`).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config_to_released(model.config, fmt)  # refuses what the format cannot express, before any work
    tensors = export_state_dict(model, fmt, dtype)
    cfg = config_to_released(model.config, fmt, dtype or _uniform_dtype(tensors))
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out_dir / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
