"""The HALO conversion pipeline end to end (SPEC 2): stage 0/1 -> layer selection -> stage 2 -> (stage 3)
-> evaluation of teacher vs hybrid. Every stage is resumable and writes its own directory under the run
directory (see :mod:`hybridize.convert.stage`):

    <run>/stage0/  stage1/  selection/  stage2/model/  [stage3/model/]  eval/  convert.log
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..models import layer_types_to_str
from .options import RECIPES, ConvertOptions, check_fsdp_options
from .align import run_stage1
from .distill import MODEL_DIR, run_stage2, run_stage3
from .stage import StageDir, atomic_write_text, setup_logging
from .trainer import TrainSettings, check_batch_split, plan_steps

__all__ = ["ConvertOptions", "check_convert_options", "given_layer_types", "run_convert", "run_selection", "reselect", "saved_selection",
           "final_model_dir", "is_run_dir", "load_run_data", "split_heldout"]

log = logging.getLogger("hybridize")

#: the stage directories a run directory of ``hybridize convert`` may hold
RUN_STAGES = ("stage0", "stage1", "selection", "stage2", "stage3")


def is_run_dir(path: str | Path) -> bool:
    """True for a run directory of ``hybridize convert``: a directory with a stage directory and no
    ``config.json`` of its own (a checkpoint directory is never taken for a run)."""
    path = Path(path)
    return path.is_dir() and not (path / "config.json").exists() and any((path / n).is_dir() for n in RUN_STAGES)


def final_model_dir(run_dir: Path) -> Path:
    """The last complete model of a run: stage 3's if it ran, else stage 2's.

    Raises:
        FileNotFoundError: the run has no finished model yet (says to resume the run).
    """
    run_dir = Path(run_dir)
    for name in ("stage3", "stage2"):
        if StageDir(run_dir, name).is_complete():
            return run_dir / name / MODEL_DIR
    done = [n for n in RUN_STAGES if StageDir(run_dir, n).is_complete()]
    raise FileNotFoundError(
        f"{run_dir} is a `hybridize convert` run with no finished model yet (no complete stage 2 or 3; "
        f"complete: {', '.join(done) or 'none'}): resume it with `hybridize convert --out {run_dir}` and the "
        "same options"
    )


def _training_stages(opts: ConvertOptions) -> tuple[str, ...]:
    return ("stage1", "stage2", "stage3") if opts.stage3 else ("stage1", "stage2")


def _settings(opts: ConvertOptions, stage: str) -> TrainSettings:
    common = {"checkpoint_every": opts.checkpoint_every, "grad_accum": opts.grad_accum,
              "reshard_after_forward": opts.fsdp_reshard_after_forward, "fsdp_param_dtype": opts.fsdp_param_dtype,
              "fsdp_prefetch": opts.fsdp_prefetch, "fsdp_unit": opts.fsdp_unit, "profile_steps": opts.profile_steps}
    if stage == "stage1":
        return TrainSettings(opts.stage1_tokens, opts.seq_len, opts.stage1_batch, opts.stage1_lr, opts.stage1_lr_final, **common)
    if stage == "stage2":
        return TrainSettings(opts.stage2_tokens, opts.seq_len, opts.stage2_batch, opts.stage2_lr, opts.stage2_lr_final, **common)
    return TrainSettings(opts.stage3_tokens, opts.stage3_seq_len, opts.stage3_batch, opts.stage3_lr, opts.stage3_lr, **common)


def given_layer_types(opts: ConvertOptions) -> list[str] | None:
    """The schedule of ``--layer-types`` as mixer types (None when not given), with the recipe applied:
    under ``--recipe sala`` the kept layers are sparse attention, so the letter ``A`` means sparse there
    (``S`` is accepted too); under ``hypenet`` the letters are taken as written.

    Raises:
        ValueError: an empty schedule or a letter other than A/L/S.
    """
    from ..models import layer_types_from_str

    if opts.layer_types is None:
        return None
    if not opts.layer_types:
        raise ValueError("--layer-types is empty: give one letter a layer (A attention, L lightning, S sparse)")
    try:
        types = layer_types_from_str(opts.layer_types)
    except ValueError as exc:
        raise ValueError(f"--layer-types: {exc}") from None
    if opts.recipe == "sala":
        types = ["sparse" if t == "attention" else t for t in types]
    return types


def check_convert_options(opts: ConvertOptions, num_layers: int | None = None) -> None:
    """Validate the options of a conversion before anything slow runs or any output is written: learning
    rates, recipe, sequence lengths (>= 2 tokens), ``--layer-types`` letters and its agreement with
    ``--num-attention``, ``--threads`` / ``--device``, and, given the teacher's ``num_layers``, the
    ``--layer-types`` length and ``--num-attention`` range. Token budgets are checked by
    :func:`~hybridize.convert.trainer.plan_steps`.

    Raises:
        ValueError: names the flag, the value and what is accepted.
    """
    import math

    for flag, lr in (("--stage1-lr", opts.stage1_lr), ("--stage2-lr", opts.stage2_lr), ("--stage3-lr", opts.stage3_lr)):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{flag} must be a finite number > 0 (a learning rate such as 1e-3), got {lr!r}")
    if opts.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {opts.recipe!r}; choose one of {RECIPES}")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {opts.threads}")
    if opts.device is not None and opts.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {opts.device!r}")
    if opts.device is not None and opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but this torch has no CUDA device; omit --device or use cpu")
    for flag, n in (("--seq-len", opts.seq_len), ("--stage3-seq-len", opts.stage3_seq_len)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"{flag} must be an integer >= 2 (tokens; a 1-token sequence has no next token to "
                             f"train on), got {n!r}")
    from .distributed import env_world_size

    world = env_world_size()
    check_fsdp_options(opts.fsdp_param_dtype, opts.fsdp_prefetch, opts.fsdp_unit)
    on_cuda = opts.device.startswith("cuda") if opts.device is not None else torch.cuda.is_available()
    if opts.fsdp_param_dtype != "fp32" and world > 1 and not on_cuda:
        raise ValueError(f"--fsdp-param-dtype {opts.fsdp_param_dtype} needs CUDA devices (training computes in bf16 "
                         "only under CUDA autocast; on CPU it is fp32 and bf16 weights cannot meet fp32 activations): "
                         "drop the flag or train on GPUs")
    for stage in _training_stages(opts):
        check_batch_split(_settings(opts, stage), world, stage)  # also checks --grad-accum itself
    layer_types = given_layer_types(opts)
    if layer_types is not None and opts.num_attention is not None:
        kept = sum(t != "lightning" for t in layer_types)
        if kept != opts.num_attention:
            raise ValueError(
                f"--num-attention {opts.num_attention} disagrees with --layer-types {opts.layer_types!r}, which keeps "
                f"{kept} attention layers: --layer-types fixes the schedule, so drop --num-attention (or make them agree)"
            )
    if num_layers is None:
        return
    if layer_types is not None and len(layer_types) != num_layers:
        raise ValueError(
            f"--layer-types {opts.layer_types!r} has {len(layer_types)} letters but the teacher has {num_layers} "
            f"layers: give exactly {num_layers} letters (A attention, L lightning, S sparse)"
        )
    if opts.recipe == "sala" and opts.num_attention is not None and layer_types is None and opts.num_attention < 2:
        raise ValueError(
            f"--recipe sala keeps the first and the last layer as sparse attention, so --num-attention must be >= 2, "
            f"got {opts.num_attention} (or give the schedule itself with --layer-types)"
        )
    if opts.num_attention is not None and not 0 <= opts.num_attention <= num_layers:
        raise ValueError(
            f"--num-attention must be in [0, {num_layers}] (the teacher has {num_layers} layers), got {opts.num_attention}"
        )


def run_selection(teacher, tokenizer, run_dir: Path, opts: ConvertOptions, heldout_general: torch.Tensor, inputs: dict) -> dict:
    """Layer selection stage: sweep R and C over ``M(i)``, pick the attention layers; writes ``selection/``
    (``scores.json``, ``scores.png``, manifest). A fixed ``opts.layer_types`` skips the sweep."""
    from safetensors.torch import load_file

    from ..data import load_qa
    from .align import MIXERS_FILE, build_lightning_students, load_mixers
    from .distributed import context
    from .select import (
        build_scoring_data,
        collapsed_layers,
        halo_scores,
        layer_sweep,
        layer_sweep_with,
        plot_scores,
        select_layers,
    )
    from .transfer import build_student

    stage = StageDir(run_dir, "selection")
    if stage.is_complete():
        return stage.manifest()
    n = teacher.config.num_hidden_layers
    check_convert_options(opts, n)
    stage.begin()
    k = opts.num_attention if opts.num_attention is not None else n // 4
    # SALA (MiniCPM-SALA report): the first and last layers always stay (sparse) attention; HALO ranks the rest
    fixed = [0, n - 1] if opts.recipe == "sala" else []
    if opts.recipe == "sala":
        k = max(k, 2)
    if opts.layer_types:
        layer_types = given_layer_types(opts)
        return stage.complete(inputs, 0, None, {"method": "given", "layer_types": layer_types})
    sweep, scores = None, None
    if opts.selection in ("halo", "recall-drop", "kl-guided"):
        mixers, _ = build_lightning_students(teacher)
        load_mixers(mixers, load_file(str(Path(run_dir) / "stage1" / MIXERS_FILE)))
        exact, _ = build_student(teacher, ["attention"] * n, attention_rope=True)
        if opts.recall_tasks or opts.general_tasks:
            from ..eval.lm_eval_adapter import lm_eval_scorer

            if not (opts.recall_tasks and opts.general_tasks) or opts.selection == "kl-guided":
                raise ValueError("lm-eval selection needs both --recall-tasks and --general-tasks, and method halo or recall-drop")
            scorers = {
                "R": lm_eval_scorer(tokenizer, opts.recall_tasks, opts.lm_eval_limit),
                "C": lm_eval_scorer(tokenizer, opts.general_tasks, opts.lm_eval_limit),
            }
            sweep = {**layer_sweep_with(exact, mixers, scorers), "KL": [float("nan")] * n}
        else:
            data = build_scoring_data(tokenizer, load_qa("squad"), heldout_general, num_recall=opts.recall_examples)
            sweep = layer_sweep(exact, mixers, data)
        scores = halo_scores(sweep["R"], sweep["C"])
        del exact, mixers
    ranking = sweep and (sweep["KL"] if opts.selection == "kl-guided" else sweep["R"])
    keep = collapsed_layers(sweep["C"], sweep["teacher"]["C"], opts.collapse_threshold) if sweep else []
    if keep:
        log.info("layers %s collapse the general score when replaced alone: kept as attention", keep)
    chosen = select_layers(n, k, opts.selection, ranking, sweep and sweep["C"], always_attention=fixed + keep)
    kept_type = "sparse" if opts.recipe == "sala" else "attention"
    layer_types = [kept_type if i in chosen else "lightning" for i in range(n)]
    extra = {
        "method": opts.selection,
        "num_attention": k,
        "attention_layers": chosen,
        "collapse_kept": keep,
        "recipe": opts.recipe,
        "layer_types": layer_types,
    }
    if sweep is not None:
        extra.update({"teacher_scores": sweep["teacher"], "R": sweep["R"], "C": sweep["C"], "KL": sweep["KL"], "score": scores})
        if context().is_main:
            atomic_write_text(stage.path / "scores.json", json.dumps(extra, indent=2))
            plot_scores(sweep, scores, chosen, stage.path / "scores.png")
        for i in range(n):
            log.info(
                "layer %2d  R %.4f  C %.4f  KL %.4f  score %7.3f %s",
                i, sweep["R"][i], sweep["C"][i], sweep["KL"][i], scores[i], "<- attention" if i in chosen else "",
            )
    log.info("selection (%s): attention layers %s -> %s", opts.selection, chosen, layer_types_to_str(layer_types))
    return stage.complete(inputs, 0, None, extra)


def split_heldout(token_docs: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Split user documents into (train, held-out): every 10th document is held out (at least one); a
    single document is split into its first 90% and last 10% of tokens. The two never overlap."""
    if len(token_docs) >= 10:
        held = [d for i, d in enumerate(token_docs) if i % 10 == 9]
        return [d for i, d in enumerate(token_docs) if i % 10 != 9], held
    if len(token_docs) >= 2:
        return token_docs[:-1], token_docs[-1:]
    doc = token_docs[0] if token_docs else []
    cut = int(len(doc) * 0.9)
    return [doc[:cut]], [doc[cut:]]


