"""CPU checks of the fused Triton block scoring through Triton's interpreter (used by test_triton_select.py).

Triton decides at *its own import* whether its ``@triton.jit`` functions (``tl.zeros``, ``tl.max`` ...) are
interpreted, and the test process imports triton early (transformers -> torch._dynamo), so these checks run
in a process started with ``TRITON_INTERPRET=1``::

    TRITON_INTERPRET=1 PYTHONPATH=src python tests/triton_select_checks.py [NAME ...]

prints one JSON object ``{name: "ok" | traceback}`` on its last line (every check when no NAME is given).
:func:`interpreter_ready` says whether the current process can run them in-process instead.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from hybridize.ops import sparse_attention as sa
from hybridize.ops import triton_select as ts
from hybridize.ops.backend import force_reference
from hybridize.ops.sparse_attention import SparseConfig, compress_keys, select_block_indices

SALA = SparseConfig()
#: small sparse sizes so that CPU-sized inputs have many candidate blocks and every query is sparse
SMALL = SparseConfig(window_size=128, topk=3, dense_len=0)
RTOL = 2e-6


def interpreter_ready() -> bool:
    """Whether triton is imported in interpreter mode in this process (its jit'd stdlib interpreted)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "") not in ("1", "true", "True"):
        return False
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def _numpy_index_shim() -> None:
    """numpy >= 2.4 refuses int() of the 1-element arrays Triton 3.6's interpreter keeps scalars in, which
    breaks ``range()`` over a runtime bound; index through the first element instead (interpreter only)."""
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_hybridize_index_shim", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._hybridize_index_shim = True


def _inputs(b, hq, hkv, tq, tk, d, dtype, cfg, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # [B, T, H, d] projections viewed as [B, H, T, d]: non-contiguous strides
        q = torch.randn(b, tq, hq, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen).to(dtype)
    ck = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    visible = sa._visible_windows(torch.arange(tk - tq, tk), cfg)
    return q, k, ck, visible, -(-tk // cfg.block_size)


#: worst errors seen, reported by the runner
STATS: dict = {}


def _compare(q, ck, visible, n_blocks, cfg, scale=None, rtol=RTOL):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref = sa._window_block_scores(q, ck, visible, n_blocks, cfg, scale)
    out = ts.fused_block_scores(q, ck, visible, n_blocks, cfg, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    err = (out - ref).abs()
    rel = (err / ref.clamp(min=1e-30)).max().item()
    key = str(q.dtype).removeprefix("torch.")
    worst = STATS.setdefault(key, {"max_abs": 0.0, "max_rel": 0.0})
    worst["max_abs"], worst["max_rel"] = max(worst["max_abs"], err.max().item()), max(worst["max_rel"], rel)
    assert torch.all(err <= rtol * ref + 1e-7), f"max abs {err.max():.3g}, max rel {rel:.3g}"
    assert torch.equal(out == 0, ref == 0)  # the same blocks have no visible window
    return out, ref


# (b, hq, hkv, tq, tk, d): ragged Tq / Nc / n_blocks, queries at the end of longer sequences, early
# queries with no visible window (Tk - Tq < kernel_size - 1), g in {1, 2, 4, 8, 16}, d in {64, 128}
SHAPES = [
    (1, 4, 4, 1, 1000, 64),
    (2, 4, 2, 5, 300, 128),
    (2, 8, 2, 63, 700, 64),
    (1, 8, 1, 63, 80, 128),
    (1, 16, 2, 200, 1100, 64),
    (2, 16, 1, 200, 230, 64),
    (1, 32, 2, 5, 2000, 128),
]
OTHER_SIZES = {
    "overhang3": SparseConfig(kernel_size=64, kernel_stride=16, block_size=32, window_size=128),  # r-1 > windows/block
    "pb3": SparseConfig(kernel_size=32, kernel_stride=16, block_size=48, window_size=96),  # 3 windows per block
    "r1": SparseConfig(kernel_size=16, kernel_stride=16, block_size=64, window_size=128),  # no overhang
    "pb16": SparseConfig(kernel_size=32, kernel_stride=8, block_size=128, window_size=256),  # 16 windows per block
}


def check_scores_fp32(i):
    b, hq, hkv, tq, tk, d = SHAPES[i]
    q, _, ck, visible, nb = _inputs(b, hq, hkv, tq, tk, d, torch.float32, SALA)
    _compare(q, ck, visible, nb, SALA)


def check_scores_half(i, dtype):
    """bf16/fp16: the dot is rounded to the input dtype as torch's matmul rounds the reference logits.

    CPU torch's half-precision matmul is "fp32 sum, rounded once" only up to the order of the sum, which
    depends on the CPU (an AMX Xeon's bf16 matmul lands one bf16 step off the kernel's for a few logits: a
    score off by 1.3e-4 relative, where the CPUs of earlier sessions matched to 2e-6; fp16 is one step off for ~0.1% of the
    logits everywhere), hence a tolerance of 1e-3 for both."""
    b, hq, hkv, tq, tk, d = SHAPES[i]
    q, _, ck, visible, nb = _inputs(b, hq, hkv, tq, tk, d, getattr(torch, dtype), SALA, seed=1)
    _compare(q, ck, visible, nb, SALA, rtol=1e-3)


def check_scores_other_sizes(name):
    cfg = OTHER_SIZES[name]
    q, _, ck, visible, nb = _inputs(2, 4, 2, 37, 900, 64, torch.float32, cfg, seed=2)
    _compare(q, ck, visible, nb, cfg)


def check_layouts_and_edges():
    # non-contiguous q; a head dim that is no power of two (padded inside the kernel)
    q, _, ck, visible, nb = _inputs(1, 4, 2, 20, 400, 64, torch.float32, SALA, seed=3, transposed=True)
    _compare(q, ck, visible, nb, SALA)
    q, _, ck, visible, nb = _inputs(1, 4, 2, 20, 400, 24, torch.float32, SALA, seed=3)
    _compare(q, ck, visible, nb, SALA)
    # no query sees a window
    q, _, ck, visible, nb = _inputs(1, 4, 2, 20, 30, 64, torch.float32, SALA)
    assert int(visible.max()) == 0
    assert torch.equal(ts.fused_block_scores(q, ck, visible, nb, SALA, 0.1), torch.zeros(1, 2, 20, nb))
    # visible counts above Nc are clamped; an explicit scale
    q, _, ck, visible, nb = _inputs(1, 4, 2, 20, 400, 64, torch.float32, SALA)
    _compare(q, ck, visible + 1000, nb, SALA, scale=0.125)
    try:
        ts.fused_block_scores(q, ck.to(torch.bfloat16), visible, nb, SALA, 0.125)
    except ValueError:
        pass
    else:
        raise AssertionError("mixed dtypes must raise")


def check_exact_ties():
    """Zero queries: every visible window has the same probability, so blocks tie exactly (the tie rule's case)."""
    q, _, ck, visible, nb = _inputs(1, 8, 2, 16, 1000, 64, torch.float32, SALA)
    out, _ = _compare(torch.zeros_like(q), ck, visible, nb, SALA)
    full = out[..., 1:-2]  # blocks whose windows all exist and are visible to every query
    assert torch.equal(full, full[..., :1].expand_as(full))


def _selection(q, k, cfg, backend, **kwargs):
    old_backend, old_broken = sa._selection_backend, sa._fused_broken
    sa._selection_backend, sa._fused_broken = (lambda device: backend), None
    try:
        out = select_block_indices(q, k, cfg, **kwargs)
        assert sa._fused_broken is None, sa._fused_broken  # the fused path really ran
        return out
    finally:
        sa._selection_backend, sa._fused_broken = old_backend, old_broken


def check_selection(tq, tk, dtype):
    """select_block_indices through the fused kernel (and its larger chunks) == the torch path, exactly."""
    gen = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(2, 8, tq, 64, generator=gen).to(getattr(torch, dtype))
    k = torch.randn(2, 2, tk, 64, generator=gen).to(getattr(torch, dtype))
    ref = _selection(q, k, SMALL, "torch")
    assert torch.equal(_selection(q, k, SMALL, "triton"), ref)
    assert torch.equal(_selection(q, k, SMALL, "triton", chunk_size=7), ref)  # chunking never matters


def check_selection_dense_regime():
    """Dense and sparse queries in one chunk (dense_len inside the queries) through the fused path."""
    cfg = SparseConfig(window_size=128, topk=2, dense_len=700)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 300, 64, generator=gen)
    k = torch.randn(1, 2, 1000, 64, generator=gen)
    assert torch.equal(_selection(q, k, cfg, "triton"), _selection(q, k, cfg, "torch"))
    with force_reference():  # on CPU the reference is the torch path anyway
        assert torch.equal(select_block_indices(q, k, cfg), _selection(q, k, cfg, "torch"))


CHECKS = {
    **{f"scores_fp32[{i}]": (check_scores_fp32, (i,)) for i in range(len(SHAPES))},
    **{f"scores_half[{i}-{dt}]": (check_scores_half, (i, dt)) for i in (2, 4) for dt in ("bfloat16", "float16")},
    **{f"scores_sizes[{n}]": (check_scores_other_sizes, (n,)) for n in OTHER_SIZES},
    "layouts_and_edges": (check_layouts_and_edges, ()),
    "exact_ties": (check_exact_ties, ()),
    **{
        f"selection[{tq}-{tk}-{dt}]": (check_selection, (tq, tk, dt))
        for tq, tk in ((1, 3000), (37, 1500), (200, 1200), (129, 129))
        for dt in ("float32", "bfloat16")
    },
    "selection_dense_regime": (check_selection_dense_regime, ()),
}


def run(names=None) -> dict:
    """Run the named checks (all by default): ``{name: "ok" | traceback}`` plus ``"_stats"``."""
    _numpy_index_shim()
    torch.set_num_threads(1)
    results = {}
    for name in names or CHECKS:
        fn, args = CHECKS[name]
        try:
            fn(*args)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported per check
            results[name] = traceback.format_exc()
    results["_stats"] = dict(STATS)
    return results


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:] or None)))
