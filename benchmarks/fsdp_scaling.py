"""Stages 1 and 2 of a conversion on 1 GPU and on N GPUs (FSDP2 under torchrun, NCCL), same settings and global
batch: loss agreement step by step and throughput scaling (issue "Conversion on several GPUs").

Both runs are the same command, ``python -m torch.distributed.run --nproc_per_node P -m hybridize convert
<args> --out <dir>``, with P = 1 (one process: FSDP2 is not engaged) and P = N (every stage's modules
sharded with ``fully_shard``; each rank takes ``batch / N`` rows of every global batch). Figures read back
from the stage manifests: loss per step, ``steady_tokens_per_s`` (global tokens/s without the first steps),
MFU. Results: JSON (GPU name, torch version, git commit, the exact commands) and a PNG of both loss curves.

    python benchmarks/fsdp_scaling.py --gpus 2 --out benchmarks/results/fsdp2_h200x2 -- \
        --data train.jsonl --layer-types ALLLALLL... --seq-len 512 --stage1-tokens 655360 --stage1-batch 64 \
        --stage2-tokens 2621440 --stage2-batch 128 --no-eval --device cuda

With ``--accum-check`` a third run, one process with ``--grad-accum N``, computes exactly the N processes' micro-
batches one after the other on one GPU (same rows, same forward shapes; only the gradient sum differs in order):
when the N-GPU losses differ from the 1-GPU ones, this run tells "the trajectory is that sensitive to a
different (equally correct) batch split" (it then agrees with the N-GPU run) from "sharding/communication is
wrong" (it then agrees with the 1-GPU run). ``comparison`` holds ``stage -> figures`` for 1 vs N GPUs and, with
the check, ``comparison_accum`` with ``1gpu_vs_accum`` (1 GPU vs 1 GPU accumulating) and ``accum_vs_ngpu``
(1 GPU accumulating vs N GPUs).

NVLink multicast stays off: the NCCL_NVLS_ENABLE / TORCH_SYMM_MEM_DISABLE_MULTICAST / NVSHMEM_DISABLE_NVLS
variables of the environment are passed on unchanged (set to their off values when unset).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hybridize.convert.stage import git_state

STAGES = ("stage1", "stage2")
_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _stat(pid: int) -> tuple[int, int] | None:
    """``(session id, start time)`` of a live process from ``/proc/<pid>/stat``; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[3]), int(fields[19])  # fields 6 and 22 of stat(5), after pid and (comm)


def _descendants(pid: int) -> dict[int, tuple[int, int]]:
    """Every live process below ``pid``, children of any of its threads (Linux ``/proc``; empty elsewhere), as
    ``pid -> (session id, start time)``: torchrun starts each worker in a session of its own, so a signal to
    the launcher's process group does not reach them."""
    found: dict[int, tuple[int, int]] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                info = _stat(child)
                if info is not None and child not in found:
                    found[child] = info
                    todo.append(child)
    return found


def run_with_timeout(cmd: list[str], env: dict, log, timeout: float, grace: float = 30.0) -> int | str:
    """Run ``cmd`` (output to the open file ``log``); past ``timeout`` seconds stop it *and every process it
    started*: SIGTERM to the launcher (torchrun then stops its workers), up to ``grace`` seconds, then SIGKILL to
    whatever is left: the processes found below it (checked by start time, so a reused pid is never hit) and
    any process of their sessions (a worker whose parent died meanwhile). Returns the exit code, or
    ``"timeout"``. (Killing torchrun alone left its worker training on the GPU and holding the run directory's
    lock, 2026-11-30.)"""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    tree = {proc.pid: _stat(proc.pid), **_descendants(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    tree.update(_descendants(proc.pid))
    sessions = {info[0] for info in tree.values() if info is not None} - {os.getsid(0)}
    for entry in Path("/proc").glob("[0-9]*"):  # the sessions' processes, orphans included
        pid = int(entry.name)
        info = _stat(pid)
        if info is not None and info[0] in sessions and pid != os.getpid():
            tree.setdefault(pid, info)
    for pid, info in tree.items():
        if info is not None and _stat(pid) == info:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
    log.write(f"\n[fsdp_scaling] stopped after the --timeout of {timeout:.0f} s (with every process it started)\n")
    return "timeout"


def _launch(nproc: int, convert_args: list[str], run_dir: Path, log_path: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "hybridize", "convert", *convert_args, "--out", str(run_dir)]
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in _OFF.items()}}
    t0 = time.time()
    with log_path.open("w") as log:
        returncode = run_with_timeout(cmd, env, log, timeout)
    return {"command": shlex.join(cmd), "returncode": returncode, "wall_s": round(time.time() - t0, 1), "log": log_path.name}


