"""Tests for hybridize.convert.teachers.

``@pytest.mark.teacher`` tests load the real SmolLM2-135M-Instruct (fetched and converted into the
hybridize cache on first use: ~100 MB download, ~25 s; later ~2 s). The others test error paths
and need no model.
"""

from __future__ import annotations

import json

import pytest
import torch

from hybridize.convert.teachers import SUPPORTED_MODEL_TYPES, load_teacher, teacher_info
from hybridize.errors import HybridizeError, TeacherNotFoundError, UnsupportedTeacherError


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TeacherNotFoundError, match="no-such-model.*does not exist") as info:
        load_teacher(str(missing))
    assert "hub id" in str(info.value) and "smollm2" in str(info.value)
    assert isinstance(info.value, HybridizeError)


def test_directory_without_config(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="config.json"):
        load_teacher(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedTeacherError, match="gpt2") as info:
        load_teacher(str(tmp_path))
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in str(info.value)


def test_weights_without_tokenizer_name_the_missing_tokenizer(tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.cli import main

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(TeacherNotFoundError, match="no tokenizer files in .*tokenizer.json / tokenizer_config.json") as info:
        load_teacher(tmp_path)
    assert "copy the tokenizer next to the weights" in str(info.value) and "corrupt" not in str(info.value)
    for argv in (["generate", "--model", str(tmp_path), "--prompt", "x"],
                 ["convert", "--teacher", str(tmp_path), "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"no tokenizer files in {tmp_path}" in err and "corrupt" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unreadable_tokenizer_is_not_reported_as_corrupt_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TeacherNotFoundError, match="could not load the tokenizer of teacher") as info:
        load_teacher(tmp_path)
    assert "weights" not in str(info.value).split(";")[0]


def test_hub_id_without_network_is_clean(monkeypatch):
    # Offline mode makes the hub lookup fail fast instead of retrying DNS for ~25 s.
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant too.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherNotFoundError, match="hybridize-test/does-not-exist"):
        load_teacher("hybridize-test/does-not-exist")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_teacher("smollm2", dtype="float77")


@pytest.mark.teacher
def test_default_teacher_numbers_and_generation():
    model, tokenizer = load_teacher()
    info = teacher_info(model)
    assert info["model_type"] == "llama"
    assert info["num_layers"] == 30
    assert info["hidden_size"] == 576
    assert info["num_heads"] == 9
    assert info["num_kv_heads"] == 3
    assert info["head_dim"] == 64
    assert info["vocab_size"] == 49152
    assert info["tie_word_embeddings"] is True
    assert info["rope_theta"] == 100000.0
    assert 134_000_000 < info["num_params"] < 135_000_000
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert "quantization_config" not in model.config.to_dict()

    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")

    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy continuation: {text!r}")
    assert "Paris" in text
