"""Stage 1, hidden-state alignment (SPEC 2, "Stage 1"; HALO paper Sec. 4.1).

The teacher runs frozen; every layer's Lightning student receives that layer's attention input (the
normalised hidden state, detached) and is trained with MSE against the teacher attention's output.
Only the student mixers train. The stage-0 students come from :func:`~hybridize.convert.transfer.build_student`
with every layer Lightning.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.common import RotaryEmbedding
from ..models import HybridConfig
from .distributed import all_reduce_mean, barrier, context, full_tensor, shard_modules
from .flops import forward_flops_per_token, linear_flops_per_token, mixing_flops_per_token
from .stage import StageDir, save_tensors_atomic
from .trainer import TrainSettings, train
from .transfer import build_student

__all__ = ["build_lightning_students", "TeacherAttentionTap", "alignment_losses", "run_stage1", "MIXERS_FILE"]

log = logging.getLogger("hybridize")

#: File in a stage-0/1 directory holding the Lightning students, keys ``layers.{i}.{param}``.
MIXERS_FILE = "mixers.safetensors"


def build_lightning_students(teacher) -> tuple[nn.ModuleList, HybridConfig]:
    """Stage 0: one Lightning mixer per teacher layer, initialised from the teacher (SPEC 2 stage 0).

    Returns ``(mixers, config)``: ``mixers[i]`` is a :class:`~hybridize.layers.mixers.LightningAttention`
    and ``config`` the all-Lightning :class:`HybridConfig` (its rotary settings are the teacher's).
    """
    student, _ = build_student(teacher, ["lightning"] * teacher.config.num_hidden_layers)
    mixers = nn.ModuleList(layer.self_attn for layer in student.model.layers)
    return mixers, student.config


class TeacherAttentionTap:
    """Forward hooks on every teacher attention module that record its input and output.

    After a teacher forward, ``inputs[i]`` is layer i's attention input ``[B, T, D]`` (after the input
    RMSNorm) and ``outputs[i]`` its output ``[B, T, D]`` (before the residual add). Use as a context manager.
    """

    def __init__(self, teacher):
        self.layers = teacher.model.layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.self_attn.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[i] = x.detach()
            self.outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def alignment_losses(
    teacher, mixers: nn.ModuleList, rotary: RotaryEmbedding, input_ids: torch.Tensor, backward: bool = True
) -> list[torch.Tensor]:
    """Per-layer MSE between each Lightning student's output and the teacher attention output.

    Args:
        input_ids: ``[B, T]`` int64.
        backward: call ``backward()`` on each layer's loss as soon as it is computed (bounds memory to one
            layer's graph).

    Returns:
        detached fp32 scalar losses, one per layer (mean squared error over all elements).
    """
    device = next(mixers.parameters()).device
    input_ids = input_ids.to(device)
    with torch.no_grad(), TeacherAttentionTap(teacher) as tap:
        # the decoder alone: the taps need no logits, and the LM head would cost [B, T, vocab] memory
        getattr(teacher, "model", teacher)(input_ids=input_ids, use_cache=False)
    b, t = input_ids.shape
    positions = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
    dtype = tap.inputs[0].dtype
    rope = rotary(positions, dtype)
    losses = []
    for i, mixer in enumerate(mixers):
        y = mixer(tap.inputs[i], rope, positions)
        loss = F.mse_loss(y.float(), tap.outputs[i].float())
        if backward:
            loss.backward()
        losses.append(loss.detach())
    return losses


def mixers_state(mixers: nn.ModuleList) -> dict[str, torch.Tensor]:
    """``{"layers.{i}.{param}": tensor}`` for every mixer (whole tensors; collective when sharded)."""
    return {f"layers.{i}.{k}": full_tensor(v) for i, m in enumerate(mixers) for k, v in m.state_dict().items()}


def _save_mixers(mixers: nn.ModuleList, path) -> None:
    state = mixers_state(mixers)
    if context().is_main:
        save_tensors_atomic(state, path)
    barrier()


def load_mixers(mixers: nn.ModuleList, tensors: dict[str, torch.Tensor]) -> None:
    """Load :data:`MIXERS_FILE` contents into ``mixers`` (strict: every key used, every shape checked)."""
    expected = mixers_state(mixers)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"mixer file does not match the teacher: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for i, m in enumerate(mixers):
        m.load_state_dict({k: tensors[f"layers.{i}.{k}"] for k in m.state_dict()})


def run_stage1(teacher, train_data: torch.Tensor, run_dir, settings: TrainSettings, inputs: dict, seed: int = 0) -> dict:
    """Stage 0 (transfer) then stage 1 (alignment). Writes ``stage0/`` and ``stage1/`` with manifests.

    Args:
        teacher: frozen teacher causal LM (Llama/Qwen3).
        train_data: ``[N, seq_len]`` packed training sequences.
        run_dir: the run directory.
        settings: stage-1 budget (SPEC: length 512, LR 1e-3 -> 1e-5 cosine; scaled down for CPU).
        inputs: description of the inputs for the manifest (teacher, data).
        seed: seeds the stage-0 students' random initialisation and the stage-1 data order.

    Returns:
        the stage-1 manifest. Skips work already complete.
    """
    from safetensors.torch import load_file

    stage0, stage1 = StageDir(run_dir, "stage0"), StageDir(run_dir, "stage1")
    if stage1.is_complete():
        log.info("stage1: complete, reusing %s", stage1.path)
        return stage1.manifest()
    teacher.requires_grad_(False).eval()
    # The students' random parts (the Lightning output gates) come from ``seed`` here, not from whatever used the
    # global generator before (building the default teacher from its GGUF initialises a model: a first run on a
    # fresh machine then started stage 1 from other gates than every later run).
    torch.manual_seed(seed)
    mixers, config = build_lightning_students(teacher)
    if not stage0.is_complete():
        stage0.begin()
        _save_mixers(mixers, stage0.path / MIXERS_FILE)
        stage0.complete(inputs, tokens_seen=0, final_loss=None, extra={"layer_types": config.layer_types})
    else:
        load_mixers(mixers, load_file(str(stage0.path / MIXERS_FILE)))
    stage1.begin()
    rotary = RotaryEmbedding(config)
    mixers.to(context().device).train()
    # model FLOPs: the teacher's decoder forward (no LM head) + forward and backward of every student mixer
    flops = forward_flops_per_token(teacher, settings.seq_len, include_head=False) + 3 * (
        linear_flops_per_token(mixers)
        + mixing_flops_per_token(["lightning"] * len(mixers), config.num_attention_heads, config.head_dim,
                                 settings.seq_len, config.lightning_chunk_size)
    )
    # one FSDP2 unit per mixer whatever --fsdp-unit / --fsdp-prefetch say: each mixer is a root of its own, its
    # backward runs right after its forward (alignment_losses), and no module runs them all. Its gathered weights are
    # kept from that forward to that backward whatever --no-fsdp-reshard says: freeing them in between would save no
    # peak memory and cost a second all-gather per mixer and step (FSDP2 frees them after the backward either way)
    shard_modules(list(mixers), reshard_after_forward=False, param_dtype=settings.fsdp_param_dtype)
    params = {f"layers.{i}.{k}": p for i, m in enumerate(mixers) for k, p in m.named_parameters()}
    # per-layer losses of the last step's micro-batches (one entry per micro-batch with --grad-accum)
    # (kept on the device: reading them here would wait for the GPU once per layer and step)
    recent: deque[torch.Tensor] = deque(maxlen=settings.grad_accum)

    def loss_fn(batch):
        losses = torch.stack(alignment_losses(teacher, mixers, rotary, batch, backward=True))
        recent.append(losses)
        return losses.mean()

    loss_fn.did_backward = True
    result = train(stage1, params, loss_fn, train_data, settings, seed=seed, desc="stage1 align", flops_per_token=flops,
                   sync_modules=list(mixers))
    _save_mixers(mixers, stage1.path / MIXERS_FILE)
    # the last step's per-layer losses: mean over its micro-batches and over the processes (collective)
    per_layer_mse = all_reduce_mean(torch.stack(list(recent)).mean(0)).tolist() if recent else []
    return stage1.complete(
        {**inputs, "init": str(stage0.path)},
        tokens_seen=result.tokens_seen,
        final_loss=result.final_loss,
        extra={
            "loss": "MSE (mean over layers)",
            "loss_curve": result.losses,
            "per_layer_mse": per_layer_mse,
            **result.metrics(),
            "settings": vars(settings),
        },
    )
