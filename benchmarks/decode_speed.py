"""Decode speed under transformers' ``generate``: a hybrid of the SmolLM2 shape against its teacher's shape.

Builds, with random weights, (1) a :class:`~hybridize.HybridForCausalLM` of the SmolLM2-135M shape (30
layers, hidden 576, 9 heads, 3 KV heads, head dim 64, FFN 1536, vocab 49152) whose schedule keeps 7
evenly spaced softmax-attention layers (NoPE + HyPE + output gate) and makes the other 23 Lightning, and
(2) the teacher's shape as transformers ``LlamaForCausalLM`` (SDPA attention, DynamicCache). For each batch
size it times ``model.generate`` (greedy, ``min_new_tokens = max_new_tokens`` so every row decodes the
same number of tokens) over random prompts, after one untimed warm-up of the same shape (the first pass
compiles Triton kernels and builds cuDNN plans per KV length).

Decode throughput separates prefill from decode: ``decode tokens/s = batch * (N - 1) / (t(N) - t(1))``
where ``t(n)`` is the median wall time of ``generate(max_new_tokens=n)``; ``t(1)`` is the prefill plus one
token. Results go to a JSON file with the GPU name, library versions, git commit and the exact command.

The figures that matter come from a GPU (bf16, 4K prompts, batch 1 and 32)::

    python benchmarks/decode_speed.py                       # CUDA defaults: writes results/decode_speed_h200.json

A CPU smoke check with tiny sizes::

    python benchmarks/decode_speed.py --device cpu --dtype float32 --layers 4 --hidden 64 --heads 4 \\
        --kv-heads 2 --head-dim 16 --ffn 128 --vocab 256 --attention-layers 1 --prompt-len 64 \\
        --new-tokens 8 --batch-sizes 1 2 --repeats 1 --out /tmp/decode_speed_cpu.json

This is a benchmark, not a test: it asserts only that every run produced the requested number of tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "decode_speed_h200.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--attention-layers", type=int, default=7, help="softmax-attention layers of the hybrid (evenly spaced)")
    p.add_argument("--hype-base", type=float, default=500.0)
    p.add_argument("--models", nargs="+", default=["hybrid", "teacher"], choices=["hybrid", "teacher"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="git commit to record when the tree has no .git (e.g. on a copy)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def build_models(args, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize import HybridConfig, HybridForCausalLM
    from hybridize.convert.select import select_layers

    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(8192, args.prompt_len + args.new_tokens),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    models = {}
    if "hybrid" in args.models:
        attn = select_layers(args.layers, args.attention_layers, method="even")
        layer_types = ["attention" if i in attn else "lightning" for i in range(args.layers)]
        config = HybridConfig(
            **shape, layer_types=layer_types, attention_output_gate=True, hype_base=args.hype_base
        )
        torch.manual_seed(args.seed)
        models["hybrid"] = HybridForCausalLM(config).to(device=device, dtype=dtype).eval()
    if "teacher" in args.models:
        config = LlamaConfig(**shape, attention_bias=False, mlp_bias=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(args.seed)
        models["teacher"] = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_generate(model, ids, mask, new_tokens: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    sync(device)
    elapsed = time.perf_counter() - t0
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(ids.shape[0], ids.shape[1] + new_tokens)}")
    return elapsed


def measure(model, batch: int, args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    n = args.new_tokens
    timed_generate(model, ids, mask, n, device)  # warm-up: kernels compiled, plans built for every KV length
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_one = statistics.median(timed_generate(model, ids, mask, 1, device) for _ in range(args.repeats))
    t_all = statistics.median(timed_generate(model, ids, mask, n, device) for _ in range(args.repeats))
    decode_s = max(t_all - t_one, 1e-9)
    result = {
        "batch": batch,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "prefill_plus_one_token_s": round(t_one, 4),
        "generate_s": round(t_all, 4),
        "decode_ms_per_step": round(1000 * decode_s / max(n - 1, 1), 3),
        "decode_tokens_per_s": round(batch * (n - 1) / decode_s, 1),
        "end_to_end_new_tokens_per_s": round(batch * n / t_all, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode speed is t(N) - t(1))")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    import transformers

    from hybridize.convert.stage import git_state
    from hybridize.ops import backend

    models = build_models(args, device, dtype)
    info = {
        "benchmark": "decode_speed",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_state(args.commit),
        "dtype": str(dtype).replace("torch.", ""),
        "lightning_backend": backend.lightning_backend(device),
        "shape": {
            k: getattr(args, k)
            for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "attention_layers")
        },
        "method": "median wall time of model.generate (greedy, min_new_tokens = max_new_tokens) after one "
        "warm-up of the same shape; decode tokens/s = batch * (N - 1) / (t(N) - t(1))",
        "results": [],
    }
    try:
        from importlib.metadata import version

        info["fla_core"] = version("fla-core")
    except Exception:
        info["fla_core"] = None
    if "hybrid" in models:
        info["hybrid_schedule"] = models["hybrid"].config.schedule
    for batch in args.batch_sizes:
        for name, model in models.items():
            row = {"model": name, **measure(model, batch, args, device)}
            info["results"].append(row)
            print(json.dumps(row), flush=True)
    by = {(r["model"], r["batch"]): r["decode_tokens_per_s"] for r in info["results"]}
    info["decode_speedup_hybrid_over_teacher"] = {
        str(b): round(by[("hybrid", b)] / by[("teacher", b)], 2)
        for b in args.batch_sizes
        if ("hybrid", b) in by and ("teacher", b) in by
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out}")
    return info


if __name__ == "__main__":
    main()
