"""One decode step's selection in one launch (seerlib/kernels/decode_select.py, through
`ops.decode_select`) against `decode_index(select_decode(...))` under the Triton interpreter:
token budgets, densities and thresholds, sink and local blocks, scores narrower than the blocks
(the K-compression cache's full blocks), NaN and -inf scores, positions at every block edge,
budgets past the context, poisoned buffers, bad input."""

import os

import pytest
import torch

from seerlib import ops
from seerlib.decode.select import decode_index, most_blocks, select_decode
from seerlib.select import Selection

kern = pytest.importorskip("seerlib.kernels.decode_select")
ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"  # the kernel's inputs; the torch path runs on the CPU


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]

SELECTIONS = [
    Selection(tokens=320),
    Selection(tokens=320, forced={"sink": 1, "local": 2}),
    Selection(tokens=64),  # one block: the own one only
    Selection(tokens=10 ** 6),  # past the context: every block
    Selection(density=0.1),
    Selection(density=0.3, forced={"sink": 2}),
    Selection(threshold=0.02),
    Selection(threshold=0.05, forced={"local": 1}),
]


def _want(scores, selection, t, nb, b, K):
    full = torch.full(scores.shape[:2] + (nb,), float("-inf"))
    full[..., :scores.shape[-1]] = scores
    keep = select_decode(full[:, :, None], selection, torch.tensor([t]), b)
    return decode_index(keep, K)


@pytest.mark.parametrize("B,Hkv,nb,b", [(2, 3, 17, 16), (1, 4, 40, 64), (3, 1, 129, 32),
                                        (1, 2, 513, 64), (1, 1, 1500, 16)])  # radix 8 past 1024
@pytest.mark.parametrize("sel", SELECTIONS, ids=lambda s: s.label())
def test_matches_select_decode(B, Hkv, nb, b, sel):
    g = torch.Generator().manual_seed(nb)
    K = most_blocks(sel, b)
    for t in (0, 5, b * 7 - 1, b * 7, b * (nb - 1) + 3, b * nb - 1):
        c = t // b
        for W in sorted({nb, c, max(1, c)}):  # all blocks; the cache's full blocks only
            scores = torch.randn(B, Hkv, W, generator=g)
            scores[0, 0, : W // 3] = float("nan")  # no candidates
            scores[-1, -1, W // 2:: 3] = float("-inf")
            want = _want(scores, sel, t, nb, b, K)
            got = ops.decode_select(*_dev(scores[:, :, None]), sel, *_dev(torch.tensor([t])), nb,
                                    b, K, backend="triton")
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), \
                (t, W)


def test_ties_go_to_the_lower_block_and_the_budget_is_exact():
    """All-equal scores: a budget of k keeps the own block and the k - 1 lowest blocks."""
    nb, b, t = 20, 16, 16 * 19 + 2
    sel = Selection(tokens=5 * b)
    idx, cnt = ops.decode_select(*_dev(torch.zeros(2, 3, 1, nb)), sel,
                                 *_dev(torch.tensor([t])), nb, b, most_blocks(sel, b),
                                 backend="triton")
    assert cnt.eq(5).all()
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 19]


def test_writes_into_poisoned_buffers_and_a_narrow_index():
    """out= buffers full of garbage are overwritten entirely; an index narrower than a row's
    kept blocks keeps its first K and counts K."""
    nb, b, t = 33, 32, 32 * 30
    sel = Selection(threshold=1e-9)  # nearly every block
    scores = torch.randn(2, 2, 1, nb, generator=torch.Generator().manual_seed(1))
    want_i, want_c = decode_index(select_decode(scores, sel, torch.tensor([t]), b), 6)
    idx, cnt = _dev(torch.full((2, 2, 6), 12345, dtype=torch.int32),
                    torch.full((2, 2), -7, dtype=torch.int32))
    got = kern.decode_select(*_dev(scores, torch.tensor([t])), nb, b, mode="threshold",
                             threshold=1e-9, max_blocks=6, out=(idx, cnt))
    assert got[0] is idx and got[1] is cnt
    assert torch.equal(idx.cpu(), want_i) and torch.equal(cnt.cpu(), want_c)
    assert cnt.eq(6).all()


def test_torch_path_and_other_rules():
    """On CPU without the interpreter's backend the op is select_decode + decode_index; a rule
    the kernel does not apply takes that path on the kernel backend too (here: none decodes
    besides sink and local, so the Selection check refuses +last first)."""
    nb, b, t = 10, 16, 150
    sel = Selection(tokens=48, forced={"sink": 1})
    scores = torch.randn(1, 2, 1, 7)
    want = _want(scores[:, :, 0], sel, t, nb, b, most_blocks(sel, b))
    got = ops.decode_select(scores, sel, torch.tensor([t]), nb, b, most_blocks(sel, b),
                            backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"\+last"):
        ops.decode_select(scores, Selection(tokens=48, forced={"last": 1}), torch.tensor([t]),
                          nb, b, backend="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(scores=torch.randn(1, 2, 3, 5)), r"\(B, Hkv, 1, W\)"),
    (dict(scores=torch.zeros(1, 2, 5, dtype=torch.int32)), "float"),
    (dict(num_blocks=4), "at least the scores' width 5"),
    (dict(position=torch.tensor([3.0])), "position must be a \\(1,\\) integer tensor"),
    (dict(position=torch.tensor([1, 2])), "position must be a \\(1,\\) integer tensor"),
    (dict(mode="top"), "mode must be one of"),
    (dict(max_blocks=0), "max_blocks must be >= 1"),
])
def test_bad_input(bad, match):
    kw = dict(scores=torch.randn(1, 2, 5), position=torch.tensor([70]), num_blocks=8,
              block_size=16, mode="tokens", budget_blocks=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        kern.decode_select(kw.pop("scores"), kw.pop("position"), kw.pop("num_blocks"),
                           kw.pop("block_size"), **kw)


def test_minus_inf_is_no_candidate_in_select_decode():
    """select_decode's docstring: -inf, like NaN, is never picked by the budget. (nan_to_num
    once turned -inf into the lowest finite score, so a budget larger than the finite scores
    picked -inf blocks.)"""
    nb, b, t = 8, 16, 16 * 7 + 1
    scores = torch.tensor([1.0, float("-inf"), 2.0, float("nan"), float("-inf"), 0.5, 3.0, 0.0])
    keep = select_decode(scores.view(1, 1, 1, nb), Selection(tokens=nb * b), torch.tensor([t]), b)
    assert keep.view(-1).tolist() == [True, False, True, False, False, True, True, True]