def load_run_data(opts: ConvertOptions, tokenizer) -> tuple[list[list[int]], list[list[int]], object]:
    """Tokenised ``(train, held-out, description)`` documents of a run: the user's ``--data`` split by
    :func:`split_heldout`, or the bundled corpus with its fixed held-out split.

    Raises:
        hybridize.errors.DataError: missing or empty files, no text.
    """
    from ..data import load_default_corpus, load_texts, tokenize_documents

    if opts.data:
        train_tok, heldout_tok = split_heldout(tokenize_documents(load_texts(opts.data), tokenizer))
        return train_tok, heldout_tok, {"files": list(opts.data), "heldout": "every 10th document (or the last 10% of tokens)"}
    corpus = load_default_corpus()
    desc = "default corpus (Wikipedia sample, Lee news, Paul Graham essays; held-out split never trained on)"
    return tokenize_documents(corpus.train, tokenizer, cache=True), tokenize_documents(corpus.heldout, tokenizer, cache=True), desc


#: the options a finished stage depends on: a rerun of the same run directory must give the same values (the
#: stage would be reused, silently ignoring the new ones). Selection is left out: ``hybridize select`` redoes it.
_STAGE_OPTIONS = {
    "stage0": ("teacher", "data", "seq_len"),
    "stage1": ("teacher", "data", "seq_len", "stage1_tokens", "stage1_batch", "stage1_lr", "stage1_lr_final", "seed"),
    "stage2": ("recipe", "layer_types", "num_attention", "selection", "stage2_tokens", "stage2_batch", "stage2_lr",
               "stage2_lr_final"),
    "stage3": ("stage3_tokens", "stage3_seq_len", "stage3_batch", "stage3_lr"),
}


