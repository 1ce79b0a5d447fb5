"""The ``hybridize`` command: ``convert``, ``generate``, ``eval``, ``tune-hype``, ``bench``.

Each subcommand is a plain function; errors the user can fix print one line (``error: ...``) and exit 2;
an interrupted ``convert`` exits 130 and resumes from its last checkpoint when run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

__all__ = ["main"]


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names the kind in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _options_from(cls, args, **overrides):
    """``cls`` (an options dataclass) from the CLI flags of the same names, then ``overrides`` (flags whose
    name or meaning differs, e.g. ``--no-eval`` -> ``eval``)."""
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def _convert(args) -> int:
    from .convert.pipeline import ConvertOptions, run_convert

    opts = _options_from(ConvertOptions, args, eval=not args.no_eval, eval_passkey_trials=args.passkey_trials)
    summary = run_convert(opts)
    report = summary.get("eval")
    if report and report.get("markdown"):
        print()
        print(report["markdown"])
    print(f"\nconverted model: {summary['run_dir']}  (wall time {summary['wall_time_s'] / 60:.1f} min)")
    if report:
        print(f"report and plots: {summary['run_dir']}/eval/ (report.md, perplexity.png, passkey.png)")
    return 0


def _generate(args) -> int:
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from .loading import load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    if args.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **enc,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    errors = []

    def run():
        try:
            model.generate(**kwargs)
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in streamer:
        print(piece, end="", flush=True)
    thread.join()
    print()
    if errors:
        raise errors[0]
    return 0


def _select(args) -> int:
    from .convert.pipeline import reselect, saved_selection

    m = None if args.recompute else saved_selection(args.run, args.selection, args.num_attention)
    if m is not None:
        print(f"saved selection of {args.run} (pass --recompute to compute it again)")
    else:
        m = reselect(args.run, args.selection, args.num_attention)
    if "R" in m:
        print(f"{'layer':>5} {'R':>8} {'C':>8} {'KL':>8} {'score':>8}")
        for i in range(len(m["R"])):
            mark = "  <- attention" if i in m["attention_layers"] else ""
            print(f"{i:>5} {m['R'][i]:8.4f} {m['C'][i]:8.4f} {m['KL'][i]:8.4f} {m['score'][i]:8.3f}{mark}")
        print(f"teacher: R {m['teacher_scores']['R']:.4f}  C {m['teacher_scores']['C']:.4f}")
        print(f"plot: {args.run}/selection/scores.png")
    print(f"{m['method']}: attention layers {m['attention_layers']}")
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from .convert.evaluate import evaluate_models
    from .convert.stage import setup_logging

    setup_logging()
    report = evaluate_models(
        args.model,
        teacher=args.teacher,
        out_dir=Path(args.out) if args.out else None,
        ppl_lengths=tuple(args.ppl_lengths),
        passkey_lengths=tuple(args.passkey_lengths),
        passkey_trials=args.passkey_trials,
        ppl_sequences=args.ppl_sequences,
        seed=args.seed,
        ppl_text=args.ppl_text,
        bucket_edges=tuple(args.buckets) if args.buckets else None,
        passkey_forms=tuple(args.passkey_forms),
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(report["markdown"])
    if args.out:
        print(f"wrote {args.out}: report.json, report.md and plots (perplexity.png, passkey.png"
              + (", buckets.png)" if args.buckets else ")"))
    if args.json:
        print(json.dumps(report["results"], indent=2, default=str))
    return 0


def _tune_hype(args) -> int:
    from pathlib import Path

    import torch

    from .assets import atomic_write_bytes
    from .convert.hype import DEFAULT_GRID, long_sequences, parse_grid, tune_hype
    from .convert.pipeline import final_model_dir, is_run_dir
    from .data import document_separator_id, load_default_corpus, load_texts, tokenize_documents
    from .loading import is_hybrid_checkpoint, load_model
    from .models.released import released_format

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if is_run_dir(model_dir):
        model_dir = final_model_dir(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is not a checkpoint directory (no config.json): tune-hype writes a into it")
    fmt = released_format(model_dir)
    if fmt == "minicpm_sala":
        raise ValueError("MiniCPM-SALA checkpoints have no HyPE scaling field; tune a hybridize or HypeNet checkpoint")
    if fmt is None and not is_hybrid_checkpoint(model_dir):
        raise ValueError(f"{model_dir} is not a hybrid checkpoint (model_type 'hybridize' or 'hypenet')")
    grid = parse_grid(args.grid) if args.grid else list(DEFAULT_GRID)
    model, tokenizer = load_model(str(model_dir))
    docs = load_texts(args.data) if args.data else load_default_corpus().heldout
    eos_id = document_separator_id(tokenizer)
    seqs, glued = long_sequences(tokenize_documents(docs, tokenizer), args.seq_len, args.sequences, eos_id)
    source = "--data" if args.data else "the bundled held-out split"
    print(f"held-out text ({source}): {len(seqs) - glued} documents of >= {args.seq_len} tokens"
          + (f", {glued} glued from shorter documents joined by EOS (id {eos_id})" if glued else ", none glued"))
    result = tune_hype(model, seqs, grid, batch_size=args.batch_size, progress=not args.no_progress)

    def label(a):
        return "none" if a is None else f"{a:g}"

    print(f"\n{'a':>8}  {'loss':>10}  {'ppl':>10}")
    for row in result["losses"]:
        mark = "  <- best" if row["hype_base"] == result["best"] else ""
        print(f"{label(row['hype_base']):>8}  {row['loss']:>10.6f}  {row['perplexity']:>10.4f}{mark}")
    best = result["best"]
    config_path = model_dir / "config.json"
    cfg = json.loads(config_path.read_text())
    if fmt == "hypenet":
        cfg["attn_logits_scaling"] = None if best is None else f"hype {best:g}"
    else:
        cfg["hype_base"] = best
    sweep = {**result, "model": str(model_dir), "grid": grid, "glued_sequences": glued, "data": args.data or "bundled held-out"}
    atomic_write_bytes(model_dir / "hype_sweep.json", (json.dumps(sweep, indent=2) + "\n").encode())
    atomic_write_bytes(config_path, (json.dumps(cfg, indent=2) + "\n").encode())
    print(f"\nchosen a = {label(best)} (was {label(result['previous'])}); written to {config_path}, sweep in "
          f"{model_dir / 'hype_sweep.json'}")
    return 0


def _bench(args) -> int:
    from .bench import BenchOptions, command_line, run_bench, run_bench_parallel

    opts = _options_from(
        BenchOptions,
        args,
        time_budget=args.time_budget if args.time_budget > 0 else None,
        graph=not args.no_graph,
        merge=not args.fresh,
        commit=args.commit or os.environ.get("HYBRIDIZE_GIT_COMMIT"),
        command=command_line(getattr(args, "argv", None)),
        warmup=not args.no_warmup,
    )
    summary = run_bench_parallel(opts, args.gpus) if args.gpus > 1 else run_bench(opts)
    print()
    print(summary["markdown"])
    print("wrote " + ", ".join(summary["files"]))
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for on/off flags (a store_false flag's "default: True" reads as if the
    flag were on) and options whose help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .convert.options import FSDP_PARAM_DTYPES, FSDP_UNITS, SELECTION_METHODS, ConvertOptions

    d = ConvertOptions()
    p = argparse.ArgumentParser(prog="hybridize", description="Turn a pretrained Transformer into a hybrid linear-attention model.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="run the HALO pipeline (stage 0-2, optional 3) and compare with the teacher",
                       formatter_class=_DefaultsHelp)
    c.add_argument("--teacher", default=None, help="local Llama/Qwen3 directory or hub id; default: embedded SmolLM2-135M-Instruct")
    c.add_argument("--data", nargs="+", default=None, help="training text: .txt/.jsonl/.parquet files or an HF dataset name; default: bundled corpus")
    c.add_argument("--out", default=d.out, help="run directory (rerun the same command to resume)")
    c.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help="training sequence length (tokens), stages 1-2")
    c.add_argument("--stage1-tokens", type=_positive_int, default=d.stage1_tokens, help="stage 1 (alignment) token budget")
    c.add_argument("--stage1-batch", type=_positive_int, default=d.stage1_batch, help="stage 1 sequences per optimizer step (global, over all processes)")
    c.add_argument("--stage1-lr", type=_positive_float, default=d.stage1_lr, help="stage 1 peak learning rate")
    c.add_argument("--stage2-tokens", type=_positive_int, default=d.stage2_tokens, help="stage 2 (KL distillation) token budget")
    c.add_argument("--stage2-batch", type=_positive_int, default=d.stage2_batch, help="stage 2 sequences per optimizer step (global)")
    c.add_argument("--stage2-lr", type=_positive_float, default=d.stage2_lr, help="stage 2 peak learning rate")
    c.add_argument("--stage3", action="store_true", help="also run stage 3 (long-context fine-tune)")
    c.add_argument("--stage3-tokens", type=_positive_int, default=d.stage3_tokens, help="stage 3 (long-context next-token) token budget")
    c.add_argument("--stage3-seq-len", type=_positive_int, default=d.stage3_seq_len, help="stage 3 sequence length (tokens; the paper uses 16384)")
    c.add_argument("--stage3-batch", type=_positive_int, default=d.stage3_batch, help="stage 3 sequences per optimizer step (global)")
    c.add_argument("--stage3-lr", type=_positive_float, default=d.stage3_lr, help="stage 3 learning rate (constant)")
    c.add_argument("--num-attention", type=int, default=None, help="attention layers to keep; default (None): floor(L/4) of the teacher's L layers")
    c.add_argument("--selection", choices=SELECTION_METHODS, default=d.selection, help="layer selection method")
    c.add_argument("--layer-types", default=None, help="fixed schedule, one letter a layer (A attention, L lightning, S sparse; under --recipe sala "
                        "A means sparse); skips selection (--num-attention, if given, must match its count)")
    c.add_argument("--recall-tasks", nargs="+", default=None, help="lm-eval tasks for the recall score R (e.g. squad_completion fda swde); needs lm-eval and network")
    c.add_argument("--general-tasks", nargs="+", default=None, help="lm-eval tasks for the general score C (e.g. hellaswag arc_easy arc_challenge)")
    c.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    c.add_argument("--recipe", choices=["hypenet", "sala"], default=d.recipe,
                   help="hypenet: kept layers are NoPE+HyPE attention; sala: kept layers are InfLLM-V2 sparse attention, first and last always kept")
    c.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                   help="gradient accumulation: micro-batches per optimizer step in each process (each stage's batch per "
                        "process must split evenly); same result, less activation memory")
    c.add_argument("--no-fsdp-reshard", dest="fsdp_reshard_after_forward", action="store_false",
                   help="under torchrun (FSDP2): keep each layer's gathered weights from its forward to its backward "
                        "(one all-gather fewer per layer and step; more memory); default: free them after the forward")
    c.add_argument("--fsdp-param-dtype", choices=FSDP_PARAM_DTYPES, default=d.fsdp_param_dtype,
                   help="under torchrun (FSDP2) on GPUs, stages 1-3: the dtype the weights are all-gathered in; bf16 moves "
                        "half the bytes (gradients still reduced in fp32, master weights fp32) but norms and gates then see "
                        "bf16 weights, so results differ slightly from one process; refused on CPU processes (their "
                        "training is fp32); default fp32 (the forward of a one-process run)")
    c.add_argument("--fsdp-prefetch", type=_nonnegative_int, default=d.fsdp_prefetch,
                   help="under torchrun (FSDP2), stages 2-3, with --fsdp-unit layer: once a decoder layer's all-gather is "
                        "done, start those of the next N layers (the N before it in the backward) instead of when the CPU "
                        "reaches them; holds N more layers' gathered weights; same results; default 0: FSDP2's own overlap")
    c.add_argument("--fsdp-unit", choices=FSDP_UNITS, default=d.fsdp_unit,
                   help="under torchrun (FSDP2), stages 2-3: layer = one unit per decoder layer (a rank holds one layer's whole weights "
                        "at a time; for large teachers); model = one unit for all trained weights (gathered at once, "
                        "as much memory as plain data parallelism; no per-layer hooks: less CPU time per step, for "
                        "small teachers)")
    c.add_argument("--profile-steps", type=_nonnegative_int, default=d.profile_steps,
                   help="record this many optimizer steps of each training stage with torch.profiler (after the first 3): "
                        "<stage>/profile_rank<r>.txt (ops by device time), .json (Chrome/Perfetto trace) and the "
                        "manifest's profile (wall vs kernel vs NCCL seconds per step); default 0 (off)")
    c.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every,
                   help="optimizer steps between resumable checkpoints")
    c.add_argument("--collapse-threshold", type=float, default=d.collapse_threshold,
                   help="keep as attention the layers whose replacement alone drops C below this fraction of the teacher's (0: pure HALO ranking)")
    c.add_argument("--passkey-trials", type=_positive_int, default=d.eval_passkey_trials, help="pass-key trials per length in the final evaluation")
    c.add_argument("--no-eval", action="store_true", help="skip the teacher-vs-hybrid evaluation")
    c.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and the new weights")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--device", default=None, help="cpu or cuda; default (None): cuda if available; under torchrun one GPU per process")
    c.set_defaults(func=_convert)

    s = sub.add_parser("select", help="layer selection on a run with stage 1 done: per-layer R, C, KL, score and a plot "
                                      "(a saved selection with the same options is shown, not recomputed)")
    s.add_argument("--run", required=True, help="run directory of `hybridize convert`")
    s.add_argument("--selection", choices=SELECTION_METHODS, default=None, help="method (default: the run's)")
    s.add_argument("--num-attention", type=int, default=None, help="attention layers to keep (default: the run's)")
    s.add_argument("--recompute", action="store_true",
                   help="compute the selection again even when the saved one has the same method and attention count")
    s.set_defaults(func=_select)

    g = sub.add_parser("generate", help="stream text from a converted checkpoint or a teacher")
    g.add_argument("--model", required=True, help="converted model dir, run dir, teacher dir, hub id, or 'smollm2'")
    g.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user message)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most (stops early at end-of-text)")
    g.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=_probability, default=0.95, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    g.set_defaults(func=_generate)

    from .convert.options import PASSKEY_FORMS, PPL_TEXTS

    e = sub.add_parser("eval", help="held-out perplexity, passkey retrieval, decode speed and cache size",
                       formatter_class=_DefaultsHelp)
    e.add_argument("--model", required=True, help="converted model dir or run dir (or a teacher)")
    e.add_argument("--teacher", default=None, help="also evaluate this teacher side by side ('smollm2' for the embedded one)")
    e.add_argument("--out", default=None,
                   help="write report.json, report.md, perplexity.png, passkey.png (and buckets.png) here; checked writable first")
    e.add_argument("--ppl-lengths", type=_positive_int, nargs="+", default=[512, 2048], help="perplexity lengths (tokens)")
    e.add_argument("--ppl-text", choices=PPL_TEXTS, default="heldout",
                   help="heldout: held-out documents of at least the length (packed held-out text where too few); "
                        "essay: the held-out essays concatenated in fixed order, EOS between, cut to each length")
    e.add_argument("--ppl-sequences", type=_positive_int, default=4, help="sequences per perplexity length (fewer where the text runs out)")
    e.add_argument("--buckets", type=_nonnegative_int, nargs="+", default=None, metavar="POS",
                   help="increasing token positions, e.g. 0 2048 8192 16384 32768: mean loss per position bucket at every perplexity length")
    e.add_argument("--passkey-lengths", type=_positive_int, nargs="+", default=[1024, 2048], help="pass-key context lengths (tokens)")
    e.add_argument("--passkey-trials", type=_positive_int, default=10, help="pass-key trials per length and form")
    e.add_argument("--passkey-forms", choices=PASSKEY_FORMS, nargs="+", default=["repeated"],
                   help="filler: repeated sentences (keys passkey_1k, ...) and/or held-out essay text (passkey_essay_1k, ...)")
    e.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights")
    e.add_argument("--seed", type=int, default=0, help="pass-key seed (keys, depths)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    e.set_defaults(func=_eval)

    h = sub.add_parser("tune-hype", help="pick HyPE's a by held-out loss on long documents and write it to the config",
                       formatter_class=_DefaultsHelp)
    h.add_argument("--model", required=True, help="hybrid checkpoint dir (hybridize or HypeNet) or run dir; its config.json is updated")
    h.add_argument("--seq-len", type=int, default=2048, help="tokens per held-out sequence")
    h.add_argument("--sequences", type=int, default=4, help="held-out sequences to score")
    h.add_argument("--grid", nargs="+", default=None,
                   help="candidates for a (numbers > 1, 'none' = no scaling); default: 100 200 300 500 700 1000 2000 5000 none")
    h.add_argument("--data", nargs="+", default=None, help="held-out text (.txt/.jsonl/.parquet); default: bundled held-out split")
    h.add_argument("--batch-size", type=int, default=1, help="held-out sequences scored together")
    h.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    h.add_argument("--no-progress", action="store_true", help="no progress bars")
    h.set_defaults(func=_tune_hype)

    from .bench import DEFAULT_LENGTHS, DEFAULT_OUT, preset_names

    b = sub.add_parser("bench", help="long-context speed and memory: TTFT, decode ms/token, peak memory, roofline (random weights)",
                       formatter_class=_DefaultsHelp)
    b.add_argument("--presets", nargs="+", required=True, choices=preset_names(), metavar="PRESET",
                   help=f"models to build with random weights: {', '.join(preset_names())}")
    b.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="context lengths (tokens; a repeated length is measured once)")
    b.add_argument("--decode-tokens", type=int, default=64, help="timed decode steps per measurement")
    b.add_argument("--out", default=DEFAULT_OUT, help="directory for results.json, results.md and the plots (merged with "
                                                      "earlier runs there); checked writable before any model is built")
    b.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    b.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    b.add_argument("--chunk-size", type=int, default=16384, help="prefill chunk (tokens) of the hybridize presets")
    b.add_argument("--time-budget", type=_nonnegative_float, default=300.0,
                   help="skip a measurement predicted (from shorter lengths) to take longer than this many seconds; 0 = no limit")
    b.add_argument("--total-budget", type=_positive_float, default=None, help="skip measurements predicted to end after this many seconds of the run")
    b.add_argument("--decode-attention", default="auto", choices=["auto", "flex", "split"],
                   help="decode attention over the static cache (auto: flex on CUDA if it agrees with split on a check, else split)")
    b.add_argument("--prefill-attention", default=None, choices=["sdpa", "split", "flex"],
                   help="attention of each prefill chunk over the cache: sdpa (one lower-right causal SDPA call), "
                        "split (prefix + own chunk on SDPA's kernels, merged by log-sum-exp) or flex (FlexAttention, "
                        "compiled); default: $HYBRIDIZE_PREFILL_ATTENTION, else split on CUDA and sdpa elsewhere. On an "
                        "H200 at 256K: split 0.97 s, sdpa 1.69 s, flex 2.73 s per layer (split equals sdpa in the GPU tests). "
                        "Rows record the choice (use one --out per choice: runs merge by preset/length)")
    b.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step before capturing it (fuses small kernels; falls back if it fails)")
    b.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each preset")
    b.add_argument("--profile", action="store_true",
                   help="profile 3 extra decode steps per measurement: kernels per step and the top kernels, in the JSON")
    b.add_argument("--fresh", action="store_true", help="start a new results.json instead of merging with the one in --out")
    b.add_argument("--commit", default=None, help="git commit to record when the tree has no .git (or set HYBRIDIZE_GIT_COMMIT)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    b.add_argument("--gpus", type=_positive_int, default=1,
                   help="spread the presets over this many GPUs of the host, one process each, merged into one "
                        "results.json (each preset measured whole on one GPU; budgets apply per process)")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hybridize`` console script; returns the exit status."""
    from .errors import HybridizeError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (HybridizeError, FileNotFoundError, ValueError) as e:
        if os.environ.get("HYBRIDIZE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(set HYBRIDIZE_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
