"""seerlib.ops: the dispatch point picks kernels or the reference, and both agree."""

import os
import shutil
import warnings

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
    q = torch.randn(1, 1, 4, 16)  # a kernel head dim: "triton" refuses others
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
    monkeypatch.setattr(ops, "_warned_head_dims", set())
    assert ops._use_kernels(meta, None, 64)
    assert not ops._use_kernels(meta, None, 48)
    with pytest.warns(ops.KernelFallbackWarning, match="head dim 48"):
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


# ---------------------------------------------------------------- head dims outside the kernels


def test_head_dim_256_warns_once_under_auto_on_cuda(monkeypatch):
    """Gemma 3's head dim 256: "auto" on a CUDA bf16 tensor takes the reference and says so once
    (naming the head dim, the kernels' head dims and that the reference is slow on a GPU)."""
    monkeypatch.delenv("SEERLIB_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_warned_head_dims", set())
    meta = torch.empty(1, 2, 8, 256, device="meta", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.warns(ops.KernelFallbackWarning) as seen:
        assert not ops._use_kernels(meta, None, 64)
    msg = str(seen[0].message)
    assert "head dim 256" in msg and "(16, 32, 64, 128)" in msg and "reference" in msg
    assert "slow on a GPU" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops._use_kernels(meta, None, 64)  # once per head dim: no second warning


def test_head_dim_256_cpu_calls_run_the_reference_silently_and_triton_refuses(monkeypatch):
    monkeypatch.delenv("SEERLIB_BACKEND", raising=False)
    q, k, v = _qkv(S=40, d=256, Hq=4, Hkv=1)
    mask = torch.ones(1, 4, 3, 3, dtype=torch.bool).tril()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU: the reference is the path anyway, no warning
        out = ops.block_sparse_attention(q, k, v, mask, 16)
    torch.testing.assert_close(out, reference.attention(q, k, v))
    for call in (lambda: ops.block_sparse_attention(q, k, v, mask, 16, backend="triton"),
                 lambda: ops.pooled_attention(q, k, v, 16, backend="triton"),
                 lambda: ops.attention(q, k, v, backend="triton")):
        with pytest.raises(ValueError, match=r"head dim 256 .*\(16, 32, 64, 128\)"):
            call()


# ---------------------------------------------------------------- logit soft-capping (Gemma2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_softcap_passes_through_every_prefill_op(backend):
    if backend == "triton" and not INTERPRETING:
        pytest.skip("forcing the kernels on CPU needs TRITON_INTERPRET=1")
    q, k, v = _qkv(S=97, d=64, Hq=3, Hkv=1, seed=4)
    q, k = q * 3, k * 3
    nb = num_blocks(97, 32)
    mask = torch.rand(1, 3, nb, nb, generator=torch.Generator().manual_seed(5)) < 0.5
    cap, tol = 5.0, dict(atol=2e-5, rtol=2e-5)
    want = reference.block_sparse_attention(q, k, v, mask, 32, softcap=cap)
    assert (want - reference.block_sparse_attention(q, k, v, mask, 32)).abs().max() > 1e-2
    got = ops.block_sparse_attention(q, k, v, mask, 32, softcap=cap, backend=backend)
    torch.testing.assert_close(got, want, **tol)
    out, pooled = ops.pooled_attention(q, k, v, 32, softcap=cap, backend=backend)
    exp_out, exp_pooled = reference.pooled_attention(q, k, v, 32, softcap=cap)
    torch.testing.assert_close(out, exp_out, **tol)
    torch.testing.assert_close(pooled, exp_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(ops.attention(q, k, v, softcap=cap, backend=backend), exp_out,
                               **tol)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(ops.block_sparse_attention(*leaves, mask, 32, softcap=cap,
                                                           backend=backend), leaves, dout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(reference.block_sparse_attention(*leaves, mask, 32,
                                                                    softcap=cap), leaves, dout)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_decode_target_carries_the_softcap(backend):
    """The decode target with a soft-cap (5, on logits of a few units, so that it binds): the
    kernel (under the interpreter) and the reference give the reference's soft-capped output
    and target."""
    q, k, v = _qkv(S=64, d=16, Hq=4, Hkv=2, seed=6)
    out, truth = ops.decode_pooled_attention(q * 3, k * 3, v, 16, softcap=5.0, backend=backend)
    torch.testing.assert_close(out, reference.attention(q * 3, k * 3, v, softcap=5.0),
                               atol=2e-5, rtol=2e-5)
    want = reference.decode_block_truth(q * 3, k * 3, 16, softcap=5.0)
    torch.testing.assert_close(truth, want, atol=1e-5, rtol=0)
    assert (want - reference.decode_block_truth(q * 3, k * 3, 16)).abs().max() > 1e-3
