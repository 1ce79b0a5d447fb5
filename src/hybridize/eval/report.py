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
and formats from them.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "METRICS",
    "LAYER_TYPE_LETTERS",
    "layer_types_string",
    "format_bytes",
    "format_metric",
    "compare_table",
    "write_report",
]

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


def _tag_value(tag: str) -> float:
    """Numeric size of a length tag: "2048" -> 2048, "8k" -> 8192 (for ordering rows)."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", tag)
    if not m:
        return math.inf
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def _rank(key: str) -> tuple[int, float]:
    for i, pattern in enumerate(_GROUPS):
        m = re.fullmatch(pattern, key)
        if m:
            return i, _tag_value(m.group(1)) if m.groups() else 0.0
    return len(_GROUPS), 0.0


def _label(key: str) -> str:
    """Row label: :data:`METRICS` labels, then ``ppl_N`` / ``passkey_X`` / ``cache_bytes_at_X`` patterns."""
    if key in METRICS:
        return METRICS[key][0]
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
            ordered perplexities (``ppl_N``, by N), pass-key (``passkey_X``), decode tokens/s, cache bytes
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created if needed), each atomically
    (temporary file in the same folder, fsync, ``os.replace``), so a reader never sees a partial file.

    Args:
        results: ``{"models": {model name: {metric key: value}}, ...}`` (``"metrics"`` is accepted in
            place of ``"models"``); that mapping becomes the table of :func:`compare_table`; every other top-level key (config, per-trial records, timings, notes)
            goes to the JSON verbatim and to a "Details" section of the markdown. Tensors, numpy values
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
    extra = {k: v for k, v in data.items() if k != table_key}
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
