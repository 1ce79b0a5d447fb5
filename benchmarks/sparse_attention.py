"""Benchmark one SALA-shaped InfLLM-V2 sparse attention layer against dense SDPA on one GPU (issue 5).

Shape: 32 query heads, 2 KV heads (``--heads`` / ``--kv-heads`` change them, e.g. 32 / 8 for the Qwen3-8B shape
of ``hybridize bench``'s sala-8b preset), head dim 128, bf16, batch 1, default sparse config (kernel 32 / stride 16,
64-token blocks, 1 init block, 2048-token window, top-64; ``dense_len`` is irrelevant here: every measured
length is far above it, and the sparse ops are called directly). For each context length it times, each
candidate separately and in the same run:

* prefill (all T queries):
  - ``dense_sdpa``: causal SDPA on the flash backend (GQA without copying KV where torch allows it);
  - ``selection``: compressed keys + block scores + top-k for every query (:func:`select_block_indices`,
    queries in memory-bounded chunks), torch scoring, eager; ``selection_compiled``: the same with the
    scoring core compiled by ``torch.compile`` (candidate); ``selection_triton``: the same with the fused
    Triton scoring kernel (:mod:`hybridize.ops.triton_select`, candidate; its default, much larger query
    chunks), with ``selection_triton_same_rows``, the fraction of (KV head, query) rows whose indices equal
    the torch selection's;
  - ``flex_mask``: building the FlexAttention BlockMask from the indices; ``flex``: the attention itself,
    with the BlockMask layout the library verified on this device (``flex_layout``, from
    :func:`~hybridize.ops.sparse_attention.flex_mask_variant`): the compact mask is timed apart, the
    padded and full masks are built per bounded query slice inside ``flex``; not run when no layout is right;
  - ``nsa``: fla's NSA selected-block kernel on the same selection (:func:`~hybridize.ops.sparse_attention.
    sparse_attention_nsa`; run only where it equals the reference, ``nsa`` in the JSON says why not);
  - ``sparse_total`` = best selection + the faster of flex (with its mask) and nsa (``attention_kernel``),
    and the selection's share of it;
  - ``model_chunked_first`` / ``model_chunked``: what one sparse layer costs inside the model's chunked
    prefill: :func:`~hybridize.ops.sparse_attention.sparse_attention` (selection + the kernel the library
    picks, listed in ``model_chunked_kernels``) on ``--chunk``-query chunks over the growing cache, the first
    pass at these shapes (compilation included) and a second one.

The scoring path of each selection candidate is pinned (torch or triton), whatever
:func:`hybridize.ops.sparse_attention.select_block_indices` would pick by itself; a fused kernel that fails
is recorded as ``"error: ..."`` rather than timed through its torch fallback.
* decode (one new token over a T-token cache, compressed keys cached as a decode loop would):
  - ``dense_sdpa``: SDPA of the 16 query heads of each KV group against the whole cache (flash);
  - ``selection``: scoring + top-k for the one query (torch scoring); ``selection_triton``: the same with
    the fused Triton scoring; ``gather``: gather the selected blocks' K/V + SDPA;
    ``flex``: the same selection through FlexAttention (mask build included); ``nsa``: through fla's kernel;
  - ``sparse_total`` = best selection + best of gather/flex/nsa;
  - ``graph_sparse`` / ``graph_dense_sdpa``: one decode step as a CUDA graph replays it (what
    :class:`~hybridize.inference.GraphDecoder` runs): the capturable static selection + gather
    (:func:`~hybridize.ops.sparse_attention.sparse_decode_static`) against the dense SDPA call, with
    ``graph_speedup_vs_dense`` and the graph step's relative error against the eager gather.

Out-of-memory is recorded as ``"oom"``, other failures as ``"error: ..."``; a measurement whose estimated cost
(extrapolated from the previous length) would overrun ``--time-budget`` is recorded as ``"skipped"``.
Results are printed and written as JSON (GPU name, torch/triton versions, git commit, the exact command).

Run on the GPU machine from the repository root (hybridize installed, or ``PYTHONPATH=src``)::

    PYTHONPATH=src python benchmarks/sparse_attention.py        # 32K .. 1M, ~8 min budget
    PYTHONPATH=src python benchmarks/sparse_attention.py --sizes 32768,131072 --time-budget 120 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridize.convert.stage import git_state
from hybridize.ops import sparse_attention as sa
from hybridize.ops.sparse_attention import (
    SparseConfig,
    compress_keys,
    flex_block_mask,
    select_block_indices,
    sparse_attention_flex,
    sparse_attention_gather,
    sparse_attention_nsa,
    sparse_decode_static,
)

ROOT = Path(__file__).resolve().parents[1]
SALA_HEADS, SALA_KV_HEADS, HEAD_DIM = 32, 2, 128
HEADS, KV_HEADS = SALA_HEADS, SALA_KV_HEADS  # the shape of this run (main sets them from --heads / --kv-heads)
DEFAULT_SIZES = "32768,131072,262144,524288,1048576"


def _versions() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    return info


class Budget:
    """Wall-clock budget; estimates a measurement's cost from the previous length by a power law."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()
        self.last: dict[str, tuple[int, float]] = {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, key: str, tokens: int, exponent: float, calls: int) -> bool:
        if key not in self.last:
            return self.left() > 0
        prev_tokens, prev_ms = self.last[key]
        estimate = prev_ms / 1e3 * (tokens / prev_tokens) ** exponent * calls
        return estimate < self.left()

    def record(self, key: str, tokens: int, ms) -> None:
        if isinstance(ms, float):
            self.last[key] = (tokens, ms)


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> float | str:
    """Median milliseconds of ``fn`` over ``repeats`` calls (CUDA events on a GPU, wall clock on CPU).

    Returns "oom" or "error: ..." instead of raising.
    """
    cuda = torch.cuda.is_available()
    try:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2]
    except torch.cuda.OutOfMemoryError:
        return "oom"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return f"error: {type(exc).__name__}: {exc}"[:400]
    finally:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def scoring(backend: str):
    """Pin the block-scoring path of :func:`select_block_indices` to ``"torch"`` or ``"triton"``."""
    old = sa._selection_backend
    sa._selection_backend = lambda device: backend
    try:
        yield
    finally:
        sa._selection_backend = old


