"""Where the stage-2 distillation gradient's differences come from: repeatability, batch split, kernels, precision.

Issue 7: on two H200s the first stage-2 gradient norm of a 1-GPU run with two accumulated micro-batches and of
the 2-GPU FSDP2 run of the same rows differed by 23% although their first losses agreed to four digits. This
script computes the stage-2 gradient (``KL(p_teacher || p_student)``, SPEC 2 stage 2, as
:func:`hybridize.convert.distill._distill` does) of one batch, on one device, several ways, and records how far
apart they are, per parameter:

* ``repeat``: the same batch ``--repeats`` times (the first call at a shape includes Triton autotuning);
* ``split``: two interleaved micro-batches (each loss halved) against the whole batch;
* ``reference``: the pure-PyTorch reference ops (:func:`hybridize.ops.backend.force_reference`) against the
  fast path;
* ``fp32``: no bf16 autocast (the trainer's mode on CUDA is bf16 autocast) against bf16 autocast;
* ``perturb``: without autocast (fp32), the gradient after multiplying every trainable weight by
  ``1 + eps * N(0, 1)`` (``--perturb`` eps values) against the unperturbed one: how smooth the objective itself is,
  whatever the arithmetic (weights restored afterwards);
* ``kernels``: each op alone (Lightning Attention, softmax attention, the chunked KL) under bf16 autocast,
  forward + backward three times on the same random inputs of the model's shapes: bitwise equal or not.

Relative differences are ``||a - b|| / ||b||`` over all trainable parameters (and the worst parameters by name);
``cos`` is their cosine. Results go to ``--out`` (JSON) and stdout.

    python benchmarks/stage2_gradient.py --teacher tiny --out stage2_gradient_tiny.json
    python benchmarks/stage2_gradient.py --teacher default --data train.jsonl \\
        --stage1 runs/1gpu --layer-types LLLLLLLLLALLLLLLALLALALLLAALLA --out stage2_gradient.json
"""

from __future__ import annotations

import argparse
import json
import os
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from hybridize.convert.align import MIXERS_FILE
from hybridize.convert.distill import build_hybrid, trainable_parameters
from hybridize.convert.losses import chunked_kl
from hybridize.convert.stage import atomic_write_text, git_state
from hybridize.errors import HybridizeError
from hybridize.outdir import check_writable_dir
from hybridize.ops import backend

TINY_SCHEDULE = "LALL"


