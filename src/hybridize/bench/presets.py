"""Model shapes the benchmark builds, as data: one :class:`Preset` per name in :data:`PRESETS`.

Every preset is built with random weights directly on the target device in the target dtype
(:func:`build_model`: meta-device construction, ``to_empty``, in-place random init), so an 8B model never
exists as an fp32 copy on the CPU.

* ``qwen3-8b`` / ``qwen3-1.7b``: our :class:`~hybridize.HybridForCausalLM` with every layer softmax attention
  and RoPE kept (the teacher's architecture, through our static cache and CUDA-graph decoder);
* ``qwen3-8b-hf`` / ``qwen3-1.7b-hf``: transformers' ``Qwen3ForCausalLM`` with SDPA, the peer a user would
  otherwise run (one forward over the prompt keeping the last logits, then a ``DynamicCache`` decode loop);
* ``hypenet-8b`` / ``hypenet-1.7b``: a quarter of the layers NoPE softmax attention with HyPE (a = 500) and an
  output gate, evenly spaced, the rest Lightning (SPEC 1a/1b);
* ``sala-8b`` / ``sala-1.7b``: a quarter of the layers InfLLM-V2 sparse attention (SALA sizes; first and last
  layer always), the rest Lightning (SPEC 1c);
* ``tiny`` / ``tiny-full`` / ``tiny-hf``: minute shapes for CPU smoke tests of the whole command.

Shapes: Qwen3-8B (36 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128, FFN 12288, vocab 151936, QK-norm,
untied head) and Qwen3-1.7B (28 layers, hidden 2048, 16 heads, 8 KV heads, head dim 128, FFN 6144, vocab
151936, tied embeddings), from their public ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a model is built, not when the command line lists the presets
    import torch
    from torch import nn

#: ``hybridize bench`` defaults: context lengths (32K, 128K, 256K, 512K and 1M tokens) and output directory.
DEFAULT_LENGTHS = (32768, 131072, 262144, 524288, 1048576)
DEFAULT_OUT = "runs/bench"

__all__ = ["Preset", "PRESETS", "preset_names", "layer_schedule", "build_model", "init_random_"]

QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    max_position_embeddings=40960,
)
QWEN3_1_7B = dict(QWEN3_8B, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  tie_word_embeddings=True)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    max_position_embeddings=4096,
)
#: small InfLLM-V2 sizes for the tiny preset, so that a few hundred tokens already take the sparse path
TINY_SPARSE = dict(kernel_size=16, kernel_stride=8, block_size=16, window_size=32, topk=2, init_blocks=1, dense_len=64)


@dataclass(frozen=True)
class Preset:
    """One benchmark model.

    Attributes:
        name: the ``--presets`` name.
        kind: ``"hybrid"`` (ours, static cache + :class:`~hybridize.inference.GraphDecoder`) or ``"hf"``
            (transformers ``Qwen3ForCausalLM`` with SDPA and a ``DynamicCache``).
        shape: transformers/HybridConfig size fields.
        schedule: ``"full"`` (every layer attention, RoPE kept), ``"hypenet"`` or ``"sala"`` (a quarter
            attention / sparse, the rest Lightning); ignored for ``hf``.
        baseline: our full-attention preset of the same shape its speed-ups are measured against (None for
            the baselines themselves).
        description: one line for the report.
        hybrid: extra HybridConfig fields.
        peer: the transformers preset of the same shape, the second reference of the speed-ups (None for the
            peer itself).
    """

    name: str
    kind: str
    shape: dict
    schedule: str
    baseline: str | None
    description: str
    hybrid: dict = field(default_factory=dict)
    peer: str | None = None


def _presets() -> dict[str, Preset]:
    out = {}
    for tag, shape in (("8b", QWEN3_8B), ("1.7b", QWEN3_1_7B)):
        base = f"qwen3-{tag}"
        out[base] = Preset(base, "hybrid", shape, "full", None,
                           f"Qwen3-{tag.upper()} shape, all softmax attention with RoPE (ours: static cache, CUDA-graph decode)",
                           {"qk_norm": True, "attention_rope": True}, peer=f"{base}-hf")
        out[f"{base}-hf"] = Preset(f"{base}-hf", "hf", shape, "full", None,
                                   f"transformers Qwen3ForCausalLM, Qwen3-{tag.upper()} shape, SDPA, DynamicCache (peer)")
        out[f"hypenet-{tag}"] = Preset(
            f"hypenet-{tag}", "hybrid", shape, "hypenet", base,
            f"Qwen3-{tag.upper()} shape, 1/4 NoPE+HyPE attention (gated) + 3/4 Lightning",
            {"qk_norm": True, "attention_output_gate": True, "hype_base": 500.0}, peer=f"{base}-hf",
        )
        out[f"sala-{tag}"] = Preset(
            f"sala-{tag}", "hybrid", shape, "sala", base,
            f"Qwen3-{tag.upper()} shape, 1/4 InfLLM-V2 sparse attention (SALA sizes, gated) + 3/4 Lightning",
            {"qk_norm": True, "attention_output_gate": True}, peer=f"{base}-hf",
        )
    out["tiny"] = Preset("tiny", "hybrid", TINY, "mixed", "tiny-full",
                         "CPU smoke test: 4 layers S L A L (sparse, Lightning, attention, Lightning)",
                         {"qk_norm": True, "attention_output_gate": True, "hype_base": 50.0, "sparse_config": TINY_SPARSE,
                          "lightning_chunk_size": 16}, peer="tiny-hf")
    out["tiny-full"] = Preset("tiny-full", "hybrid", TINY, "full", None, "CPU smoke test: 4 attention layers with RoPE",
                              {"qk_norm": True, "attention_rope": True}, peer="tiny-hf")
    out["tiny-hf"] = Preset("tiny-hf", "hf", TINY, "full", None, "CPU smoke test: transformers Qwen3ForCausalLM")
    return out


#: every preset by name
PRESETS: dict[str, Preset] = _presets()


def preset_names() -> list[str]:
    """The names accepted by ``--presets``."""
    return list(PRESETS)


def layer_schedule(schedule: str, num_layers: int) -> list[str]:
    """``layer_types`` for a schedule name (see :class:`Preset`).

    ``hypenet``: ``floor(L/4)`` attention layers evenly spaced (``select_layers(..., "even")``), the rest
    lightning. ``sala``: ``floor(L/4)`` sparse layers, the first and last always among them, the others evenly
    spaced. ``full``: all attention. ``mixed`` (tiny): ``S L A L`` repeated.

    Raises:
        ValueError: an unknown schedule.
    """
    from ..convert.select import select_layers

    k = num_layers // 4
    if schedule == "full":
        return ["attention"] * num_layers
    if schedule == "hypenet":
        keep = set(select_layers(num_layers, k, "even"))
        return ["attention" if i in keep else "lightning" for i in range(num_layers)]
    if schedule == "sala":
        keep = set(select_layers(num_layers, k, "even", always_attention=(0, num_layers - 1)))
        return ["sparse" if i in keep else "lightning" for i in range(num_layers)]
    if schedule == "mixed":
        cycle = ["sparse", "lightning", "attention", "lightning"]
        return [cycle[i % 4] for i in range(num_layers)]
    raise ValueError(f"unknown schedule {schedule!r}")


def init_random_(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random weights in place, on the model's device and dtype: matrices ``N(0, std)``, norm weights 1,
    other vectors (biases) 0. Deterministic for a seed on a given device."""
    import torch

    with torch.no_grad():
        _init_random(model, std, seed)


