"""Time the attention of one layer's chunked prefill with each chunk-over-cache implementation, on one GPU.

Shape (default): Qwen3-8B attention layer -- 32 query heads, 8 KV heads, head dim 128, bf16, batch 1 -- over
a ``--context``-token prompt in ``--chunk``-token chunks written into a preallocated buffer (as the static
cache does: K/V are views of a longer buffer). For each implementation the whole sequence of chunk calls
(:func:`hybridize.ops.attention.prefill_chunk_attention`; the first chunk is a plain ``is_causal`` call in
every case, as in the model) is timed with CUDA events after one untimed pass (compiles flex, builds cuDNN
plans), next to one full-length causal SDPA call on SDPA's own kernel choice and on flash forced: the
reference points of the README's "1.78 s/layer against 1.08 s" at 256K.

Also printed: the SDPA kernel of the full-length call and of each part of ``split``. A candidate that fails is
recorded as an error (this script calls the implementations directly: no fallback to ``sdpa``).

Run on the GPU machine from the repository root::

    PYTHONPATH=src python benchmarks/prefill_attention.py                      # 256K context, 16K chunks
    PYTHONPATH=src python benchmarks/prefill_attention.py --context 131072 --impls sdpa split
    PYTHONPATH=src python benchmarks/prefill_attention.py --device cpu --context 512 --chunk 128 --heads 4 --kv-heads 2 --head-dim 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from hybridize.ops.attention import PREFILL_ATTENTION_IMPLS, prefill_chunk_attention, sdpa_backend


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=262144)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=list(PREFILL_ATTENTION_IMPLS), choices=PREFILL_ATTENTION_IMPLS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t, c = args.context, args.chunk
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, t, args.head_dim, device=device, dtype=dtype, generator=gen)
    kbuf = torch.randn(1, args.kv_heads, t + 128, args.head_dim, device=device, dtype=dtype, generator=gen)
    vbuf = torch.randn_like(kbuf)
    gqa = args.heads != args.kv_heads
    timer = _timer(device)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "context": t, "chunk": c,
                 "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                           "dtype": str(dtype).replace("torch.", "")},
                 "units": "seconds for the whole prompt (one layer)", "results": {}}

    def full(kernel=None):
        def fn():
            k, v = kbuf[:, :, :t], vbuf[:, :, :t]
            if kernel is None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(getattr(SDPBackend, kernel)):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return fn

    def chunked(impl):
        def fn():
            for start in range(0, t, c):
                end = min(start + c, t)
                qc, k, v = q[:, :, start:end], kbuf[:, :, :end], vbuf[:, :, :end]
                if start == 0:
                    F.scaled_dot_product_attention(qc, k, v, is_causal=True, enable_gqa=gqa)
                else:
                    prefill_chunk_attention(qc, k, v, impl=impl)
        return fn

    cases = {"full_causal_sdpa": full()}
    if device.type == "cuda":
        cases["full_causal_flash"] = full("FLASH_ATTENTION")
    cases.update({f"chunked_{impl}": chunked(impl) for impl in args.impls})
    out["full_causal_kernel"] = sdpa_backend(q, kbuf[:, :, :t], vbuf[:, :, :t], True)
    out["split_kernels"] = {  # of the last chunk
        "prefix": sdpa_backend(q[:, :, -c:], kbuf[:, :, : t - c], vbuf[:, :, : t - c], False),
        "own_chunk": sdpa_backend(q[:, :, -c:], kbuf[:, :, t - c : t], vbuf[:, :, t - c : t], True),
    }
    for name, fn in cases.items():
        try:
            warm = timer(fn)  # compiles, builds plans
            seconds = timer(fn)
            out["results"][name] = {"seconds": round(seconds, 4), "first_call_seconds": round(warm, 4)}
        except Exception as exc:  # recorded, the other cases still run
            out["results"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name:>20}: {out['results'][name]}", flush=True)
    print(json.dumps({k: out[k] for k in ("full_causal_kernel", "split_kernels")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