def _triton_scoring_ok() -> str | None:
    """None if the fused Triton scoring can be timed here, else why not (recorded instead of a time)."""
    from hybridize.ops.triton_select import triton_available

    if not triton_available():
        return "skipped (triton not installed)"
    if sa._fused_broken is not None:
        return f"error: fused kernel failed: {sa._fused_broken}"[:400]
    return None


def _dense_prefill_fn(q, k, v):
    """Causal flash SDPA; GQA through ``enable_gqa`` when the flash backend takes it, else repeated KV."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q[:, :, :128], k[:, :, :128], v[:, :, :128], is_causal=True, enable_gqa=True)

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run, "flash, enable_gqa"
    except Exception:  # noqa: BLE001
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        return run, "flash, KV repeated"


def _dense_decode_fn(q1, k, v):
    """One-token decode: the group's query heads as rows against the whole cache (reads KV once), flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q1.shape[1] // k.shape[1]
    qg = q1.reshape(1, k.shape[1], g, q1.shape[-1])

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qg, k, v)

    return run


def _graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor] | str:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay (which returns the
    graph's static output) or ``"error: ..."``/``"oom"`` when capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    except torch.cuda.OutOfMemoryError:
        return "oom"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return f"error: capture failed: {type(exc).__name__}: {exc}"[:400]

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def bench_length(t: int, cfg: SparseConfig, args, budget: Budget, compiled_scores) -> dict:
    """Every measurement at context length ``t``: a dict with ``prefill`` and ``decode`` sections (ms)."""
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(t)
    row: dict = {"tokens": t, "prefill": {}, "decode": {}}

    def n_repeats(key: str, exponent: float) -> int:
        """``--repeats`` calls, but one for a measurement expected to take over a second."""
        if key in budget.last:
            prev_t, prev_ms = budget.last[key]
            if prev_ms * (t / prev_t) ** exponent > 1000:
                return 1
        return args.repeats

    try:
        q = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "oom allocating q/k/v"
        return row

    def measure(section: str, key: str, fn, exponent: float, warmup: int = 0, repeats: int | None = None):
        bkey = f"{section}/{key}"
        n = n_repeats(bkey, exponent) if repeats is None else repeats
        if not budget.allows(bkey, t, exponent, n + warmup):
            row[section][key] = "skipped (time budget)"
            return row[section][key]
        ms = timed(fn, n, warmup)
        budget.record(bkey, t, ms)
        row[section][key] = ms
        print(f"  {t:>8} {section:<8} {key:<20} {ms if isinstance(ms, str) else f'{ms:10.3f} ms'}", flush=True)
        return ms

    # ------------------------------------------------------------------ prefill
    nc = max(1, (t - cfg.kernel_size) // cfg.kernel_stride + 1)
    chunk = max(1, min(t, args.score_elements // (HEADS * nc)))
    row["score_chunk_queries"] = chunk
    row["score_chunk_queries_triton"] = max(1, min(t, sa._FUSED_SCORE_BUDGET // (KV_HEADS * -(-t // cfg.block_size))))
    run, how = _dense_prefill_fn(q, k, v)
    row["dense_backend"] = how
    measure("prefill", "dense_sdpa", run, 2.0, warmup=1 if t == args.first else 0)

    holder: dict = {}

    def select():
        with scoring("torch"):
            holder["idx"] = select_block_indices(q, k, cfg, chunk_size=chunk)

    measure("prefill", "selection", select, 2.0, warmup=1 if t == args.first else 0)
    if compiled_scores is not None:
        eager = sa._window_block_scores
        sa._window_block_scores = compiled_scores
        try:
            measure("prefill", "selection_compiled", select, 2.0, warmup=1)
        finally:
            sa._window_block_scores = eager
    if not args.no_triton_selection:
        why_not = _triton_scoring_ok()
        if why_not is None:

            def select_triton():
                with scoring("triton"):
                    holder["idx_triton"] = select_block_indices(q, k, cfg)

            ms = measure("prefill", "selection_triton", select_triton, 2.0, warmup=1)
            why_not = _triton_scoring_ok()  # a kernel failure falls back to torch inside: not a valid time
            if why_not is None and "idx_triton" in holder and "idx" in holder:
                a, b = holder["idx"], holder["idx_triton"]
                w = max(a.shape[-1], b.shape[-1])
                a, b = F.pad(a, (0, w - a.shape[-1]), value=-1), F.pad(b, (0, w - b.shape[-1]), value=-1)
                row["selection_triton_same_rows"] = (a == b).all(-1).float().mean().item()
            if why_not is not None and isinstance(ms, float):
                row["prefill"]["selection_triton"] = why_not
            if why_not is None and "idx" not in holder and "idx_triton" in holder:
                holder["idx"] = holder["idx_triton"]  # the torch selection was skipped: time the kernels on this one
                row["kernels_timed_on"] = "selection_triton"
            holder.pop("idx_triton", None)
        else:
            row["prefill"]["selection_triton"] = why_not
    if "idx" not in holder:
        try:
            select()
        except torch.cuda.OutOfMemoryError:
            row["prefill"]["flex"] = "oom (selection)"
    if "idx" in holder:
        idx = holder["idx"]
        row["selected_blocks_max"] = int((idx >= 0).sum(-1).max().item())

        if args.flex_layout == "compact":

            def build():
                holder["mask"] = flex_block_mask(idx, t, t, cfg.block_size, HEADS // KV_HEADS)

            measure("prefill", "flex_mask", build, 1.0)
            if "mask" in holder:
                measure(
                    "prefill",
                    "flex",
                    lambda: sparse_attention_flex(q, k, v, idx, cfg.block_size, block_mask=holder["mask"]),
                    1.0,
                    warmup=1,
                )
        elif args.flex_layout is not None:
            # padded and full masks grow as queries x key blocks: the library runs them in bounded query
            # slices, each building its own mask, so the mask build is inside this time
            row["prefill"]["flex_mask"] = f"included in flex ({args.flex_layout} masks, built per query slice)"
            measure("prefill", "flex", lambda: sa._flex_in_query_chunks(q, k, v, idx, cfg.block_size, None,
                                                                         args.flex_layout), 1.0, warmup=1)
        else:
            row["prefill"]["flex"] = "not run: no BlockMask layout matched the reference on this device"
        holder.pop("mask", None)
        if args.nsa is None:
            measure("prefill", "nsa", lambda: sparse_attention_nsa(q, k, v, idx, cfg.block_size), 1.0, warmup=1)
        else:
            row["prefill"]["nsa"] = f"not run: {args.nsa}"
        del idx
        holder.pop("idx", None)
        torch.cuda.empty_cache()
    if args.chunk:
        # what the model's chunked prefill runs per sparse layer: the dispatch (selection + the kernel the library
        # picks) on chunks of --chunk queries over the growing cache; the first pass at these shapes includes
        # any compilation a first prefill of this length pays, the second does not
        def chunked():
            for s in range(0, t, args.chunk):
                e = min(t, s + args.chunk)
                sa.sparse_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], cfg)

        measure("prefill", "model_chunked_first", chunked, 1.0, repeats=1)
        measure("prefill", "model_chunked", chunked, 1.0, repeats=1)
        row["model_chunked_kernels"] = list(sa.prefill_kernels_used)

    p = row["prefill"]
    sel = [p[x] for x in ("selection", "selection_compiled", "selection_triton") if isinstance(p.get(x), float)]
    att = {}
    if isinstance(p.get("flex"), float):
        att["flex"] = p["flex"] + (p["flex_mask"] if isinstance(p.get("flex_mask"), float) else 0.0)
    if isinstance(p.get("nsa"), float):
        att["nsa"] = p["nsa"]
    if sel and att:
        p["attention_kernel"] = min(att, key=att.get)
        p["sparse_total"] = min(sel) + att[p["attention_kernel"]]
        p["selection_fraction"] = min(sel) / p["sparse_total"]
        if isinstance(p.get("dense_sdpa"), float):
            p["speedup_vs_dense"] = p["dense_sdpa"] / p["sparse_total"]

    # ------------------------------------------------------------------- decode
    q1 = q[:, :, -1:].contiguous()
    q = None  # free the prefill queries before the decode measurements
    torch.cuda.empty_cache()
    measure("decode", "dense_sdpa", _dense_decode_fn(q1, k, v), 1.0, warmup=2)
    kc = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)  # a decode loop keeps these cached
    measure("decode", "compress_keys_full", lambda: compress_keys(k, cfg.kernel_size, cfg.kernel_stride), 1.0, warmup=1)

    def select1():
        with scoring("torch"):
            holder["idx1"] = select_block_indices(q1, k, cfg, compressed_k=kc)

    measure("decode", "selection", select1, 1.0, warmup=2)
    if not args.no_triton_selection:
        why_not = _triton_scoring_ok()
        if why_not is None:

            def select1_triton():
                with scoring("triton"):
                    select_block_indices(q1, k, cfg, compressed_k=kc)

            ms = measure("decode", "selection_triton", select1_triton, 1.0, warmup=2)
            why_not = _triton_scoring_ok()
            if why_not is not None and isinstance(ms, float):
                row["decode"]["selection_triton"] = why_not
        else:
            row["decode"]["selection_triton"] = why_not
    if "idx1" in holder:
        idx1 = holder["idx1"]
        measure("decode", "gather", lambda: sparse_attention_gather(q1, k, v, idx1, cfg.block_size), 1.0, warmup=2)
        if args.nsa is None:
            measure("decode", "nsa", lambda: sparse_attention_nsa(q1, k, v, idx1, cfg.block_size), 1.0, warmup=2)
        if args.flex_layout is not None:
            measure("decode", "flex", lambda: sparse_attention_flex(q1, k, v, idx1, cfg.block_size,
                                                                     layout=args.flex_layout),
                    1.0, warmup=2)
        if dev == "cuda":
            # what a CUDA-graph decode step runs (GraphDecoder): static selection + gather, launches replayed
            position = torch.tensor(t - 1, device=dev)
            step = _graph(lambda: sparse_decode_static(q1, k, v, kc, position, cfg))
            if isinstance(step, str):
                row["decode"]["graph_sparse"] = step
            else:
                ref = sparse_attention_gather(q1, k, v, idx1, cfg.block_size).float()
                row["graph_sparse_rel_err_vs_gather"] = ((step().float() - ref).norm() / ref.norm()).item()
                measure("decode", "graph_sparse", step, 1.0, warmup=2)
            dense = _graph(_dense_decode_fn(q1, k, v))
            if isinstance(dense, str):
                row["decode"]["graph_dense_sdpa"] = dense
            else:
                measure("decode", "graph_dense_sdpa", dense, 1.0, warmup=2)
    d = row["decode"]
    if isinstance(d.get("graph_sparse"), float) and isinstance(d.get("graph_dense_sdpa"), float):
        d["graph_speedup_vs_dense"] = d["graph_dense_sdpa"] / d["graph_sparse"]
    att = [d[x] for x in ("gather", "flex", "nsa") if isinstance(d.get(x), float)]
    sel1 = [d[x] for x in ("selection", "selection_triton") if isinstance(d.get(x), float)]
    if att and sel1:
        d["sparse_total"] = min(sel1) + min(att)
        d["selection_fraction"] = min(sel1) / d["sparse_total"]
        if isinstance(d.get("dense_sdpa"), float):
            d["speedup_vs_dense"] = d["dense_sdpa"] / d["sparse_total"]
    return row


def _print_table(rows: list[dict]) -> None:
    """Summary: dense vs sparse milliseconds, speedup and selection share, prefill and decode."""

    def cell(x, width, fmt="{:.2f}"):
        return (fmt.format(x) if isinstance(x, float) else str(x)[:width]).rjust(width)

    def section(s, width):
        share = 100 * s["selection_fraction"] if "selection_fraction" in s else None
        return (
            f"{cell(s.get('dense_sdpa'), width)} {cell(s.get('sparse_total'), width)} "
            f"{cell(s.get('speedup_vs_dense'), 6)} {cell(share, 5, '{:.0f}')}"
        )

    head = "dense ms, sparse ms, x, sel%"
    print(f"\n{'tokens':>8} | {'prefill: ' + head:>40} | {'decode: ' + head:>40}")
    for row in rows:
        print(f"{row['tokens']:>8} | {section(row.get('prefill', {}), 13)} | {section(row.get('decode', {}), 13)}")


def main(argv: list[str] | None = None) -> int:
    global HEADS, KV_HEADS  # --heads / --kv-heads set the shape every measurement uses
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated context lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (1 above ~1 s)")
    parser.add_argument(
        "--time-budget", type=float, default=450.0, help="seconds; later measurements are skipped past it"
    )
    parser.add_argument(
        "--score-elements", type=int, default=1 << 29, help="fp32 scores per scoring chunk (memory bound)"
    )
    parser.add_argument("--no-compiled-selection", action="store_true", help="skip the torch.compile scoring candidate")
    parser.add_argument(
        "--no-triton-selection", action="store_true", help="skip the fused Triton scoring candidate"
    )
    parser.add_argument("--heads", type=int, default=SALA_HEADS, help="query heads (SALA: 32; Qwen3-8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=SALA_KV_HEADS, help="KV heads (SALA: 2; Qwen3-8B: 8)")
    parser.add_argument("--chunk", type=int, default=16384,
                        help="queries per chunk of the model-like chunked prefill measurement (0: skip it)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sparse_attention.json"),
                        help="results JSON (default runs/sparse_attention.json; the committed H200 figures are "
                             "benchmarks/results/sparse_attention_h200.json)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda; 'cpu' only smoke-tests the script at tiny sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes comma-separated token counts, e.g. 32768,131072; got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes needs at least one context length >= 1 token, got {args.sizes!r}")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a positive multiple of --kv-heads ({args.kv_heads})")
    HEADS, KV_HEADS = args.heads, args.kv_heads
    if args.chunk < 0:
        parser.error(f"--chunk must be >= 0 queries (0 skips the chunked measurement), got {args.chunk}")
    if args.score_elements < 1:
        parser.error(f"--score-elements must be >= 1 (fp32 scores per scoring chunk), got {args.score_elements}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not args.time_budget > 0:
        parser.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    out = Path(args.out)
    try:  # fail now, not after the measurements
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create the folder of --out {args.out}: {exc}")
    existed = out.exists()
    try:  # open for appending (nothing truncated) to learn now, not after the measurements, that it can be written
        with out.open("a"):
            pass
    except OSError as exc:
        parser.error(f"cannot write --out {args.out} ({exc.strerror}); give a writable file path")
    if not existed:
        out.unlink()
    args.first = sizes[0]
    cfg = SparseConfig()
    budget = Budget(args.time_budget)
    compiled_scores = None
    if not args.no_compiled_selection:
        compiled_scores = torch.compile(sa._window_block_scores, dynamic=True)

    git = git_state()
    result = {
        "benchmark": "sparse_attention",
        "issue": 5,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)",
        **_versions(),
        "git_commit": git["commit"],
        "uncommitted_changes": git["uncommitted_changes"],
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "sparse_config": cfg.to_dict(),
        "time_budget_s": args.time_budget,
        "units": "milliseconds (median over --repeats calls, timed with CUDA events)" if args.device == "cuda"
        else "milliseconds (median over --repeats calls, wall clock; CPU smoke test: not a performance figure)",
        "results": [],
    }
    torch.backends.cuda.matmul.allow_tf32 = True
    # the BlockMask layout the library would use here, checked against the reference (torch 2.11 on an H200
    # gave wrong results with the compact one); the CPU smoke test takes the full layout
    if args.device == "cuda":
        args.flex_layout = sa.flex_mask_variant(torch.device("cuda"), torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, cfg)
    else:
        args.flex_layout = "full"
    result["flex_layout"] = args.flex_layout or "none (no layout matched the reference)"
    # fla's NSA selected-block kernel: None when usable here and equal to the reference, else why not
    args.nsa = "CPU smoke test" if args.device != "cuda" else (
        sa.nsa_mismatch(torch.device("cuda"), torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, cfg))
    result["nsa"] = args.nsa or "ok (equals the reference)"
    print(f"{result['gpu']}  torch {result['torch']}  triton {result['triton']}  commit {result['git_commit']}")
    for t in sizes:
        if budget.left() <= 0:
            result["results"].append({"tokens": t, "skipped": "time budget"})
            continue
        result["results"].append(bench_length(t, cfg, args, budget, compiled_scores))
        torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - budget.start, 1)
    if args.device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    _print_table(result["results"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}  ({result['wall_s']} s)")
    if os.environ.get("OUT"):  # the device runner brings back files written under $OUT
        Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
