"""The Triton kernels against the exact reference.

On a machine without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before torch/triton load) in float32; with a GPU they run in bfloat16 on CUDA.

Tolerances: float32 under the interpreter matches the reference to about 1e-6 (same arithmetic,
another summation order): atol = rtol = 2e-5 for outputs and 1e-5 absolute for pooled
probabilities. bfloat16 on GPU: relative Frobenius error below 2e-2 (bf16 operands, fp32 sums).
Every output buffer is filled with NaN first, so an element the kernel forgot fails the test.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import reference as ref  # noqa: E402
from seerlib.kernels.block_index import BlockIndex, build_block_index  # noqa: E402
from seerlib.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from seerlib.kernels.pooled_attention import attention, pooled_attention  # noqa: E402
from seerlib.reference import mask_to_index, num_blocks  # noqa: E402

ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _qkv(B, Hq, Hkv, S, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, d, generator=g) for h in (Hq, Hkv, Hkv))
    return [t.to(DEVICE, DTYPE) for t in (q, k, v)]


def _assert_close(out, expected):
    assert not torch.isnan(out).any(), "NaN left in the output: an element was never written"
    if ON_GPU:
        err = (out.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
        assert err < 2e-2, f"relative error {err:.2e}"
    else:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _poisoned(shape, dtype=DTYPE):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _random_mask(B, H, nb, density, seed, keep_diag=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, nb, nb, generator=g) < density
    if keep_diag:
        mask |= torch.eye(nb, dtype=torch.bool)
    return mask.to(DEVICE)


# S x block x d x GQA group: every combination the issue names, 24 cases.
SHAPES = list(itertools.product((64, 97, 200), (32, 64), (64, 128), (1, 3)))


@pytest.mark.parametrize("S,b,d,group", SHAPES)
def test_pooled_attention_matches_reference(S, b, d, group):
    B, Hkv = 1, 2
    Hq = Hkv * group
    q, k, v = _qkv(B, Hq, Hkv, S, d, seed=S + b + d + group)
    nb = num_blocks(S, b)
    out, pooled = _poisoned((B, Hq, S, d)), _poisoned((B, Hq, nb, nb), torch.float32)
    got_out, got_pooled = pooled_attention(q, k, v, b, out=out, pooled_out=pooled)
    assert got_out is out and got_pooled is pooled
    exp_out, exp_pooled = ref.pooled_attention(q, k, v, b)
    _assert_close(out, exp_out)
    assert not torch.isnan(pooled).any()
    torch.testing.assert_close(pooled, exp_pooled, atol=1e-5 if not ON_GPU else 2e-2, rtol=0)
    above = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).triu(1)
    assert (pooled[..., above] == 0).all()


@pytest.mark.parametrize(
    "S,b,rows_per_tile", [(97, 32, 1), (97, 32, 2), (200, 64, 1), (131, 16, 8)]
)
def test_pooled_attention_tile_heights_and_noncausal(S, b, rows_per_tile):
    q, k, v = _qkv(1, 2, 1, S, 64, seed=S)
    nb = num_blocks(S, b)
    for causal in (True, False):
        out, pooled = _poisoned((1, 2, S, 64)), _poisoned((1, 2, nb, nb), torch.float32)
        pooled_attention(
            q,
            k,
            v,
            b,
            causal=causal,
            scale=0.3,
            out=out,
            pooled_out=pooled,
            rows_per_tile=rows_per_tile,
        )
        exp_out, exp_pooled = ref.pooled_attention(q, k, v, b, causal=causal, scale=0.3)
        _assert_close(out, exp_out)
        torch.testing.assert_close(pooled, exp_pooled, atol=1e-5 if not ON_GPU else 2e-2, rtol=0)


def test_pooled_attention_without_map_and_dense_attention():
    q, k, v = _qkv(2, 3, 3, 97, 64, seed=1)
    out, pooled = pooled_attention(q, k, v, None)
    assert pooled is None
    _assert_close(out, ref.attention(q, k, v))
    for causal in (True, False):
        buf = _poisoned(q.shape)
        attention(q, k, v, causal=causal, out=buf)
        _assert_close(buf, ref.attention(q, k, v, causal=causal))


# The same 24 shapes, each with a density and a tile height (query blocks per program) in turn,
# so every density meets both GQA ratios and both head dims.
DENSITIES = (0.0, 0.15, 0.5, 1.0)
SPARSE_CASES = [
    (S, b, d, group, DENSITIES[i % 4], (1, 2, None)[i % 3])
    for i, (S, b, d, group) in enumerate(SHAPES)
]


@pytest.mark.parametrize("S,b,d,group,density,rows_per_tile", SPARSE_CASES)
def test_block_sparse_attention_matches_reference(S, b, d, group, density, rows_per_tile):
    B, Hkv = 2, 1
    Hq = Hkv * group
    q, k, v = _qkv(B, Hq, Hkv, S, d, seed=S * d + group)
    nb = num_blocks(S, b)
    mask = _random_mask(B, Hq, nb, density, seed=S + b)
    out = _poisoned((B, Hq, S, d))
    block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=rows_per_tile)
    _assert_close(out, ref.block_sparse_attention(q, k, v, mask, b))


def test_block_sparse_empty_rows_are_zero():
    q, k, v = _qkv(1, 2, 2, 97, 64, seed=3)
    nb = num_blocks(97, 32)
    mask = torch.zeros(1, 2, nb, nb, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 2, 1] = True  # one kept tile; everything else empty, including the diagonal
    mask[0, 1] = torch.ones(nb, nb, dtype=torch.bool).triu(1)  # only tiles above the diagonal
    for rows_per_tile in (1, 2, 4):
        out = _poisoned(q.shape)
        block_sparse_attention(q, k, v, mask, 32, out=out, rows_per_tile=rows_per_tile)
        expected = ref.block_sparse_attention(q, k, v, mask, 32)
        _assert_close(out, expected)
        assert (out[0, 1] == 0).all()
        assert (out[0, 0, :64] == 0).all() and (out[0, 0, 96:] == 0).all()


def test_block_sparse_accepts_index_and_reuses_block_index():
    S, b = 200, 32
    q, k, v = _qkv(1, 6, 2, S, 64, seed=4)
    nb = num_blocks(S, b)
    mask = _random_mask(1, 6, nb, 0.4, seed=5, keep_diag=True)
    expected = ref.block_sparse_attention(q, k, v, mask, b)
    counts, indices = mask_to_index(mask)
    _assert_close(block_sparse_attention(q, k, v, (counts, indices), b), expected)
    index = build_block_index(mask, 1, 6, S, b, rows_per_tile=4)
    assert isinstance(index, BlockIndex) and index.rows_per_tile == 4
    _assert_close(block_sparse_attention(q, k, v, index, b, scale=None), expected)
    with pytest.raises(ValueError, match="BlockIndex was built"):
        block_sparse_attention(q, k, v, index, 64)


def test_block_sparse_non_contiguous_inputs():
    # (B, S, H, d) storage seen through a transpose, as model captures hand it over.
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 97, 3, 64, generator=g).to(DEVICE, DTYPE).transpose(1, 2)
    k = torch.randn(1, 97, 1, 64, generator=g).to(DEVICE, DTYPE).transpose(1, 2)
    v = torch.randn(1, 97, 1, 64, generator=g).to(DEVICE, DTYPE).transpose(1, 2)
    mask = _random_mask(1, 3, num_blocks(97, 64), 0.6, seed=7)
    _assert_close(
        block_sparse_attention(q, k, v, mask, 64), ref.block_sparse_attention(q, k, v, mask, 64)
    )
    _assert_close(pooled_attention(q, k, v, 64)[1], ref.pooled_attention(q, k, v, 64)[1])


def test_inputs_are_validated():
    q, k, v = _qkv(1, 4, 2, 64, 64, seed=8)
    nb = num_blocks(64, 32)
    mask = torch.ones(1, 4, nb, nb, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="block_mask has shape"):
        block_sparse_attention(q, k, v, mask[:, :2], 32)
    with pytest.raises(ValueError, match="torch.bool"):
        block_sparse_attention(q, k, v, mask.int(), 32)
    with pytest.raises(ValueError, match="need a divisor"):
        pooled_attention(q, k[:, :1].expand(1, 3, 64, 64), v[:, :1].expand(1, 3, 64, 64), 32)
    with pytest.raises(ValueError, match="block_size"):
        pooled_attention(q, k, v, 48)
    with pytest.raises(ValueError, match="head dim"):
        pooled_attention(q[..., :48], k[..., :48], v[..., :48], 32)
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attention(q, k.double(), v, mask, 32)
    with pytest.raises(ValueError, match="out must be"):
        pooled_attention(q, k, v, 32, out=torch.empty(1, 4, 63, 64, dtype=DTYPE, device=DEVICE))
    with pytest.raises(ValueError, match="pooled_out must be"):
        pooled_attention(
            q, k, v, 32, pooled_out=torch.empty(1, 4, nb, nb, device=DEVICE, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="block index must be"):
        block_sparse_attention(
            q,
            k,
            v,
            (
                torch.ones(1, 4, nb + 1, dtype=torch.int32),
                torch.zeros(1, 4, nb, nb, dtype=torch.int32),
            ),
            32,
        )
    if not ON_GPU:
        with pytest.raises(ValueError, match="float32 or float16"):
            pooled_attention(q.double(), k.double(), v.double(), 32)


@pytest.mark.parametrize(
    "S,b,density,rows_per_tile",
    [
        (200, 32, 0.3, None),
        (97, 32, 1.0, None),
        (1000, 64, 0.9, None),
        (1000, 64, 0.15, None),
        (64, 16, 0.5, 8),
        (300, 128, 0.5, None),
        (300, 64, 0.0, 2),
    ],
)
def test_index_kernel_matches_torch_builder(S, b, density, rows_per_tile):
    nb = num_blocks(S, b)
    mask = _random_mask(2, 2, nb, density, seed=S + b)
    a = build_block_index(mask, 2, 2, S, b, rows_per_tile, method="torch")
    c = build_block_index(mask, 2, 2, S, b, rows_per_tile, method="triton")
    assert a.rows_per_tile == c.rows_per_tile
    assert torch.equal(a.counts, c.counts) and torch.equal(a.n_full, c.n_full)
    assert a.entries.shape == c.entries.shape
    valid = torch.arange(a.entries.shape[-1], device=DEVICE) < a.counts.unsqueeze(-1)
    assert torch.equal(a.entries[valid], c.entries[valid])


def test_kv_major_and_head_major_launch_orders_agree():
    q, k, v = _qkv(2, 6, 2, 200, 64, seed=9)
    mask = _random_mask(2, 6, num_blocks(200, 32), 0.4, seed=10)
    expected = ref.block_sparse_attention(q, k, v, mask, 32)
    for kv_major in (True, False):
        out = _poisoned(q.shape)
        block_sparse_attention(q, k, v, mask, 32, out=out, kv_major=kv_major)
        _assert_close(out, expected)


@pytest.mark.parametrize("S,b,rows_per_tile", [(1, 32, None), (1, 32, 4), (33, 32, 4), (33, 16, 8)])
def test_sequences_shorter_than_a_tile(S, b, rows_per_tile):
    q, k, v = _qkv(1, 2, 1, S, 64, seed=11)
    nb = num_blocks(S, b)
    out, pooled = _poisoned(q.shape), _poisoned((1, 2, nb, nb), torch.float32)
    pooled_attention(q, k, v, b, out=out, pooled_out=pooled, rows_per_tile=rows_per_tile)
    exp_out, exp_pooled = ref.pooled_attention(q, k, v, b)
    _assert_close(out, exp_out)
    torch.testing.assert_close(pooled, exp_pooled, atol=1e-5 if not ON_GPU else 2e-2, rtol=0)
    mask = _random_mask(1, 2, nb, 0.7, seed=12)
    out = _poisoned(q.shape)
    block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=rows_per_tile)
    _assert_close(out, ref.block_sparse_attention(q, k, v, mask, b))


@pytest.mark.parametrize("method", ["torch", "triton"])
@pytest.mark.parametrize("S,b,rows_per_tile", [(1025, 64, 1), (97, 32, 2), (200, 16, 4)])
def test_sync_free_index_holds_the_same_lists(S, b, rows_per_tile, method):
    """The sync-free builder (no device-to-host read) sizes the entries for nb and leaves the
    unused tail unwritten; the lists the kernel reads are the usual ones."""
    nb = num_blocks(S, b)
    mask = _random_mask(2, 3, nb, 0.3, seed=S, keep_diag=True)
    a = build_block_index(mask, 2, 3, S, b, rows_per_tile, method=method)
    c = build_block_index(mask, 2, 3, S, b, rows_per_tile, method=method, sync_free=True)
    assert c.entries.shape[-1] == nb and c.rows_per_tile == a.rows_per_tile
    assert torch.equal(a.counts, c.counts) and torch.equal(a.n_full, c.n_full)
    valid = torch.arange(a.entries.shape[-1], device=DEVICE) < a.counts.unsqueeze(-1)
    assert torch.equal(a.entries[valid], c.entries[..., : a.entries.shape[-1]][valid])
    with pytest.raises(ValueError, match="sync_free=True needs rows_per_tile"):
        build_block_index(mask, 2, 3, S, b, None, method=method, sync_free=True)


@pytest.mark.parametrize("S,group,d", [(1025, 3, 64), (97, 1, 128), (200, 4, 64)])
def test_sync_free_kernel_matches_reference(S, group, d):
    b = 64 if S > 200 else 32
    q, k, v = _qkv(1, 2 * group, 2, S, d, seed=S + d)
    mask = _random_mask(1, 2 * group, num_blocks(S, b), 0.3, seed=S, keep_diag=True)
    mask[0, 0, -1] = False  # an empty last row
    out = block_sparse_attention(q, k, v, mask, b, out=_poisoned(q.shape), sync_free=True)
    _assert_close(out, ref.block_sparse_attention(q, k, v, mask, b))


# ---------------------------------------------------------------- logit soft-capping (Gemma2)
# S x block x d x GQA group x cap: lengths 97 and 1025, groups 1/3/4, head dims 64/128. Inputs are
# scaled so the scaled logits reach about +-2 cap: the cap bites (and saturates at 50).
SOFTCAP_CASES = [
    (97, 16, 64, 3, 2.0),
    (97, 32, 128, 1, 50.0),
    (1025, 64, 64, 4, 50.0),
    (1025, 128, 128, 3, 2.0),
]


def _capped_qkv(B, Hq, Hkv, S, d, cap, seed):
    q, k, v = _qkv(B, Hq, Hkv, S, d, seed)
    return q * cap ** 0.5, k * cap ** 0.5, v


@pytest.mark.parametrize("S,b,d,group,cap", SOFTCAP_CASES)
def test_block_sparse_softcap_matches_reference(S, b, d, group, cap):
    Hq, nb = group, num_blocks(S, b)
    q, k, v = _capped_qkv(1, Hq, 1, S, d, cap, seed=S + d)
    mask = _random_mask(1, Hq, nb, 0.4, seed=S)
    mask[:, :, nb // 2] = False  # an empty row of blocks
    for rows_per_tile in (1, 2) if b <= 64 else (1,):  # 256-row tiles exceed shared memory
        out = _poisoned((1, Hq, S, d))
        block_sparse_attention(q, k, v, mask, b, out=out, rows_per_tile=rows_per_tile,
                               softcap=cap)
        expected = ref.block_sparse_attention(q, k, v, mask, b, softcap=cap)
        _assert_close(out, expected)
        assert (out[:, :, (nb // 2) * b:(nb // 2 + 1) * b] == 0).all()
    plain = ref.block_sparse_attention(q, k, v, mask, b)
    assert (plain.float() - expected.float()).abs().max() > 1e-2  # the cap mattered


@pytest.mark.parametrize("S,b,d,group,cap", SOFTCAP_CASES)
def test_pooled_attention_softcap_matches_reference(S, b, d, group, cap):
    Hq, nb = group, num_blocks(S, b)
    q, k, v = _capped_qkv(1, Hq, 1, S, d, cap, seed=S + b)
    out, pooled = _poisoned((1, Hq, S, d)), _poisoned((1, Hq, nb, nb), torch.float32)
    pooled_attention(q, k, v, b, out=out, pooled_out=pooled, softcap=cap)
    exp_out, exp_pooled = ref.pooled_attention(q, k, v, b, softcap=cap)
    _assert_close(out, exp_out)
    torch.testing.assert_close(pooled, exp_pooled, atol=1e-5 if not ON_GPU else 2e-2, rtol=0)
    buf = _poisoned((1, Hq, S, d))
    attention(q, k, v, out=buf, softcap=cap)  # the dense kernel: the same code, no map
    _assert_close(buf, exp_out)


def test_softcap_none_leaves_the_kernels_bit_for_bit():
    """softcap=None compiles the plain kernels (SOFTCAP is a constexpr): the outputs are those of
    a call without the argument, exactly."""
    q, k, v = _qkv(1, 3, 1, 97, 64, seed=3)
    mask = _random_mask(1, 3, 4, 0.5, seed=3)
    assert torch.equal(block_sparse_attention(q, k, v, mask, 32, softcap=None),
                       block_sparse_attention(q, k, v, mask, 32))
    pairs = zip(pooled_attention(q, k, v, 32, softcap=None), pooled_attention(q, k, v, 32),
                strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="softcap must be None or a positive"):
        block_sparse_attention(q, k, v, mask, 32, softcap=0.0)
