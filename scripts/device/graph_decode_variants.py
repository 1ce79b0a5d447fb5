"""Which GraphDecoder configuration makes the illegal memory access of test_graph_greedy_generate_matches_eager?

Runs one variant per process (a CUDA error is sticky), CUDA_LAUNCH_BLOCKING=1 so the failing kernel is named:
    python3 scripts/device/graph_decode_variants.py            # all variants, in parallel, one line each
    python3 scripts/device/graph_decode_variants.py fp32 2 split sparse graph   # one variant
"""
import os
import subprocess
import sys
import traceback

DEV = os.environ.get("DIAG_DEVICE", "cuda")
VARIANTS = [
    "fp32 2 auto sparse graph", "fp32 2 split sparse graph", "fp32 2 flex sparse graph", "fp32 1 auto sparse graph",
    "bf16 2 split sparse graph", "fp32 2 split nosparse graph", "fp32 2 split sparse eager", "bf16 2 auto sparse graph",
]


def one(dtype: str, batch: str, impl: str, sparse: str, mode: str) -> None:
    import torch

    from hybridize import HybridConfig, HybridForCausalLM
    from hybridize.inference import GraphDecoder

    config = HybridConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, qk_norm=True, attention_output_gate=True, hype_base=100.0,
        layer_types=["sparse" if sparse == "sparse" else "attention", "lightning", "attention", "lightning"],
        sparse_config=dict(kernel_size=16, kernel_stride=8, block_size=64, window_size=128, topk=2, init_blocks=1,
                           dense_len=256),
    )
    torch.manual_seed(0)
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = HybridForCausalLM(config).to(device=DEV, dtype=dt).eval()
    b = int(batch)
    ids = torch.randint(0, 512, (b, 300), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    dec = GraphDecoder(model, 340, batch=b, chunk_size=128, use_graph=mode == "graph",
                       **({} if impl == "auto" else {"decode_attention": impl}))
    out = dec.generate(ids, 24)
    if DEV == "cuda":
        torch.cuda.synchronize()
    eager = GraphDecoder(model, 340, batch=b, chunk_size=128, use_graph=False, decode_attention=dec.decode_attention)
    same = torch.equal(out, eager.generate(ids, 24))
    print(f"ok: graph={dec.graph is not None} impl={dec.decode_attention} error={dec.graph_error} same_as_eager={same}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        try:
            one(*sys.argv[1:])
        except Exception:
            lines = traceback.format_exc().strip().splitlines()
            print("FAILED: " + " | ".join(lines[-14:]))
        sys.exit(0)
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    procs = [(v, subprocess.Popen([sys.executable, __file__, *v.split()], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)) for v in VARIANTS]
    for v, p in procs:
        try:
            out = p.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            out = "timeout"
        print(f"[{v}] {out.strip().splitlines()[-1] if out.strip() else 'no output'}", flush=True)
