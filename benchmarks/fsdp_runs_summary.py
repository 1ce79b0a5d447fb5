"""Compare repeated conversion runs: how far identical commands drift apart, and whether a change of process
count moves the losses by more than that (issue 7: "the loss matches the single-GPU run within bf16 noise").

Each run is a ``hybridize convert`` run directory (its ``stage1/`` and ``stage2/`` manifests) or an entry of a
``benchmarks/fsdp_scaling.py`` ``results.json``. Runs are grouped by their process count and ``--grad-accum``
(the same global batch in every group). Per stage and group: first loss, first gradient norm (before
clipping), final loss (mean of the last steps, as the manifest gives it), steady tokens/s; across runs of one
group the spread (max - min) of the final loss is the run-to-run noise of that command; the difference of two
groups' mean final losses is compared with it. Writes ``summary.json`` and ``loss_curves.png`` into ``--out``.

    python benchmarks/fsdp_runs_summary.py --scaling benchmarks/results/fsdp2_h200x2_74d9855/results.json \\
        --run 1gpu_repeat=runs/1gpu_repeat --run 2gpu_repeat=runs/2gpu_repeat --out benchmarks/results/x
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from statistics import mean

STAGES = ("stage1", "stage2")
FIELDS = ("final_loss", "tokens_per_s", "steady_tokens_per_s", "world_size", "loss_curve", "grad_norm_curve")


def _from_run_dir(path: Path) -> dict:
    stages, accum = {}, 1
    for stage in STAGES:
        manifest = path / stage / "manifest.json"
        if not manifest.is_file():
            raise SystemExit(f"{path}: no {stage}/manifest.json (give a run directory whose stages 1 and 2 completed)")
        m = json.loads(manifest.read_text())
        stages[stage] = {k: m.get(k) for k in FIELDS}
        accum = int((m.get("settings") or {}).get("grad_accum", 1))
    return {"stages": stages, "grad_accum": accum, "source": str(path)}


def _from_scaling(path: Path) -> dict[str, dict]:
    try:
        result = json.loads(path.read_text())
        runs = result["runs"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--scaling {path}: not a fsdp_scaling.py results.json ({exc})") from None
    out = {}
    for key, run in runs.items():
        if not all((run.get("stages") or {}).get(s) for s in STAGES):
            continue  # a run that did not finish both stages
        found = re.search(r"--grad-accum[ =](\d+)", run.get("command", ""))
        out[key] = {"stages": run["stages"], "grad_accum": int(found.group(1)) if found else 1,
                    "source": f"{path}#{key}", "command": run.get("command")}
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
                cmp[s] = {"final_loss_mean_diff": diff, "rel_diff": diff / ga["final_loss_mean"],
                          "largest_within_group_spread": noise,
                          "within_noise": abs(diff) <= noise if noise > 0 else None,
                          "throughput_ratio": rb / ra if ra and rb else None}
            out["group_differences"][f"{b}_vs_{a}"] = cmp
    return out


def _plot(runs: dict[str, dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {g: f"C{i}" for i, g in enumerate(sorted(summary["groups"]))}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label, run in runs.items():
        c = colours[summary["runs"][label]["group"]]
        axes[0].plot(run["stages"]["stage1"]["loss_curve"], color=c, lw=1, label=label)
        axes[1].plot(run["stages"]["stage2"]["loss_curve"], color=c, lw=1, label=label)
        if run["stages"]["stage2"].get("grad_norm_curve"):
            axes[2].plot(run["stages"]["stage2"]["grad_norm_curve"], color=c, lw=1, label=label)
    for ax, title in zip(axes, ("stage 1 loss", "stage 2 loss (KL)", "stage 2 gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR", help="a convert run directory")
    p.add_argument("--scaling", action="append", default=[], type=Path, help="a fsdp_scaling.py results.json")
    p.add_argument("--out", type=Path, required=True, help="directory for summary.json and loss_curves.png")
    args = p.parse_args(argv)
    runs: dict[str, dict] = {}
    for path in args.scaling:
        runs.update(_from_scaling(path))
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            p.error(f"--run takes LABEL=DIR, got {item!r}")
        if label in runs:
            p.error(f"two runs are labelled {label!r}")
        runs[label] = _from_run_dir(Path(path))
    if len(runs) < 2:
        p.error("give at least two runs (--run LABEL=DIR, --scaling results.json) that completed stages 1 and 2")
    summary = {"benchmark": "benchmarks/fsdp_runs_summary.py",
               "command": shlex.join(["fsdp_runs_summary.py", *(argv if argv is not None else sys.argv[1:])]),
               **summarise(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(runs, summary, args.out / "loss_curves.png")
    for g, row in summary["groups"].items():
        s2 = row["stage2"]
        rate = s2["steady_tokens_per_s_mean"]
        print(f"{g}: {len(row['runs'])} runs, stage-2 final loss {s2['final_loss_mean']:.4f} "
              f"[{s2['final_loss_min']:.4f}, {s2['final_loss_max']:.4f}], "
              f"steady {'-' if rate is None else f'{rate:,.0f}'} tokens/s")
    for name, cmp in summary["group_differences"].items():
        for s in STAGES:
            c = cmp[s]
            ratio = c["throughput_ratio"]
            print(f"{name} {s}: mean final loss diff {c['final_loss_mean_diff']:+.4f} ({c['rel_diff']:+.2%}), "
                  f"largest spread of identical runs {c['largest_within_group_spread']:.4f}, "
                  f"throughput x{'-' if ratio is None else f'{ratio:.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
