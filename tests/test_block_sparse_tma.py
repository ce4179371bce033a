"""The block-sparse forward's TMA path (tensor descriptors), warp-specialized and paired loops.

Under TRITON_INTERPRET=1 (no GPU) `tma=True` runs the descriptor code on the CPU interpreter in
float32: it must match the exact reference (tolerances of tests/test_kernels.py) and the pointer
path (`tma=False`, the interpreter's default) to rounding, its LSE included. On a GPU the same
tests run in bfloat16. K and V come as (B, S, H, d) storage seen through a transpose, as models
hand them over; every output buffer is filled with NaN first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels import (  # noqa: E402
    DEVICE,
    DTYPE,
    ON_GPU,
    _assert_close,
    _poisoned,
    _random_mask,
)

from seerlib import reference as ref  # noqa: E402
from seerlib.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from seerlib.reference import num_blocks  # noqa: E402


def _model_layout(B, Hq, Hkv, S, d, seed, q_too=False):
    """q (B, Hq, S, d) and k, v (B, Hkv, S, d) as views of (B, S, H, d) storage; q contiguous
    unless q_too."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, d, generator=g)
    if q_too:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, Hq, d) -> (B, Hq, S, d)
    k, v = (torch.randn(B, S, Hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    q, k, v = (t.to(DEVICE, DTYPE) for t in (q, k, v))
    assert not k.is_contiguous() and not v.is_contiguous()
    return q, k, v


def _same_as_pointer_path(got, expected):
    if ON_GPU:
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# S, block, d, GQA group, rows per tile; two kv heads (the descriptors' head coordinate, and a
# transpose that is not contiguous); S 97 with two batches, S 1025 with one.
CASES = [
    (97, 64, 64, 1, 1),
    (97, 64, 128, 3, 2),
    (97, 32, 64, 4, 2),
    (97, 64, 128, 4, 1),
    (1025, 64, 64, 3, 2),
    (1025, 64, 128, 1, 1),
]


@pytest.mark.parametrize("S,b,d,group,rows_per_tile", CASES)
def test_tma_matches_reference_and_pointer_path(S, b, d, group, rows_per_tile):
    B, Hkv = (2 if S < 1000 else 1), 2
    Hq, nb = Hkv * group, num_blocks(S, b)
    q, k, v = _model_layout(B, Hq, Hkv, S, d, seed=S + d + group, q_too=group == 3)
    mask = _random_mask(B, Hq, nb, 0.3 if S > 1000 else 0.5, seed=S + b + rows_per_tile)
    mask[:, 0, nb // 2] = False  # an empty row of blocks
    out, lse = _poisoned((B, Hq, S, d)), _poisoned((B, Hq, S), torch.float32)
    got = block_sparse_attention(q, k, v, mask, b, out=out, lse=lse, rows_per_tile=rows_per_tile,
                                 tma=True)
    assert got is out
    _assert_close(out, ref.block_sparse_attention(q, k, v, mask, b))
    assert (out[:, 0, (nb // 2) * b:(nb // 2 + 1) * b] == 0).all()
    plain_out, plain_lse = _poisoned((B, Hq, S, d)), _poisoned((B, Hq, S), torch.float32)
    block_sparse_attention(q, k, v, mask, b, out=plain_out, lse=plain_lse,
                           rows_per_tile=rows_per_tile, tma=False)
    _same_as_pointer_path(out, plain_out)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse, plain_lse, atol=1e-5 if not ON_GPU else 1e-2, rtol=0)
    head_major = block_sparse_attention(q, k, v, mask, b, rows_per_tile=rows_per_tile, tma=True,
                                        kv_major=False)  # the other grid's coordinates
    _same_as_pointer_path(head_major, plain_out)


def test_tma_softcap_matches_reference():
    S, b, d, cap = 97, 32, 64, 50.0
    q, k, v = _model_layout(1, 6, 2, S, d, seed=11)
    q, k = q * cap ** 0.5, k * cap ** 0.5  # scores large enough for the cap to matter
    mask = _random_mask(1, 6, num_blocks(S, b), 0.5, seed=12)
    expected = ref.block_sparse_attention(q, k, v, mask, b, softcap=cap)
    for rows_per_tile in (1, 2):
        out = _poisoned(q.shape)
        block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=rows_per_tile,
                               softcap=cap, tma=True)
        _assert_close(out, expected)


def test_warp_specialize_gives_the_same_result():
    S, b = 97, 32
    q, k, v = _model_layout(1, 4, 2, S, 64, seed=13)
    mask = _random_mask(1, 4, num_blocks(S, b), 0.6, seed=14)
    expected = ref.block_sparse_attention(q, k, v, mask, b)
    for tma in (False, True):
        plain = block_sparse_attention(q, k, v, mask, b, rows_per_tile=2, tma=tma)
        out = _poisoned(q.shape)
        # on an H100, Triton 3.6's warp-specialization pass fails at 4 warps (bench/NOTES.md);
        # 8 compile
        block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=2, tma=tma,
                               warp_specialize=True, num_warps=8)
        _assert_close(out, expected)
        _same_as_pointer_path(out, plain)


@pytest.mark.parametrize("S,b,d,group,rows_per_tile", CASES)
def test_paired_blocks_give_the_same_result(S, b, d, group, rows_per_tile):
    """pair_blocks (two key blocks per step of the unmasked loop, one softmax update) matches
    the reference and the unpaired loop, its LSE too, on both paths; rows that keep an odd and an
    even number of blocks, and an empty row."""
    B, Hkv = (2 if S < 1000 else 1), 2
    Hq, nb = Hkv * group, num_blocks(S, b)
    q, k, v = _model_layout(B, Hq, Hkv, S, d, seed=S + d + group + 1, q_too=group == 3)
    mask = _random_mask(B, Hq, nb, 0.3 if S > 1000 else 0.6, seed=S + b + rows_per_tile + 1)
    mask[:, 0, nb // 2] = False
    expected = ref.block_sparse_attention(q, k, v, mask, b)
    for tma in (False, True):
        plain, plain_lse = _poisoned((B, Hq, S, d)), _poisoned((B, Hq, S), torch.float32)
        block_sparse_attention(q, k, v, mask, b, out=plain, lse=plain_lse,
                               rows_per_tile=rows_per_tile, tma=tma)
        out, lse = _poisoned((B, Hq, S, d)), _poisoned((B, Hq, S), torch.float32)
        block_sparse_attention(q, k, v, mask, b, out=out, lse=lse, rows_per_tile=rows_per_tile,
                               tma=tma, pair_blocks=True)
        _assert_close(out, expected)
        _same_as_pointer_path(out, plain)
        torch.testing.assert_close(lse, plain_lse, atol=1e-5 if not ON_GPU else 1e-2, rtol=0)
    with pytest.raises(ValueError, match="choose one"):
        block_sparse_attention(q, k, v, mask, b, pair_blocks=True, warp_specialize=True)


def test_paired_blocks_soft_cap():
    S, b, d, cap = 200, 32, 64, 50.0
    q, k, v = _model_layout(1, 6, 2, S, d, seed=21)
    q, k = q * cap ** 0.5, k * cap ** 0.5
    mask = _random_mask(1, 6, num_blocks(S, b), 0.7, seed=22)
    expected = ref.block_sparse_attention(q, k, v, mask, b, softcap=cap)
    for rows_per_tile in (1, 2):
        out = _poisoned(q.shape)
        block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=rows_per_tile,
                               softcap=cap, pair_blocks=True)
        _assert_close(out, expected)


def test_tensors_breaking_tma_rules_are_refused_and_the_default_falls_back():
    S, b, d = 97, 32, 64
    q, k, v = _model_layout(1, 2, 2, S, d, seed=15)
    mask = _random_mask(1, 2, num_blocks(S, b), 0.5, seed=16)
    expected = ref.block_sparse_attention(q, k, v, mask, b)
    padded = torch.zeros(1, 2, S, d + 1, dtype=DTYPE, device=DEVICE)
    padded[..., :d] = k
    k_odd = padded[..., :d]  # row stride d + 1 elements: not a multiple of 16 bytes
    with pytest.raises(ValueError, match="k breaks TMA's rules: its stride 2 is 65 elements"):
        block_sparse_attention(q, k_odd, v, mask, b, tma=True)
    flat = torch.zeros(2 * S * d + 1, dtype=DTYPE, device=DEVICE)
    v_off = flat[1:].view(1, 2, S, d)  # one element past a 16-byte boundary
    v_off.copy_(v)
    with pytest.raises(ValueError, match="v breaks TMA's rules: its base address"):
        block_sparse_attention(q, k, v_off, mask, b, tma=True)
    with pytest.raises(ValueError, match="at most 256 rows"):
        block_sparse_attention(q, k, v, mask[..., :1, :1], 128, rows_per_tile=4, tma=True)
    for tma in (None, False):  # the default takes the pointer path for such tensors
        _assert_close(block_sparse_attention(q, k_odd, v_off, mask, b, tma=tma), expected)
