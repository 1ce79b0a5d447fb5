"""Long-context evaluation: position buckets, pass-key filler forms, ``hybridize eval`` flags, report + plots."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hybridize.cli import main
from hybridize.convert.evaluate import heldout_sequences, passkey_fillers
from hybridize.data import document_separator_id, load_default_corpus, tokenize_documents
from hybridize.eval import (
    bucket_table,
    compare_table,
    evaluate_model,
    passkey_key,
    passkey_prompt,
    plot_report,
    repeated_filler,
    write_report,
)
from hybridize.eval.passkey import INSTRUCTION, NEEDLE_TEMPLATE, QUESTION


@pytest.fixture(scope="module")
def corpus():
    return load_default_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes), trained in-process on a little essay text; eos ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = [repeated_filler(), INSTRUCTION + " " + QUESTION, NEEDLE_TEMPLATE.format(passkey=12345)]
    tok.train_from_iterator(sample * 20 + [e[:5000] for e in corpus.by_source("train", "essay")[:20]], trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tiny, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ buckets


def test_bucket_losses_match_hand_computation(tiny, tokenizer):
    torch.manual_seed(5)
    heldout = torch.randint(0, len(tokenizer), (3, 96))
    edges = [0, 16, 48, 128]
    res = evaluate_model(tiny, heldout=heldout, ppl_lengths=(32, 96), speed_new_tokens=0, footprint_at=0,
                         bucket_edges=edges, progress=False)
    with torch.no_grad():
        logits = tiny(input_ids=heldout).logits.float()
    # nll[:, i]: loss of predicting token i+1 (position i+1 = tokens of context)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), heldout[:, 1:].reshape(-1),
                          reduction="none").view(3, -1)
    b96 = res["details"]["ppl_96"]["buckets"]
    assert [(b["start"], b["end"]) for b in b96] == [(0, 16), (16, 48), (48, 128)]
    for b in b96:
        lo, hi = max(b["start"], 1), min(b["end"], 96)
        assert b["tokens"] == 3 * (hi - lo)
        assert b["loss"] == pytest.approx(nll[:, lo - 1 : hi - 1].mean().item(), abs=1e-5)
    b32 = res["details"]["ppl_32"]["buckets"]  # causal: the 32-token prefix scores the same positions
    assert b32[0]["loss"] == pytest.approx(b96[0]["loss"], abs=1e-5)
    assert b32[1]["tokens"] == 3 * 16 and b32[2]["loss"] is None and b32[2]["tokens"] == 0
    assert res["details"]["ppl_32"]["seconds"] >= 0

    buckets = {"m": {32: b32, 96: b96}}
    table = bucket_table(buckets)
    assert table.splitlines()[0] == "| model | length | 0-16 | 16-48 | 48-128 |"
    assert table.splitlines()[2].endswith("| — |")  # 48-128 at length 32: empty
    assert f"{b96[2]['loss']:.4f}" in table.splitlines()[3]


def test_passkey_forms_keys_and_table_order(tiny, tokenizer):
    res = evaluate_model(tiny, tokenizer, filler={"repeated": repeated_filler(), "essay": "A dog ran. It sat. " * 20},
                         passkey_lengths=(96, 1024), passkey_trials=1, speed_new_tokens=0, footprint_at=0,
                         progress=False)
    m = res["metrics"]
    assert {k for k in m if k.startswith("passkey")} == {"passkey_96", "passkey_1k", "passkey_essay_96",
                                                         "passkey_essay_1k"}
    assert res["details"]["passkey_essay_1k"]["form"] == "essay"
    assert passkey_key("repeated", 32768) == "passkey_32k" and passkey_key("essay", 32768) == "passkey_essay_32k"
    labels = [line.split(" | ")[0][2:] for line in compare_table({"m": m}).strip().split("\n")[2:]]
    assert labels[:4] == ["Passkey accuracy @96", "Passkey accuracy @1K", "Passkey (essay) accuracy @96",
                          "Passkey (essay) accuracy @1K"]


# ----------------------------------------------------------------- essay filler / essay text


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?]) ", " ".join(text.split())) if len(s) >= 60]


def test_essay_form_uses_heldout_essays_only(corpus, tokenizer):
    filler = passkey_fillers(["essay"], corpus)["essay"]
    assert filler == "\n\n".join(corpus.by_source("heldout", "essay"))
    train_sentences = {s for e in corpus.by_source("train", "essay") for s in _sentences(e)}
    heldout_text = " ".join(filler.split())
    ids = passkey_prompt(tokenizer, filler, 4096, 54321, 0.5)
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    body = prompt.replace(INSTRUCTION, "").replace(NEEDLE_TEMPLATE.format(passkey=54321), "").replace(QUESTION, "")
    sentences = _sentences(body)
    assert len(sentences) > 20
    assert all(s in heldout_text for s in sentences[1:-1])  # held-out text (ends may be cut)
    assert not [s for s in sentences if s in train_sentences]


def test_essay_ppl_text_is_concatenated_essays(corpus, tokenizer):
    essays = tokenize_documents(corpus.by_source("heldout", "essay"), tokenizer)
    eos = document_separator_id(tokenizer)
    seqs = heldout_sequences(essays, [256, 2048], 3, eos, concatenate=True, strict=True)
    stream = [t for d in essays for t in (*d, eos)]
    assert seqs[256].shape == (3, 256) and seqs[256][1].tolist() == stream[256:512]
    assert seqs[2048][0].tolist() == stream[:2048]
    with pytest.raises(ValueError, match=rf"has only {len(stream)} tokens"):
        heldout_sequences(essays, [len(stream) + 1], 1, eos, concatenate=True, strict=True, name="held-out essay")


# ---------------------------------------------------------------------- report and plots


def test_plot_report_files(tmp_path):
    results = {
        "metrics": {"teacher": {"ppl_512": 10.0, "ppl_2048": 11.0, "passkey_1k": 1.0, "passkey_essay_1k": 0.5},
                    "model": {"ppl_512": 12.0, "ppl_2048": 14.0, "passkey_1k": 0.5, "passkey_essay_1k": 0.0}},
        "buckets": {"teacher": {2048: [{"start": 0, "end": 1024, "tokens": 10, "loss": 2.0},
                                       {"start": 1024, "end": 2048, "tokens": 10, "loss": 1.9}]},
                    "model": {2048: [{"start": 0, "end": 1024, "tokens": 10, "loss": 2.5},
                                     {"start": 1024, "end": 2048, "tokens": 10, "loss": None}]}},
    }
    paths = plot_report(results, tmp_path)
    assert sorted(paths) == ["buckets", "passkey", "perplexity"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths.values())
    assert plot_report({"metrics": {"m": {"decode_tokens_per_s": 3.0}}}, tmp_path / "none") == {}
    md = write_report(results, tmp_path)["md"].read_text()
    assert "## Mean loss per position bucket" in md and "| model | 2048 | 2.5000 | — |" in md
    assert json.loads((tmp_path / "report.json").read_text())["buckets"]["model"]["2048"][1]["loss"] is None


def test_cli_eval_long_report(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", str(model_dir), "--teacher", str(model_dir), "--out", str(out),
                 "--ppl-text", "essay", "--ppl-lengths", "64", "256", "--ppl-sequences", "2",
                 "--buckets", "0", "32", "128", "--passkey-lengths", "128", "256", "--passkey-trials", "2",
                 "--passkey-forms", "repeated", "essay", "repeated", "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["buckets.png", "passkey.png", "perplexity.png",
                                                     "report.json", "report.md"]
    data = json.loads((out / "report.json").read_text())
    for name in ("teacher", "model"):
        m = data["metrics"][name]
        assert {"ppl_64", "ppl_256", "passkey_128", "passkey_256", "passkey_essay_128", "passkey_essay_256"} <= set(m)
        assert [b["start"] for b in data["buckets"][name]["256"]] == [0, 32, 128]
        assert data["buckets"][name]["64"][2]["loss"] is None  # 128-256 at length 64
        assert data["details"][name]["ppl_256"]["sequences"] == 2
    assert data["metrics"]["teacher"]["ppl_256"] == pytest.approx(data["metrics"]["model"]["ppl_256"])
    assert data["config"]["ppl_text"] == "essay" and data["config"]["device"] == "cpu"
    assert data["config"]["passkey_forms"] == ["repeated", "essay"]
    md = (out / "report.md").read_text()
    assert "Passkey (essay) accuracy @128" in md and "## Mean loss per position bucket" in md
    assert "Mean loss per position bucket" in text and "Passkey (essay)" in text


@pytest.mark.parametrize("extra, message", [
    (["--buckets", "0", "2048", "1024"], "--buckets must be strictly increasing"),
    (["--ppl-lengths", "4000000"], r"perplexity at 4000000 tokens .* held-out text has only \d+ tokens"),
    (["--ppl-text", "essay", "--ppl-lengths", "4000000"], r"held-out essay text has only \d+ tokens"),
    (["--out", "FILE"], r"is not a writable directory \(is a file\)"),
    (["--out", "FILE/sub"], "is not a writable directory"),
    (["--ppl-lengths", "1"], r"--ppl-lengths must be at least 2 tokens .*got 1"),
    (["--ppl-lengths", "64", "100000000"], r"--ppl-lengths 100000000 is above the limit of 4194304 tokens"),
    (["--passkey-lengths", "100000000"], r"--passkey-lengths 100000000 is above the limit of 4194304 tokens"),
    (["--passkey-lengths", "1"], r"--passkey-lengths \(repeated filler\): context_len=1 is too small.*use at least \d+"),
    (["--passkey-forms", "essay", "--passkey-lengths", "1024", "8"], r"\(essay filler\): context_len=8 is too small"),
    (["--buckets", "100", "200", "--ppl-lengths", "32"], r"--buckets starts at 100, at or past the longest --ppl-lengths 32"),
    (["--buckets", "16", "200", "--ppl-lengths", "32"], r"--buckets must start at 0, got 16: the tokens before"),
    (["--model", "EMPTY"], r"model directory \S+ has no config.json"),
    (["--teacher", "EMPTY"], r"teacher directory \S+ has no config.json"),
])
def test_cli_eval_bad_arguments_exit_2(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    import hybridize.eval.suite as suite

    def no_metrics(*a, **k):
        raise AssertionError("a metric ran before the arguments were checked")

    monkeypatch.setattr(suite, "heldout_perplexity", no_metrics)
    monkeypatch.setattr(suite, "passkey_accuracy", no_metrics)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    extra = [a.replace("FILE", str(tmp_path / "file")).replace("EMPTY", str(tmp_path / "empty")) for a in extra]
    out = tmp_path / "new" / "report"
    if "--out" not in extra:
        extra += ["--out", str(out)]
    assert main(["eval", "--model", str(model_dir), "--device", "cpu", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()  # the --out this call created is removed again


def test_cli_eval_checks_out_before_loading_and_writes_nothing_on_error(model_dir, tmp_path, capsys, monkeypatch):
    import os

    import hybridize.loading as loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before --out was checked")

    (tmp_path / "file").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(loading, "load_model", no_load)
        assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "file"), "--device", "cpu"]) == 2
        assert "is not a writable directory" in capsys.readouterr().err
        if os.geteuid() != 0:  # root writes anywhere
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            assert main(["eval", "--model", str(model_dir), "--out", str(locked / "report"), "--device", "cpu"]) == 2
            assert "is not a writable directory" in capsys.readouterr().err
    # a perplexity length past the held-out text: exit 2 before any evaluation, no report written; the
    # directory this call created is removed again, one that existed before is kept
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model_dir), "--out", str(out), "--ppl-lengths", "64", "4000000",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"perplexity at 4000000 tokens .* held-out text has only \d+ tokens", err), err
    assert "lower --ppl-lengths" in err and "Traceback" not in err
    assert not out.exists()
    out.mkdir()
    assert main(["eval", "--model", str(model_dir), "--out", str(out), "--ppl-lengths", "4000000",
                 "--device", "cpu", "--no-progress"]) == 2
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("extra", [["--ppl-lengths", "0"], ["--passkey-trials", "0"], ["--buckets", "-1"],
                                   ["--passkey-forms", "haystack"], ["--dtype", "float16"]])
def test_cli_eval_bad_flag_values_exit_2(model_dir, capsys, extra):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(model_dir), *extra])
    assert info.value.code == 2
    assert "argument --" in capsys.readouterr().err


# ------------------------------------------------------------------- the real teacher tokenizer


@pytest.mark.teacher
def test_heldout_essays_reach_64k_teacher_tokens(corpus):
    from hybridize.convert.teachers import load_teacher

    _, tok = load_teacher()
    essays = tokenize_documents(corpus.by_source("heldout", "essay"), tok)
    assert sum(len(d) for d in essays) >= 65_536
    seqs = heldout_sequences(essays, [65_536], 4, document_separator_id(tok), concatenate=True, strict=True)
    assert seqs[65_536].shape == (1, 65_536)
