"""Pass-key retrieval: a 5-digit number hidden at a chosen depth in filler text, asked for at the end.

Prompt layout (one string, tokenised once, so token boundaries are the tokenizer's natural ones)::

    <instruction> <filler units 0..j-1> <pass-key sentence> <filler units j..k-1> <question>

with ``k`` the largest number of filler units for which the prompt still fits in ``context_len``
tokens and ``j = round(depth * k)``. Filler is split into sentence units and repeated cyclically when it
is shorter than needed. Two filler forms are in use: the classic repeated sentences
(:func:`repeated_filler`) and real essay text (any string, e.g. Paul Graham essays).
"""

from __future__ import annotations

import random
import re
from array import array
from typing import Any, Sequence

import torch
from torch import nn

from ._common import model_device

__all__ = [
    "INSTRUCTION",
    "QUESTION",
    "NEEDLE_TEMPLATE",
    "FILLER_SENTENCES",
    "repeated_filler",
    "passkey_prompt",
    "passkey_accuracy",
    "prepare_passkey_prompts",
    "first_number",
]

INSTRUCTION = "There is a pass key hidden in the following text. Find it and remember it."
NEEDLE_TEMPLATE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key? The pass key is"
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?]) ")
_NUMBER = re.compile(r"\d(?:[\d,]*\d)?")


