"""Multi-process training on an existing engine: torch FSDP2 (``fully_shard``) under ``torchrun`` or
``accelerate launch``; one process per GPU (NCCL) or per CPU worker (gloo).

Nothing here is specific to a number of processes: with ``WORLD_SIZE`` unset or 1 every function is a
no-op and training runs in one process. Each rank takes ``batch_size / world_size`` rows of every global
batch, so a sharded step computes the same loss and gradient as a single-process step on the whole batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .options import FSDP_PARAM_DTYPES, check_fsdp_options

__all__ = ["DistContext", "env_world_size", "init_distributed", "context", "shard_modules", "prefetch_plan", "full_tensor", "load_full_", "all_reduce_mean", "barrier", "set_gradient_sync"]

log = logging.getLogger("hybridize")


@dataclass(frozen=True)
class DistContext:
    """Process-group facts: ``rank``/``world_size`` (0/1 when not distributed) and this rank's ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """Processes of this launch from ``$WORLD_SIZE`` (set by torchrun / accelerate); 1 when unset or empty.
    Raises ValueError naming the variable when it is not an integer >= 1."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"WORLD_SIZE={raw!r} is not an integer >= 1: unset it, or launch with torchrun / accelerate "
                         "launch, which set it")
    return world


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group that ``torchrun``/``accelerate launch`` describe in the environment.

    Uses NCCL when CUDA is available (one GPU per local rank), else gloo. Without ``WORLD_SIZE > 1`` this
    returns a single-process context on ``device`` (default: CUDA if available, else CPU).
    """
    world = env_world_size()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return DistContext(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
    if ctx.is_main:
        log.info("distributed: %d processes, backend %s", ctx.world_size, dist.get_backend())
    return ctx


def context() -> DistContext:
    """The current context (single-process when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), dist.get_world_size(), dev)
    return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


#: the torch dtype of each ``--fsdp-param-dtype`` choice (gradients are reduced in fp32 either way)
_PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert tuple(_PARAM_DTYPES) == FSDP_PARAM_DTYPES


