"""``hybridize bench``: build each preset once, measure it at every context length, write JSON + plots.

Out-of-memory at any stage (weights, cache, prefill, decode) is recorded as ``"oom"`` and the run goes on;
any other error is recorded as ``"error"`` with its message. A measurement whose predicted time (extrapolated
from the preset's shorter lengths, see :func:`~hybridize.bench.measure.predict_seconds`) exceeds
``time_budget`` is recorded as ``"skipped"``; so is one that would end past ``total_budget``. A hybridize
preset whose static cache alone cannot fit in device memory is always attempted: it fails at allocation, at
once, and is recorded as out of memory. ``results.json`` is rewritten after every measurement, so a run that
is killed keeps what it measured; with ``merge`` (default) a run adds to (and replaces the same
preset/length rows of) the results already in the directory, so one table can be assembled from several
calls that each fit a time limit.
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..convert.stage import git_state
from ..ops.attention import PREFILL_ATTENTION_IMPLS, prefill_attention
from ..outdir import check_writable_dir, removed_if_left_empty
from . import measure
from .presets import DEFAULT_LENGTHS, DEFAULT_OUT, PRESETS, Preset, build_model, layer_schedule
from .report import load_results, merge_rows, write_markdown, write_plots, write_results

__all__ = ["BenchOptions", "run_bench", "DEFAULT_LENGTHS", "DEFAULT_OUT"]

_log = logging.getLogger("hybridize")

@dataclass
class BenchOptions:
    """Options of :func:`run_bench` (the CLI flags of ``hybridize bench``).

    Attributes:
        presets: names from :data:`~hybridize.bench.presets.PRESETS` (a repeated name counts once).
        lengths: context lengths (tokens) to measure, each >= 1 (a repeated length counts once).
        decode_tokens: timed decode steps per measurement (>= 1).
        out: output directory (``results.json``, ``results.md``, ``ttft.png``, ``decode.png``, ``memory.png``);
            checked to be a writable directory before any model is built.
        device: ``"cuda"`` (default when available) or ``"cpu"``.
        dtype: ``"bfloat16"`` (default on CUDA), ``"float16"`` or ``"float32"`` (default on CPU).
        chunk_size: prefill chunk of the hybridize presets (tokens).
        time_budget: seconds (> 0) one measurement may take (predicted); longer ones are skipped. None = no limit.
        total_budget: seconds (> 0) the whole call may take (predicted); later measurements are skipped. None = no
            limit.
        decode_attention: ``auto`` / ``flex`` / ``split`` (see :class:`~hybridize.inference.GraphDecoder`).
        prefill_attention: ``sdpa`` / ``split`` / ``flex``: attention of each prefill chunk over the cache (see
            :func:`~hybridize.ops.attention.prefill_chunk_attention`); None = ``$HYBRIDIZE_PREFILL_ATTENTION``
            or ``sdpa``. Recorded per row.
        graph: capture the decode step in a CUDA graph (CUDA only).
        compile: run the decode step's forward through ``torch.compile`` before capturing it (opt-in).
        seed: weights and prompt seed.
        merge: add to the results already in ``out`` (same device and dtype) instead of starting afresh.
        commit: git commit to record when the tree has no ``.git`` (e.g. a copy on the GPU machine).
        command: the exact command line to record.
        warmup: run each preset once at a short length first (untimed: compiles kernels, captures graphs).
        profile: profile three extra decode steps per measurement (kernels per step, top kernels).
    """

    presets: list[str]
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    decode_tokens: int = 64
    out: str = DEFAULT_OUT
    device: str | None = None
    dtype: str | None = None
    chunk_size: int = 16384
    time_budget: float | None = 300.0
    total_budget: float | None = None
    decode_attention: str = "auto"
    prefill_attention: str | None = None
    graph: bool = True
    compile: bool = False
    seed: int = 0
    merge: bool = True
    commit: str | None = None
    command: str | None = None
    warmup: bool = True
    profile: bool = False


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _environment(device: torch.device, dtype: torch.dtype, opts: BenchOptions) -> dict:
    import transformers

    cuda = device.type == "cuda"
    return {
        "benchmark": "hybridize bench",
        "command": opts.command or "hybridize bench (called from Python)",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "fla_core": _version("fla-core"),
        "python": platform.python_version(),
        "git": git_state(opts.commit),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": 1,
        "chunk_size": opts.chunk_size,
        "decode_tokens": opts.decode_tokens,
        "time_budget_s": opts.time_budget,
        "method": measure.__doc__.split("\n\n", 1)[1].strip(),
    }


def _validate(opts: BenchOptions) -> tuple[torch.device, torch.dtype]:
    unknown = [p for p in opts.presets if p not in PRESETS]
    if unknown or not opts.presets:
        raise ValueError(f"unknown presets {unknown or '(none given)'}; choose from {sorted(PRESETS)}")
    if not opts.lengths or any(n < 1 for n in opts.lengths):
        raise ValueError(f"lengths must be >= 1 tokens, got {opts.lengths}")
    for flag, value in (("--decode-tokens", opts.decode_tokens), ("--chunk-size", opts.chunk_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (tokens), got {value}")
    for flag, budget in (("--time-budget", opts.time_budget), ("--total-budget", opts.total_budget)):
        if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"{flag} must be a number of seconds > 0 (or none for no limit), got {budget!r}")
    if opts.decode_attention not in ("auto", "flex", "split"):
        raise ValueError(f"decode_attention must be auto, flex or split, got {opts.decode_attention!r}")
    if opts.prefill_attention is not None and opts.prefill_attention not in PREFILL_ATTENTION_IMPLS:
        raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTION_IMPLS}, got {opts.prefill_attention!r}")
    if opts.prefill_attention is None:  # a bad HYBRIDIZE_PREFILL_ATTENTION fails here (the flag wins over it)
        prefill_attention()
    name = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available (use --device cpu --presets tiny ...)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {name!r}")
    dtype_name = opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype_name!r}")
    check_writable_dir(opts.out, "--out")  # last: the directory is created only when everything else is fine
    return device, getattr(torch, dtype_name)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _preset_info(preset: Preset, model) -> dict:
    info = {"kind": preset.kind, "description": preset.description, "baseline": preset.baseline, "peer": preset.peer}
    if model is not None:
        wb = measure.weight_bytes(model)
        info.update(parameters=wb["parameters"], weight_bytes=wb["bytes"], tied_embeddings=wb["tied"])
    if preset.kind == "hybrid":
        from ..models.configuration import layer_types_to_str

        info["schedule"] = layer_types_to_str(layer_schedule(preset.schedule, preset.shape["num_hidden_layers"]))
        if model is not None and "sparse" in model.config.layer_types:
            info["sparse_config"] = dict(model.config.sparse_config)
    info["shape"] = {k: v for k, v in preset.shape.items() if k != "rope_parameters"}
    return info


def _failure(status: str, exc: BaseException | None, stage: str, ttft: float | None = None, reason: str | None = None) -> dict:
    row = {"status": status, "stage": stage}
    if status == "oom":
        row.update(ttft_s=ttft if ttft is not None else "oom", decode_ms_per_token="oom", peak_memory_bytes="oom")
    else:
        row.update(ttft_s=None, decode_ms_per_token=None, peak_memory_bytes=None)
    if exc is not None:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    if reason:
        row["reason"] = reason
    return row


def _measure(preset: Preset, model, context: int, opts: BenchOptions, state: dict) -> dict:
    if preset.kind == "hf":
        return measure.measure_hf(model, context, opts.decode_tokens, seed=opts.seed, state=state)
    return measure.measure_hybrid(
        model,
        context,
        opts.decode_tokens,
        chunk_size=opts.chunk_size,
        decode_attention=opts.decode_attention,
        prefill_attention=opts.prefill_attention,
        use_graph=opts.graph,
        compile=opts.compile,
        seed=opts.seed,
        profile=opts.profile,
        state=state,
    )


def _guarded(fn, device: torch.device, state: dict) -> dict:
    """Run ``fn()`` and turn an out-of-memory error or any other error into a result row."""
    try:
        return fn()
    except Exception as exc:  # recorded, then the run continues with the next measurement
        status = "oom" if measure.is_oom(exc) else "error"
        row = _failure(status, exc, state.get("stage", "unknown"), ttft=state.get("ttft_s"))
        if status == "error":
            _log.warning("bench: %s", row["error"])
    _free(device)
    return row


def _print(line: str) -> None:
    print(line, flush=True)


def run_bench(opts: BenchOptions, log=_print) -> dict:
    """Measure every preset at every length (see the module docstring) and write the results.

    Args:
        opts: :class:`BenchOptions`.
        log: called with one line per measurement (default: print, flushed).

    Returns:
        the results dict written to ``out/results.json`` plus ``"files"`` (paths written) and ``"markdown"``
        (the table).

    Raises:
        ValueError: unknown presets, bad lengths/sizes/budgets, ``cuda`` asked without a GPU, or ``out`` not a
            writable directory (all checked before any model is built; an ``out`` this call created is
            removed again when the call fails before writing into it).
    """
    with removed_if_left_empty(opts.out):
        return _run_bench(opts, log)


def _run_bench(opts: BenchOptions, log) -> dict:
    device, dtype = _validate(opts)
    opts = replace(opts, presets=list(dict.fromkeys(opts.presets)), lengths=list(dict.fromkeys(opts.lengths)))
    if device.type == "cuda":
        _raise_recompile_limit(64)
    out_dir = Path(opts.out)
    started = time.time()
    data = _environment(device, dtype, opts)
    previous = load_results(out_dir) if opts.merge else None
    _check_mergeable(out_dir, previous, data)
    data["copy_bandwidth"] = measure.copy_bandwidth(device)
    bw = data["copy_bandwidth"]["bytes_per_s"]
    log(f"bench: {data['device']}, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    data["presets"] = dict((previous or {}).get("presets", {}))
    runs = list((previous or {}).get("runs", []))
    run_info = {"command": data["command"], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "git": data["git"], "presets": list(opts.presets), "lengths": list(opts.lengths),
                "copy_bandwidth_bytes_per_s": bw, "options": {k: v for k, v in asdict(opts).items() if k != "command"}}
    old_rows = list((previous or {}).get("results", []))
    new_rows: list[dict] = []

    def save() -> None:
        data["results"] = merge_rows(old_rows, new_rows)
        data["runs"] = runs + [dict(run_info, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))]
        write_results(out_dir, data)

    elt = torch.empty((), dtype=dtype).element_size()
    total_mem = data["device_memory_bytes"]
    for name in opts.presets:
        preset = PRESETS[name]
        state: dict = {"stage": "weights"}
        model = None
        try:
            torch.manual_seed(opts.seed)
            model = build_model(preset, device, dtype, seed=opts.seed)
        except Exception as exc:
            status = "oom" if measure.is_oom(exc) else "error"
            data["presets"][name] = _preset_info(preset, None)
            for context in opts.lengths:
                new_rows.append({"preset": name, "context": context, **_failure(status, exc, "weights")})
            log(f"bench: {name}: {status} while building the model ({type(exc).__name__})")
            _free(device)
            save()
            continue
        data["presets"][name] = _preset_info(preset, model)
        if opts.warmup:
            w = min(min(opts.lengths), 2 * opts.chunk_size) if preset.kind == "hybrid" else min(min(opts.lengths), 4096)
            t0 = time.perf_counter()
            warm_state: dict = {}
            warm = _guarded(lambda: _measure(preset, model, w, BenchOptions(**{**asdict(opts), "decode_tokens": 2}), warm_state),
                            device, warm_state)
            data["presets"][name]["warmup"] = {"context": w, "seconds": round(time.perf_counter() - t0, 2),
                                               "status": warm.get("status"), "graph": warm.get("graph"),
                                               "prefill_attention": warm.get("prefill_attention"),
                                               "decode_attention": warm.get("decode_attention"),
                                               "graph_error": warm.get("graph_error"), "error": warm.get("error")}
            _free(device)
        history: list[tuple[int, float]] = []
        decode_ms: float | None = None
        oomed = False
        for context in sorted(opts.lengths):
            row: dict = {"preset": name, "context": context}
            predicted = measure.predict_seconds(history, context)
            if predicted is not None and decode_ms is not None:
                predicted += 1.5 * opts.decode_tokens * decode_ms / 1000 * (context / history[-1][0])
            cache_too_big = (
                preset.kind == "hybrid"
                and total_mem is not None
                and measure.static_cache_bytes(model.config, context + opts.decode_tokens + 4, elt)
                + measure.weight_bytes(model)["bytes"] > total_mem
            )
            elapsed = time.time() - started
            if not (oomed or cache_too_big) and predicted is not None:
                if opts.time_budget is not None and predicted > opts.time_budget:
                    row.update(_failure("skipped", None, "not run",
                                        reason=f"predicted {predicted:.0f} s > time budget {opts.time_budget:.0f} s"))
                elif opts.total_budget is not None and elapsed + predicted > opts.total_budget:
                    row.update(_failure("skipped", None, "not run",
                                        reason=f"predicted {predicted:.0f} s would end past the total budget {opts.total_budget:.0f} s"))
            if "status" not in row:
                state = {"stage": "cache"}
                t0 = time.perf_counter()
                result = _guarded(lambda: _measure(preset, model, context, opts, state), device, state)
                _free(device)  # the cache of this length goes back before the next, larger one
                row.update(result)
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                if row["status"] == "ok":
                    history.append((context, row["ttft_s"]))
                    decode_ms = row["decode_ms_per_token"]
                oomed = oomed or row["status"] == "oom"
            if row["status"] == "ok":
                roof = measure.decode_bytes_per_token(model, context)
                ms = 1000 * roof["total"] / bw
                row["roofline"] = {
                    "bytes_per_token": roof["total"],
                    "components": {k: v for k, v in roof.items() if k != "total"},
                    "copy_bandwidth_bytes_per_s": bw,
                    "ms_per_token": float(f"{ms:.4g}"),
                    "achieved_fraction": float(f"{ms / row['decode_ms_per_token']:.3g}"),
                }
            new_rows.append(row)
            save()
            log(_line(row))
        del model
        _free(device)
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return _report(out_dir, data)


def _check_mergeable(out_dir: Path, previous: dict | None, data: dict) -> None:
    """Raise ValueError when ``out_dir`` holds results of another device or dtype than ``data``'s."""
    if previous and (previous.get("device"), previous.get("dtype")) != (data["device"], data["dtype"]):
        raise ValueError(
            f"{out_dir}/results.json holds results of {previous.get('device')} {previous.get('dtype')}, this run "
            f"measures {data['device']} {data['dtype']}: runs merge only on the same device and dtype; choose "
            f"another --out, or pass --fresh to replace that file")