def repeated_filler(repeats: int = 1) -> str:
    """The classic pass-key filler: "The grass is green. The sky is blue. The sun is yellow. Here we go.
    There and back again." repeated ``repeats`` times, separated by single spaces.

    :func:`passkey_prompt` repeats filler cyclically itself, so ``repeats=1`` is enough for any length.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return " ".join([" ".join(FILLER_SENTENCES)] * repeats)


def _filler_units(filler: str | Sequence[str]) -> list[str]:
    """Split filler into sentence units, each ending with one space; whitespace runs become one space."""
    if isinstance(filler, str):
        units = [u + " " for u in _SENTENCE_SPLIT.split(" ".join(filler.split()))]
    elif isinstance(filler, Sequence):
        units = []
        for s in filler:
            if not isinstance(s, str):
                raise ValueError(f"filler list must hold strings, got {type(s).__name__}")
            units.append(" ".join(s.split()) + " ")
    else:
        raise ValueError(f"filler must be a string or a list of strings, got {type(filler).__name__}")
    units = [u for u in units if u.strip()]
    if not units:
        raise ValueError("filler text is empty")
    return units


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _compose(units: list[str], k: int, depth: float, needle: str) -> str:
    n = len(units)
    body = [units[i % n] for i in range(k)]
    j = int(round(depth * k))
    return INSTRUCTION + " " + "".join(body[:j]) + needle + " " + "".join(body[j:]) + QUESTION


_PROMPTS: dict[tuple, array] = {}
_PROMPTS_MAX_TOKENS = 64_000_000  # int32 ids: 256 MB at most


def _cached_prompt(tokenizer: Any, units: list[str], units_key: int, context_len: int, passkey: int, depth: float) -> list[int]:
    """:func:`_build_prompt` memoised per (tokenizer, filler, length, key, depth): a teacher and its hybrid
    evaluated one after the other get the same prompts without tokenizing them twice."""
    key = (id(tokenizer), units_key, context_len, passkey, depth)
    if key not in _PROMPTS:
        if sum(map(len, _PROMPTS.values())) > _PROMPTS_MAX_TOKENS:
            _PROMPTS.clear()
        _PROMPTS[key] = array("i", _build_prompt(tokenizer, units, context_len, passkey, depth))
    return list(_PROMPTS[key])


def _build_prompt(tokenizer: Any, units: list[str], context_len: int, passkey: int, depth: float) -> list[int]:
    """Token ids of the prompt with the most filler units ``k`` that fits in ``context_len`` tokens.

    Candidate unit counts are encoded in batches (the fast tokenizers encode a batch on all cores): an
    estimate from a sample's tokens per unit, one corrected estimate, a coarse grid around it and a fine
    grid inside the bracket, a few batched encodes instead of ~log2(k) sequential ones of the full prompt
    (each ~0.1 s at 64K tokens).
    """
    needle = NEEDLE_TEMPLATE.format(passkey=passkey)
    cache: dict[int, list[int]] = {}

    def encode_all(ks: list[int]) -> None:
        todo = sorted({k for k in ks if k >= 0 and k not in cache})
        if todo:
            texts = [_compose(units, k, depth, needle) for k in todo]
            for k, ids in zip(todo, tokenizer(texts, add_special_tokens=True)["input_ids"]):
                cache[k] = list(ids)

    def fits(k: int) -> bool:
        encode_all([k])
        return len(cache[k]) <= context_len

    encode_all([0])
    base = len(cache[0])
    if base > context_len:
        raise ValueError(
            f"context_len={context_len} is too small: the instruction, pass-key sentence and question "
            f"alone take {base} tokens with this tokenizer (use at least {base})"
        )
    sample = units[: min(len(units), 64)]
    per_unit = max(1.0, len(_encode(tokenizer, "".join(sample))) / len(sample))
    k = max(1, int((context_len - base) / per_unit))
    encode_all([k])
    if len(cache[k]) > base:  # correct the estimate with the real tokens per unit of this prompt
        k = max(1, int(k * (context_len - base) / (len(cache[k]) - base)))
    # `lo` always fits, `hi` never does, so the result never exceeds context_len
    lo, hi, step = 0, None, max(1, k // 200)
    while hi is None or hi - lo > 1:
        if hi is None:
            grid = [max(0, k + step * i) for i in range(-8, 9)]
        else:
            step = max(1, (hi - lo) // 16)
            grid = list(range(lo + step, hi, step))
        encode_all(grid)
        ok = [g for g in grid if fits(g)]
        bad = [g for g in grid if not fits(g)]
        lo = max([lo, *ok])
        above = [g for g in bad if g > lo]
        if above:
            hi = min(above) if hi is None else min(hi, min(above))
        elif hi is None:
            k, step = lo, 4 * step  # everything fitted: move the grid up, wider
    return cache[lo]


def _check_args(context_len: int, depth: float) -> None:
    if not isinstance(context_len, int) or context_len < 1:
        raise ValueError(f"context_len must be a positive int (tokens), got {context_len!r}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")


def passkey_prompt(
    tokenizer: Any,
    filler: str | Sequence[str],
    context_len: int,
    passkey: int,
    depth: float,
) -> list[int]:
    """Token ids of a pass-key prompt of at most ``context_len`` tokens (as close to it as whole filler
    sentences allow).

    The prompt is the instruction ("There is a pass key hidden in the following text. Find it and
    remember it."), filler sentences, the sentence "The pass key is {passkey}. Remember it. {passkey} is
    the pass key." after a fraction ``depth`` of the filler sentences, more filler, and the question
    "What is the pass key? The pass key is". It is tokenised as one string with the tokenizer's special
    tokens (e.g. BOS) included.

    Args:
        tokenizer: a transformers tokenizer (callable returning ``{"input_ids": [...]}``).
        filler: a string (whitespace runs, e.g. the hard line wraps of the essay file, collapsed to single
            spaces, then split into sentences after ``.``/``!``/``?`` + space) or a list of sentences
            (joined by single spaces); repeated cyclically as needed. Collapsing whitespace matters: on
            the SmolLM2 teacher at 1K tokens, essay text with its raw line wraps scored 2/10 where the
            collapsed text scored 6/10 (23/30 with seed 5).
        context_len: hard upper bound on the prompt length, in tokens.
        passkey: the number to hide (normally 5 digits).
        depth: relative position of the pass-key sentence in the filler, 0.0 (start) to 1.0 (end).

    Returns:
        list[int] of token ids, ``len <= context_len``.

    Raises:
        ValueError: empty filler, ``depth`` outside [0, 1], ``context_len`` not a positive int, or
            ``context_len`` too small to hold the instruction, pass-key sentence and question.
    """
    _check_args(context_len, depth)
    return _build_prompt(tokenizer, _filler_units(filler), context_len, int(passkey), float(depth))


def _draw(rng: random.Random) -> tuple[int, float]:
    """One trial's (5-digit pass key, depth) from ``rng``."""
    return rng.randint(10000, 99999), rng.random()


def prepare_passkey_prompts(tokenizer: Any, filler: str | Sequence[str], lengths: Sequence[int], seed: int = 0) -> None:
    """Build the first trial's prompt of :func:`passkey_accuracy` (same ``seed``) at every length, shortest
    first, and memoise it (the later run reuses it): a length too small for the instruction, pass-key
    sentence and question, or filler that cannot be used, fails here, at once, before any model runs.

    Raises:
        ValueError: as :func:`passkey_prompt`.
    """
    units = _filler_units(filler)
    units_key = hash(tuple(units))
    for length in sorted(set(lengths)):
        _check_args(length, 0.0)
        passkey, depth = _draw(random.Random(seed))
        _cached_prompt(tokenizer, units, units_key, length, passkey, depth)


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (thousands commas removed), or None when there is none."""
    m = _NUMBER.search(text)
    return m.group().replace(",", "") if m else None


@torch.inference_mode()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    filler: str | Sequence[str],
    context_len: int,
    trials: int = 10,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = False,
    desc: str | None = None,
) -> dict[str, Any]:
    """Pass-key retrieval accuracy of ``model`` at prompts of up to ``context_len`` tokens.

    Each trial draws a 5-digit pass key (``rng.randint(10000, 99999)``) and a depth (``rng.random()``)
    from ``random.Random(seed)``, builds the prompt with :func:`passkey_prompt`, and decodes greedily with
    ``model.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=False)`` (batch
    1). A trial is correct iff the pass key's digits appear in the first number of the decoded
    continuation (special tokens skipped). The same seed gives the same keys, depths and prompts.

    Args:
        model: a causal LM with ``generate`` (transformers ``GenerationMixin``); eval mode for the call.
        tokenizer: the model's tokenizer.
        filler: see :func:`passkey_prompt`.
        context_len: maximum prompt length in tokens.
        trials: number of prompts (>= 1).
        seed: seed of the ``random.Random`` that draws keys and depths.
        max_new_tokens: tokens generated per trial.
        progress: show a tqdm bar over trials.
        desc: label of that bar (default ``"passkey {context_len}"``).

    Returns:
        dict with ``accuracy`` (float in [0, 1]), ``trials``, ``correct`` (ints), ``context_len`` and
        ``per_trial``: a list of dicts ``{depth, passkey, prompt_tokens, answer, predicted, correct}``
        (``answer``: the decoded continuation; ``predicted``: its first number or None).

    Raises:
        ValueError: ``trials`` or ``max_new_tokens`` < 1, or any error of :func:`passkey_prompt`.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_args(context_len, 0.0)
    units = _filler_units(filler)
    units_key = hash(tuple(units))
    rng = random.Random(seed)
    device = model_device(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if pad_id is not None:
        gen_kwargs["pad_token_id"] = pad_id

    was_training = model.training
    model.eval()
    per_trial = []
    it = range(trials)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc or f"passkey {context_len}", unit="trial")
    try:
        for _ in it:
            passkey, depth = _draw(rng)
            ids = _cached_prompt(tokenizer, units, units_key, context_len, passkey, depth)
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
            new_tokens = out[0, input_ids.shape[1]:].tolist()
            answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
            predicted = first_number(answer)
            per_trial.append({
                "depth": depth,
                "passkey": passkey,
                "prompt_tokens": len(ids),
                "answer": answer,
                "predicted": predicted,
                "correct": predicted is not None and str(passkey) in predicted,
            })
    finally:
        model.train(was_training)
    correct = sum(t["correct"] for t in per_trial)
    return {
        "accuracy": correct / trials,
        "trials": trials,
        "correct": correct,
        "context_len": context_len,
        "per_trial": per_trial,
    }
