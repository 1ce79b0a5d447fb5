"""Small helpers shared by the evaluation modules (not part of the public API).

They paper over the differences between transformers releases (5.17 names the forward argument
``past_key_values``; 5.24 calls it ``cache`` and warns about the old name) and between model classes
(the teacher's ``LlamaForCausalLM`` and our hybrid model).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Mapping

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return {}


def cache_kwarg_name(model: nn.Module) -> str:
    """Name of the forward argument that takes the cache: ``past_key_values`` or ``cache``.

    An explicit ``past_key_values`` parameter wins (transformers <= 5.23 and our hybrid model); else
    ``cache`` when the forward declares it (transformers >= 5.24); else ``past_key_values``.
    """
    params = _forward_params(model)
    if "past_key_values" in params:
        return "past_key_values"
    if "cache" in params:
        return "cache"
    return "past_key_values"


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    """True when ``model.forward`` declares a parameter called ``name``."""
    return name in _forward_params(model)


def output_cache(out: Any) -> Any:
    """The cache returned by a forward call (``.past_key_values`` or, in transformers >= 5.24, ``.cache``)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("past_key_values", "cache"):
        if name in keys and out[name] is not None:
            return out[name]
    for name in ("past_key_values", "cache"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def output_logits(out: Any) -> torch.Tensor:
    """``out.logits`` (``out["logits"]`` for a plain dict, ``out[0]`` for tuple outputs)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out["logits"] if isinstance(out, Mapping) else out[0]
    return logits


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA/XPU/MPS); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):  # pragma: no cover
        torch.xpu.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):  # pragma: no cover
        torch.mps.synchronize()


def timed_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after synchronising ``device`` (seconds)."""
    synchronize(device)
    return time.perf_counter()
