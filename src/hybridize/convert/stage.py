"""Stage bookkeeping shared by every conversion stage: directories, manifests, atomic checkpoints, logging.

Each stage writes its own directory ``<run>/<stage>/``. While it runs it keeps ``checkpoint/`` (the
trainable weights, optimizer, scheduler and data position, replaced atomically every few steps); when it
finishes it writes its outputs and, last, ``manifest.json`` with ``status: "complete"``. A stage whose
manifest is complete is never re-run; a stage with a checkpoint but no complete manifest resumes from it.
A failed or killed stage therefore leaves the previous stages' directories untouched and its own output
never looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..assets import atomic_write_bytes

__all__ = [
    "StageDir",
    "git_commit",
    "git_state",
    "atomic_write_text",
    "save_tensors_atomic",
    "cosine_lr",
    "make_optimizer",
    "setup_logging",
    "plot_loss_curve",
]

log = logging.getLogger("hybridize")


def git_commit() -> str | None:
    """The git commit of the hybridize source tree, or None outside a git checkout.

    ``HYBRIDIZE_GIT_COMMIT`` (when set and not ``unknown``) takes precedence: a tree copied to another machine
    (a GPU node, a container) may carry a ``.git`` of another commit, or none.
    """
    override = os.environ.get("HYBRIDIZE_GIT_COMMIT", "").strip()
    if override and override != "unknown":
        return override
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_state(override: str | None = None) -> dict:
    """Provenance of a recorded figure: ``{"commit": str, "uncommitted_changes": bool | None}``.

    ``commit`` is ``override``, else :func:`git_commit`, else ``"unknown"``. ``uncommitted_changes`` says whether
    tracked files differ from that commit (untracked ones, such as carried wheels, data and outputs, are not the
    code that ran); None when it cannot be known: outside a git checkout, or when the commit was given
    (``override`` or ``HYBRIDIZE_GIT_COMMIT``), as on a copied tree whose ``.git`` is another commit's.
    """
    override = override if override not in (None, "", "unknown") else None  # "unknown": the device scripts' unset value
    given = override or os.environ.get("HYBRIDIZE_GIT_COMMIT", "").strip() not in ("", "unknown")
    dirty = None
    if not given:
        try:
            out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
            dirty = bool(out.stdout.strip()) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            dirty = None
    return {"commit": override or git_commit() or "unknown", "uncommitted_changes": dirty}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a unique temporary file in the same folder, fsync,
    ``os.replace`` (never a half-written file); the file gets the umask's default mode."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically (tensors are made contiguous and moved to CPU)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log hybridize messages to stderr and, if given, append them to ``log_file``."""
    log.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    if log_file is not None:
        log_file = Path(log_file).resolve()
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file for h in log.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(fh)


