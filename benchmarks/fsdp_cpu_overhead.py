"""CPU time of one stage-2 (and stage-1) training step with and without FSDP2, at sizes where the arithmetic costs
nothing.

Issue 7: stage 2 of the embedded teacher (SmolLM2-135M, 30 thin layers) ran 1.65x faster on two H200s than on
one, not the 1.8x asked for, and ``--no-fsdp-reshard`` gained 2-3% although it saves only about a millisecond of
NVLink traffic per step. A step whose kernels are short is limited by the CPU that launches them once the CPU
no longer runs ahead of the GPU, and FSDP2 adds CPU work to every step: per-unit hooks, the all-gather copy-in
and copy-out, gradient reduce-scatter bookkeeping, ``DTensor`` dispatch in the optimizer and the gradient clip.
This script measures that CPU work alone. It runs the library's own stage-2 step
(:func:`hybridize.convert.distill._distill`: teacher forward, student forward and backward, chunked KL,
gradient clip, AdamW) on a random teacher of the embedded teacher's structure (layer count, heads, KV heads,
``--layer-types``) but ``--head-dim`` 8 and a 256-token vocabulary, one ``--rows`` x ``--seq-len`` batch per
process, on one CPU thread. The ``stage 1:`` variants run the stage-1 step the same way
(:func:`hybridize.convert.align.run_stage1`: teacher forward, each Lightning mixer's forward and backward against
its layer's attention output, AdamW; on two H200s stage 1 ran at 0.71x of one GPU):

* ``one process`` / ``stage 1: one process``: no FSDP2;
* the FSDP2 variants: rank 0 of a 2-process group of torch's *fake* backend (``torch.testing._internal``), whose
  collectives return at once, so no communication time is counted, only what the process does around it.

Each variant runs in a child process; the figure is the trainer's steady seconds per step (``--steps`` steps,
the first 3 left out), the median of ``--repeats`` runs (the best and every run are recorded too), and beside it
what FSDP2 adds to the same stage's one-process step. The JSON is rewritten after each variant (``"complete":
false`` until the last one is done; a failed variant ends the run with ``"error"``). These are CPU milliseconds, not GPU throughput: on a GPU
they are hidden while the CPU runs ahead of the kernels and add to the step when it does not.

    python benchmarks/fsdp_cpu_overhead.py --out benchmarks/results/fsdp_cpu_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: variant name -> (stage, FSDP2 engaged, TrainSettings fields, optimizer: "library" or "foreach" = torch's default on CUDA)
VARIANTS = {
    "one process": (2, False, {}, "library"),
    "one process, foreach AdamW": (2, False, {}, "foreach"),
    "FSDP2 per layer": (2, True, {}, "library"),
    "FSDP2 per layer, foreach AdamW": (2, True, {}, "foreach"),
    "FSDP2 per layer, --no-fsdp-reshard": (2, True, {"reshard_after_forward": False}, "library"),
    "FSDP2 per layer, --fsdp-prefetch 1": (2, True, {"fsdp_prefetch": 1}, "library"),
    "FSDP2 --fsdp-unit model": (2, True, {"fsdp_unit": "model"}, "library"),
    "stage 1: one process": (1, False, {}, "library"),
    "stage 1: FSDP2 per mixer": (1, True, {}, "library"),
}
#: the one-process variant each variant's extra milliseconds are counted from, by (stage, optimizer)
BASELINES = {(2, "library"): "one process", (2, "foreach"): "one process, foreach AdamW", (1, "library"): "stage 1: one process"}


def _baseline(name: str) -> str:
    stage, _, _, optimizer = VARIANTS[name]
    return BASELINES[(stage, optimizer)]
SMOLLM2_LAYER_TYPES = "LLLLLLLLLALLLLLLALLALALLLAALLA"  # the schedule of the H200 runs (issue 7)


def _child(args) -> None:
    """One variant in this process; prints its figures as one JSON line."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.convert import align, distill, stage as stage_mod, trainer
    from hybridize.convert.distill import _distill, build_hybrid
    from hybridize.convert.stage import StageDir
    from hybridize.convert.trainer import TrainSettings

    stage, sharded, fields, optimizer = VARIANTS[args.child]
    torch.set_num_threads(1)
    if sharded:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    if optimizer == "foreach":  # what the trainer used before: torch's default AdamW (foreach on CUDA)
        def foreach_adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)

        trainer.make_optimizer = stage_mod.make_optimizer = foreach_adamw
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.heads * args.head_dim, intermediate_size=4 * args.heads * args.head_dim,
        num_hidden_layers=len(args.layer_types), num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(64, args.seq_len), tie_word_embeddings=True,
    )
    teacher = LlamaForCausalLM(cfg).requires_grad_(False).eval()
    world = 2 if sharded else 1
    data = torch.randint(3, cfg.vocab_size, (4 * args.rows * world * args.steps, args.seq_len))
    settings = TrainSettings(tokens=args.steps * args.rows * world * args.seq_len, seq_len=args.seq_len,
                             batch_size=args.rows * world, lr=1e-5, lr_final=1e-6, warmup=1, checkpoint_every=10**9,
                             **fields)
    # the saved weights are not what is measured
    distill.save_model_atomic = align._save_mixers = lambda *a, **k: None
    with tempfile.TemporaryDirectory() as tmp:
        if stage == 1:
            manifest = align.run_stage1(teacher, data, Path(tmp), settings, {}, seed=0)
        else:
            student = build_hybrid(teacher, ["attention" if c == "A" else "lightning" for c in args.layer_types], None)
            st = StageDir(Path(tmp), "stage2")
            st.begin()
            manifest = _distill(st, teacher, student, None, data, settings, {}, 0, "kl", {})
    seconds = settings.batch_size * settings.seq_len / manifest["steady_tokens_per_s"]
    print(json.dumps({"variant": args.child, "ms_per_step": 1e3 * seconds, "steps": len(manifest["loss_curve"])}))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layer-types", default=SMOLLM2_LAYER_TYPES,
                   help="one letter a layer (A attention, L Lightning); the default is the schedule of the H200 runs")
    p.add_argument("--heads", type=int, default=9, help="attention heads (SmolLM2-135M: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    p.add_argument("--head-dim", type=int, default=8, help="head dimension (kept small: the arithmetic is not measured)")
    p.add_argument("--rows", type=int, default=1, help="sequences per process and step")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run, >= 12 (the trainer's steady figure leaves "
                   "out the first min(3, steps // 4))")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (their median is the figure)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME", help=f"of: {list(VARIANTS)}")
    p.add_argument("--out", default=None, help="JSON file for the results (rewritten after each variant)")
    p.add_argument("--commit", default=os.environ.get("HYBRIDIZE_GIT_COMMIT"), help="git commit to record")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return 0
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if set(args.layer_types) - {"A", "L"} or not args.layer_types:
        p.error(f"--layer-types takes the letters A and L only, got {args.layer_types!r}")
    for flag, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim),
                        ("--rows", args.rows), ("--seq-len", args.seq_len), ("--repeats", args.repeats)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.steps < 12:
        p.error(f"--steps must be >= 12 (so that the first 3 steps, warm-up, are left out of the figure), got {args.steps}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim % 2:
        p.error(f"--head-dim must be even (rotary embeddings rotate pairs of dimensions), got {args.head_dim}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants names a variant twice: {args.variants}")
    if args.out is not None:
        from hybridize.outdir import check_writable_dir

        if args.out.endswith(("/", os.sep)) or Path(args.out).is_dir():
            p.error(f"--out {args.out} is a directory; give the JSON file to write, e.g. {Path(args.out) / 'fsdp_cpu_overhead.json'}")
        try:
            check_writable_dir(Path(args.out).resolve().parent, "--out")
        except ValueError as exc:
            p.error(str(exc))

    import torch

    from hybridize.convert.stage import git_state

    common = ["--layer-types", args.layer_types, "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
              "--head-dim", str(args.head_dim), "--rows", str(args.rows), "--seq-len", str(args.seq_len),
              "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    git = git_state(args.commit)
    record = {
        "what": "CPU milliseconds per stage-2 step (stage-1 step for the 'stage 1:' variants; library step, tiny widths, one "
                "CPU thread); FSDP2 variants on rank 0 of a 2-process fake process group (no communication time); "
                "extra_ms_vs_one_process against the one-process variant of the same stage and optimizer",
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "git_commit": git["commit"],
        "uncommitted_changes": git["uncommitted_changes"],
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["benchmarks/fsdp_cpu_overhead.py", *argv]),
        "settings": {k: getattr(args, k) for k in ("layer_types", "heads", "kv_heads", "head_dim", "rows", "seq_len", "steps", "repeats")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
        "results": {},
    }
    results = record["results"]
    failure = None
    for name in args.variants:
        runs = []
        for _ in range(args.repeats):
            try:
                proc = subprocess.run([sys.executable, __file__, *common, "--child", name], capture_output=True, text=True,
                                      env=env, timeout=1800)
            except subprocess.TimeoutExpired:
                failure = f"{name}: no result within 1800 s"
                break
            line = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
            if not line:
                failure = f"{name}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}"
                break
            runs.append(json.loads(line[0])["ms_per_step"])
        if failure:
            break
        results[name] = {"ms_per_step": statistics.median(runs), "best_ms_per_step": min(runs), "runs_ms_per_step": runs}
        base = results.get(_baseline(name), {}).get("ms_per_step")
        added = f"{results[name]['ms_per_step'] - base:+7.1f} ms" if base is not None and name not in BASELINES.values() else " " * 10
        print(f"{name:45s} {results[name]['ms_per_step']:7.1f} ms/step {added}   (runs: {', '.join(f'{r:.1f}' for r in runs)})",
              flush=True)
        _write(args.out, record)  # after each variant: what finished is kept if a later one fails or is stopped
    for name, r in results.items():
        base = results.get(_baseline(name), {}).get("ms_per_step")
        if base:
            r["extra_ms_vs_one_process"] = r["ms_per_step"] - base
    record["complete"] = failure is None
    if failure:
        record["error"] = failure.splitlines()[0]
        print(failure, file=sys.stderr)
    _write(args.out, record)
    if args.out is not None:
        print(f"wrote {args.out}{'' if failure is None else ' (incomplete)'}")
    return 0 if failure is None else 1


def _write(path: str | None, record: dict) -> None:
    if path is not None:
        from hybridize.convert.stage import atomic_write_text

        atomic_write_text(Path(path), json.dumps(record, indent=1) + "\n")

if __name__ == "__main__":
    sys.exit(main())
