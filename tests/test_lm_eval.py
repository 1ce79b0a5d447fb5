"""Our models under lm-eval's HF backend, and lm-eval scores as layer-selection scorers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.select import layer_sweep_with

from hybridize.convert.transfer import build_student
from hybridize.eval.lm_eval_adapter import lm_eval_score, task_metric

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture
def hybrid_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz "))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, eos_token_id=0))
    hybrid, _ = build_student(teacher, ["lightning", "attention"])
    return hybrid.eval(), fast


def test_hybrid_runs_under_lm_eval_hf_backend(hybrid_and_tokenizer):
    from lm_eval.api.instance import Instance

    from hybridize.eval.lm_eval_adapter import hf_lm

    model, tok = hybrid_and_tokenizer
    lm = hf_lm(model, tok, batch_size=2)
    context, continuation = "the cat sat", " on a mat"
    req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (ll, _greedy), = lm.loglikelihood([req])
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    ref = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
    assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_task_metric_preference_and_errors():
    assert task_metric({"acc,none": 0.4, "acc_norm,none": 0.5, "alias": "x"}) == 0.5
    assert task_metric({"exact_match,strict-match": 0.25}) == 0.25
    with pytest.raises(KeyError, match="no metric"):
        task_metric({"perplexity,none": 3.0})


def test_lm_eval_score_averages_tasks(hybrid_and_tokenizer):
    model, tok = hybrid_and_tokenizer
    calls = []

    def fake_evaluate(model, tasks, num_fewshot, limit):
        calls.append((tasks, num_fewshot, limit))
        return {"results": {"hellaswag": {"acc_norm,none": 0.3}, "arc_easy": {"acc,none": 0.5}}}

    out = lm_eval_score(model, tok, ["hellaswag", "arc_easy"], limit=5, evaluate=fake_evaluate)
    assert out["score"] == pytest.approx(0.4)
    assert calls == [(["hellaswag", "arc_easy"], 0, 5)]


def test_layer_sweep_with_whole_model_scorers(hybrid_and_tokenizer):
    """Scorers see the teacher with exactly layer i replaced, and the teacher is restored afterwards."""
    from hybridize.convert.align import build_lightning_students

    model, _ = hybrid_and_tokenizer
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2))
    exact, _ = build_student(teacher, ["attention"] * 3, attention_rope=True)
    mixers, _ = build_lightning_students(teacher)

    def which(m):
        return float(sum(i for i, layer in enumerate(m.model.layers) if layer.self_attn in list(mixers)))

    out = layer_sweep_with(exact, mixers, {"R": which, "C": lambda m: 1.0}, progress=False)
    assert out["R"] == [0.0, 1.0, 2.0] and out["C"] == [1.0] * 3 and out["teacher"] == {"R": 0.0, "C": 1.0}
    assert all(layer.self_attn not in list(mixers) for layer in exact.model.layers)
