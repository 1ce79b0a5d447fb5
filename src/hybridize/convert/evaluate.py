"""Teacher vs hybrid evaluation at the end of a conversion (and for ``hybridize eval``).

Metrics (see :mod:`hybridize.eval`): held-out perplexity at each length (on held-out documents at least
that long, never trained on), passkey retrieval accuracy (classic repeated-filler form, fixed seed), decode
tokens/s, cache bytes per token and at 8K context, and the layer schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["heldout_sequences", "evaluate_run", "evaluate_models"]

log = logging.getLogger("hybridize")


def heldout_sequences(heldout_tok: list[list[int]], lengths: Sequence[int], count: int, eos_id: int) -> dict[int, torch.Tensor]:
    """``{length: LongTensor [n, length]}`` of held-out text for perplexity at each length.

    Uses the first ``length`` tokens of held-out documents at least that long; where fewer than ``count``
    such documents exist, the rest are packed from concatenated documents (EOS between them). Lengths for
    which not even one sequence can be made are left out (a warning is logged).
    """
    from ..data import long_documents, pack_sequences

    out = {}
    for length in lengths:
        docs = [d[:length] for d in long_documents(heldout_tok, length)][:count]
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


def _evaluate_pair(models: dict, tokenizer, heldout: dict, out_dir: Path | None, ppl_lengths, passkey_lengths, trials, seed):
    from ..eval import compare_table, evaluate_model, repeated_filler, write_report

    rows, details = {}, {}
    for name, model in models.items():
        log.info("evaluating %s", name)
        r = evaluate_model(
            model,
            tokenizer,
            heldout=heldout,
            filler=repeated_filler(),
            ppl_lengths=ppl_lengths,
            passkey_lengths=passkey_lengths,
            passkey_trials=trials,
            seed=seed,
        )
        rows[name], details[name] = r["metrics"], r["details"]
    results = {"metrics": rows, "details": details}
    markdown = compare_table(rows)
    if out_dir is not None:
        write_report(results, out_dir)
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


def evaluate_models(
    model: str,
    teacher: str | None = None,
    out_dir: Path | None = None,
    ppl_lengths: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (1024, 2048),
    passkey_trials: int = 10,
    ppl_sequences: int = 4,
    seed: int = 0,
) -> dict:
    """``hybridize eval``: evaluate ``model`` (and optionally ``teacher``) on the bundled held-out split."""
    from ..data import document_separator_id, load_default_corpus, tokenize_documents
    from ..loading import load_model

    models = {}
    if teacher is not None:
        models["teacher"], tokenizer = load_model(teacher)
    models["model"], tokenizer = load_model(model)
    heldout_tok = tokenize_documents(load_default_corpus().heldout, tokenizer)
    heldout = heldout_sequences(heldout_tok, ppl_lengths, ppl_sequences, document_separator_id(tokenizer))
    return _evaluate_pair(models, tokenizer, heldout, out_dir, ppl_lengths, passkey_lengths, passkey_trials, seed)
