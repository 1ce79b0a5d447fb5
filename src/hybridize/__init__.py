"""hybridize: convert a pretrained Transformer LLM into a hybrid linear-attention long-context model.

See README.md and SPEC (HypeNet / HALO, arXiv 2601.22156; MiniCPM-SALA, arXiv 2602.11761).
"""

from .models import HybridCache, HybridConfig, HybridForCausalLM

__version__ = "0.1.0"
__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "__version__"]