def shard_modules(
    units: list[nn.Module],
    root: nn.Module | None = None,
    ignored: set | None = None,
    reshard_after_forward: bool = True,
    param_dtype: str = "fp32",
    prefetch: int = 0,
    unit: str = "layer",
) -> None:
    """FSDP2-shard each module of ``units`` (e.g. decoder layers), then ``root``; no-op in one process.

    Args:
        units: the modules to shard one by one, in the order their forwards run (``prefetch`` relies on it); with
            ``root``, submodules of it.
        root: the module holding ``units`` (sharded last: its own remaining parameters form one more unit).
        unit: ``"layer"``: each of ``units`` is an FSDP2 unit (a rank holds one unit's whole weights at a time:
            least memory, for large models); ``"model"``: ``root`` is the only unit (needs ``root``): all weights
            are gathered once, at the start of the forward, kept to the end of the backward (whatever
            ``reshard_after_forward`` says) and their gradients reduced then, as memory-hungry as plain data
            parallelism but without FSDP2's per-layer hooks (less CPU time per step: for small models, whose steps
            are short). ``prefetch`` needs ``"layer"``.
        ignored: parameters (e.g. frozen, tied embeddings and LM head, used outside ``root``'s forward) that
            stay whole on every rank.
        reshard_after_forward: FSDP2's option of the same name: True frees each unit's gathered weights after
            its forward and gathers them again for the backward (least memory); False keeps them until the
            backward (one all-gather fewer per unit and step, the whole weights on every rank).
        param_dtype: ``"fp32"`` (all-gather the fp32 master weights; the forward sees exactly the weights of a
            one-process run) or ``"bf16"`` (FSDP2 ``MixedPrecisionPolicy(param_dtype=bfloat16,
            reduce_dtype=float32, cast_forward_inputs=False)``: the all-gathers move half the bytes and the
            forward's weights are bf16 copies, which bf16 autocast would make of the matmul weights anyway; the
            norms' and gates' weights are then bf16 too, so the arithmetic is not that of one process). The
            activations keep their dtype; needs an autocast region for the bf16 weights' matmuls (CUDA training).
        prefetch: 0 = FSDP2's own overlap (a unit's all-gather is issued when the CPU reaches it in the
            forward; the previous unit's is prefetched in the backward); k >= 1 = explicit prefetch: each unit
            issues the all-gathers of the next k units (forward) and of the k before it (backward) as soon as
            its own weights are gathered (FSDP2 ``set_modules_to_forward_prefetch`` /
            ``set_modules_to_backward_prefetch``), so a CPU that does not run ahead of the GPU does not delay
            them; k >= 2 holds more gathered weights at once. Changes no arithmetic. Only for units whose
            backwards run in the reverse order of their forwards (a layer stack trained through one loss).

    Raises:
        ValueError: what :func:`~hybridize.convert.options.check_fsdp_options` refuses, ``"model"`` without
            ``root``, ``prefetch`` without ``root``, a unit that is not a submodule of ``root``.
    """
    check_fsdp_options(param_dtype, prefetch, unit)
    units = list(units)
    if unit == "model" and root is None:
        raise ValueError("an FSDP2 unit for the whole model needs the root module that runs the units' forwards")
    if prefetch and root is None:
        raise ValueError("FSDP2 prefetch needs the root module that runs the units' forwards (units that are each "
                         "a root of their own cannot prefetch one another)")
    if root is not None:
        inside = {id(m) for m in root.modules()}
        stray = [i for i, m in enumerate(units) if id(m) not in inside]
        if stray:
            raise ValueError(f"units {stray[:5]} are not submodules of the root module: their gradients would not be "
                             "reduced with it; pass the module that holds them as root")
    ignored = set(ignored) if ignored is not None else None
    if not context().enabled:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if param_dtype != "fp32":
        policy = MixedPrecisionPolicy(param_dtype=_PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
    options = {"ignored_params": ignored, "reshard_after_forward": reshard_after_forward, "mp_policy": policy}
    if unit == "layer":
        for module in units:
            fully_shard(module, **options)
    if root is not None:
        # one unit for everything: its backward needs every weight again right after the forward, so freeing them
        # in between saves no peak memory and costs a second, unoverlapped all-gather
        fully_shard(root, **{**options, "reshard_after_forward": reshard_after_forward and unit == "layer"})
    if prefetch:
        for module, (forward, backward) in zip(units, prefetch_plan(len(units), prefetch)):
            module.set_modules_to_forward_prefetch([units[j] for j in forward])
            module.set_modules_to_backward_prefetch([units[j] for j in backward])


def prefetch_plan(n: int, k: int) -> list[tuple[list[int], list[int]]]:
    """For each of ``n`` units run in order, the units whose all-gathers it prefetches with ``k`` > 0: in the
    forward the next k (in forward order), in the backward the k before it (nearest first, the backward's order).

    Raises:
        ValueError: ``n`` < 0 or ``k`` < 1.
    """
    if n < 0 or k < 1:
        raise ValueError(f"prefetch_plan needs n >= 0 units and k >= 1 units to prefetch, got n={n}, k={k}")
    return [(list(range(i + 1, min(n, i + 1 + k))), list(range(i - 1, max(-1, i - 1 - k), -1))) for i in range(n)]


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Turn FSDP2's gradient reduce-scatter on or off for ``modules`` (and their FSDP2 children), e.g. off for
    all micro-batches but the last of a gradient-accumulation step; modules that are not sharded are skipped."""
    for module in modules:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(enabled)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded ``DTensor``) parameter; collective when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``param`` (sharding it first when ``param`` is a ``DTensor``)."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            param.copy_(distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of a tensor over ranks (itself in one process); collective. fp32 on this rank's device."""
    if not context().enabled:
        return value
    v = value.detach().clone().float().to(context().device)
    dist.all_reduce(v)
    return v / dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if context().enabled:
        dist.barrier()
