"""Load any model hybridize can run: a converted hybrid checkpoint, a released hybrid checkpoint (HypeNet,
MiniCPM-SALA: converted in memory), or a teacher (embedded default, a local Llama/Qwen3 directory, or a hub
id)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load_model", "is_hybrid_checkpoint"]


def is_hybrid_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a hybridize checkpoint (``config.json`` model_type "hybridize")."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "hybridize"
    except (OSError, json.JSONDecodeError):
        return False


def load_model(spec: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu", role: str = "model"):
    """``(model, tokenizer)`` for a hybrid checkpoint directory or a teacher spec.

    A run directory of ``hybridize convert`` is accepted too (its final model is used; FileNotFoundError
    when the run has no finished model yet). A directory in a
    released format (HypeNet ``model_type: hypenet``, MiniCPM-SALA ``model_type: minicpm_sala`` or
    ``mixer_types`` with ``minicpm4``) is imported by :func:`hybridize.models.released.import_released`.
    ``role`` names what ``spec`` is in the messages of a missing path or a directory without
    ``config.json`` (``"model"``, or ``"teacher"`` for ``eval --teacher``).

    Raises:
        hybridize.errors.TeacherNotFoundError / UnsupportedTeacherError: as :func:`load_teacher`; also a
            checkpoint directory without tokenizer files.
        hybridize.errors.CheckpointFormatError: a released checkpoint that does not match its format or
            uses an unsupported option.
    """
    from transformers import AutoTokenizer

    from .convert.pipeline import final_model_dir, is_run_dir
    from .convert.teachers import DEFAULT_TEACHER, _looks_like_path, check_tokenizer_files, load_teacher
    from .errors import TeacherNotFoundError
    from .models import HybridForCausalLM
    from .models.released import import_released, released_format

    if spec is not None and is_run_dir(spec):
        spec = str(final_model_dir(Path(spec)))
    if spec is not None and spec != DEFAULT_TEACHER:
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise TeacherNotFoundError(
                f"{role} directory {path} has no config.json, so it is not a checkpoint (converted, released or "
                "teacher) nor a `hybridize convert` run directory (one with stage1/, stage2/, ...): pass one of those"
            )
        if not path.exists() and _looks_like_path(spec):
            raise TeacherNotFoundError(f"{role} path {path} does not exist")
    if spec is not None and Path(spec).is_dir() and released_format(spec) is not None:
        check_tokenizer_files(spec)
        model = import_released(spec, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        return model, tokenizer
    if spec is not None and is_hybrid_checkpoint(spec):
        check_tokenizer_files(spec)
        model = HybridForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec)
        return model, tokenizer
    return load_teacher(spec, dtype=dtype, device=device)
