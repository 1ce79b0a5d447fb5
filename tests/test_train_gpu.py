"""The stage-2 distillation gradient on a GPU (issue 7): repeatable, independent of the micro-batch split and
equal to the reference path's. Needs CUDA and fla; skipped elsewhere.

Why: on two H200s the stage-2 gradient norm of the first step differed by 23% between a 1-GPU run with two
accumulated micro-batches and the 2-GPU FSDP2 run of the same rows, although their first losses agreed to four
digits and their stage-1 runs to 3.5e-6 (``benchmarks/results/fsdp2_h200x2_accum``). Each check below isolates
one candidate cause on one GPU, in the mode training runs in (no deterministic algorithms), with the shapes of
that run (SmolLM2's 9 heads of 64, 512 tokens, rows of 8 and 16): a kernel whose first call (Triton autotuning)
or whose run-to-run result differs, a dependence on the batch split, or a fast path that disagrees with the
reference on the whole backward.

    python -m pytest -q -m gpu tests/test_train_gpu.py

Result on an H200 (commit 74d9855): all three pass. The 23% was not a kernel fault: on the real teacher the
stage-2 objective is rough in the weights (a 1e-3 relative weight perturbation moves the fp32 gradient by 68%),
so tiny differences in rounding give another gradient; ``benchmarks/stage2_gradient.py`` measures that.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.distill import build_hybrid, trainable_parameters
from hybridize.convert.losses import chunked_kl
from hybridize.ops import backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and importlib.util.find_spec("fla") is not None),
        reason="needs a CUDA GPU and fla (pip install 'hybridize[gpu]')",
    ),
]

SCHEDULE = ["lightning", "attention", "lightning", "lightning"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=512, num_hidden_layers=len(SCHEDULE),
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).to("cuda").eval().requires_grad_(False)
    student = build_hybrid(teacher, SCHEDULE, None).train()
    trainable_parameters(student)  # freezes the embeddings / head as stage 2 does
    return teacher, student


def stage2_grads(teacher, student, batch: torch.Tensor, micro: int = 1) -> dict[str, torch.Tensor]:
    """Per-parameter fp32 gradients of the stage-2 KL on ``batch`` ``[B, T]``, as the trainer computes them
    (bf16 autocast; ``micro`` interleaved micro-batches, each loss divided by ``micro``)."""
    student.zero_grad(set_to_none=True)
    for j in range(micro):
        part = batch[j::micro]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=part, use_cache=False).last_hidden_state
            s_hidden = student.model(input_ids=part, use_cache=False).last_hidden_state
            loss = chunked_kl(s_hidden, t_hidden, student.lm_head, teacher.lm_head) / micro
        loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in student.named_parameters() if p.grad is not None}


def worst(a: dict, b: dict, n: int = 4) -> list[tuple[str, float]]:
    """The ``n`` parameters with the largest relative RMS difference ``||a - b|| / ||b||``."""
    assert a.keys() == b.keys() and a
    errs = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b}
    return sorted(errs.items(), key=lambda kv: -kv[1])[:n]


def total_norm(g: dict) -> float:
    return float(torch.stack([t.norm() for t in g.values()]).norm())


def _batch(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (rows, 512), generator=torch.Generator().manual_seed(seed)).to("cuda")


def test_gradient_repeats_from_the_first_call(models):
    """The first call at a new shape (Triton autotuning runs kernels several times) and later calls give the same
    gradient: a kernel that accumulates into its output during autotuning would show here."""
    teacher, student = models
    batch = _batch(16, seed=1)
    calls = [stage2_grads(teacher, student, batch) for _ in range(3)]
    for later in calls[1:]:
        top = worst(later, calls[0])
        assert top[0][1] < 1e-2, f"gradients differ between calls (largest relative differences: {top})"


def test_gradient_does_not_depend_on_the_micro_batch_split(models):
    teacher, student = models
    batch = _batch(16, seed=2)
    whole = stage2_grads(teacher, student, batch)
    split = stage2_grads(teacher, student, batch, micro=2)
    top = worst(split, whole)
    assert top[0][1] < 2e-2, f"2 micro-batches vs the whole batch: {top}"
    assert total_norm(split) == pytest.approx(total_norm(whole), rel=1e-2)


def test_fast_path_gradient_equals_the_reference(models):
    teacher, student = models
    batch = _batch(8, seed=3)
    fast = stage2_grads(teacher, student, batch)
    with backend.force_reference():
        ref = stage2_grads(teacher, student, batch)
    top = worst(fast, ref)
    assert top[0][1] < 5e-2, f"fla/SDPA vs the reference on the whole stage-2 backward: {top}"
    assert total_norm(fast) == pytest.approx(total_norm(ref), rel=2e-2)
