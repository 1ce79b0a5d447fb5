"""Softmax attention with optional HyPE query scaling (SPEC 1b), on torch SDPA.

HyPE (HypeNet paper, arXiv 2601.22156, Sec. 3.2): attention layers are NoPE and their queries are
multiplied by ``s_t = log(t + a) / log(a)`` at absolute position t, which keeps attention entropy in check
past the training length.

Dispatch (:mod:`hybridize.ops.backend`): the fast path is torch SDPA everywhere (flash / memory-efficient
kernels on CUDA, with ``is_causal=True`` when no mask is needed and ``enable_gqa=True`` instead of copying
KV heads); the reference path (:func:`eager_attention`) is plain matmul + softmax in fp32. Packed
variable-length batches (``cu_seqlens``, batch of 1) are block-diagonal causal: the fast path runs one
causal SDPA call per sequence, the reference applies the block-diagonal mask. A chunk of queries over a
longer cache (chunked prefill) runs :func:`prefill_chunk_attention`, whose implementation (``sdpa``,
``split`` or ``flex``) is chosen by ``HYBRIDIZE_PREFILL_ATTENTION`` or :func:`use_prefill_attention`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import backend
from .lightning import check_cu_seqlens

__all__ = [
    "hype_scale",
    "attention_mask_4d",
    "varlen_causal_mask",
    "softmax_attention",
    "eager_attention",
    "decode_attention",
    "DECODE_ATTENTION_IMPLS",
    "prefill_chunk_attention",
    "prefill_attention",
    "use_prefill_attention",
    "prefill_attention_error",
    "sdpa_backend",
    "sdpa_with_lse",
    "offset_causal_block_mask",
    "PREFILL_ATTENTION_IMPLS",
    "PREFILL_ATTENTION_ENV",
    "LSE_KERNELS",
]

# SDPA grew `enable_gqa` in torch 2.5; before that KV heads are repeated.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
try:  # torch >= 2.3: lower-right causal bias that SDPA dispatches to flash without a materialised mask
    from torch.nn.attention.bias import causal_lower_right as _LOWER_RIGHT
except ImportError:  # pragma: no cover - older torch
    _LOWER_RIGHT = None
_lower_right_error: str | None = None  # set when the lower-right causal SDPA path failed once

logger = logging.getLogger("hybridize")


def hype_scale(positions: torch.Tensor, base: float) -> torch.Tensor:
    """HyPE factors ``log(t + a) / log(a)`` (fp32, same shape as ``positions``, which are token indices >= 0).

    Raises:
        ValueError: if ``base <= 1``.
    """
    if base <= 1:
        raise ValueError(f"HyPE base a must be > 1, got {base}")
    return torch.log(positions.float() + base) / math.log(base)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean ``[B, 1, q_len, kv_len]`` mask (True = may attend) for causal attention over a cache.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``attention_mask`` is the 2-D ``[B, kv_len]``
    padding mask (1 = real token) or None. A query whose every key is masked (a padding query) is allowed
    to see itself so SDPA stays finite; real queries never see padded keys. Returns None when there is no
    padding: :func:`softmax_attention` then applies plain causal attention aligned to the last key
    (``is_causal=True`` for a full pass, no mask at all for one decode token).

    Raises:
        ValueError: if ``attention_mask`` does not have ``kv_len`` columns.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but past + current tokens = {kv_len}; "
            "pass the mask for the whole sequence so far (as generate does)"
        )
    mask = _causal_mask(q_len, kv_len, device)[None, None]  # [1, 1, q, kv]
    mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    past = kv_len - q_len
    qpos = torch.arange(past, kv_len, device=device).view(q_len, 1)
    kpos = torch.arange(kv_len, device=device).view(1, kv_len)
    return mask | (kpos == qpos)[None, None]


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[q_len, kv_len]`` bool, causal with the queries aligned to the last keys (lower-right)."""
    past = kv_len - q_len
    qpos = torch.arange(past, kv_len, device=device).view(q_len, 1)
    kpos = torch.arange(kv_len, device=device).view(1, kv_len)
    return kpos <= qpos


