"""The prefill gate's block logits from its pooled features in one launch: both projections, the
block RoPE, the scale and q · kᵀ, on and below the block diagonal.

What it computes, per (batch, query head h, query block i, key block j <= i), as
`seerlib.gate.AttnGate.block_scores` does:
1. the gate query of block i: the pooled q (len(q_pool)·d) times q_proj[h] (or the pooled q itself
   when the gate has no Q linear), rotated at token i·b (rotate-half, the rotary's inv_freq and
   attention scaling) and scaled by 1 / sqrt(d_gate);
2. the gate key of block j: the pooled k of kv head h // G (len(k_pool)·d) times k_proj[h],
   rotated at token j·b;
3. their dot product, to (B, Hq, nb, nb) float32. Tiles above the diagonal are not written.

How: one program per (query tile of BLOCK_M blocks, key tile of BLOCK_N blocks, batch · head),
those wholly above the diagonal returning at once, so even SmolLM2's 9 heads at 8k fill the GPU (a
32k row of 512 blocks is 136 tiles a head at 32 × 32). Each program projects its query and key
tiles, each rotary half on its own (two `tl.dot`s over chunks of the input channels), so the
rotation needs no shuffle; the projections are recomputed per tile (len(k_pool)·d · d_gate
multiply-adds a block, small beside one launch's latency), then it writes BLOCK_M × BLOCK_N logits.
The eager gate runs some fifteen launches for this (repeat, two einsums, the rotary's cos / sin,
rotate-half, cat, scale, matmul). Products run in the gate's dtype with float32 accumulation (bf16
gates: within bf16 rounding of the eager logits, which also round the rotated vectors; float32
gates: IEEE products).

Applies where the gate's rotary is the plain rotate-half one over all of d_gate
(`seerlib.kernels.decode_gate_select.fusable`) and d_gate is a power of two >= 32;
`seerlib.ops.gate_logits` takes the gate's own torch path otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device
from .decode_gate_select import fusable

__all__ = ["gate_logits", "supported"]


@triton.jit
def _project(X, W, rows, ok_rows, sxn, swc, C, CHUNK: tl.constexpr, HALF: tl.constexpr,
             BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """(BLOCK_R, HALF) × 2: rows of X (their C input channels) times W's two column halves."""
    g = tl.arange(0, HALF)
    a1 = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_R, HALF], dtype=tl.float32)
    for c0 in range(0, C, CHUNK):
        cc = c0 + tl.arange(0, CHUNK)
        okc = cc < C
        x = tl.load(X + rows[:, None].to(tl.int64) * sxn + cc[None, :],
                    mask=ok_rows[:, None] & okc[None, :], other=0.0)
        w_rows = W + cc[:, None].to(tl.int64) * swc
        w1 = tl.load(w_rows + g[None, :], mask=okc[:, None], other=0.0)
        w2 = tl.load(w_rows + HALF + g[None, :], mask=okc[:, None], other=0.0)
        x = x.to(w1.dtype)
        if IEEE:
            a1 += tl.dot(x, w1, input_precision="ieee")
            a2 += tl.dot(x, w2, input_precision="ieee")
        else:
            a1 += tl.dot(x, w1)
            a2 += tl.dot(x, w2)
    return a1, a2


@triton.jit
def _rotate(a1, a2, rows, INVF, BLOCK: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr,
            rope_scale, scale):
    """Rotate-half at token rows · BLOCK: (a1 cos - a2 sin, a2 cos + a1 sin), times scale."""
    if ROPE:
        angle = (rows * BLOCK).to(tl.float32)[:, None] * tl.load(INVF + tl.arange(0, HALF))[None, :]
        cos = tl.cos(angle) * rope_scale
        sin = tl.sin(angle) * rope_scale
        return (a1 * cos - a2 * sin) * scale, (a2 * cos + a1 * sin) * scale
    return a1 * scale, a2 * scale


