"""Bench results on disk: ``results.json`` (merged across runs), ``results.md`` (the README table) and three
log-log plots (``ttft.png``, ``decode.png``, ``memory.png``: one line per preset against context length)."""

from __future__ import annotations

import json
from pathlib import Path

from ..assets import atomic_write_bytes

__all__ = ["load_results", "merge_rows", "write_results", "write_markdown", "markdown_table", "write_plots", "fmt_context"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOTS = {"ttft": "ttft.png", "decode": "decode.png", "memory": "memory.png"}


def fmt_context(n: int) -> str:
    """``32768 -> "32K"``, ``1048576 -> "1M"`` (powers of two: K = 1024 tokens), else the number."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def load_results(out_dir: Path) -> dict | None:
    """The ``results.json`` of ``out_dir``, or None when there is none.

    Raises:
        ValueError: the file exists but is not a ``hybridize bench`` results file (does not parse, or has no
            ``results`` list of rows): merging into it would destroy it, so the caller must choose (the
            message names ``--fresh`` and ``--out``).
    """
    path = Path(out_dir) / RESULTS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = f"it does not parse ({exc})"
    else:
        if isinstance(data, dict) and isinstance(data.get("results"), list) and all(
                isinstance(r, dict) and "preset" in r and "context" in r for r in data["results"]):
            return data
        why = "it is not a `hybridize bench` results file (no list of preset/context rows)"
    raise ValueError(f"{path} exists but {why}: runs merge into it, so it is left as it is; choose another --out, "
                     f"or pass --fresh to replace it")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of ``old`` not re-measured in ``new`` (same preset and context), then ``new``; sorted by preset
    order of appearance and context. A new ``skipped`` row (not measured: time budget) never replaces an old
    row of the same preset and context."""
    old_keys = {(r["preset"], r["context"]) for r in old}
    new = [r for r in new if not (r.get("status") == "skipped" and (r["preset"], r["context"]) in old_keys)]
    keys = {(r["preset"], r["context"]) for r in new}
    rows = [r for r in old if (r["preset"], r["context"]) not in keys] + list(new)
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["preset"], len(order))
    return sorted(rows, key=lambda r: (order[r["preset"]], r["context"]))


