"""Tests of hybridize.eval on tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hybridize.eval import (
    cache_footprint,
    cache_nbytes,
    compare_table,
    decode_speed,
    evaluate_model,
    first_number,
    format_bytes,
    heldout_perplexity,
    layer_types_string,
    passkey_accuracy,
    passkey_prompt,
    repeated_filler,
    write_report,
)
from hybridize.eval.passkey import INSTRUCTION, NEEDLE_TEMPLATE, QUESTION

LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2
HEAD_DIM = HIDDEN // HEADS

ESSAY = (
    "When I was a kid I thought the best way to learn was to read books! Later I found that building "
    "things taught me more. Why is that? Maybe because a program either works or it does not.\n\n"
    "Startups are a good example of this. Founders learn by doing; they ship, they watch users, and they "
    "fix what is broken. Most ideas look bad at first. The good ones often look like toys.\n"
)


def _config(vocab_size: int = 128, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096, **kw,
    )


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on the prompt vocabulary (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [repeated_filler(), ESSAY, INSTRUCTION + " " + QUESTION, NEEDLE_TEMPLATE.format(passkey=12345)]
    tok.train_from_iterator(corpus * 20, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = _config(len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- perplexity


def test_perplexity_equals_transformers_labels_loss(tiny):
    torch.manual_seed(3)
    seqs = torch.randint(0, 128, (4, 33))
    r = heldout_perplexity(tiny, seqs, batch_size=2, progress=False)
    with torch.no_grad():
        ref = tiny(input_ids=seqs, labels=seqs).loss.item()
    assert r["method"] == "hidden-chunked"
    assert r["tokens"] == 4 * 32 and r["sequences"] == 4 and r["seq_len"] == 33
    assert r["loss"] == pytest.approx(ref, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)


def test_bucket_losses_average_back_to_total(tiny):
    torch.manual_seed(4)
    seqs = torch.randint(0, 128, (3, 40))
    r = heldout_perplexity(tiny, seqs, bucket_edges=[0, 8, 20], progress=False)
    buckets = r["buckets"]
    # [0,8), [8,20) and the open last bucket [20, 40); predicted positions are 1..39
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 8), (8, 20), (20, 40)]
    assert [b["tokens"] for b in buckets] == [3 * 7, 3 * 12, 3 * 20]
    assert sum(b["tokens"] for b in buckets) == r["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / r["tokens"]
    assert weighted == pytest.approx(r["loss"], abs=1e-9)
    # each bucket equals the mean of the per-position losses computed independently
    with torch.no_grad():
        logits = tiny(input_ids=seqs).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 128), seqs[:, 1:].reshape(-1), reduction="none").view(3, 39)
    assert buckets[1]["loss"] == pytest.approx(nll[:, 7:19].mean().item(), abs=1e-5)  # positions 8..19
    # an edge beyond T gives an empty trailing bucket without breaking the others
    r2 = heldout_perplexity(tiny, seqs, bucket_edges=[0, 20, 100], progress=False)
    assert r2["buckets"][-1]["tokens"] == 3 * 20 and len(r2["buckets"]) == 2
    r3 = heldout_perplexity(tiny, seqs, bucket_edges=[100, 200], progress=False)
    assert r3["buckets"][0]["tokens"] == 0 and r3["buckets"][0]["loss"] is None


def test_chunked_equals_unchunked(tiny):
    torch.manual_seed(5)
    seqs = torch.randint(0, 128, (3, 50))
    whole = heldout_perplexity(tiny, seqs, chunk_size=10_000, progress=False)
    chunked = heldout_perplexity(tiny, seqs, chunk_size=7, batch_size=2, progress=False, bucket_edges=[0, 25])
    full = heldout_perplexity(tiny, seqs, chunk_size=3, use_hidden=False, progress=False)
    assert full["method"] == "full-logits"
    assert chunked["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert full["loss"] == pytest.approx(whole["loss"], abs=1e-6)


class _ScaledLogitsLlama(LlamaForCausalLM):
    """A model whose logits are not lm_head(hidden): the split must be detected and avoided."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5 + 1.0
        return out


def test_perplexity_falls_back_when_logits_are_postprocessed():
    torch.manual_seed(6)
    model = _ScaledLogitsLlama(_config()).eval()
    seqs = torch.randint(0, 128, (2, 30))
    r = heldout_perplexity(model, seqs, progress=False, chunk_size=4)
    with torch.no_grad():
        logits = model(input_ids=seqs).logits.float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 128), seqs[:, 1:].reshape(-1)).item()
    assert r["method"] == "full-logits"
    assert r["loss"] == pytest.approx(ref, abs=1e-5)


