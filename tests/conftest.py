"""Shared fixtures: deterministic seeds, float32 default dtype, tiny random Llama/Qwen3 teachers."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
# spin-waiting makes each op ~100x slower under load. Override with HYBRIDIZE_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("HYBRIDIZE_TEST_THREADS", "1")))

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128, 64, 128, 4, 4, 2

#: tiny teacher variants: GQA (4 query heads, 2 KV heads) everywhere.
#: ``qwen3`` has an explicit head_dim (24) different from hidden / heads (16) and QK-norm;
#: ``llama_bias`` has biases on q/k/v/o; ``llama_tied`` ties the LM head to the embeddings.
TEACHER_KINDS = ("llama", "llama_bias", "qwen3")


def tiny_teacher_config(kind: str, **overrides):
    """A tiny transformers config of the given kind (see :data:`TEACHER_KINDS`, plus ``llama_tied``)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        initializer_range=0.05,
        rms_norm_eps=1e-6,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if kind == "llama":
        common.update(attention_bias=False)
        common.update(overrides)
        return LlamaConfig(**common)
    if kind == "llama_bias":
        common.update(attention_bias=True)
        common.update(overrides)
        return LlamaConfig(**common)
    if kind == "llama_tied":
        common.update(tie_word_embeddings=True)
        common.update(overrides)
        return LlamaConfig(**common)
    if kind == "qwen3":
        common.update(head_dim=24)
        common.update(overrides)
        return Qwen3Config(**common)
    raise ValueError(f"unknown tiny teacher kind {kind!r}")


def tiny_teacher(kind: str, seed: int = 0, **overrides):
    """A tiny random teacher in eval mode, fp32.

    Every 1-D parameter (RMSNorm weights, biases) is perturbed away from its ones/zeros init so that a
    wrong copy (or a fresh init where a copy was due) is visible in the values.
    """
    config = tiny_teacher_config(kind, **overrides)
    torch.manual_seed(seed)
    cls = Qwen3ForCausalLM if kind == "qwen3" else LlamaForCausalLM
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    """Seed torch and make float32 the default dtype for every test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def seed():
    """Re-seed torch (value 1234) on demand; returns a torch.Generator seeded the same way."""
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=TEACHER_KINDS)
def teacher_kind(request) -> str:
    """Parametrises a test over the tiny teacher kinds."""
    return request.param


@pytest.fixture
def make_teacher():
    """Factory: ``make_teacher(kind, seed=0, **config_overrides)`` -> tiny random teacher (eval, fp32)."""
    return tiny_teacher


@pytest.fixture
def teacher_config():
    """Factory: ``teacher_config(kind, **overrides)`` -> tiny transformers config."""
    return tiny_teacher_config


#: InfLLM-V2 sizes small enough that a few dozen tokens take the sparse path (dense below 40 tokens)
TINY_SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=8, window_size=16, topk=2, init_blocks=1, dense_len=40)


def tiny_mixed_hybrid(layer_types, sparse_config=TINY_SPARSE, seed: int = 0):
    """A tiny random :class:`HybridForCausalLM` of ``layer_types`` (HyPE attention with output gate, qk-norm,
    Lightning chunk 16, sparse sizes ``sparse_config``), norms perturbed so they are not all ones; eval mode."""
    from hybridize import HybridConfig, HybridForCausalLM

    config = HybridConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        layer_types=list(layer_types),
        qk_norm=True,
        attention_output_gate=True,
        hype_base=20.0,
        lightning_chunk_size=16,
        sparse_config=sparse_config,
    )
    torch.manual_seed(seed)
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts are not a package) as a module, for testing its ``main``."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
