import math

import pytest
import torch

from seerlib import reference
from seerlib.flex import flex_sparse_attention, to_flex_block_mask
from seerlib.select import Selection, select_blocks


def qkv(B=1, Hq=4, Hkv=2, S=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g),
            torch.randn(B, Hkv, S, d, generator=g))


# ---------------------------------------------------------------- FlexAttention (no model)


@pytest.mark.parametrize("S_, b", [(100, 16), (128, 32), (97, 8)])
def test_flex_block_mask_round_trips(S_, b):
    nb = math.ceil(S_ / b)
    mask = select_blocks(torch.randn(2, 3, nb, nb), Selection(density=0.4))
    mask[0, 0, -1, 0] = True  # an off-diagonal block the top-k might not have picked
    bm = to_flex_block_mask(mask, S_, b)
    assert bm.BLOCK_SIZE == (b, b) and bm.seq_lengths == (S_, S_)
    assert torch.equal(bm.to_dense()[..., :nb, :nb].bool(), mask)
    # tiles above the diagonal are never kept
    upper = torch.ones(2, 3, nb, nb, dtype=torch.bool)
    assert torch.equal(to_flex_block_mask(upper, S_, b).to_dense()[..., :nb, :nb].bool(),
                       upper.tril())


def test_flex_block_mask_errors():
    with pytest.raises(ValueError, match=r"needs \(B, H, 7, 7\)"):
        to_flex_block_mask(torch.ones(1, 1, 6, 6, dtype=torch.bool), 100, 16)
    with pytest.raises(ValueError, match="torch.bool"):
        to_flex_block_mask(torch.ones(1, 1, 7, 7), 100, 16)


@pytest.mark.parametrize("S_, b", [(100, 16), (64, 64)])
def test_flex_path_matches_reference_block_sparse(S_, b):
    q, k, v = qkv(S=S_)
    nb = math.ceil(S_ / b)
    mask = select_blocks(torch.randn(1, 4, nb, nb), Selection(density=0.4))
    out = flex_sparse_attention(q, k, v, mask, b, scale=0.25, compiled=False)
    ref = reference.block_sparse_attention(q, k, v, mask, b, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_path_carries_the_logit_soft_cap(compiled):
    """Gemma2's soft-cap as a score_mod on the scaled scores: the reference's soft-capped
    block-sparse attention, eager and compiled."""
    q, k, v = qkv(S=96, seed=3)
    q = q * 3
    mask = select_blocks(torch.randn(1, 4, 6, 6), Selection(density=0.4))
    out = flex_sparse_attention(q, k, v, mask, 16, scale=0.25, compiled=compiled, softcap=2.0)
    ref = reference.block_sparse_attention(q, k, v, mask, 16, scale=0.25, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    plain = reference.block_sparse_attention(q, k, v, mask, 16, scale=0.25)
    assert (ref - plain).abs().max() > 1e-2


def test_compiled_flex_skips_dropped_tiles_exactly():
    """The path the evaluation runs: compiled flex_attention with the plain causal mask_mod."""
    q, k, v = qkv(S=96)
    mask = select_blocks(torch.randn(1, 4, 6, 6), Selection(density=0.3))
    out = flex_sparse_attention(q, k, v, mask, 16, scale=0.25)
    ref = reference.block_sparse_attention(q, k, v, mask, 16, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_refuses_an_empty_sequence():
    with pytest.raises(ValueError, match="seq_len must be a positive number of tokens; got 0"):
        to_flex_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 0, 64)
