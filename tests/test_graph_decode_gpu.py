"""CUDA-graph decode and the bench on a GPU (issue 6). Needs CUDA; skipped elsewhere (fla optional).

Run on the GPU machine::

    python -m pytest -q -m gpu tests/test_graph_decode_gpu.py

* :class:`~hybridize.inference.GraphDecoder` replay equals the same step run eagerly (same kernels: tight
  tolerance) and the dynamic ``HybridCache`` decode (bf16: loose tolerance), for a small hybrid with
  attention, Lightning and sparse layers, with both decode-attention implementations, and with the opt-in
  ``torch.compile`` of the step;
* a chunk over a long cache takes the flash path (no ``[chunk, T]`` mask, no repeated K/V: bounded memory);
* ``hybridize bench --device cuda`` with the tiny presets runs end to end with graphs captured.
"""

from __future__ import annotations

import json

import pytest
import torch

from hybridize import HybridConfig, HybridForCausalLM
from hybridize.inference import GraphDecoder, chunked_prefill
from hybridize.ops.attention import eager_attention, softmax_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
SPARSE = dict(kernel_size=16, kernel_stride=8, block_size=64, window_size=128, topk=2, init_blocks=1, dense_len=256)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model(dtype=torch.bfloat16) -> HybridForCausalLM:
    config = HybridConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        layer_types=["sparse", "lightning", "attention", "lightning"],
        qk_norm=True,
        attention_output_gate=True,
        hype_base=100.0,
        sparse_config=SPARSE,
    )
    torch.manual_seed(0)
    return HybridForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("impl", ["split", "flex"])
def test_graph_replay_equals_eager_decode_bf16(impl):
    model = _model()
    prompt, n_new = 700, 40  # the sparse layer is past dense_len (256): selection + gather inside the graph
    ids = torch.randint(0, 512, (1, prompt + n_new), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    graph = GraphDecoder(model, prompt + n_new, chunk_size=256, decode_attention=impl)
    assert graph.graph is not None, graph.graph_error
    assert graph.decode_attention == impl and graph.graph_error is None
    eager = GraphDecoder(model, prompt + n_new, chunk_size=256, decode_attention=impl, use_graph=False)
    assert rel_err(graph.prefill(ids[:, :prompt]), eager.prefill(ids[:, :prompt])) <= 1e-3
    with torch.no_grad():
        _, cache = chunked_prefill(model, ids[:, :prompt], chunk_size=256)
        for i in range(n_new):
            tok = ids[:, prompt + i]
            g = graph.step(tok).clone()
            e = eager.step(tok)
            d = model(tok.view(1, 1), cache=cache, use_cache=True).logits[:, -1]
            assert torch.isfinite(g).all()
            assert rel_err(g, e) <= 1e-3, f"step {i}: graph vs eager {rel_err(g, e):.2e}"
            assert rel_err(g, d) <= 3e-2, f"step {i}: graph vs dynamic cache {rel_err(g, d):.2e}"
    assert graph.cache.seen_tokens == prompt + n_new and int(graph.cache.position) == prompt + n_new


def test_graph_greedy_generate_matches_eager():
    model = _model(torch.float32)
    ids = torch.randint(0, 512, (2, 300), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    graph = GraphDecoder(model, 340, batch=2, chunk_size=128)
    assert graph.graph is not None, graph.graph_error
    eager = GraphDecoder(model, 340, batch=2, chunk_size=128, use_graph=False, decode_attention=graph.decode_attention)
    assert torch.equal(graph.generate(ids, 24), eager.generate(ids, 24))


def test_flex_decode_graphs_of_two_batch_sizes_in_one_process():
    """Decoders of batch 1 then batch 2 with flex decode in one process: each replay equals eager decoding (on
    torch 2.11 the second batch size once recompiled to a symbolic-batch kernel whose replay hit an illegal
    memory access; the batch is now a static size of the compiled kernel)."""
    model = _model(torch.float32)
    for batch in (1, 2):
        ids = torch.randint(0, 512, (batch, 300), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(batch))
        graph = GraphDecoder(model, 340, batch=batch, chunk_size=128, decode_attention="flex")
        assert graph.graph is not None, graph.graph_error
        eager = GraphDecoder(model, 340, batch=batch, chunk_size=128, use_graph=False, decode_attention="flex")
        assert torch.equal(graph.generate(ids, 16), eager.generate(ids, 16))


def test_compiled_graph_step_equals_uncompiled():
    """The opt-in torch.compile of the step (then captured): same logits as the plain eager step."""
    model = _model()
    ids = torch.randint(0, 512, (1, 400), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
    compiled = GraphDecoder(model, 420, chunk_size=256, compile=True)
    assert compiled.graph is not None and compiled.compiled, compiled.graph_error
    eager = GraphDecoder(model, 420, chunk_size=256, use_graph=False, decode_attention=compiled.decode_attention)
    compiled.prefill(ids[:, :380])
    eager.prefill(ids[:, :380])
    for i in range(20):
        tok = ids[:, 380 + i]
        g, e = compiled.step(tok).clone(), eager.step(tok)
        assert rel_err(g, e) <= 2e-2, f"step {i}: {rel_err(g, e):.2e}"


def test_chunk_over_long_cache_uses_bounded_memory():
    """A 1024-query chunk over a 64K-token cache: the lower-right causal flash path allocates about its output,
    not a [1024, 64K] mask (64 MiB) nor K/V repeated to 32 heads (1 GiB)."""
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1024, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 65536, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = softmax_attention(q, k, v, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * out.numel() * out.element_size() + (16 << 20), f"{extra / 2**20:.0f} MiB extra"
    ref = eager_attention(q[:, :, -64:], k, v, None)  # the last 64 queries through the fp32 reference
    assert rel_err(out[:, :, -64:], ref) < 2e-2


def test_bench_cli_on_gpu(tmp_path):
    from hybridize.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--device", "cuda", "--presets", "tiny", "tiny-full", "tiny-hf", "--lengths", "512", "2048",
            "--decode-tokens", "8", "--chunk-size", "512", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["device"] != "cpu" and data["copy_bandwidth"]["bytes_per_s"] > 1e11
    for row in data["results"]:
        assert row["status"] == "ok", row
        if row["preset"] != "tiny-hf":
            assert row["graph"] is True, row.get("graph_error")


def test_auto_decode_attention_takes_flex_only_when_it_agrees_with_split():
    """``decode_attention="auto"`` checks flex against split first (torch 2.11 + H200 gave wrong flex results):
    the chosen implementation decodes the same greedy tokens as an eager split decoder."""
    from hybridize.ops.attention import flex_decode_mismatch

    model = _model()
    mismatch = flex_decode_mismatch(torch.device(DEVICE), torch.bfloat16, 8, 2, 64)
    auto = GraphDecoder(model, 512, chunk_size=256)
    assert auto.decode_attention == ("split" if mismatch else "flex"), auto.graph_error
    split = GraphDecoder(model, 512, chunk_size=256, decode_attention="split", use_graph=False)
    ids = torch.randint(0, 512, (1, 300), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    assert rel_err(auto.prefill(ids), split.prefill(ids)) <= 1e-3
    for _ in range(8):
        tok = split._token.view(-1).clone()
        assert rel_err(auto.step(tok), split.step(tok)) <= 3e-2