def _stage_figures(run_dir: Path) -> dict:
    out = {}
    for stage in STAGES:
        path = run_dir / stage / "manifest.json"
        if not path.is_file():
            out[stage] = None
            continue
        m = json.loads(path.read_text())
        out[stage] = {k: m.get(k) for k in ("final_loss", "tokens_seen", "tokens_per_s", "steady_tokens_per_s", "mfu",
                                            "flops_per_token", "world_size", "loss_curve", "grad_norm_curve")}
    return out


def _compare(one: dict, many: dict) -> dict:
    """Per stage: final losses, step-by-step relative loss differences, first gradient-norm differences and the
    throughput ratio ``many / one`` (None for a stage either run lacks)."""
    cmp = {}
    for stage in STAGES:
        a, b = one.get(stage), many.get(stage)
        if not a or not b:
            cmp[stage] = None
            continue
        la, lb = a["loss_curve"], b["loss_curve"]
        n = min(len(la), len(lb))
        rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la[:n], lb[:n])]
        grad = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a.get("grad_norm_curve") or [], b.get("grad_norm_curve") or [])]
        cmp[stage] = {
            "steps_compared": n,
            "final_loss_1": a["final_loss"],
            "final_loss_n": b["final_loss"],
            "final_loss_rel_diff": abs(a["final_loss"] - b["final_loss"]) / max(abs(a["final_loss"]), 1e-12),
            "max_step_rel_diff": max(rel) if rel else None,
            "mean_step_rel_diff": sum(rel) / len(rel) if rel else None,
            "step_rel_diff": rel,
            # gradient norms before clipping, per step: a gradient-sync fault shows here from step 1 on
            "grad_norm_rel_diff": grad[:10] or None,
            "grad_norm_rel_diff_all": grad or None,
            "speedup": (b["steady_tokens_per_s"] / a["steady_tokens_per_s"])
            if a.get("steady_tokens_per_s") and b.get("steady_tokens_per_s") else None,
        }
    return cmp


