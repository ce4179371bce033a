"""The decode-truth forward (`seerlib/kernels/decode_truth.py`) against the exact reference.

On a machine without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before torch/triton load) in float32; with a GPU they run in bfloat16 on CUDA.

Tolerances as in test_kernels.py: float32 outputs atol = rtol = 2e-5, truth probabilities 1e-5
absolute; bfloat16 on GPU (and float16 under the interpreter): relative Frobenius error below
2e-2 for outputs, 2e-2 absolute for the truth. Output buffers are filled with NaN first and the
kernels' scratch is NaN-filled too, so an element written late, never, or read before it was
written fails the test.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import reference as ref  # noqa: E402
from seerlib.kernels import decode_truth  # noqa: E402
from seerlib.kernels.decode_truth import decode_pooled_attention  # noqa: E402
from seerlib.reference import num_blocks  # noqa: E402

ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
LOW = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter path takes no bfloat16


@pytest.fixture(autouse=True)
def _nan_scratch(monkeypatch):
    """The kernels' working memory starts as NaN: a read of an unwritten element shows."""
    monkeypatch.setattr(
        decode_truth,
        "_scratch",
        lambda numel, device: torch.full((max(1, numel),), float("nan"), device=device),
    )


def _qkv(B, Hq, Hkv, S, d, seed, Sq=None, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S if Sq is None else Sq, d, generator=g)
    k, v = (torch.randn(B, Hkv, S, d, generator=g) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _poisoned(shape, dtype=DTYPE):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _expected_out(q, k, v, causal=True, scale=None, softcap=None):
    """Reference attention for queries at the last Sq positions: q padded at the front."""
    Sq, S = q.shape[2], k.shape[2]
    pad = q.new_zeros(q.shape[0], q.shape[1], S - Sq, q.shape[3])
    return ref.attention(torch.cat([pad, q], 2), k, v, causal=causal, scale=scale,
                         softcap=softcap)[:, :, S - Sq:]


def _assert_out(out, expected, low=False):
    assert not torch.isnan(out).any(), "NaN left in the output: an element was never written"
    if low or ON_GPU:
        err = (out.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
        assert err < 2e-2, f"relative error {err:.2e}"
    else:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _assert_truth(truth, expected, Sk, b, causal=True, low=False):
    assert not torch.isnan(truth).any(), "NaN in the truth"
    atol = 2e-2 if low or ON_GPU else 1e-5
    torch.testing.assert_close(truth, expected, atol=atol, rtol=0)
    sums = truth.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    if causal:
        Sq, nb = truth.shape[2], truth.shape[3]
        pos = torch.arange(Sk - Sq, Sk, device=truth.device)
        after = torch.arange(nb, device=truth.device)[None, :] * b > pos[:, None]  # (Sq, nb)
        assert (truth[..., after] == 0).all(), "mass on blocks after the query"


# S x block x GQA group, the head dim alternating: 97 covers every group and both blocks at both
# head dims; the 1025 cases stay few and narrow (the interpreter runs each tile op in numpy).
CASES = [
    (97, 16, 1, 64), (97, 16, 3, 128), (97, 16, 4, 64),
    (97, 64, 1, 128), (97, 64, 3, 64), (97, 64, 4, 128),
    (1025, 16, 1, 128), (1025, 16, 3, 64), (1025, 64, 3, 64), (1025, 64, 4, 128),
]


@pytest.mark.parametrize("S,b,group,d", CASES)
def test_matches_reference(S, b, group, d):
    Hkv = 2 if S < 200 else 1
    q, k, v = _qkv(1, Hkv * group, Hkv, S, d, seed=S + b + group + d)
    out, truth = _poisoned(q.shape), _poisoned((1, Hkv, S, num_blocks(S, b)), torch.float32)
    got_out, got_truth = decode_pooled_attention(q, k, v, b, out=out, truth_out=truth)
    assert got_out is out and got_truth is truth
    _assert_out(out, ref.attention(q, k, v))
    _assert_truth(truth, ref.decode_block_truth(q, k, b), S, b)


@pytest.mark.parametrize("S,Sq,b,group", [(200, 37, 32, 2), (130, 1, 16, 3), (97, 96, 64, 1)])
def test_queries_at_the_tail(S, Sq, b, group):
    """q shorter than k: rows at positions S - Sq .. S - 1 (Sq = 1: one decode step)."""
    q, k, v = _qkv(2, 2 * group, 2, S, 64, seed=S + Sq, Sq=Sq)
    out, truth = decode_pooled_attention(q, k, v, b)
    _assert_out(out, _expected_out(q, k, v))
    _assert_truth(truth, ref.decode_block_truth(q, k, b), S, b)


@pytest.mark.parametrize("S,Sq,b", [(97, 97, 32), (100, 7, 32), (128, 128, 64)])
def test_noncausal_sees_every_block(S, Sq, b):
    q, k, v = _qkv(1, 3, 1, S, 64, seed=S, Sq=Sq)
    out, truth = decode_pooled_attention(q, k, v, b, causal=False, scale=0.3)
    _assert_out(out, _expected_out(q, k, v, causal=False, scale=0.3))
    last = torch.full((Sq,), S - 1, device=DEVICE)  # every row a query at the last position
    expected = ref.decode_block_truth(q, k, b, scale=0.3, positions=last)
    _assert_truth(truth, expected, S, b, causal=False)


@pytest.mark.parametrize("S,b,rows", [(97, 16, 16), (97, 32, 64), (300, 128, 256)])
def test_rows_per_program_and_scale(S, b, rows):
    q, k, v = _qkv(1, 4, 2, S, 32, seed=S + rows)
    out, truth = decode_pooled_attention(q, k, v, b, scale=0.2, rows_per_program=rows)
    _assert_out(out, ref.attention(q, k, v, scale=0.2))
    _assert_truth(truth, ref.decode_block_truth(q, k, b, scale=0.2), S, b)


@pytest.mark.parametrize("S,Sq,b,group,cap", [(97, 97, 16, 3, 2.0), (200, 37, 32, 2, 20.0),
                                              (130, 1, 64, 1, 2.0)])
def test_soft_cap(S, Sq, b, group, cap):
    """Gemma2's logit soft-cap in the output and the truth alike, at the tail and for one decode
    row; cap 2 binds on these logits (the uncapped truth differs by far more than the tolerance)."""
    q, k, v = _qkv(1, 2 * group, 2, S, 64, seed=S + Sq, Sq=Sq)
    q, k = q * 2, k * 2
    out, truth = decode_pooled_attention(q, k, v, b, softcap=cap)
    _assert_out(out, _expected_out(q, k, v, softcap=cap))
    want = ref.decode_block_truth(q, k, b, softcap=cap)
    _assert_truth(truth, want, S, b)
    if cap == 2.0:
        plain = ref.decode_block_truth(q, k, b)
        assert (plain - want).abs().max() > 1e-2


def test_low_precision():
    q, k, v = _qkv(1, 3, 1, 300, 64, seed=13, dtype=LOW)
    out, truth = decode_pooled_attention(q, k, v, 32)
    assert out.dtype == LOW and truth.dtype == torch.float32
    _assert_out(out, ref.attention(q, k, v), low=True)
    _assert_truth(truth, ref.decode_block_truth(q, k, 32), 300, 32, low=True)


def test_fresh_buffers_hold_no_stale_values():
    """The wrapper's own torch.empty outputs: two calls agree and match, after NaN was freed."""
    q, k, v = _qkv(1, 2, 1, 97, 64, seed=14)
    results = []
    for _ in range(2):
        stale = _poisoned((1, 2, 97, 64)), _poisoned((1, 1, 97, 4), torch.float32)
        del stale  # freed NaN memory the allocator may hand to the outputs
        results.append(decode_pooled_attention(q, k, v, 32))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    _assert_truth(results[0][1], ref.decode_block_truth(q, k, 32), 97, 32)


@pytest.mark.parametrize("S,b", [(1, 16), (1, 128), (17, 16)])
def test_rows_with_one_key_are_finite(S, b):
    q, k, v = _qkv(1, 2, 1, S, 16, seed=15)
    out, truth = decode_pooled_attention(q, k, v, b)
    _assert_out(out, ref.attention(q, k, v))
    _assert_truth(truth, ref.decode_block_truth(q, k, b), S, b)
    assert torch.equal(truth[0, 0, 0], torch.eye(1, num_blocks(S, b), device=DEVICE)[0])
    torch.testing.assert_close(out[:, :, 0], v[:, :1, 0].expand(1, 2, 16))  # the one key's value


def test_non_contiguous_inputs_and_head_chunks(monkeypatch):
    """(B, S, H, d) storage seen through a transpose; a scratch budget that runs one kv head
    per launch."""
    g = torch.Generator().manual_seed(16)
    q, k, v = (
        torch.randn(1, 97, h, 64, generator=g).to(DEVICE, DTYPE).transpose(1, 2) for h in (6, 3, 3)
    )
    expected = ref.decode_block_truth(q, k, 32)
    monkeypatch.setattr(decode_truth, "SCRATCH_BYTES", 1)
    out, truth = decode_pooled_attention(q, k, v, 32)
    _assert_out(out, ref.attention(q, k, v))
    _assert_truth(truth, expected, 97, 32)


def test_inputs_are_validated():
    q, k, v = _qkv(1, 4, 2, 64, 64, seed=17)
    with pytest.raises(ValueError, match="Sq <= S"):
        decode_pooled_attention(torch.cat([q, q], 2), k, v, 32)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        decode_pooled_attention(q, k, v[:, :, :32], 32)
    with pytest.raises(ValueError, match="need a divisor"):
        decode_pooled_attention(q, k[:, :1].expand(1, 3, 64, 64), v[:, :1].expand(1, 3, 64, 64),
                                32)
    with pytest.raises(ValueError, match="block_size"):
        decode_pooled_attention(q, k, v, 48)
    with pytest.raises(ValueError, match="positive int"):
        decode_pooled_attention(q, k, v, None)
    with pytest.raises(ValueError, match="head dim"):
        decode_pooled_attention(q[..., :48], k[..., :48], v[..., :48], 32)
    with pytest.raises(ValueError, match="4-D"):
        decode_pooled_attention(q[0], k, v, 32)
    with pytest.raises(ValueError, match="out must be"):
        decode_pooled_attention(q, k, v, 32, out=_poisoned((1, 4, 63, 64)))
    with pytest.raises(ValueError, match="truth_out must be"):
        decode_pooled_attention(q, k, v, 32, truth_out=_poisoned((1, 4, 64, 2), torch.float32))
    with pytest.raises(ValueError, match="rows_per_program"):
        decode_pooled_attention(q, k, v, 32, rows_per_program=48)
    if not ON_GPU:
        with pytest.raises(ValueError, match="float32 or float16"):
            decode_pooled_attention(q.double(), k.double(), v.double(), 32)