@triton.jit
def _gate_logits(
    QP, WQ, KP, WK, INVF, OUT,
    sqz, sqh, sqn, swqh, swqc, skz, skh, skn, swkh, swkc, soz, soh, som,
    HQ, GROUP, NB, CQ, CK,
    rope_scale, qk_scale,
    HALF: tl.constexpr,
    Q_LINEAR: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    if n0 > m0 + BLOCK_M - 1:  # a tile wholly above the block diagonal: not needed
        return
    zh = tl.program_id(2)
    z = zh // HQ
    h = zh % HQ
    rows = m0 + tl.arange(0, BLOCK_M)
    ok_m = rows < NB
    g = tl.arange(0, HALF)
    q_base = QP + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
    if Q_LINEAR:
        q1, q2 = _project(q_base, WQ + h.to(tl.int64) * swqh, rows, ok_m, sqn, swqc, CQ, CHUNK,
                          HALF, BLOCK_M, IEEE)
    else:  # the pooled q is the gate query (len(q_pool) * d == d_gate)
        q_rows = q_base + rows[:, None].to(tl.int64) * sqn
        q1 = tl.load(q_rows + g[None, :], mask=ok_m[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF + g[None, :], mask=ok_m[:, None], other=0.0).to(tl.float32)
    r1, r2 = _rotate(q1, q2, rows, INVF, BLOCK, HALF, ROPE, rope_scale, qk_scale)
    # the products in the gate's dtype, as the eager matmul takes them
    wdt = WK.dtype.element_ty
    r1, r2 = r1.to(wdt), r2.to(wdt)

    k_base = KP + z.to(tl.int64) * skz + (h // GROUP).to(tl.int64) * skh
    o_rows = OUT + z.to(tl.int64) * soz + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * som
    cols = n0 + tl.arange(0, BLOCK_N)
    ok_n = cols < NB
    k1, k2 = _project(k_base, WK + h.to(tl.int64) * swkh, cols, ok_n, skn, swkc, CK, CHUNK, HALF,
                      BLOCK_N, IEEE)
    k1, k2 = _rotate(k1, k2, cols, INVF, BLOCK, HALF, ROPE, rope_scale, 1.0)
    k1, k2 = k1.to(wdt), k2.to(wdt)
    if IEEE:
        s = tl.dot(r1, tl.trans(k1), input_precision="ieee")
        s += tl.dot(r2, tl.trans(k2), input_precision="ieee")
    else:
        s = tl.dot(r1, tl.trans(k1))
        s += tl.dot(r2, tl.trans(k2))
    tl.store(o_rows + cols[None, :], s, mask=ok_m[:, None] & ok_n[None, :])


def supported(gate) -> bool:
    """Whether `gate_logits` computes this gate: a plain rotary (or none) over all of d_gate and a
    power-of-two d_gate >= 32 (the logits' dot takes half of it, at least 16, a side)."""
    dg = gate.d_gate
    return fusable(gate) and dg >= 32 and not dg & (dg - 1)


def gate_logits(gate, q_pooled: torch.Tensor, k_pooled: torch.Tensor, *, block_m: int = 32,
                block_n: int = 32, chunk: int = 64, num_warps: int | None = None) -> torch.Tensor:
    """The gate's block logits (`AttnGate.block_scores`) in one launch.

    Args:
        gate: a `seerlib.gate.AttnGate` (`supported(gate)`).
        q_pooled: (B, Hq, nb, len(q_pool) * d); k_pooled: (B, Hkv, nb, len(k_pool) * d), as
            `ops.pool_blocks` gives them (a contiguous last dim).
        block_m, block_n: query and key blocks a tile; chunk: input channels a projection step
            (powers of two >= 16); num_warps: the launch's (default 4).
    Returns:
        (B, Hq, nb, nb) float32 logits on and below the block diagonal; the entries above it
        unspecified (`ops.select_index` and `select_blocks` ignore them).
    """
    if not supported(gate):
        raise ValueError("this gate's rotary or d_gate is not one the fused gate logits compute "
                         "(see supported); use AttnGate.block_scores")
    if q_pooled.dim() != 4 or k_pooled.dim() != 4:
        raise ValueError(f"q_pooled and k_pooled must be 4-D; got {tuple(q_pooled.shape)} and "
                         f"{tuple(k_pooled.shape)}")
    B, Hq, nb, cq = q_pooled.shape
    Hkv, d, dg = gate.num_kv_heads, gate.head_dim, gate.d_gate
    if (Hq, cq) != (gate.num_heads, len(gate.q_pool) * d):
        raise ValueError(f"q_pooled must be (B, {gate.num_heads}, nb, {len(gate.q_pool) * d}); "
                         f"got {tuple(q_pooled.shape)}")
    ck = len(gate.k_pool) * d
    if tuple(k_pooled.shape) != (B, Hkv, nb, ck):
        raise ValueError(f"k_pooled must be (B, Hkv, nb, len(k_pool) * d) = {(B, Hkv, nb, ck)}; "
                         f"got {tuple(k_pooled.shape)}")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v > 256 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two in 16 .. 256; got {v!r}")
    wq = gate.q_proj.detach() if gate.q_proj is not None else None
    wk = gate.k_proj.detach()
    check_kernel_device("fused gate logits", q_pooled=q_pooled, k_pooled=k_pooled, k_proj=wk)
    q_pooled = q_pooled if q_pooled.stride(-1) == 1 else q_pooled.contiguous()
    k_pooled = k_pooled if k_pooled.stride(-1) == 1 else k_pooled.contiguous()
    wk = wk if wk.stride(-1) == 1 else wk.contiguous()
    if wq is not None:
        wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    out = torch.empty(B, Hq, nb, max(nb, 1), dtype=torch.float32, device=q_pooled.device)
    out = out[..., :nb]
    if B * Hq * nb == 0:
        return out
    rope = gate.rope is not None
    invf = gate.rope.rotary.inv_freq.float() if rope else out  # unread without ROPE
    scaling = float(gate.rope.rotary.attention_scaling) if rope else 1.0
    wq_arg = wq if wq is not None else wk  # unread without a Q linear
    launch = {} if num_warps is None else {"num_warps": num_warps}
    _gate_logits[(triton.cdiv(nb, block_m), triton.cdiv(nb, block_n), B * Hq)](
        q_pooled, wq_arg, k_pooled, wk, invf, out,
        q_pooled.stride(0), q_pooled.stride(1), q_pooled.stride(2),
        wq_arg.stride(0), wq_arg.stride(1),
        k_pooled.stride(0), k_pooled.stride(1), k_pooled.stride(2), wk.stride(0), wk.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, nb, cq, ck, scaling, 1.0 / math.sqrt(dg),
        HALF=dg // 2, Q_LINEAR=wq is not None, ROPE=rope, BLOCK=gate.block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, IEEE=wk.dtype == torch.float32, **launch,
    )
    return out
