"""Kernel dispatch: which implementation each op runs, chosen once per process and logged once.

Two paths exist for every op (STYLE: "a fast kernel when installed, a pure-torch fallback always"):

* the **reference** path: the pure-PyTorch forms in :mod:`hybridize.ops.lightning` and an eager
  (matmul + softmax in fp32) softmax attention; it runs anywhere and is what every test compares against;
* the **fast** path: on CUDA with fla (flash-linear-attention) importable, Lightning runs through fla's
  ``chunk_simple_gla`` (T > 1) and ``fused_recurrent_simple_gla`` (decode), and softmax attention runs
  through ``torch.nn.functional.scaled_dot_product_attention`` (flash/memory-efficient kernels; SDPA is
  also the fast path on CPU, where it needs nothing extra).

fla and triton are optional (``pip install hybridize[gpu]``). Importing hybridize never imports fla: the
probe uses :func:`importlib.util.find_spec`, and fla is imported the first time a CUDA tensor reaches a
Lightning op. A broken fla install (import error) falls back to the reference with one warning.

The reference path can be forced for the whole process with the environment variable
``HYBRIDIZE_FORCE_REFERENCE=1`` (read once, at the first dispatch) or for a block of code with
:func:`force_reference` (what the tests use to run both paths against each other).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "FORCE_REFERENCE_ENV",
    "reference_mismatch",
    "force_reference",
    "reference_forced",
    "fla_available",
    "lightning_backend",
    "attention_backend",
    "fla_lightning_kernels",
]

#: Environment variable that forces the reference path for the whole process when set to 1/true/yes.
FORCE_REFERENCE_ENV = "HYBRIDIZE_FORCE_REFERENCE"

logger = logging.getLogger("hybridize")

_lock = threading.Lock()
_env_forced: bool | None = None  # read once
_force_depth = 0  # nesting depth of force_reference() blocks
_fla_probe: bool | None = None  # find_spec result, probed once
_fla_kernels: tuple[Callable, Callable] | None = None
_fla_import_error: str | None = None
_logged: set[str] = set()


def _log_once(key: str, level: int, message: str, *args) -> None:
    """Log ``message % args`` the first time ``key`` is seen. Arguments that cost something to compute
    are passed as zero-argument callables and evaluated only then (this sits on every op call)."""
    if key in _logged:  # fast path: no lock, no formatting
        return
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, message, *(a() if callable(a) else a for a in args))


def _env_force() -> bool:
    global _env_forced
    if _env_forced is None:
        value = os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower()
        _env_forced = value in ("1", "true", "yes", "on")
        if _env_forced:
            _log_once("env", logging.INFO, "kernels: %s=%s: every op runs its reference path", FORCE_REFERENCE_ENV, value)
    return _env_forced


def reference_forced() -> bool:
    """True when the reference path is forced (env ``HYBRIDIZE_FORCE_REFERENCE`` or inside :func:`force_reference`)."""
    return _force_depth > 0 or _env_force()


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Context manager: run every op on its reference path inside the block (nestable, not thread-local).

    Usage::

        with force_reference():
            expected = model(ids).logits   # pure-PyTorch Lightning, eager fp32 softmax attention

    Args:
        enabled: False makes the block a no-op (handy for parametrised tests).
    """
    global _force_depth
    if not enabled:
        yield
        return
    with _lock:
        _force_depth += 1
    try:
        yield
    finally:
        with _lock:
            _force_depth -= 1


def fla_available() -> bool:
    """Whether CUDA is available and the ``fla`` package is installed (probed once; fla is not imported)."""
    global _fla_probe
    if _fla_probe is None:
        _fla_probe = bool(torch.cuda.is_available()) and importlib.util.find_spec("fla") is not None
    return _fla_probe


def fla_lightning_kernels() -> tuple[Callable, Callable] | None:
    """fla's ``(chunk_simple_gla, fused_recurrent_simple_gla)``, imported on first call; None if unusable.

    Source: fla-org/flash-linear-attention, ``fla/ops/simple_gla/{chunk,fused_recurrent}.py``: both take
    ``q, k, v`` ``[B, T, H, K/V]``, ``g_gamma`` ``[H]`` (a per-head log decay), ``scale``,
    ``initial_state``/``output_final_state`` (states ``[N, H, K, V]`` fp32) and ``cu_seqlens``.
    Returns None when CUDA or fla is missing or fla fails to import (logged once as a warning).
    """
    global _fla_kernels, _fla_import_error
    if _fla_kernels is not None:
        return _fla_kernels
    if _fla_import_error is not None or not fla_available():
        return None
    try:
        module = importlib.import_module("fla.ops.simple_gla")
        kernels = (module.chunk_simple_gla, module.fused_recurrent_simple_gla)
    except Exception as exc:  # a broken fla/triton install must not break the reference path
        _fla_import_error = f"{type(exc).__name__}: {exc}"
        _log_once(
            "fla-broken",
            logging.WARNING,
            "kernels: fla is installed but failed to import (%s); Lightning uses the PyTorch reference",
            _fla_import_error,
        )
        return None
    _fla_kernels = kernels
    return kernels


