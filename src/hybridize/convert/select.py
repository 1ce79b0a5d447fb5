"""Layer selection (SPEC 2, "Layer selection"; HALO paper Sec. 4.2): which layers stay softmax attention.

``M(i)`` is the teacher with only layer i's attention replaced by its stage-1 Lightning student. With
``R`` a recall score and ``C`` a general score of a model,

    score_i = (max_j R(M_j) - R(M_i)) / (max_j C(M_j) - C(M_i) + 1e-10), clipped at 50,

and the top ``k = floor(L / 4)`` layers stay attention: layers whose replacement costs much recall for
little general quality.

Offline scores (the paper uses lm-eval SQuAD/FDA/SWDE for R and HellaSwag/ARC for C):

* :func:`recall_score` ``R``: mean probability the model gives each gold answer token of extractive QA
  (SQuAD) when the answer span is in the context, teacher-forced. The answer must be copied from the
  context, as in the paper's recall tasks (SQuAD, FDA, SWDE are all extraction from a given document),
  which is exactly what linear-attention layers lose first.
* :func:`general_score` ``C``: mean probability of the next token on held-out general text (short
  context), a smooth stand-in for zero-shot multiple-choice accuracy: both measure short-range language
  modelling quality that does not need long-range retrieval.

Both are in [0, 1] (an "expected accuracy"). Evaluating ``M(i)`` reuses the teacher's hidden states up to
layer i, so a full sweep costs about L/2 teacher forwards over the scoring data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "ScoringData",
    "build_scoring_data",
    "halo_scores",
    "select_layers",
    "SELECTION_METHODS",
    "layer_sweep",
]

log = logging.getLogger("hybridize")

from .options import SELECTION_METHODS  # noqa: E402  (defined without torch for the command line)


@dataclass
class ScoringData:
    """Token batches for R and C.

    Attributes:
        recall_ids: ``[N, T]`` int64 QA prompts followed by their answers (right-padded with ``pad``).
        recall_mask: ``[N, T]`` 1 where the token is a gold answer token to score.
        general_ids: ``[M, T2]`` int64 held-out text.
    """

    recall_ids: torch.Tensor
    recall_mask: torch.Tensor
    general_ids: torch.Tensor


def build_scoring_data(
    tokenizer,
    qa: Sequence[dict],
    general_sequences: torch.Tensor,
    num_recall: int = 16,
    max_context_tokens: int = 320,
    num_general: int = 4,
) -> ScoringData:
    """Tokenise QA examples (``context``, ``question``, ``answers``) whose first answer occurs verbatim in
    the context into ``"{context}\\nQuestion: {question}\\nAnswer: {answer}"`` and mark the answer tokens.

    Raises:
        ValueError: if fewer than one usable QA example or no general sequence is given.
    """
    rows, masks = [], []
    for ex in qa:
        answer = ex["answers"][0] if ex["answers"] else ""
        if not answer or answer not in ex["context"]:
            continue
        ctx_ids = tokenizer(ex["context"], add_special_tokens=False)["input_ids"][:max_context_tokens]
        ctx = tokenizer.decode(ctx_ids)
        if answer not in ctx:
            continue
        prompt = tokenizer(f"{ctx}\nQuestion: {ex['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        ans = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        rows.append(prompt + ans)
        masks.append([0] * len(prompt) + [1] * len(ans))
        if len(rows) == num_recall:
            break
    if not rows:
        raise ValueError("no QA example has its answer inside the (truncated) context; cannot score recall")
    width = max(len(r) for r in rows)
    pad = tokenizer.eos_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    if general_sequences.shape[0] == 0:
        raise ValueError("no held-out sequence for the general score")
    return ScoringData(ids, mask, general_sequences[:num_general])


def _gold_prob(head, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean probability of the gold next token over masked target positions.

    ``hidden`` ``[B, T, D]`` are final (normed) hidden states; the LM head runs only on the positions that
    predict a masked target (``mask[:, 1:]``), so scoring short answers in long prompts stays cheap.
    """
    m = mask[:, 1:].bool()
    rows = m.nonzero()[:, 0]
    logp = F.log_softmax(head(hidden[:, :-1][m]).float(), dim=-1)
    gold = logp.gather(-1, ids[:, 1:][m][:, None]).squeeze(-1).exp()
    sums = gold.new_zeros(ids.shape[0]).index_add_(0, rows, gold)
    return sums / m.sum(-1).clamp(min=1)