def test_perplexity_bad_inputs(tiny):
    with pytest.raises(ValueError, match="2-D"):
        heldout_perplexity(tiny, torch.zeros(10, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="empty"):
        heldout_perplexity(tiny, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        heldout_perplexity(tiny, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="integer"):
        heldout_perplexity(tiny, torch.zeros(2, 8), progress=False)
    with pytest.raises(ValueError, match="token ids"):
        heldout_perplexity(tiny, torch.full((1, 8), 128), progress=False)
    with pytest.raises(ValueError, match="increasing"):
        heldout_perplexity(tiny, torch.zeros(1, 8, dtype=torch.long), bucket_edges=[4, 2], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        heldout_perplexity(tiny, torch.zeros(1, 8, dtype=torch.long), batch_size=0, progress=False)


# ---------------------------------------------------------------- passkey


def _needle_token_index(tokenizer, ids: list[int], passkey: int) -> int:
    """Smallest i such that ids[:i] decodes to text containing the pass-key sentence's number."""
    target = f"pass key is {passkey}"
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if target in tokenizer.decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.parametrize("filler", ["repeated", "essay", "list"])
def test_passkey_prompt_length_cap_and_layout(tokenizer, filler):
    text = {"repeated": repeated_filler(), "essay": ESSAY, "list": list(repeated_filler().split(". "))}[filler]
    for context_len in (64, 100, 257, 512, 1000):
        ids = passkey_prompt(tokenizer, text, context_len, 12345, 0.3)
        assert len(ids) <= context_len
        assert len(ids) >= context_len - 40, (context_len, len(ids))  # within about one filler sentence
        assert ids[0] == tokenizer.bos_token_id
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.startswith(INSTRUCTION)
        assert decoded.endswith(QUESTION)
        assert NEEDLE_TEMPLATE.format(passkey=12345) in decoded
        assert decoded.count("12345") == 2
        assert "\n" not in decoded and "  " not in decoded  # whitespace runs collapsed to one space


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_depth(tokenizer, depth):
    context_len = 800
    ids = passkey_prompt(tokenizer, repeated_filler(), context_len, 54321, depth)
    head = len(tokenizer(INSTRUCTION)["input_ids"])
    tail = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    idx = _needle_token_index(tokenizer, ids, 54321)
    needle_len = len(tokenizer(" " + NEEDLE_TEMPLATE.format(passkey=54321), add_special_tokens=False)["input_ids"])
    filler_tokens = len(ids) - head - tail - needle_len
    start = idx - head - 8  # idx points just past "pass key is 54321"; needle starts ~8 tokens before
    rel = start / filler_tokens
    assert abs(rel - depth) < 0.05, (rel, depth)


def test_passkey_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="too small"):
        passkey_prompt(tokenizer, repeated_filler(), 20, 12345, 0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, repeated_filler(), 500, 12345, 1.5)
    with pytest.raises(ValueError, match="empty"):
        passkey_prompt(tokenizer, "   ", 500, 12345, 0.5)
    with pytest.raises(ValueError, match="context_len"):
        passkey_prompt(tokenizer, repeated_filler(), 0, 12345, 0.5)
    with pytest.raises(ValueError):
        repeated_filler(0)


def test_first_number():
    assert first_number(" 12345. Remember") == "12345"
    assert first_number(" 12,345 is it") == "12345"
    assert first_number(" abc 7 then 12345") == "7"
    assert first_number(" none") is None


def test_passkey_accuracy_tiny_model_deterministic(tok_model, tokenizer):
    a = passkey_accuracy(tok_model, tokenizer, repeated_filler(), 160, trials=3, seed=0, max_new_tokens=4)
    b = passkey_accuracy(tok_model, tokenizer, repeated_filler(), 160, trials=3, seed=0, max_new_tokens=4)
    c = passkey_accuracy(tok_model, tokenizer, ESSAY, 160, trials=3, seed=1, max_new_tokens=4)
    assert a == b
    assert a["trials"] == 3 and len(a["per_trial"]) == 3 and a["context_len"] == 160
    assert a["accuracy"] == a["correct"] / 3
    for t in a["per_trial"]:
        assert set(t) == {"depth", "passkey", "prompt_tokens", "answer", "predicted", "correct"}
        assert 10000 <= t["passkey"] <= 99999 and 0.0 <= t["depth"] <= 1.0
        assert t["prompt_tokens"] <= 160
        assert t["correct"] == (t["predicted"] is not None and str(t["passkey"]) in t["predicted"])
    assert [t["passkey"] for t in a["per_trial"]] != [t["passkey"] for t in c["per_trial"]]
    # the continuation really comes from greedy generate on the prompt
    t0 = a["per_trial"][0]
    ids = passkey_prompt(tokenizer, repeated_filler(), 160, t0["passkey"], t0["depth"])
    x = torch.tensor([ids])
    out = tok_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) == t0["answer"]


class _OracleLM(torch.nn.Module):
    """Answers by reading the pass key out of the prompt (optionally wrong on purpose)."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, do_sample=True, **kw):
        assert do_sample is False and attention_mask.shape == input_ids.shape
        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(input_ids[0])).group(1)
        if self.wrong:
            key = str(int(key) + 1)
        new = self.tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_passkey_accuracy_scores_answers(tokenizer):
    good = passkey_accuracy(_OracleLM(tokenizer), tokenizer, ESSAY, 300, trials=4, seed=2)
    bad = passkey_accuracy(_OracleLM(tokenizer, wrong=True), tokenizer, ESSAY, 300, trials=4, seed=2)
    assert good["accuracy"] == 1.0 and good["correct"] == 4
    assert bad["accuracy"] == 0.0
    assert [t["passkey"] for t in good["per_trial"]] == [t["passkey"] for t in bad["per_trial"]]
    assert all(t["predicted"] == str(t["passkey"]) for t in good["per_trial"])


# ---------------------------------------------------------------- cache / speed


def _kv_bytes_per_token() -> int:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * 4  # K and V, fp32


def _prefill_cache(model, n: int):
    ids = torch.randint(0, 128, (1, n))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out["cache"] if "cache" in out.keys() else out.past_key_values


def test_cache_nbytes_dynamic_cache(tiny):
    cache = _prefill_cache(tiny, 37)
    assert isinstance(cache, DynamicCache)
    assert cache_nbytes(cache) == _kv_bytes_per_token() * 37 == 2 * LAYERS * KV_HEADS * HEAD_DIM * 37 * 4
    assert cache_nbytes(DynamicCache()) == 0
    assert cache_nbytes(DynamicCache(config=tiny.config)) == 0  # layers present but uninitialised
    k = torch.zeros(1, KV_HEADS, 5, HEAD_DIM)
    assert cache_nbytes(((k, k), (k, k))) == 4 * k.numel() * 4  # legacy tuples


def test_cache_nbytes_custom_and_unknown():
    class FakeCache:
        def nbytes(self):
            return 12345

    assert cache_nbytes(FakeCache()) == 12345
    with pytest.raises(TypeError, match="object"):
        cache_nbytes(object())


def test_cache_footprint_matches_kv_formula(tiny):
    r = cache_footprint(tiny, lengths=(16, 48), at_tokens=8192)
    assert r["bytes_per_token"] == _kv_bytes_per_token()
    assert r["fixed_bytes"] == 0
    assert r["bytes_at_tokens"] == _kv_bytes_per_token() * 8192
    assert r["measured"] == {16: 16 * _kv_bytes_per_token(), 48: 48 * _kv_bytes_per_token()}
    with pytest.raises(ValueError):
        cache_footprint(tiny, lengths=(16, 16))


class _HybridLikeCache:
    """Our-cache stand-in: wraps a DynamicCache and adds a fixed-size recurrent state."""

    STATE_BYTES = 3 * 1024

    def __init__(self, inner=None):
        self.inner = inner
        self.state = torch.zeros(self.STATE_BYTES // 4)  # fp32

    def nbytes(self) -> int:
        kv = cache_nbytes(self.inner) if self.inner is not None else 0
        return kv + self.state.numel() * self.state.element_size()


_LLAMA_CACHE_ARG = "past_key_values" if "past_key_values" in inspect.signature(LlamaForCausalLM.forward).parameters else "cache"


class _HybridLikeLlama(LlamaForCausalLM):
    """A model whose forward takes/returns our own cache object through `past_key_values`."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        inner = past_key_values.inner if past_key_values is not None else None
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                              **{_LLAMA_CACHE_ARG: inner}, **kwargs)
        inner = out["cache"] if "cache" in out.keys() else out.past_key_values
        return CausalLMOutputWithPast(logits=out.logits, past_key_values=_HybridLikeCache(inner) if use_cache else None)


