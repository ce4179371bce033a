"""The block-sparse kernel's backward against autograd through the exact reference.

Under TRITON_INTERPRET=1 (no GPU) the kernels run in float32 on the CPU: gradients match the
reference's autograd to about 1e-6; the tolerance is 1e-4 (sums over up to 1025 rows in another
order). On a GPU they run in bfloat16 against the float32 reference: relative Frobenius error
below 3e-2. Output buffers are filled with NaN first, so an element never written fails.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import reference as ref  # noqa: E402
from seerlib.kernels._common import ENTRY_BLOCK_MASK  # noqa: E402
from seerlib.kernels.block_index import (  # noqa: E402
    build_block_index,
    build_key_index,
    index_mask,
)
from seerlib.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from seerlib.kernels.block_sparse_backward import (  # noqa: E402
    block_sparse_attention_trainable,
    block_sparse_backward,
)
from seerlib.reference import causal_block_mask, num_blocks  # noqa: E402

ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _inputs(B, Hq, Hkv, S, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, d, generator=g) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, S, d, generator=g)
    return q, k, v, dout


def _mask(B, H, nb, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, nb, nb, generator=g) < density


def _reference_grads(q, k, v, dout, mask, b, softcap=None):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ref.block_sparse_attention(*leaves, mask, b, softcap=softcap)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


def _kernel_grads(q, k, v, dout, mask_or_index, b, **kw):
    if isinstance(mask_or_index, torch.Tensor):
        mask_or_index = mask_or_index.to(DEVICE)  # the kernels take the mask where q is
    leaves = [t.to(DEVICE, DTYPE).requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention_trainable(*leaves, mask_or_index, b, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(DEVICE, DTYPE)))


def _assert_close(got, expected, what):
    got = got.float().cpu()
    assert not torch.isnan(got).any(), f"NaN in {what}: an element was never written"
    if ON_GPU:
        err = (got - expected).norm() / expected.norm().clamp_min(1e-12)
        assert err < 3e-2, f"{what}: relative error {err:.2e}"
    else:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=what)


CASES = [
    # B, Hq, Hkv, S, d, b, density: lengths 97/200/1025, GQA 1/2/3/4, head dims 16/64/128
    (1, 3, 1, 97, 64, 16, 0.4),
    (1, 2, 2, 97, 128, 32, 0.5),
    (1, 4, 1, 1025, 64, 64, 0.3),
    (2, 3, 1, 1025, 128, 128, 0.5),
    (1, 4, 2, 200, 16, 16, 0.2),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,d,b,density", CASES)
def test_gradients_match_reference_autograd(B, Hq, Hkv, S, d, b, density):
    q, k, v, dout = _inputs(B, Hq, Hkv, S, d, seed=S + d)
    nb = num_blocks(S, b)
    mask = _mask(B, Hq, nb, density, seed=b)
    mask[:, 0, min(2, nb - 1)] = False  # a query block with nothing kept: zero rows, zero grads
    expected = _reference_grads(q, k, v, dout, mask, b)
    got = _kernel_grads(q, k, v, dout, mask, b)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        _assert_close(g, e, name)
    empty = slice(min(2, nb - 1) * b, min(3, nb) * b)
    assert got[1][:, 0, empty].abs().max() == 0  # dq of the empty query block


@pytest.mark.parametrize("rows_per_tile", [2, 4])
def test_wide_tiles_of_the_forward_index(rows_per_tile):
    """A BlockIndex with 2 or 4 query blocks per tile (row-half bits) drives dq as the forward."""
    B, Hq, Hkv, S, d, b = 1, 2, 1, 230, 32, 32
    q, k, v, dout = _inputs(B, Hq, Hkv, S, d, seed=rows_per_tile)
    mask = _mask(B, Hq, num_blocks(S, b), 0.35, seed=11)
    index = build_block_index(mask.to(DEVICE), B, Hq, S, b, rows_per_tile)
    assert index.rows_per_tile == rows_per_tile
    expected = _reference_grads(q, k, v, dout, mask, b)
    for name, g, e in zip(("out", "dq", "dk", "dv"), _kernel_grads(q, k, v, dout, index, b),
                          expected, strict=True):
        _assert_close(g, e, name)


def test_sync_free_and_counts_indices_give_the_same_gradients():
    B, Hq, Hkv, S, d, b = 1, 3, 1, 130, 32, 32
    q, k, v, dout = _inputs(B, Hq, Hkv, S, d, seed=5)
    mask = _mask(B, Hq, num_blocks(S, b), 0.5, seed=6)
    expected = _reference_grads(q, k, v, dout, mask, b)
    pair = tuple(t.to(DEVICE) for t in ref.mask_to_index(mask))
    for kw, mk in (({"sync_free": True}, mask), ({}, pair)):
        for name, g, e in zip(("out", "dq", "dk", "dv"),
                              _kernel_grads(q, k, v, dout, mk, b, **kw), expected, strict=True):
            _assert_close(g, e, f"{name} {kw or 'counts/indices'}")


def test_poisoned_buffers_and_non_finite_values_in_skipped_tiles():
    """Every element of dq/dk/dv is written (NaN-filled buffers), and NaN/inf in tiles no row
    computes never reaches a gradient: those key blocks get exactly zero dk and dv."""
    B, Hq, Hkv, S, d, b = 1, 2, 1, 97, 16, 16
    q, k, v, dout = _inputs(B, Hq, Hkv, S, d, seed=9)
    nb = num_blocks(S, b)
    mask = _mask(B, Hq, nb, 0.5, seed=10) | torch.eye(nb, dtype=torch.bool)
    mask[..., 1] = False  # key block 1 kept by no query block, no head
    clean = _reference_grads(q, k, v, dout, mask, b)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, b:2 * b] = float("nan")
    v_bad[:, :, b:2 * b] = float("inf")
    qd, kd, vd, dd = (t.to(DEVICE, DTYPE) for t in (q, k_bad, v_bad, dout))
    lse = torch.full((B, Hq, S), float("nan"), device=DEVICE)
    index = build_block_index(mask.to(DEVICE), B, Hq, S, b)
    out = block_sparse_attention(qd, kd, vd, index, b, lse=lse)
    assert torch.isfinite(lse[:, :, :].masked_fill(torch.isinf(lse), 0)).all()
    bufs = [torch.full_like(t, float("nan")) for t in (qd, kd, vd)]
    dq, dk, dv = block_sparse_backward(qd, kd, vd, out, lse, dd, index,
                                       build_key_index(mask.to(DEVICE), B, Hq, S, b), b,
                                       dq=bufs[0], dk=bufs[1], dv=bufs[2])
    assert all(x is y for x, y in zip((dq, dk, dv), bufs, strict=True))
    for name, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv), clean[1:], strict=True):
        _assert_close(g, e, name)
    assert dk[:, :, b:2 * b].abs().max() == 0 and dv[:, :, b:2 * b].abs().max() == 0


@pytest.mark.parametrize("rows_per_tile", [1, 2, 4])
def test_index_mask_inverts_the_index_and_the_key_index_is_the_transpose(rows_per_tile):
    nb, b = 13, 16
    S = nb * b - 5
    mask = _mask(2, 3, nb, 0.4, seed=rows_per_tile)
    causal = mask & causal_block_mask(nb)
    index = build_block_index(mask, 2, 3, S, b, rows_per_tile)
    assert torch.equal(index_mask(index), causal)
    key = build_key_index(index, 2, 3, S, b)
    assert torch.equal(index_mask(key), causal.flip(-2, -1).transpose(-2, -1))
    # Row a lists the query blocks i = nb - 1 - c that keep key block j = nb - 1 - a; the entries
    # before n_full are i > j, the one after (if any) the diagonal.
    a = 4
    j = nb - 1 - a
    for z in range(2):
        for h in range(3):
            n, n_full = int(key.counts[z, h, a]), int(key.n_full[z, h, a])
            rows = [nb - 1 - (int(c) & ENTRY_BLOCK_MASK) for c in key.entries[z, h, a, :n]]
            assert rows == sorted(causal[z, h, :, j].nonzero().flatten().tolist(), reverse=True)
            assert all(i > j for i in rows[:n_full]) and all(i == j for i in rows[n_full:])


def test_bad_input_is_refused_by_name():
    B, Hq, Hkv, S, d, b = 1, 2, 1, 64, 16, 16
    q, k, v, dout = (t.to(DEVICE, DTYPE) for t in _inputs(B, Hq, Hkv, S, d, seed=1))
    mask = _mask(B, Hq, num_blocks(S, b), 0.5, seed=2).to(DEVICE)
    index = build_block_index(mask, B, Hq, S, b, 1)
    key = build_key_index(mask, B, Hq, S, b)
    lse = torch.empty(B, Hq, S, device=DEVICE)
    out = block_sparse_attention(q, k, v, index, b, lse=lse)
    with pytest.raises(ValueError, match="lse must be"):
        block_sparse_backward(q, k, v, out, lse[..., :-1], dout, index, key, b)
    with pytest.raises(ValueError, match="key_index must have rows_per_tile 1"):
        block_sparse_backward(q, k, v, out, lse, dout, index,
                              build_key_index(mask, B, Hq, S, b, rows_per_tile=2), b)
    with pytest.raises(ValueError, match="index was built for"):
        block_sparse_backward(q, k, v, out, lse, dout,
                              build_block_index(mask[..., :3, :3], B, Hq, 48, b, 1), key, b)
    with pytest.raises(ValueError, match="dout must be"):
        block_sparse_backward(q, k, v, out, lse, dout[:, :1], index, key, b)
    with pytest.raises(ValueError, match="lse must be"):
        block_sparse_attention(q, k, v, index, b, lse=torch.empty(B, Hq, S + 1, device=DEVICE))


# ---------------------------------------------------------------- logit soft-capping (Gemma2)
SOFTCAP_CASES = [
    # B, Hq, Hkv, S, d, b, density, cap: lengths 97/1025, GQA 1/3/4, head dims 64/128
    (1, 3, 1, 97, 64, 16, 0.4, 2.0),
    (1, 2, 2, 97, 128, 32, 0.5, 50.0),
    (1, 4, 1, 1025, 64, 64, 0.3, 50.0),
    (1, 3, 1, 1025, 128, 128, 0.5, 2.0),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,d,b,density,cap", SOFTCAP_CASES)
def test_softcap_gradients_match_reference_autograd(B, Hq, Hkv, S, d, b, density, cap):
    """Through c * tanh(x / c) (derivative 1 - tanh^2): the kernels' dq, dk, dv against autograd
    through the reference; inputs scaled so the logits reach about +-2c (the cap bites); a query
    block with nothing kept; NaN-filled gradient buffers; both tile heights of the forward index."""
    q, k, v, dout = _inputs(B, Hq, Hkv, S, d, seed=S + d)
    q, k = q * cap ** 0.5, k * cap ** 0.5
    # the reference sees the kernels' rounded inputs: logits of +-2 cap magnify bf16 rounding
    q, k, v, dout = (t.to(DTYPE).float() for t in (q, k, v, dout))
    nb = num_blocks(S, b)
    mask = _mask(B, Hq, nb, density, seed=b)
    mask[:, 0, min(2, nb - 1)] = False
    expected = _reference_grads(q, k, v, dout, mask, b, softcap=cap)
    plain = _reference_grads(q, k, v, dout, mask, b)
    assert (plain[1] - expected[1]).abs().max() > 1e-2  # the cap changes dq
    got = _kernel_grads(q, k, v, dout, mask, b, softcap=cap)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        _assert_close(g, e, name)
    empty = slice(min(2, nb - 1) * b, min(3, nb) * b)
    assert got[1][:, 0, empty].abs().max() == 0
    qd, kd, vd, dd = (t.to(DEVICE, DTYPE) for t in (q, k, v, dout))
    md = mask.to(DEVICE)
    index = build_block_index(md, B, Hq, S, b, 2 if b <= 64 else 1)  # 256-row tiles: too big
    lse = torch.full((B, Hq, S), float("nan"), device=DEVICE)
    out = block_sparse_attention(qd, kd, vd, index, b, lse=lse, softcap=cap)
    bufs = [torch.full_like(t, float("nan")) for t in (qd, kd, vd)]
    grads = block_sparse_backward(qd, kd, vd, out, lse, dd, index,
                                  build_key_index(md, B, Hq, S, b), b, softcap=cap,
                                  dq=bufs[0], dk=bufs[1], dv=bufs[2])
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected[1:], strict=True):
        _assert_close(g, e, f"{name} (the forward's index, NaN-filled buffers)")