def _kl_per_token(head, teacher_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``KL(p_teacher || p)`` per position, flattened (nats)."""
    t_logp = F.log_softmax(head(teacher_hidden).float(), -1)
    return (t_logp.exp() * (t_logp - F.log_softmax(head(hidden).float(), -1))).sum(-1).reshape(-1)


def _run_from_layer(model, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Final normed hidden states of an all-attention :class:`HybridForCausalLM` run from layer ``start``
    on its input ``hidden``."""
    b, t, _ = hidden.shape
    positions = torch.arange(t, device=hidden.device).unsqueeze(0).expand(b, t)
    rope = model.model.rotary_emb(positions, hidden.dtype)
    h = hidden
    for layer in model.model.layers[start:]:
        h = layer(h, rope, positions)
    return model.model.norm(h)


@torch.no_grad()
def layer_sweep(exact_teacher, mixers, data: ScoringData, batch_size: int = 4, progress: bool = True) -> dict:
    """R and C of the teacher and of every ``M(i)``.

    Args:
        exact_teacher: an all-attention :class:`HybridForCausalLM` with RoPE kept (equal to the teacher;
            from ``build_student(teacher, ["attention"] * L, attention_rope=True)``).
        mixers: the stage-1 Lightning mixers, one per layer.

    Returns:
        ``{"teacher": {"R", "C"}, "R": [L floats], "C": [L floats], "KL": [L floats]}``; ``KL[i]`` is the
        mean per-token ``KL(p_teacher || p_M(i))`` on the general text (nats).
    """
    model = exact_teacher.eval()
    n_layers = len(model.model.layers)
    device = next(model.parameters()).device

    def hidden_states(ids):
        out = model.model(input_ids=ids.to(device), use_cache=False, output_hidden_states=True)
        return out.hidden_states  # L + 1 entries: input of each layer, then final (normed)

    sets = {"R": (data.recall_ids, data.recall_mask), "C": (data.general_ids, torch.ones_like(data.general_ids))}
    cached, finals, base = {}, {}, {}
    for key, (ids, mask) in sets.items():
        chunks, last, probs = [], [], []
        for s in range(0, ids.shape[0], batch_size):
            hs = hidden_states(ids[s : s + batch_size])
            chunks.append(hs[:-1])
            last.append(hs[-1])
            probs.append(_gold_prob(model.lm_head, hs[-1], ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)))
        cached[key], finals[key] = chunks, last
        base[key] = float(torch.cat(probs).mean())
    scores = {"R": [], "C": [], "KL": []}
    bar = tqdm(range(n_layers), desc="layer selection", disable=not progress)
    for i in bar:
        original = model.model.layers[i].self_attn
        model.model.layers[i].self_attn = mixers[i]
        try:
            for key, (ids, mask) in sets.items():
                probs, kls = [], []
                for n, s in enumerate(range(0, ids.shape[0], batch_size)):
                    h = _run_from_layer(model, cached[key][n][i], i)
                    probs.append(_gold_prob(model.lm_head, h, ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)))
                    if key == "C":
                        kls.append(_kl_per_token(model.lm_head, finals[key][n], h))
                scores[key].append(float(torch.cat(probs).mean()))
                if kls:
                    scores["KL"].append(float(torch.cat(kls).mean()))
        finally:
            model.model.layers[i].self_attn = original
        bar.set_postfix(layer=i, R=f"{scores['R'][-1]:.3f}", C=f"{scores['C'][-1]:.3f}")
    return {"teacher": base, **scores}


def halo_scores(recall: Sequence[float], general: Sequence[float], clip: float = 50.0) -> list[float]:
    """HALO's layer importance (SPEC 2): ``(max R - R_i) / (max C - C_i + 1e-10)`` clipped at ``clip``."""
    r_max, c_max = max(recall), max(general)
    return [min(clip, (r_max - r) / (c_max - c + 1e-10)) for r, c in zip(recall, general)]


