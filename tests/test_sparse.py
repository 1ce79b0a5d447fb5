"""InfLLM-V2 sparse attention (SPEC 1c): selection rules, reference attention, the ``sparse`` mixer, decode."""

from __future__ import annotations

import math

import pytest
import torch

import hybridize  # noqa: F401  (registers the Auto classes)
from hybridize import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.layers.mixers import HyPEAttention, build_mixer
from hybridize.layers.sparse import SparseAttention
from hybridize.models import layer_types_from_str, layer_types_to_str
from hybridize.ops.attention import softmax_attention
from hybridize.ops.sparse_attention import (
    SparseConfig,
    compress_keys,
    flex_block_mask,
    indices_to_mask,
    num_windows,
    select_block_indices,
    select_blocks,
    sparse_attention,
    sparse_attention_flex,
    sparse_attention_gather,
    sparse_attention_ref,
    sparse_decode,
    update_compressed_keys,
)

SALA = SparseConfig()
#: small sizes with the SALA ratios (kernel = 2 strides, block = 4 strides): overlapping windows, 2 local blocks
SMALL = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16, topk=3, dense_len=0)


def _qkv(b, hq, hkv, tq, d=16, tk=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    return q, k, v


def _sets(idx: torch.Tensor) -> list:
    """Index lists -> nested python lists of sets."""
    return [[[set(x for x in row.tolist() if x >= 0) for row in h] for h in b] for b in idx]


# ----------------------------------------------------------------------------------------- brute force


def brute_force_selection(q, k, cfg: SparseConfig, scale=None):
    """SPEC 1c written out with loops, independently of the implementation: per (row, KV head, query) sets."""
    b_, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    ks, s, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    n_blocks = math.ceil(tk / bs)
    windows = []  # compressed keys: mean over complete windows
    j = 0
    while j * s + ks <= tk:
        windows.append(k[:, :, j * s : j * s + ks].mean(dim=2))
        j += 1
    out, scores_out = [], []
    for bi in range(b_):
        rows, rows_scores = [], []
        for h in range(hkv):
            per_q, per_q_scores = [], []
            for ti in range(tq):
                t = tk - tq + ti
                qb = t // bs
                if t + 1 < cfg.dense_len:
                    per_q.append(set(range(qb + 1)))
                    per_q_scores.append(None)
                    continue
                visible = [j for j in range(len(windows)) if j * s + ks - 1 <= t]
                window_score = [0.0] * len(windows)
                for hh in range(h * g, (h + 1) * g):
                    if not visible:
                        continue
                    logits = torch.stack([q[bi, hh, ti] @ windows[j][bi, h] for j in visible]) * scale
                    probs = torch.softmax(logits.double(), dim=0)
                    for n, j in enumerate(visible):
                        window_score[j] += probs[n].item()
                block_score = []
                for blk in range(n_blocks):
                    overlapping = [
                        window_score[j] for j in range(len(windows)) if j * s < (blk + 1) * bs and j * s + ks > blk * bs
                    ]
                    block_score.append(max(overlapping, default=0.0))
                forced = {blk for blk in range(qb + 1) if blk < cfg.init_blocks or blk > qb - cfg.local_blocks}
                candidates = [blk for blk in range(n_blocks) if cfg.init_blocks <= blk <= qb - cfg.local_blocks]
                ranked = sorted(candidates, key=lambda blk: (-block_score[blk], blk))
                per_q.append(forced | set(ranked[: cfg.topk]))
                per_q_scores.append((block_score, ranked, forced))
            rows.append(per_q)
            rows_scores.append(per_q_scores)
        out.append(rows)
        scores_out.append(rows_scores)
    return out, scores_out


def _assert_same_selection(got, expected, details, topk, tol=1e-5):
    """Equal sets, except that blocks swapped at the top-k boundary must be (near-)tied in score."""
    for bi, rows in enumerate(expected):
        for h, per_q in enumerate(rows):
            for ti, exp in enumerate(per_q):
                have = got[bi][h][ti]
                if have == exp:
                    continue
                info = details[bi][h][ti]
                assert info is not None, (bi, h, ti, have, exp)
                block_score, ranked, forced = info
                assert forced <= have, (bi, h, ti, forced, have)
                cutoff = block_score[ranked[topk - 1]]
                for blk in have ^ exp:
                    assert abs(block_score[blk] - cutoff) < tol, (bi, h, ti, blk, have, exp)


# ------------------------------------------------------------------------------------------- config


def test_sparse_config_defaults_are_sala_and_validated():
    assert SALA.to_dict() == dict(
        kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=2048, topk=64, dense_len=8192
    )
    assert SALA.local_blocks == 32
    assert SparseConfig.from_dict(None) == SALA
    assert SparseConfig.from_dict({"topk": 8}).topk == 8
    for bad in (
        {"kernel_size": 24},  # not a multiple of the stride
        {"block_size": 40},  # not a multiple of the stride
        {"window_size": 100},  # not a multiple of the block size
        {"window_size": 0},
        {"topk": -1},
        {"topk": 2.0},
        {"use_nope": False},  # unknown key
    ):
        with pytest.raises(ValueError):
            SparseConfig.from_dict(bad)


def test_hybrid_config_sparse_fields(tmp_path):
    config = HybridConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["sparse", "lightning", "attention"],
        sparse_config={"topk": 7},
    )
    assert config.sparse_config == {**SALA.to_dict(), "topk": 7}
    assert config.schedule == "SLA" and layer_types_to_str(config.layer_types) == "SLA"
    assert layer_types_from_str("SLA") == ["sparse", "lightning", "attention"]
    with pytest.raises(ValueError, match="S \\(sparse\\)"):
        layer_types_from_str("SX")
    with pytest.raises(ValueError, match="window_size"):
        HybridConfig(num_hidden_layers=1, layer_types=["sparse"], sparse_config={"window_size": 65})
    config.save_pretrained(tmp_path)
    again = HybridConfig.from_pretrained(tmp_path)
    assert again.sparse_config == config.sparse_config and again.layer_types == config.layer_types
    assert isinstance(build_mixer(config, 0), SparseAttention)
    assert isinstance(build_mixer(config, 0), HyPEAttention)  # same parameters as the attention mixer


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("t,ks,s", [(0, 4, 2), (3, 4, 2), (4, 4, 2), (5, 4, 2), (37, 4, 2), (37, 8, 4), (40, 4, 4)])
def test_compress_keys_is_the_window_mean(t, ks, s):
    k = torch.randn(2, 3, t, 5)
    got = compress_keys(k, ks, s)
    n = num_windows(t, ks, s)
    assert got.shape == (2, 3, n, 5)
    for j in range(n):
        torch.testing.assert_close(got[:, :, j], k[:, :, j * s : j * s + ks].mean(2))
    # incremental update (decode) equals recomputation
    part = compress_keys(k[:, :, : t // 2], ks, s)
    torch.testing.assert_close(update_compressed_keys(part, k, ks, s), got)


@pytest.mark.parametrize(
    "cfg,hq,hkv,tq,tk",
    [
        (SMALL, 8, 2, 150, None),
        (
            SparseConfig(
                kernel_size=8, kernel_stride=4, init_blocks=2, block_size=8, window_size=8, topk=4, dense_len=40
            ),
            8,
            2,
            130,
            None,
        ),
        (
            SparseConfig(
                kernel_size=4, kernel_stride=4, init_blocks=0, block_size=16, window_size=32, topk=2, dense_len=0
            ),
            4,
            1,
            120,
            None,
        ),
        (SMALL, 4, 2, 30, 121),  # queries over a cache (chunked prefill)
        (
            SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=128, topk=3, dense_len=0),
            4,
            2,
            400,
            None,
        ),
    ],
)
def test_selection_matches_brute_force(cfg, hq, hkv, tq, tk):
    q, k, _ = _qkv(2, hq, hkv, tq, tk=tk, seed=3)
    idx = select_block_indices(q, k, cfg, chunk_size=17)  # odd chunking must not matter
    expected, details = brute_force_selection(q, k, cfg)
    _assert_same_selection(_sets(idx), expected, details, cfg.topk)
    # the boolean form agrees, no block after the query's own block is ever selected
    mask = select_blocks(q, k, cfg)
    assert torch.equal(mask, indices_to_mask(idx, mask.shape[-1]))
    pos = torch.arange(k.shape[2] - tq, k.shape[2])
    later = torch.arange(mask.shape[-1])[None, :] > (pos // cfg.block_size)[:, None]
    assert not mask[:, :, later].any()


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_group_shares_one_selection(group):
    hkv = 2
    q, k, v = _qkv(1, hkv * group, hkv, 97, seed=group)
    idx = select_block_indices(q, k, SMALL)
    expected, details = brute_force_selection(q, k, SMALL)  # sums the group's heads before pooling
    _assert_same_selection(_sets(idx), expected, details, SMALL.topk)
    # every query head of the group attends exactly to the group's blocks: per-head masked dense attention
    mask = indices_to_mask(idx, math.ceil(97 / SMALL.block_size)).repeat_interleave(SMALL.block_size, -1)[..., :97]
    causal = torch.ones(97, 97, dtype=torch.bool).tril()
    head_mask = (mask & causal).repeat_interleave(group, dim=1)  # [B, Hq, T, T]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(16)
    expected_out = torch.softmax(scores.masked_fill(~head_mask, float("-inf")), -1) @ vv
    torch.testing.assert_close(sparse_attention_ref(q, k, v, SMALL, indices=idx), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sparse_attention_gather(q, k, v, idx, SMALL.block_size), expected_out, atol=1e-5, rtol=1e-5
    )
    # permuting the heads inside a group leaves the selection unchanged
    perm = torch.cat([torch.randperm(group) + h * group for h in range(hkv)])
    assert torch.equal(select_block_indices(q[:, perm], k, SMALL), idx)


def test_init_and_local_blocks_always_selected():
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=2, block_size=8, window_size=24, topk=2, dense_len=0)
    q, k, _ = _qkv(2, 4, 2, 200, seed=5)
    # make the init and recent blocks unattractive to every query: their keys point away from the queries
    k[:, :, :16] = -5 * q.mean(dim=(1, 2), keepdim=True)[:, :2].expand(2, 2, 16, 16)
    k[:, :, -24:] = -5 * q.mean(dim=(1, 2), keepdim=True)[:, :2].expand(2, 2, 24, 16)
    idx = select_block_indices(q, k, cfg)
    for t in range(200):
        qb = t // cfg.block_size
        forced = {blk for blk in range(qb + 1) if blk < cfg.init_blocks or blk > qb - cfg.local_blocks}
        n_candidates = max(0, qb - cfg.local_blocks - cfg.init_blocks + 1)
        for b in range(2):
            for h in range(2):
                chosen = set(x for x in idx[b, h, t].tolist() if x >= 0)
                assert forced <= chosen and max(chosen) == qb
                assert len(chosen) == len(forced) + min(cfg.topk, n_candidates)


# ---------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("t", [1, 63, 64, 65, 100, 711, 4097])
def test_topk_covering_every_block_equals_dense(t):
    cfg = SparseConfig(topk=10_000, dense_len=0)  # SALA sizes, the sparse path really taken
    q, k, v = _qkv(1, 4, 2, t, seed=t)
    dense = softmax_attention(q, k, v, None)
    idx = select_block_indices(q, k, cfg)
    n_blocks = math.ceil(t / 64)
    causal_blocks = torch.arange(n_blocks)[None, :] <= (torch.arange(t) // 64)[:, None]
    assert torch.equal(indices_to_mask(idx, n_blocks), causal_blocks.expand(1, 2, t, n_blocks))  # every causal block
    torch.testing.assert_close(sparse_attention(q, k, v, cfg), dense, atol=1e-5, rtol=1e-5)
    if t <= 711:
        torch.testing.assert_close(sparse_attention_gather(q, k, v, idx, 64), dense, atol=1e-5, rtol=1e-5)


def test_topk_larger_than_available_blocks_is_clamped():
    for cfg in (
        SparseConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=1000, dense_len=0),
        SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=64, topk=10**9, dense_len=0),
    ):
        for t in (1, 5, 8, 9, 33, 130):
            q, k, v = _qkv(1, 2, 1, t, seed=t)
            torch.testing.assert_close(
                sparse_attention(q, k, v, cfg), softmax_attention(q, k, v, None), atol=1e-5, rtol=1e-5
            )