def test_fake_cache_with_nbytes_through_footprint_and_decode():
    torch.manual_seed(0)
    model = _HybridLikeLlama(_config()).eval()
    r = cache_footprint(model, lengths=(10, 30), at_tokens=8192)
    assert r["bytes_per_token"] == _kv_bytes_per_token()
    assert r["fixed_bytes"] == _HybridLikeCache.STATE_BYTES
    assert r["bytes_at_tokens"] == _HybridLikeCache.STATE_BYTES + 8192 * _kv_bytes_per_token()
    s = decode_speed(model, prompt_len=12, new_tokens=5, warmup=False)
    assert s["cache_bytes"] == _HybridLikeCache.STATE_BYTES + (12 + 5) * _kv_bytes_per_token()


def test_decode_speed_matches_generate(tiny):
    r = decode_speed(tiny, prompt_len=20, new_tokens=6, batch_size=2, seed=3, return_tokens=True)
    for key in ("prefill_seconds", "decode_seconds", "decode_tokens_per_s", "decode_ms_per_step"):
        assert r[key] > 0
    assert r["decode_tokens_per_s"] == pytest.approx(2 * 6 / r["decode_seconds"])
    assert r["warmup"] == "full" and r["cold_decode_ms_per_step"] > 0
    assert r["cache_bytes"] == 2 * (20 + 6) * _kv_bytes_per_token()
    prompt = r["prompt_ids"]
    assert prompt.shape == (2, 20) and r["tokens"].shape == (2, 6)
    out = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(out[:, 20:], r["tokens"])
    short = decode_speed(tiny, prompt_len=20, new_tokens=6, batch_size=2, seed=3, warmup="short", return_tokens=True)
    assert torch.equal(short["tokens"], r["tokens"]) and "cold_decode_ms_per_step" not in short
    with pytest.raises(ValueError):
        decode_speed(tiny, prompt_len=0, new_tokens=4)
    with pytest.raises(ValueError, match="warmup"):
        decode_speed(tiny, prompt_len=4, new_tokens=4, warmup="twice")


