"""seerlib.reference against brute force: float64 softmax over the materialized attention map."""

import math

import pytest
import torch

from seerlib import reference as R


def brute(q, k, v, causal=True, keep=None, block_size=None):
    """float64, the whole S x S map at once; returns (out, probs)."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    S = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(S, S, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand_as(s)
    if keep is not None:
        blk = torch.arange(S) // block_size
        allowed = allowed & keep[:, :, blk][..., blk]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing allowed -> zeros
    return p @ v, p


def brute_pool(p, b):
    B, H, S, _ = p.shape
    nb = -(-S // b)
    p = torch.nn.functional.pad(p, (0, nb * b - S, 0, nb * b - S))
    return p.reshape(B, H, nb, b, nb, b).amax(dim=(3, 5))


def qkv(B, Hq, Hkv, S, d, dtype=torch.float32):
    return (
        torch.randn(B, Hq, S, d, dtype=dtype),
        torch.randn(B, Hkv, S, d, dtype=dtype),
        torch.randn(B, Hkv, S, d, dtype=dtype),
    )


SHAPES = [(S, g, d) for S in (1, 63, 64, 97, 1025) for g in (1, 3) for d in (64, 128)]


@pytest.mark.parametrize("S,group,d", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_brute_force(S, group, d, causal):
    q, k, v = qkv(2, 3 * group, 3, S, d)
    ref, _ = brute(q, k, v, causal)
    out = R.attention(q, k, v, causal=causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("S,group,d", SHAPES)
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_pooled_attention_matches_brute_force(S, group, d, b):
    q, k, v = qkv(1, 3 * group, 3, S, d)
    ref_out, p = brute(q, k, v)
    out, pooled = R.pooled_attention(q, k, v, b)
    nb = -(-S // b)
    assert pooled.shape == (1, 3 * group, nb, nb) and pooled.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pooled.double(), brute_pool(p, b), atol=1e-6, rtol=1e-5)
    above = torch.triu(torch.ones(nb, nb, dtype=torch.bool), 1)
    assert (pooled[..., above] == 0).all()
    assert (pooled.diagonal(dim1=-2, dim2=-1) > 0).all()  # every diagonal tile holds a causal entry


def test_pooled_attention_in_chunks(monkeypatch):
    """Chunked rows (a chunk of 2 blocks) give the same map as one chunk."""
    q, k, v = qkv(1, 6, 2, 300, 64)
    whole = R.pooled_attention(q, k, v, 32)
    monkeypatch.setattr(R, "_CHUNK_ELEMENTS", 6 * 300 * 64)
    chunked = R.pooled_attention(q, k, v, 32)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_non_causal_pooled_has_upper_tiles():
    q, k, v = qkv(1, 2, 2, 97, 64)
    _, pooled = R.pooled_attention(q, k, v, 32, causal=False)
    _, p = brute(q, k, v, causal=False)
    torch.testing.assert_close(pooled.double(), brute_pool(p, 32), atol=1e-6, rtol=1e-5)
    assert (pooled[..., 0, 3] > 0).all()


@pytest.mark.parametrize("S,group,d", [(97, 3, 64), (1025, 1, 128), (200, 3, 128)])
@pytest.mark.parametrize("b", [16, 64])
def test_block_sparse_all_kept_equals_attention(S, group, d, b):
    q, k, v = qkv(1, 3 * group, 3, S, d)
    nb = -(-S // b)
    mask = torch.ones(1, 3 * group, nb, nb, dtype=torch.bool)
    torch.testing.assert_close(R.block_sparse_attention(q, k, v, mask, b), R.attention(q, k, v))


@pytest.mark.parametrize("S,b", [(63, 16), (97, 32), (1025, 128), (300, 64)])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_block_sparse_random_mask_matches_brute_force(S, b, density):
    q, k, v = qkv(2, 6, 2, S, 64)
    nb = -(-S // b)
    mask = torch.rand(2, 6, nb, nb) < density
    ref, _ = brute(q, k, v, keep=mask, block_size=b)
    out = R.block_sparse_attention(q, k, v, mask, b)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_block_sparse_empty_row_gives_zeros():
    q, k, v = qkv(1, 3, 3, 97, 64)
    mask = torch.ones(1, 3, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = False  # query block 2 of head 1 keeps nothing
    mask[0, 2, 3, 3] = False  # head 2's last block keeps only earlier blocks: still defined
    out = R.block_sparse_attention(q, k, v, mask, 32)
    assert (out[0, 1, 64:96] == 0).all()
    assert not out.isnan().any()
    assert (out[0, 1, 96:] != 0).any()
    # A kept tile above the diagonal adds nothing: causality holds inside kept tiles.
    only_upper = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    only_upper[..., 0, 1:] = True
    assert (R.block_sparse_attention(q, k, v, only_upper, 32)[:, :, :32] == 0).all()


def test_mask_to_index_round_trip():
    mask = torch.rand(2, 3, 9, 9) < 0.4
    mask[0, 0, 4] = False
    counts, idx = R.mask_to_index(mask)
    assert counts.dtype == idx.dtype == torch.int32
    assert counts.shape == (2, 3, 9) and idx.shape == (2, 3, 9, 9)
    assert torch.equal(counts, mask.sum(-1).int())
    assert counts[0, 0, 4] == 0 and (idx[0, 0, 4] == -1).all()
    for b, h, i in [(0, 0, 0), (1, 2, 8), (0, 1, 5)]:
        n = int(counts[b, h, i])
        assert idx[b, h, i, :n].tolist() == torch.nonzero(mask[b, h, i]).flatten().tolist()
        assert (idx[b, h, i, n:] == -1).all()
    assert torch.equal(R.index_to_mask(counts, idx), mask)


def test_chunked_memory_is_bounded_at_8k():
    """S = 8192 with 9 heads: the chunk holds far fewer than S * S scores per head."""
    rows = R._chunk_rows(1, 9, 8192, 64)
    assert rows % 64 == 0 and rows * 9 * 8192 * 4 < 1.5 * 2**30


@pytest.mark.parametrize(
    "args,match",
    [
        (
            dict(q=(1, 9, 64, 64), k=(1, 4, 64, 64)),
            "k has 4 heads; q's 9 heads need a divisor of 9",
        ),
        (dict(q=(1, 4, 64, 64), k=(1, 2, 65, 64)), "sequence length 65; q has 64"),
        (dict(q=(1, 4, 64, 64), k=(1, 2, 64, 32)), "head dim 32; q has 64"),
        (dict(q=(1, 4, 64), k=(1, 2, 64, 64)), "q must be 4-D"),
        (dict(q=(2, 4, 64, 64), k=(1, 2, 64, 64)), "batch size 1; q has 2"),
    ],
)
def test_bad_shapes_are_named(args, match):
    q = torch.randn(*args["q"])
    k = torch.randn(*args["k"])
    with pytest.raises(ValueError, match=match):
        R.attention(q, k, k.clone())


def test_bad_masks_and_block_sizes_are_named():
    q, k, v = qkv(1, 4, 2, 100, 64)
    with pytest.raises(ValueError, match="block_mask must be torch.bool; got torch.float32"):
        R.block_sparse_attention(q, k, v, torch.ones(1, 4, 4, 4), 32)
    with pytest.raises(ValueError, match=r"expected \(B, Hq, nb, nb\) = \(1, 4, 4, 4\)"):
        R.block_sparse_attention(q, k, v, torch.ones(1, 4, 3, 3, dtype=torch.bool), 32)
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            R.pooled_attention(q, k, v, bad)
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        R.attention(q.long(), k, v)
    with pytest.raises(ValueError, match="block_mask must be a torch.bool tensor"):
        R.mask_to_index(torch.ones(1, 1, 2, 2))


# ---------------------------------------------------------------- shared primitives


def test_default_scale():
    assert R.default_scale(64) == 1.0 / math.sqrt(64) == 0.125
    assert R.default_scale(96) == 1.0 / math.sqrt(96)
    assert R.default_scale(64, 0.5) == 0.5 and isinstance(R.default_scale(64, 2), float)


@pytest.mark.parametrize("group", [1, 3])
def test_grouped_scores_equal_repeated_kv_heads(group):
    q = torch.randn(2, 2 * group, 7, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 11, 16, dtype=torch.float64)  # R = 7 query rows, S = 11 keys
    want = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * 0.3
    got = R.grouped_scores(q, k, 0.3)
    assert got.shape == (2, 2 * group, 7, 11) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.grouped_scores(q, k), want / 0.3 / math.sqrt(16))
    torch.testing.assert_close(R.grouped_scores(q * 0.3, k, 1.0), want)  # q scaled already
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        R.grouped_scores(torch.randn(1, 4, 7, 16), torch.randn(1, 3, 7, 16))


@pytest.mark.parametrize("nb", [1, 2, 7, 64])
def test_causal_block_count_and_mask(nb):
    mask = R.causal_block_mask(nb)
    assert mask.shape == (nb, nb) and mask.dtype == torch.bool
    assert R.causal_block_count(nb) == int(mask.sum()) == nb * (nb + 1) // 2
    assert torch.equal(mask, torch.ones(nb, nb, dtype=torch.bool).tril())
    assert mask.diagonal().all() and not mask.triu(1).any()


# ---------------------------------------------------------------- non-finite values, dropped tiles


@pytest.mark.parametrize("where", ["v", "k", "q"])
def test_block_sparse_nan_in_a_dropped_tile_stays_out(where):
    """A NaN (or inf) in a tile no row keeps changes nothing: dropped tiles are never computed.

    Before, the reference multiplied the dropped tiles' zero probabilities by V, and 0 * NaN
    reached every row; the Triton kernel, which never loads a dropped tile, stayed finite."""
    S, b = 97, 32  # nb = 4, the last block partial; GQA 3 (9 query heads over 3 kv heads)
    q, k, v = qkv(1, 9, 3, S, 64)
    nb = -(-S // b)
    mask = torch.rand(1, 9, nb, nb, generator=torch.Generator().manual_seed(3)) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)  # every row keeps its diagonal tile
    mask[..., 1] = False  # key block 1 is dropped by every query head and row
    bad = {"v": v, "k": k, "q": q}[where].clone()
    if where == "q":
        mask[:, :, 1] = False  # query block 1 (rows 32..63) keeps no tile: its rows give zeros
        bad[:, :, 40] = float("nan")
    else:
        bad[:, 1, 40] = float("nan")  # kv head 1, key 40: inside key block 1
        bad[:, 2, 50] = float("inf")
    args = {"q": q, "k": k, "v": v, where: bad}
    out = R.block_sparse_attention(args["q"], args["k"], args["v"], mask, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, R.block_sparse_attention(q, k, v, mask, b))
    ref, _ = brute(args["q"].nan_to_num(0, 0, 0), args["k"].nan_to_num(0, 0, 0),
                   args["v"].nan_to_num(0, 0, 0), keep=mask, block_size=b)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_block_sparse_nan_in_a_kept_tile_reaches_only_rows_that_keep_it():
    S, b = 97, 32
    q, k, v = qkv(1, 9, 3, S, 64)
    mask = torch.ones(1, 9, 4, 4, dtype=torch.bool)
    mask[:, 3:6, :, 1] = False  # the query heads of kv head 1 drop key block 1 ...
    mask[:, 3, 2, 1] = True  # ... but head 3's query block 2 keeps it
    v = v.clone()
    v[:, 1, 40] = float("nan")  # kv head 1, key 40 (key block 1)
    out = R.block_sparse_attention(q, k, v, mask, b)
    rows = torch.arange(S)
    reached = torch.zeros(9, S, dtype=torch.bool)
    reached[3, (rows >= 64) & (rows < 96)] = True  # head 3, query block 2: keeps the tile
    assert torch.equal(out[0].isnan().any(-1), reached)


# ---------------------------------------------------------------- logit soft-capping (Gemma2)


def brute_capped(q, k, v, cap, keep=None, block_size=None):
    """The plain eager formula in float64: x = q k^T / sqrt(d), cap * tanh(x / cap), then the
    causal (and block) mask and the softmax; returns (out, probs)."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    S = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = cap * torch.tanh(s / cap)
    allowed = torch.ones(S, S, dtype=torch.bool).tril().expand_as(s)
    if keep is not None:
        blk = torch.arange(S) // block_size
        allowed = allowed & keep[:, :, blk][..., blk]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v, p