def varlen_causal_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, 1, T, T]`` (bool, True = may attend) of packed sequences.

    Token i may attend to token j iff both lie in the same sequence of ``cu_seqlens`` (``[N + 1]`` int
    offsets ending at ``total``) and j <= i.

    Raises:
        ValueError: on invalid offsets (see :func:`~hybridize.ops.lightning.check_cu_seqlens`).
    """
    offsets = check_cu_seqlens(cu_seqlens, total)
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return ((seg[:, None] == seg[None, :]) & _causal_mask(total, total, device))[None, None]


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return k, v


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference softmax attention: ``softmax(q k^T * scale + mask) v`` computed in fp32.

    Arguments and result as :func:`softmax_attention` (``mask`` None = causal aligned to the last key).
    Memory is O(B Hq Tq Tk): for tests and small inputs.
    """
    k, v = _repeat_kv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is None:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def _lower_right_sdpa(q, k, v, scale):
    """Today's chunk-over-cache path (``impl="sdpa"`` of :func:`prefill_chunk_attention`): one SDPA call with
    torch's lower-right ``CausalBias``; an explicit ``[Tq, Tk]`` mask if that fails once."""
    global _lower_right_error
    tq, tk = q.shape[2], k.shape[2]
    if _LOWER_RIGHT is not None and _SDPA_GQA and _lower_right_error is None:
        # On CUDA torch's CausalBias calls the flash kernel (FlashAttention-2) directly, in its native
        # lower-right causal mode with native GQA: nothing of size [tq, tk] is built, K/V are never repeated.
        # Note: that is FA2 even where plain SDPA would pick cuDNN (Hopper, cuDNN > 9.15). Elsewhere the
        # [tq, tk] boolean mask is materialised (bounded by chunk * context).
        try:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=_LOWER_RIGHT(tq, tk), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )
        except RuntimeError as exc:  # a kernel this torch build lacks: fall back to an explicit mask, once
            if "out of memory" in str(exc).lower():
                raise
            _lower_right_error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "attention: lower-right causal SDPA failed (%s); chunks over a cache use an explicit "
                "[chunk, T] mask from now on", _lower_right_error[:300]
            )
    k, v = _repeat_kv(q, k, v)  # an explicit mask rules out flash; the memory-efficient kernel needs equal heads
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(tq, tk, q.device), scale=scale)