# ---------------------------------------------------------------- report


def test_format_and_layer_types():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(12 * 2**20) == "12.0 MiB"
    assert format_bytes(None) == "—"
    assert layer_types_string(["lightning", "lightning", "attention", "sparse"]) == "LLAS"
    assert layer_types_string("LLA") == "LLA"


def test_compare_table_layout():
    table = compare_table({
        "teacher": {"ppl_512": 23.456, "passkey_1k": 0.8, "cache_bytes_per_token": 1536.0,
                    "cache_bytes_at_8k": 12 * 2**20, "layer_types": ["attention"] * 4, "note": "x|y"},
        "hybrid": {"ppl_512": 25.0, "decode_tokens_per_s": 153.26, "layer_types": "LLLA",
                   "passkey_1k": {"accuracy": 0.5, "per_trial": []}},
    })
    lines = table.strip().split("\n")
    assert lines[0] == "| metric | teacher | hybrid |"
    assert lines[1] == "|---|---:|---:|"
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert rows["Perplexity @512"] == "| Perplexity @512 | 23.46 | 25.00 |"
    assert rows["Passkey accuracy @1K"] == "| Passkey accuracy @1K | 80.0% | 50.0% |"
    assert rows["Decode tokens/s"] == "| Decode tokens/s | — | 153.3 |"
    assert rows["Cache bytes / token"] == "| Cache bytes / token | 1.50 KiB | — |"
    assert rows["Cache @8K tokens"] == "| Cache @8K tokens | 12.0 MiB | — |"
    assert rows["Layer types"] == "| Layer types | AAAA | LLLA |"
    assert lines[-1] == "| note | x\\|y | — |"  # unknown keys last, pipes escaped
    with pytest.raises(ValueError):
        compare_table({})
    # length-tagged keys get labels and are ordered by length within their group
    t2 = compare_table({"m": {"layer_types": "LA", "ppl_8192": 3.0, "passkey_4k": 0.25, "ppl_64": 9.0,
                              "cache_bytes_at_32k": 2**30}})
    assert [line.split(" | ")[0][2:] for line in t2.strip().split("\n")[2:]] == [
        "Perplexity @64", "Perplexity @8192", "Passkey accuracy @4K", "Cache @32K tokens", "Layer types"]


