"""Hybrid model classes, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import HybridCache
from .configuration import MIXER_TYPES, HybridConfig, layer_types_from_str, layer_types_to_str
from .modeling import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "MIXER_TYPES",
    "layer_types_from_str",
    "layer_types_to_str",
]
