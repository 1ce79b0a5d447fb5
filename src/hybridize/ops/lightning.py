"""Lightning Attention: linear attention with a fixed per-head exponential decay.

This is the RNN mixer of HypeNet (SPEC 1a; HALO/HypeNet paper, arXiv 2601.22156, Sec. 3). For head h the
recurrent state ``S`` (``d_k x d_v``, fp32) evolves as::

    S_t = gamma_h * S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t,      gamma_h = exp(-m_h)

with ``m_h`` the ALiBi slopes (:func:`lightning_slopes`). It is simple GLA with a data-independent decay,
so on GPU it maps to fla's ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` with ``g_gamma = -m``
(not ``chunk_lightning_attn``, which rescales the decay by layer index: a different model).

Two pure-PyTorch forms live here and are the reference for every other path:

* :func:`chunk_lightning_ref` -- the chunked (parallel within a chunk, recurrent across chunks) form
  used for training and prefill; cost O(T C d + T d^2) for chunk size C.
* :func:`recurrent_lightning_ref` -- the step-by-step form used for decode; cost O(T d^2).

Tensor convention everywhere (as in fla): ``[batch, time, heads, dim]``; states are
``[batch, heads, d_k, d_v]`` in fp32. Packed variable-length batches (batch of 1, sequences laid end to
end) pass ``cu_seqlens`` (``[N + 1]`` int offsets, as in flash-attn/fla): the state restarts at each
boundary, ``initial_state`` and the final state are then per sequence, ``[N, heads, d_k, d_v]``.

:func:`lightning_attention` is the entry point the layers call; it dispatches to fla on CUDA (see
:mod:`hybridize.ops.backend`) and to the references here otherwise.
"""

from __future__ import annotations

import math

import torch

from . import backend

__all__ = [
    "lightning_slopes",
    "lightning_log_decay",
    "check_log_decay",
    "check_cu_seqlens",
    "chunk_lightning_ref",
    "recurrent_lightning_ref",
    "lightning_attention",
]


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``m_h`` for ``num_heads`` heads (SPEC 1a; Press et al. 2022, ALiBi, Sec. 3).

    For H a power of two, ``m_h = 2^(-8 (h+1) / H)``, h = 0..H-1. Otherwise take the slopes of the largest
    power of two P < H, then every other slope of 2P until H slopes are filled.

    Args:
        num_heads: number of heads H >= 1.

    Returns:
        float32 CPU tensor ``[H]`` of positive slopes.

    Raises:
        ValueError: if ``num_heads < 1``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = power_of_two(num_heads)
    else:
        p = 2 ** int(math.floor(math.log2(num_heads)))
        slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")


def lightning_log_decay(num_heads: int) -> torch.Tensor:
    """Per-head log-decay ``log(gamma_h) = -m_h`` (float32 ``[H]``, strictly negative). See :func:`lightning_slopes`."""
    return -lightning_slopes(num_heads)


def check_log_decay(log_decay: torch.Tensor) -> None:
    """Reject any log-decay that is not strictly negative and finite (decay ``gamma = exp(log_decay)`` in (0, 1)).

    A zero log-decay (gamma = 1) lets the state grow without bound; a positive one makes it explode.
    Reading the values synchronises with the device, so layers call this once at init (the decay is
    derived from the head count) and the ops skip it on accelerators when told the values were checked.

    Args:
        log_decay: ``[H]`` float tensor, ``log(gamma_h)``.

    Raises:
        ValueError: if any entry is >= 0, NaN or infinite.
    """
    if not bool(((log_decay < 0) & torch.isfinite(log_decay)).all()):
        raise ValueError(
            "every lightning log-decay must be strictly negative and finite (decay gamma = exp(log_decay) < 1); "
            f"got {log_decay.tolist()}. Use lightning_log_decay(num_heads) for the SPEC 1a values."
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int = 1) -> list[int]:
    """Validate packed-sequence offsets and return them as a Python list (one host sync on accelerators).

    Args:
        cu_seqlens: ``[N + 1]`` int32/int64 offsets ``0 = c_0 < c_1 < ... < c_N = total``; sequence i covers
            tokens ``c_i .. c_{i+1} - 1`` of the packed batch.
        total: number of tokens T of the packed batch.
        batch: batch size of the packed tensors (must be 1).

    Returns:
        the offsets as a list of N + 1 ints.

    Raises:
        ValueError: on a batch other than 1, a non-integer or non-1-D tensor, offsets that do not start at 0,
            do not end at ``total`` or are not strictly increasing.
    """
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a packed batch of 1 (sequences laid end to end), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [num_sequences + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    offsets = [int(c) for c in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != total or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0, increase strictly and end at the packed length {total}; got {offsets}"
        )
    return offsets


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, check_decay: bool = True
) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "lightning attention expects q, k of shape [batch, time, heads, d_k] and v of shape "
            f"[batch, time, heads, d_v]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if log_decay.shape != (q.shape[2],):
        raise ValueError(f"log_decay must have shape [heads={q.shape[2]}], got {tuple(log_decay.shape)}")
    if check_decay or log_decay.device.type == "cpu":
        check_log_decay(log_decay)


