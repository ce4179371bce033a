"""FlashAttention forward that also emits the decode gate's ground truth (SeerAttention-R).

What it computes: `seerlib.reference.attention` (causal, or not) and
`seerlib.reference.decode_block_truth`: for query row t and key block j, the largest softmax
probability of row t over the columns of block j, the max over the query heads of the kv group,
each row normalized to sum 1 over j; 0 for blocks wholly after t. The S x S map is never formed.

How, in two launches per head chunk:
1. `_truth_fwd`, one program per (batch, query head, BLOCK_M query rows), key tiles max(b, 64)
   wide: the usual online-softmax forward (full tiles unmasked, the diagonal ones masked). Each
   step stores the rows' maxima of the raw log2-domain scores over each b-wide key block
   (BLOCK_M fp32 per block, contiguous) into a scratch buffer; at the end each row's log2
   sum-exp lse = m + log2(l). The scratch is the (B, Hq, S, nb) buffer of block maxima, packed
   per row tile: tile t keeps only the key blocks it can see, [0, hi_t), laid out
   (hi_t, BLOCK_M), so a causal input needs half of it.
2. `_truth_finish`, one program per (batch, kv head, BLOCK_M rows): exp2(tilemax - lse) (the
   probability), max over the group's heads, row sums over j, then the normalized rows, zeros
   above the causal boundary, into truth (B, Hkv, S, nb). A Triton kernel and not torch ops:
   it reads only the visible half of the scratch (torch would read the unwritten half and need
   a -inf fill first) and makes no temporaries the size of the scratch.

What it must move and compute, per (batch, query head), causal: the dense forward, 4 S^2 d / 2
FLOPs, plus scratch 4 S (nb + BLOCK_M / b) / 2 bytes written then read once, and per kv head the
truth 4 S nb bytes (written, half read back to normalize, written again). At S = 32768, b = 64,
32/8 heads, d 128: 8.8 TFLOP (about 19 ms at 470 TFLOP/s) against 1.1 GB of scratch and 0.54 GB of
truth, about 3.2 GB of traffic (0.75 ms at 4.3 TB/s); at b = 16 (nb = 2048) 4.3 GB of scratch
(run in two head chunks, SCRATCH_BYTES) and 2.1 GB of truth, about 13 GB of traffic.
Measured on the H200 there (bf16, batch 1): dense forward 18.3 ms; this op 19.5 ms at b = 64
(+7%; forward 17.7, finish 0.86), 22.0 at b = 32 (+18%), 25.0 at b = 16 (+37%; forward 21.3,
finish 3.7); peak extra memory, scratch and outputs, 2.0 / 3.5 / 6.0 GiB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seerlib.reference import check_block_size, check_softcap, num_blocks

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
from .pooled_attention import SCRATCH_BYTES

__all__ = ["decode_pooled_attention"]

# Narrowest key tile of the forward: b = 16 or 32 reads 64 keys a step and splits the scores into
# blocks for the maxima (H200, S 32k, b 16: forward 27.7 ms with 16-wide steps, 21.3 with 64).
KEY_TILE_MIN = 64


@triton.jit
def _store_block_maxima(s, rm_base, jt, hi, offs_n, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                        KEY_TILE: tl.constexpr, LAST: tl.constexpr):
    """Store the rows' maximum of each b-wide key block of the scores s (BLOCK_M, KEY_TILE):
    one contiguous BLOCK_M row per block; LAST: only blocks < hi (the tile's share ends there)."""
    rows = tl.arange(0, BLOCK_M)
    if KEY_TILE == BLOCK:
        blk_max = tl.max(s, 1)
        if LAST:
            tl.store(rm_base + jt * BLOCK_M + rows, blk_max, mask=(rows >= 0) & (jt < hi))
        else:
            tl.store(rm_base + jt * BLOCK_M + rows, blk_max)
    else:
        for sub in tl.static_range(KEY_TILE // BLOCK):
            in_blk = (offs_n >= sub * BLOCK) & (offs_n < sub * BLOCK + BLOCK)
            blk_max = tl.max(tl.where(in_blk[None, :], s, float("-inf")), 1)
            j = jt * (KEY_TILE // BLOCK) + sub
            if LAST:
                tl.store(rm_base + j * BLOCK_M + rows, blk_max, mask=(rows >= 0) & (j < hi))
            else:
                tl.store(rm_base + j * BLOCK_M + rows, blk_max)


@triton.jit
def _truth_fwd(
    Q, K, V, O, RM, LSE, TILES,
    qk_scale, cap_log2,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    soz, soh, som,
    H, GROUP, SQ, SK, OFFSET, N_TILES, NB, RM_HEAD, S_PAD,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    KEY_TILE: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    t = N_TILES - 1 - tl.program_id(1)  # heaviest tiles first
    z = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP

    q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    o_base = O + z.to(tl.int64) * soz + h.to(tl.int64) * soh
    rm_base = RM + pid_bh.to(tl.int64) * RM_HEAD + tl.load(TILES + t)  # this tile's (hi, BLOCK_M)

    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows; their key positions add OFFSET
    offs_n = tl.arange(0, KEY_TILE)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < SQ
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    hi = tl.load(TILES + N_TILES + t).to(tl.int32)  # key blocks this tile sees: [0, hi)
    if CAUSAL:
        lo = (t * BLOCK_M + OFFSET + 1) // KEY_TILE  # key tiles wholly before the first row
    else:
        lo = SK // KEY_TILE  # full key tiles
    hi_kt = (hi * BLOCK + KEY_TILE - 1) // KEY_TILE

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    for jt in tl.range(0, lo):
        cols = jt * KEY_TILE + offs_n
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
        s = tl.dot(q, kT) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2
        _store_block_maxima(s, rm_base, jt, hi, offs_n, BLOCK, BLOCK_M, KEY_TILE, False)
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, False)

    for jt in tl.range(lo, hi_kt):
        cols = jt * KEY_TILE + offs_n
        col_ok = cols < SK
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :],
                     other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2
        if CAUSAL:
            keep = (offs_m[:, None] + OFFSET >= cols[None, :]) & col_ok[None, :]
        else:
            keep = col_ok[None, :] & (offs_m[:, None] >= 0)
        s = tl.where(keep, s, float("-inf"))
        _store_block_maxima(s, rm_base, jt, hi, offs_n, BLOCK, BLOCK_M, KEY_TILE, True)
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, True)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(LSE + pid_bh.to(tl.int64) * S_PAD + offs_m, m_fin + tl.log2(l_i))


@triton.jit
def _truth_finish(
    RM, LSE, TILES, T,
    stz, sth, stm,
    HKV, GROUP, SQ, SK, OFFSET, N_TILES, NB, RM_HEAD, S_PAD,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NB_CHUNK: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    z = pid // HKV
    kvh = pid % HKV
    bh0 = (z * HKV * GROUP + kvh * GROUP).to(tl.int64)  # the group's first query head (flat)

    rows = tl.arange(0, BLOCK_M)
    offs_m = t * BLOCK_M + rows
    row_ok = offs_m < SQ
    if CAUSAL:
        last_blk = (offs_m + OFFSET) // BLOCK  # the row's last visible key block
    else:
        last_blk = tl.full([BLOCK_M], 0, tl.int32) + (SK - 1) // BLOCK
    rm_base = RM + bh0 * RM_HEAD + tl.load(TILES + t)
    lse_base = LSE + bh0 * S_PAD + offs_m
    t_base = T + z.to(tl.int64) * stz + kvh.to(tl.int64) * sth + offs_m.to(tl.int64) * stm
    hi = tl.load(TILES + N_TILES + t).to(tl.int32)

    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, hi, NB_CHUNK):
        jj = j0 + tl.arange(0, NB_CHUNK)
        seen = (jj[:, None] <= last_blk[None, :]) & row_ok[None, :]  # (NB_CHUNK, BLOCK_M)
        best = tl.zeros([NB_CHUNK, BLOCK_M], dtype=tl.float32)
        for g in range(GROUP):
            x = tl.load(rm_base + g * RM_HEAD + jj[:, None] * BLOCK_M + rows[None, :], mask=seen,
                        other=float("-inf"))
            lse = tl.load(lse_base + g * S_PAD)
            best = tl.maximum(best, tl.exp2(x - lse[None, :]))
        total += tl.sum(best, 0)
        tl.store(t_base[None, :] + jj[:, None], best, mask=seen)

    tl.debug_barrier()  # the rows stored above are read back, maybe by other threads
    inv = 1.0 / tl.maximum(total, 1.1754943508222875e-38)
    for j0 in range(0, NB, NB_CHUNK):
        jj = j0 + tl.arange(0, NB_CHUNK)
        seen = (jj[:, None] <= last_blk[None, :]) & row_ok[None, :]
        best = tl.load(t_base[None, :] + jj[:, None], mask=seen, other=0.0)
        tl.store(t_base[None, :] + jj[:, None], best * inv[None, :],
                 mask=(jj[:, None] < NB) & row_ok[None, :])


def _rows_per_program(block_size: int) -> int:
    return max(1, 128 // block_size) * block_size


def _tile_blocks(t, block_m, Sq, Sk, block_size, causal):
    """hi: the key blocks [0, hi) the rows of tile t (a tensor of tile numbers) can see."""
    nb = num_blocks(Sk, block_size)
    if not causal:
        return torch.full_like(t, nb)
    last = torch.clamp((t + 1) * block_m - 1, max=Sq - 1) + (Sk - Sq)  # last row's key position
    return torch.clamp(last // block_size + 1, max=nb)


def _tile_table(n_tiles, block_m, Sq, Sk, block_size, causal, device):
    """Which key blocks each row tile sees and where its part of the scratch starts.

    Built on `device` (a host-to-device copy would sync the stream); the host computes only
    the total, from the same formula.

    Returns:
        table: (2, n_tiles) int64 on `device`: row 0 the tile's start in a head's scratch, row 1
            hi, the number of key blocks [0, hi) the tile's rows can see.
        head_numel: scratch elements per query head, sum(hi) * block_m.
    """
    args = (block_m, Sq, Sk, block_size, causal)
    head_numel = int(_tile_blocks(torch.arange(n_tiles), *args).sum()) * block_m
    hi = _tile_blocks(torch.arange(n_tiles, device=device), *args)
    return torch.stack([(torch.cumsum(hi, 0) - hi) * block_m, hi]), head_numel


def _scratch(numel: int, device) -> torch.Tensor:
    """Working memory the kernels write before they read it (tests poison it with NaN)."""
    return torch.empty(max(1, numel), dtype=torch.float32, device=device)


def _check(q, k, v, block_size):
    """check_inputs with q allowed fewer rows than k: q is checked against k's last Sq keys."""
    check_block_size(block_size)  # required here (check_inputs reads None as "no map")
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        Sq, Sk = q.shape[2], k.shape[2]
        if Sq > Sk:
            raise ValueError(
                f"q has {Sq} query rows but k only {Sk} keys; the queries sit at the last Sq "
                "key positions, so Sq <= S is needed"
            )
        k, v = k[:, :, Sk - Sq:], v[:, :, Sk - Sq:]
    return check_inputs(q, k, v, block_size)


def decode_pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    truth_out: torch.Tensor | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention plus the decode gate's ground truth, in one forward (no S x S map).

    Args:
        q: (B, Hq, Sq, d), queries at the last Sq key positions (Sq = S: a causal prefill).
        k, v: (B, Hkv, S, d), Hkv dividing Hq; bf16/fp16 on CUDA, fp32/fp16 under
            TRITON_INTERPRET=1; d in {16, 32, 64, 128}.
        block_size: key block b in {16, 32, 64, 128}.
        causal: query row i sees keys <= S - Sq + i; False: every row sees all S keys.
        scale: score scale, 1/sqrt(d) by default.
        softcap: logit soft-cap c (scaled scores x -> c * tanh(x / c) before the mask and the
            softmax, in the output and the truth alike), or None.
        out, truth_out: optional buffers to write into ((B, Hq, Sq, d) in q's dtype and
            (B, Hkv, Sq, nb) float32, last dim contiguous).
        rows_per_program: query rows per program, a power-of-two multiple of b (tests);
            128 by default.
    Returns:
        out: (B, Hq, Sq, d) in q's dtype, = `seerlib.reference.attention`.
        truth: (B, Hkv, Sq, nb) float32, nb = ceil(S / b), =
            `seerlib.reference.decode_block_truth(q, k, b, scale, softcap=softcap)` (causal):
            rows sum to 1,
            0 on blocks wholly after the row.
    """
    B, Hq, Hkv, Sq, d = _check(q, k, v, block_size)
    softcap = check_softcap(softcap)
    Sk = k.shape[2]
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = check_out(out, q)
    b, group = block_size, Hq // Hkv
    nb = num_blocks(Sk, b)
    truth = float32_buffer(truth_out, (B, Hkv, Sq, nb), q.device, "truth_out",
                           "(B, Hkv, Sq, nb)")

    block_m = _rows_per_program(b) if rows_per_program is None else int(rows_per_program)
    if block_m <= 0 or block_m % b or block_m & (block_m - 1):
        raise ValueError(
            f"rows_per_program must be a power-of-two multiple of block_size {b}; got "
            f"{rows_per_program}"
        )
    n_tiles = -(-Sq // block_m)
    s_pad = n_tiles * block_m
    tiles, head_numel = _tile_table(n_tiles, block_m, Sq, Sk, b, causal, q.device)
    qk_scale, cap_log2 = score_scales(d, scale, softcap)
    key_tile = max(b, KEY_TILE_MIN)
    nb_chunk = max(1, min(triton.next_power_of_2(nb), 4096 // block_m))
    launch = default_launch(block_m, d)

    per_kv_head = B * group * head_numel * 4  # bytes of scratch
    kv_chunk = max(1, min(Hkv, SCRATCH_BYTES // max(1, per_kv_head)))
    rm = _scratch(B * group * kv_chunk * head_numel, q.device)
    lse = _scratch(B * group * kv_chunk * s_pad, q.device)
    for kv0 in range(0, Hkv, kv_chunk):
        kv1 = min(Hkv, kv0 + kv_chunk)
        h0, h1 = kv0 * group, kv1 * group
        qc, oc = q[:, h0:h1], out[:, h0:h1]
        kc, vc, tc = k[:, kv0:kv1], v[:, kv0:kv1], truth[:, kv0:kv1]
        shape = (h1 - h0, group, Sq, Sk, Sk - Sq, n_tiles, nb, head_numel, s_pad)
        _truth_fwd[(B * (h1 - h0), n_tiles)](
            qc, kc, vc, oc, rm, lse, tiles,
            qk_scale, cap_log2,
            qc.stride(0), qc.stride(1), qc.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            oc.stride(0), oc.stride(1), oc.stride(2),
            *shape,
            HEAD_D=d, BLOCK=b, BLOCK_M=block_m, KEY_TILE=key_tile, CAUSAL=bool(causal),
            SOFTCAP=softcap is not None, **launch,
        )
        _truth_finish[(B * (kv1 - kv0), n_tiles)](
            rm, lse, tiles, tc,
            tc.stride(0), tc.stride(1), tc.stride(2),
            kv1 - kv0, *shape[1:],
            BLOCK=b, BLOCK_M=block_m, NB_CHUNK=nb_chunk, CAUSAL=bool(causal),
            num_warps=4,
        )
    return out, truth
