"""The one training loop every conversion stage uses: AdamW, warm-up + cosine, progress, resumable checkpoints."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import BudgetError
from .distributed import all_reduce_mean, context, full_tensor, load_full_, set_gradient_sync
from .flops import mfu
from .stage import StageDir, atomic_write_text, cosine_lr, make_optimizer

__all__ = ["TrainSettings", "TrainResult", "train", "plan_steps", "check_batch_split", "STAGE_FLAGS"]

log = logging.getLogger("hybridize")


@dataclass
class TrainSettings:
    """Settings of one training stage.

    Attributes:
        tokens: token budget; the stage runs ``tokens // (batch_size * seq_len)`` optimizer steps.
        seq_len: tokens per sequence; batch_size: sequences per step.
        lr: peak learning rate; lr_final: the cosine's end; warmup: warm-up steps (SPEC 2: 50, capped at
            a tenth of the steps for short runs).
        checkpoint_every: steps between resumable checkpoints.
        grad_clip: max global gradient norm (None = no clipping).
        grad_accum: gradient accumulation: micro-batches per optimizer step in each process (each process's
            ``batch_size / world_size`` rows split into this many forward/backward passes, interleaved as the
            rows are over processes, so 1 process with ``grad_accum = N`` computes what N processes do); the
            step, its loss and its gradient are those of the whole batch. Lowers activation memory.
        reshard_after_forward: under FSDP2 in stages 2 and 3 with ``fsdp_unit="layer"``, free each layer's gathered
            weights after its forward (True, least memory) or keep them for the backward (False, fewer
            all-gathers); stage 1's mixers and the ``"model"`` unit always keep them; no effect in one process.
        fsdp_param_dtype: under FSDP2, the dtype the weights are all-gathered in, ``"fp32"`` or ``"bf16"``
            (:func:`~hybridize.convert.distributed.shard_modules`); no effect in one process.
        fsdp_prefetch: under FSDP2 in stages 2 and 3, how many decoder layers ahead each layer prefetches the
            all-gathers (0: FSDP2's own overlap; :func:`~hybridize.convert.distributed.shard_modules`).
        fsdp_unit: under FSDP2 in stages 2 and 3, ``"layer"`` (one unit per decoder layer) or ``"model"`` (one
            unit for all trained weights; :func:`~hybridize.convert.distributed.shard_modules`); stage 1 always
            shards each mixer on its own.
        profile_steps: record this many optimizer steps with ``torch.profiler`` (after the first 3 of the run,
            when the stage has that many; else from the second step), into ``<stage>/profile_rank<r>.txt``
            (ops by device time) and ``profile_rank<r>.json`` (a Chrome/Perfetto trace); 0 = off. The profiled
            steps are left out of the throughput figures.
    """

    tokens: int
    seq_len: int
    batch_size: int
    lr: float
    lr_final: float
    warmup: int = 50
    checkpoint_every: int = 20
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    reshard_after_forward: bool = True
    fsdp_param_dtype: str = "fp32"
    fsdp_prefetch: int = 0
    fsdp_unit: str = "layer"
    profile_steps: int = 0


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        steps: optimizer steps of the stage; tokens_seen: ``steps * batch_size * seq_len`` (global).
        final_loss: mean of the last steps' losses (up to 10); losses: loss per step.
        tokens_per_s: global tokens per second of this invocation, first steps included.
        steady_tokens_per_s: the same without the first steps of this invocation (kernel autotuning,
            allocator warm-up): ``min(3, steps_run // 4)`` steps are left out.
        mfu: model FLOPs utilisation at ``steady_tokens_per_s`` (:mod:`hybridize.convert.flops`); None on
            the CPU, on unknown GPUs, or when no FLOPs count was given.
        flops_per_token: the model FLOPs per trained token used for ``mfu``.
        world_size: processes that shared each global batch.
        grad_norms: the global gradient norm of each step before clipping (empty without clipping); a
            1-GPU and an N-GPU run of the same settings must agree here from the first step on.
        profile: what :func:`profile_summary` found in the profiled steps (``profile_steps``), else None.
        settings_changed_on_resume: ``{setting: [first value, this run's]}`` for every :class:`TrainSettings`
            field that differs between the stage's first invocation and this one, over any number of resumes
            (e.g. ``fsdp_param_dtype``, which changes the arithmetic); empty when nothing changed.
    """

    steps: int
    tokens_seen: int
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    steady_tokens_per_s: float | None = None
    mfu: float | None = None
    flops_per_token: float | None = None
    world_size: int = 1
    grad_norms: list[float] = field(default_factory=list)
    profile: dict | None = None
    settings_changed_on_resume: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """The throughput figures for a stage manifest."""
        return {
            "tokens_per_s": self.tokens_per_s,
            "steady_tokens_per_s": self.steady_tokens_per_s,
            "mfu": self.mfu,
            "flops_per_token": self.flops_per_token,
            "world_size": self.world_size,
            "grad_norm_curve": self.grad_norms,
            **({"profile": self.profile} if self.profile is not None else {}),
            **({"settings_changed_on_resume": self.settings_changed_on_resume} if self.settings_changed_on_resume else {}),
        }


#: ``hybridize convert`` flags that set each stage's (token budget, batch size, sequence length), for messages
STAGE_FLAGS = {
    "stage1": ("--stage1-tokens", "--stage1-batch", "--seq-len"),
    "stage2": ("--stage2-tokens", "--stage2-batch", "--seq-len"),
    "stage3": ("--stage3-tokens", "--stage3-batch", "--stage3-seq-len"),
}


def check_batch_split(settings: TrainSettings, world_size: int, stage: str) -> None:
    """Check that ``settings.batch_size`` splits over ``world_size`` processes and each share into
    ``settings.grad_accum`` micro-batches.

    Raises:
        BudgetError: naming the numbers and the flags to change.
    """
    batch_flag = STAGE_FLAGS.get(stage, ("", "the batch size"))[1]
    accum = settings.grad_accum
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise BudgetError(f"{stage}: --grad-accum must be an integer >= 1 (micro-batches per step), got {accum!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise BudgetError(f"{stage}: the number of processes must be an integer >= 1, got {world_size!r}")
    if settings.batch_size % world_size:
        raise BudgetError(
            f"{stage}: batch size {settings.batch_size} does not split over {world_size} processes; "
            f"set {batch_flag} to a multiple of the number of processes"
        )
    if (settings.batch_size // world_size) % accum:
        raise BudgetError(
            f"{stage}: each of the {world_size} process(es) takes {settings.batch_size // world_size} sequences per step, "
            f"which do not split into --grad-accum {accum} micro-batches; set {batch_flag} to a multiple "
            f"of {world_size * accum} (processes x --grad-accum) or change --grad-accum"
        )


def plan_steps(settings: TrainSettings, available_sequences: int | None = None, stage: str = "stage") -> int:
    """Optimizer steps the budget buys.

    Raises:
        BudgetError: if the budget is smaller than one batch (names the numbers and the flags of ``stage``
            to change, :data:`STAGE_FLAGS`).
    """
    tokens_flag, batch_flag, seq_flag = STAGE_FLAGS.get(stage, ("the token budget", "the batch size", "the sequence length"))
    if settings.batch_size < 1 or settings.seq_len < 1:
        raise BudgetError(
            f"{stage}: batch size ({settings.batch_size}) and sequence length ({settings.seq_len}) must be >= 1; "
            f"set {batch_flag} / {seq_flag}"
        )
    per_step = settings.batch_size * settings.seq_len
    steps = settings.tokens // per_step
    if steps < 1:
        raise BudgetError(
            f"{stage}: a budget of {settings.tokens} tokens is smaller than one batch "
            f"({settings.batch_size} x {settings.seq_len} = {per_step} tokens); raise {tokens_flag} "
            f"or lower {batch_flag} / {seq_flag}"
        )
    if available_sequences is not None and available_sequences < settings.batch_size:
        raise BudgetError(
            f"{stage}: the training data packs into {available_sequences} sequences of {settings.seq_len} tokens, "
            f"fewer than one batch of {settings.batch_size}; give more text (--data) or lower {seq_flag} / {batch_flag}"
        )
    return steps


def train(
    stage: StageDir,
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    settings: TrainSettings,
    seed: int = 0,
    desc: str | None = None,
    flops_per_token: float | None = None,
    sync_modules: list[torch.nn.Module] | None = None,
) -> TrainResult:
    """Train ``params`` to minimise ``loss_fn(batch)`` over ``data``; resume from ``stage``'s checkpoint if any.

    Args:
        stage: the stage directory (checkpoints go to ``stage.checkpoint_path``).
        params: the trainable parameters by name (these, and only these, are checkpointed).
        loss_fn: maps this process's micro-batch, a ``[batch_size / (world_size * grad_accum), seq_len]`` int64
            tensor on this rank's device, to a scalar loss, the mean over its rows (it may call backward on parts
            itself and return a detached total; then it must set ``loss_fn.did_backward = True``).
        data: ``[N, seq_len]`` int64 packed training sequences, visited in a seeded random order
            (wrapping around if the budget exceeds one epoch).
        settings: budget and optimiser settings.
        flops_per_token: model FLOPs per trained token (:mod:`hybridize.convert.flops`), for the MFU
            figure in the log and the result.
        sync_modules: the FSDP2-sharded modules of ``params``: with ``settings.grad_accum > 1`` their
            gradient reduction is skipped on all but the last micro-batch of a step (one reduce-scatter per
            step instead of one per micro-batch); ignored in one process.

    Returns:
        A :class:`TrainResult` (loss per step, tokens seen, throughput).

    Raises:
        BudgetError: the budget or the data is smaller than one batch.
    """
    steps = plan_steps(settings, data.shape[0], stage.name)
    ctx = context()
    check_batch_split(settings, ctx.world_size, stage.name)
    accum = settings.grad_accum
    optimizer = make_optimizer(list(params.values()), settings.lr)
    warmup = min(settings.warmup, max(1, steps // 10))
    start_step, losses, grad_norms, changed = 0, [], [], {}
    resumed = stage.load_checkpoint(optimizer)
    if resumed is not None:
        weights, meta = resumed
        for name, p in params.items():
            load_full_(p, weights[name])
        start_step, losses, grad_norms = meta["step"], meta["losses"], meta.get("grad_norms", [])
        log.info("%s: resuming from checkpoint at step %d/%d", stage.name, start_step, steps)
        now = vars(settings)
        fresh = {k: [v, now.get(k)] for k, v in meta.get("settings", {}).items() if now.get(k) != v}
        if fresh:
            log.warning("%s: resumed with settings other than the checkpoint's (before -> now): %s", stage.name,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fresh.items()))
        # recorded in the stage manifest and carried through later checkpoints: the first value each setting had,
        # and this run's (a setting changed back to its first value is no longer listed)
        changed = {k: [first, now.get(k)] for k, (first, _) in {**fresh, **meta.get("settings_changed", {})}.items()
                   if now.get(k) != first}
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(data.shape[0], generator=g) for _ in range(1 + steps * settings.batch_size // data.shape[0])])
    per_step = settings.batch_size * settings.seq_len
    bar = tqdm(total=steps, initial=start_step, desc=desc or stage.name, unit="step", dynamic_ncols=True, disable=not ctx.is_main)
    t0, tokens_this_run = time.time(), 0
    step_ends: list[float] = []
    window = profile_window(settings.profile_steps, start_step, steps)
    profile, paused = None, 0.0  # paused: seconds of profiling, left out of the throughput figures
    # log lines above the progress bar, not glued to it; the profiler is stopped on any exit
    with logging_redirect_tqdm(loggers=[log]), _StepProfiler() as profiler:
        for step in range(start_step, steps):
            profiled = window is not None and window[0] <= step < window[1]
            if window is not None and step == window[0]:
                t_window = time.time()
                profiler.start(ctx.device)
                t_prof = time.time()
            lr = cosine_lr(step, steps, settings.lr, settings.lr_final, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            mine = rows[ctx.rank :: ctx.world_size]  # this rank's share of the global batch
            optimizer.zero_grad(set_to_none=True)
            micro_losses = []
            # one host-to-device copy per step (a copy from pageable memory waits for the GPU)
            rows_here = data[mine].to(ctx.device)
            for j in range(accum):
                if ctx.enabled and accum > 1 and sync_modules:
                    set_gradient_sync(sync_modules, j == accum - 1)  # reduce once, after the last micro-batch
                batch = rows_here[j::accum].contiguous()
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
                    loss = loss_fn(batch)  # bf16 compute on GPU (SPEC 2), fp32 master weights
                if not getattr(loss_fn, "did_backward", False):
                    loss.backward()
                micro_losses.append(loss.detach())
            if accum > 1:  # gradients summed over the micro-batches: make them the whole batch's mean
                loss = torch.stack(micro_losses).mean()
                for p in params.values():
                    if p.grad is not None:
                        p.grad.div_(accum)
            norm = None
            if settings.grad_clip is not None:
                # whole-model norm (a DTensor when sharded); read after the optimizer step, with the loss: one
                # host sync per step instead of one before the step too
                norm = full_tensor(torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip))
            optimizer.step()
            value = float(all_reduce_mean(loss.detach()))
            if norm is not None:
                grad_norms.append(float(norm))
            if value != value:  # NaN
                raise FloatingPointError(f"{stage.name}: loss became NaN at step {step}; lower the learning rate")
            losses.append(value)  # the float() above waited for the GPU, so step_ends are true step times
            if not profiled:  # step ends on a clock without the profiled steps
                tokens_this_run += per_step
                step_ends.append(time.time() - paused)
            elif step + 1 == window[1]:
                wall = time.time() - t_prof
                profile = profile_summary(profiler.stop(), window, wall, stage.path / f"profile_rank{ctx.rank}")
                paused += time.time() - t_window
                log.info("%s: profiled steps %d-%d (left out of the throughput figures): %s", stage.name,
                         window[0] + 1, window[1], profile["text"])
            tps = tokens_this_run / max(1e-9, (step_ends[-1] if step_ends else t0) - t0)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                util = mfu(flops_per_token, _steady_rate(step_ends, t0, per_step) or tps, ctx.device, ctx.world_size)
                log.info("%s step %d/%d loss %.5f lr %.2e %.0f tok/s%s", stage.name, step + 1, steps, value, lr, tps,
                         f" MFU {100 * util:.1f}%" if util is not None else "")
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
                stage.save_checkpoint(dict(params), optimizer, {"step": step + 1, "losses": losses, "grad_norms": grad_norms,
                                                                "settings": vars(settings), "settings_changed": changed})
    bar.close()
    elapsed = max(1e-9, time.time() - paused - t0)
    tail = losses[-max(1, min(10, len(losses) // 5)) :]
    steady = _steady_rate(step_ends, t0, per_step)
    return TrainResult(
        steps=steps,
        tokens_seen=steps * per_step,
        final_loss=sum(tail) / len(tail),
        losses=losses,
        tokens_per_s=tokens_this_run / elapsed,
        steady_tokens_per_s=steady,
        mfu=mfu(flops_per_token, steady, ctx.device, ctx.world_size) if steady else None,
        flops_per_token=flops_per_token,
        world_size=ctx.world_size,
        grad_norms=grad_norms,
        profile=profile,
        settings_changed_on_resume=changed,
    )


def profile_window(profile_steps: int, start_step: int, steps: int) -> tuple[int, int] | None:
    """The optimizer steps ``[first, end)`` to profile: ``profile_steps`` of them after the first 3 of this
    invocation (autotuning, allocator warm-up) when the stage has that many left, else from the second step on,
    never past the last; None when ``profile_steps`` is 0 or fewer than 2 steps are left."""
    left = steps - start_step
    if profile_steps < 1 or left < 2:
        return None
    skip = 3 if left >= 3 + profile_steps else 1
    first = start_step + skip
    return first, min(steps, first + profile_steps)


class _StepProfiler:
    """torch.profiler around a window of steps; a context manager that stops a running profiler on exit (also
    when a step raises), so no profiler is left recording in the process."""

    def __init__(self):
        self.prof = None

    def start(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.__enter__()

    def stop(self):
        prof, self.prof = self.prof, None
        if prof is not None:
            prof.__exit__(None, None, None)
        return prof

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def profile_summary(prof, window: tuple[int, int], wall_s: float, prefix: Path) -> dict:
    """Write ``<prefix>.txt`` (the profiler's table of ops sorted by device time, CPU time on the CPU) and
    ``<prefix>.json`` (Chrome trace) and return the per-step figures: wall time (s, profiler start-up excluded),
    the summed self time of device kernels (s; kernels of streams that overlap count each; the CPU ops' time on a
    CPU) and the part of it in NCCL kernels, and the 5 kernels (ops) with the most time. For finding where a step's
    time goes (e.g. FSDP2's all-gathers under ``torchrun``). A file that cannot be written is named in the
    summary's ``error``; training goes on."""
    from torch.autograd import DeviceType

    n = window[1] - window[0]
    events = prof.key_averages()
    device_rows = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    if device_rows:  # kernel rows only: the CPU op that launched a kernel carries its time too (counted once here)
        rows, key, what = device_rows, "self_device_time_total", "device kernels"
    else:
        rows, key, what = list(events), "self_cpu_time_total", "CPU ops"
    total = sum(getattr(e, key) for e in rows) / 1e6 / n
    nccl = sum(getattr(e, key) for e in rows if "nccl" in e.key.lower()) / 1e6 / n
    top = sorted(rows, key=lambda e: -getattr(e, key))[:5]
    summary = {
        "steps": [window[0] + 1, window[1]],
        "wall_s_per_step": wall_s / n,
        "busy_kind": what,
        "busy_s_per_step": total,
        "nccl_s_per_step": nccl if device_rows else None,
        "top_ops": [{"op": e.key, "s_per_step": getattr(e, key) / 1e6 / n} for e in top],
        "files": [prefix.with_suffix(".txt").name, prefix.with_suffix(".json").name],
    }
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(prefix.with_suffix(".txt"), events.table(sort_by=key, row_limit=40))
        tmp = prefix.with_name(f".{prefix.name}.json.tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, prefix.with_suffix(".json"))
    except OSError as exc:
        summary["error"] = f"profile files not written: {exc}"
        log.warning("%s", summary["error"])
    summary["text"] = (f"{summary['wall_s_per_step']:.3f} s/step wall, {total:.3f} s/step in {what}"
                       f"{f', {nccl:.3f} in NCCL' if device_rows else ''}")
    return summary


def _steady_rate(step_ends: list[float], t0: float, per_step: int) -> float | None:
    """Tokens/s over the steps after the first ``min(3, n // 4)`` of this invocation (None before 2 steps)."""
    n = len(step_ends)
    if n < 2:
        return None
    skip = min(3, n // 4)
    start = step_ends[skip - 1] if skip else t0
    return (n - skip) * per_step / max(1e-9, step_ends[-1] - start)
