"""lm-evaluation-harness adapter: run hybridize models (and teachers) under lm-eval's HF backend, and use
lm-eval tasks as the recall score R and general score C of layer selection (HALO paper Sec. 4.2 uses
SQuAD/FDA/SWDE for R and HellaSwag/ARC-E/ARC-C for C, zero-shot).

lm-eval is optional (``pip install hybridize[eval]``); its tasks download data from the HF hub, so they
need network. Offline, layer selection uses :mod:`hybridize.convert.select`'s built-in scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["hf_lm", "task_metric", "lm_eval_score", "lm_eval_scorer"]

#: Preferred metric of a task's results, first match wins (lm-eval keys are "<metric>,<filter>").
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "contains", "f1", "em")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("lm-eval is not installed: `pip install hybridize[eval]` (or `pip install lm-eval`)") from e


def hf_lm(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """Wrap an in-memory causal LM (a :class:`~hybridize.models.HybridForCausalLM` or a teacher) as lm-eval's
    ``HFLM`` (HF backend, causal), on the model's own device.

    Raises:
        ImportError: lm-eval missing (names the install command).
    """
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    return HFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length,
        device=str(device),
    )


def task_metric(task_result: dict[str, Any]) -> float:
    """The headline number of one task's lm-eval result dict (see :data:`METRIC_PREFERENCE`), in [0, 1].

    Raises:
        KeyError: if none of the preferred metrics is present (names the keys found).
    """
    for name in METRIC_PREFERENCE:
        for key, value in task_result.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)):
                return float(value)
    raise KeyError(f"no metric among {METRIC_PREFERENCE} in task result keys {sorted(task_result)}")


def lm_eval_score(
    model, tokenizer, tasks: Sequence[str], limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
    evaluate: Callable[..., dict] | None = None,
) -> dict[str, Any]:
    """Mean headline metric of ``tasks`` (zero-shot by default) for ``model``.

    Args:
        limit: examples per task (None = all).
        evaluate: the evaluation function (default ``lm_eval.simple_evaluate``; injectable for tests).

    Returns:
        ``{"score": mean over tasks, "per_task": {task: metric}}``.
    """
    if evaluate is None:
        _require_lm_eval()
        from lm_eval import simple_evaluate as evaluate
    lm = hf_lm(model, tokenizer, batch_size=batch_size) if evaluate.__module__.startswith("lm_eval") else model
    with torch.no_grad():
        out = evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    per_task = {t: task_metric(out["results"][t]) for t in tasks}
    return {"score": sum(per_task.values()) / len(per_task), "per_task": per_task}


def lm_eval_scorer(tokenizer, tasks: Sequence[str], limit: int | None = None) -> Callable[[Any], float]:
    """A ``model -> float`` scorer for layer selection built on :func:`lm_eval_score`."""

    def score(model) -> float:
        return lm_eval_score(model, tokenizer, tasks, limit=limit)["score"]

    return score
