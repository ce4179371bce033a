"""FlashAttention forward that also emits the block max-pooled attention map (the gate's target).

What it computes: `seerlib.reference.pooled_attention`: out = softmax(q k^T * scale) v (causal or
not), and pooled[i, j] = the largest softmax probability inside tile (i, j) of b x b, float32,
0 above the diagonal. The S x S map is never materialized. With a logit soft-cap c (Gemma2), the
scaled scores x become c * tanh(x / c) before the mask and the softmax, in the output and the map
alike (SOFTCAP, a constexpr: without it the kernel is the plain one).

How: inside the online-softmax loop the scaled row maximum of each key tile is known; the row's
final max m and sum l only at the end. Each step stores the tile row maxima (BLOCK_M floats,
contiguous) into a scratch buffer (B*H, nb, S_pad); after the loop the same program reads its rows
back (mostly from L2: it wrote them moments ago) and finishes exp2(rowmax - m) / l, max over the b
rows of each query block. Working memory: the scratch, O(B*H*S*S/b) at most, capped by running
head groups in turn (SCRATCH_BYTES); no O(S^2) buffer.

What it must move and compute, per (batch, head): the dense forward (q, k, v, out; 4 S^2 d / 2
causal FLOPs) plus 2 * 4 * S * nb / 2 bytes of scratch traffic (write then read, causal half):
at S = 32768, b = 64, 32 heads, 1.1 GB against about 19 ms of matmul work, a few percent.

Also the dense attention kernel of seerlib (`attention`): the same kernel with POOLED off.
A program owns QPT consecutive query blocks (BLOCK_M = QPT * b rows); key tiles are b wide so the
tile maxima fall out of the scores directly. Heaviest tiles first; exp2 with log2(e) folded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seerlib.reference import check_softcap, num_blocks

from ._common import (
    check_inputs,
    check_out,
    default_launch,
    float32_buffer,
    last_dim_contiguous,
    score_scales,
    softmax_step,
    tanh,
)

__all__ = ["pooled_attention", "attention", "SCRATCH_BYTES"]

# Largest scratch buffer (bytes) one launch may use; longer inputs run head groups in turn.
SCRATCH_BYTES = 4 << 30


@triton.jit
def _pooled_fwd(
    Q, K, V, O, P, RM,
    qk_scale, cap_log2,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    soz, soh, som,
    spz, sph, spi,
    H, GROUP, S, N_TILES, NB, S_PAD,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    QPT: tl.constexpr,
    CAUSAL: tl.constexpr,
    POOLED: tl.constexpr,
    NB_CHUNK: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK * QPT
    pid_bh = tl.program_id(0)
    t = N_TILES - 1 - tl.program_id(1)  # heaviest tiles first
    z = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP

    q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    o_base = O + z.to(tl.int64) * soz + h.to(tl.int64) * soh
    rm_base = RM + pid_bh.to(tl.int64) * NB * S_PAD

    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < S
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    if CAUSAL:
        lo = t * QPT  # key blocks before the tile's first query block: complete, unmasked
        hi = tl.minimum(lo + QPT, NB)
    else:
        lo = S // BLOCK
        hi = NB

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    for j in tl.range(0, lo):
        cols = j * BLOCK + offs_n
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
        s = tl.dot(q, kT) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2
        if POOLED:
            tl.store(rm_base + j * S_PAD + offs_m, tl.max(s, 1))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, False)

    for j in tl.range(lo, hi):
        cols = j * BLOCK + offs_n
        col_ok = cols < S
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :],
                     other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2
        if CAUSAL:
            keep = offs_m[:, None] >= cols[None, :]
        else:
            keep = col_ok[None, :] & (offs_m[:, None] >= 0)
        s = tl.where(keep, s, float("-inf"))
        if POOLED:
            tl.store(rm_base + j * S_PAD + offs_m, tl.max(s, 1))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, True)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])

    if POOLED:
        tl.debug_barrier()  # the scratch rows written above are read back by other threads
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = 1.0 / l_i
        p_base = P + z.to(tl.int64) * spz + h.to(tl.int64) * sph
        qb = t * QPT + tl.arange(0, QPT)
        for j0 in range(0, NB, NB_CHUNK):
            jj = j0 + tl.arange(0, NB_CHUNK)
            x = tl.load(rm_base + jj[:, None] * S_PAD + offs_m[None, :],
                        mask=(jj[:, None] < hi) & row_ok[None, :], other=float("-inf"))
            prob = tl.exp2(x - m_fin[None, :]) * inv_l[None, :]  # (NB_CHUNK, BLOCK_M)
            tile_max = tl.max(tl.reshape(prob, [NB_CHUNK, QPT, BLOCK]), 2)  # (NB_CHUNK, QPT)
            tl.store(p_base + qb[None, :] * spi + jj[:, None], tile_max,
                     mask=(qb[None, :] < NB) & (jj[:, None] < NB))


def _rows_per_tile(block_size: int) -> int:
    return max(1, 128 // block_size)


def _launch(q, k, v, out, pooled, block_size, causal, scale, softcap, rows_per_tile, num_warps,
            num_stages):
    B, Hq, S, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    b = block_size
    qpt = _rows_per_tile(b) if rows_per_tile is None else int(rows_per_tile)
    if qpt not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_tile must be 1, 2, 4 or 8; got {rows_per_tile}")
    nb = num_blocks(S, b)
    n_tiles = -(-nb // qpt)
    s_pad = n_tiles * qpt * b
    launch = default_launch(qpt * b, d)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    qk_scale, cap_log2 = score_scales(d, scale, softcap)
    nb_chunk = min(64, triton.next_power_of_2(nb))

    if pooled is not None:
        per_kv_head = B * group * nb * s_pad * 4
        kv_chunk = max(1, min(Hkv, SCRATCH_BYTES // max(1, per_kv_head)))
        scratch = torch.empty(B * group * kv_chunk * nb * s_pad, dtype=torch.float32,
                              device=q.device)
    else:
        kv_chunk = Hkv
        scratch = torch.empty(1, dtype=torch.float32, device=q.device)
    for kv0 in range(0, Hkv, kv_chunk):
        kv1 = min(Hkv, kv0 + kv_chunk)
        h0, h1 = kv0 * group, kv1 * group
        qc, kc, vc, oc = q[:, h0:h1], k[:, kv0:kv1], v[:, kv0:kv1], out[:, h0:h1]
        pc = pooled[:, h0:h1] if pooled is not None else scratch
        p_strides = (pc.stride(0), pc.stride(1), pc.stride(2)) if pooled is not None else (0, 0, 0)
        grid = (B * (h1 - h0), n_tiles)
        _pooled_fwd[grid](
            qc, kc, vc, oc, pc, scratch,
            qk_scale, cap_log2,
            qc.stride(0), qc.stride(1), qc.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            oc.stride(0), oc.stride(1), oc.stride(2),
            *p_strides,
            h1 - h0, group, S, n_tiles, nb, s_pad,
            HEAD_D=d, BLOCK=b, QPT=qpt, CAUSAL=bool(causal), POOLED=pooled is not None,
            NB_CHUNK=nb_chunk, SOFTCAP=softcap is not None,
            **launch,
        )


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None,
    causal: bool = True,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    pooled_out: torch.Tensor | None = None,
    rows_per_tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention plus its block max-pooled map, in one forward; the reference's contract.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d); bf16/fp16 on CUDA, fp32 under TRITON_INTERPRET=1.
        block_size: tile size b in {16, 32, 64, 128}, or None for plain attention (no map).
        causal: causal attention; pooled tiles above the diagonal are then 0.
        scale: score scale, 1/sqrt(d) by default.
        out, pooled_out: optional buffers to write into ((B, Hq, S, d) and (B, Hq, nb, nb) float32).
        rows_per_tile, num_warps, num_stages: launch overrides (benchmarks, tests).
        softcap: logit soft-cap c (scaled scores x -> c * tanh(x / c)), or None.
    Returns:
        out: (B, Hq, S, d) in q's dtype.
        pooled: (B, Hq, nb, nb) float32 with nb = ceil(S / b), or None when block_size is None.
    """
    B, Hq, Hkv, S, d = check_inputs(q, k, v, block_size)
    softcap = check_softcap(softcap)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = check_out(out, q)
    pooled = None
    if block_size is not None:
        nb = num_blocks(S, block_size)
        pooled = float32_buffer(pooled_out, (B, Hq, nb, nb), q.device, "pooled_out",
                                "(B, Hq, nb, nb)")
    b = block_size if block_size is not None else 64
    _launch(q, k, v, out, pooled, b, causal, scale, softcap, rows_per_tile, num_warps,
            num_stages)
    return out, pooled


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain (dense) FlashAttention forward: the pooled kernel with the map switched off.

    Args/Returns as `seerlib.reference.attention`:
    q (B, Hq, S, d), k, v (B, Hkv, S, d) -> (B, Hq, S, d); softcap, the logit soft-cap or None.
    """
    return pooled_attention(q, k, v, None, causal, scale, out=out, rows_per_tile=2,
                            num_warps=num_warps, num_stages=num_stages, softcap=softcap)[0]