def write_results(out_dir: Path, data: dict) -> Path:
    """Write ``results.json`` atomically (so a killed run leaves the last complete file); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_JSON
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
    return path


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("status") == "ok"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return "OOM" if row.get("status") == "oom" else "-"


def markdown_table(data: dict) -> str:
    """The results as a markdown table (the README's "Long-context speed and memory" section).

    Columns: time to first token, decode ms/token, roofline ms/token and the fraction reached, peak memory,
    and the speed-ups (reference time / this time) of TTFT and decode against the preset's full-attention
    baseline (ours, ``baseline``) and against the transformers peer (``peer``), from the same results file.
    """
    rows = data.get("results", [])
    by_key = {(r["preset"], r["context"]): r for r in rows}
    presets = data.get("presets", {})
    lines = [
        "| preset | context | TTFT (s) | decode (ms/token) | roofline (ms/token) | of roofline | peak memory (GiB) "
        "| TTFT speed-up vs full attn / HF | decode speed-up vs full attn / HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r.get("status")
        if status == "ok":
            ttft, dec = f"{r['ttft_s']:.3g}", f"{r['decode_ms_per_token']:.3g}"
            roof = r.get("roofline") or {}
            roof_ms = f"{roof['ms_per_token']:.3g}" if roof.get("ms_per_token") else "-"
            frac = f"{100 * roof['achieved_fraction']:.0f}%" if roof.get("achieved_fraction") else "-"
            mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if isinstance(r.get("peak_memory_bytes"), (int, float)) else "-"
        else:
            label = {"oom": "OOM", "skipped": "skipped", "error": "error"}.get(status, str(status))
            if status == "oom" and isinstance(r.get("ttft_s"), (int, float)):  # prefill fitted, decode did not
                ttft = f"{r['ttft_s']:.3g}"
            else:
                ttft = label
            dec, roof_ms, frac, mem = label, "-", "-", label if status == "oom" else "-"
        meta = presets.get(r["preset"]) or {}
        refs = (meta.get("baseline"), meta.get("peer"))
        speed = []
        for key in ("ttft_s", "decode_ms_per_token"):
            parts = []
            for ref_name in refs:
                ref = by_key.get((ref_name, r["context"])) if ref_name else None
                if status == "ok" and _ok(ref):
                    parts.append(f"{ref[key] / r[key]:.2g}x")
                elif status == "ok" and ref and ref.get("status") == "oom":
                    parts.append("ref. OOM")
                else:
                    parts.append("-")
            speed.append(" / ".join(parts) if any(refs) else "-")
        lines.append(
            f"| {r['preset']} | {fmt_context(r['context'])} | {ttft} | {dec} | {roof_ms} | {frac} | {mem} | {speed[0]} | {speed[1]} |"
        )
    return "\n".join(lines)


def write_markdown(out_dir: Path, data: dict) -> Path:
    """``results.md``: the table plus the machine, versions, bandwidth and the commands that produced it."""
    bw = data.get("copy_bandwidth", {}).get("bytes_per_s")
    head = [
        f"# hybridize bench: {data.get('device')}",
        "",
        f"torch {data.get('torch')}, transformers {data.get('transformers')}, fla {data.get('fla_core')}, "
        f"{data.get('dtype')}, batch 1, prefill chunk {data.get('chunk_size')}, {data.get('decode_tokens')} decode tokens; "
        f"git {data.get('git', {}).get('commit')}"
        + (f"; measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write)" if bw else ""),
        "",
        markdown_table(data),
        "",
        "Commands:",
        "",
    ]
    head += [f"    {run.get('command')}" for run in data.get("runs", [])]
    path = Path(out_dir) / RESULTS_MD
    atomic_write_bytes(path, ("\n".join(head) + "\n").encode())
    return path


def write_plots(out_dir: Path, data: dict) -> list[Path]:
    """``ttft.png``, ``decode.png`` (with each preset's roofline dashed) and ``memory.png``: log-log against
    context, one line per preset; presets that ran out of memory say where in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = data.get("results", [])
    presets: list[str] = []
    for r in rows:
        if r["preset"] not in presets:
            presets.append(r["preset"])
    specs = [
        ("ttft", "ttft_s", "time to first token (s)", 1.0),
        ("decode", "decode_ms_per_token", "decode (ms / token)", 1.0),
        ("memory", "peak_memory_bytes", "peak GPU memory (GiB)" if data.get("device") != "cpu" else "peak memory (GiB)", 2**-30),
    ]
    written = []
    for name, key, ylabel, scale in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, preset in enumerate(presets):
            color = f"C{i % 10}"
            pts = sorted((r["context"], r[key] * scale) for r in rows
                         if r["preset"] == preset and _ok(r) and isinstance(r.get(key), (int, float)) and r[key] > 0)
            ooms = sorted(r["context"] for r in rows if r["preset"] == preset and r.get("status") == "oom")
            label = preset + (f" (OOM at {', '.join(fmt_context(c) for c in ooms)})" if ooms else "")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
            elif ooms:
                ax.plot([], [], marker="x", color=color, label=label)
            if name == "decode":
                roof = sorted((r["context"], r["roofline"]["ms_per_token"]) for r in rows
                              if r["preset"] == preset and r.get("roofline", {}).get("ms_per_token"))
                if roof and pts:
                    ax.plot([p[0] for p in roof], [p[1] for p in roof], linestyle="--", color=color, alpha=0.6)
        if name == "memory" and data.get("device_memory_bytes"):
            ax.axhline(data["device_memory_bytes"] * scale, color="grey", linestyle=":", label="device memory")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        contexts = sorted({r["context"] for r in rows})
        if contexts:
            ax.set_xticks(contexts)
            ax.set_xticklabels([fmt_context(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        title = {"ttft": "Time to first token (chunked prefill)", "decode": "Decode per token (dashed: memory-bandwidth roofline)",
                 "memory": "Peak memory"}[name]
        ax.set_title(f"{title}, {data.get('device')}, batch 1, {data.get('dtype')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if presets:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / PLOTS[name]
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