def plot_loss_curve(losses: list[float], path: Path, title: str) -> None:
    """Save the per-step training loss (and a 10-step running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.5, label="loss per step")
    w = min(10, len(losses))
    mean = [sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), mean, lw=2, label=f"running mean ({w})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def cosine_lr(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def make_optimizer(params, lr: float) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95) and no weight decay (SPEC 2), in torch's fused implementation (one kernel for
    all parameters instead of a dozen multi-tensor ops or a loop over them: less CPU time per step, which FSDP2's
    sharded parameters make dearer still; the same update up to rounding)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


@dataclass
class StageDir:
    """One stage's directory and its manifest.

    Args:
        root: the run directory; the stage lives in ``root / name``.
        name: e.g. ``"stage1"``.
    """

    root: Path
    name: str
    started: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.root) / self.name

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint"

    def manifest(self) -> dict | None:
        """The manifest if the stage completed, else None."""
        if not self.manifest_path.exists():
            return None
        data = json.loads(self.manifest_path.read_text())
        return data if data.get("status") == "complete" else None

    def is_complete(self) -> bool:
        return self.manifest() is not None

    def begin(self) -> None:
        """Create the directory and drop any stale manifest (the stage is about to (re)run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists() and not self.is_complete():
            self.manifest_path.unlink()
        logging.getLogger("hybridize").info("%s: started (%s)", self.name, self.path)

    def complete(self, inputs: dict, tokens_seen: int, final_loss: float | None, extra: dict | None = None) -> dict:
        """Write ``manifest.json`` (status complete) last, then remove the resume checkpoint (rank 0 writes;
        every rank returns the manifest)."""
        from .distributed import barrier, context

        prior = self._checkpoint_meta().get("wall_time_s", 0.0)
        manifest = {
            "stage": self.name,
            "status": "complete",
            "inputs": inputs,
            "tokens_seen": int(tokens_seen),
            "final_loss": None if final_loss is None else float(final_loss),
            "wall_time_s": round(prior + time.time() - self.started, 2),
            "git_commit": git_commit(),
            "hybridize_version": __version__,
            "torch_version": torch.__version__,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        barrier()
        if context().is_main:
            if manifest.get("loss_curve"):
                plot_loss_curve(manifest["loss_curve"], self.path / "loss.png", f"{self.name}: {manifest.get('loss', 'loss')}")
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2))
            if self.checkpoint_path.exists():
                shutil.rmtree(self.checkpoint_path)
            logging.getLogger("hybridize").info(
                "%s: complete in %.1f s, %d tokens%s", self.name, manifest["wall_time_s"], manifest["tokens_seen"],
                "" if manifest["final_loss"] is None else f", final loss {manifest['final_loss']:.5f} (mean of the last steps)",
            )
        barrier()
        return manifest

    # --- resumable checkpoints -------------------------------------------------------------------
    def _checkpoint_meta(self) -> dict:
        meta = self.checkpoint_path / "meta.json"
        return json.loads(meta.read_text()) if meta.exists() else {}

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, meta: dict) -> None:
        """Atomically replace ``checkpoint/`` with weights, optimizer state and ``meta`` (step, tokens, ...).

        Collective under several processes: every rank passes its (possibly sharded) tensors, rank 0 writes
        the whole weights and ``meta.json``, every rank writes its own optimizer shard
        ``optimizer.rank{r}.pt``; the directory appears only once every file is in it.
        """
        from .distributed import barrier, context, full_tensor

        ctx = context()
        full = {k: full_tensor(v).detach().contiguous().cpu() for k, v in tensors.items()}
        tmp = self.path / ".checkpoint.tmp"
        if ctx.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(full, str(tmp / "weights.safetensors"))
            meta = {
                **meta,
                "world_size": ctx.world_size,
                "wall_time_s": self._checkpoint_meta().get("wall_time_s", 0.0) + time.time() - self.started,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        barrier()
        torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{ctx.rank}.pt")
        barrier()
        if ctx.is_main:
            old = self.path / ".checkpoint.old"
            if old.exists():
                shutil.rmtree(old)
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, old)
            os.replace(tmp, self.checkpoint_path)
            if old.exists():
                shutil.rmtree(old)
        barrier()
        self.started = time.time()

    def load_checkpoint(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Return ``(weights, meta)`` of the last checkpoint (and restore this rank's ``optimizer`` shard), or
        None if there is none.

        Raises:
            ValueError: if the checkpoint was written by a different number of processes, or a checkpoint file
                cannot be read (truncated or corrupt): names the file and the fix
                (delete the checkpoint directory to restart the stage from its beginning).
        """
        from .distributed import context

        if not (self.checkpoint_path / "meta.json").exists():
            return None
        ctx = context()
        meta = self._read_checkpoint_file("meta.json", lambda p: json.loads(p.read_text()))
        if meta.get("world_size", 1) != ctx.world_size:
            raise ValueError(
                f"{self.checkpoint_path} was written by {meta.get('world_size', 1)} processes; resume with the "
                f"same number (now {ctx.world_size}) or delete the checkpoint to restart the stage"
            )
        weights = self._read_checkpoint_file("weights.safetensors", lambda p: load_file(str(p)))
        if optimizer is not None:
            state = self._read_checkpoint_file(f"optimizer.rank{ctx.rank}.pt", lambda p: torch.load(p, weights_only=False))
            # the implementation is this run's (e.g. fused), not the checkpoint's: set before loading, so the
            # loaded state is placed as this implementation needs it (fused keeps its step counts on the device)
            for saved, now in zip(state.get("param_groups", []) if isinstance(state, dict) else [], optimizer.param_groups):
                saved.update({k: now[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in now})
            optimizer.load_state_dict(state)
        return weights, meta

    def _read_checkpoint_file(self, name: str, reader):
        """``reader(checkpoint/name)``; a truncated or hand-edited file raises ValueError naming it and the fix."""
        path = self.checkpoint_path / name
        try:
            return reader(path)
        except Exception as exc:
            raise ValueError(
                f"cannot read the checkpoint file {path} ({type(exc).__name__}: {str(exc)[:200]}); delete "
                f"{self.checkpoint_path} to restart {self.name} from its beginning (earlier stages are kept)"
            ) from exc
