import math

import pytest
import torch

from seerlib.select import (
    Selection,
    achieved_density,
    causal_block_mask,
    density_to_k,
    select_blocks,
)


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
    mask = select_blocks(logits(nb=nb), Selection(density=density))
    k = density_to_k(density, nb)
    per_row = mask.sum(-1)
    want = torch.clamp(torch.arange(1, nb + 1), max=k)
    assert torch.equal(per_row, want.expand_as(per_row))
    assert abs(achieved_density(mask) - density) < 0.03
    assert not (mask & ~causal_block_mask(nb)).any()


def test_topk_picks_the_largest():
    lg = logits(nb=16)
    mask = select_blocks(lg, Selection(density=0.5, diagonal=False))
    k = density_to_k(0.5, 16)
    row = lg[0, 0, 15]
    assert set(mask[0, 0, 15].nonzero().flatten().tolist()) == set(row.topk(k).indices.tolist())


def test_diagonal_guarantee():
    lg = logits(nb=32)
    diag = torch.eye(32, dtype=torch.bool)
    lg = lg.masked_fill(diag, -1e9)  # the gate hates the diagonal
    for kw in ({"density": 0.1}, {"threshold": 0.5}):
        mask = select_blocks(lg, Selection(**kw))
        assert mask[..., diag].all()
        assert mask.sum(-1).min() >= 1
    assert not select_blocks(lg, Selection(density=0.1, diagonal=False))[..., diag][..., 5:].any()


def test_threshold_sink_and_dense_rows():
    lg = logits(nb=20)
    probs = torch.softmax(lg, -1)
    mask = select_blocks(lg, Selection(threshold=0.1, diagonal=False))
    assert torch.equal(mask, probs > 0.1)
    mask = select_blocks(lg, Selection(threshold=0.99, forced={"sink": 1, "last": 2}))
    assert mask[..., 0].all()
    assert torch.equal(mask[..., 18:, :], causal_block_mask(20)[18:].expand(2, 3, 2, 20))


def test_at_most_one_budget_and_no_budget_keeps_every_causal_block():
    with pytest.raises(ValueError, match="give one budget"):
        select_blocks(logits(), Selection(density=0.5, threshold=1e-3))
    # no budget is every causal block; a sparse method refuses it (test_methods)
    assert torch.equal(select_blocks(logits(nb=12), Selection()),
                       causal_block_mask(12).expand(2, 3, 12, 12))


@pytest.mark.parametrize("bad", [dict(threshold=float("nan")), dict(threshold=-0.1),
                                 dict(threshold=1.5), dict(density=0.0), dict(density=1.5),
                                 dict(density=float("nan"))])
def test_selection_refuses_budgets_out_of_range(bad):
    with pytest.raises(ValueError, match="must be in"):
        Selection(**bad)


@pytest.mark.parametrize("density", [0.2, 0.3, 0.5])  # at 0.1, k = 2: sink + diagonal only
def test_adaptive_keeps_topk_budget_spread_by_score(density):
    lg = logits(B=2, H=3, nb=48, seed=3)
    topk = select_blocks(lg, Selection(density=density, forced={"sink": 1}))
    mask = select_blocks(lg, Selection(density=density, budget="layer", forced={"sink": 1}))
    # the same number of blocks per batch element as top-k: equal achieved density
    assert torch.equal(mask.flatten(1).sum(-1), topk.flatten(1).sum(-1))
    assert achieved_density(mask) == achieved_density(topk)
    assert not (mask & ~causal_block_mask(48)).any()
    assert mask[..., 0].all() and mask[..., torch.eye(48, dtype=torch.bool)].all()
    assert not torch.equal(mask, topk)  # rows no longer hold k each
    # every kept free block scores at least as high as every dropped causal one
    probs = torch.softmax(lg, -1)
    free = causal_block_mask(48) & ~torch.eye(48, dtype=torch.bool)
    free[:, 0] = False
    for b in range(2):
        p, m, f = probs[b], mask[b], free.expand(3, 48, 48)
        assert p[m & f].min() >= p[~m & f].max()


def test_adaptive_gives_blocks_to_the_head_that_spreads_its_mass():
    nb = 32
    peaked = torch.full((nb, nb), -20.0)
    peaked[:, 1] = 0.0  # one key block takes all the mass
    flat = torch.zeros(nb, nb)  # mass spread evenly
    lg = torch.stack([peaked, flat])[None].masked_fill(~causal_block_mask(nb), float("-inf"))
    topk = select_blocks(lg, Selection(density=0.3, diagonal=False))
    mask = select_blocks(lg, Selection(density=0.3, diagonal=False, budget="layer"))
    assert topk[0, 0].sum() == topk[0, 1].sum()
    # column 1 holds all of the peaked head's mass; the rest of the budget goes to the flat head
    assert mask[0, 0, 1:, 1].all() and mask[0, 1].sum() > topk[0, 1].sum()


def test_adaptive_dense_last_row_stays_within_the_topk_budget():
    nb = 40
    lg = logits(B=2, H=3, nb=nb, seed=5)
    topk = select_blocks(lg, Selection(density=0.3, forced={"sink": 1, "local": 1}))
    mask = select_blocks(lg, Selection(density=0.3, budget="layer",
                                       forced={"sink": 1, "local": 1, "last": 1}))
    assert torch.equal(mask[..., -1, :], torch.ones(2, 3, nb, dtype=torch.bool))
    # the dense row's blocks come out of the same budget: achieved density unchanged
    assert torch.equal(mask.flatten(1).sum(-1), topk.flatten(1).sum(-1))


