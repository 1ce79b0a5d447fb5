"""Evaluation: held-out perplexity, pass-key retrieval, decode speed, cache footprint, reports.

Generic over any transformers causal LM (``PreTrainedModel`` + ``GenerationMixin``) whose forward takes
``input_ids``, ``attention_mask``, ``past_key_values`` (or ``cache``), ``use_cache`` and returns
``.logits`` and the cache; the cache is a transformers ``DynamicCache`` or any object with ``nbytes()``.
"""

from .passkey import first_number, passkey_accuracy, passkey_prompt, repeated_filler
from .perplexity import heldout_perplexity
from .report import (METRICS, bucket_table, compare_table, format_bytes, format_metric, layer_types_string,
                     plot_report, write_report)
from .speed import cache_footprint, cache_nbytes, decode_speed
from .suite import evaluate_model, passkey_key

__all__ = [
    "heldout_perplexity",
    "passkey_prompt",
    "passkey_accuracy",
    "repeated_filler",
    "first_number",
    "decode_speed",
    "cache_nbytes",
    "cache_footprint",
    "compare_table",
    "write_report",
    "plot_report",
    "bucket_table",
    "layer_types_string",
    "format_bytes",
    "format_metric",
    "METRICS",
    "evaluate_model",
    "passkey_key",
]