def _plot(figs: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(10, 3.6))
    for ax, stage in zip(axes, STAGES):
        for i, (key, f) in enumerate(figs.items()):
            if f.get(stage):  # one colour per run in both panels, also when a run lacks a stage
                ax.plot(f[stage]["loss_curve"], label=labels[key], lw=1, color=f"C{i}")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] -- <hybridize convert flags>")
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the sharded run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp2_h200x2"))
    p.add_argument("--runs", type=Path, default=None, help="where the two run directories go (default: <out>/runs)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--fresh", action="store_true",
                   help="delete run directories left in --runs by an earlier call (without it the script refuses them: "
                        "a conversion would resume them and report their old figures)")
    p.add_argument("--accum-check", action="store_true",
                   help="also run 1 process with --grad-accum <gpus> (the N-GPU run's micro-batches on one GPU)")
    p.add_argument("--commit", default=os.environ.get("HYBRIDIZE_GIT_COMMIT"), help="git commit to record")
    p.add_argument("convert_args", nargs=argparse.REMAINDER, help="after --: the `hybridize convert` flags (no --out)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv and any(a in ("-h", "--help") for a in argv):
        p.print_help()
        return 0
    if "--" not in argv:
        p.error("put the `hybridize convert` flags after a lone `--` (e.g. `--gpus 2 -- --data corpus.jsonl ...`)")
    split = argv.index("--")
    args = p.parse_args(argv[:split])
    convert_args = argv[split + 1 :]
    if not convert_args:
        p.error("no `hybridize convert` flags after `--`: give at least the budgets (a default conversion takes hours)")
    if any(a in ("-h", "--help") for a in convert_args):
        p.error("--help among the convert flags would launch runs that only print help: see `hybridize convert --help`")
    if any(a == "--out" or a.startswith("--out=") for a in convert_args):
        p.error("give no --out among the convert flags: the script chooses one run directory per process count")
    if args.gpus < 2:
        p.error("--gpus must be >= 2 (the 1-GPU run is always made)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        p.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if args.accum_check and any(a == "--grad-accum" or a.startswith("--grad-accum=") for a in convert_args):
        p.error("--accum-check sets --grad-accum itself: leave it out of the convert flags")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPUs")
    for path in (args.out, args.runs):
        if path is not None and (path.is_file() or any(q.is_file() for q in path.parents)):
            p.error(f"{path} is a file or lies under one: choose a directory")
    runs = args.runs or args.out / "runs"
    keys = ["1gpu", f"{args.gpus}gpu"] + ([f"1gpu_accum{args.gpus}"] if args.accum_check else [])
    left = [runs / k for k in keys if (runs / k).exists()]
    if left and not args.fresh:
        p.error(f"{', '.join(map(str, left))} already exist: a conversion would resume them and this script would "
                "report their old figures; pass --fresh to delete them, or choose another --runs")
    for path in left:
        shutil.rmtree(path)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"cannot create --out {args.out}: {exc.strerror}")
    git = git_state(args.commit)
    result = {
        "benchmark": "benchmarks/fsdp_scaling.py",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["fsdp_scaling.py", *argv]),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "git_commit": git["commit"],
        "uncommitted_changes": git["uncommitted_changes"],
        "multicast_env": {k: os.environ.get(k) for k in _OFF},
        "runs": {},
    }
    plan = [("1gpu", 1, []), (f"{args.gpus}gpu", args.gpus, [])]
    if args.accum_check:
        plan.insert(1, (f"1gpu_accum{args.gpus}", 1, ["--grad-accum", str(args.gpus)]))
    figs = {}
    for key, nproc, extra in plan:
        print(f"[fsdp_scaling] {key}: starting", flush=True)
        result["runs"][key] = _launch(nproc, [*convert_args, *extra], runs / key, args.out / f"{key}.log", args.timeout)
        figs[key] = _stage_figures(runs / key)
        result["runs"][key]["stages"] = figs[key]
        print(f"[fsdp_scaling] {key}: rc {result['runs'][key]['returncode']} in {result['runs'][key]['wall_s']} s", flush=True)
    many = f"{args.gpus}gpu"
    result["comparison"] = _compare(figs["1gpu"], figs[many])
    if args.accum_check:
        acc = f"1gpu_accum{args.gpus}"
        result["comparison_accum"] = {"1gpu_vs_accum": _compare(figs["1gpu"], figs[acc]),
                                      "accum_vs_ngpu": _compare(figs[acc], figs[many])}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    labels = {"1gpu": "1 GPU", many: f"{args.gpus} GPUs (FSDP2)", f"1gpu_accum{args.gpus}": f"1 GPU, {args.gpus} micro-batches"}
    _plot(figs, labels, args.out / "loss_curves.png")
    failed = [k for k, r in result["runs"].items() if r["returncode"] != 0]
    for key in failed:
        print(f"[fsdp_scaling] the {key} run failed (exit {result['runs'][key]['returncode']}): see {args.out / result['runs'][key]['log']}",
              file=sys.stderr)
    for stage, c in result["comparison"].items():
        for name, cc in result.get("comparison_accum", {}).items():
            if cc.get(stage):
                print(f"{stage} {name}: final loss rel diff {cc[stage]['final_loss_rel_diff']:.2e}, "
                      f"max step rel diff {cc[stage]['max_step_rel_diff']:.2e}, speedup {cc[stage]['speedup']}")
        if c:
            print(f"{stage}: final loss {c['final_loss_1']:.5f} (1 GPU) vs {c['final_loss_n']:.5f} ({args.gpus} GPUs), "
                  f"rel diff {c['final_loss_rel_diff']:.2e}, max step rel diff {c['max_step_rel_diff']:.2e}, "
                  f"speedup {c['speedup'] if c['speedup'] is None else round(c['speedup'], 3)}, "
                  f"grad-norm rel diff of the first steps {[f'{x:.1e}' for x in (c['grad_norm_rel_diff'] or [])[:5]]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
