"""seerlib.ops: the dispatch point picks kernels or the reference, and both agree."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import ops, reference  # noqa: E402
from seerlib.reference import mask_to_index, num_blocks  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _qkv(S=97, d=64, Hq=4, Hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, S, d, generator=g) for h in (Hq, Hkv, Hkv)]


def test_auto_uses_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SEERLIB_BACKEND", raising=False)
    q = torch.randn(1, 1, 4, 8)
    assert ops.get_backend() == "auto"
    assert not ops._use_kernels(q, None)
    assert ops._use_kernels(q, "triton")


def test_backend_precedence_and_validation(monkeypatch):
    monkeypatch.setenv("SEERLIB_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        assert ops.get_backend("auto") == "auto"
    assert ops.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.get_backend("cuda")
    monkeypatch.setenv("SEERLIB_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.get_backend()


def test_reference_backend_matches_reference():
    q, k, v = _qkv()
    nb = num_blocks(97, 32)
    mask = torch.rand(1, 4, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(ops.attention(q, k, v), reference.attention(q, k, v))
    out, pooled = ops.pooled_attention(q, k, v, 32)
    exp_out, exp_pooled = reference.pooled_attention(q, k, v, 32)
    torch.testing.assert_close(pooled, exp_pooled)
    expected = reference.block_sparse_attention(q, k, v, mask, 32)
    torch.testing.assert_close(ops.block_sparse_attention(q, k, v, mask, 32), expected)
    torch.testing.assert_close(
        ops.block_sparse_attention(q, k, v, mask_to_index(mask), 32), expected
    )


@pytest.mark.skipif(not INTERPRETING, reason="forcing the kernels on CPU needs TRITON_INTERPRET=1")
def test_forced_triton_backend_matches_reference():
    q, k, v = _qkv(S=64, seed=2)
    nb = num_blocks(64, 32)
    mask = torch.rand(1, 4, nb, nb, generator=torch.Generator().manual_seed(3)) < 0.6
    with ops.use_backend("triton"):
        out = ops.block_sparse_attention(q, k, v, mask, 32)
        dense = ops.attention(q, k, v, causal=False)
        _, pooled = ops.pooled_attention(q, k, v, 32)
    torch.testing.assert_close(
        out, reference.block_sparse_attention(q, k, v, mask, 32), atol=2e-5, rtol=2e-5
    )
    torch.testing.assert_close(
        dense, reference.attention(q, k, v, causal=False), atol=2e-5, rtol=2e-5
    )
    torch.testing.assert_close(
        pooled, reference.pooled_attention(q, k, v, 32)[1], atol=1e-5, rtol=0
    )


def test_auto_sends_unsupported_shapes_to_reference(monkeypatch):
    monkeypatch.delenv("SEERLIB_BACKEND", raising=False)
    meta = torch.empty(1, 2, 8, 64, device="meta", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert ops._use_kernels(meta, None, 64)
    assert not ops._use_kernels(meta, None, 48)
    assert not ops._use_kernels(meta[..., :48], None, 64)
    assert not ops._use_kernels(meta.float(), None, 64)


def test_kernels_are_never_silently_non_differentiable():
    """Only block-sparse attention has a kernel backward: "triton" refuses the other kernels when
    an input needs grad, "auto" takes the differentiable reference, and gradients flow."""
    q = torch.randn(1, 2, 32, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool).tril()
    with pytest.raises(RuntimeError, match="no backward yet"):
        ops.pooled_attention(q, k, v, 16, backend="triton")
    with pytest.raises(RuntimeError, match="no backward yet"):
        ops.attention(q, k, v, backend="triton")
    out = ops.block_sparse_attention(q, k, v, mask, 16)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():  # no grad needed: the kernels may take it
        assert ops._use_kernels(q, "triton", 16, inputs=(q, k, v))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_block_sparse_kernel_backward_through_ops():
    """backend="triton" with inputs that need grad takes the kernel's own backward, which gives
    the reference's gradients; out= is refused there (autograd owns the output)."""
    q, k, v = _qkv(S=97, d=16, Hq=4, Hkv=2)
    nb = num_blocks(97, 16)
    mask = torch.rand(1, 4, nb, nb, generator=torch.Generator().manual_seed(3)) < 0.5
    dout = torch.randn_like(q)
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.block_sparse_attention(*leaves, mask, 16, backend=backend)
        grads[backend] = torch.autograd.grad(out, leaves, dout)
    for a, b in zip(grads["reference"], grads["triton"], strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="out= cannot"):
        ops.block_sparse_attention(q.requires_grad_(), k, v, mask, 16, backend="triton",
                                   out=torch.empty_like(q))