def _initial_state(
    q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, num_states: int | None = None
) -> torch.Tensor:
    b, _, h, dk = q.shape
    b = b if num_states is None else num_states
    dv = v.shape[-1]
    if initial_state is None:
        return q.new_zeros(b, h, dk, dv, dtype=torch.float32)
    if initial_state.shape != (b, h, dk, dv):
        what = "per sequence of cu_seqlens " if num_states is not None else ""
        raise ValueError(
            f"initial_state must have shape {(b, h, dk, dv)} ({what}[states, heads, d_k, d_v]), "
            f"got {tuple(initial_state.shape)}"
        )
    return initial_state.float()


def _varlen(fn, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, **kw):
    """Run ``fn`` on each packed sequence separately (state reset at every boundary)."""
    offsets = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    n = len(offsets) - 1
    states = _initial_state(q, v, initial_state, num_states=n)
    outs, finals = [], []
    for i in range(n):
        s, e = offsets[i], offsets[i + 1]
        o, st = fn(q[:, s:e], k[:, s:e], v[:, s:e], log_decay, scale, states[i : i + 1], output_final_state, **kw)
        outs.append(o)
        finals.append(st)
    return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


def chunk_lightning_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    cu_seqlens: torch.Tensor | None = None,
    check_decay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked Lightning Attention, pure PyTorch (reference for training and prefill).

    Within a chunk of length c the output is the masked decayed product
    ``O = (Q K^T * D) V + diag(gamma^(i+1)) Q S_prev`` with ``D[i, j] = gamma^(i-j)`` for j <= i, and the
    state is carried as ``S = gamma^c S_prev + sum_j gamma^(c-1-j) k_j^T v_j`` (the chunkwise form of the
    recurrence in SPEC 1a). All arithmetic is fp32; only exponents <= 0 are evaluated, so nothing overflows.
    A ragged last chunk is handled at its true length (the final state is exact for any T).

    Args:
        q, k: ``[B, T, H, d_k]`` any float dtype.
        v: ``[B, T, H, d_v]``.
        log_decay: ``[H]`` strictly negative ``log(gamma_h)``.
        scale: multiplies ``q S``; default ``d_k ** -0.5``.
        initial_state: ``[B, H, d_k, d_v]`` (fp32) or None for zeros; ``[N, H, d_k, d_v]`` with cu_seqlens.
        output_final_state: also return the state after the last token (of each sequence).
        chunk_size: C, tokens per chunk.
        cu_seqlens: ``[N + 1]`` int offsets of N packed sequences (B must be 1), or None. Each sequence
            starts from its own initial state (zeros by default) and nothing crosses a boundary.
        check_decay: see :func:`lightning_attention` (CPU tensors are always checked).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, d_v]`` in q's dtype; ``final_state`` is
        ``[B, H, d_k, d_v]`` (``[N, H, d_k, d_v]`` with cu_seqlens) fp32, or None.

    Raises:
        ValueError: on mismatched shapes, a log-decay that is not strictly negative, or bad cu_seqlens.
    """
    _check_inputs(q, k, v, log_decay, check_decay)
    if cu_seqlens is not None:
        return _varlen(
            chunk_lightning_ref, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
            chunk_size=chunk_size, check_decay=False,
        )
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(q, v, initial_state)
    g = log_decay.to(device=q.device, dtype=torch.float32).view(h, 1, 1)  # [H, 1, 1]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, d]
    outs = []
    for start in range(0, t, chunk_size):
        end = min(start + chunk_size, t)
        c = end - start
        qc, kc, vc = qf[:, :, start:end], kf[:, :, start:end], vf[:, :, start:end]
        pos = torch.arange(c, device=q.device, dtype=torch.float32)
        diff = pos.view(c, 1) - pos.view(1, c)  # i - j
        causal = diff >= 0
        decay = torch.exp(g * diff.clamp(min=0)) * causal  # [H, c, c]
        scores = (qc @ kc.transpose(-1, -2)) * decay  # [B, H, c, c]
        o = scores @ vc + torch.exp(g * (pos.view(c, 1) + 1)) * (qc @ state)
        outs.append(o)
        # carry the state over the chunk: decay of each key to the chunk's end
        k_decay = torch.exp(g * (c - 1 - pos).view(c, 1))  # [H, c, 1]
        state = torch.exp(g * c) * state + (kc * k_decay).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2) if outs else vf.new_zeros(b, h, 0, v.shape[-1])
    o = (o * scale).transpose(1, 2).to(q.dtype)
    return o, (state if output_final_state else None)


def recurrent_lightning_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.Tensor | None = None,
    check_decay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step Lightning Attention, pure PyTorch (reference for decode).

    Applies ``S_t = gamma * S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` one token at a time
    (SPEC 1a) in fp32. Same arguments (less ``chunk_size``), returns and errors as
    :func:`chunk_lightning_ref`.
    """
    _check_inputs(q, k, v, log_decay, check_decay)
    if cu_seqlens is not None:
        return _varlen(
            recurrent_lightning_ref, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
            check_decay=False,
        )
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(q, v, initial_state)
    gamma = torch.exp(log_decay.to(device=q.device, dtype=torch.float32)).view(1, h, 1, 1)
    qf, kf, vf = q.float(), k.float(), v.float()
    outs = []
    for i in range(t):
        state = gamma * state + kf[:, i, :, :, None] * vf[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, i], state))
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(b, 0, h, v.shape[-1])
    return (o * scale).to(q.dtype), (state if output_final_state else None)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    cu_seqlens: torch.Tensor | None = None,
    check_decay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention for any length; the single entry point the layers call.

    Dispatch (:mod:`hybridize.ops.backend`): on CUDA with fla, ``fused_recurrent_simple_gla`` for one token
    (decode) and ``chunk_simple_gla`` otherwise, both with ``g_gamma = log_decay`` (= ``-m_h``, the fixed
    per-head decay of SPEC 1a; fla then picks its own chunk length and ``chunk_size`` is unused). Elsewhere,
    or under :func:`~hybridize.ops.backend.force_reference`: :func:`recurrent_lightning_ref` for one token,
    else :func:`chunk_lightning_ref`.

    Args:
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens: as
            :func:`chunk_lightning_ref`.
        check_decay: read the log-decay values and reject a non-negative one. The check is always done for
            a CPU tensor (free); for an accelerator tensor it costs a device sync, so a caller that checked
            its constant decay once (the layer does, at init) passes False.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, d_v]`` in q's dtype; ``final_state`` fp32 ``[B|N, H, d_k, d_v]``
        or None.

    Raises:
        ValueError: on mismatched shapes, a non-negative log-decay, or bad ``cu_seqlens``.
    """
    _check_inputs(q, k, v, log_decay, check_decay)
    if backend.lightning_backend(q.device) == "fla" and q.shape[1] > 0:
        return _fla_lightning(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    if q.shape[1] == 1 and cu_seqlens is None:
        return recurrent_lightning_ref(
            q, k, v, log_decay, scale, initial_state, output_final_state, check_decay=False
        )
    return chunk_lightning_ref(
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size,
        cu_seqlens=cu_seqlens, check_decay=False,
    )


def _fla_lightning(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    """fla's simple-GLA kernels with ``g_gamma = log_decay`` (inputs already validated)."""
    chunk_kernel, recurrent_kernel = backend.fla_lightning_kernels()
    # one dtype for the kernel: under autocast the RMS-normed q/k can be fp32 while v is bf16
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    n = q.shape[0]
    kwargs = {}
    if cu_seqlens is not None:
        n = len(check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])) - 1
        kwargs["cu_seqlens"] = cu_seqlens.to(device=q.device, dtype=torch.long)
    if initial_state is not None:
        initial_state = _initial_state(q, v, initial_state, num_states=n).contiguous()
    kernel = recurrent_kernel if q.shape[1] == 1 and cu_seqlens is None else chunk_kernel
    o, final = kernel(
        q,
        k,
        v,
        g_gamma=log_decay.to(device=q.device, dtype=torch.float32),
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        **kwargs,
    )
    return o.to(q.dtype), (final.float() if output_final_state else None)
