"""Block pooling of a sequence in one pass: the gate's input features, exactly `gate.pool_blocks`.

What it computes: for x (B, H, S, d) and pooling ops drawn from ("avg", "max", "min"), the
(B, H, nb, len(ops) * d) tensor whose row j holds, op after op, the mean / max / min over the
tokens of block j (nb = ceil(S / b); a partial last block pools over its real tokens only).

What it must move: x once (B * H * S * d * e bytes) and the output (1 / b of it per op). The torch
version (`seerlib.gate.pool_blocks`) reads x once per op and converts through float32 copies; at
the Llama-3-8B shape and 32k tokens q_pre alone is 268 MB, so one read instead of three is the
difference between some 60 us and 200 us per layer. It also writes straight into a caller's
buffer, which is what lets `seerlib.integrate` feed a CUDA graph's static inputs without copying
the layer's q_pre / k_pre into them (the graph then starts from the small pooled features).

Design: one program per (batch * head, block); it loads the block's b x d tile once (rows past S
masked: 0 for the sum, -inf / +inf for max / min), reduces over the rows in float32 and stores
each op's d values at its place in the output row. x may have any strides but a contiguous last
dim (transformers' q_pre is a transposed view).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seerlib.reference import check_block_size, num_blocks

__all__ = ["pool_blocks"]

# what _pool_fwd implements, one constexpr position each (seerlib.gate.POOL_OPS names the same)
_OPS = ("avg", "max", "min")


@triton.jit
def _pool_fwd(
    X, O,
    sxz, sxh, sxs,
    soz, soh, son,
    H, S,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    POS_AVG: tl.constexpr,
    POS_MAX: tl.constexpr,
    POS_MIN: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)
    z = pid_bh // H
    h = pid_bh % H
    rows = j * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_D)
    ok = rows < S
    x_ptr = X + z.to(tl.int64) * sxz + h.to(tl.int64) * sxh + rows[:, None].to(tl.int64) * sxs \
        + cols[None, :]
    o_ptr = O + z.to(tl.int64) * soz + h.to(tl.int64) * soh + j.to(tl.int64) * son + cols
    x = tl.load(x_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    if POS_AVG >= 0:
        n = tl.minimum(S - j * BLOCK, BLOCK).to(tl.float32)
        tl.store(o_ptr + POS_AVG * HEAD_D, (tl.sum(x, 0) / n).to(O.dtype.element_ty))
    if POS_MAX >= 0:
        mx = tl.max(tl.where(ok[:, None], x, float("-inf")), 0)
        tl.store(o_ptr + POS_MAX * HEAD_D, mx.to(O.dtype.element_ty))
    if POS_MIN >= 0:
        mn = tl.min(tl.where(ok[:, None], x, float("inf")), 0)
        tl.store(o_ptr + POS_MIN * HEAD_D, mn.to(O.dtype.element_ty))


def pool_blocks(x: torch.Tensor, block_size: int, ops, *, out: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pool x into blocks of `block_size` tokens, the ops' results concatenated on channels.

    Args:
        x: (B, H, S, d), bf16/fp16 on CUDA or fp32 under TRITON_INTERPRET=1; any strides with a
            contiguous last dim; d a power of two in [16, 128].
        block_size: b in {16, 32, 64, 128}.
        ops: a sequence of distinct ops from ("avg", "max", "min"), in output order.
        out: optional (B, H, nb, len(ops) * d) buffer with a contiguous last dim (a CUDA graph's
            static input); its dtype wins over `dtype`.
        dtype: the output's dtype when `out` is None (float32, like `gate.pool_blocks`).
    Returns:
        (B, H, nb, len(ops) * d), nb = ceil(S / b).
    """
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    if not ops or any(o not in _OPS for o in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops must be distinct pooling ops from {_OPS}; got {ops!r}")
    b = check_block_size(block_size)
    if b not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 16, 32, 64, 128 for the kernel; got {b}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (B, H, S, d) tensor; got {got}")
    B, H, S, d = x.shape
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128 for the kernel; got {d}")
    if S == 0:
        raise ValueError("x has no tokens (S = 0)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = num_blocks(S, b)
    shape = (B, H, nb, len(ops) * d)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif (tuple(out.shape) != shape or out.device != x.device or out.stride(-1) != 1
          or not out.dtype.is_floating_point):
        raise ValueError(
            f"out must be a floating {shape} tensor on {x.device} with a contiguous last dim; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    pos = {o: (ops.index(o) if o in ops else -1) for o in _OPS}
    _pool_fwd[(B * H, nb)](
        x, out,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, S,
        HEAD_D=d, BLOCK=b, POS_AVG=pos["avg"], POS_MAX=pos["max"], POS_MIN=pos["min"],
        num_warps=4 if b * d >= 4096 else 2,
    )
    return out