def test_sparse_differs_from_dense_when_topk_is_small():
    q, k, v = _qkv(1, 4, 2, 200, seed=1)
    assert (sparse_attention(q, k, v, SMALL) - softmax_attention(q, k, v, None)).abs().max() > 1e-2


def test_gather_and_mask_references_agree_over_a_cache():
    q, k, v = _qkv(2, 8, 2, 37, tk=160, seed=2)
    idx = select_block_indices(q, k, SMALL)
    ref = sparse_attention_ref(q, k, v, SMALL, indices=idx, chunk_size=5)
    torch.testing.assert_close(
        sparse_attention_gather(q, k, v, idx, SMALL.block_size, chunk_size=3), ref, atol=1e-5, rtol=1e-5
    )
    # decode: one token, with cached compressed keys, reads only the selected blocks
    kc = compress_keys(k, SMALL.kernel_size, SMALL.kernel_stride)
    one = sparse_decode(q[:, :, -1:], k, v, SMALL, compressed_k=kc)
    torch.testing.assert_close(one, ref[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_dense_regime_is_per_query():
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=1, dense_len=50)
    q, k, v = _qkv(1, 4, 2, 120, seed=4)
    out = sparse_attention(q, k, v, cfg)
    dense = softmax_attention(q, k, v, None)
    torch.testing.assert_close(out[:, :, :49], dense[:, :, :49], atol=1e-5, rtol=1e-5)  # t + 1 < 50
    assert (out[:, :, 60:] - dense[:, :, 60:]).abs().max() > 1e-3
    # whole call below dense_len: the dense kernel itself
    assert torch.equal(
        sparse_attention(q[:, :, :49], k[:, :, :49], v[:, :, :49], cfg),
        softmax_attention(q[:, :, :49], k[:, :, :49], v[:, :, :49], None),
    )


def test_gradients_flow_and_match_dense_when_everything_is_selected():
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=100, dense_len=0)
    q, k, v = _qkv(1, 4, 2, 45, seed=6)
    grads = []
    for fn in (lambda a, b, c: sparse_attention(a, b, c, cfg), lambda a, b, c: softmax_attention(a, b, c, None)):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    sparse_attention(*leaves, SMALL).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in leaves)