def _report(out_dir: Path, data: dict) -> dict:
    """The table and plots of the results already in ``out_dir/results.json``; :func:`run_bench`'s return."""
    files = [out_dir / "results.json", write_markdown(out_dir, data), *write_plots(out_dir, data)]
    return {**data, "files": [str(f) for f in files], "markdown": (out_dir / "results.md").read_text()}


def _raise_recompile_limit(limit: int) -> None:
    """Let torch.compile keep more specialisations per function (one flex decode kernel per cache shape across
    presets); past the default limit of 8 it would run FlexAttention eagerly: exact, but slow."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover
        return
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def _line(row: dict) -> str:
    head = f"bench: {row['preset']:>14} {row['context']:>8} tokens: "
    if row["status"] != "ok":
        why = row.get("reason") or row.get("error") or ""
        return head + f"{row['status']} ({row.get('stage')}) {why}"[:300]
    roof = row.get("roofline", {})
    mem = row["peak_memory_bytes"] / 2**30
    return head + (
        f"TTFT {row['ttft_s']:.3f} s, decode {row['decode_ms_per_token']:.3f} ms/token "
        f"({100 * roof.get('achieved_fraction', 0):.0f}% of roofline {roof.get('ms_per_token', 0):.3f} ms), "
        f"peak {mem:.2f} GiB, prefill attention {row.get('prefill_attention')}, "
        f"graph {row.get('graph')} ({row.get('decode_attention')}"
        + (", compiled)" if row.get("compiled_step") else ")")
        + (f", sparse prefill {'+'.join(row['sparse_prefill_kernels'])}" if row.get("sparse_prefill_kernels") else "")
    )


def command_line(argv: list[str] | None) -> str:
    """The exact ``hybridize ...`` command line (shell-quoted) for the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["hybridize", *argv])


