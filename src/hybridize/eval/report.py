"""Teacher-vs-hybrid comparison tables and the on-disk report (``report.json`` + ``report.md``).

Standard metric keys (rows, in this order; unknown keys follow in first-seen order, formatted by name):

=========================  =========================================  ==========================
key                        meaning                                    shown as
=========================  =========================================  ==========================
``ppl_512``                held-out perplexity at 512 tokens          ``23.41``
``ppl_2048``               held-out perplexity at 2048 tokens         ``21.07``
``passkey_1k``             pass-key accuracy at 1K tokens (0..1)      ``80.0%``
``passkey_2k``             pass-key accuracy at 2K tokens (0..1)      ``40.0%``
``decode_tokens_per_s``    greedy decode throughput, tokens/s         ``153.2``
``cache_bytes_per_token``  cache bytes per context token              ``1.5 KiB``
``cache_bytes_at_8k``      cache bytes at 8192 tokens of context      ``12.0 MiB``
``layer_types``            per-layer mixer types (list or string)     ``LLLA...`` (one letter each)
=========================  =========================================  ==========================

Other lengths follow the same patterns (``ppl_N``, ``passkey_4k``, ``cache_bytes_at_32k``) and get labels
and formats from them. Pass-key with a filler form other than the repeated sentences names the form:
``passkey_essay_32k`` ("Passkey (essay) accuracy @32K").

A report may also carry the loss per position bucket (``results["buckets"]``, rendered as its own
markdown table by :func:`write_report`) and is plotted by :func:`plot_report` (perplexity vs length,
loss per bucket, pass-key accuracy vs length).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "METRICS",
    "LAYER_TYPE_LETTERS",
    "layer_types_string",
    "format_bytes",
    "format_metric",
    "compare_table",
    "bucket_table",
    "write_report",
    "plot_report",
]

from ..assets import atomic_write_bytes
from ..models.configuration import LAYER_LETTERS

#: Our mixer letters (models.configuration.LAYER_LETTERS) plus the names transformers uses for teachers.
LAYER_TYPE_LETTERS = {**LAYER_LETTERS, "full_attention": "A", "gated_deltanet": "D", "sliding_attention": "W"}


def layer_types_string(layer_types: Sequence[str] | str) -> str:
    """One letter per layer: lightning L, attention A, sparse S, gated_deltanet D, sliding_attention W
    (others: their first letter, upper-cased). A string is returned unchanged.

    Example: ``["lightning", "lightning", "attention"] -> "LLA"``.
    """
    if isinstance(layer_types, str):
        return layer_types
    return "".join(LAYER_TYPE_LETTERS.get(t, (t[:1] or "?").upper()) for t in layer_types)


def format_bytes(n: float | int | None) -> str:
    """Human-readable bytes with binary units: ``512 B``, ``1.5 KiB``, ``12.0 MiB``, ``3.25 GiB``."""
    if n is None:
        return "—"
    n = float(n)
    if not math.isfinite(n):
        return str(n)
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{n:.0f} B" if n == int(n) else f"{sign}{n:.1f} B"
            return f"{sign}{n:.2f} {unit}" if n < 10 else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{float(v):.{digits}f}"


def _fmt_percent(v: Any) -> str:
    return f"{100.0 * float(v):.1f}%"


# key -> (row label, formatter); the order is the row order of the table
METRICS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "ppl_512": ("Perplexity @512", _fmt_float(2)),
    "ppl_2048": ("Perplexity @2048", _fmt_float(2)),
    "passkey_1k": ("Passkey accuracy @1K", _fmt_percent),
    "passkey_2k": ("Passkey accuracy @2K", _fmt_percent),
    "decode_tokens_per_s": ("Decode tokens/s", _fmt_float(1)),
    "cache_bytes_per_token": ("Cache bytes / token", format_bytes),
    "cache_bytes_at_8k": ("Cache @8K tokens", format_bytes),
    "layer_types": ("Layer types", layer_types_string),
}

# summary value of a nested result dict (e.g. the whole passkey_accuracy() output put in a row)
_SUMMARY_KEYS = ("accuracy", "perplexity", "bytes_at_tokens", "decode_tokens_per_s", "value")


def _guess_formatter(key: str) -> Callable[[Any], str]:
    k = key.lower()
    if "bytes" in k:
        return format_bytes
    if "accuracy" in k or k.startswith("passkey"):
        return _fmt_percent
    if "ppl" in k or "perplexity" in k:
        return _fmt_float(2)
    if "per_s" in k:
        return _fmt_float(1)
    if "seconds" in k:
        return lambda v: f"{float(v):.3f} s"
    if "loss" in k:
        return _fmt_float(4)
    if "layer_types" in k:
        return layer_types_string
    return _fmt_generic


def _fmt_generic(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_metric(key: str, value: Any) -> str:
    """Format one metric value for the table (``—`` for None/missing; a dict shows its summary value,
    e.g. ``accuracy``). Known keys use :data:`METRICS`; others are formatted by name (``*bytes*`` as
    KiB/MiB, ``*accuracy*``/``passkey*`` as %, ``*ppl*`` with 2 decimals, ``*per_s*`` with 1)."""
    if value is None:
        return "—"
    if isinstance(value, Mapping):
        for k in _SUMMARY_KEYS:
            if k in value:
                return format_metric(key, value[k])
        return "…"
    fmt = METRICS[key][1] if key in METRICS else _guess_formatter(key)
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


# row groups: perplexities, pass-key, decode speed, cache per token, cache at length, layer types, others
_GROUPS = (r"ppl_(\d+)", r"passkey_(\w+)", r"decode_tokens_per_s", r"cache_bytes_per_token",
           r"cache_bytes_at_(\w+)", r"layer_types")
# pass-key key with an optional filler form: passkey_1k, passkey_essay_32k -> (form or None, length tag)
_PASSKEY_FORM = re.compile(r"passkey_(?:([a-z]+)_)?(\d+[kKmM]?)")


def _tag_value(tag: str) -> float:
    """Numeric size of a length tag: "2048" -> 2048, "8k" -> 8192 (for ordering rows)."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", tag)
    if not m:
        return math.inf
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def _rank(key: str) -> tuple[int, str, float]:
    """(group, pass-key form, length): pass-key rows of the repeated form first, then per form by name."""
    m = _PASSKEY_FORM.fullmatch(key)
    if m:
        return _GROUPS.index(r"passkey_(\w+)"), m.group(1) or "", _tag_value(m.group(2))
    for i, pattern in enumerate(_GROUPS):
        m = re.fullmatch(pattern, key)
        if m:
            return i, "", _tag_value(m.group(1)) if m.groups() else 0.0
    return len(_GROUPS), "", 0.0


