"""The block-pooling kernel (`seerlib.kernels.block_pool`) against `seerlib.gate.pool_blocks`.

Under the interpreter (no GPU) in float32; on a GPU in bfloat16 against the torch pooling of the
same bf16 input. Output buffers are NaN-poisoned first, so an element never written fails.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seerlib import ops  # noqa: E402
from seerlib.gate import pool_blocks as torch_pool  # noqa: E402
from seerlib.kernels.block_pool import pool_blocks  # noqa: E402

ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _x(B, H, S, d, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # transformers' layout: (B, S, H * d) viewed as (B, H, S, d)
        x = torch.randn(B, S, H, d, generator=g).to(DEVICE, DTYPE).transpose(1, 2)
        assert not x.is_contiguous()
        return x
    return torch.randn(B, H, S, d, generator=g).to(DEVICE, DTYPE)


def _check(got, x, b, pool):
    want = torch_pool(x, b, pool)
    assert not torch.isnan(got).any(), "an output element was never written"
    tol = 1e-2 if ON_GPU else 1e-6
    # a half-precision output: the float32 result rounded once
    torch.testing.assert_close(got.float(), want.to(got.dtype).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("S,b,d", [(97, 64, 64), (1025, 64, 128), (64, 64, 16), (200, 32, 64),
                                   (130, 128, 32), (33, 16, 64)])
@pytest.mark.parametrize("pool", [("avg",), ("max", "min", "avg"), ("min", "avg")])
def test_pool_matches_torch(S, b, d, pool):
    x = _x(1, 3, S, d, seed=S + b + d, transposed=True)
    nb = -(-S // b)
    out = torch.full((1, 3, nb, len(pool) * d), float("nan"), device=DEVICE)
    got = pool_blocks(x, b, pool, out=out)
    assert got is out
    _check(got, x, b, pool)


def test_pool_batch_and_dtype_of_out():
    x = _x(2, 4, 150, 64, seed=3)
    got = pool_blocks(x, 64, ("max", "avg"), dtype=torch.float16)
    assert got.dtype == torch.float16 and got.shape == (2, 4, 3, 128)
    _check(got, x, 64, ("max", "avg"))


def test_pool_bad_input():
    x = _x(1, 2, 64, 64, seed=0)
    with pytest.raises(ValueError, match="distinct pooling ops"):
        pool_blocks(x, 64, ("avg", "avg"))
    with pytest.raises(ValueError, match="distinct pooling ops"):
        pool_blocks(x, 64, ("median",))
    with pytest.raises(ValueError, match="block_size must be one of"):
        pool_blocks(x, 48, ("avg",))
    with pytest.raises(ValueError, match="head dim"):
        pool_blocks(_x(1, 2, 64, 48, seed=0), 64, ("avg",))
    with pytest.raises(ValueError, match="4-D"):
        pool_blocks(x[0], 64, ("avg",))
    with pytest.raises(ValueError, match=r"out must be a floating \(1, 2, 1, 64\)"):
        pool_blocks(x, 64, ("avg",), out=torch.empty(1, 2, 2, 64, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ops_pool_fills_out_on_every_backend(backend):
    x = _x(1, 3, 97, 64, seed=7, transposed=True)
    out = torch.full((1, 3, 2, 192), float("nan"), device=DEVICE)
    got = ops.pool_blocks(x, 64, ("max", "min", "avg"), out=out, backend=backend)
    assert got is out
    _check(out, x, 64, ("max", "min", "avg"))
    with pytest.raises(ValueError, match="out must be"):
        ops.pool_blocks(x, 64, ("avg",), out=torch.empty(1, 3, 3, 64, device=DEVICE),
                        backend=backend)
