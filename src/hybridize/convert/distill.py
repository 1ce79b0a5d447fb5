"""Stage 2, end-to-end distillation (SPEC 2, "Stage 2"; HALO paper Sec. 4.3), and stage 3, the long-context
fine-tune (SPEC 2, "Stage 3").

Stage 2 builds the hybrid from the teacher (selected layers: the teacher's attention, NoPE, with the new
output gate; the rest: the stage-1 Lightning students) and trains it on ``KL(p_teacher || p_student)`` of
the logits, temperature 1, no cross-entropy, teacher frozen. Embeddings and the LM head stay frozen (they
are the teacher's, and the KL compares distributions over the teacher's vocabulary).

Stage 3 trains the same parameters on plain next-token loss at long length with activation checkpointing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointFormatError
from .align import MIXERS_FILE
from .distributed import barrier, context, shard_modules
from .flops import forward_flops_per_token
from .losses import chunked_cross_entropy, chunked_kl
from .stage import StageDir
from .trainer import TrainSettings, train
from .transfer import build_student

__all__ = ["build_hybrid", "trainable_parameters", "run_stage2", "run_stage3", "save_model_atomic", "MODEL_DIR"]

log = logging.getLogger("hybridize")

#: Sub-directory of stage 2/3 holding the converted model (``save_pretrained`` format).
MODEL_DIR = "model"


def build_hybrid(teacher, layer_types: list[str], mixers_path: Path | None):
    """The stage-2 student: attention layers from the teacher (NoPE + output gate), Lightning layers loaded
    from a stage-1 :data:`MIXERS_FILE` (or left at their stage-0 init if ``mixers_path`` is None).

    Raises:
        CheckpointFormatError: the mixers file cannot be read, lacks a Lightning layer's tensor, holds one of
            another shape or dtype kind, or holds layers the teacher does not have (a file of another model).
    """
    student, _ = build_student(teacher, layer_types, attention_rope=False, attention_output_gate=True)
    if mixers_path is not None:
        _load_stage1_mixers(student, layer_types, Path(mixers_path))
    return student


def _load_stage1_mixers(student, layer_types: list[str], path: Path) -> None:
    fix = f"re-run stage 1 (delete {path.parent} and run `hybridize convert` again) or pass the right run directory"
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CheckpointFormatError(f"cannot read the stage-1 mixers {path}: {exc}; {fix}") from None
    index = {k: re.match(r"layers\.([0-9]+)\.", k) for k in tensors}
    foreign = [k for k, m in index.items() if m is None or int(m.group(1)) >= len(layer_types)]
    if foreign:
        raise CheckpointFormatError(
            f"the stage-1 mixers {path} do not belong to this teacher ({len(layer_types)} layers): "
            f"{sorted(foreign)[:3]} is not layers.<i>.* of one of its layers; {fix}")
    for i, kind in enumerate(layer_types):
        if kind != "lightning":
            continue
        mixer = student.model.layers[i].self_attn
        state = {}
        for k, ref in mixer.state_dict().items():
            t = tensors.get(f"layers.{i}.{k}")
            if t is None or t.shape != ref.shape or not t.is_floating_point():
                what = "is missing" if t is None else f"has shape {tuple(t.shape)} dtype {t.dtype}"
                raise CheckpointFormatError(
                    f"the stage-1 mixers {path}: layers.{i}.{k} {what}, the student needs {tuple(ref.shape)} floating point; {fix}")
            if not torch.isfinite(t).all():
                raise CheckpointFormatError(f"the stage-1 mixers {path}: layers.{i}.{k} holds NaN or infinite values; {fix}")
            state[k] = t
        mixer.load_state_dict(state)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter except the embeddings and the LM head (SPEC 2 stage 2/3 train the decoder)."""
    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    params = {}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
        else:
            params[name] = p
    return params