def _schedule(letters: str) -> list[str]:
    kinds = {"L": "lightning", "A": "attention"}
    bad = sorted({c for c in letters if c not in kinds})
    if bad:
        raise SystemExit(f"--layer-types takes the letters L (Lightning) and A (attention), got {''.join(bad)!r}")
    return [kinds[c] for c in letters]


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be written, naming the flag and the fix (checked before the computation, creating
    nothing), or None."""
    if str(out) == "" or out.is_dir():
        return f"--out {str(out)!r} is a folder: give a JSON file path"
    parent = out.parent
    while not parent.exists():  # the folders that would be created: probe the nearest existing one
        parent = parent.parent
    try:
        check_writable_dir(parent, "--out")
    except ValueError as exc:
        return str(exc)
    return None


def load_models(args, device: torch.device):
    """``(teacher, student, vocab_size)``: the tiny random Llama of ``tests/test_train_gpu.py`` or a real teacher,
    and the stage-2 student built from it (stage-1 mixers from ``--stage1`` when given)."""
    if args.teacher == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        letters = args.layer_types or TINY_SCHEDULE
        cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=512, num_hidden_layers=len(letters),
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024,
                          tie_word_embeddings=True)
        teacher, tokenizer = LlamaForCausalLM(cfg), None
    else:
        from hybridize.convert.teachers import load_teacher

        teacher, tokenizer = load_teacher(None if args.teacher == "default" else args.teacher)
        letters = args.layer_types
        if not letters:
            raise SystemExit("give --layer-types for a real teacher (one letter per layer, L or A)")
    if len(letters) != teacher.config.num_hidden_layers:
        raise SystemExit(f"--layer-types has {len(letters)} letters, the teacher has {teacher.config.num_hidden_layers} layers")
    teacher = teacher.to(device).eval().requires_grad_(False)
    torch.manual_seed(args.seed)  # the stage-0 students' random output gates (without --stage1) come from it
    mixers = None
    if args.stage1 is not None:
        mixers = args.stage1 / "stage1" / MIXERS_FILE if (args.stage1 / "stage1").is_dir() else args.stage1 / MIXERS_FILE
        if not mixers.is_file():
            raise SystemExit(f"--stage1: no {MIXERS_FILE} in {args.stage1} or its stage1/ (a finished stage 1 writes it)")
    student = build_hybrid(teacher, _schedule(letters), mixers).to(device).train()
    trainable_parameters(student)
    return teacher, student, tokenizer, mixers


def make_batch(args, tokenizer, vocab: int, device) -> torch.Tensor:
    """``[rows, seq_len]`` int64 token ids: packed ``--data`` text (the bundled corpus's training split for a real
    teacher without ``--data``), or uniform random ids (seed 1) for the tiny model."""
    if tokenizer is not None:
        from hybridize.data import load_default_corpus, load_texts
        from hybridize.data.packing import document_separator_id, pack_sequences, tokenize_documents

        docs = load_texts(args.data) if args.data is not None else load_default_corpus().train
        need, tokens, start = args.rows * (args.seq_len + 1), [], 0
        while start < len(docs) and sum(len(t) + 1 for t in tokens) < need:  # tokenise only what the batch needs
            tokens += tokenize_documents(docs[start : start + 64], tokenizer)
            start += 64
        rows = pack_sequences(tokens, args.seq_len, document_separator_id(tokenizer), max_sequences=args.rows)
        if rows.shape[0] < args.rows:
            raise SystemExit(f"--data gives {rows.shape[0]} rows of {args.seq_len} tokens, --rows asks for {args.rows}")
        return rows.to(device)
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (args.rows, args.seq_len), generator=gen).to(device)


def stage2_gradient(teacher, student, batch, micro: int = 1, autocast: bool = True) -> tuple[float, dict]:
    """Loss (nats) and fp32 per-parameter gradients of the stage-2 KL on ``batch`` ``[B, T]``, as the trainer
    computes them: ``micro`` interleaved micro-batches (rows ``j::micro``), each loss divided by ``micro``;
    bf16 autocast on CUDA unless ``autocast`` is False."""
    student.zero_grad(set_to_none=True)
    total = 0.0
    dev = batch.device.type
    for j in range(micro):
        part = batch[j::micro]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast and dev == "cuda"):
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=part, use_cache=False).last_hidden_state
            s_hidden = student.model(input_ids=part, use_cache=False).last_hidden_state
            loss = chunked_kl(s_hidden, t_hidden, student.lm_head, teacher.lm_head) / micro
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().float().clone() for n, p in student.named_parameters() if p.grad is not None}
    return total, grads


def compare(a: dict, b: dict, worst: int = 6) -> dict:
    """How far gradients ``a`` are from ``b``: whole-model relative difference, cosine, norms, bitwise equality
    and the ``worst`` parameters by relative difference (with their norm in ``b``)."""
    va = torch.cat([a[k].flatten() for k in b])
    vb = torch.cat([b[k].flatten() for k in b])
    per = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:worst]
    return {
        "rel_diff": float((va - vb).norm() / vb.norm().clamp_min(1e-30)),
        "cos": float((va.double() @ vb.double()) / (va.double().norm() * vb.double().norm()).clamp_min(1e-300)),
        "norm_a": float(va.norm()),
        "norm_b": float(vb.norm()),
        "bitwise_equal": bool(torch.equal(va, vb)),
        "worst": [{"param": k, "rel_diff": v, "norm_b": float(b[k].norm())} for k, v in top],
    }


def weight_perturbation(teacher, student, batch, epsilons: list[float]) -> list[dict]:
    """fp32 gradients (no autocast) after scaling each trainable weight by ``1 + eps * N(0, 1)`` (seed 3), compared
    with the unperturbed fp32 gradient; the weights are restored afterwards, also on an error."""
    params = [p for p in student.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    loss0, base = stage2_gradient(teacher, student, batch, autocast=False)
    rows = []
    try:
        for eps in epsilons:
            gen = torch.Generator(device=batch.device).manual_seed(3)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s * (1 + eps * torch.randn(s.shape, generator=gen, device=s.device, dtype=s.dtype)))
            loss, grads = stage2_gradient(teacher, student, batch, autocast=False)
            rows.append({"eps": eps, "loss": loss, "loss_unperturbed": loss0, **compare(grads, base)})
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return rows


def kernel_repeatability(student, batch, device) -> dict:
    """Forward + backward of each op (bf16 autocast) three times on the same random inputs of the model's shapes;
    per kernel: whether outputs and input gradients were bitwise equal, and their largest relative difference."""
    from hybridize.ops.attention import softmax_attention
    from hybridize.ops.lightning import lightning_attention, lightning_log_decay

    cfg = student.config
    b, t = batch.shape
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    gen = torch.Generator(device=device).manual_seed(5)
    out = {}

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16)

    def lightning(q, k, v):
        return lightning_attention(q, k, v, lightning_log_decay(hq).to(device), check_decay=False)[0]

    def sdpa(q, k, v):
        return softmax_attention(q, k, v, None)

    cases = {
        "lightning_attention": (lightning, (rnd(b, t, hq, d), rnd(b, t, hq, d), rnd(b, t, hq, d))),
        "sdpa_causal_gqa": (sdpa, (rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d))),
    }
    head = student.lm_head

    def kl(s, t_):
        return chunked_kl(s, t_, head, head)

    cases["chunked_kl"] = (kl, (rnd(b, t, cfg.hidden_size), rnd(b, t, cfg.hidden_size)))
    for name, (fn, inputs) in cases.items():
        results = []
        for _ in range(3):
            xs = [x.detach().clone().requires_grad_(i == 0 or name != "chunked_kl") for i, x in enumerate(inputs)]
            with torch.autocast(device.type, dtype=torch.bfloat16):  # as in training (the head stays fp32)
                y = fn(*xs)
            g = torch.randn(y.shape, device=device, generator=torch.Generator(device=device).manual_seed(6)).to(y.dtype)
            y.backward(g)
            results.append([y.detach().float()] + [x.grad.float() for x in xs if x.grad is not None])
        diffs = [max(float((r - s).norm() / s.norm().clamp_min(1e-30)) for r, s in zip(later, results[0]))
                 for later in results[1:]]
        out[name] = {"bitwise_equal": all(all(torch.equal(r, s) for r, s in zip(later, results[0])) for later in results[1:]),
                     "max_rel_diff": max(diffs)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="tiny",
                   help="'tiny' (random 4-layer Llama of SmolLM2's widths), 'default' (the embedded teacher) or a path")
    p.add_argument("--layer-types", default=None, help="one letter per layer: L (Lightning) or A (attention)")
    p.add_argument("--stage1", type=Path, default=None, help="a run directory (or its stage1/) with the stage-1 mixers")
    p.add_argument("--data", default=None, help="training text (as `hybridize convert --data`); default: the bundled "
                   "corpus for a real teacher, random ids for the tiny model")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's random initialisation (stage 0; default 0)")
    p.add_argument("--rows", type=int, default=16, help="rows of the batch (even, for the split check; default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="gradients of the same batch to compare (>= 2; default 3)")
    p.add_argument("--perturb", nargs="*", type=float, default=[1e-5, 1e-4, 1e-3],
                   help="relative weight perturbations of the perturb check, each > 0 (default 1e-5 1e-4 1e-3)")
    p.add_argument("--skip", nargs="*", default=[], choices=["split", "reference", "fp32", "perturb", "kernels"],
                   help="checks to leave out (all run by default; see above)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to compute: cuda (the fast kernels, bf16 autocast) or cpu (reference ops, fp32); "
                        "default cuda when available")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file for the results (then stdout gets a short summary; without it, the JSON)")
    args = p.parse_args(argv)
    if args.rows < 2 or args.rows % 2:
        p.error(f"--rows must be an even number >= 2 (the split check halves the batch), got {args.rows}")
    if args.seq_len < 2:
        p.error(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.data is not None and args.teacher == "tiny":
        p.error("--data needs a real --teacher (its tokenizer); the tiny model takes random token ids")
    if args.repeats < 2:
        p.error(f"--repeats must be >= 2, got {args.repeats}")
    if not all(math.isfinite(e) and 0 < e <= 1 for e in args.perturb):
        p.error(f"--perturb takes relative perturbations in (0, 1], e.g. --perturb=1e-4; got {args.perturb}")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.out is not None:
        problem = _out_problem(args.out)
        if problem:
            p.error(problem)
    try:
        device = torch.device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"device type {device.type!r} is neither cpu nor cuda")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device!r} is not usable here: {exc}; use --device cpu or a visible cuda:<i>")

    try:
        teacher, student, tokenizer, mixers = load_models(args, device)
        batch = make_batch(args, tokenizer, teacher.config.vocab_size, device)
    except HybridizeError as exc:  # a missing teacher, data or mixers file, unreadable text: named, no traceback
        raise SystemExit(f"stage2_gradient.py: {exc}") from None
    git = git_state()
    result = {
        "benchmark": "benchmarks/stage2_gradient.py",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["stage2_gradient.py", *argv]),
        "git_commit": git["commit"],
        "uncommitted_changes": git["uncommitted_changes"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "teacher": args.teacher,
        "stage1_mixers": str(mixers) if mixers else None,
        "batch": list(batch.shape),
        "fast_backends": {"lightning": backend.lightning_backend(device)},
    }
    t0 = time.time()
    calls = [stage2_gradient(teacher, student, batch) for _ in range(args.repeats)]
    loss, base = calls[-1]
    result["loss"] = [c[0] for c in calls]
    result["grad_norm"] = [compare(c[1], base)["norm_a"] for c in calls]
    result["repeat"] = [compare(c[1], base) for c in calls[:-1]]
    if "split" not in args.skip:
        result["split"] = compare(stage2_gradient(teacher, student, batch, micro=2)[1], base)
    if "reference" not in args.skip:
        with backend.force_reference():
            ref_loss, ref = stage2_gradient(teacher, student, batch)
        result["reference"] = {"loss": ref_loss, **compare(base, ref)}
        if result["fast_backends"]["lightning"] == "reference":
            result["reference"]["note"] = ("no fla on this device: Lightning Attention runs its reference in both; only the "
                                           "softmax attention differs (SDPA against the eager reference)")
    if "fp32" not in args.skip:
        f_loss, fp32 = stage2_gradient(teacher, student, batch, autocast=False)
        result["fp32"] = {"loss": f_loss, **compare(base, fp32)}
        if device.type != "cuda":
            result["fp32"]["note"] = "the trainer's bf16 autocast is CUDA-only: both gradients are fp32 here"
    if "perturb" not in args.skip and args.perturb:
        result["perturb"] = weight_perturbation(teacher, student, batch, args.perturb)
    if "kernels" not in args.skip:
        result["kernels"] = kernel_repeatability(student, batch, device)
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    if args.out is None:
        print(text)
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    except OSError as exc:
        raise SystemExit(f"stage2_gradient.py: cannot write --out {args.out}: {exc}") from None
    print(f"loss {result['loss'][-1]:.5f}, gradient norm {result['grad_norm'][-1]:.4g}")
    for name in ("repeat", "split", "reference", "fp32", "perturb"):
        for row in (result[name] if isinstance(result.get(name), list) else [result[name]] if name in result else []):
            label = f"{name} eps {row['eps']:g}" if "eps" in row else name
            print(f"  {label:<18} relative difference {row['rel_diff']:.3g}, cosine {row['cos']:.4f}")
    for name, row in result.get("kernels", {}).items():
        print(f"  kernel {name:<20} {'bitwise equal' if row['bitwise_equal'] else 'max rel diff ' + format(row['max_rel_diff'], '.3g')}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("stage2_gradient.py: interrupted, nothing written", file=sys.stderr)
        raise SystemExit(130) from None