def _part_worker(opts: BenchOptions, gpu: int | None, log_path: str) -> None:
    """One process of :func:`run_bench_parallel`: this GPU only, its presets, its own ``out``; output to a log."""
    import os

    if gpu is not None:  # before anything initialises CUDA in this fresh (spawned) process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with open(log_path, "w", buffering=1) as fh:
        run_bench(opts, log=lambda line: print(line, file=fh, flush=True))


def run_bench_parallel(opts: BenchOptions, processes: int, log=_print, *, gpus: bool = True) -> dict:
    """:func:`run_bench` with the presets dealt over ``processes`` GPUs of this host, one process per GPU (each
    sees only its GPU through ``CUDA_VISIBLE_DEVICES``), merged into one ``out/results.json`` with its table
    and plots, as one run. Each preset is measured whole on one GPU (its rows are comparable within the preset,
    and across presets on identical GPUs); the budgets apply per process. Per-process results and logs stay in
    ``out/parts/``.

    Args:
        opts: as for :func:`run_bench`.
        processes: worker processes (>= 2; at most the presets' count is used).
        log: called with one line per finished process and the summary.
        gpus: pin each process to one GPU (False: CPU workers, for tests).

    Returns:
        As :func:`run_bench`.

    Raises:
        ValueError: fewer GPUs than ``processes``, ``processes < 2``, bad options (checked before any process
            starts, as :func:`run_bench` does), or a process that failed (its log is named).
    """
    import multiprocessing

    if processes < 2:
        raise ValueError(f"--gpus must be >= 2 to spread presets over GPUs, got {processes}")
    if gpus and opts.device == "cpu":
        raise ValueError("--gpus spreads presets over GPUs: it needs --device cuda (or no --device on a GPU host)")
    _validate(opts)
    if gpus and torch.cuda.device_count() < processes:
        raise ValueError(f"--gpus {processes}: this host has {torch.cuda.device_count()} CUDA GPU(s); ask for at most that")
    presets = list(dict.fromkeys(opts.presets))
    groups = [g for g in (presets[i::processes] for i in range(processes)) if g]
    out_dir = Path(opts.out)
    previous = load_results(out_dir) if opts.merge else None
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    jobs = []
    for i, group in enumerate(groups):
        part = replace(opts, presets=group, out=str(parts_dir / f"part{i}"), merge=False)
        proc = ctx.Process(target=_part_worker, args=(part, i if gpus else None, str(parts_dir / f"part{i}.log")))
        proc.start()
        jobs.append((i, group, proc))
    failed = []
    for i, group, proc in jobs:
        proc.join()
        log(f"bench: part {i} ({' '.join(group)}) exit {proc.exitcode}; log {parts_dir / f'part{i}.log'}")
        if proc.exitcode != 0:
            failed.append(f"part {i} ({' '.join(group)}): exit {proc.exitcode}, see {parts_dir / f'part{i}.log'}")
    parts = [load_results(parts_dir / f"part{i}") for i, _, _ in jobs]
    if failed or any(p is None for p in parts):
        raise ValueError("bench: a process failed, nothing merged: " + "; ".join(failed or ["a part wrote no results"]))
    first = parts[0]
    if any((p["device"], p["dtype"]) != (first["device"], first["dtype"]) for p in parts):
        raise ValueError("bench: the processes measured different devices or dtypes: " +
                         ", ".join(f"{p['device']} {p['dtype']}" for p in parts))
    _check_mergeable(out_dir, previous, first)
    data = {k: v for k, v in first.items() if k not in ("results", "runs", "presets", "copy_bandwidth", "finished")}
    data["command"] = opts.command
    data["parallel"] = {"processes": len(parts), "presets": [g for _, g, _ in jobs],
                        "copy_bandwidth_bytes_per_s": [p["copy_bandwidth"]["bytes_per_s"] for p in parts]}
    data["copy_bandwidth"] = min((p["copy_bandwidth"] for p in parts), key=lambda c: c["bytes_per_s"])
    data["presets"] = {**(previous or {}).get("presets", {}), **{k: v for p in parts for k, v in p["presets"].items()}}
    data["results"] = merge_rows((previous or {}).get("results", []), [r for p in parts for r in p["results"]])
    data["runs"] = list((previous or {}).get("runs", [])) + [
        {"command": opts.command, "parallel_parts": [run for p in parts for run in p.get("runs", [])]}]
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_results(out_dir, data)
    return _report(out_dir, data)