def test_flex_block_mask_is_the_selection():
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = SparseConfig(kernel_size=32, kernel_stride=16, block_size=32, window_size=64, topk=2, dense_len=0)
    for group, tq, tk in ((2, 300, 300), (16, 40, 300), (3, 1, 300)):
        q, k, _ = _qkv(1, 2 * group, 2, tq, tk=tk, seed=group)
        idx = select_block_indices(q, k, cfg)
        for layout in ("padded", "full"):  # (to_dense needs the full-width tables)
            bm = flex_block_mask(idx, tq, tk, cfg.block_size, group, layout=layout)
            assert bm.BLOCK_SIZE == (16 * math.ceil(group / 16), cfg.block_size)
            assert torch.equal(bm.to_dense().bool(), indices_to_mask(idx, math.ceil(tk / cfg.block_size)))
            # the query's own block is the only partial (mask_mod) block
            own = (torch.arange(tk - tq, tk) // cfg.block_size).view(1, 1, tq)
            assert torch.equal(bm.kv_indices[..., 0].long(), own.expand(1, 2, tq)) and (bm.kv_num_blocks == 1).all()
            assert (bm.q_indices is not None) == (layout == "full")
    with pytest.raises(ValueError, match="unknown BlockMask layout"):
        flex_block_mask(idx, tq, tk, cfg.block_size, group, layout="wide")
    for args in ((idx, tq + 1, tk, 32, group), (idx.float(), tq, tk, 32, group), (idx[0], tq, tk, 32, group),
                 (idx, tq, tk, 0, group), (idx, tq, tk, 32, 0), (idx, tq, tq - 1, 32, group)):
        with pytest.raises(ValueError, match="flex_block_mask"):
            flex_block_mask(*args)
    q, k, v = _qkv(1, 4, 2, 40)
    for layout in ("bogus", "", 5):
        with pytest.raises(ValueError, match="unknown BlockMask layout"):
            sparse_attention_flex(q, k, v, select_block_indices(q, k, cfg), 32, layout=layout)
    with pytest.raises(ValueError, match="needs layout='full'"):  # CPU: only the full tables run
        sparse_attention_flex(q, k, v, select_block_indices(q, k, cfg), 32, layout="compact")


# -------------------------------------------------------------------------------------- layer, model


def _config(layer_types, sparse, **overrides):
    fields = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=layer_types,
        sparse_config=sparse.to_dict(),
        qk_norm=True,
        attention_output_gate=True,
        hype_base=500.0,
        initializer_range=0.2,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


def test_layer_below_dense_len_equals_attention_layer():
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=1, dense_len=64)
    config = _config(["sparse"], cfg)
    sparse_layer = SparseAttention(config, 0).eval()
    dense_layer = HyPEAttention(config, 0).eval()
    dense_layer.load_state_dict(sparse_layer.state_dict())  # same parameter names, nothing new
    x = torch.randn(2, 40, 64)
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        assert torch.equal(sparse_layer(x, None, pos), dense_layer(x, None, pos))
        caches = [HybridCache(["sparse"]), HybridCache(["sparse"])]
        a = sparse_layer(x[:, :30], None, pos[:, :30], cache=caches[0])
        b = dense_layer(x[:, :30], None, pos[:, :30], cache=caches[1])
        assert torch.equal(a, b)
        for t in range(30, 40):
            a = sparse_layer(x[:, t : t + 1], None, pos[:, t : t + 1], cache=caches[0])
            b = dense_layer(x[:, t : t + 1], None, pos[:, t : t + 1], cache=caches[1])
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dense_len", [0, 40])
def test_prefill_then_decode_equals_full_forward(dense_len):
    cfg = SparseConfig(
        kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16, topk=2, dense_len=dense_len
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(_config(["sparse", "lightning", "sparse"], cfg)).eval()
    ids = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :25], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        logits = [out.logits]
        for t in range(25, 90):  # crosses many block boundaries; 12 blocks > 1 init + 2 local + top-2
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=1e-4)
    # the sparse path was really taken: the same model with everything selected differs
    dense_model = HybridForCausalLM(
        _config(["sparse", "lightning", "sparse"], SparseConfig(**{**cfg.to_dict(), "topk": 100}))
    ).eval()
    dense_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dense_model(ids, use_cache=False).logits - full).abs().max() > 1e-3


