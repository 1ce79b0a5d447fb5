"""HybridConfig: the configuration of a hybrid decoder (SPEC 1).

``layer_types`` -- one entry per layer, each one of :data:`MIXER_TYPES` -- is the single source of truth for
the model, its cache and every conversion stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PreTrainedConfig

from ..ops.sparse_attention import SparseConfig

__all__ = ["HybridConfig", "MIXER_TYPES", "layer_types_to_str", "layer_types_from_str"]

#: Mixer types a layer can have. ``attention``: softmax attention (SPEC 1b); ``lightning``: Lightning
#: Attention (SPEC 1a); ``sparse``: InfLLM-V2 block-sparse attention (SPEC 1c).
MIXER_TYPES = ("attention", "lightning", "sparse")
#: One letter per mixer type for schedule strings (the eval reports use the same letters).
LAYER_LETTERS = {"attention": "A", "lightning": "L", "sparse": "S"}
_SHORT = LAYER_LETTERS


def layer_types_to_str(layer_types: Sequence[str]) -> str:
    """Short schedule string, one letter a layer: ``A`` attention, ``L`` lightning, ``S`` sparse (``"SLLA"``)."""
    return "".join(_SHORT[t] for t in layer_types)


def layer_types_from_str(schedule: str) -> list[str]:
    """Inverse of :func:`layer_types_to_str`. Raises ValueError on a letter other than A/L/S."""
    inverse = {v: k for k, v in _SHORT.items()}
    bad = sorted({c for c in schedule if c not in inverse})
    if bad:
        raise ValueError(
            f"layer schedule {schedule!r} has letters {bad}; use A (attention), L (lightning) and S (sparse)"
        )
    return [inverse[c] for c in schedule]


class HybridConfig(PreTrainedConfig):
    """Configuration of :class:`~hybridize.models.HybridForCausalLM`.

    The teacher's sizes are kept (embeddings, norms and SwiGLU MLP are the teacher's, SPEC 1); the
    hybrid-specific fields are:

    Args:
        layer_types: list of ``num_hidden_layers`` entries from :data:`MIXER_TYPES`. Default: all attention.
        qk_norm: the teacher has per-head RMSNorm on q and k (Qwen3). Lightning layers always use QK-norm
            (initialised to ones when the teacher has none), attention layers only when this is true.
        attention_rope: keep RoPE in attention layers. False (NoPE) is HypeNet (SPEC 1b); True reproduces
            the teacher when every layer is attention.
        attention_output_gate: attention output is multiplied by ``sigmoid(x W_g)`` before ``o_proj``
            (SPEC 1b, added at the start of stage 2).
        hype_base: HyPE's ``a``: queries of attention layers are scaled by ``log(t + a) / log(a)`` at
            position t (SPEC 1b). None = no scaling.
        lightning_rope: RoPE on Lightning q and k (SPEC 1a: true).
        lightning_output_gate: Lightning output gate ``sigmoid(x W_z)`` (SPEC 1a: true).
        lightning_chunk_size: chunk length (tokens) of the chunked Lightning form.
        sparse_config: sizes of the ``sparse`` layers (SPEC 1c), a dict with the keys of
            :class:`~hybridize.ops.sparse_attention.SparseConfig`; missing keys take MiniCPM-SALA's values
            (kernel_size 32, kernel_stride 16, init_blocks 1, block_size 64, window_size 2048, topk 64,
            dense_len 8192). Stored with every key filled in.
        embedding_multiplier: token embeddings are multiplied by this (MiniCPM muP ``scale_emb``; 1.0 = none).
        residual_multiplier: each residual branch (mixer and MLP) is multiplied by this before it is added
            (MiniCPM muP ``scale_depth / sqrt(num_hidden_layers)``; 1.0 = none).
        logits_divisor: the final hidden states (after the last norm, before ``lm_head``) are divided by this
            (MiniCPM muP ``hidden_size / dim_model_base``; 1.0 = none).

    The remaining arguments have their transformers Llama/Qwen3 meaning (``rope_parameters`` is the
    teacher's, including ``rope_theta`` and ``rope_type``).

    Raises:
        ValueError: if ``layer_types`` has the wrong length or an unknown entry, heads do not divide, or
            ``sparse_config`` has an unknown key or a bad value, or a muP multiplier/divisor is not a finite
            number > 0.
    """

    model_type = "hybridize"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        layer_types: Sequence[str] | None = None,
        attention_rope: bool = False,
        attention_output_gate: bool = False,
        hype_base: float | None = None,
        lightning_rope: bool = True,
        lightning_output_gate: bool = True,
        lightning_chunk_size: int = 64,
        sparse_config: dict | None = None,
        embedding_multiplier: float = 1.0,
        residual_multiplier: float = 1.0,
        logits_divisor: float = 1.0,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.rope_parameters.setdefault("rope_type", "default")
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.attention_rope = attention_rope
        self.attention_output_gate = attention_output_gate
        self.hype_base = hype_base
        self.lightning_rope = lightning_rope
        self.lightning_output_gate = lightning_output_gate
        self.lightning_chunk_size = lightning_chunk_size
        self.sparse_config = SparseConfig.from_dict(sparse_config).to_dict()
        self.embedding_multiplier = float(embedding_multiplier)
        self.residual_multiplier = float(residual_multiplier)
        self.logits_divisor = float(logits_divisor)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set after the base __init__: transformers >= 5.2x validates and renames `layer_types` against its
        # own vocabulary of attention kinds, which has no Lightning/sparse mixers. `validate` below checks ours.
        self.layer_types = list(layer_types) if layer_types is not None else ["attention"] * num_hidden_layers
        self._validate()

    def validate(self) -> None:
        """Check the hybrid fields (transformers calls this at save time). Raises ValueError."""
        self._validate()

    def _validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but the model has {self.num_hidden_layers} "
                "layers: give exactly one mixer type per layer"
            )
        unknown = sorted(set(self.layer_types) - set(MIXER_TYPES))
        if unknown:
            raise ValueError(f"unknown mixer types {unknown} in layer_types; supported: {list(MIXER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for GQA"
            )
        if self.hype_base is not None and self.hype_base <= 1:
            raise ValueError(f"hype_base (HyPE's a) must be > 1 so that log(a) > 0, got {self.hype_base}")
        if self.lightning_chunk_size < 1:
            raise ValueError(f"lightning_chunk_size must be >= 1, got {self.lightning_chunk_size}")
        SparseConfig.from_dict(self.sparse_config)  # raises ValueError naming the bad field
        for name in ("embedding_multiplier", "residual_multiplier", "logits_divisor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (1.0 = no scaling), got {value}")

    @property
    def schedule(self) -> str:
        """``layer_types`` as a short string (see :func:`layer_types_to_str`)."""
        return layer_types_to_str(self.layer_types)

    @classmethod
    def from_teacher_config(cls, teacher_config, **overrides) -> "HybridConfig":
        """Build a HybridConfig with the sizes of a transformers Llama or Qwen3 config.

        ``overrides`` set the hybrid fields (e.g. ``layer_types``). The teacher's ``rope_parameters`` (or
        legacy ``rope_theta``/``rope_scaling``) are carried over. Raises ValueError for unsupported configs.
        """
        tc = teacher_config
        rope = getattr(tc, "rope_parameters", None)
        if not rope:
            rope = dict(getattr(tc, "rope_scaling", None) or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = getattr(tc, "rope_theta", 10000.0)
        fields = dict(
            vocab_size=tc.vocab_size,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_hidden_layers=tc.num_hidden_layers,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            hidden_act=tc.hidden_act,
            max_position_embeddings=tc.max_position_embeddings,
            initializer_range=getattr(tc, "initializer_range", 0.02),
            rms_norm_eps=tc.rms_norm_eps,
            tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
            rope_parameters=dict(rope),
            attention_bias=bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
            qk_norm=tc.model_type == "qwen3",
            pad_token_id=tc.pad_token_id,
            bos_token_id=tc.bos_token_id,
            eos_token_id=tc.eos_token_id,
        )
        fields.update(overrides)
        return cls(**fields)