def _sdpa(q, k, v, mask, scale):
    tq, tk = q.shape[2], k.shape[2]
    if mask is None and tq not in (1, tk):
        # Chunked prefill over a cache: causal aligned to the last key (lower-right); SDPA's is_causal is
        # top-left for tq < tk. The implementation is selectable (HYBRIDIZE_PREFILL_ATTENTION).
        return _chunk_over_cache(q, k, v, scale)
    if mask is None:
        kwargs = {"is_causal": tq > 1}
        if q.shape[1] != k.shape[1]:
            if _SDPA_GQA:
                kwargs["enable_gqa"] = True
            else:
                k, v = _repeat_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)
    # an explicit mask rules out the flash kernel; the memory-efficient one needs equal head counts
    k, v = _repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA softmax attention (SDPA fast path, :func:`eager_attention` reference).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` with Hq a multiple of Hkv (GQA: query head i reads
            KV head i // (Hq/Hkv)). Any float dtype; the result has q's dtype.
        mask: from :func:`attention_mask_4d` (bool, True = may attend), or None for causal attention with
            the queries being the last Tq of the Tk keys (``is_causal=True`` when Tq == Tk, no mask when
            Tq == 1).
        scale: softmax temperature; default ``d ** -0.5``.
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B = 1, Tq == Tk, mask None): attention is
            causal within each sequence and never crosses a boundary.

    Returns:
        ``[B, Hq, Tq, d]`` in q's dtype.

    Raises:
        ValueError: on bad ``cu_seqlens``, ``cu_seqlens`` combined with a mask or a cache, or head counts
            that do not divide.
    """
    if cu_seqlens is not None:
        if mask is not None or q.shape[2] != k.shape[2]:
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a padding mask or a KV cache")
        offsets = check_cu_seqlens(cu_seqlens, q.shape[2], q.shape[0])
        if backend.attention_backend(q.device) == "reference":
            return eager_attention(q, k, v, varlen_causal_mask(cu_seqlens, q.shape[2], q.device), scale)
        pieces = [
            _sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scale) for a, b in zip(offsets, offsets[1:])
        ]
        return torch.cat(pieces, dim=2)
    if backend.attention_backend(q.device) == "reference":
        return eager_attention(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale)


# ------------------------------------------------------------------------ decode over a static cache

#: Implementations of :func:`decode_attention`: ``split`` (pure PyTorch split-KV, runs anywhere) and ``flex``
#: (FlexAttention's decoding kernel, compiled on CUDA; eager elsewhere, where only its mask applies).
DECODE_ATTENTION_IMPLS = ("split", "flex")

#: Key/value tile of the ``flex`` decode BlockMask; static caches round their capacity up to a multiple of it.
DECODE_KV_BLOCK = 128

_bmm_out_dtype: bool | None = None  # whether torch.bmm(..., out_dtype=float32) works for bf16/fp16 on CUDA
_compiled_flex_decode = None


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bmm(a, b)`` with fp32 output, without an fp32 copy of ``b`` on CUDA (``aten::bmm.dtype``, torch >= 2.8).

    CPU (or a torch without it): fp32 inputs as they are, lower precision inputs upcast first.
    """
    global _bmm_out_dtype
    if a.dtype == torch.float32:
        return torch.bmm(a, b.float())
    if a.is_cuda and _bmm_out_dtype is not False:
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _bmm_out_dtype = True
            return out
        except (TypeError, RuntimeError):
            _bmm_out_dtype = False
    return torch.bmm(a.float(), b.float())


def _num_splits(length: int, rows: int) -> int:
    """Power-of-two number of key splits: at least 256 keys each, at most 128 splits, dividing ``length``,
    aiming at ~512 (rows x splits) work items so that every SM of a large GPU gets some."""
    splits = 1
    while (
        splits * 2 <= 128
        and length % (splits * 2) == 0
        and length // (splits * 2) >= 256
        and rows * splits < 512
    ):
        splits *= 2
    return splits


def _split_decode(q, k_buf, v_buf, position, scale):
    """Split-KV decode attention in plain PyTorch (see :func:`decode_attention`)."""
    b, hq, _, d = q.shape
    hkv, length = k_buf.shape[1], k_buf.shape[2]
    g = hq // hkv
    bh = b * hkv
    splits = _num_splits(length, bh)
    chunk = length // splits
    # the g query heads of a KV group are the rows of one small matmul per (KV head, split): K/V never repeat
    qg = q.reshape(bh, 1, g, d).expand(bh, splits, g, d).reshape(bh * splits, g, d)
    scores = _bmm_f32(qg, k_buf.reshape(bh * splits, chunk, d).transpose(1, 2)).view(bh, splits, g, chunk)
    invalid = (torch.arange(length, device=q.device) > position).view(1, splits, 1, chunk)
    scores.masked_fill_(invalid, float("-inf"))
    top = scores.amax(dim=(1, 3), keepdim=True)  # key 0 is always valid: finite
    p = scores.sub_(top).mul_(scale).exp_()  # max over scaled scores = scale * max (scale > 0)
    denom = p.sum(dim=(1, 3))  # [bh, g]
    pv = _bmm_f32(p.to(v_buf.dtype).view(bh * splits, g, chunk), v_buf.reshape(bh * splits, chunk, d))
    out = pv.view(bh, splits, g, d).sum(1) / denom[..., None]
    return out.to(q.dtype).reshape(b, hq, 1, d)


_flex_api: dict = {}  # BlockMask, flex_attention and from_kv_blocks keyword arguments, imported on first use


def _load_flex() -> dict:
    """Import FlexAttention once (outside any compiled region: no imports or ``inspect`` under torch.compile)."""
    if not _flex_api:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        params = inspect.signature(BlockMask.from_kv_blocks).parameters
        _flex_api.update(
            BlockMask=BlockMask,
            flex_attention=flex_attention,
            kwargs={"compute_q_blocks": False} if "compute_q_blocks" in params else {},
        )
    return _flex_api


def _flex_decode(q, k_buf, v_buf, position, scale):
    """FlexAttention over the valid prefix of a static cache (see :func:`decode_attention`).

    The BlockMask is built here from the device ``position`` (blocks before the query's block are full,
    its own block is partial with ``kv_idx <= position``), so under ``torch.compile`` the whole function is
    one graph whose only inputs are tensors: no recompilation as the position advances, nothing on the host.
    Call :func:`_load_flex` first.
    """
    api = _flex_api
    b = q.shape[0]
    length = k_buf.shape[2]
    n_blocks = length // DECODE_KV_BLOCK
    own = torch.div(position, DECODE_KV_BLOCK, rounding_mode="floor").to(torch.int32)
    kv_num = torch.ones(b, 1, 1, dtype=torch.int32, device=q.device)
    # partial-block list padded to the full width (only its first entry is used): inductor's CPU lowering
    # requires index tables that cover the whole KV length
    kv_idx = F.pad(own.view(1, 1, 1, 1).expand(b, 1, 1, 1), (0, n_blocks - 1))
    full_num = own.view(1, 1, 1).expand(b, 1, 1).contiguous()
    full_idx = torch.arange(n_blocks, dtype=torch.int32, device=q.device).view(1, 1, 1, n_blocks).expand(b, 1, 1, n_blocks)

    def mask_mod(batch, head, q_idx, kv_idx_):
        return kv_idx_ <= position

    block_mask = api["BlockMask"].from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx.contiguous(),
        BLOCK_SIZE=(DECODE_KV_BLOCK, DECODE_KV_BLOCK),
        mask_mod=mask_mod,
        seq_lengths=(1, length),
        **api["kwargs"],
    )
    return api["flex_attention"](
        q, k_buf, v_buf, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k_buf.shape[1]
    )


def _flex_decode_compiled():
    global _compiled_flex_decode
    if _compiled_flex_decode is None:
        # default dynamic=None: a second cache length recompiles once with a symbolic length
        _compiled_flex_decode = backend.compile_flex(_flex_decode)
    return _compiled_flex_decode


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    position: torch.Tensor,
    *,
    scale: float | None = None,
    impl: str = "split",
) -> torch.Tensor:
    """One decode step of causal GQA attention over a preallocated (static) KV buffer.

    The valid keys are ``0 .. position`` (the new token's own key, already written at ``position``, is the
    last); everything after is ignored whatever it holds (stale or zero). No host synchronisation and no
    shape depends on ``position``, so the call can be captured in a CUDA graph and replayed as the position
    (a device tensor) advances.

    Args:
        q: ``[B, Hq, 1, d]`` query of the new token (any float dtype).
        k_buf, v_buf: ``[B, Hkv, L, d]`` contiguous buffers, Hkv dividing Hq (GQA: query head i reads KV head
            i // (Hq/Hkv)); ``L`` a multiple of 128 for ``impl="flex"``.
        position: 0-d int64 tensor on the device of ``q``, ``0 <= position < L``.
        scale: softmax scale; default ``d ** -0.5``.
        impl: ``"split"``: plain PyTorch split-KV attention (``L`` cut into up to 128 power-of-two slices so a
            large GPU has work for every SM; fp32 scores -- through ``bmm(out_dtype=float32)`` on CUDA, so K/V
            are read once in their own dtype -- one global max, bf16/fp16 probabilities for the value product
            as flash attention does). ``"flex"``: FlexAttention with a BlockMask derived from ``position``
            (compiled with ``torch.compile`` on CUDA: its decoding kernel reads only the blocks up to the
            position; eager elsewhere, where the BlockMask's block lists are ignored and only its mask applies,
            which is exact but materialises ``[B, Hq, 1, L]`` scores).

    Returns:
        ``[B, Hq, 1, d]`` in ``q``'s dtype.

    Raises:
        ValueError: on shapes that do not fit, an unknown ``impl``, a ``scale`` <= 0 (the split path's running
            maximum assumes a positive scale), ``L`` not a multiple of 128 for flex, or a
            ``position`` that is not a 0-d integer tensor (or, off CUDA, lies outside ``[0, L)``).
    """
    b, hq, tq, d = q.shape
    if tq != 1 or k_buf.shape != v_buf.shape or k_buf.shape[0] != b or k_buf.shape[3] != d or hq % k_buf.shape[1]:
        raise ValueError(
            f"decode_attention expects q [B, Hq, 1, d] and k/v buffers [B, Hkv, L, d] with Hkv | Hq; got "
            f"{tuple(q.shape)}, {tuple(k_buf.shape)}, {tuple(v_buf.shape)}"
        )
    if not isinstance(position, torch.Tensor) or position.dim() != 0 or position.dtype.is_floating_point:
        raise ValueError(
            f"decode_attention expects position as a 0-d integer tensor (the new token's index in the buffer), "
            f"got {position!r:.80}"
        )
    if not position.is_cuda and not 0 <= int(position) < k_buf.shape[2]:  # CUDA: no host sync (graph capture)
        raise ValueError(f"position {int(position)} is outside the KV buffer of {k_buf.shape[2]} entries")
    scale = d**-0.5 if scale is None else scale
    if not scale > 0:
        raise ValueError(f"decode_attention needs a softmax scale > 0, got {scale!r}")
    if impl == "split":
        return _split_decode(q, k_buf, v_buf, position, scale)
    if impl == "flex":
        if k_buf.shape[2] % DECODE_KV_BLOCK:
            raise ValueError(f"flex decode needs a buffer length that is a multiple of {DECODE_KV_BLOCK}, got {k_buf.shape[2]}")
        _load_flex()
        if not q.is_cuda:
            return _flex_decode(q, k_buf, v_buf, position, scale)
        # the batch size stays a static size of the compiled kernel: on torch 2.11 + H200 a second batch size
        # in one process (the auto check at batch 1, then a batch-2 decoder) made dynamo recompile with a
        # symbolic batch, and replaying that kernel in a CUDA graph hit an illegal memory access
        # (scripts/device/graph_decode_variants.py); with a static batch each batch size compiles its own.
        # (Not while an outer torch.compile traces this call: mark_static is forbidden there, and the outer
        # compile of GraphDecoder(compile=True) is specialised per decoder anyway.)
        if not torch.compiler.is_compiling():
            for t in (q, k_buf, v_buf):
                torch._dynamo.mark_static(t, 0)
        return _flex_decode_compiled()(q, k_buf, v_buf, position, scale)
    raise ValueError(f"unknown decode attention implementation {impl!r}; choose one of {DECODE_ATTENTION_IMPLS}")


_flex_decode_checks: dict[tuple, str | None] = {}


def flex_decode_mismatch(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, batch: int = 1
) -> str | None:
    """Check once per (device, dtype, heads, kv_heads, head_dim, batch) that ``decode_attention(impl="flex")``
    equals ``impl="split"`` on random data; None when it does, else what differed.

    Why: on torch 2.11 + an H200, compiled FlexAttention with ``compute_q_blocks=False`` BlockMasks gave results
    far from the reference in every GPU test that used it (``benchmarks/results/gpu_tests_h200.json``). A
    wrong kernel must not be chosen silently, so ``GraphDecoder(decode_attention="auto")`` asks this first
    and takes ``split`` when flex disagrees. Costs one compile of the flex decode (seconds) per shape key.

    Args:
        device: where the check runs (the caller's device).
        dtype: the caller's activation dtype (tolerance: :func:`~hybridize.ops.backend.reference_mismatch`).
        heads, kv_heads, head_dim: the attention shape (``kv_heads`` divides ``heads``).
        batch: rows, as the caller will decode them (the check compiles the kernel the caller then uses).

    Returns:
        None, or a one-line description (relative error, or the exception raised by flex).
    """
    key = (device.type, device.index, dtype, heads, kv_heads, head_dim, batch)
    if key not in _flex_decode_checks:
        gen = torch.Generator(device=device).manual_seed(0)
        length, position = 3 * DECODE_KV_BLOCK, 2 * DECODE_KV_BLOCK + 37  # a partial block after two full ones
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
        pos = torch.tensor(position, device=device)
        try:
            with torch.no_grad():
                ref = decode_attention(q.float(), k.float(), v.float(), pos, impl="split")
                problem = backend.reference_mismatch(decode_attention(q, k, v, pos, impl="flex"), ref, dtype)
            _flex_decode_checks[key] = None if problem is None else f"flex decode differs from split: {problem}"
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which falls back
            _flex_decode_checks[key] = f"flex decode failed: {type(exc).__name__}: {str(exc)[:200]}"
    return _flex_decode_checks[key]


# ------------------------------------------------------------- a chunk of queries over a cache (prefill)

#: Implementations of the causal attention of a chunk of queries over a longer cache (chunked prefill), see
#: :func:`prefill_chunk_attention`. ``sdpa`` is today's path and the default until the others are measured.
PREFILL_ATTENTION_IMPLS = ("sdpa", "split", "flex")

#: Environment variable choosing the chunk-over-cache implementation (``sdpa``, ``split`` or ``flex``; read on
#: every call, so it can be set at any time before the prefill); :func:`use_prefill_attention` overrides it.
PREFILL_ATTENTION_ENV = "HYBRIDIZE_PREFILL_ATTENTION"

#: Query and key/value tile of the ``flex`` prefill BlockMask.
PREFILL_FLEX_BLOCK = 128

_prefill_override: list[str] = []  # stack of use_prefill_attention() choices
_prefill_errors: dict[str, str] = {}  # candidate -> first error; that candidate then runs as "sdpa"
_compiled_flex_prefill = None

# torch.nn.attention.SDPBackend values (as torch._fused_sdp_choice returns them) -> names used here
_SDP_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}
#: Kernels :func:`sdpa_with_lse` can run (``None`` there = the one SDPA itself would pick).
LSE_KERNELS = ("cudnn", "flash", "efficient", "math")


def prefill_attention(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """The chunk-over-cache implementation in force now: the innermost :func:`use_prefill_attention` choice,
    else ``$HYBRIDIZE_PREFILL_ATTENTION``, else the default for ``device`` and ``dtype``: ``"split"`` for
    bf16/fp16 on CUDA (measured on an H200 at 256K, one Qwen3-8B layer: 0.97 s against 1.69 s for ``sdpa``,
    and equal to it in the GPU tests, ``benchmarks/results/prefill_attention_h200.json`` and
    ``gpu_tests_h200.json``), ``"sdpa"`` otherwise (fp32 has no fused GQA kernel with a log-sum-exp output;
    also when ``device`` or ``dtype`` is None).

    Raises:
        ValueError: the environment variable names no implementation.
    """
    if _prefill_override:
        return _prefill_override[-1]
    fast = device is not None and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    default = "split" if fast else "sdpa"
    value = os.environ.get(PREFILL_ATTENTION_ENV, "").strip().lower() or default
    if value not in PREFILL_ATTENTION_IMPLS:
        raise ValueError(f"{PREFILL_ATTENTION_ENV}={value!r}: choose one of {PREFILL_ATTENTION_IMPLS}")
    return value


@contextlib.contextmanager
def use_prefill_attention(impl: str | None) -> Iterator[None]:
    """Context manager: chunks over a cache use ``impl`` (``sdpa``/``split``/``flex``) inside the block.

    ``None`` leaves the current choice (environment or default) in force. Nestable; not thread-local.

    Raises:
        ValueError: an unknown ``impl``.
    """
    if impl is None:
        yield
        return
    if impl not in PREFILL_ATTENTION_IMPLS:
        raise ValueError(f"unknown prefill attention {impl!r}; choose one of {PREFILL_ATTENTION_IMPLS}")
    _prefill_override.append(impl)
    try:
        yield
    finally:
        _prefill_override.pop()


def prefill_attention_error(impl: str) -> str | None:
    """Why candidate ``impl`` fell back to ``sdpa`` in this process (its first error), or None."""
    return _prefill_errors.get(impl)


def _chunk_over_cache(q, k, v, scale):
    """Dispatch of :func:`_sdpa` for ``1 < Tq < Tk`` without a mask: the selected implementation, logged once;
    a candidate that fails (other than out of memory) is reported once and replaced by ``sdpa`` from then on."""
    impl = prefill_attention(q.device, q.dtype)
    if impl != "sdpa" and impl not in _prefill_errors:
        try:
            out = prefill_chunk_attention(q, k, v, scale=scale, impl=impl)
            backend._log_once(f"prefill-{impl}-{q.device.type}", logging.INFO,
                              "attention: chunk over a cache on %s: %s", q.device.type, _PREFILL_DESCRIPTIONS[impl])
            return out
        except Exception as exc:  # a kernel or compiler this install lacks must not stop the prefill
            if "out of memory" in str(exc).lower():
                raise
            _prefill_errors[impl] = f"{type(exc).__name__}: {str(exc)[:500]}"
            logger.warning("attention: prefill attention %r failed (%s); using 'sdpa' from now on",
                           impl, _prefill_errors[impl][:300])
    backend._log_once(f"prefill-sdpa-{q.device.type}", logging.INFO,
                      "attention: chunk over a cache on %s: %s", q.device.type, _PREFILL_DESCRIPTIONS["sdpa"])
    return _lower_right_sdpa(q, k, v, scale)


_PREFILL_DESCRIPTIONS = {
    "sdpa": "sdpa (one SDPA call with torch's lower-right CausalBias)",
    "split": "split (SDPA kernel over the prefix + causal SDPA kernel over the chunk, merged by log-sum-exp)",
    "flex": "flex (FlexAttention with an offset causal BlockMask; compiled on CUDA)",
}


def prefill_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    impl: str = "sdpa",
) -> torch.Tensor:
    """Causal GQA attention of a chunk of queries over a cache: queries at positions ``P .. P + Tq - 1`` against
    keys ``0 .. P + Tq - 1`` (``P = Tk - Tq``, query t sees keys ``<= P + t``: causal aligned to the last key).

    What a chunked prefill runs in every attention layer (and the dense regime of sparse layers) for each chunk
    after the first. HyPE-scaled queries are just queries here (the layer scales them before).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` with ``1 <= Tq <= Tk`` and Hkv dividing Hq (query head
            i reads KV head i // (Hq/Hkv)); last dimension contiguous (views of a static cache are fine).
            float32, bfloat16 or float16 (the fused CUDA kernels of ``split`` need 16-bit inputs; in float32
            SDPA itself falls back to the memory-efficient or math kernel, which ``split`` then uses too).
        scale: softmax scale; default ``d ** -0.5``.
        impl: ``"sdpa"``: one SDPA call with torch's lower-right ``CausalBias`` (on CUDA torch calls the
            FlashAttention-2 kernel directly; elsewhere a ``[Tq, Tk]`` mask). ``"split"``: the chunk against the
            prefix ``[0, P)`` with no mask, and against its own ``Tq`` keys with ``is_causal=True`` (square, so
            top-left = lower-right), each on the kernel SDPA itself would pick (cuDNN / flash / memory-efficient
            on CUDA, flash on CPU; see :func:`sdpa_with_lse`), merged exactly with their log-sum-exps in fp32:
            ``o = o_own + sigmoid(lse_prefix - lse_own) * (o_prefix - o_own)``. ``"flex"``: FlexAttention with a
            BlockMask of ``kv_idx <= q_idx + P`` built from block arithmetic (128 x 128 tiles: full blocks below
            the diagonal, at most two partial ones per query tile), GQA through ``enable_gqa``; compiled
            (``torch.compile(dynamic=True)``, once per process) on CUDA, eager elsewhere (exact, but eager flex
            materialises the ``[B, Hq, Tq, Tk]`` scores).

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: shapes that do not fit, or an unknown ``impl``. Kernel and compiler errors propagate
        (:func:`softmax_attention` catches them and falls back to ``sdpa``).
    """
    b, hq, tq, d = q.shape
    if (
        k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d
        or hq % k.shape[1] or not 1 <= tq <= k.shape[2]
    ):
        raise ValueError(
            f"prefill_chunk_attention expects q [B, Hq, Tq, d] and k/v [B, Hkv, Tk, d] with Hkv | Hq and "
            f"1 <= Tq <= Tk; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if impl == "sdpa":
        return _lower_right_sdpa(q, k, v, scale)
    if impl == "split":
        return _split_prefill(q, k, v, scale)
    if impl == "flex":
        _load_flex()
        fn = _flex_prefill_compiled() if q.is_cuda else _flex_prefill
        prefix = torch.tensor(k.shape[2] - tq, dtype=torch.int64, device=q.device)
        return fn(q, k, v, prefix, d**-0.5 if scale is None else scale)
    raise ValueError(f"unknown prefill attention {impl!r}; choose one of {PREFILL_ATTENTION_IMPLS}")


# ------------------------------------------------------------------ split: two SDPA kernels + LSE merge


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> str:
    """The kernel ``F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=...)`` would run:
    ``"cudnn"``, ``"flash"``, ``"efficient"`` or ``"math"`` (torch's own choice, ``torch._fused_sdp_choice``;
    honours ``torch.nn.attention.sdpa_kernel`` and ``TORCH_CUDNN_SDPA_DEPRIORITIZED``). ``"math"`` when torch
    cannot say."""
    try:
        kwargs = {"enable_gqa": q.shape[1] != k.shape[1]} if _SDPA_GQA else {}
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, **kwargs)
    except (AttributeError, TypeError, RuntimeError):
        return "math"
    return _SDP_BACKENDS.get(int(choice), "math")


def sdpa_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA that also returns the log-sum-exp of each query's scaled scores (natural log).

    Public SDPA returns no LSE, so this calls the private aten op of the kernel SDPA would pick (the same call
    SDPA makes, with the LSE requested): ``aten._scaled_dot_product_cudnn_attention`` (compute_log_sumexp),
    ``aten._scaled_dot_product_flash_attention`` (CUDA; head dim zero-padded to a multiple of 8 as SDPA does) or
    ``aten._scaled_dot_product_flash_attention_for_cpu``, ``aten._scaled_dot_product_efficient_attention``
    (compute_log_sumexp; its LSE is padded to 32 rows, cut here). ``"math"``: plain PyTorch, fp32 scores of
    each KV group's query heads (K/V never repeated; memory O(B Hq Tq Tk): small inputs and fallbacks).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]``, Hkv dividing Hq (GQA natively where the kernel has it).
        is_causal: top-left causal mask (use it with Tq == Tk only, where it equals lower-right).
        scale: softmax scale; default ``d ** -0.5``.
        kernel: one of :data:`LSE_KERNELS`, or None for :func:`sdpa_backend`'s choice.

    Returns:
        ``(out [B, Hq, Tq, d] in q's dtype, lse [B, Hq, Tq] float32)``.

    Raises:
        ValueError: an unknown ``kernel``. RuntimeError from a kernel that cannot run these inputs (e.g.
        ``"flash"`` with float32, or on a CPU tensor for ``"cudnn"``).
    """
    if kernel is None:
        kernel = sdpa_backend(q, k, v, is_causal)
    if kernel not in LSE_KERNELS:
        raise ValueError(f"unknown SDPA kernel {kernel!r}; choose one of {LSE_KERNELS}")
    b, hq, tq, d = q.shape
    if kernel == "math":
        return _math_with_lse(q, k, v, is_causal, scale)
    if q.shape[1] != k.shape[1] and not _SDPA_GQA:  # torch < 2.5: the fused kernels take equal head counts
        k, v = _repeat_kv(q, k, v)
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )[:2]
    elif kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, is_causal, scale=scale
        )[:2]
    elif q.is_cuda:  # flash
        pad = -d % 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=d**-0.5 if scale is None else scale
        )[:2]
        out = out[..., :d]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse.reshape(b, hq, -1)[..., :tq].float()