def test_left_padding_matches_unpadded_rows():
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=8, window_size=16, topk=2, dense_len=0)
    torch.manual_seed(0)
    model = HybridForCausalLM(_config(["sparse", "lightning"], cfg)).eval()
    ids = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :11] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, 11:], use_cache=False).logits
    torch.testing.assert_close(batched[1, 11:], alone[0], atol=1e-4, rtol=1e-4)


def test_packed_sequences_attend_within_their_sequence():
    config = _config(["sparse"], SMALL)
    layer = SparseAttention(config, 0).eval()
    q, k, v = _qkv(1, 4, 2, 90, seed=9)
    cu = torch.tensor([0, 33, 90])
    with torch.no_grad():
        packed = layer.attend(q, k, v, cu_seqlens=cu)
        parts = [sparse_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], SMALL) for a, b in ((0, 33), (33, 90))]
    torch.testing.assert_close(packed, torch.cat(parts, 2))


# ------------------------------------------------------------------ FlexAttention layout check (GPU guard)


def _fake_flex(wrong_layouts):
    """A stand-in for sparse_attention_flex: the reference for the good layouts, garbage (or an error) for the
    layouts in ``wrong_layouts``; records the layouts it was asked for."""
    from hybridize.ops import sparse_attention as sa

    calls = []

    def fake(q, k, v, indices, block_size, *, scale=None, layout=None, **_):
        calls.append((layout, q.shape[2], k.shape[2]))
        if wrong_layouts.get(layout) == "raise":
            raise RuntimeError("no kernel")
        cfg = SparseConfig(block_size=block_size, kernel_size=block_size // 2, kernel_stride=block_size // 4,
                           window_size=2 * block_size, topk=2, dense_len=0)
        out = sa.sparse_attention_ref(q.float(), k.float(), v.float(), cfg, scale=scale, indices=indices).to(q.dtype)
        return out + 1.0 if wrong_layouts.get(layout) == "wrong" else out

    return fake, calls


