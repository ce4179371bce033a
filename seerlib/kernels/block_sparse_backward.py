"""Backward of block-sparse causal attention over the kept tiles only, and its autograd function.

What it computes: dq, dk, dv of `seerlib.reference.block_sparse_attention` (exactly what autograd
gives through the reference), from the forward's output O and row log2 sum-exp (LSE):
    P = exp2(S * qk_scale - LSE)    (the forward's probabilities, recomputed per kept tile)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O)
    dQ = scale * dS K,   dK = scale * dS^T Q
With a logit soft-cap c (SOFTCAP, a constexpr; off, the kernels are the plain ones), the scores
are c * tanh(x / c) of the scaled x: P is recomputed from them, and dS is taken through the cap,
whose derivative is 1 - tanh^2(x / c): dS = P * (dP - delta) * (1 - T^2), T = tanh(x / c).
Only tiles the forward kept are visited; K/V gradients are summed over the query heads of a kv
group inside the kernel (GQA-native: nothing repeated, no atomics, deterministic).

How, in two launches (the FlashAttention-2 structure):
1. `_bwd_dkdv`, one program per (batch, kv head, key block j): K_j and V_j stay in registers while
   it walks, for each query head of the group, the query blocks that kept j. That list is the
   transposed index (`build_key_index`: the mask flipped and transposed, built by the same
   builder as the forward's), whose last entry per row is the diagonal tile, the only one that
   needs the causal mask.
2. `_bwd_dq`, one program per (batch, query head, query tile) over the forward's own BlockIndex
   (row-half bits and all, as the forward reads it).
delta = rowsum(dO * O) is a third, small launch (`_bwd_delta`), run first.

What it must move and compute at n kept tiles of b x b per (batch, query head): reads q, k, v,
dO, O once per kept tile visit (twice: once per pass) and writes dq, dk, dv once; FLOPs
2.5x the forward's (five b x b x d matmuls per kept tile: QK^T and dO V^T twice, dV, dK, dQ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seerlib.reference import check_softcap, default_scale, num_blocks

from ._common import (
    ENTRY_BLOCK_MASK_TL,
    ENTRY_SHIFT_TL,
    check_inputs,
    check_out,
    default_launch,
    last_dim_contiguous,
    score_scales,
    tanh,
)
from .block_index import BlockIndex, as_block_mask, build_block_index, build_key_index
from .block_sparse_attention import block_sparse_attention

__all__ = ["block_sparse_backward", "BlockSparseAttention", "block_sparse_attention_trainable"]


# Launch settings of the two passes, measured best at 32k tokens, 90% sparsity, block 64 on an
# H200 for both d 64 (9/3 heads) and d 128 (32/8) (bench/results/backward-H200-2026-12-03.md):
# 8 warps were 1.3-1.7x slower in both passes; 3 stages best for dK/dV, 2 for dQ.
DKDV_LAUNCH = {"num_warps": 4, "num_stages": 3}
DQ_LAUNCH = {"num_warps": 4, "num_stages": 2}
DELTA_ROWS = 64  # rows per program of the delta pass


@triton.jit
def _bwd_delta(O, DO, DELTA, soz, soh, som, sdoz, sdoh, sdom, H, S,
               HEAD_D: tl.constexpr, ROWS: tl.constexpr):
    """delta = rowsum(dO * O) in float32, (B*H, S), one read of each."""
    pid_bh = tl.program_id(0)
    z = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_D)
    ok = offs_m < S
    o = tl.load(O + z.to(tl.int64) * soz + h.to(tl.int64) * soh + offs_m[:, None] * som
                + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + z.to(tl.int64) * sdoz + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom
                 + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, delta, mask=ok)


@triton.jit
def _bwd_dkdv_tile(q_base, do_base, lse_base, delta_base, i, k, v, dk, dv, qk_scale, cap_log2,
                   sqm, sdom, S, offs_n, offs_d,
                   BLOCK: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    """One kept tile (query block i, this key block): dV += P^T dO, dK += dS^T Q (unscaled)."""
    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :])
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :])
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    else:
        row_ok = offs_m < S
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    # Transposed scores (key rows x query columns), so P^T and dS^T need no transpose.
    sT = tl.dot(k, tl.trans(q)) * qk_scale
    if SOFTCAP:
        tT = tanh(sT)
        sT = tT * cap_log2
    pT = tl.exp2(sT - lse[None, :])
    if CAUSAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KCOUNTS, KNFULL, KENTRIES,
    qk_scale, cap_log2, sm_scale,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    sdoz, sdoh, sdom,
    sdkz, sdkh, sdkn,
    sdvz, sdvh, sdvn,
    H, GROUP, S, NB, L,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    EVEN: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid % NB  # key block; low blocks (kept by the most query blocks) launch first
    zkv = pid // NB
    hkv = H // GROUP
    z = zkv // hkv
    kvh = zkv % hkv
    a = NB - 1 - j  # the key block's row in the flipped, transposed index

    offs_n = j * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < S
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_D], dtype=tl.float32)

    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = z * H + h
        q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
        do_base = DO + z.to(tl.int64) * sdoz + h.to(tl.int64) * sdoh
        lse_base = LSE + bh.to(tl.int64) * S
        delta_base = DELTA + bh.to(tl.int64) * S
        meta = bh.to(tl.int64) * NB + a
        count = tl.load(KCOUNTS + meta)
        n_full = tl.load(KNFULL + meta)
        e_base = KENTRIES + meta * L
        # Query blocks i > j: the whole tile is causal-visible; only the partial last query
        # block (when S is not a multiple of b) needs its rows masked.
        for n in tl.range(0, n_full):
            i = NB - 1 - (tl.load(e_base + n) & ENTRY_BLOCK_MASK_TL)
            dk, dv = _bwd_dkdv_tile(q_base, do_base, lse_base, delta_base, i, k, v, dk, dv,
                                    qk_scale, cap_log2, sqm, sdom, S, offs_n, offs_d,
                                    BLOCK=BLOCK, CAUSAL=False, EVEN=EVEN, SOFTCAP=SOFTCAP)
        # The diagonal tile (i == j), if kept: causal mask.
        if count > n_full:
            dk, dv = _bwd_dkdv_tile(q_base, do_base, lse_base, delta_base, j, k, v, dk, dv,
                                    qk_scale, cap_log2, sqm, sdom, S, offs_n, offs_d,
                                    BLOCK=BLOCK, CAUSAL=True, EVEN=EVEN, SOFTCAP=SOFTCAP)

    dk_base = DK + z.to(tl.int64) * sdkz + kvh.to(tl.int64) * sdkh
    dv_base = DV + z.to(tl.int64) * sdvz + kvh.to(tl.int64) * sdvh
    tl.store(dk_base + offs_n[:, None] * sdkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_base + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _bwd_dq_tile(k_base, v_base, e, q, do, lse, delta, dq, qk_scale, cap_log2, skn, svn, S,
                 offs_m, offs_n, offs_d, row_blk,
                 BLOCK: tl.constexpr, QPT: tl.constexpr, MASKED: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """One kept entry (key block e & mask, row-half bits e >> 24): dQ += dS K (unscaled)."""
    cols = (e & ENTRY_BLOCK_MASK_TL) * BLOCK + offs_n
    if MASKED:
        col_ok = cols < S
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if SOFTCAP:
        t = tanh(s)
        s = t * cap_log2
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        keep = offs_m[:, None] >= cols[None, :]
        if QPT > 1:
            keep = keep & ((((e >> ENTRY_SHIFT_TL) >> row_blk) & 1)[:, None] != 0)
        p = tl.where(keep, p, 0.0)
    elif QPT > 1:
        p = tl.where((((e >> ENTRY_SHIFT_TL) >> row_blk) & 1)[:, None] != 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, COUNTS, NFULL, ENTRIES,
    qk_scale, cap_log2, sm_scale,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    sdoz, sdoh, sdom,
    sdqz, sdqh, sdqm,
    H, GROUP, S, N_TILES, L,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    QPT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK * QPT
    pid_bh = tl.program_id(0)
    t = N_TILES - 1 - tl.program_id(1)  # heaviest tiles first
    z = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP

    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < S
    q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
    do_base = DO + z.to(tl.int64) * sdoz + h.to(tl.int64) * sdoh
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)

    meta = pid_bh.to(tl.int64) * N_TILES + t
    count = tl.load(COUNTS + meta)
    n_full = tl.load(NFULL + meta)
    e_base = ENTRIES + meta * L
    row_blk = tl.arange(0, BLOCK_M) // BLOCK
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    # Key blocks strictly before the tile's first query block: complete, no causal mask.
    for n in tl.range(0, n_full):
        dq = _bwd_dq_tile(k_base, v_base, tl.load(e_base + n), q, do, lse, delta, dq, qk_scale,
                          cap_log2, skn, svn, S, offs_m, offs_n, offs_d, row_blk,
                          BLOCK=BLOCK, QPT=QPT, MASKED=False, SOFTCAP=SOFTCAP)
    # The key blocks that meet the diagonal (and the partial last block): masked, last.
    for n in tl.range(n_full, count):
        dq = _bwd_dq_tile(k_base, v_base, tl.load(e_base + n), q, do, lse, delta, dq, qk_scale,
                          cap_log2, skn, svn, S, offs_m, offs_n, offs_d, row_blk,
                          BLOCK=BLOCK, QPT=QPT, MASKED=True, SOFTCAP=SOFTCAP)

    tl.store(DQ + z.to(tl.int64) * sdqz + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def block_sparse_backward(
    q, k, v, out, lse, dout, index: BlockIndex, key_index: BlockIndex, block_size: int,
    scale: float | None = None, *, dq=None, dk=None, dv=None, launch_dkdv: dict | None = None,
    launch_dq: dict | None = None, softcap: float | None = None,
):
    """dq, dk, dv of block-sparse causal attention, over the forward's kept tiles only.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d); out: the forward's (B, Hq, S, d) output;
        lse: its (B, Hq, S) float32 row log2 sum-exp (`block_sparse_attention(..., lse=)`);
        dout: (B, Hq, S, d), the gradient of out.
        index: the forward's BlockIndex; key_index: `build_key_index` of the same mask
            (rows_per_tile 1).
        dq, dk, dv: optional output buffers shaped like q, k, v.
        softcap: the forward's logit soft-cap c, or None (it must be the forward's: lse is of the
            capped scores).
        launch_dkdv, launch_dq: num_warps / num_stages overrides of the two launches (benchmarks).
    Returns:
        (dq, dk, dv) in the dtypes of q, k, v; dk and dv summed over each kv group.
    """
    B, Hq, Hkv, S, d = check_inputs(q, k, v, block_size)
    softcap = check_softcap(softcap)
    for name, idx in (("index", index), ("key_index", key_index)):
        if (idx.shape != (B, Hq) or idx.block_size != block_size or idx.seq_len != S
                or idx.counts.device != q.device):
            raise ValueError(
                f"{name} was built for (B, H) = {idx.shape}, block {idx.block_size}, "
                f"S = {idx.seq_len} on {idx.counts.device}; got {(B, Hq)}, block {block_size}, "
                f"S = {S} on {q.device}")
    if key_index.rows_per_tile != 1:
        raise ValueError(f"key_index must have rows_per_tile 1; got {key_index.rows_per_tile}")
    for name, t in (("out", out), ("dout", dout)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must be (B, Hq, S, d) = {tuple(q.shape)}; got "
                             f"{tuple(t.shape)}")
    if lse.shape != (B, Hq, S) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous (B, Hq, S) = {(B, Hq, S)} float32 tensor; "
                         f"got {tuple(lse.shape)} {lse.dtype}")
    q, k, v, dout = (last_dim_contiguous(t) for t in (q, k, v, dout))
    dq, dk, dv = check_out(dq, q, "dq"), check_out(dk, k, "dk"), check_out(dv, v, "dv")
    out = last_dim_contiguous(out)
    delta = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    _bwd_delta[(B * Hq, triton.cdiv(S, DELTA_ROWS))](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), Hq, S, HEAD_D=d, ROWS=DELTA_ROWS,
    )
    sm_scale = default_scale(d, scale)
    qk_scale, cap_log2 = score_scales(d, scale, softcap)
    nb = key_index.counts.shape[-1]
    launch = {**DKDV_LAUNCH, **(launch_dkdv or {})}
    _bwd_dkdv[(B * Hkv * nb,)](
        q, k, v, dout, lse, delta, dk, dv,
        key_index.counts, key_index.n_full, key_index.entries,
        qk_scale, cap_log2, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, Hq // Hkv, S, nb, key_index.entries.shape[-1],
        HEAD_D=d, BLOCK=block_size, EVEN=S % block_size == 0, SOFTCAP=softcap is not None,
        **launch,
    )
    qpt = index.rows_per_tile
    n_tiles = index.counts.shape[-1]
    _bwd_dq[(B * Hq, n_tiles)](
        q, k, v, dout, lse, delta, dq, index.counts, index.n_full, index.entries,
        qk_scale, cap_log2, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, Hq // Hkv, S, n_tiles, index.entries.shape[-1],
        HEAD_D=d, BLOCK=block_size, QPT=qpt, SOFTCAP=softcap is not None,
        **{**(DQ_LAUNCH if qpt == 1 else default_launch(qpt * block_size, d)),
           **(launch_dq or {})},
    )
    return dq, dk, dv


class BlockSparseAttention(torch.autograd.Function):
    """Block-sparse causal attention with the kernels' backward (`block_sparse_attention_trainable`
    is the entry point)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask_or_index, block_size, scale, sync_free, softcap):
        B, Hq, Hkv, S, d = check_inputs(q, k, v, block_size)
        if isinstance(block_mask_or_index, BlockIndex):
            index = keys_from = block_mask_or_index
        else:
            # a (counts, indices) pair becomes a mask once, for both indexes
            keys_from = as_block_mask(block_mask_or_index, B, Hq, num_blocks(S, block_size))
            index = build_block_index(keys_from, B, Hq, S, block_size,
                                      1 if sync_free else None, sync_free=sync_free)
        # Sync-free always: its rows_per_tile is fixed at 1, so nothing needs the host to read the
        # device; the entries are sized for the longest possible list (4 * B * H * nb^2 bytes).
        key_index = build_key_index(keys_from, B, Hq, S, block_size, sync_free=True)
        lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
        out = block_sparse_attention(q, k, v, index, block_size, scale, lse=lse, softcap=softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.indexes = (index, key_index)
        ctx.block_size, ctx.scale, ctx.softcap = block_size, scale, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        index, key_index = ctx.indexes
        dq, dk, dv = block_sparse_backward(q, k, v, out, lse, dout, index, key_index,
                                           ctx.block_size, ctx.scale, softcap=ctx.softcap)
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention_trainable(q, k, v, block_mask_or_index, block_size: int,
                                     scale: float | None = None, *, sync_free: bool = False,
                                     softcap: float | None = None):
    """`block_sparse_attention` with a backward through the kernels (dq, dk, dv over kept tiles).

    Args and returns as `block_sparse_attention`: q (B, Hq, S, d), k, v (B, Hkv, S, d), a bool
    mask (B, Hq, nb, nb), (counts, indices) or a BlockIndex -> out (B, Hq, S, d); softcap, the
    logit soft-cap c or None. The mask gets no gradient (it is a selection).
    """
    return BlockSparseAttention.apply(q, k, v, block_mask_or_index, block_size, scale, sync_free,
                                      softcap)
