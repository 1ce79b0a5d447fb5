"""InfLLM-V2 block-sparse attention (SPEC 1c; MiniCPM-SALA, arXiv 2602.11761; InfLLM-V2, arXiv 2509.24663).

Each query token attends to a union of 64-token key blocks instead of the whole past:

* the first ``init_blocks`` blocks (attention sinks);
* the ``local_blocks = window_size // block_size`` most recent blocks: the query's own block (causal
  inside it) and the ``local_blocks - 1`` blocks before it;
* the ``topk`` best-scoring *other* blocks (not init, not local, entirely in the past).

Block scores (computed without gradient, per KV head so that a whole GQA group selects the same blocks):

1. **Compressed keys.** Window ``j`` covers tokens ``[j*stride, j*stride + kernel_size)``; its compressed key
   is the mean of those keys. Only complete windows exist: ``Nc = (T - kernel_size) // stride + 1``.
2. **Causality of windows.** A query at position ``t`` may use window ``j`` only once all its tokens are
   visible: ``j*stride + kernel_size - 1 <= t`` (the rule of InfLLM-V2's stage-1 kernel, whose causal mask
   lets query ``i`` see compressed key ``j`` iff ``i >= j*16 + 31``).
3. **Per-head scores.** ``p_h = softmax_j(q_h . Kc_j * scale)`` over the visible windows (``scale`` is the
   attention scale, ``d**-0.5`` by default); a query with no visible window scores 0 everywhere.
4. **Group sum.** ``s = sum_h p_h`` over the query heads of the GQA group.
5. **Block pooling.** Block ``b`` (tokens ``[b*B, (b+1)*B)``) scores the max of ``s`` over every window that
   overlaps it (shares at least one token): ``j`` in ``[b*B/stride - (kernel_size/stride - 1),
   (b+1)*B/stride - 1]``. With the SALA sizes these are windows ``4b-1 .. 4b+3``: exactly the
   ``max_pooling_1d`` of OpenBMB/infllmv2_cuda_impl (kernel ``B/stride + 1``, stride ``B/stride``,
   padding 1). Windows that do not exist (past the end) or are not yet visible count as 0.
6. **Selection.** Blocks that start after the query are never selected; the init and local blocks are
   always selected; among the remaining causal blocks (``init_blocks <= b <= qb - local_blocks``, ``qb`` the
   query's block) the ``min(topk, available)`` highest scores are taken; ties (frequent: neighbouring blocks
   share their boundary windows) go to the earlier block, so the choice never depends on tensor sizes.

Dense regime: a query whose context is shorter than ``dense_len`` (``t + 1 < dense_len``) attends densely
(all causal blocks). The switch is per query, so one full forward equals prefill + token-by-token decode
exactly. MiniCPM-SALA's modelling code switches per call on the total length; the two agree for every
decode step and for every prefill shorter than ``dense_len``.

Differences from the public MiniCPM-SALA code, all deliberate and documented here:

* SALA's CUDA stage-1 kernel approximates the softmax normaliser (LSE) with 4x coarser compressed keys
  (kernel 128, stride 64) for speed; this reference normalises exactly over the level-1 windows.
* ``topk`` counts the scored blocks only, as SPEC 1c says and as OpenBMB's CPM.cu engine configures it
  (``sink_window_size`` 1, ``block_window_size`` 32, ``sparse_topk_k`` 64). SALA's HuggingFace modelling
  code instead ranks ``topk + window_size // block_size`` blocks per query with the init blocks and the
  ``window_size // block_size + 1`` blocks ending at the query's forced in; the same selection here is
  ``window_size = 2048 + 64`` and ``topk = 64 - init_blocks - 1`` (the conversion lives in
  :mod:`hybridize.models.released`, which is what loading a released checkpoint uses).

Tensor convention (as :mod:`hybridize.ops.attention`): ``q`` ``[B, Hq, Tq, d]``, ``k``/``v``
``[B, Hkv, Tk, d]``; the queries are the last ``Tq`` of the ``Tk`` positions (``past = Tk - Tq``); GQA query
head ``i`` reads KV head ``i // (Hq / Hkv)``. Block selections are either index lists ``[B, Hkv, Tq, K]``
(int64, ascending, padded with -1) or boolean masks ``[B, Hkv, Tq, n_blocks]``.

Implementations of the attention over a selection:

* :func:`sparse_attention_ref` -- per query chunk, a boolean token mask and SDPA; differentiable; CPU/GPU.
* :func:`sparse_attention_gather` -- gathers only the selected blocks' K/V per query, then SDPA. This is the
  decode path (``Tq == 1``): it reads ``K * block_size`` cached tokens, not the whole cache.
* :func:`sparse_attention_flex` -- torch FlexAttention with a BlockMask built from the indices (CUDA
  prefill). The query heads of a GQA group are laid out as consecutive rows, so one 16-row tile is one
  token and the BlockMask is exactly the token's selection (the InfLLM-V2 kernel's layout).

* :func:`sparse_attention_nsa` -- fla's NSA selected-block attention kernel (``fla.ops.nsa.parallel_nsa``;
  one 16-row query-head tile per token, looping over its selected blocks; CUDA; SALA's 32 query / 2 KV heads
  fit its tiles exactly, smaller groups such as Qwen3-8B's 4 are padded with zero queries).

:func:`sparse_attention` dispatches between them (and to dense SDPA below ``dense_len``).

Block scoring (steps 1-5) runs in torch (:func:`_window_block_scores`, which materialises the per-head
``[Tq, Nc]`` scores of a query chunk) or, on CUDA with triton installed and the reference not forced, through
the fused Triton kernel :func:`hybridize.ops.triton_select.fused_block_scores` (same scores up to fp32
rounding, no ``[Tq, Nc]`` intermediate, larger query chunks; 6.2x faster than the torch scoring at 256K on an
H200, ``benchmarks/results/sparse_attention_h200.json``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .attention import attention_mask_4d, softmax_attention
from .backend import compile_flex, reference_forced, reference_mismatch

__all__ = [
    "SparseConfig",
    "num_windows",
    "compress_keys",
    "update_compressed_keys",
    "block_scores",
    "select_block_indices",
    "select_blocks",
    "indices_to_mask",
    "sparse_attention_ref",
    "sparse_attention_gather",
    "flex_block_mask",
    "sparse_attention_flex",
    "sparse_decode",
    "compress_last_window",
    "select_block_indices_static",
    "sparse_decode_static",
    "sparse_attention",
]

logger = logging.getLogger("hybridize")

#: Elements (fp32) one scoring chunk may materialise per intermediate; bounds memory at any length.
_SCORE_BUDGET = 1 << 26
#: Block scores ``[B, Hkv, C, n_blocks]`` per chunk with the fused Triton scoring, which materialises no
#: ``[.., C, Nc]`` intermediate (the top-k key beside them is int64: ~12 bytes per element in all).
_FUSED_SCORE_BUDGET = 1 << 26
#: Up to this many queries :func:`sparse_attention` gathers the selected blocks instead of running flex.
_GATHER_MAX_QUERIES = 16
#: Block indices must stay below this for the tie-breaking top-k key (2**24 blocks = 1G tokens at 64).
_TIE_SPAN = 1 << 24
#: Elements (bool) of the token mask of one query chunk in :func:`sparse_attention_ref`.
_MASK_BUDGET = 1 << 26
#: Elements of the gathered K (or V) of one query chunk in :func:`sparse_attention_gather`.
_GATHER_BUDGET = 1 << 25


@dataclass(frozen=True)
class SparseConfig:
    """Sizes of the InfLLM-V2 sparse attention (defaults: MiniCPM-SALA's ``sparse_config``).

    Attributes:
        kernel_size: tokens per compressed-key window (32).
        kernel_stride: stride between windows (16); must divide ``kernel_size`` and ``block_size``.
        init_blocks: leading blocks every query attends to (1).
        block_size: tokens per selectable KV block (64).
        window_size: tokens of the local window (2048); a multiple of ``block_size``; ``window_size //
            block_size`` local blocks (the query's own block and the ones before it) are always attended.
        topk: scored blocks selected per query besides the init and local blocks (64); clamped to the
            blocks available.
        dense_len: a query whose context (``t + 1`` tokens) is shorter than this attends densely (8192).

    Raises:
        ValueError: on a non-integer or out-of-range field (the message names the field and the rule).
    """

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"sparse_config.{f.name} must be an int, got {value!r}")
        for name in ("kernel_size", "kernel_stride", "block_size", "window_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sparse_config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("init_blocks", "topk", "dense_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"sparse_config.{name} must be >= 0, got {getattr(self, name)}")
        if self.kernel_size % self.kernel_stride:
            raise ValueError(
                f"sparse_config.kernel_size ({self.kernel_size}) must be a multiple of kernel_stride "
                f"({self.kernel_stride})"
            )
        if self.block_size % self.kernel_stride:
            raise ValueError(
                f"sparse_config.block_size ({self.block_size}) must be a multiple of kernel_stride "
                f"({self.kernel_stride})"
            )
        if self.window_size % self.block_size:
            raise ValueError(
                f"sparse_config.window_size ({self.window_size}) must be a multiple of block_size "
                f"({self.block_size}): the local window is a whole number of blocks"
            )

    @property
    def local_blocks(self) -> int:
        """Number of local blocks (``window_size // block_size``), the query's own block included."""
        return self.window_size // self.block_size

    @classmethod
    def from_dict(cls, config: Mapping | None) -> "SparseConfig":
        """Build from a ``sparse_config`` dict (missing keys take the SALA defaults; None = all defaults).

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown sparse_config keys {unknown}; supported: {sorted(known)}")
        return cls(**config)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what ``HybridConfig.sparse_config`` stores)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------- scoring


def num_windows(num_tokens: int, kernel_size: int, kernel_stride: int) -> int:
    """Complete compressed-key windows in ``num_tokens`` tokens: ``(T - kernel_size) // stride + 1``, or 0.

    This is also the number of windows visible to a query at position ``num_tokens - 1``.
    """
    if num_tokens < kernel_size:
        return 0
    return (num_tokens - kernel_size) // kernel_stride + 1


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean-pool keys over windows of ``kernel_size`` tokens taken every ``kernel_stride`` tokens.

    Window ``j`` is ``mean(k[..., j*stride : j*stride + kernel_size, :])``; only complete windows are
    returned. Summed in fp32 through stride-long segments (no ``kernel_size/stride``-fold copy of ``k``).

    Args:
        k: keys ``[B, Hkv, T, d]``, any float dtype.
        kernel_size, kernel_stride: window length and stride; ``kernel_stride`` must divide ``kernel_size``.

    Returns:
        ``[B, Hkv, Nc, d]`` in ``k``'s dtype, ``Nc = num_windows(T, kernel_size, kernel_stride)`` (may be 0).

    Raises:
        ValueError: if ``kernel_stride`` does not divide ``kernel_size``.
    """
    if kernel_size % kernel_stride:
        raise ValueError(f"kernel_stride ({kernel_stride}) must divide kernel_size ({kernel_size})")
    b, h, t, d = k.shape
    nc = num_windows(t, kernel_size, kernel_stride)
    if nc == 0:
        return k.new_zeros(b, h, 0, d)
    r = kernel_size // kernel_stride
    n_seg = nc - 1 + r
    seg = k[:, :, : n_seg * kernel_stride].reshape(b, h, n_seg, kernel_stride, d).float().sum(3)
    out = seg[:, :, :nc].clone()
    for i in range(1, r):
        out += seg[:, :, i : i + nc]
    return (out / kernel_size).to(k.dtype)


def update_compressed_keys(
    compressed: torch.Tensor | None, k: torch.Tensor, kernel_size: int, kernel_stride: int
) -> torch.Tensor:
    """Extend cached compressed keys with the windows completed by new tokens (decode: O(new) work).

    Args:
        compressed: ``[B, Hkv, Nc_old, d]`` windows already computed from a prefix of ``k`` (or None).
        k: all keys so far ``[B, Hkv, T, d]`` (the KV cache after appending the new tokens).

    Returns:
        ``[B, Hkv, num_windows(T), d]``, equal to ``compress_keys(k, ...)``.
    """
    old = 0 if compressed is None else compressed.shape[2]
    total = num_windows(k.shape[2], kernel_size, kernel_stride)
    if compressed is not None and old == total:
        return compressed
    start = old * kernel_stride
    new = compress_keys(k[:, :, start:], kernel_size, kernel_stride)
    return new if compressed is None else torch.cat([compressed, new], dim=2)


def _visible_windows(positions: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """``[Tq]`` number of windows fully visible to each query position (window j: ``j*s + ks - 1 <= t``)."""
    n = torch.div(positions + 1 - cfg.kernel_size, cfg.kernel_stride, rounding_mode="floor") + 1
    return n.clamp(min=0)


def _pool_to_blocks(window_scores: torch.Tensor, n_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """Max over the windows overlapping each block: ``[..., Nc]`` -> ``[..., n_blocks]`` (0 where none exist)."""
    r = cfg.kernel_size // cfg.kernel_stride
    per_block = cfg.block_size // cfg.kernel_stride
    pad_left = r - 1
    width = pad_left + per_block
    nc = window_scores.shape[-1]
    need = n_blocks * per_block + pad_left  # padded length read by the last block
    padded = F.pad(window_scores, (pad_left, max(0, n_blocks * per_block - nc)))[..., :need]
    return padded.unfold(-1, width, per_block).amax(-1)


def block_scores(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    positions: torch.Tensor,
    n_blocks: int,
    cfg: SparseConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """Group-summed, block-pooled scores of SPEC 1c (steps 2-5 of the module docstring).

    On CUDA with triton installed (and the reference not forced) the fused Triton kernel
    :func:`hybridize.ops.triton_select.fused_block_scores` computes them; otherwise
    :func:`_window_block_scores` (torch). Both give the same scores up to fp32 rounding.

    Args:
        q: queries ``[B, Hq, Tq, d]``.
        compressed_k: ``[B, Hkv, Nc, d]`` from :func:`compress_keys`.
        positions: ``[Tq]`` int64 absolute positions of the queries, ascending.
        n_blocks: number of key blocks to score (``ceil(Tk / block_size)``).
        scale: softmax scale; default ``d ** -0.5``.

    Returns:
        fp32 ``[B, Hkv, Tq, n_blocks]``, each entry >= 0 (0 for blocks without a visible window). No
        causal block masking is applied here (see :func:`select_block_indices`).
    """
    tq = q.shape[2]
    visible = _visible_windows(positions, cfg)
    max_visible = int(visible.max().item()) if tq else 0
    return _block_scores(q, compressed_k, visible, max_visible, n_blocks, cfg, scale, _selection_backend(q.device))


_fused_broken: str | None = None


def _selection_backend(device: torch.device) -> str:
    """``"triton"`` (fused scoring kernel) or ``"torch"``: the block-scoring path for ``device`` right now.

    ``"triton"`` needs a CUDA device, triton installed, the reference not forced
    (:func:`hybridize.ops.backend.force_reference`) and no earlier failure of the kernel. Logged once.
    """
    if device.type != "cuda":
        return "torch"
    if reference_forced():
        _log_once("select-forced", logging.INFO, "hybridize: sparse block scoring on CUDA: reference forced (torch)")
        return "torch"
    if _fused_broken is not None:
        return "torch"
    from .triton_select import triton_available

    if not triton_available():
        _log_once("select-notriton", logging.INFO, "hybridize: sparse block scoring on CUDA: torch (triton not installed)")
        return "torch"
    _log_once("select-triton", logging.INFO, "hybridize: sparse block scoring on CUDA: fused Triton kernel")
    return "triton"


def _block_scores(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    visible: torch.Tensor,
    max_visible: int,
    n_blocks: int,
    cfg: SparseConfig,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """:func:`block_scores` with the visible-window counts ``[Tq]`` and their max (a host int) given."""
    global _fused_broken
    b, hq, tq, d = q.shape
    hkv = compressed_k.shape[1]
    scale = d**-0.5 if scale is None else scale
    nc = min(compressed_k.shape[2], max_visible)
    if nc == 0:
        return q.new_zeros(b, hkv, tq, n_blocks, dtype=torch.float32)
    if backend == "triton" and _fused_broken is None:
        try:
            from .triton_select import fused_block_scores

            return fused_block_scores(q, compressed_k[:, :, :nc], visible, n_blocks, cfg, scale)
        except Exception as exc:  # a broken triton must not break the model
            _fused_broken = f"{type(exc).__name__}: {exc}"
            _log_once(
                "select-broken",
                logging.WARNING,
                "hybridize: the fused Triton block scoring failed (%s); block scoring uses torch",
                _fused_broken,
            )
    return _window_block_scores(q, compressed_k[:, :, :nc], visible, n_blocks, cfg, scale)


def _window_block_scores(
    q: torch.Tensor, compressed_k: torch.Tensor, visible: torch.Tensor, n_blocks: int, cfg: SparseConfig, scale: float
) -> torch.Tensor:
    """Tensor-only core of :func:`block_scores` (no host syncs, so it can be ``torch.compile``-d).

    ``q`` ``[B, Hq, Tq, d]``, ``compressed_k`` ``[B, Hkv, Nc, d]``, ``visible`` ``[Tq]`` visible-window counts
    -> fp32 ``[B, Hkv, Tq, n_blocks]``.
    """
    b, hq, tq, d = q.shape
    hkv, nc = compressed_k.shape[1], compressed_k.shape[2]
    # the g query heads of a group and the Tq queries share one matmul per KV head: [g*Tq, d] x [d, Nc]
    # (a broadcast [g, 1] batch would make torch.matmul copy the compressed keys g times)
    g = hq // hkv
    logits = torch.matmul(q.reshape(b, hkv, g * tq, d), compressed_k.transpose(-1, -2)).view(b, hkv, g, tq, nc)
    mask = torch.arange(nc, device=q.device)[None, :] < visible[:, None]  # [Tq, Nc]
    probs = torch.softmax(logits.float().mul(scale).masked_fill(~mask, float("-inf")), dim=-1)
    probs = probs.masked_fill(~mask, 0.0)  # also clears the NaN rows of queries with no visible window
    return _pool_to_blocks(probs.sum(2), n_blocks, cfg)


def _select_chunk(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    start: int,
    n_blocks: int,
    cfg: SparseConfig,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """Selected block indices ``[B, Hkv, Tq, K]`` (int64, ascending, -1 padded) for the queries at positions
    ``start .. start + Tq - 1``. Every decision that depends only on the positions is taken on the host (no
    device sync)."""
    device = q.device
    b, hkv = q.shape[0], compressed_k.shape[1]
    tq = q.shape[2]
    last = start + tq - 1
    positions = torch.arange(start, start + tq, device=device)
    qb = torch.div(positions, cfg.block_size, rounding_mode="floor")  # [Tq]
    blocks = torch.arange(n_blocks, device=device)
    n_init = min(cfg.init_blocks, n_blocks)
    n_local = min(cfg.local_blocks, n_blocks)
    k_top = min(cfg.topk, n_blocks)

    init = torch.arange(n_init, device=device).expand(tq, n_init)
    init = torch.where(init <= qb[:, None], init, -1)
    local = qb[:, None] - torch.arange(n_local, device=device)[None, :]
    local = torch.where(local >= cfg.init_blocks, local, -1)
    parts = [init.expand(b, hkv, tq, n_init), local.expand(b, hkv, tq, n_local)]
    # some query of the chunk has a candidate block iff the last one has: init <= b <= qb(last) - local
    if k_top > 0 and cfg.init_blocks < n_blocks and last // cfg.block_size - cfg.local_blocks >= cfg.init_blocks:
        candidate = (blocks[None, :] >= cfg.init_blocks) & (blocks[None, :] <= qb[:, None] - cfg.local_blocks)
        visible = _visible_windows(positions, cfg)
        max_visible = num_windows(last + 1, cfg.kernel_size, cfg.kernel_stride)
        scores = _block_scores(q, compressed_k, visible, max_visible, n_blocks, cfg, scale, backend)
        # Exact top-k with ties to the earlier block: adjacent blocks share their boundary windows, so
        # equal scores are common, and the choice must not depend on tensor sizes (prefill vs decode).
        # Scores are >= 0, so their fp32 bit patterns order like the values.
        key = scores.view(torch.int32).long() * _TIE_SPAN + (_TIE_SPAN - 1 - blocks)
        values, top = key.masked_fill(~candidate, -1).topk(k_top, dim=-1)
        parts.append(torch.where(values >= 0, top, -1))
    idx = torch.cat(parts, dim=-1)

    if start + 1 < cfg.dense_len:  # the chunk's first query is in the dense regime
        last_dense = min(last, cfg.dense_len - 2)
        width = max(idx.shape[-1], last_dense // cfg.block_size + 1)
        dense = positions + 1 < cfg.dense_len
        idx = F.pad(idx, (0, width - idx.shape[-1]), value=-1)
        every = torch.arange(width, device=device)
        every = torch.where(every[None, :] <= qb[:, None], every, -1)
        idx = torch.where(dense[:, None], every, idx)
    # ascending order, -1 last
    idx = torch.where(idx < 0, n_blocks, idx).sort(dim=-1).values
    return torch.where(idx == n_blocks, -1, idx)


@torch.no_grad()
def select_block_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: SparseConfig,
    *,
    scale: float | None = None,
    compressed_k: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Blocks each query attends to, as index lists (SPEC 1c; rules in the module docstring).

    Memory is bounded at any length: queries are scored in chunks of ``chunk_size``, each chunk against only
    the windows it can see. Default chunk: as many queries as fit ``2**26`` fp32 scores per intermediate;
    with the fused Triton scoring (CUDA, see :func:`block_scores`), which has no ``[.., Nc]``
    intermediate, as many as fit ``2**26`` block scores ``[B, Hkv, C, n_blocks]`` (about 65x more queries
    per chunk at SALA sizes). The result does not depend on the chunking. One host sync per call.

    Args:
        q: ``[B, Hq, Tq, d]``, the last ``Tq`` positions of ``k``.
        k: ``[B, Hkv, Tk, d]`` (cache included).
        cfg: the sparse sizes.
        scale: scoring softmax scale (default ``d ** -0.5``).
        compressed_k: precomputed ``compress_keys(k)`` (e.g. cached for decode); computed when None.
        chunk_size: queries per scoring chunk.

    Returns:
        int64 ``[B, Hkv, Tq, K]``: ascending block indices, padded with -1. Every query's list holds its own
        block; a block after the query's block never appears.

    Raises:
        ValueError: on shape mismatches or ``compressed_k`` with too few windows.
    """
    b, hq, tq, d = q.shape
    bk, hkv, tk, dk = k.shape
    if (b, d) != (bk, dk) or hq % hkv or tq > tk:
        raise ValueError(
            "expected q [B, Hq, Tq, d] and k [B, Hkv, Tk, d] with Hkv | Hq and Tq <= Tk; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if compressed_k is None:
        compressed_k = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    elif compressed_k.shape[2] < num_windows(tk, cfg.kernel_size, cfg.kernel_stride):
        raise ValueError(
            f"compressed_k has {compressed_k.shape[2]} windows but {tk} keys make "
            f"{num_windows(tk, cfg.kernel_size, cfg.kernel_stride)}: update it with update_compressed_keys"
        )
    n_blocks = -(-tk // cfg.block_size)
    if n_blocks >= _TIE_SPAN:
        raise ValueError(f"{tk} keys make {n_blocks} blocks; at most {_TIE_SPAN - 1} are supported")
    backend = _selection_backend(q.device)
    if chunk_size is None:
        if backend == "triton":
            chunk_size = max(1, min(tq, _FUSED_SCORE_BUDGET // max(1, b * hkv * n_blocks)))
        else:
            per_query = hq * max(1, compressed_k.shape[2]) + hkv * n_blocks
            chunk_size = max(1, min(tq, _SCORE_BUDGET // per_query))
    past = tk - tq
    chunks = [
        _select_chunk(q[:, :, s : s + chunk_size], compressed_k, past + s, n_blocks, cfg, scale, backend)
        for s in range(0, tq, chunk_size)
    ]
    width = max(c.shape[-1] for c in chunks)
    out = torch.cat([F.pad(c, (0, width - c.shape[-1]), value=-1) for c in chunks], dim=2)
    used = int((out >= 0).sum(-1).max().item())  # drop all-padding columns (lists are -1 last)
    return out[..., : max(1, used)]


def indices_to_mask(indices: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Index lists -> boolean block mask.

    Args:
        indices: int64 ``[..., K]`` block indices in ``[0, n_blocks)``, padded with -1.
        n_blocks: number of key blocks.

    Returns:
        bool ``[..., n_blocks]``, True where a block is listed.
    """
    mask = torch.zeros(*indices.shape[:-1], n_blocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, n_blocks, indices), True)
    return mask[..., :n_blocks]


def select_blocks(q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig, **kwargs) -> torch.Tensor:
    """Boolean form of :func:`select_block_indices`: ``[B, Hkv, Tq, ceil(Tk / block_size)]``.

    O(Tq * n_blocks) memory: for tests and short inputs; long inputs should keep the index form.
    Keyword arguments are those of :func:`select_block_indices`.
    """
    return indices_to_mask(select_block_indices(q, k, cfg, **kwargs), -(-k.shape[2] // cfg.block_size))


# --------------------------------------------------------------------------------------- attention


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] == 0:
        raise ValueError(
            f"expected q [B, Hq, Tq, d] (Tq >= 1), k/v [B, Hkv, Tk, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, hq, tq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1] or tq > k.shape[2]:
        raise ValueError(
            f"expected q [B, Hq, Tq, d], k/v [B, Hkv, Tk, d] with Hkv | Hq and Tq <= Tk; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if indices is not None and tuple(indices.shape[:3]) != (b, k.shape[1], tq):
        raise ValueError(f"indices must be [B, Hkv, Tq, K] = [{b}, {k.shape[1]}, {tq}, K], got {tuple(indices.shape)}")


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SparseConfig,
    *,
    scale: float | None = None,
    indices: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference block-sparse attention: per query chunk, a boolean token mask and SDPA.

    Differentiable in ``q``, ``k``, ``v`` (the selection is not). Cost per chunk: a ``[g * C, Tk']`` mask per
    KV head, ``Tk'`` the keys the chunk can see -- fine for training lengths and tests; long-context
    inference uses :func:`sparse_attention_flex` (prefill) or :func:`sparse_attention_gather` (decode).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]``; queries are the last Tq positions.
        cfg: sparse sizes (used for the selection and the block size).
        scale: softmax scale (default ``d ** -0.5``), used for scoring and attention alike.
        indices: a selection from :func:`select_block_indices` to reuse; computed when None.
        chunk_size: queries per chunk (default: bounded by ``2**26`` mask elements).

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: on shape mismatches.
    """
    _check_qkv(q, k, v, indices)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    past = tk - tq
    if indices is None:
        indices = select_block_indices(q, k, cfg, scale=scale)
    n_blocks = -(-tk // cfg.block_size)
    if chunk_size is None:
        chunk_size = max(1, min(tq, _MASK_BUDGET // (hkv * g * tk)))
    kpos = torch.arange(tk, device=q.device)
    out = []
    for s in range(0, tq, chunk_size):
        e = min(tq, s + chunk_size)
        c, tkc = e - s, past + e
        sel = indices_to_mask(indices[:, :, s:e], n_blocks).repeat_interleave(cfg.block_size, dim=-1)[..., :tkc]
        qpos = torch.arange(past + s, past + e, device=q.device)
        token_mask = sel & (kpos[None, :tkc] <= qpos[:, None])  # [B, Hkv, C, Tk']
        token_mask = token_mask[:, :, None].expand(b, hkv, g, c, tkc).reshape(b, hkv, g * c, tkc)
        qc = q[:, :, s:e].reshape(b, hkv, g * c, d)
        o = F.scaled_dot_product_attention(qc, k[:, :, :tkc], v[:, :, :tkc], attn_mask=token_mask, scale=scale)
        out.append(o.reshape(b, hq, c, d))
    return torch.cat(out, dim=2)


def sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    chunk_size: int | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention that reads only the selected blocks: gather K/V per query, then SDPA.

    For each query the ``K`` listed blocks (``K * block_size`` tokens) are gathered from ``k``/``v``; tokens
    after the query and -1 entries are masked. This is the decode path (``Tq == 1``): its memory traffic is
    the selected blocks, not the cache. Differentiable in q, k, v.

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]``; queries are the last Tq positions.
        indices: ``[B, Hkv, Tq, K]`` int64 from :func:`select_block_indices` (each list must hold the
            query's own block, so no query is left without keys).
        block_size: tokens per block.
        scale: softmax scale (default ``d ** -0.5``).
        chunk_size: queries per gather (default: bounded by ``2**25`` gathered elements).
        query_positions: ``[Tq]`` int64 positions of the queries (a device tensor), for a static cache whose
            ``k``/``v`` are longer than the keys written so far; default: the last Tq positions of ``k``.
            Keys after a query's position are masked either way.

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: on shape mismatches.
    """
    _check_qkv(q, k, v, indices)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    n_sel = indices.shape[-1]
    m = n_sel * block_size
    if chunk_size is None:
        chunk_size = max(1, min(tq, _GATHER_BUDGET // max(1, hkv * m * d)))
    offs = torch.arange(block_size, device=q.device)
    out = []
    for s in range(0, tq, chunk_size):
        e = min(tq, s + chunk_size)
        c = e - s
        idx = indices[:, :, s:e]
        tok = (idx[..., None] * block_size + offs).reshape(b, hkv, c, m)  # [B, Hkv, C, M]
        if query_positions is None:
            qpos = torch.arange(tk - tq + s, tk - tq + e, device=q.device)
        else:
            qpos = query_positions[s:e]
        valid = (idx >= 0).repeat_interleave(block_size, dim=-1) & (tok <= qpos[:, None])
        flat = tok.clamp(0, tk - 1).reshape(b, hkv, c * m, 1).expand(b, hkv, c * m, d)
        kg = k.gather(2, flat).reshape(b * hkv, c, m, d)
        vg = v.gather(2, flat).reshape(b * hkv, c, m, d)
        qc = q[:, :, s:e].reshape(b, hkv, g, c, d).transpose(2, 3).reshape(b * hkv, c, g, d)
        mask = valid.reshape(b * hkv, c, 1, m)
        o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=mask, scale=scale)  # [B*Hkv, C, g, d]
        out.append(o.reshape(b, hkv, c, g, d).transpose(2, 3).reshape(b, hq, c, d))
    return torch.cat(out, dim=2)


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cfg: SparseConfig,
    *,
    scale: float | None = None,
    compressed_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step: select blocks for the new token(s), then attend to the selected blocks only.

    Args:
        q: ``[B, Hq, Tq, d]`` (usually Tq = 1); k_cache, v_cache: ``[B, Hkv, Tk, d]`` including the new tokens.
        compressed_k: cached ``compress_keys(k_cache)`` (see :func:`update_compressed_keys`); when None it is
            recomputed, which reads the whole key cache once (O(Tk) scoring cost, the attention still reads
            only the selected blocks).

    Returns:
        ``[B, Hq, Tq, d]``; below ``dense_len`` tokens this is dense attention.
    """
    if k_cache.shape[2] < cfg.dense_len:
        return softmax_attention(
            q, k_cache, v_cache, attention_mask_4d(None, q.shape[2], k_cache.shape[2], q.device), scale
        )
    indices = select_block_indices(q, k_cache, cfg, scale=scale, compressed_k=compressed_k)
    return sparse_attention_gather(q, k_cache, v_cache, indices, cfg.block_size, scale=scale)


# ------------------------------------------------------------------------- decode over a static cache


def compress_last_window(
    k_buf: torch.Tensor, position: torch.Tensor, cfg: SparseConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compressed key of the window that ends at ``position`` (decode over a static cache).

    Window ``j`` covers tokens ``[j*stride, j*stride + kernel_size)`` (see :func:`compress_keys`); the token at
    ``position`` completes window ``j = (position + 1 - kernel_size) / stride`` when that is a whole number
    >= 0. Computed as :func:`compress_keys` does (fp32 sums of ``stride``-long segments, added in order,
    divided by ``kernel_size``, cast back) so a decode loop reproduces a full recomputation. No host
    synchronisation: the caller writes ``key`` at ``torch.where(complete, j, spare_row)``.

    Args:
        k_buf: ``[B, Hkv, L, d]`` key buffer with the keys ``0 .. position`` written.
        position: 0-d int64 device tensor, the position of the newest key.
        cfg: sparse sizes (``kernel_size``, ``kernel_stride``).

    Returns:
        ``(key, complete, j)``: ``key`` ``[B, Hkv, 1, d]`` in ``k_buf``'s dtype (meaningless unless
        ``complete``), ``complete`` a 0-d bool tensor, ``j`` a 0-d int64 tensor (the window index, clamped >= 0).
    """
    ks, st = cfg.kernel_size, cfg.kernel_stride
    b, h, _, d = k_buf.shape
    start = position + 1 - ks
    idx = start.clamp(min=0) + torch.arange(ks, device=k_buf.device)
    seg = k_buf.index_select(2, idx).reshape(b, h, ks // st, st, d).float().sum(3)  # [B, Hkv, r, d]
    out = seg[:, :, 0].clone()
    for i in range(1, ks // st):
        out += seg[:, :, i]
    key = (out / ks).to(k_buf.dtype).unsqueeze(2)
    complete = (start >= 0) & (torch.remainder(start, st) == 0)
    j = torch.div(start.clamp(min=0), st, rounding_mode="floor")
    return key, complete, j


def select_block_indices_static(
    q: torch.Tensor,
    compressed_k: torch.Tensor,
    position: torch.Tensor,
    n_blocks: int,
    cfg: SparseConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`select_block_indices` for one query at a device ``position``, with fixed shapes (capturable).

    The same rules and tie-breaking as the dynamic selection (module docstring), computed against buffers
    sized for the cache capacity: windows the query cannot see yet are masked, blocks after its block are
    never candidates, so the selected set equals the dynamic one. Below ``dense_len`` every block up to the
    query's is listed (dense regime).

    Args:
        q: ``[B, Hq, 1, d]``.
        compressed_k: ``[B, Hkv, Nc, d]`` compressed keys of the buffer (windows not complete yet may hold
            anything finite: they are masked by ``position``).
        position: 0-d int64 device tensor, the query's position.
        n_blocks: key blocks of the buffer (``ceil(L / block_size)``).
        cfg: sparse sizes; scale: scoring softmax scale (default ``d ** -0.5``).

    Returns:
        int64 ``[B, Hkv, 1, W]``, ascending, -1 padded; ``W = max(init + local + topk (each clamped to
        n_blocks), min(n_blocks, ceil(dense_len / block_size)))`` is fixed by the sizes alone.
    """
    b, hq, tq, d = q.shape
    hkv = compressed_k.shape[1]
    device = q.device
    scale = d**-0.5 if scale is None else scale
    pos = position.reshape(1)
    qb = torch.div(pos, cfg.block_size, rounding_mode="floor")  # [1]
    blocks = torch.arange(n_blocks, device=device)
    n_init = min(cfg.init_blocks, n_blocks)
    n_local = min(cfg.local_blocks, n_blocks)
    k_top = min(cfg.topk, n_blocks)
    init = torch.arange(n_init, device=device)[None, :]
    init = torch.where(init <= qb[:, None], init, -1)
    local = qb[:, None] - torch.arange(n_local, device=device)[None, :]
    local = torch.where(local >= cfg.init_blocks, local, -1)
    parts = [init.expand(b, hkv, 1, n_init), local.expand(b, hkv, 1, n_local)]
    if k_top > 0 and compressed_k.shape[2] > 0:
        scores = _window_block_scores(q, compressed_k, _visible_windows(pos, cfg), n_blocks, cfg, scale)
        candidate = (blocks[None, :] >= cfg.init_blocks) & (blocks[None, :] <= qb[:, None] - cfg.local_blocks)
        key = scores.view(torch.int32).long() * _TIE_SPAN + (_TIE_SPAN - 1 - blocks)
        values, top = key.masked_fill(~candidate, -1).topk(k_top, dim=-1)
        parts.append(torch.where(values >= 0, top, -1))
    idx = torch.cat(parts, dim=-1)
    dense_width = min(n_blocks, -(-cfg.dense_len // cfg.block_size))
    width = max(idx.shape[-1], dense_width)
    idx = F.pad(idx, (0, width - idx.shape[-1]), value=-1)
    every = torch.arange(width, device=device)
    every = torch.where((every[None, :] <= qb[:, None]) & (every[None, :] < dense_width), every, -1)
    idx = torch.where((pos + 1 < cfg.dense_len)[:, None], every, idx)
    idx = torch.where(idx < 0, n_blocks, idx).sort(dim=-1).values
    return torch.where(idx == n_blocks, -1, idx)


def sparse_decode_static(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    compressed_k: torch.Tensor,
    position: torch.Tensor,
    cfg: SparseConfig,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One InfLLM-V2 decode step over a static cache: select blocks, gather them, attend (capturable).

    Reads the compressed keys (scoring) and only the selected blocks of ``k_buf``/``v_buf``, never the whole
    cache; no host synchronisation and no shape that depends on ``position``, so it can run inside a CUDA
    graph. Equal (to float rounding) to :func:`sparse_attention` over the keys ``0 .. position``.

    Args:
        q: ``[B, Hq, 1, d]``; k_buf, v_buf: ``[B, Hkv, L, d]`` with the keys ``0 .. position`` written.
        compressed_k: ``[B, Hkv, Nc, d]`` compressed keys of ``k_buf`` (at least the complete windows).
        position: 0-d int64 device tensor, the new token's position.
        cfg: sparse sizes; scale: softmax scale (default ``d ** -0.5``).

    Returns:
        ``[B, Hq, 1, d]`` in ``q``'s dtype.
    """
    n_blocks = -(-k_buf.shape[2] // cfg.block_size)
    indices = select_block_indices_static(q, compressed_k, position, n_blocks, cfg, scale)
    return sparse_attention_gather(
        q, k_buf, v_buf, indices, cfg.block_size, scale=scale, query_positions=position.reshape(1)
    )


# ----------------------------------------------------------------------------------- FlexAttention


def _rows_per_token(group: int) -> int:
    """Rows of one token in the flex layout: the group's query heads, padded to a multiple of 16."""
    return -(-group // 16) * 16


def flex_block_mask(
    indices: torch.Tensor, q_len: int, kv_len: int, block_size: int, group: int, *, layout: str = "compact"
):
    """FlexAttention ``BlockMask`` for the token-major layout of :func:`sparse_attention_flex`.

    Rows are ``token * G + head_in_group`` (``G = ceil(group / 16) * 16``), so one Q tile of ``G`` rows is one
    query token and its KV blocks are exactly that token's selection: the query's own block is a partial
    block (causal ``mask_mod``), every other selected block is a full block.

    Args:
        indices: ``[B, Hkv, Tq, K]`` int64, ascending, -1 padded (from :func:`select_block_indices`).
        q_len, kv_len: Tq and Tk (queries are the last Tq positions).
        block_size: KV block size (the flex KV tile).
        group: query heads per KV head.
        layout: one of :data:`FLEX_MASK_VARIANTS`: ``"compact"`` keeps the index lists ``K`` wide (O(Tq * K)
            memory); ``"padded"`` pads them to ``ceil(Tk / block_size)`` columns (O(Tq * n_blocks)); ``"full"``
            pads them and also computes the transposed (Q-side) tables that the backward pass needs.

    Raises:
        ValueError: an unknown ``layout``.

    Returns:
        ``torch.nn.attention.flex_attention.BlockMask``.

    Source: torch ``BlockMask.from_kv_blocks`` (torch >= 2.5); the layout mirrors InfLLM-V2's stage-2 kernel,
    which packs the 16 query heads of a group as the rows of one tile.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if layout not in FLEX_MASK_VARIANTS:
        raise ValueError(f"unknown BlockMask layout {layout!r}; choose one of {FLEX_MASK_VARIANTS}")
    if indices.dim() != 4 or indices.dtype.is_floating_point or indices.shape[2] != q_len:
        raise ValueError(f"flex_block_mask expects integer indices [B, Hkv, q_len={q_len}, K], got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if not 1 <= q_len <= kv_len or block_size < 1 or group < 1:
        raise ValueError(f"flex_block_mask needs 1 <= q_len <= kv_len, block_size >= 1 and group >= 1; got q_len "
                         f"{q_len}, kv_len {kv_len}, block_size {block_size}, group {group}")
    wide = layout != "compact"
    rows = _rows_per_token(group)
    n_blocks = -(-kv_len // block_size)
    past = kv_len - q_len
    count = (indices >= 0).sum(-1)  # [B, Hkv, Tq]
    own = torch.div(torch.arange(past, kv_len, device=indices.device), block_size, rounding_mode="floor")
    # the own block is the last valid entry of every (ascending) list
    full_idx = indices.clamp(min=0).to(torch.int32)
    if wide and full_idx.shape[-1] < n_blocks:
        full_idx = F.pad(full_idx, (0, n_blocks - full_idx.shape[-1]))
    partial_idx = own.to(torch.int32).view(1, 1, q_len, 1).expand(*indices.shape[:2], q_len, 1).contiguous()
    if wide:
        partial_idx = F.pad(partial_idx, (0, n_blocks - 1))
    offset = torch.tensor(past, device=indices.device)

    def causal_in_own_block(b, h, q_idx, kv_idx):
        return kv_idx <= offset + q_idx // rows

    kwargs = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = layout == "full"
    return BlockMask.from_kv_blocks(
        torch.ones_like(count, dtype=torch.int32),
        partial_idx,
        (count - 1).to(torch.int32),
        full_idx.contiguous(),
        BLOCK_SIZE=(rows, block_size),
        mask_mod=causal_in_own_block,
        seq_lengths=(q_len * rows, kv_len),
        **kwargs,
    )


_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # default dynamic=None: the second length recompiles once with symbolic sizes; compile_flex: never an
        # eager (dense) flex past the recompile limit -- it raises, and sparse_attention uses the reference
        _compiled_flex = compile_flex(flex_attention)
    return _compiled_flex


def sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    block_mask=None,
    kernel_options: dict | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """Block-sparse attention through compiled FlexAttention with a BlockMask from the selection.

    Query heads of a GQA group become consecutive rows of a single "head" per KV head (padded with zero
    rows to a multiple of 16), so each 16-row Q tile is one token and K/V are never expanded.

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]``; queries are the last Tq positions; d >= 16.
        indices: ``[B, Hkv, Tq, K]`` from :func:`select_block_indices`.
        block_size: KV block size (must be a multiple of 16).
        scale: softmax scale (default ``d ** -0.5``).
        block_mask: a prebuilt :func:`flex_block_mask` (to time it separately); built when None.
        kernel_options: FlexAttention kernel options, merged over the defaults ``BLOCK_M = 16``,
            ``BLOCK_N = min(64, block_size)`` (tiles must divide the sparse blocks) and ``num_warps = 4``.
        layout: the BlockMask layout (see :func:`flex_block_mask`); None = ``"full"`` on CPU or when a
            gradient is needed (the backward pass and inductor's CPU kernel need it; another layout there is
            a ValueError), else ``"compact"``.
            :func:`sparse_attention` passes the layout that :func:`flex_mask_variant` verified on the device.

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: on shape mismatches; errors of torch.compile/FlexAttention propagate (GPU: triton needed;
        CPU: a C++ compiler; the eager fallback ignores BlockMask indices, so it is never used here).
    """
    _check_qkv(q, k, v, indices)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = _rows_per_token(g)
    qr = q.reshape(b, hkv, g, tq, d).transpose(2, 3)  # [B, Hkv, Tq, g, d]
    if rows > g:
        qr = F.pad(qr, (0, 0, 0, rows - g))
    qr = qr.reshape(b, hkv, tq * rows, d)
    if layout is not None and layout not in FLEX_MASK_VARIANTS:
        raise ValueError(f"unknown BlockMask layout {layout!r}; choose one of {FLEX_MASK_VARIANTS} (or None)")
    if block_mask is None:
        # full tables: needed by the backward pass and by inductor's CPU flex kernel
        need_full = q.device.type == "cpu" or (torch.is_grad_enabled() and q.requires_grad)
        if need_full and layout not in (None, "full"):
            raise ValueError(f"layout {layout!r} cannot run here: FlexAttention on CPU or with a gradient needs "
                             "layout='full' (or None)")
        block_mask = flex_block_mask(indices, tq, tk, block_size, g, layout=layout or ("full" if need_full else "compact"))
    options = {"BLOCK_M": 16, "BLOCK_N": min(64, block_size), "num_warps": 4}
    if kernel_options:
        options.update(kernel_options)
    o = _flex()(qr, k, v, block_mask=block_mask, scale=scale, kernel_options=options)
    o = o.reshape(b, hkv, tq, rows, d)[:, :, :, :g].transpose(2, 3)
    return o.reshape(b, hq, tq, d)


def nsa_group(group: int) -> int:
    """The query group fla's NSA kernel runs for a GQA group of ``group`` heads: ``group`` itself when it is a
    power of two >= 16 (the kernel's tile rule), else the next such size (the extra rows are zero queries)."""
    return max(16, 1 << (group - 1).bit_length())


def nsa_supported(heads: int, kv_heads: int, head_dim: int) -> str | None:
    """None when fla's NSA kernel can run this attention shape (any GQA group: :func:`nsa_group` pads it),
    else why not (one line)."""
    if kv_heads < 1 or heads % kv_heads:
        return f"{heads} query heads do not split over {kv_heads} KV heads"
    if head_dim > 256:
        return f"NSA kernels take head_dim <= 256, got {head_dim}"
    from . import backend  # looked up on each call (tests replace it)

    if not backend.fla_available():
        return "fla (flash-linear-attention) is not installed"
    return None


def sparse_attention_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention over a selection through fla's NSA selected-block kernel (``parallel_nsa`` with
    the selection passed as ``block_indices``; no compressed or sliding-window branch).

    The kernel keeps the query heads of a GQA group as the rows of one tile per token (a power of two >= 16 of
    them: a smaller or other group, e.g. Qwen3-8B's 4, is padded with zero queries to :func:`nsa_group` rows,
    whose outputs are dropped; the padding costs compute, as FlexAttention's 16-row tiles do) and loops over the
    token's listed blocks, skipping -1 entries and blocks that start after the token, with the causal mask
    inside its own block: the semantics of :func:`sparse_attention_ref` for a selection that lists the
    query's own block (every selection of :func:`select_block_indices` does). Queries are the last ``Tq`` of
    the ``Tk`` positions (prefill over a cache). Differentiable (fla's backward).

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` (CUDA, 16-bit or fp32); ``Hkv`` divides ``Hq``;
            ``d <= 256``.
        indices: ``[B, Hkv, Tq, K]`` int64 from :func:`select_block_indices`.
        block_size: tokens per block (fla's ``block_size``).
        scale: softmax scale (default ``d ** -0.5``).

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: shapes that do not fit, or an attention shape the kernel does not take
            (:func:`nsa_supported`); ImportError without fla.

    Source: NSA (Yuan et al. 2025, arXiv 2502.11089) selected-attention branch, as implemented in
    fla-org/flash-linear-attention ``fla/ops/nsa/parallel.py``; InfLLM-V2's stage-2 kernel has the same layout.
    """
    _check_qkv(q, k, v, indices)
    why = nsa_supported(q.shape[1], k.shape[1], q.shape[3])
    if why is not None:
        raise ValueError(why)
    from fla.ops.nsa import parallel_nsa

    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    gp = nsa_group(g)
    qt = q.transpose(1, 2)  # fla's layout [B, T, H, d]
    if gp != g:  # zero query rows up to the kernel's group size, per KV head, built in fla's layout (one copy)
        padded = q.new_zeros(b, tq, hkv, gp, d)
        padded[:, :, :, :g].copy_(q.reshape(b, hkv, g, tq, d).permute(0, 3, 1, 2, 4))  # a view for the usual layouts
        qt = padded.view(b, tq, hkv * gp, d)
    o = parallel_nsa(
        qt, k.transpose(1, 2), v.transpose(1, 2),
        block_indices=indices.transpose(1, 2).contiguous(), block_counts=indices.shape[-1],
        block_size=block_size, scale=d**-0.5 if scale is None else scale,
    )
    if gp != g:
        o = o.view(b, tq, hkv, gp, d)[:, :, :, :g].reshape(b, tq, hq, d)
    return o.transpose(1, 2)


def _check_problem(device, dtype, heads: int, kv_heads: int, head_dim: int, cfg: SparseConfig, seed: int):
    """The small random problem the kernel checks compare on: ``cfg``'s block and kernel sizes with ``topk = 2``,
    a two-block window and ``dense_len = 0`` over ``8 * block_size + 13`` tokens (really sparse, a partial last
    block). Returns ``(check_cfg, q, k, v)``, q ``[1, heads, T, d]``, k/v ``[1, kv_heads, T, d]``."""
    check = SparseConfig(kernel_size=cfg.kernel_size, kernel_stride=cfg.kernel_stride, init_blocks=1,
                         block_size=cfg.block_size, window_size=2 * cfg.block_size, topk=2, dense_len=0)
    t = 8 * cfg.block_size + 13
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, t, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(1, kv_heads, t, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    return check, q, k, v


_nsa_checks: dict[tuple, str | None] = {}


def nsa_mismatch(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, cfg: SparseConfig
) -> str | None:
    """None when :func:`sparse_attention_nsa` equals :func:`sparse_attention_ref` on a small random problem of
    this shape (the check :func:`flex_mask_variant` makes for FlexAttention), else why not (unsupported shape,
    an error, or the relative error). Checked once per (device, dtype, shape, block size) and cached."""
    key = (device.type, device.index, dtype, heads, kv_heads, head_dim, cfg.block_size)
    if key not in _nsa_checks:
        problem = nsa_supported(heads, kv_heads, head_dim)
        if problem is None:
            check, q, k, v = _check_problem(device, dtype, heads, kv_heads, head_dim, cfg, seed=1)
            try:
                with torch.no_grad():
                    idx = select_block_indices(q, k, check)
                    ref = sparse_attention_ref(q.float(), k.float(), v.float(), check, indices=idx)
                    # a chunk of queries over a cache too (the last 100 queries)
                    ref_tail = sparse_attention_ref(q[:, :, -100:].float(), k.float(), v.float(), check,
                                                    indices=idx[:, :, -100:])
                    problem = reference_mismatch(sparse_attention_nsa(q, k, v, idx, cfg.block_size), ref, dtype)
                    problem = problem or reference_mismatch(
                        sparse_attention_nsa(q[:, :, -100:], k, v, idx[:, :, -100:], cfg.block_size), ref_tail, dtype)
            except Exception as exc:  # noqa: BLE001 - reported; the caller uses another path
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        _nsa_checks[key] = problem
        if problem is not None:
            _log_once(f"nsa-{key}", logging.INFO, "hybridize: fla NSA sparse prefill not used (%s)", problem)
    return _nsa_checks[key]


#: Environment variable choosing the CUDA sparse prefill kernel: ``auto`` (default: fla NSA when it passes
#: :func:`nsa_mismatch`, else FlexAttention with the layout :func:`flex_mask_variant` verified, else the
#: reference), ``nsa``, ``flex`` or ``reference`` (a forced kernel that is unusable or wrong falls back to the
#: reference, never to a wrong result).
SPARSE_PREFILL_ENV = "HYBRIDIZE_SPARSE_PREFILL"
SPARSE_PREFILL_CHOICES = ("auto", "nsa", "flex", "reference")


def sparse_prefill_choice() -> str:
    """``$HYBRIDIZE_SPARSE_PREFILL`` (default ``auto``); raises ValueError naming the choices for another value."""
    value = os.environ.get(SPARSE_PREFILL_ENV, "").strip().lower() or "auto"
    if value not in SPARSE_PREFILL_CHOICES:
        raise ValueError(f"{SPARSE_PREFILL_ENV}={value!r}: choose one of {SPARSE_PREFILL_CHOICES}")
    return value


# -------------------------------------------------------------------------------------- dispatch

#: BlockMask layouts of :func:`sparse_attention_flex`, in the order :func:`flex_mask_variant` tries them
#: (cheapest first): compact index lists, lists padded to every key block, padded + Q-side tables.
FLEX_MASK_VARIANTS = ("compact", "padded", "full")
_flex_variants: dict[tuple, str | None] = {}


def flex_mask_variant(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, cfg: SparseConfig
) -> str | None:
    """The first BlockMask layout of :data:`FLEX_MASK_VARIANTS` whose :func:`sparse_attention_flex` output
    equals :func:`sparse_attention_ref` on a small random problem of this shape; None when none does.

    Checked once per (device, dtype, heads, kv_heads, head_dim, block_size) and cached; costs one to three
    FlexAttention compiles (seconds). Why: on torch 2.11 + an H200 the compact layout gave relative errors
    of 0.2-5 against the reference in every GPU test (``benchmarks/results/gpu_tests_h200.json``) while the
    full and padded ones (full-width lists; padded without the Q-side tables) passed them; a wrong kernel
    must never be chosen silently, so
    :func:`sparse_attention` uses the verified layout, or the reference when none is right.

    Args:
        device, dtype: the caller's (tolerance: :func:`~hybridize.ops.backend.reference_mismatch`).
        heads, kv_heads, head_dim: the layer's attention shape.
        cfg: the layer's sparse sizes (the check uses its block and kernel sizes with ``topk = 2``, a
            two-block window and ``dense_len = 0``, over ``8 * block_size + 13`` tokens: really sparse).

    Returns:
        ``"compact"``, ``"padded"``, ``"full"`` or None; the reasons for rejected layouts are logged once.
    """
    key = (device.type, device.index, dtype, heads, kv_heads, head_dim, cfg.block_size)
    if key in _flex_variants:
        return _flex_variants[key]
    check, q, k, v = _check_problem(device, dtype, heads, kv_heads, head_dim, cfg, seed=0)
    chosen = None
    with torch.no_grad():
        idx = select_block_indices(q, k, check)
        ref = sparse_attention_ref(q.float(), k.float(), v.float(), check, indices=idx)
        for variant in FLEX_MASK_VARIANTS:
            try:
                out = sparse_attention_flex(q, k, v, idx, cfg.block_size, layout=variant)
                problem = reference_mismatch(out, ref, dtype)
            except Exception as exc:  # noqa: BLE001 - logged, the next layout is tried
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            if problem is None:
                chosen = variant
                break
            _log_once(f"flex-{variant}-{key}", logging.WARNING,
                      "hybridize: FlexAttention sparse prefill with the %s BlockMask rejected (%s)", variant, problem)
    _flex_variants[key] = chosen
    return chosen


_flex_broken: str | None = None
_logged: set[str] = set()
#: Kernels :func:`sparse_attention` ran for CUDA prefills in this process ("nsa", "flex-<layout>",
#: "reference"), in first-use order: the bench records them per row.
prefill_kernels_used: list[str] = []


def _used(kernel: str) -> None:
    if kernel not in prefill_kernels_used:
        prefill_kernels_used.append(kernel)



def _log_once(key: str, level: int, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message, *args)


#: Index-table entries (per batch row and KV head) one padded or full BlockMask may hold: their tables
#: grow as queries x key blocks (16K x 16K at a 16K chunk over 1M tokens), so longer prefills are split.
FULL_MASK_ENTRIES = 2**25


def _flex_in_query_chunks(q, k, v, indices, block_size: int, scale, layout: str) -> torch.Tensor:
    """:func:`sparse_attention_flex` over consecutive query slices small enough that a padded or full BlockMask
    stays under :data:`FULL_MASK_ENTRIES` entries; one call for the compact layout. Queries are the last Tq
    positions of ``k``, so the slice ending ``r`` queries before the end sees ``k[:, :, :Tk - r]``."""
    tq, tk = q.shape[2], k.shape[2]
    step = tq if layout == "compact" else max(16, FULL_MASK_ENTRIES // max(1, -(-tk // block_size)))
    if step >= tq:
        return sparse_attention_flex(q, k, v, indices, block_size, scale=scale, layout=layout)
    parts = []
    for start in range(0, tq, step):
        end = min(start + step, tq)
        kv_end = tk - (tq - end)
        parts.append(sparse_attention_flex(q[:, :, start:end], k[:, :, :kv_end], v[:, :, :kv_end],
                                           indices[:, :, start:end], block_size, scale=scale, layout=layout))
    return torch.cat(parts, dim=2)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: SparseConfig,
    *,
    scale: float | None = None,
    compressed_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfLLM-V2 attention for ``q`` over ``k``/``v`` (SPEC 1c), dispatching to the right implementation.

    * ``Tk < dense_len``: every query is in the dense regime: dense causal SDPA (:func:`softmax_attention`).
    * ``Tq <= 16`` (decode, short chunks): :func:`sparse_attention_gather` -- reads only the selected blocks.
    * CUDA, no gradient needed, reference not forced: :func:`sparse_attention_nsa` when its shape is supported
      and it passed :func:`nsa_mismatch` (``$HYBRIDIZE_SPARSE_PREFILL`` = ``nsa`` / ``flex`` / ``reference``
      forces one); else :func:`sparse_attention_flex` with the BlockMask layout
      that :func:`flex_mask_variant` verified against the reference for this shape (padded and full masks in
      query slices of bounded size); the reference when no layout is right; if FlexAttention raises once (e.g. no
      triton) the reference is used from then on, with one warning.
    * otherwise: :func:`sparse_attention_ref`.

    Args:
        q: ``[B, Hq, Tq, d]``; k, v: ``[B, Hkv, Tk, d]`` (cache included, no padding: callers unpad rows).
        cfg: sparse sizes.
        scale: softmax scale (default ``d ** -0.5``).
        compressed_k: cached compressed keys for the scoring (decode); recomputed when None.

    Returns:
        ``[B, Hq, Tq, d]`` in ``q``'s dtype.

    Raises:
        ValueError: on shapes that do not fit (checked before any path is chosen, the dense one included).
    """
    global _flex_broken
    _check_qkv(q, k, v, None)
    tq, tk = q.shape[2], k.shape[2]
    if tk < cfg.dense_len:
        mask = attention_mask_4d(None, tq, tk, q.device)
        return softmax_attention(q, k, v, mask, scale)
    indices = select_block_indices(q, k, cfg, scale=scale, compressed_k=compressed_k)
    if tq <= _GATHER_MAX_QUERIES:
        return sparse_attention_gather(q, k, v, indices, cfg.block_size, scale=scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    choice = sparse_prefill_choice()
    fast = q.device.type == "cuda" and not grad and not reference_forced() and choice != "reference"
    shape = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[3], cfg)
    if fast and choice in ("auto", "nsa") and nsa_mismatch(*shape) is None:
        _log_once("nsa", logging.INFO, "hybridize: sparse attention prefill on CUDA: fla NSA kernel")
        _used("nsa")
        return sparse_attention_nsa(q, k, v, indices, cfg.block_size, scale=scale)
    if fast and choice in ("auto", "flex") and _flex_broken is None:
        try:
            variant = flex_mask_variant(*shape)
            if variant is not None:
                out = _flex_in_query_chunks(q, k, v, indices, cfg.block_size, scale, variant)
                _used(f"flex-{variant}")
                _log_once("flex", logging.INFO, "hybridize: sparse attention prefill on CUDA: FlexAttention (%s "
                          "BlockMask)", variant)
                return out
            _log_once("flex-wrong", logging.WARNING, "hybridize: FlexAttention gives wrong results here (no "
                      "BlockMask layout passed the check); sparse attention prefill uses the reference")
        except Exception as exc:  # a broken triton/inductor must not break the model
            _flex_broken = f"{type(exc).__name__}: {exc}"
            _log_once(
                "flex-broken",
                logging.WARNING,
                "hybridize: FlexAttention failed (%s); sparse attention uses the reference",
                _flex_broken,
            )
    if q.device.type == "cuda":
        _used("reference")
    return sparse_attention_ref(q, k, v, cfg, scale=scale, indices=indices)