@pytest.mark.parametrize(
    "wrong, expected",
    [({}, "compact"), ({"compact": "wrong"}, "padded"), ({"compact": "raise", "padded": "wrong"}, "full"),
     ({"compact": "wrong", "padded": "raise", "full": "wrong"}, None)],
)
def test_flex_mask_variant_takes_the_first_layout_that_matches_the_reference(monkeypatch, wrong, expected):
    from hybridize.ops import sparse_attention as sa

    fake, calls = _fake_flex(wrong)
    monkeypatch.setattr(sa, "sparse_attention_flex", fake)
    monkeypatch.setattr(sa, "_flex_variants", {})
    cfg = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, dense_len=0)
    assert sa.flex_mask_variant(torch.device("cpu"), torch.float32, 4, 2, 16, cfg) == expected
    tried = [c[0] for c in calls]
    n = len(sa.FLEX_MASK_VARIANTS) if expected is None else sa.FLEX_MASK_VARIANTS.index(expected) + 1
    assert tried == list(sa.FLEX_MASK_VARIANTS[:n])
    # cached: a second question runs nothing
    assert sa.flex_mask_variant(torch.device("cpu"), torch.float32, 4, 2, 16, cfg) == expected and len(calls) == len(tried)


@pytest.mark.parametrize("layout", ["padded", "full"])
def test_wide_layouts_run_in_query_slices_that_equal_one_call(monkeypatch, layout):
    """Padded and full masks grow as queries x key blocks: the prefill is cut into query slices, each over the keys it
    may see; the concatenation equals the reference over the whole chunk (queries after a cache)."""
    from hybridize.ops import sparse_attention as sa

    fake, calls = _fake_flex({})
    monkeypatch.setattr(sa, "sparse_attention_flex", fake)
    monkeypatch.setattr(sa, "FULL_MASK_ENTRIES", 16 * 7)  # 7 key blocks of 16 -> 16-query slices
    cfg = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=2, dense_len=0)
    q, k, v = _qkv(1, 4, 2, 50, tk=110, seed=3)
    idx = select_block_indices(q, k, cfg)
    out = sa._flex_in_query_chunks(q, k, v, idx, 16, None, layout)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, cfg, indices=idx), atol=1e-5, rtol=1e-5)
    assert calls == [(layout, 16, 76), (layout, 16, 92), (layout, 16, 108), (layout, 2, 110)]
    calls.clear()
    sa._flex_in_query_chunks(q, k, v, idx, 16, None, "compact")  # compact: one call
    assert [(t, kv) for _, t, kv in calls] == [(50, 110)]