def _label(key: str) -> str:
    """Row label: :data:`METRICS` labels, then ``ppl_N`` / ``passkey_X`` / ``cache_bytes_at_X`` patterns."""
    if key in METRICS:
        return METRICS[key][0]
    m = _PASSKEY_FORM.fullmatch(key)
    if m and m.group(1):
        return f"Passkey ({m.group(1)}) accuracy @{m.group(2).upper()}"
    for pattern, fmt in ((r"ppl_(\d+)", "Perplexity @{}"), (r"passkey_(\w+)", "Passkey accuracy @{}"),
                         (r"cache_bytes_at_(\w+)", "Cache @{} tokens")):
        m = re.fullmatch(pattern, key)
        if m:
            return fmt.format(m.group(1).upper())
    return key


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def compare_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table with one column per model and one row per metric.

    Args:
        rows: ``{model name: {metric key: value}}``, e.g. ``{"teacher": {...}, "hybrid": {...}}``. Rows are
            ordered perplexities (``ppl_N``, by N), pass-key (``passkey_X``, then ``passkey_<form>_X`` per
            form), decode tokens/s, cache bytes
            per token, cache at length (``cache_bytes_at_X``), layer types, then other keys in first-seen
            order under their own names. A metric missing for a model shows ``—``.

    Returns:
        str, the markdown table (header, separator, one line per metric, trailing newline).

    Raises:
        ValueError: ``rows`` empty or a model's metrics not a mapping.
    """
    if not rows:
        raise ValueError("compare_table needs at least one model")
    for name, metrics in rows.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics of model {name!r} must be a dict, got {type(metrics).__name__}")
    seen: list[str] = []
    for m in rows.values():
        seen.extend(k for k in m if k not in seen)
    keys = sorted(seen, key=lambda k: (_rank(k), seen.index(k)))
    names = list(rows)
    lines = [
        "| metric | " + " | ".join(_escape(str(n)) for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for k in keys:
        label = _label(k)
        cells = [format_metric(k, rows[n].get(k)) for n in names]
        lines.append(f"| {_escape(label)} | " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    """Convert to plain JSON types: paths -> str, tensors/arrays -> lists or scalars, non-finite floats -> None."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return _jsonable(x.tolist())
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _pos_tag(n: int) -> str:
    """Token position as a short label: 0 -> "0", 2048 -> "2K", 65536 -> "64K", 100 -> "100"."""
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def _bucket_columns(per_length: Mapping[Any, Sequence[Mapping[str, Any]]]) -> list[tuple[int, str]]:
    """(start, label) of the bucket columns: the buckets of the longest length (it has them all)."""
    cols: dict[int, str] = {}
    for length in sorted(per_length, key=int, reverse=True):
        for b in per_length[length]:
            cols.setdefault(int(b["start"]), f"{_pos_tag(int(b['start']))}-{_pos_tag(int(b['end']))}")
    return sorted(cols.items())