def test_write_report(tmp_path):
    results = {
        "models": {"teacher": {"ppl_512": 20.0, "cache_bytes_at_8k": 2**20},
                   "hybrid": {"ppl_512": 21.5, "decode_tokens_per_s": float("inf")}},
        "config": {"seed": 0, "path": tmp_path, "lengths": (512, 2048)},
        "passkey": {"per_trial": [{"passkey": 12345, "correct": True}]},
        "tensor": torch.tensor([1.5, 2.0]),
        "note": "cpu run",
    }
    paths = write_report(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]
    data = json.loads(paths["json"].read_text())
    assert data["models"]["hybrid"]["decode_tokens_per_s"] is None  # inf -> null
    assert data["config"] == {"seed": 0, "path": str(tmp_path), "lengths": [512, 2048]}
    assert data["tensor"] == [1.5, 2.0]
    md = paths["md"].read_text()
    assert "| Perplexity @512 | 20.00 | 21.50 |" in md
    assert "- **note**: cpu run" in md and '"per_trial"' in md
    write_report(results, tmp_path / "out")  # overwrite in place
    assert len(list((tmp_path / "out").iterdir())) == 2
    with pytest.raises(ValueError, match="models"):
        write_report({"teacher": {}}, tmp_path)
    alias = write_report({"metrics": {"hybrid": {"ppl_512": 3.0}}, "details": {}}, tmp_path / "alias")
    assert "| Perplexity @512 | 3.00 |" in alias["md"].read_text()


def test_evaluate_model_standard_keys(tok_model, tokenizer, tmp_path):
    torch.manual_seed(7)
    heldout = torch.randint(0, len(tokenizer), (2, 64))
    res = evaluate_model(tok_model, tokenizer, heldout, repeated_filler(), ppl_lengths=(32, 64),
                         passkey_lengths=(128,), passkey_trials=2, speed_prompt_len=16, speed_new_tokens=4,
                         footprint_at=8192, progress=False)
    m = res["metrics"]
    assert set(m) == {"ppl_32", "ppl_64", "passkey_128", "decode_tokens_per_s", "cache_bytes_per_token",
                      "cache_bytes_at_8k", "layer_types"}
    assert m["ppl_64"] == pytest.approx(heldout_perplexity(tok_model, heldout, progress=False)["perplexity"])
    assert m["cache_bytes_at_8k"] == 8192 * _kv_bytes_per_token()
    assert m["layer_types"] == "AA"
    write_report({"models": {"teacher": m}, "details": res["details"]}, tmp_path)


def test_on_hybrid_model_when_available():
    """The library's own hybrid model (Lightning + attention, own cache with nbytes()) through every metric."""
    models = pytest.importorskip("hybridize.models")
    from hybridize.models.configuration import HybridConfig

    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       layer_types=["lightning", "lightning", "lightning", "attention"],
                       pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = models.HybridForCausalLM(cfg).eval()
    seqs = torch.randint(0, 128, (2, 70))
    r = heldout_perplexity(model, seqs, chunk_size=9, progress=False)
    with torch.no_grad():
        ref = model(input_ids=seqs, labels=seqs).loss.item()
    assert r["method"] == "hidden-chunked" and r["loss"] == pytest.approx(ref, abs=1e-5)
    s = decode_speed(model, prompt_len=24, new_tokens=6, batch_size=2, return_tokens=True)
    out = model.generate(s["prompt_ids"], attention_mask=torch.ones_like(s["prompt_ids"]), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 24:], s["tokens"])
    f = cache_footprint(model, lengths=(16, 48))
    per_token = 2 * 1 * KV_HEADS * HEAD_DIM * 4  # one attention layer, fp32 K and V
    fixed = 3 * HEADS * HEAD_DIM * HEAD_DIM * 4  # three Lightning states [H, d, d] fp32
    assert f["bytes_per_token"] == per_token and f["fixed_bytes"] == fixed
    assert s["cache_bytes"] == 2 * (fixed + (24 + 6) * per_token)


def test_report_files_get_the_default_mode(tmp_path):
    """Reports are written atomically through a temporary file, then given the umask's mode (not mkstemp's 0600)."""
    import os

    from hybridize.eval.report import write_report

    old = os.umask(0o022)
    try:
        paths = write_report({"metrics": {"m": {"ppl_512": 1.0}}, "details": {}}, tmp_path)
    finally:
        os.umask(old)
    for p in paths.values():
        assert (os.stat(p).st_mode & 0o777) == 0o644, p