@pytest.mark.parametrize("dense_len", [0, 1000])
def test_sparse_attention_checks_shapes_on_every_path(dense_len):
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=16, topk=2, dense_len=dense_len)
    k = torch.randn(1, 2, 40, 16)
    for q, kk, vv in ((torch.randn(1, 3, 40, 16), k, k), (torch.randn(1, 4, 40, 8), k, k),
                      (torch.randn(1, 4, 0, 16), k, k), (torch.randn(4, 40, 16), k, k),
                      (torch.randn(1, 4, 40, 16), k, torch.randn(1, 2, 39, 16))):
        with pytest.raises(ValueError, match="expected q"):
            sparse_attention(q, kk, vv, cfg)


def test_flex_is_compiled_with_fullgraph_and_a_raised_recompile_limit(monkeypatch):
    """compile_flex: fullgraph=True (past the limit a plain compile runs flex eagerly, which ignores BlockMask
    block lists: a silently dense sparse layer); the limit raised per function, or globally on an older torch."""
    import torch._dynamo.config as dynamo_config

    from hybridize.ops import backend

    seen = {}

    def new_compile(fn, *, fullgraph=False, dynamic=None, recompile_limit=None):
        seen.update(fullgraph=fullgraph, dynamic=dynamic, recompile_limit=recompile_limit)
        return fn

    monkeypatch.setattr(torch, "compile", new_compile)
    assert backend.compile_flex(abs, dynamic=True) is abs
    assert seen == {"fullgraph": True, "dynamic": True, "recompile_limit": backend.FLEX_RECOMPILE_LIMIT}

    def old_compile(fn, *, fullgraph=False, dynamic=None):
        seen.update(fullgraph=fullgraph, old=True)
        return fn

    monkeypatch.setattr(torch, "compile", old_compile)
    with dynamo_config.patch(recompile_limit=8):  # (monkeypatch cannot restore dynamo's config module)
        backend.compile_flex(abs)
        assert seen["old"] and seen["fullgraph"] and dynamo_config.recompile_limit == backend.FLEX_RECOMPILE_LIMIT
    with dynamo_config.patch(recompile_limit=100):
        backend.compile_flex(abs)
        assert dynamo_config.recompile_limit == 100  # never lowered


