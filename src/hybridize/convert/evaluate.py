"""Teacher vs hybrid evaluation at the end of a conversion (and for ``hybridize eval``).

Metrics (see :mod:`hybridize.eval`): held-out perplexity at each length (on held-out documents at least
that long, never trained on; or on the held-out essays concatenated), optionally the loss per position
bucket, passkey retrieval accuracy (repeated-filler form and/or held-out essay filler, fixed seed), decode
tokens/s, cache bytes per token and at 8K context, and the layer schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["heldout_sequences", "passkey_fillers", "check_eval_args", "evaluate_run", "evaluate_models",
           "PPL_TEXTS", "PASSKEY_FORMS", "MAX_EVAL_LENGTH"]

from .options import PASSKEY_FORMS, PPL_TEXTS  # noqa: E402  (defined without torch for the command line)

log = logging.getLogger("hybridize")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: longest perplexity / pass-key length accepted (4M tokens). Not the model's trained context (evaluating past
#: it is the point), but a bound on the text built in memory: a pass-key prompt is tokenised from a string of
#: ~4 characters a token, several candidate lengths at once.
MAX_EVAL_LENGTH = 4 * 1024 * 1024


def heldout_sequences(
    heldout_tok: list[list[int]],
    lengths: Sequence[int],
    count: int,
    eos_id: int,
    concatenate: bool = False,
    strict: bool = False,
    name: str = "held-out",
) -> dict[int, torch.Tensor]:
    """``{length: LongTensor [n, length]}`` (1 <= n <= ``count``) of held-out text for perplexity at each length.

    By default uses the first ``length`` tokens of held-out documents at least that long; where fewer than
    ``count`` such documents exist, the rest are packed from concatenated documents (EOS between them).
    With ``concatenate=True`` all rows are consecutive ``length``-token windows of the documents
    concatenated in their order, each followed by ``eos_id`` (:func:`~hybridize.data.pack_sequences`).

    Args:
        heldout_tok: token ids per held-out document (no special tokens).
        lengths: sequence lengths in tokens.
        count: sequences wanted per length (>= 1).
        eos_id: separator between concatenated documents.
        concatenate: only windows of the concatenated text (e.g. held-out essays at 64K tokens).
        strict: raise instead of skipping a length for which not even one sequence can be made.
        name: what the text is, for messages.

    Raises:
        DataError: ``strict`` and some length exceeds the text (the message gives the text's length in
            tokens, separators included). Without ``strict`` such lengths are left out (a warning is logged).
    """
    from ..data import long_documents, pack_sequences
    from ..errors import DataError

    available = sum(len(d) + 1 for d in heldout_tok if d)
    out = {}
    for length in lengths:
        if strict and length > available:
            raise DataError(
                f"perplexity at {length} tokens needs {length} tokens of text, but the {name} text has only "
                f"{available} tokens ({sum(1 for d in heldout_tok if d)} documents, separators included): "
                "lower --ppl-lengths or choose another --ppl-text"
            )
        docs = [] if concatenate else [d[:length] for d in long_documents(heldout_tok, length)][:count]
        rows = [torch.tensor(d) for d in docs]
        if len(rows) < count:
            try:
                packed = pack_sequences(heldout_tok, length, eos_id, max_sequences=count - len(rows))
                rows.extend(packed)
            except ValueError:
                pass
        if not rows:
            log.warning("held-out text too short for perplexity at %d tokens; skipped", length)
            continue
        out[length] = torch.stack(rows)
    return out


def passkey_fillers(forms: Sequence[str], corpus=None) -> dict[str, str]:
    """``{form: filler text}`` for pass-key, in the order of ``forms``.

    ``"repeated"``: :func:`~hybridize.eval.repeated_filler`; ``"essay"``: the held-out Paul Graham essays
    of ``corpus`` (default :func:`~hybridize.data.load_default_corpus`) in their fixed order, joined by
    blank lines (never an essay of the training split; about 343K characters, 82K SmolLM2 tokens).

    Raises:
        ValueError: an unknown form, or no held-out essays.
    """
    from ..eval import repeated_filler

    out = {}
    for form in forms:
        if form == "repeated":
            out[form] = repeated_filler()
        elif form == "essay":
            if corpus is None:
                from ..data import load_default_corpus

                corpus = load_default_corpus()
            essays = corpus.by_source("heldout", "essay")
            if not essays:
                raise ValueError("the corpus has no held-out essays for the essay pass-key form")
            out[form] = "\n\n".join(essays)
        else:
            raise ValueError(f"unknown pass-key form {form!r}; choose from {', '.join(PASSKEY_FORMS)}")
    return out


def _evaluate_pair(models: dict, tokenizer, heldout: dict, out_dir: Path | None, ppl_lengths, passkey_lengths, trials,
                   seed, fillers: Mapping[str, str] | None = None, bucket_edges: Sequence[int] | None = None,
                   config: Mapping | None = None, progress: bool = True):
    from ..eval import compare_table, evaluate_model, plot_report, repeated_filler, write_report
    from ..eval.report import bucket_table

    rows, details, buckets = {}, {}, {}
    eval_start = time.perf_counter()
    for name, model in models.items():
        log.info("evaluating %s", name)
        start = time.perf_counter()
        r = evaluate_model(
            model,
            tokenizer,
            heldout=heldout,
            filler=dict(fillers) if fillers is not None else repeated_filler(),
            ppl_lengths=ppl_lengths,
            passkey_lengths=passkey_lengths,
            passkey_trials=trials,
            seed=seed,
            bucket_edges=bucket_edges,
            progress=progress,
        )
        log.info("evaluated %s in %.1f s", name, time.perf_counter() - start)
        rows[name], details[name] = r["metrics"], r["details"]
        if bucket_edges is not None:
            buckets[name] = {length: r["details"][f"ppl_{length}"]["buckets"]
                             for length in ppl_lengths if f"ppl_{length}" in r["details"]}
    results = {"metrics": rows, "details": details}
    if bucket_edges is not None:
        results["buckets"] = buckets
    if config is not None:
        results["config"] = {**config, "eval_wall_time_s": time.perf_counter() - eval_start}
    markdown = compare_table(rows)
    if buckets and bucket_table(buckets):
        markdown += "\nMean loss per position bucket (nats/token):\n\n" + bucket_table(buckets)
    if out_dir is not None:
        write_report(results, out_dir)
        plot_report(results, out_dir)
    return {"results": results, "markdown": markdown}


def evaluate_run(teacher, tokenizer, model_dir: Path, heldout_tok, run_dir: Path, opts, eos_id: int) -> dict:
    """Evaluate the teacher and the converted model of ``run_dir``; writes ``<run>/eval/report.{json,md}``."""
    from ..models import HybridForCausalLM

    hybrid = HybridForCausalLM.from_pretrained(model_dir).eval()
    heldout = heldout_sequences(heldout_tok, opts.eval_ppl_lengths, opts.eval_ppl_sequences, eos_id)
    teacher.eval()
    return _evaluate_pair(
        {"teacher": teacher, "hybrid": hybrid},
        tokenizer,
        heldout,
        Path(run_dir) / "eval",
        opts.eval_ppl_lengths,
        opts.eval_passkey_lengths,
        opts.eval_passkey_trials,
        opts.seed,
    )


def _check_lengths(name: str, values: Sequence[int], minimum: int = 1, why: str = "") -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} needs at least one length")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{name} must be positive integers (tokens), got {bad[0]!r}")
    short = [v for v in values if v < minimum]
    if short:
        raise ValueError(f"{name} must be at least {minimum} tokens{why}, got {short[0]}")
    long = [v for v in values if v > MAX_EVAL_LENGTH]
    if long:
        raise ValueError(
            f"{name} {long[0]} is above the limit of {MAX_EVAL_LENGTH} tokens (4M; the text of longer prompts is "
            f"not built in reasonable memory): give lengths <= {MAX_EVAL_LENGTH}"
        )
    return values


def check_eval_args(
    out_dir: Path | None = None,
    ppl_lengths: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (1024, 2048),
    passkey_trials: int = 10,
    ppl_sequences: int = 4,
    ppl_text: str = "heldout",
    bucket_edges: Sequence[int] | None = None,
    passkey_forms: Sequence[str] = ("repeated",),
    device: str | None = None,
    dtype: str = "float32",
) -> tuple[str, torch.dtype]:
    """Validate the arguments of :func:`evaluate_models` before anything slow runs.

    Creates ``out_dir`` and checks it is writable. Returns ``(device, torch dtype)`` with the device
    resolved (None -> ``"cuda"`` when available, else ``"cpu"``).

    Pass-key lengths too short for the prompt's fixed text are found only with the tokenizer
    (:func:`~hybridize.eval.passkey.prepare_passkey_prompts`, run by :func:`evaluate_models` right after
    loading).

    Raises:
        ValueError: lengths not positive ints, a perplexity length < 2, a length above
            :data:`MAX_EVAL_LENGTH`, ``passkey_trials`` or ``ppl_sequences`` < 1, bucket edges not strictly
            increasing non-negative ints starting at 0 (and below the longest perplexity length), unknown
            ``ppl_text`` / pass-key form / dtype, ``device`` not cpu/cuda or cuda without a CUDA device,
            ``out_dir`` not writable.
    """
    from ..outdir import check_writable_dir

    _check_lengths("--ppl-lengths", ppl_lengths, 2, " (each token's loss is predicted from the ones before it)")
    _check_lengths("--passkey-lengths", passkey_lengths)
    for flag, value in (("--passkey-trials", passkey_trials), ("--ppl-sequences", ppl_sequences)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if ppl_text not in PPL_TEXTS:
        raise ValueError(f"--ppl-text must be one of {', '.join(PPL_TEXTS)}, got {ppl_text!r}")
    if bucket_edges is not None:
        edges = list(bucket_edges)
        if not edges or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in edges):
            raise ValueError(f"--buckets must be non-negative integers (token positions), got {edges}")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"--buckets must be strictly increasing, got {edges}")
        longest = max(ppl_lengths)
        if edges[0] >= longest:
            raise ValueError(f"--buckets starts at {edges[0]}, at or past the longest --ppl-lengths {longest}: no "
                             "bucket would hold a token; start the buckets at 0")
        if edges[0] != 0:
            raise ValueError(f"--buckets must start at 0, got {edges[0]}: the tokens before the first edge would be "
                             f"dropped from every bucket; give 0 {' '.join(map(str, edges))}")
    if not passkey_forms:
        raise ValueError("--passkey-forms needs at least one form")
    unknown = [f for f in passkey_forms if f not in PASSKEY_FORMS]
    if unknown:
        raise ValueError(f"unknown pass-key form {unknown[0]!r}; choose from {', '.join(PASSKEY_FORMS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but this torch has no CUDA device; use --device cpu")
    if out_dir is not None:
        check_writable_dir(out_dir, "--out")
    return device, _DTYPES[dtype]


def evaluate_models(
    model: str,
    teacher: str | None = None,
    out_dir: Path | None = None,
    ppl_lengths: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (1024, 2048),
    passkey_trials: int = 10,
    ppl_sequences: int = 4,
    seed: int = 0,
    ppl_text: str = "heldout",
    bucket_edges: Sequence[int] | None = None,
    passkey_forms: Sequence[str] = ("repeated",),
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict:
    """``hybridize eval``: evaluate ``model`` (and optionally ``teacher``) on the bundled held-out split.

    Arguments are checked first (:func:`check_eval_args`, including that ``out_dir`` is writable), then
    the models are loaded onto ``device`` in ``dtype``, the text is prepared (a perplexity length longer
    than the chosen text is an error naming the text's length), the first pass-key prompt of every length
    and form is built (a length too short for the prompt's fixed text is an error) and each model is
    evaluated with :func:`~hybridize.eval.evaluate_model`. Repeated lengths and forms count once. When the
    call fails, an ``out_dir`` it created and left empty is removed.

    Args:
        model: converted model dir, run dir, released checkpoint or teacher spec (:func:`load_model`).
        teacher: optional second model, evaluated first under the name ``teacher``.
        out_dir: write ``report.json``, ``report.md`` and ``perplexity.png`` / ``buckets.png`` /
            ``passkey.png`` here (:func:`~hybridize.eval.write_report`, :func:`~hybridize.eval.plot_report`).
        ppl_lengths: perplexity lengths (tokens).
        passkey_lengths: pass-key context lengths (tokens).
        passkey_trials: pass-key trials per length and form.
        ppl_sequences: sequences per perplexity length (at most; fewer where the text is short).
        seed: pass-key seed (same keys, depths and prompts for every model).
        ppl_text: ``"heldout"``: held-out documents of at least the length, else packed held-out text
            (:func:`heldout_sequences`); ``"essay"``: the held-out essays concatenated in their fixed
            order, EOS between them, cut into consecutive windows of each length.
        bucket_edges: token positions, e.g. ``[0, 2048, 8192, 16384, 32768]``: loss per position bucket
            at every perplexity length (``results["buckets"]``, a markdown table and ``buckets.png``).
        passkey_forms: filler forms among :data:`PASSKEY_FORMS` (:func:`passkey_fillers`); metric keys
            ``passkey_1k`` for ``repeated``, ``passkey_essay_1k`` for ``essay``.
        device: ``"cuda"`` / ``"cpu"`` (default: cuda when available).
        dtype: ``"float32"`` or ``"bfloat16"`` (model weights).
        progress: tqdm bars.

    Returns:
        ``{"results": {"metrics": {name: row}, "details": {name: {key: result}}, "buckets"?: {name:
        {length: [bucket dicts]}}, "config": {arguments, sequences per length, setup_s, eval_wall_time_s}},
        "markdown": str}`` (markdown: the comparison table, plus the bucket table when ``bucket_edges``).

    Raises:
        ValueError: bad arguments (see :func:`check_eval_args`); DataError (a ValueError) when a
            perplexity length exceeds the chosen held-out text.
    """
    from ..outdir import removed_if_left_empty

    with removed_if_left_empty(out_dir):
        return _evaluate_models(model, teacher, out_dir, ppl_lengths, passkey_lengths, passkey_trials, ppl_sequences,
                                seed, ppl_text, bucket_edges, passkey_forms, device, dtype, progress)


def _evaluate_models(model, teacher, out_dir, ppl_lengths, passkey_lengths, passkey_trials, ppl_sequences, seed,
                     ppl_text, bucket_edges, passkey_forms, device, dtype, progress) -> dict:
    from ..data import document_separator_id, load_default_corpus, tokenize_documents
    from ..eval.passkey import prepare_passkey_prompts
    from ..loading import load_model

    device, torch_dtype = check_eval_args(out_dir, ppl_lengths, passkey_lengths, passkey_trials, ppl_sequences,
                                          ppl_text, bucket_edges, passkey_forms, device, dtype)
    ppl_lengths, passkey_lengths, passkey_forms = (tuple(dict.fromkeys(v))
                                                   for v in (ppl_lengths, passkey_lengths, passkey_forms))
    start = time.perf_counter()
    corpus = load_default_corpus()
    models = {}
    if teacher is not None:
        models["teacher"], tokenizer = load_model(teacher, dtype=torch_dtype, device=device, role="teacher")
    models["model"], tokenizer = load_model(model, dtype=torch_dtype, device=device, role="model")
    fillers = passkey_fillers(passkey_forms, corpus)
    for form, text in fillers.items():  # before any metric: a too-short length fails now, not after perplexity
        try:
            prepare_passkey_prompts(tokenizer, text, passkey_lengths, seed=seed)
        except ValueError as exc:
            raise ValueError(f"--passkey-lengths ({form} filler): {exc}; raise the pass-key lengths") from None
    docs = corpus.by_source("heldout", "essay") if ppl_text == "essay" else corpus.heldout
    name = "held-out essay" if ppl_text == "essay" else "held-out"
    heldout = heldout_sequences(tokenize_documents(docs, tokenizer), ppl_lengths, ppl_sequences,
                                document_separator_id(tokenizer), concatenate=ppl_text == "essay", strict=True,
                                name=name)
    config = {
        "model": model, "teacher": teacher, "device": device, "dtype": dtype, "ppl_text": ppl_text,
        "ppl_lengths": list(ppl_lengths), "ppl_sequences": {str(k): int(v.shape[0]) for k, v in heldout.items()},
        "bucket_edges": None if bucket_edges is None else list(bucket_edges),
        "passkey_lengths": list(passkey_lengths), "passkey_forms": list(passkey_forms),
        "passkey_trials": passkey_trials, "seed": seed,
    }
    config["setup_s"] = time.perf_counter() - start  # loading models, corpus and tokenising
    return _evaluate_pair(models, tokenizer, heldout, out_dir, ppl_lengths, passkey_lengths, passkey_trials, seed,
                          fillers=fillers, bucket_edges=bucket_edges, config=config, progress=progress)