def lightning_backend(device: torch.device) -> str:
    """``"fla"`` or ``"reference"``: the Lightning implementation for tensors on ``device`` right now.

    ``"fla"`` needs a CUDA device, fla importable and the reference not forced. The first decision of each
    kind is logged once (logger ``"hybridize"``, level INFO).
    """
    if device.type != "cuda":
        _log_once(f"lightning-{device.type}", logging.INFO, "kernels: Lightning on %s: PyTorch reference", device.type)
        return "reference"
    if reference_forced():
        _log_once("lightning-forced", logging.INFO, "kernels: Lightning on CUDA: reference forced")
        return "reference"
    if fla_lightning_kernels() is None:
        _log_once(
            "lightning-noflash",
            logging.INFO,
            "kernels: Lightning on CUDA: PyTorch reference (install fla-core and flash-linear-attention "
            "for the fused kernels: pip install 'hybridize[gpu]')",
        )
        return "reference"
    _log_once(
        "lightning-fla",
        logging.INFO,
        "kernels: Lightning on CUDA: fla %s chunk_simple_gla / fused_recurrent_simple_gla",
        _fla_version,  # importlib.metadata scans sys.path: evaluated once, not per call
    )
    return "fla"


def reference_mismatch(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when a fast path's ``out`` equals the reference ``ref`` to the precision of ``dtype``, else why not.

    The rule the kernel checks share (a kernel that disagrees is never chosen): relative Frobenius error
    ``|out - ref| / |ref|`` at most 1e-3 for fp32, 2e-2 for bf16/fp16 (both compared in fp32).

    Args:
        out, ref: tensors of one shape (any float dtype).
        dtype: the activation dtype the fast path ran in.

    Returns:
        None, or ``"relative error E (tolerance T)"``.
    """
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    return None if err <= tol else f"relative error {err:.2e} (tolerance {tol:g})"


#: Compiled variants (shapes, dtypes, layouts) one FlexAttention function may keep (dynamo's default is 8).
FLEX_RECOMPILE_LIMIT = 64


def compile_flex(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, fullgraph=True, ...)`` for a function that calls FlexAttention.

    ``fullgraph=True`` matters for correctness, not speed: past dynamo's recompile limit a plain compiled
    function runs *eagerly*, and eager FlexAttention ignores a BlockMask's block lists (only its ``mask_mod``
    applies), so a block-sparse call silently becomes dense (seen on the H200 with torch 2.11 once a process
    had compiled 8 variants). With ``fullgraph`` the limit raises ``FailOnRecompileLimitHit`` and the callers
    fall back to their reference path. The limit itself is raised to :data:`FLEX_RECOMPILE_LIMIT`: for this
    function where ``torch.compile`` takes a per-function limit (torch >= 2.12), else dynamo's global
    ``recompile_limit`` (only ever raised, never lowered; logged once).

    Args:
        fn: the function to compile; kwargs: more ``torch.compile`` arguments (e.g. ``dynamic``).

    Returns:
        The compiled callable (compilation happens on its first call).
    """
    import inspect

    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        kwargs.setdefault("recompile_limit", FLEX_RECOMPILE_LIMIT)
    else:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the second is the older name of the first
            if getattr(dynamo_config, name, FLEX_RECOMPILE_LIMIT) < FLEX_RECOMPILE_LIMIT:
                setattr(dynamo_config, name, FLEX_RECOMPILE_LIMIT)
                _log_once(f"dynamo-{name}", logging.INFO, "hybridize: torch._dynamo.config.%s raised to %d for "
                          "FlexAttention (this torch has no per-function limit)", name, FLEX_RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, **kwargs)


def attention_backend(device: torch.device) -> str:
    """``"sdpa"`` or ``"reference"`` (eager fp32 softmax): the softmax-attention path for ``device`` right now."""
    if reference_forced():
        return "reference"
    _log_once(f"attention-{device.type}", logging.INFO, "kernels: softmax attention on %s: torch SDPA", device.type)
    return "sdpa"


def _fla_version() -> str:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:
        return "(version unknown)"
