import math

import pytest
import torch

from seerlib.select import achieved_density, causal_block_mask, density_to_k, select_blocks


def logits(B=2, H=3, nb=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, nb, nb, generator=g)
    return x.masked_fill(~causal_block_mask(nb), float("-inf"))


def test_density_formula():
    assert density_to_k(0.5, 64) == int((1 - math.sqrt(0.5)) * 64) == 18
    assert density_to_k(0.1, 64) == 3
    assert density_to_k(0.01, 8) == 1
    assert density_to_k(1.0, 10) == 10
    with pytest.raises(ValueError, match="density"):
        density_to_k(0.0, 10)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_topk_rows_and_achieved_density(density):
    nb = 64
    mask = select_blocks(logits(nb=nb), density=density)
    k = density_to_k(density, nb)
    per_row = mask.sum(-1)
    want = torch.clamp(torch.arange(1, nb + 1), max=k)
    assert torch.equal(per_row, want.expand_as(per_row))
    assert abs(achieved_density(mask) - density) < 0.03
    assert not (mask & ~causal_block_mask(nb)).any()


def test_topk_picks_the_largest():
    lg = logits(nb=16)
    mask = select_blocks(lg, density=0.5, keep_diagonal=False)
    k = density_to_k(0.5, 16)
    row = lg[0, 0, 15]
    assert set(mask[0, 0, 15].nonzero().flatten().tolist()) == set(row.topk(k).indices.tolist())


def test_diagonal_guarantee():
    lg = logits(nb=32)
    diag = torch.eye(32, dtype=torch.bool)
    lg = lg.masked_fill(diag, -1e9)  # the gate hates the diagonal
    for kw in ({"density": 0.1}, {"threshold": 0.5}):
        mask = select_blocks(lg, **kw)
        assert mask[..., diag].all()
        assert mask.sum(-1).min() >= 1
    assert not select_blocks(lg, density=0.1, keep_diagonal=False)[..., diag][..., 5:].any()


def test_threshold_sink_and_dense_rows():
    lg = logits(nb=20)
    probs = torch.softmax(lg, -1)
    mask = select_blocks(lg, threshold=0.1, keep_diagonal=False)
    assert torch.equal(mask, probs > 0.1)
    mask = select_blocks(lg, threshold=0.99, keep_sink=True, dense_last_rows=2)
    assert mask[..., 0].all()
    assert torch.equal(mask[..., 18:, :], causal_block_mask(20)[18:].expand(2, 3, 2, 20))


def test_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(logits(), density=0.5, threshold=1e-3)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(logits())
