"""The split-KV sparse decode kernel (seerlib/kernels/sparse_decode.py) against seerlib.reference,
under the Triton interpreter: awkward lengths, GQA 1/3/4, head dims 64/128, budgets past the
context, padding, empty rows, poisoned outputs, variable kv lengths, splits of every size, logit
soft-caps (Gemma2)."""

import pytest
import torch

from seerlib import ops, reference
from seerlib.decode import DecodeGateSet
from seerlib.decode.generate import sparse_generation
from seerlib.decode.select import decode_index
from seerlib.distill.cli import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

kern = pytest.importorskip("seerlib.kernels.sparse_decode")


def _inputs(B, Hq, Hkv, S, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, d, generator=g)
    k = torch.randn(B, Hkv, S, d, generator=g)
    v = torch.randn(B, Hkv, S, d, generator=g)
    return q, k, v


def _random_index(B, Hkv, nb, share, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Hkv, nb, generator=g) < share
    keep[..., -1] = True  # the newest block, as decode selection keeps it
    return decode_index(keep)


@pytest.mark.parametrize("B,Hq,Hkv,S,d,b", [
    (1, 4, 4, 97, 64, 16),      # GQA 1
    (2, 9, 3, 1025, 64, 64),    # GQA 3, SmolLM2's heads
    (2, 8, 2, 1025, 128, 64),   # GQA 4, d 128
    (1, 12, 3, 200, 128, 32),
])
def test_matches_reference(B, Hq, Hkv, S, d, b):
    q, k, v = _inputs(B, Hq, Hkv, S, d)
    nb = -(-S // b)
    idx, cnt = _random_index(B, Hkv, nb, 0.4)
    want = reference.sparse_decode_attention(q, k, v, idx, cnt, b)
    for per in (None, 1, 3, nb):
        got = kern.sparse_decode_attention(q, k, v, idx, cnt, b, blocks_per_split=per)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cap", [2.0, 50.0])
@pytest.mark.parametrize("B,Hq,Hkv,S,d,b", [(1, 4, 4, 97, 64, 16), (2, 9, 3, 1025, 64, 64),
                                            (2, 8, 2, 200, 128, 32)])
def test_soft_cap_matches_reference(B, Hq, Hkv, S, d, b, cap):
    """Logit soft-capping (Gemma2) in the kernel, every split size, dense decode too, and
    through ops on the 'triton' backend; an empty head still gives zeros."""
    q, k, v = _inputs(B, Hq, Hkv, S, d)
    q = q * 4  # logits of several units: a cap of 2 binds
    nb = -(-S // b)
    idx, cnt = _random_index(B, Hkv, nb, 0.4)
    cnt[0, 0] = 0
    want = reference.sparse_decode_attention(q, k, v, idx, cnt, b, softcap=cap)
    assert (want - reference.sparse_decode_attention(q, k, v, idx, cnt, b)).abs().max() > 1e-3
    for per in (None, 1, nb):
        got = kern.sparse_decode_attention(q, k, v, idx, cnt, b, blocks_per_split=per,
                                           softcap=cap)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ops.sparse_decode_attention(q, k, v, idx, cnt, b, softcap=cap,
                                                           backend="triton"), want,
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kern.decode_attention(q, k, v, block_size=b, softcap=cap),
                               reference.decode_attention(q, k, v, softcap=cap),
                               atol=2e-5, rtol=1e-4)


def test_variable_kv_lens_and_blocks_past_them():
    B, Hq, Hkv, S, d, b = 3, 6, 2, 300, 64, 32
    q, k, v = _inputs(B, Hq, Hkv, S, d, seed=1)
    lens = torch.tensor([1, 97, 300])
    nb = -(-S // b)
    idx, cnt = decode_index(torch.ones(B, Hkv, nb, dtype=torch.bool))  # every block, past lens too
    k[0, :, 1:] = float("nan")  # never read: past row 0's length
    v[0, :, 1:] = float("nan")
    got = kern.sparse_decode_attention(q, k, v, idx, cnt, b, lens, blocks_per_split=2)
    want = reference.sparse_decode_attention(q, k, v, idx, cnt, b, kv_lens=lens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], v[0, :, :1].repeat_interleave(3, 0))  # one key: its value
    dense = kern.decode_attention(q, k, v, lens)
    torch.testing.assert_close(dense, reference.decode_attention(q, k, v, kv_lens=lens),
                               atol=2e-5, rtol=1e-4)


def test_budget_past_context_padding_and_empty_rows():
    """Entries at or past nb (a budget larger than the context), -1 padding, count 0 and
    padding entries past the count that name real blocks: all as the reference reads them."""
    B, Hq, Hkv, S, d, b = 2, 4, 2, 130, 64, 64  # nb = 3
    q, k, v = _inputs(B, Hq, Hkv, S, d, seed=2)
    idx = torch.tensor([[[0, 2, 5, 9], [1, -1, -1, -1]],
                        [[0, 1, 2, 0], [2, 1, 0, -1]]], dtype=torch.int32)
    cnt = torch.tensor([[4, 1], [0, 1]], dtype=torch.int32)  # row (1, 0) keeps nothing
    out = torch.full((B, Hq, 1, d), float("nan"))
    got = kern.sparse_decode_attention(q, k, v, idx, cnt, b, out=out, blocks_per_split=1)
    assert got.data_ptr() == out.data_ptr()
    want = reference.sparse_decode_attention(q, k, v, idx, cnt, b)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(got[1, :2], torch.zeros(2, 1, d))  # the empty row: zeros, poison gone
    assert torch.isfinite(got).all()


def test_negative_counted_entries_are_skipped():
    """The reference refuses them; the kernel, which cannot check without a host sync, skips."""
    q, k, v = _inputs(1, 2, 1, 128, 64, seed=3)
    idx = torch.tensor([[[-1, 1]]], dtype=torch.int32)
    cnt = torch.tensor([[2]], dtype=torch.int32)
    got = kern.sparse_decode_attention(q, k, v, idx, cnt, 64)
    want = reference.sparse_decode_attention(q, k, v, idx[..., 1:], cnt - 1, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="negative"):
        reference.sparse_decode_attention(q, k, v, idx, cnt, 64)


def test_strided_cache_slice_and_ops_dispatch():
    """A view of a larger preallocated cache (as a static KV cache is) and `ops` on 'triton'."""
    B, Hq, Hkv, S, d, b = 2, 6, 2, 193, 64, 64
    big_k = torch.randn(B, Hkv, 256, d)
    big_v = torch.randn(B, Hkv, 256, d)
    k, v = big_k[:, :, :S], big_v[:, :, :S]
    q = torch.randn(B, Hq, d).unsqueeze(2)
    idx, cnt = _random_index(B, Hkv, 4, 0.5, seed=4)
    want = reference.sparse_decode_attention(q, k.contiguous(), v.contiguous(), idx, cnt, b)
    got = ops.sparse_decode_attention(q, k, v, idx.long(), cnt.long(), b, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    dense = ops.decode_attention(q, k, v, backend="triton")
    torch.testing.assert_close(dense, reference.decode_attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_choose_splits_fills_the_machine_and_covers_the_list():
    h200 = 132
    assert kern.choose_splits(8, 51, h200) == 1  # batch 1, 32k, 90%: a block per program
    assert kern.choose_splits(128, 51, h200) * 4 <= 51  # batch 16: still split
    for rows, width in ((1, 1), (8, 51), (128, 512), (4, 7), (1000, 3)):
        per = kern.choose_splits(rows, width, h200)
        n = -(-width // per)
        assert 1 <= per <= width and n <= width
        assert rows * n >= min(rows * width, kern.PROGRAMS_PER_SM * h200)  # fills the GPU


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.randn(1, 4, 2, 64)), "one decode query"),
    (dict(k=torch.randn(1, 3, 64, 64), v=torch.randn(1, 3, 64, 64)), "divisor"),
    (dict(block_index=torch.zeros(1, 2, 1, dtype=torch.int64)), "int32"),
    (dict(block_count=torch.zeros(2, dtype=torch.int32)), "block_count must be"),
    (dict(block_size=48), "block_size"),
    (dict(kv_lens=torch.tensor([1.0])), "kv_lens"),
])
def test_bad_input_names_what_was_wrong(bad, match):
    args = dict(q=torch.randn(1, 4, 1, 64), k=torch.randn(1, 2, 64, 64),
                v=torch.randn(1, 2, 64, 64), block_index=torch.zeros(1, 2, 1, dtype=torch.int32),
                block_count=torch.ones(1, 2, dtype=torch.int32), block_size=64, kv_lens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kern.sparse_decode_attention(**args)


def test_generation_through_the_kernel_equals_the_reference():
    """`sparse_generation` on the tiny Llama: the decode steps through the kernel (backend
    'triton', interpreter) give the logits of the reference's steps."""
    model = tiny_model()
    torch.manual_seed(0)
    gates = DecodeGateSet(model.config, block_size=16)
    ids = torch.randint(0, 211, (2, 61))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("reference", "triton"):
        with torch.no_grad(), ops.use_backend(backend), \
                sparse_generation(model, "gate@tok=32", decode_gates=gates) as sg:
            runs[backend] = torch.stack(model.generate(ids, **kw).scores, 1)
        assert sg.stats.steps > 0 and sg.stats.kept_share < 1
    torch.testing.assert_close(runs["triton"], runs["reference"], atol=1e-4, rtol=1e-4)


def test_gemma2_generation_through_the_kernel_equals_the_reference():
    """`sparse_generation` on a tiny Gemma2 whose logit soft-cap (1) binds: the decode steps
    through the kernel (backend 'triton', interpreter) give the reference's logits."""
    from tests.test_decode import _gemma2

    model = _gemma2(1.0)
    ids = torch.randint(3, 101, (2, 45), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    runs = {}
    for backend in ("reference", "triton"):
        with torch.no_grad(), ops.use_backend(backend), \
                sparse_generation(model, "oracle@tok=32", block_size=16) as sg:
            runs[backend] = torch.stack(model.generate(ids, **kw).scores, 1)
        assert sg.stats.steps > 0 and sg.stats.kept_share < 1
    torch.testing.assert_close(runs["triton"], runs["reference"], atol=1e-4, rtol=1e-4)
