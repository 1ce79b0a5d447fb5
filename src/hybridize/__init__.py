"""hybridize: convert a pretrained Transformer LLM into a hybrid linear-attention long-context model.

See README.md and SPEC (HypeNet / HALO, arXiv 2601.22156; MiniCPM-SALA, arXiv 2602.11761).
"""

__version__ = "0.1.0"
__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "__version__"]


def __getattr__(name: str):
    """The model classes load torch and transformers on first use (PEP 562), so ``hybridize --help`` and the
    option checks answer without them."""
    if name in ("HybridCache", "HybridConfig", "HybridForCausalLM"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'hybridize' has no attribute {name!r}")
