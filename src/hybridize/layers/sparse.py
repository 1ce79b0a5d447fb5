"""The ``sparse`` mixer: InfLLM-V2 block-sparse attention (SPEC 1c, MiniCPM-SALA).

Same projections, parameter names, QK-norm, NoPE, HyPE scaling and output gate as
:class:`~hybridize.layers.mixers.HyPEAttention` -- no new parameters, so an attention layer's weights load
unchanged -- and the same KV cache. Only the attention core differs: see
:mod:`hybridize.ops.sparse_attention` for the block selection and its implementations.
"""

from __future__ import annotations

import itertools

import torch

from ..ops.sparse_attention import SparseConfig, sparse_attention, sparse_decode_static
from .mixers import HyPEAttention

__all__ = ["SparseAttention"]


class SparseAttention(HyPEAttention):
    """HyPE attention whose core is InfLLM-V2 block-sparse attention (dense below ``dense_len`` tokens).

    Args:
        config: a :class:`~hybridize.models.HybridConfig`; the sizes come from ``config.sparse_config``
            (SALA defaults: kernel 32 / stride 16, 64-token blocks, 1 init block, 2048-token window, top-64,
            dense below 8192 tokens).
        layer_idx: index of the layer (its cache slot).

    Padding (2-D ``attention_mask``, left padding) is handled by running each row on its real tokens, so
    block boundaries and the dense/sparse switch count real tokens only, as ``positions`` does.
    Packed sequences (``cu_seqlens``) run one sequence at a time.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sparse = SparseConfig.from_dict(getattr(config, "sparse_config", None))

    def attend(self, q, k, v, attention_mask=None, *, cu_seqlens=None, compressed_k=None):
        """``q`` ``[B, Hq, T, d]``, ``k``/``v`` ``[B, Hkv, past + T, d]`` -> ``[B, Hq, T, d]`` (SPEC 1c).

        ``compressed_k``: the cache's compressed keys of ``k`` (a static cache keeps them; recomputed when
        None); unused for padded batches, whose rows are scored on their real tokens only.
        """
        if cu_seqlens is not None:
            bounds = [int(x) for x in cu_seqlens.tolist()]
            pieces = [
                sparse_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], self.sparse)
                for a, b in itertools.pairwise(bounds)
                if b > a
            ]
            return torch.cat(pieces, dim=2)
        if attention_mask is None or bool(attention_mask.all()):
            return sparse_attention(q, k, v, self.sparse, compressed_k=compressed_k)
        t = q.shape[2]
        rows = []
        for i in range(q.shape[0]):
            real = attention_mask[i].bool()
            real_q = real[-t:]
            row = q.new_zeros(q.shape[1:])  # padding queries: zeros (their outputs are never used)
            if bool(real_q.any()):
                o = sparse_attention(q[i : i + 1, :, real_q], k[i : i + 1, :, real], v[i : i + 1, :, real], self.sparse)
                row = row.index_copy(1, real_q.nonzero().squeeze(1), o[0])
            rows.append(row)
        return torch.stack(rows)

    def attend_decode(self, q, k_buf, v_buf, position, cache):
        """Decode over a static cache (see :meth:`HyPEAttention.attend_decode`): selection from the cache's
        compressed keys, then attention over the gathered selected blocks only
        (:func:`~hybridize.ops.sparse_attention.sparse_decode_static`; capturable)."""
        return sparse_decode_static(
            q, k_buf, v_buf, cache.compressed_keys(self.layer_idx), position, self.sparse
        )