def bucket_table(buckets: Mapping[str, Mapping[Any, Sequence[Mapping[str, Any]]]]) -> str:
    """Markdown table of the mean loss (nats/token) per position bucket: one row per model and length,
    one column per bucket (``0-2K``, ``2K-8K``, ..., the last one ending at the longest length).

    Args:
        buckets: ``{model name: {length (int or str): [{"start", "end", "tokens", "loss", ...}, ...]}}``,
            the ``buckets`` lists of :func:`~hybridize.eval.perplexity.heldout_perplexity`. A bucket with
            ``loss`` None (no predicted token there: the bucket starts at or beyond the length) or
            missing shows ``—``.

    Returns:
        str, the markdown table with a trailing newline ("" when there are no buckets).
    """
    merged: dict[Any, list] = {}
    for per_length in buckets.values():
        for length, rows in per_length.items():
            merged.setdefault(int(length), []).extend(rows)
    cols = _bucket_columns(merged)
    if not cols:
        return ""
    lines = ["| model | length | " + " | ".join(label for _, label in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name, per_length in buckets.items():
        for length in sorted(per_length, key=int):
            by_start = {int(b["start"]): b.get("loss") for b in per_length[length]}
            cells = [format_metric("loss", by_start.get(start)) for start, _ in cols]
            lines.append(f"| {_escape(str(name))} | {int(length)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created if needed), each atomically
    (temporary file in the same folder, fsync, ``os.replace``), so a reader never sees a partial file.

    Args:
        results: ``{"models": {model name: {metric key: value}}, ...}`` (``"metrics"`` is accepted in
            place of ``"models"``); that mapping becomes the table of :func:`compare_table`. An optional
            ``"buckets"`` (``{model: {length: [bucket dicts]}}``) becomes a second table, "Mean loss per
            position bucket" (:func:`bucket_table`). Every other top-level key (config, per-trial
            records, timings, notes) goes to the JSON verbatim and to a "Details" section of the markdown.
            Everything, buckets included, is in the JSON. Tensors, numpy values
            and paths are converted to JSON types; non-finite floats become null.
        out_dir: destination folder.

    Returns:
        ``{"json": Path, "md": Path}``.

    Raises:
        ValueError: ``results`` has no ``models``/``metrics`` mapping of model name -> metrics dict.
    """
    models = None
    table_key = None
    if isinstance(results, Mapping):
        table_key = next((k for k in ("models", "metrics") if k in results), None)
        models = results.get(table_key) if table_key else None
    if not isinstance(models, Mapping) or not models or not all(isinstance(m, Mapping) for m in models.values()):
        raise ValueError('results must be a dict with a non-empty "models" (or "metrics"): {name: {metric: value}}')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _jsonable(results)
    json_path, md_path = out / "report.json", out / "report.md"
    _atomic_write_text(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")

    md = ["# hybridize evaluation report", "", compare_table(models)]
    buckets = data.get("buckets")
    if isinstance(buckets, Mapping) and bucket_table(buckets):
        md += ["## Mean loss per position bucket (nats/token)", "",
               "Mean next-token loss of the tokens whose position (tokens of context before them) lies in "
               "each range, at each perplexity length; — where the length does not reach the range.", "",
               bucket_table(buckets)]
    extra = {k: v for k, v in data.items() if k not in (table_key, "buckets")}
    if extra:
        md += ["## Details", ""]
        for k, v in extra.items():
            if isinstance(v, (dict, list)):
                md += [f"### {k}", "", "```json", json.dumps(v, indent=2), "```", ""]
            else:
                md += [f"- **{k}**: {v}"]
        md.append("")
    _atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n")
    return {"json": json_path, "md": md_path}


def _length_series(metrics: Mapping[str, Any], pattern: str) -> list[tuple[int, float]]:
    """Sorted (length in tokens, value) of the metric keys matching ``pattern`` (group 1: length tag)."""
    out = []
    for key, value in metrics.items():
        m = re.fullmatch(pattern, key)
        if m and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((int(_tag_value(m.group(1))), float(value)))
    return sorted(out)


def plot_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the PNG plots of an evaluation report into ``out_dir`` (created if needed; matplotlib, Agg).

    * ``perplexity.png``: held-out perplexity vs sequence length (tokens, log2 x axis, log y axis),
      one line per model, from the ``ppl_N`` metrics.
    * ``buckets.png``: mean loss (nats/token) per position bucket at the longest length each model has
      buckets for, one line per model, from ``results["buckets"]`` (see :func:`bucket_table`).
    * ``passkey.png``: pass-key accuracy (0..1) vs context length (tokens, log2 x axis), one line per
      model (colour) and filler form (line style), from the ``passkey_X`` / ``passkey_<form>_X`` metrics.

    A plot whose data is absent (no perplexity, no buckets, no pass-key metric) is not written.

    Args:
        results: as :func:`write_report` (``"models"`` or ``"metrics"``, optional ``"buckets"``).
        out_dir: destination folder.

    Returns:
        ``{"perplexity" | "buckets" | "passkey": Path}`` of the files written.

    Raises:
        ValueError: ``results`` has no ``models``/``metrics`` mapping.
    """
    models = next((results[k] for k in ("models", "metrics") if k in results), None) if isinstance(results, Mapping) else None
    if not isinstance(models, Mapping) or not all(isinstance(m, Mapping) for m in models.values()):
        raise ValueError('results must be a dict with a "models" (or "metrics") mapping: {name: {metric: value}}')
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path

    def length_axis(ax, lengths: set[int]) -> None:
        ax.set_xscale("log", base=2)
        ticks = sorted(lengths)
        ax.set_xticks(ticks, [_pos_tag(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("length (tokens)")
        ax.grid(True, alpha=0.3)

    series = {name: _length_series(m, r"ppl_(\d+)") for name, m in models.items()}
    if any(series.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in series.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(name))
        length_axis(ax, {p[0] for points in series.values() for p in points})
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("Perplexity vs sequence length")
        ax.legend()
        save(fig, "perplexity")

    buckets = results.get("buckets")
    if isinstance(buckets, Mapping) and any(buckets.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels: list[str] = []
        for name, per_length in buckets.items():
            if not per_length:
                continue
            length = max(per_length, key=int)
            rows = [b for b in per_length[length] if b.get("loss") is not None]
            xs = [f"{_pos_tag(int(b['start']))}-{_pos_tag(int(b['end']))}" for b in rows]
            labels.extend(x for x in xs if x not in labels)
            ax.plot(xs, [b["loss"] for b in rows], marker="o", label=f"{name} (T={int(length)})")
        ax.set_xlabel("position bucket (tokens of context)")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title("Loss per position bucket")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "buckets")

    styles = ["-", "--", ":", "-."]
    forms: list[str] = []
    lines = []
    for ci, (name, m) in enumerate(models.items()):
        by_form: dict[str, list[tuple[int, float]]] = {}
        for key, value in m.items():
            pm = _PASSKEY_FORM.fullmatch(key)
            if pm and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_form.setdefault(pm.group(1) or "repeated", []).append((int(_tag_value(pm.group(2))), float(value)))
        for form, points in by_form.items():
            if form not in forms:
                forms.append(form)
            lines.append((ci, name, form, sorted(points)))
    if lines:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for ci, name, form, points in lines:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{ci % 10}",
                    linestyle=styles[forms.index(form) % len(styles)], label=f"{name} ({form})")
        length_axis(ax, {p[0] for *_, points in lines for p in points})
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("pass-key accuracy")
        ax.set_title("Pass-key retrieval vs context length")
        ax.legend()
        save(fig, "passkey")
    return written