def _math_with_lse(q, k, v, is_causal, scale):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, g * tq, d).float()
    scores = (qg @ k.float().transpose(-1, -2)).mul_(scale).view(b, hkv, g, tq, tk)
    if is_causal:
        scores.masked_fill_(~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, hkv, g, tq]
    p = scores.sub_(lse[..., None]).exp_().view(b, hkv, g * tq, tk)
    out = (p @ v.float()).view(b, hq, tq, d)
    return out.to(q.dtype), lse.reshape(b, hq, tq)


def _split_prefill(q, k, v, scale):
    """``impl="split"`` of :func:`prefill_chunk_attention`."""
    tq, tk = q.shape[2], k.shape[2]
    prefix = tk - tq
    own, own_lse = sdpa_with_lse(q, k[:, :, prefix:], v[:, :, prefix:], is_causal=True, scale=scale)
    if prefix == 0:
        return own
    past, past_lse = sdpa_with_lse(q, k[:, :, :prefix], v[:, :, :prefix], is_causal=False, scale=scale)
    for part in ("prefix", "chunk"):
        backend._log_once(f"split-{part}-{q.device.type}", logging.INFO, "attention: split prefill, %s part on %s: "
                          "%s kernel", part, q.device.type, lambda part=part: _split_kernel_name(q, k, tq, part))
    # both LSEs are finite (every query sees at least its own key and, with a prefix, key 0), so the weight of
    # the prefix part is sigmoid(lse_past - lse_own) = Z_past / (Z_past + Z_own)
    weight = torch.sigmoid(past_lse - own_lse).unsqueeze(-1)
    out = past.float().sub_(own).mul_(weight).add_(own)
    return out.to(q.dtype)


