"""Fused Triton block scoring (``hybridize.ops.triton_select``) against the torch reference (SPEC 1c).

The CPU checks (``tests/triton_select_checks.py``) run the Triton kernels on CPU tensors through Triton's
interpreter, in a child process started with ``TRITON_INTERPRET=1`` (triton fixes the mode when it is
imported, which this process has usually done already), or in this process when it already runs
triton's interpreter. They are skipped when triton is not installed (as in CI). The backend-choice and
fallback tests need no triton. The ``gpu`` test compares the compiled kernel on CUDA with the reference
(GPU machine: ``pytest -q -m gpu tests/test_triton_select.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridize.ops import sparse_attention as sa
from hybridize.ops import triton_select as ts
from hybridize.ops.backend import force_reference
from hybridize.ops.sparse_attention import SparseConfig, compress_keys, select_block_indices

sys.path.insert(0, str(Path(__file__).parent))
import triton_select_checks as checks  # noqa: E402

_needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    """Every CPU check's outcome, run once per module (in a ``TRITON_INTERPRET=1`` child if need be)."""
    if checks.interpreter_ready():
        return checks.run()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, str(Path(checks.__file__))], env=env, capture_output=True, text=True, timeout=3000
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        pytest.fail(f"interpreter checks failed to run (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@_needs_triton
@pytest.mark.parametrize("name", list(checks.CHECKS))
def test_fused_interpreted(interpreter_results, name):
    """fused_block_scores == _window_block_scores (rel 2e-6 in fp32, 1e-3 for bf16/fp16 inputs) and fused selection == torch selection (exact)."""
    assert interpreter_results[name] == "ok", interpreter_results[name]


def test_selection_backend_choice(monkeypatch):
    """CPU -> torch; CUDA -> triton when installed, torch when forced / missing / broken (no GPU needed)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(sa, "_fused_broken", None)
    assert sa._selection_backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(ts, "triton_available", lambda: True)
    assert sa._selection_backend(cuda) == "triton"
    with force_reference():
        assert sa._selection_backend(cuda) == "torch"
    monkeypatch.setattr(sa, "_fused_broken", "RuntimeError: x")
    assert sa._selection_backend(cuda) == "torch"
    monkeypatch.setattr(sa, "_fused_broken", None)
    monkeypatch.setattr(ts, "triton_available", lambda: False)
    assert sa._selection_backend(cuda) == "torch"


def test_fused_failure_falls_back(monkeypatch):
    """A kernel that raises is reported once and the torch scores are returned (no triton needed)."""
    monkeypatch.setattr(sa, "_fused_broken", None)

    def broken(*args, **kwargs):
        raise RuntimeError("no GPU compiler")

    monkeypatch.setattr(ts, "fused_block_scores", broken)
    q, _, ck, visible, nb = checks._inputs(1, 4, 2, 9, 400, 64, torch.float32, checks.SALA)
    got = sa._block_scores(q, ck, visible, int(visible.max()), nb, checks.SALA, None, "triton")
    assert torch.equal(got, sa._window_block_scores(q, ck, visible, nb, checks.SALA, 64**-0.5))
    assert sa._fused_broken is not None and "no GPU compiler" in sa._fused_broken


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_scores_cuda(dtype):
    """The compiled kernel on CUDA against the torch reference on CUDA (checks.SALA sizes, 16 heads per group)."""
    pytest.importorskip("triton")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for b, hq, hkv, tq, tk, d in [(1, 32, 2, 1, 20000, 128), (2, 32, 2, 333, 9000, 128), (1, 8, 8, 1000, 5000, 64)]:
            gen = torch.Generator(device="cuda").manual_seed(tq)
            q = torch.randn(b, hq, tq, d, device="cuda", generator=gen).to(dtype)
            k = torch.randn(b, hkv, tk, d, device="cuda", generator=gen).to(dtype)
            ck = compress_keys(k, checks.SALA.kernel_size, checks.SALA.kernel_stride)
            visible = sa._visible_windows(torch.arange(tk - tq, tk, device="cuda"), checks.SALA)
            nb = -(-tk // checks.SALA.block_size)
            ref = sa._window_block_scores(q, ck, visible, nb, checks.SALA, d**-0.5)
            out = ts.fused_block_scores(q, ck, visible, nb, checks.SALA, d**-0.5)
            rel = ((out - ref).abs() / ref.clamp(min=1e-30)).max().item()
            # bf16: the two roundings of one fp32 logit may differ by one bf16 step when the fp32 sums differ
            assert rel < (2e-5 if dtype == torch.float32 else 5e-2), rel
            assert torch.equal(out == 0, ref == 0)
            cfg = SparseConfig(dense_len=0)
            fused = select_block_indices(q, k, cfg)
            with force_reference():
                expected = select_block_indices(q, k, cfg)
            same = (fused == expected).all(-1).float().mean().item()
            if dtype == torch.float32:
                assert same == 1.0
            else:  # near-ties at the top-k boundary may flip with a bf16 rounding step; report, bound
                assert same > 0.99, same
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