def save_model_atomic(model, tokenizer, path: Path) -> None:
    """``save_pretrained`` model (safetensors) and tokenizer into ``path`` via a temporary directory.

    Collective when the model is FSDP2-sharded: the whole state dict is gathered and rank 0 writes it.
    """
    state_dict = None
    if context().enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not context().is_main:
        barrier()
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    barrier()


def _distill(stage, teacher, student, tokenizer, data, settings, inputs, seed, loss_kind, extra) -> dict:
    student.to(context().device).train()
    # model FLOPs (counted before sharding): student forward + backward, plus the frozen teacher's forward
    flops = 3 * forward_flops_per_token(student, settings.seq_len)
    if loss_kind == "kl":
        flops += forward_flops_per_token(teacher, settings.seq_len)
    params_before = trainable_parameters(student)  # freezes embeddings / head before sharding
    frozen = {p for p in student.parameters() if not p.requires_grad}
    shard_modules(list(student.model.layers), student.model, ignored=frozen, reshard_after_forward=settings.reshard_after_forward,
                  param_dtype=settings.fsdp_param_dtype, prefetch=settings.fsdp_prefetch, unit=settings.fsdp_unit)
    params = {name: p for name, p in student.named_parameters() if name in params_before}

    def kl_loss(batch):
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=batch, use_cache=False).last_hidden_state
        s_hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state
        return chunked_kl(s_hidden, t_hidden, student.lm_head, teacher.lm_head)

    def lm_loss(batch):
        s_hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state
        return chunked_cross_entropy(s_hidden, batch, student.lm_head)

    loss_fn = kl_loss if loss_kind == "kl" else lm_loss
    result = train(stage, params, loss_fn, data, settings, seed=seed, desc=f"{stage.name} {loss_kind}", flops_per_token=flops,
                   sync_modules=[student.model])
    student.eval()
    save_model_atomic(student, tokenizer, stage.path / MODEL_DIR)
    return stage.complete(
        inputs,
        tokens_seen=result.tokens_seen,
        final_loss=result.final_loss,
        extra={
            "loss": loss_kind,
            "loss_curve": result.losses,
            **result.metrics(),
            "layer_types": student.config.layer_types,
            "settings": vars(settings),
            **extra,
        },
    )


def run_stage2(teacher, tokenizer, train_data, run_dir, layer_types, settings: TrainSettings, inputs: dict, seed=0) -> dict:
    """Stage 2: KL distillation of the hybrid ``layer_types`` from ``teacher``; writes ``stage2/`` (model + manifest).

    Needs ``stage1/`` complete. Raises BudgetError if the budget is smaller than one batch.
    """
    stage = StageDir(run_dir, "stage2")
    if stage.is_complete():
        log.info("stage2: complete, reusing %s", stage.path)
        return stage.manifest()
    stage.begin()
    teacher.requires_grad_(False).eval()
    student = build_hybrid(teacher, layer_types, Path(run_dir) / "stage1" / MIXERS_FILE)
    return _distill(
        stage, teacher, student, tokenizer, train_data, settings,
        {**inputs, "init": str(Path(run_dir) / "stage1")}, seed, "kl", {},
    )


def run_stage3(tokenizer, train_data, run_dir, settings: TrainSettings, inputs: dict, seed=0) -> dict:
    """Stage 3: next-token fine-tune of the stage-2 model at long length (activation checkpointing, chunked
    loss over the vocabulary); writes ``stage3/``."""
    from ..models import HybridForCausalLM

    stage = StageDir(run_dir, "stage3")
    if stage.is_complete():
        log.info("stage3: complete, reusing %s", stage.path)
        return stage.manifest()
    stage.begin()
    src = Path(run_dir) / "stage2" / MODEL_DIR
    student = HybridForCausalLM.from_pretrained(src)
    student.model.gradient_checkpointing = True  # activation checkpointing per decoder layer (HybridModel)
    return _distill(stage, None, student, tokenizer, train_data, settings, {**inputs, "init": str(src)}, seed, "lm", {})