def _split_kernel_name(q, k, tq, part):
    prefix = k.shape[2] - tq
    if part == "prefix":
        return sdpa_backend(q, k[:, :, :prefix], k[:, :, :prefix], False)
    return sdpa_backend(q, k[:, :, prefix:], k[:, :, prefix:], True)


# ----------------------------------------------------------------------------- flex: offset causal mask


def offset_causal_block_mask(tq: int, tk: int, prefix: torch.Tensor):
    """FlexAttention ``BlockMask`` of ``kv_idx <= q_idx + prefix`` for ``tq`` queries over ``tk`` keys.

    Built from block arithmetic, never from a ``[tq, tk]`` mask: with 128 x 128 tiles, query tile i (queries
    ``prefix + 128 i ..``) has every key tile whose last key is ``<= prefix + 128 i`` full (no mask applied) and
    the next 0-2 tiles partial (``mask_mod`` applied); the last query tile, when ``tq`` cuts it short, has all
    its tiles partial. The same tables as ``create_block_mask`` (tested), without its ``[tq, tk]`` evaluation.
    Index tables are full width (inductor's CPU flex lowering needs them to cover the whole KV length).
    Broadcast over batch and heads (``[1, 1, ...]``).

    Args:
        tq, tk: query and key counts, ``1 <= tq <= tk`` (ints, or SymInts under torch.compile).
        prefix: 0-d int64 tensor ``tk - tq`` on the device (a tensor, so that a compiled caller does not
            recompile as it changes). Call :func:`_load_flex` first.
    """
    api = _flex_api
    device = prefix.device
    bs = PREFILL_FLEX_BLOCK
    q_blocks, kv_blocks = (tq + bs - 1) // bs, (tk + bs - 1) // bs
    i = torch.arange(q_blocks, device=device)
    first = prefix + i * bs  # position of the first query of each query tile
    last = prefix + torch.clamp((i + 1) * bs, max=tq) - 1  # of its last real query
    # full: tiles whose every key is <= first. A query tile cut short by tq (the last one) gets none, as in
    # create_block_mask, which counts its padding rows as masked
    full_num = torch.where((i + 1) * bs <= tq, torch.div(first + 1, bs, rounding_mode="floor"), 0)
    partial_num = torch.div(last, bs, rounding_mode="floor") + 1 - full_num  # 0-2 diagonal tiles (+ full, cut)
    cols = torch.arange(kv_blocks, device=device)
    partial_idx = torch.clamp(full_num[:, None] + cols[None, :], max=kv_blocks - 1)
    full_idx = cols[None, :].expand(q_blocks, kv_blocks)

    def mask_mod(batch, head, q_idx, kv_idx):
        return kv_idx <= q_idx + prefix

    def table(t):
        return t.to(torch.int32)[None, None].contiguous()

    return api["BlockMask"].from_kv_blocks(
        table(partial_num),
        table(partial_idx),
        table(full_num),
        table(full_idx),
        BLOCK_SIZE=(bs, bs),
        mask_mod=mask_mod,
        seq_lengths=(tq, tk),
        **api["kwargs"],
    )


def _flex_prefill(q, k, v, prefix, scale):
    """FlexAttention of a chunk over a cache (see :func:`prefill_chunk_attention`); ``prefix`` = P as a 0-d
    int64 tensor on q's device. The BlockMask (:func:`offset_causal_block_mask`) is built inside, so under
    ``torch.compile`` every input is a tensor or a size. Call :func:`_load_flex` first."""
    block_mask = offset_causal_block_mask(q.shape[2], k.shape[2], prefix)
    return _flex_api["flex_attention"](
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _flex_prefill_compiled():
    global _compiled_flex_prefill
    if _compiled_flex_prefill is None:
        # dynamic=True: chunk after chunk the cache length changes; one symbolic compile instead of a static one
        # and a recompile inside the first timed prefill
        _compiled_flex_prefill = backend.compile_flex(_flex_prefill, dynamic=True)
    return _compiled_flex_prefill