# ------------------------------------------------------------------ fla NSA candidate (GPU; logic checked here)


def test_nsa_supported_names_what_does_not_fit(monkeypatch):
    from hybridize.ops import backend
    from hybridize.ops import sparse_attention as sa

    assert "head_dim <= 256" in sa.nsa_supported(32, 2, 512)
    assert "do not split" in sa.nsa_supported(32, 3, 128)
    assert [sa.nsa_group(g) for g in (1, 3, 4, 16, 24, 32)] == [16, 16, 16, 16, 32, 32]
    monkeypatch.setattr(backend, "fla_available", lambda: False)
    assert "not installed" in sa.nsa_supported(32, 2, 128)  # SALA's shape, without fla
    with pytest.raises(ValueError, match="not installed"):
        sa.sparse_attention_nsa(*_qkv(1, 9, 3, 40, d=16)[:3], torch.zeros(1, 3, 40, 2, dtype=torch.long), 16)


@pytest.mark.parametrize("heads, kv_heads", [(32, 2), (8, 2), (9, 3), (48, 2)])
def test_nsa_call_pads_the_query_group_to_the_kernels_tile(monkeypatch, heads, kv_heads):
    """Groups that are not a power of two >= 16 (Qwen3-8B's 4, SmolLM2's 3, 24) run with zero query rows up to
    nsa_group(g); the result is the reference's. fla's kernel is replaced by a stand-in that enforces its
    shape rule and computes the same attention (the real one runs only on a GPU: tests/test_sparse_gpu.py)."""
    import sys
    import types

    from hybridize.ops import backend
    from hybridize.ops import sparse_attention as sa

    seen = []

    def parallel_nsa(q, k, v, *, block_indices, block_counts, block_size, scale):
        g = q.shape[2] // k.shape[2]
        assert g >= 16 and g & (g - 1) == 0, "Group size (HQ/H) must be a power of 2 and >= 16 in NSA"
        assert block_indices.shape == (*q.shape[:2], k.shape[2], block_counts)
        seen.append(q.shape[2])
        cfg = SparseConfig(block_size=block_size, kernel_size=8, kernel_stride=4, window_size=32, topk=2, dense_len=0)
        out = sa.sparse_attention_ref(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
                                      cfg, scale=scale, indices=block_indices.transpose(1, 2))
        return out.transpose(1, 2).to(q.dtype)

    monkeypatch.setitem(sys.modules, "fla.ops.nsa", types.SimpleNamespace(parallel_nsa=parallel_nsa))
    monkeypatch.setattr(backend, "fla_available", lambda: True)
    cfg = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=2, dense_len=0)
    q, k, v = _qkv(1, heads, kv_heads, 150, d=16)[:3]
    q_tokens_major = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, d] view of a [B, T, H, d] tensor
    for qq in (q, q[:, :, -37:], q_tokens_major):  # a full prefill, a chunk over a cache, the model's layout
        idx = sa.select_block_indices(qq, k, cfg)
        out = sa.sparse_attention_nsa(qq, k, v, idx, 16)
        ref = sa.sparse_attention_ref(qq, k, v, cfg, indices=idx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen == [kv_heads * sa.nsa_group(heads // kv_heads)] * 3


@pytest.mark.parametrize("behaviour, ok", [("right", True), ("wrong", False), ("raise", False)])
def test_nsa_check_accepts_only_a_kernel_that_equals_the_reference(monkeypatch, behaviour, ok):
    """nsa_mismatch runs the kernel on a full prefill and on a chunk over a cache, against the reference."""
    from hybridize.ops import sparse_attention as sa

    calls = []

    def fake(q, k, v, indices, block_size, *, scale=None):
        calls.append((q.shape[2], k.shape[2]))
        if behaviour == "raise":
            raise RuntimeError("no kernel for this GPU")
        cfg = SparseConfig(block_size=block_size, kernel_size=block_size // 2, kernel_stride=block_size // 4,
                           window_size=2 * block_size, topk=2, dense_len=0)
        out = sa.sparse_attention_ref(q.float(), k.float(), v.float(), cfg, scale=scale, indices=indices).to(q.dtype)
        return out * 1.1 if behaviour == "wrong" else out

    monkeypatch.setattr(sa, "nsa_supported", lambda *a: None)
    monkeypatch.setattr(sa, "sparse_attention_nsa", fake)
    monkeypatch.setattr(sa, "_nsa_checks", {})
    cfg = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, dense_len=0)
    problem = sa.nsa_mismatch(torch.device("cpu"), torch.float32, 32, 2, 16, cfg)
    assert (problem is None) == ok
    if behaviour == "wrong":
        assert "relative error" in problem
    if behaviour == "raise":
        assert "RuntimeError: no kernel" in problem
    t = 8 * 16 + 13
    assert calls[0] == (t, t) and (behaviour != "right" or calls[1] == (100, t))
    n = len(calls)
    assert sa.nsa_mismatch(torch.device("cpu"), torch.float32, 32, 2, 16, cfg) == problem and len(calls) == n  # cached


def test_sparse_prefill_choice_from_the_environment(monkeypatch):
    from hybridize.ops import sparse_attention as sa

    monkeypatch.delenv(sa.SPARSE_PREFILL_ENV, raising=False)
    assert sa.sparse_prefill_choice() == "auto"
    monkeypatch.setenv(sa.SPARSE_PREFILL_ENV, " Flex ")
    assert sa.sparse_prefill_choice() == "flex"
    monkeypatch.setenv(sa.SPARSE_PREFILL_ENV, "fast")
    with pytest.raises(ValueError, match="HYBRIDIZE_SPARSE_PREFILL='fast': choose one of"):
        sa.sparse_attention(*_qkv(1, 4, 2, 40, d=16)[:3], SparseConfig(kernel_size=4, kernel_stride=2, block_size=8,
                                                                        window_size=16, topk=2, dense_len=0))


@pytest.mark.slow
def test_sparse_benchmark_script_smoke_on_cpu(tmp_path):
    """benchmarks/sparse_attention.py runs end to end on CPU (tiny sizes) and records every section, the
    model-like chunked prefill included; bad flags are refused before anything runs."""
    import json

    from conftest import benchmark_script

    mod = benchmark_script("sparse_attention")
    out = tmp_path / "r.json"
    for bad in (["--chunk", "-1"], ["--sizes", "x"], ["--repeats", "0"], ["--score-elements", "0"], ["--device", "xyz"]):
        with pytest.raises(SystemExit):
            mod.main(["--device", "cpu", "--out", str(out), *bad])
    assert not out.exists()
    assert mod.main(["--device", "cpu", "--sizes", "320", "--chunk", "128", "--repeats", "1", "--no-compiled-selection",
                     "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert isinstance(row["prefill"]["model_chunked"], float) and isinstance(row["prefill"]["dense_sdpa"], float)
    assert isinstance(row["decode"]["gather"], float) and "model_chunked_kernels" in row