def select_layers(
    num_layers: int,
    num_attention: int,
    method: str = "halo",
    recall: Sequence[float] | None = None,
    general: Sequence[float] | None = None,
    always_attention: Sequence[int] = (),
) -> list[int]:
    """Indices of the layers that stay attention, sorted.

    Methods: ``halo`` (top scores of :func:`halo_scores`), ``even`` (evenly spaced over all layers),
    ``even-latter`` (evenly spaced over the latter half), ``recall-drop`` (largest recall drop only, as
    Jet-Nemotron), ``kl-guided`` (largest ``KL(teacher || M(i))``: pass the sweep's KL as ``recall``).
    ``always_attention`` layers are kept first (the SALA recipe keeps the first and last).

    Raises:
        ValueError: unknown method, missing scores, or ``num_attention`` outside ``[0, num_layers]``.
    """
    if not 0 <= num_attention <= num_layers:
        raise ValueError(f"num_attention must be in [0, {num_layers}], got {num_attention}")
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {SELECTION_METHODS}")
    for i in always_attention:
        if not 0 <= i < num_layers:
            raise ValueError(f"layer index {i} out of range for a model of {num_layers} layers")
    chosen = list(dict.fromkeys(always_attention))[:num_attention]
    rest = num_attention - len(chosen)
    candidates = [i for i in range(num_layers) if i not in chosen]
    if rest <= 0:
        return sorted(chosen)
    if method in ("even", "even-latter"):
        pool = candidates if method == "even" else [i for i in candidates if i >= num_layers // 2]
        if rest > len(pool):
            pool = candidates
        step = len(pool) / rest
        picks = [pool[min(len(pool) - 1, int(math.floor((j + 0.5) * step)))] for j in range(rest)]
        return sorted(set(chosen) | set(picks))
    if recall is None or (method == "halo" and general is None):
        raise ValueError(f"method {method!r} needs the per-layer scores from a layer sweep")
    if method == "halo":
        key = halo_scores(recall, general)
    elif method == "kl-guided":
        key = list(recall)
    else:
        key = [max(recall) - r for r in recall]
    ranked = sorted(candidates, key=lambda i: (-key[i], i))
    return sorted(chosen + ranked[:rest])


def collapsed_layers(general: Sequence[float], teacher_general: float, threshold: float = 0.5) -> list[int]:
    """Layers whose replacement alone breaks the model: ``C(M_i) < threshold * C(teacher)``, worst first.

    HALO's ratio (SPEC 2) divides the recall drop by the general drop, so a layer whose replacement
    collapses *both* scores gets a ratio near 1 and is converted, although no amount of distillation
    budget we can afford repairs it (measured on SmolLM2-135M: layer 0 as Lightning drops C from 0.29 to
    0.07; keeping it as attention cut the stage-2 starting perplexity from 15390 to 1561). The pipeline
    keeps these layers as attention before ranking the rest; ``threshold = 0`` disables the guard.
    """
    if threshold <= 0:
        return []
    bad = [i for i, c in enumerate(general) if c < threshold * teacher_general]
    return sorted(bad, key=lambda i: general[i])


def plot_scores(sweep: dict, scores: list[float], chosen: list[int], path) -> None:
    """Save a PNG of R, C and the HALO score per layer, chosen layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(scores)))
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, key, label in ((axes[0], "R", "recall R(M_i)"), (axes[1], "C", "general C(M_i)")):
        ax.plot(layers, sweep[key], marker="o")
        ax.axhline(sweep["teacher"][key], color="gray", ls="--", label="teacher")
        ax.set_ylabel(label)
        ax.legend()
    axes[2].bar(layers, scores, color=["C3" if i in chosen else "C0" for i in layers])
    axes[2].set_ylabel("HALO score")
    axes[2].set_xlabel("layer (red: kept as attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def layer_sweep_with(exact_teacher, mixers, scorers: dict, progress: bool = True) -> dict:
    """Like :func:`layer_sweep`, with arbitrary whole-model scorers (e.g. lm-eval tasks through
    :func:`hybridize.eval.lm_eval_adapter.lm_eval_scorer`) instead of the built-in R and C.

    Args:
        scorers: ``{"R": fn, "C": fn}``, each ``fn(model) -> float`` (higher is better).

    Returns:
        ``{"teacher": {name: score}, name: [L scores], ...}``.
    """
    model = exact_teacher.eval()
    out = {"teacher": {k: float(fn(model)) for k, fn in scorers.items()}, **{k: [] for k in scorers}}
    for i in tqdm(range(len(model.model.layers)), desc="layer selection", disable=not progress):
        original = model.model.layers[i].self_attn
        model.model.layers[i].self_attn = mixers[i]
        try:
            for k, fn in scorers.items():
                out[k].append(float(fn(model)))
        finally:
            model.model.layers[i].self_attn = original
    return out
