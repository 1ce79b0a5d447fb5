"""Compare repeated conversion runs: how far identical commands drift apart, and whether a change of process
count moves the losses by more than that (issue 7: "the loss matches the single-GPU run within bf16 noise").

Each run is a ``hybridize convert`` run directory (its ``stage1/`` and ``stage2/`` manifests) or an entry of a
``benchmarks/fsdp_scaling.py`` ``results.json``. Runs are grouped by their process count and ``--grad-accum``
(the same global batch in every group). Per stage and group: first loss, first gradient norm (before
clipping), final loss (mean of the last steps, as the manifest gives it), steady tokens/s; across runs of one
group the spread (max - min) of the final loss is the run-to-run noise of that command; the difference of two
groups' mean final losses is compared with it. Flags that must not change the arithmetic (``--no-fsdp-reshard``,
``--checkpoint-every``) do not split a group; each run's source is listed. Writes ``summary.json`` and
``loss_curves.png`` into ``--out``.

    D=benchmarks/results/fsdp2_h200x2_74d9855
    python benchmarks/fsdp_runs_summary.py --scaling $D/results.json --run 1gpu_repeat=$D/runs/1gpu_repeat \\
        --run 2gpu_repeat=$D/runs/2gpu_repeat --out /tmp/fsdp_summary
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from statistics import mean

STAGES = ("stage1", "stage2")
FIELDS = ("final_loss", "tokens_per_s", "steady_tokens_per_s", "world_size", "loss_curve", "grad_norm_curve")


class InputError(Exception):
    """A run or results file that cannot be compared; the message names the file, the field and the fix."""


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what} {path}: cannot be read as JSON ({exc})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_figures(f, where: str) -> dict:
    """The stage figures this script uses, checked: a finite final loss, a non-empty loss curve of finite
    numbers, a positive integer world size (gradient norms and rates optional)."""
    if not isinstance(f, dict):
        raise InputError(f"{where}: not a JSON object")
    if not _number(f.get("final_loss")):
        raise InputError(f"{where}: final_loss is {f.get('final_loss')!r}, not a finite number (a failed or unfinished stage?)")
    curve = f.get("loss_curve")
    if not isinstance(curve, list) or not curve or not all(_number(x) for x in curve):
        raise InputError(f"{where}: loss_curve must be a non-empty list of finite numbers")
    world = f.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise InputError(f"{where}: world_size is {world!r}, not an integer >= 1")
    norms = f.get("grad_norm_curve") or []
    if not isinstance(norms, list) or not all(_number(x) for x in norms):
        raise InputError(f"{where}: grad_norm_curve must be a list of finite numbers")
    rate = f.get("steady_tokens_per_s")
    return {"final_loss": f["final_loss"], "loss_curve": curve, "world_size": world, "grad_norm_curve": norms,
            "tokens_per_s": f.get("tokens_per_s"), "steady_tokens_per_s": rate if _number(rate) and rate > 0 else None}


def _accum(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: grad_accum is {value!r}, not an integer >= 1")
    return value


def _from_run_dir(path: Path) -> dict:
    stages, accum = {}, 1
    for stage in STAGES:
        manifest = path / stage / "manifest.json"
        if not manifest.is_file():
            raise InputError(f"{path}: no {stage}/manifest.json (give a run directory whose stages 1 and 2 completed)")
        m = _read_json(manifest, "manifest")
        if not isinstance(m, dict) or m.get("status") != "complete":
            raise InputError(f"{manifest}: the stage is not complete (status {m.get('status') if isinstance(m, dict) else None!r})")
        stages[stage] = _check_figures(m, str(manifest))
        settings = m.get("settings") if isinstance(m.get("settings"), dict) else {}
        accum = _accum(settings.get("grad_accum", 1), str(manifest))
    return {"stages": stages, "grad_accum": accum, "source": str(path)}


def _from_scaling(path: Path) -> dict[str, dict]:
    result = _read_json(path, "--scaling")
    if not isinstance(result, dict) or not isinstance(result.get("runs"), dict):
        raise InputError(f"--scaling {path}: not a fsdp_scaling.py results.json (no object 'runs')")
    out = {}
    for key, run in result["runs"].items():
        where = f"{path} run {key!r}"
        if not isinstance(run, dict):
            raise InputError(f"{where}: not a JSON object")
        stages = run.get("stages") if isinstance(run.get("stages"), dict) else {}
        if not all(stages.get(s) for s in STAGES):
            print(f"fsdp_runs_summary.py: leaving out {where}: it did not complete stages 1 and 2", file=sys.stderr)
            continue
        command = run.get("command") if isinstance(run.get("command"), str) else ""
        found = re.search(r"--grad-accum[ =](\d+)", command)
        out[key] = {"stages": {s: _check_figures(stages[s], f"{where} {s}") for s in STAGES},
                    "grad_accum": int(found.group(1)) if found else 1, "source": f"{path}#{key}",
                    "command": command or None}
    return out


def _stage_row(f: dict) -> dict:
    return {
        "first_loss": f["loss_curve"][0] if f.get("loss_curve") else None,
        "first_grad_norm": f["grad_norm_curve"][0] if f.get("grad_norm_curve") else None,
        "final_loss": f.get("final_loss"),
        "steady_tokens_per_s": f.get("steady_tokens_per_s"),
    }


def summarise(runs: dict[str, dict]) -> dict:
    """Per run and per group (``"<P>proc_accum<K>"``) figures, and every pair of groups compared."""
    groups: dict[str, list[str]] = {}
    for label, run in runs.items():
        world = run["stages"]["stage2"].get("world_size") or 1
        groups.setdefault(f"{world}proc_accum{run['grad_accum']}", []).append(label)
    out = {"runs": {label: {"group": g, "source": run["source"], "command": run.get("command"),
                            **{s: _stage_row(run["stages"][s]) for s in STAGES}}
                    for g, labels in groups.items() for label in labels for run in [runs[label]]},
           "groups": {}, "group_differences": {}}
    for g, labels in groups.items():
        row = {"runs": labels}
        for s in STAGES:
            finals = [runs[x]["stages"][s]["final_loss"] for x in labels]
            rates = [r for r in (runs[x]["stages"][s].get("steady_tokens_per_s") for x in labels) if r]
            row[s] = {"final_loss_mean": mean(finals), "final_loss_min": min(finals), "final_loss_max": max(finals),
                      "final_loss_spread": max(finals) - min(finals),
                      "steady_tokens_per_s_mean": mean(rates) if rates else None}
        out["groups"][g] = row
    names = sorted(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cmp = {}
            for s in STAGES:
                ga, gb = out["groups"][a][s], out["groups"][b][s]
                noise = max(ga["final_loss_spread"], gb["final_loss_spread"])
                diff = gb["final_loss_mean"] - ga["final_loss_mean"]
                ra, rb = ga["steady_tokens_per_s_mean"], gb["steady_tokens_per_s_mean"]
                cmp[s] = {"final_loss_mean_diff": diff,
                          "rel_diff": diff / ga["final_loss_mean"] if ga["final_loss_mean"] else None,
                          "largest_within_group_spread": noise,
                          "within_noise": abs(diff) <= noise if noise > 0 else None,
                          "throughput_ratio": rb / ra if ra and rb else None}
            out["group_differences"][f"{b}_vs_{a}"] = cmp
    return out


def _plot(runs: dict[str, dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {g: ("-", "--", ":", "-.")[i % 4] for i, g in enumerate(sorted(summary["groups"]))}  # one per group
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (label, run) in enumerate(runs.items()):  # one colour per run
        style = dict(color=f"C{i}", ls=styles[summary["runs"][label]["group"]], lw=1,
                     label=f"{label} ({summary['runs'][label]['group']})")
        axes[0].plot(run["stages"]["stage1"]["loss_curve"], **style)
        axes[1].plot(run["stages"]["stage2"]["loss_curve"], **style)
        if run["stages"]["stage2"].get("grad_norm_curve"):
            axes[2].plot(run["stages"]["stage2"]["grad_norm_curve"], **style)
    for ax, title in zip(axes, ("stage 1 loss", "stage 2 loss (KL)", "stage 2 gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR",
                   help="a `hybridize convert` run directory whose stages 1 and 2 completed (repeat the flag)")
    p.add_argument("--scaling", action="append", default=[], type=Path,
                   help="a fsdp_scaling.py results.json: its runs that completed both stages (repeat the flag)")
    p.add_argument("--out", type=Path, required=True, help="directory for summary.json and loss_curves.png")
    args = p.parse_args(argv)
    if str(args.out) == "" or args.out.is_file() or any(q.is_file() for q in args.out.parents):
        p.error(f"--out {str(args.out)!r} is a file, lies under one or is empty: give a directory")
    runs: dict[str, dict] = {}
    sources: dict[str, str] = {}
    try:
        for path in args.scaling:
            for key, run in _from_scaling(path).items():
                if key in runs:
                    p.error(f"two runs are labelled {key!r} (from {sources[key]} and {path}): compare one results.json "
                            "per key, or copy one run directory and give it with --run LABEL=DIR")
                runs[key], sources[key] = run, str(path)
        for item in args.run:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                p.error(f"--run takes LABEL=DIR, got {item!r}")
            if label in runs:
                p.error(f"two runs are labelled {label!r}")
            same = [k for k, v in sources.items() if v == str(Path(path).resolve())]
            if same:
                p.error(f"--run {item!r} is the run directory of {same[0]!r} again: one directory counts once")
            runs[label], sources[label] = _from_run_dir(Path(path)), str(Path(path).resolve())
    except InputError as exc:
        print(f"fsdp_runs_summary.py: {exc}", file=sys.stderr)
        return 1
    if len(runs) < 2:
        p.error("give at least two runs (--run LABEL=DIR, --scaling results.json) that completed stages 1 and 2")
    summary = {"benchmark": "benchmarks/fsdp_runs_summary.py",
               "command": shlex.join(["fsdp_runs_summary.py", *(argv if argv is not None else sys.argv[1:])]),
               **summarise(runs)}
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:  # both files or neither
            _plot(runs, summary, Path(tmp) / "loss_curves.png")
            (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1))
            for name in ("loss_curves.png", "summary.json"):
                os.replace(Path(tmp) / name, args.out / name)
    except OSError as exc:
        print(f"fsdp_runs_summary.py: cannot write into --out {args.out}: {exc}", file=sys.stderr)
        return 1
    for g, row in summary["groups"].items():
        s2 = row["stage2"]
        rate = s2["steady_tokens_per_s_mean"]
        print(f"{g}: {len(row['runs'])} run{'s' if len(row['runs']) > 1 else ''}, stage-2 final loss {s2['final_loss_mean']:.4f} "
              f"[{s2['final_loss_min']:.4f}, {s2['final_loss_max']:.4f}], "
              f"steady {'-' if rate is None else f'{rate:,.0f}'} tokens/s")
    for name, cmp in summary["group_differences"].items():
        for s in STAGES:
            c = cmp[s]
            ratio = c["throughput_ratio"]
            rel = "-" if c["rel_diff"] is None else f"{c['rel_diff']:+.2%}"
            print(f"{name} {s}: mean final loss diff {c['final_loss_mean_diff']:+.4f} ({rel}), "
                  f"largest spread within a group {c['largest_within_group_spread']:.4f}, "
                  f"throughput x{'-' if ratio is None else f'{ratio:.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