def _check_run_dir(run_dir: Path, opts: ConvertOptions) -> None:
    """Refuse an output path that cannot hold a run, or a run directory whose finished stages were made with
    other settings (:data:`_STAGE_OPTIONS`).

    Raises:
        ValueError: names the path or the differing setting, and the fix (another ``--out``).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a directory: choose another --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {parent} (permission denied): choose a writable --out")
    if run_dir.is_dir() and not is_run_dir(run_dir):
        # a run directory in the making holds only these; anything else is someone else's folder
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in (".lock", "convert.log", "eval")
                         and not p.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"--out {run_dir} already holds files that are not a `hybridize convert` run ({shown}): "
                             "choose a new or empty directory")
    for name, keys in _STAGE_OPTIONS.items():
        m = StageDir(run_dir, name).manifest()
        if m is None:
            continue
        before = m.get("inputs", {}).get("options", {})
        for key in keys:
            now = json.loads(json.dumps(getattr(opts, key)))  # tuples as lists, as the manifest holds them
            if key in before and before[key] != now:
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"{run_dir} holds a finished {name} made with {flag} {before[key]!r}, not {now!r}: resume the "
                    f"run with the same settings, remove {run_dir / name} and the stages after it to redo them "
                    "with the new ones, or choose another --out for a new run"
                )


@contextmanager
def _run_lock(run_dir: Path, enabled: bool):
    """An exclusive lock on ``<run>/.lock`` so two ``convert`` processes never write one run directory."""
    if not enabled:
        yield
        return
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `hybridize convert` is writing {run_dir}; wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_convert(opts: ConvertOptions) -> dict:
    """Run the whole pipeline; returns a summary dict (stages' manifests and the evaluation report).

    Raises:
        hybridize.errors.HybridizeError subclasses for bad input (teacher, data, budgets), before any
        stage output is written where possible.
    """
    from ..data import document_separator_id
    from .distributed import init_distributed
    from .teachers import load_teacher, teacher_num_layers

    t_start = time.time()
    ctx = init_distributed(opts.device)
    run_dir = Path(opts.out)
    # validate options, budgets and the output path before any heavy work or output
    check_convert_options(opts, teacher_num_layers(opts.teacher))
    if opts.data:  # a missing or unsupported --data file is named before the teacher loads (seconds to minutes)
        from ..data.corpora import check_text_specs

        check_text_specs(opts.data)
    for name in _training_stages(opts):
        plan_steps(_settings(opts, name), None, name)
    _check_run_dir(run_dir, opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    teacher, tokenizer = load_teacher(opts.teacher, device=str(ctx.device))
    check_convert_options(opts, teacher.config.num_hidden_layers)  # a hub id's layer count is known only now
    eos = document_separator_id(tokenizer)
    train_tok, heldout_tok, data_desc = load_run_data(opts, tokenizer)
    user_data = bool(opts.data)
    train_seqs = _pack(train_tok, opts.seq_len, eos, "--seq-len", user_data)
    long_seqs = _pack(train_tok, opts.stage3_seq_len, eos, "--stage3-seq-len", user_data) if opts.stage3 else None
    for name, seqs in (("stage1", train_seqs), ("stage2", train_seqs), ("stage3", long_seqs)):
        if seqs is not None:
            plan_steps(_settings(opts, name), seqs.shape[0], name)
    heldout_general = _pack(heldout_tok, opts.seq_len, eos, "--seq-len", user_data, heldout=True, max_sequences=8)
    with _run_lock(run_dir, ctx.is_main):
        return _run_stages(opts, ctx, run_dir, teacher, tokenizer, eos, heldout_tok, train_seqs, long_seqs,
                           heldout_general, data_desc, t_start)


def _pack(docs, seq_len: int, eos: int, seq_flag: str, user_data: bool, heldout: bool = False,
          max_sequences: int | None = None) -> torch.Tensor:
    """:func:`~hybridize.data.pack_sequences` of the training (or ``heldout``) text whose error says which text
    is too short, where it comes from, and the fixes (more ``--data``, a lower ``seq_flag``)."""
    from ..data import pack_sequences
    from ..errors import DataError

    try:
        return pack_sequences(docs, seq_len, eos, max_sequences=max_sequences)
    except DataError:
        total = sum(len(d) + 1 for d in docs if len(d) > 0)
        if heldout:
            what = "held-out text"
            where = ("every 10th document of --data; the last document when there are fewer than 10, or the last "
                     "10% of a single document" if user_data else "the held-out split of the bundled corpus")
            use = "layer selection and evaluation score on it"
        else:
            what = "training text"
            where = "the documents of --data that are not held out" if user_data else "the bundled corpus"
            use = "the stages train on it"
        raise DataError(
            f"the {what} ({where}) has only {total} tokens (separators included), fewer than one sequence of "
            f"{seq_flag} {seq_len} ({use}): give more text with --data or lower {seq_flag}"
        ) from None


def _run_stages(opts, ctx, run_dir, teacher, tokenizer, eos, heldout_tok, train_seqs, long_seqs, heldout_general, data_desc,
                t_start) -> dict:
    from .distributed import barrier

    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "convert.log" if ctx.is_main else None, logging.INFO if ctx.is_main else logging.WARNING)
    log.info("run directory %s; teacher %s", run_dir, opts.teacher or "smollm2 (embedded)")
    log.info("training data: %d sequences of %d tokens", train_seqs.shape[0], opts.seq_len)
    if opts.layer_types and opts.recipe == "sala" and "A" in opts.layer_types:
        log.info("--recipe sala: the A layers of --layer-types %s become InfLLM-V2 sparse attention (schedule %s)",
                 opts.layer_types, layer_types_to_str(given_layer_types(opts)))
    inputs = {"teacher": opts.teacher or "smollm2-135m-instruct (embedded)", "data": data_desc, "options": asdict(opts)}
    reshard = opts.fsdp_reshard_after_forward and opts.fsdp_unit == "layer"
    fsdp = (f"unit {opts.fsdp_unit} (stage 1: one per mixer), prefetch {opts.fsdp_prefetch}, all-gathers in "
            f"{opts.fsdp_param_dtype}, stages 2-3 {'free' if reshard else 'keep'} the gathered weights between forward "
            "and backward")
    if ctx.enabled:
        inputs["world_size"] = ctx.world_size
        import torch.distributed as dist

        log.info("FSDP2: %d processes, backend %s; %s", ctx.world_size, dist.get_backend(), fsdp)
    elif (opts.fsdp_unit, opts.fsdp_prefetch, opts.fsdp_param_dtype, opts.fsdp_reshard_after_forward) != (
            ConvertOptions.fsdp_unit, ConvertOptions.fsdp_prefetch, ConvertOptions.fsdp_param_dtype,
            ConvertOptions.fsdp_reshard_after_forward):
        log.info("one process: the FSDP2 options (%s) have no effect; launch with torchrun for several", fsdp)

    summary = {"run_dir": str(run_dir)}
    summary["stage1"] = run_stage1(teacher, train_seqs, run_dir, _settings(opts, "stage1"), inputs, seed=opts.seed)
    selection = run_selection(teacher, tokenizer, run_dir, opts, heldout_general, inputs)
    summary["selection"] = selection
    layer_types = selection["layer_types"]
    summary["stage2"] = run_stage2(teacher, tokenizer, train_seqs, run_dir, layer_types, _settings(opts, "stage2"), inputs, seed=opts.seed)
    if opts.stage3:
        summary["stage3"] = run_stage3(tokenizer, long_seqs, run_dir, _settings(opts, "stage3"), inputs, seed=opts.seed)
    if opts.eval and ctx.is_main:
        from .evaluate import evaluate_run

        summary["eval"] = evaluate_run(teacher, tokenizer, final_model_dir(run_dir), heldout_tok, run_dir, opts, eos)
    barrier()
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    log.info("convert finished in %.1f min; model in %s", summary["wall_time_s"] / 60, final_model_dir(run_dir))
    return summary


def saved_selection(run_dir: Path, method: str | None = None, num_attention: int | None = None) -> dict | None:
    """The complete selection manifest of ``run_dir`` when it answers the request, else None.

    ``method`` / ``num_attention`` None means "whatever the saved selection used"; a given value must equal the
    saved one. A schedule given with ``--layer-types`` (method ``given``) has no scores and is never returned.
    """
    m = StageDir(run_dir, "selection").manifest()
    if m is None or m.get("method") == "given" or "attention_layers" not in m:
        return None
    if method is not None and method != m.get("method"):
        return None
    if num_attention is not None and num_attention != m.get("num_attention"):
        return None
    return m


def reselect(run_dir: Path, method: str | None = None, num_attention: int | None = None) -> dict:
    """Re-run layer selection on a run whose stage 1 is complete (``hybridize select``), with the run's own
    teacher and data and, optionally, another method or attention count. Replaces ``selection/`` (a later
    ``convert`` of the same run then trains stage 2 on the new schedule only if ``stage2/`` is removed).

    Raises:
        FileNotFoundError: if ``run_dir`` has no complete stage 1.
    """
    import shutil

    from ..data import document_separator_id, pack_sequences
    from .teachers import load_teacher, teacher_num_layers

    stage1 = StageDir(run_dir, "stage1").manifest()
    if stage1 is None:
        raise FileNotFoundError(f"{run_dir} has no complete stage 1; run `hybridize convert --out {run_dir}` first")
    opts = ConvertOptions(**{k: v for k, v in stage1["inputs"]["options"].items() if k in ConvertOptions.__dataclass_fields__})
    opts.selection = method or opts.selection
    opts.num_attention = num_attention if num_attention is not None else opts.num_attention
    opts.layer_types = None
    opts.device = None  # selection runs where the teacher loads here (the CPU), whatever device the run trained on
    from .select import SELECTION_METHODS

    check_convert_options(opts, teacher_num_layers(opts.teacher))
    teacher, tokenizer = load_teacher(opts.teacher)
    check_convert_options(opts, teacher.config.num_hidden_layers)
    if opts.selection not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {opts.selection!r}; choose one of {SELECTION_METHODS}")
    _, heldout_tok, _ = load_run_data(opts, tokenizer)
    heldout = pack_sequences(heldout_tok, opts.seq_len, document_separator_id(tokenizer), max_sequences=8)
    with _run_lock(Path(run_dir), True):  # never while a convert writes this run
        sel = Path(run_dir) / "selection"
        old = Path(run_dir) / ".selection.old"
        if old.exists():
            shutil.rmtree(old)
        if sel.exists():
            os.replace(sel, old)
        try:
            result = run_selection(teacher.eval(), tokenizer, Path(run_dir), opts, heldout, stage1["inputs"])
        except BaseException:
            if sel.exists():
                shutil.rmtree(sel)
            if old.exists():
                os.replace(old, sel)  # a failed reselection leaves the previous selection intact
            raise
        if old.exists():
            shutil.rmtree(old)
        return result