CAPPED = [(97, 3, 64, 16), (1025, 4, 128, 64), (200, 1, 64, 32)]  # S, group, d, b


@pytest.mark.parametrize("cap", [2.0, 50.0])
@pytest.mark.parametrize("S,group,d,b", CAPPED)
def test_softcap_matches_the_eager_formula(S, group, d, b, cap):
    """attention, the pooled map and block-sparse attention (random mask, with empty rows) of the
    soft-capped logits; inputs scaled so the cap bites (logits of about +-cap)."""
    torch.manual_seed(S + group)
    q, k, v = qkv(1, group, 1, S, d)
    q = q * (cap / 2) ** 0.5
    k = k * (cap / 2) ** 0.5
    exp_out, p = brute_capped(q, k, v, cap)
    out, pooled = R.pooled_attention(q, k, v, b, softcap=cap)
    torch.testing.assert_close(out.double(), exp_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pooled.double(), brute_pool(p, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(R.attention(q, k, v, softcap=cap), out, atol=0, rtol=0)
    plain = R.attention(q, k, v)
    assert (plain - out).abs().max() > 1e-2  # the cap changed the result
    nb = R.num_blocks(S, b)
    keep = torch.rand(1, group, nb, nb) < 0.5
    keep[:, 0, nb // 2] = False  # an empty row of blocks: zeros
    exp_sparse, _ = brute_capped(q, k, v, cap, keep, b)
    sparse = R.block_sparse_attention(q, k, v, keep, b, softcap=cap)
    torch.testing.assert_close(sparse.double(), exp_sparse, atol=2e-5, rtol=2e-5)
    assert (sparse[:, 0, (nb // 2) * b:(nb // 2 + 1) * b] == 0).all()


def test_softcap_matches_transformers_gemma2_eager_attention():
    """The reference's order (scale, cap, mask, softmax) is transformers' own eager Gemma2 one."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    q, k, v = qkv(2, 6, 2, 97, 64)
    q = q * 4
    scale, cap = 0.17, 5.0
    module = type("Attn", (), {"num_key_value_groups": 3, "training": False, "head_dim": 64})()
    causal = torch.full((97, 97), float("-inf")).triu(1)[None, None]  # additive, as eager takes
    want, _ = gemma2.eager_attention_forward(module, q, k, v, causal, scaling=scale, softcap=cap)
    got = R.attention(q, k, v, scale=scale, softcap=cap)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_softcap_none_is_the_plain_path_bit_for_bit():
    q, k, v = qkv(1, 4, 2, 97, 32)
    mask = torch.rand(1, 4, 4, 4) < 0.6
    assert torch.equal(R.attention(q, k, v, softcap=None), R.attention(q, k, v))
    pairs = zip(R.pooled_attention(q, k, v, 32, softcap=None), R.pooled_attention(q, k, v, 32),
                strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)
    assert torch.equal(R.block_sparse_attention(q, k, v, mask, 32, softcap=None),
                       R.block_sparse_attention(q, k, v, mask, 32))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "50"])
def test_bad_softcaps_are_named(bad):
    q, k, v = qkv(1, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="softcap must be None or a positive finite number"):
        R.attention(q, k, v, softcap=bad)
