"""The prefill selection kernel (`seerlib.kernels.prefill_select`, through `ops.select_index`)
against `select_blocks` + the sync-free block index, under the Triton interpreter (on CUDA
when there is a GPU): awkward lengths and block sizes, every density, forced sink / local blocks,
poisoned logits above the diagonal, -inf below it, the attention it feeds, the fallbacks and bad
input."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import ops, reference  # noqa: E402
from seerlib.kernels.block_index import index_mask  # noqa: E402
from seerlib.kernels.prefill_select import prefill_select  # noqa: E402
from seerlib.reference import causal_block_mask, num_blocks  # noqa: E402
from seerlib.select import Selection, density_to_k, select_blocks  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(B, H, S, b, seed=0, poison=float("nan")):
    """Random gate-like logits (B, H, nb, nb): finite on and below the diagonal, `poison` above."""
    nb = num_blocks(S, b)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, nb, nb, generator=g)
    x = x.masked_fill(~causal_block_mask(nb, "cpu"), poison)
    return x.to(DEV)


def _rows(index):
    """Each row's kept blocks as a python list (entries past its count are unspecified)."""
    ent = (index.entries & ((1 << 24) - 1)).cpu()
    cnt = index.counts.cpu()
    B, H, nT = cnt.shape
    return [[ent[z, h, i, : cnt[z, h, i]].tolist() for i in range(nT)]
            for z in range(B) for h in range(H)]


def _check_same(got, want):
    assert got.rows_per_tile == want.rows_per_tile == 1 and got.seq_len == want.seq_len
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert torch.equal(got.n_full.cpu(), want.n_full.cpu())
    assert _rows(got) == _rows(want)
    bits = got.entries.cpu() >> 24
    for z, h, i in zip(*torch.nonzero(got.counts.cpu() > 0, as_tuple=True), strict=True):
        assert (bits[z, h, i, : got.counts[z, h, i]] == 1).all()
    assert torch.equal(index_mask(got).cpu(), index_mask(want).cpu())


@pytest.mark.parametrize("S,b", [(97, 16), (1025, 64), (1025, 16), (64, 64), (200, 32)])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 1.0])
def test_equals_select_blocks_then_block_index(S, b, density):
    logits = _logits(2, 3, S, b, seed=S + b)
    sel = Selection(density=density)
    got = ops.select_index(logits, sel, S, b, backend="triton")
    want = ops.block_index(select_blocks(logits, sel), S, b)
    _check_same(got, want)


@pytest.mark.parametrize("forced", [{"sink": 1}, {"local": 2}, {"sink": 2, "local": 1},
                                    {"sink": 40}])
@pytest.mark.parametrize("density", [0.1, 0.4])
def test_forced_blocks_count_toward_the_budget(forced, density):
    S, b = 1025, 16
    logits = _logits(1, 4, S, b, seed=7)
    sel = Selection(density=density, forced=forced)
    assert ops.select_index_fused(sel)
    got = ops.select_index(logits, sel, S, b, backend="triton")
    _check_same(got, ops.block_index(select_blocks(logits, sel), S, b))


def test_minus_inf_scores_are_never_kept_by_the_budget():
    """A row whose visible scores are -inf keeps only its forced blocks (select_blocks may fill
    it with some of them, in topk's open tie order); every other row is select_blocks'."""
    S, b = 256, 16
    logits = _logits(1, 1, S, b, seed=3, poison=float("-inf"))
    logits[0, 0, 9, :9] = float("-inf")  # row 9: only its own block is finite
    got = prefill_select(logits, S, b, k=density_to_k(0.4, num_blocks(S, b)))
    assert _rows(got)[0][9] == [9]
    others = [i for i in range(num_blocks(S, b)) if i != 9]
    want = ops.block_index(select_blocks(logits, Selection(density=0.4)), S, b)
    assert [_rows(got)[0][i] for i in others] == [_rows(want)[0][i] for i in others]


def test_feeds_the_block_sparse_kernel():
    S, b, d = 200, 32, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, S, d, generator=g).to(DEV)
    k, v = (torch.randn(1, 2, S, d, generator=g).to(DEV) for _ in range(2))
    logits = _logits(1, 6, S, b, seed=2, poison=float("-inf"))
    sel = Selection(density=0.3, forced={"sink": 1})
    index = ops.select_index(logits, sel, S, b, backend="triton")
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    out = ops.block_sparse_attention(q.to(dt), k.to(dt), v.to(dt), index, b, backend="triton")
    want = reference.block_sparse_attention(q, k, v, select_blocks(logits, sel), b)
    torch.testing.assert_close(out.float(), want, atol=2e-2 if DEV == "cuda" else 2e-5,
                               rtol=2e-2 if DEV == "cuda" else 2e-5)


@pytest.mark.parametrize("label", ["@a=0.3", "@r=0.3", "@t=0.01", "+last@0.3",
                                   "+floor0.5@a=0.3", "+nodiag@0.3"])
def test_other_selections_take_the_torch_path(label):
    from seerlib.select import parse_selection

    sel = parse_selection(label)
    assert not ops.select_index_fused(sel)
    S, b = 97, 16
    logits = _logits(1, 2, S, b, seed=5, poison=float("-inf"))
    got = ops.select_index(logits, sel, S, b, backend="triton")
    _check_same(got, ops.block_index(select_blocks(logits, sel), S, b))


def test_bad_input_is_refused():
    logits = _logits(1, 2, 97, 16)
    with pytest.raises(ValueError, match=r"logits have 7 blocks a row; seq_len 200"):
        prefill_select(logits, 200, 16, k=2)
    with pytest.raises(ValueError, match=r"\(B, H, nb, nb\) float"):
        prefill_select(logits[0], 97, 16, k=2)
    with pytest.raises(ValueError, match=r"k \(blocks per row\) must be a whole number"):
        prefill_select(logits, 97, 16, k=0)
    with pytest.raises(ValueError, match="sink and local must be >= 0"):
        prefill_select(logits, 97, 16, k=2, sink=-1)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="runs on cpu tensors"):
            prefill_select(logits.to("meta"), 97, 16, k=2)