def _init_random(model: nn.Module, std: float, seed: int) -> None:
    import torch

    gen = None
    devices = {p.device for p in model.parameters()}
    if len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda"):
        gen = torch.Generator(device=next(iter(devices))).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif "norm" in name:  # RMSNorm weights (q_norm, o_norm, input_layernorm, model.norm, ...)
            p.fill_(1.0)
        else:
            p.zero_()


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """meta -> ``device`` in ``dtype`` without an intermediate fp32 copy; re-tie tied embeddings; random init."""
    model = model.to(dtype=dtype)  # meta: free
    model = model.to_empty(device=device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    init_random_(model, seed=seed)
    return model.eval()


def build_model(preset: Preset, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The preset's model with random weights on ``device`` in ``dtype`` (eval mode).

    Built on the meta device first, then allocated once on ``device`` (``to_empty``) and initialised in place
    (:func:`init_random_`), so peak host memory stays small and the device holds one copy of the weights.

    Returns:
        a :class:`~hybridize.HybridForCausalLM` (``kind == "hybrid"``) or a transformers ``Qwen3ForCausalLM``
        using SDPA (``kind == "hf"``).

    Raises:
        ValueError: an unknown preset kind or schedule.
    """
    import torch

    device = torch.device(device)
    if preset.kind == "hybrid":
        from ..models import HybridConfig, HybridForCausalLM

        layer_types = layer_schedule(preset.schedule, preset.shape["num_hidden_layers"])
        config = HybridConfig(**preset.shape, **preset.hybrid, layer_types=layer_types)
        with torch.device("meta"):
            model = HybridForCausalLM(config)
        return _materialise(model, device, dtype, seed)
    if preset.kind == "hf":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**preset.shape)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
        model = _materialise(model, device, dtype, seed)
        # rotary tables are buffers computed at construction: rebuild them for real (fp32) on the device
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config).to(device)
        return model
    raise ValueError(f"unknown preset kind {preset.kind!r}")