def test_relative_adaptive_ranks_by_score_times_row_length():
    nb = 48
    lg = logits(B=2, H=3, nb=nb, seed=7)
    topk = select_blocks(lg, Selection(density=0.3, forced={"sink": 1}))
    plain = select_blocks(lg, Selection(density=0.3, budget="layer", forced={"sink": 1}))
    mask = select_blocks(lg, Selection(density=0.3, budget="relative", forced={"sink": 1}))
    assert torch.equal(mask.flatten(1).sum(-1), topk.flatten(1).sum(-1))  # the same budget
    causal = causal_block_mask(nb)
    rel = torch.softmax(lg.masked_fill(~causal, float("-inf")), -1) * causal.sum(-1, keepdim=True)
    free = causal & ~torch.eye(nb, dtype=torch.bool)
    free[:, 0] = False
    for b in range(2):
        r, m, f = rel[b], mask[b], free.expand(3, nb, nb)
        assert r[m & f].min() >= r[~m & f].max()
    # plain scores shrink with the row's length, so the last rows get more blocks this way
    assert mask[..., -8:, :].sum() > plain[..., -8:, :].sum()
    with pytest.raises(ValueError, match="budget must be one of"):
        Selection(density=0.3, budget="relatve")


@pytest.mark.parametrize("relative", [False, True])
def test_row_floor_keeps_a_share_of_topk_in_every_row_within_the_budget(relative):
    nb = 40
    lg = 3 * logits(B=2, H=3, nb=nb, seed=11)  # peaked rows, so the adaptive rule starves some
    kw = dict(density=0.5, forced={"sink": 1})
    rule = "relative" if relative else "layer"
    topk = select_blocks(lg, Selection(**kw))
    plain = select_blocks(lg, Selection(budget=rule, **kw))
    assert torch.equal(select_blocks(lg, Selection(row_floor=0.0, budget=rule, **kw)), plain)
    assert torch.equal(select_blocks(lg, Selection(row_floor=1.0, budget=rule, **kw)),
                       topk)  # a full floor is top-k
    mask = select_blocks(lg, Selection(row_floor=0.5, budget=rule, **kw))
    assert torch.equal(mask.flatten(1).sum(-1), topk.flatten(1).sum(-1))  # the same budget
    k_row = causal_block_mask(nb).sum(-1).clamp(max=density_to_k(0.5, nb))
    floor = torch.ceil(0.5 * k_row - 1e-6)
    assert (mask.sum(-1) >= floor).all()
    assert (plain.sum(-1) < floor).any()  # the floor changed some starved row
    # the floor is each row's best blocks (forced ones first): the first ceil(k_row / 2) are kept
    forced = torch.eye(nb, dtype=torch.bool)
    forced[:, 0] = True
    best = torch.where(forced, float("inf"), torch.where(topk, lg, float("-inf")))
    for i in range(nb):
        idx = best[..., i, :].topk(int(floor[i]), -1).indices
        assert mask[..., i, :].gather(-1, idx).all()


def test_row_floor_needs_adaptive_and_a_share():
    with pytest.raises(ValueError, match="row_floor .* needs budget='layer'"):
        select_blocks(logits(), Selection(density=0.3, row_floor=0.5))
    with pytest.raises(ValueError, match=r"row_floor must be in \[0, 1\]"):
        select_blocks(logits(), Selection(density=0.3, row_floor=1.5, budget="layer"))


def test_adaptive_needs_a_density():
    with pytest.raises(ValueError, match="budget 'layer' spreads .* give a density"):
        select_blocks(logits(), Selection(threshold=0.01, budget="layer"))


def test_keep_local_band_is_forced_and_counts_toward_k():
    nb = 24
    lg = logits(nb=nb).masked_fill(torch.ones(nb, nb, dtype=torch.bool).tril(-1), -1e9)
    # the gate ranks the band last
    mask = select_blocks(lg, Selection(density=0.3, forced={"local": 2}))
    band = causal_block_mask(nb) & ~torch.ones(nb, nb, dtype=torch.bool).tril(-3)
    assert mask[..., band].all()
    k = density_to_k(0.3, nb)
    assert torch.equal(mask.sum(-1), torch.clamp(torch.arange(1, nb + 1), max=k).expand(2, 3, nb))
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="forced 'local' takes a whole number"):
            Selection(density=0.3, forced={"local": bad})
    with pytest.raises(ValueError, match="unknown forced-block rule 'locl'"):
        Selection(density=0.3, forced={"locl": 1})


def test_selection_labels_round_trip():
    import random

    from seerlib.select import FORCED_BLOCKS, parse_selection

    rng = random.Random(0)
    for _ in range(300):
        budget = rng.choice(["row", "layer", "relative", "threshold", "none"])
        kw = {"forced": {n: rng.randint(1, 4) for n in FORCED_BLOCKS if rng.random() < 0.4},
              "diagonal": rng.random() < 0.9}
        if budget == "threshold":
            kw["threshold"] = rng.choice([0.0, 0.002, 0.01, 0.5])
        elif budget != "none":
            kw["density"] = rng.choice([0.05, 0.1, 0.25, 0.3, 1.0])
            kw["budget"] = budget
            if budget != "row" and rng.random() < 0.5:
                kw["row_floor"] = rng.choice([0.25, 0.5, 1.0])
        sel = Selection(**kw)
        assert parse_selection(sel.label()) == sel, sel.label()
    for bad in ("+sink@x", "+floorx@r=0.3", "+snk@0.3"):
        with pytest.raises(ValueError, match="cannot read"):
            parse_selection(bad)
