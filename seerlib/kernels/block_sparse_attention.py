"""Block-sparse causal FlashAttention over a CSR list of kept key blocks.

What it computes: for every query block i of size b, softmax attention over the keys of the kept
key blocks j <= i (causal inside the diagonal block), exactly `seerlib.reference.
block_sparse_attention`. A row with nothing kept gives zeros. With a logit soft-cap c (Gemma2),
the scaled scores x become c * tanh(x / c) before the mask and the softmax (SOFTCAP, a constexpr:
without it the kernel is the plain one; with it, one tanh more per score: `_common.tanh`).

What it must move and compute, per (batch, query head), with n kept tiles of b x b:
    reads  q, out: 2 * S * d * e bytes;  k, v: 2 * n * b * d * e bytes (per kept tile, cache aside)
    FLOPs: 4 * n * b * b * d (two matmuls per kept tile), the causal half of diagonal tiles wasted.
At S = 32768, Hq = 32, d = 128, bf16, 0% sparsity: 8.8 TFLOP of useful work (about 11 ms at
790 TFLOP/s) against about 0.5 GB of q/k/v/out traffic, so the kernel is bound by the tensor cores
and by everything that keeps them from running (softmax, index loads, masks).

Design (bench/NOTES.md has the measurements):
- A program owns BLOCK_M = QPT * b query rows, i.e. QPT consecutive query blocks (QPT 1, 2 or 4),
  and walks the union of their kept lists, one b-wide key block per step. Each list entry carries
  the key block and QPT bits saying which of the program's query blocks keep it; rows of a query
  block that did not keep the key block are masked. QPT = 1 wastes nothing; QPT = 2 with b = 64
  gives 128-row tiles (twice the reuse of each K/V tile, a full-size wgmma) at the price of
  computing rows of the union that one half did not keep. `choose_rows_per_tile` picks it from the
  mask; `build_block_index` (seerlib/kernels/block_index.py) builds the lists.
- Entries are split: those strictly before the program's first query block need no causal mask
  (loop 1, no boundary checks: those key blocks are always complete); the last <= QPT entries
  touch the diagonal and the partial last key block (loop 2, masked, done last).
- GQA: K and V are read at kv head = q head // group; nothing is repeated.
- The heaviest tiles (last query blocks) are launched first.
- exp2 with log2(e) folded into the score scale; fp32 accumulation, the P @ V product accumulated
  into it in place (`softmax_step`).
- TMA (constexpr, `tma=`): Q, K, V tiles are loaded and O is stored through host tensor
  descriptors, 4-D over (B, H, S, d) so any strides that meet TMA's rules work (Hopper's tensor
  memory accelerator: one asynchronous copy per tile into shared memory instead of per-thread
  address arithmetic and masks; rows past S are zero-filled on load and clipped on store). K is
  read as a (b, d) tile and transposed in the dot. The default on sm_90+ whenever the tensors
  meet the rules; measured in bench/NOTES.md.
- Paired blocks (constexpr, `pair_blocks=`): loop 1 two key blocks per step, two score tiles and
  one softmax update, so the accumulator is rescaled once per two blocks (the d 64 shape, where
  the rescale weighs most against the small dots); a tune option until measured.
- Warp specialization (constexpr, `warp_specialize=`): loop 1 as
  `tl.range(..., warp_specialize=True)`, so the compiler splits producer warps (loads) from
  consumer warps (matmuls, softmax) and overlaps them; off by default: with Triton 3.6 on an
  H100 it fails to compile at 4 warps and gains nothing at 8 (bench/NOTES.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from seerlib.reference import check_softcap

from ._common import (
    ENTRY_BLOCK_MASK_TL,
    ENTRY_SHIFT_TL,
    check_inputs,
    check_out,
    default_launch,
    float32_buffer,
    interpreting,
    last_dim_contiguous,
    score_scales,
    softmax_step,
    tanh,
)
from .block_index import BlockIndex, build_block_index

__all__ = ["block_sparse_attention", "tma_rule_broken"]


@triton.jit
def _load_kv(K, V, k_base, v_base, z, kvh, col0, offs_n, offs_d, skn, svn, S,
             HEAD_D: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
    """Key block starting at row col0: kT (HEAD_D, BLOCK) and v (BLOCK, HEAD_D); key rows past S
    are zeros when MASKED (the pointer path) or always (TMA pads its box with zeros)."""
    if TMA:
        # (1, 1, BLOCK, HEAD_D) boxes -> (BLOCK, HEAD_D); K transposed in registers, not in memory
        kT = K.load([z, kvh, col0, 0]).reshape(BLOCK, HEAD_D).T
        v = V.load([z, kvh, col0, 0]).reshape(BLOCK, HEAD_D)
    else:
        cols = col0 + offs_n
        if MASKED:
            col_ok = cols < S
            kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :],
                         other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None],
                        other=0.0)
        else:
            kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
    return kT, v


@triton.jit
def _full_step(q, K, V, k_base, v_base, z, kvh, e, offs_n, offs_d, skn, svn, S, row_blk,
               qk_scale, cap_log2, m_i, l_i, acc,
               HEAD_D: tl.constexpr, BLOCK: tl.constexpr, QPT: tl.constexpr,
               SOFTCAP: tl.constexpr, TMA: tl.constexpr):
    """Loop 1's step: one complete key block (index entry e) strictly before the tile's first
    query block; no causal mask, no boundary checks. Returns the updated (m_i, l_i, acc)."""
    col0 = (e & ENTRY_BLOCK_MASK_TL) * BLOCK
    kT, v = _load_kv(K, V, k_base, v_base, z, kvh, col0, offs_n, offs_d, skn, svn, S,
                     HEAD_D, BLOCK, TMA, False)
    s = tl.dot(q, kT) * qk_scale
    if SOFTCAP:
        s = tanh(s) * cap_log2
    if QPT > 1:
        keep = ((e >> ENTRY_SHIFT_TL) >> row_blk) & 1
        s = tl.where(keep[:, None] != 0, s, float("-inf"))
    return softmax_step(s, v, m_i, l_i, acc, QPT > 1)


@triton.jit
def _pair_step(q, K, V, k_base, v_base, z, kvh, e1, e2, offs_n, offs_d, skn, svn, S, row_blk,
               qk_scale, cap_log2, m_i, l_i, acc,
               HEAD_D: tl.constexpr, BLOCK: tl.constexpr, QPT: tl.constexpr,
               SOFTCAP: tl.constexpr, TMA: tl.constexpr):
    """Loop 1's step over two complete key blocks (entries e1, e2) with one online-softmax update:
    one rescale of acc and one max / sum bookkeeping per two blocks instead of per block. The
    same math as two `_full_step`s. Returns the updated (m_i, l_i, acc)."""
    kT1, v1 = _load_kv(K, V, k_base, v_base, z, kvh, (e1 & ENTRY_BLOCK_MASK_TL) * BLOCK, offs_n,
                       offs_d, skn, svn, S, HEAD_D, BLOCK, TMA, False)
    kT2, v2 = _load_kv(K, V, k_base, v_base, z, kvh, (e2 & ENTRY_BLOCK_MASK_TL) * BLOCK, offs_n,
                       offs_d, skn, svn, S, HEAD_D, BLOCK, TMA, False)
    s1 = tl.dot(q, kT1) * qk_scale
    s2 = tl.dot(q, kT2) * qk_scale
    if SOFTCAP:
        s1 = tanh(s1) * cap_log2
        s2 = tanh(s2) * cap_log2
    if QPT > 1:
        s1 = tl.where((((e1 >> ENTRY_SHIFT_TL) >> row_blk) & 1)[:, None] != 0, s1, float("-inf"))
        s2 = tl.where((((e2 >> ENTRY_SHIFT_TL) >> row_blk) & 1)[:, None] != 0, s2, float("-inf"))
    m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)))
    if QPT > 1:  # rows that kept neither block so far: m stays -inf, l and acc 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p1 = tl.exp2(s1 - m_use[:, None])
    p2 = tl.exp2(s2 - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p1.to(v1.dtype), v1, acc)
    acc = tl.dot(p2.to(v2.dtype), v2, acc)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, COUNTS, NFULL, ENTRIES,
    qk_scale, cap_log2,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    soz, soh, som,
    H, GROUP, S, N_TILES, L,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    QPT: tl.constexpr,
    KV_MAJOR: tl.constexpr,
    STORE_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
    PAIR: tl.constexpr,
):
    # With TMA, Q, K, V, O are (B, H, S, HEAD_D) tensor descriptors (the strides unused);
    # without, plain pointers.
    BLOCK_M: tl.constexpr = BLOCK * QPT
    if KV_MAJOR:
        # One kv head's programs run together (its K/V, 2*S*d*2 bytes, stays in L2): within it,
        # the heaviest tiles first, and the GROUP query heads of one tile side by side.
        pid = tl.program_id(0)
        per_kv = GROUP * N_TILES
        zkv = pid // per_kv
        r = pid % per_kv
        t = N_TILES - 1 - r // GROUP
        hkv = H // GROUP
        z = zkv // hkv
        kvh = zkv % hkv
        h = kvh * GROUP + r % GROUP
        pid_bh = z * H + h
    else:
        pid_bh = tl.program_id(0)
        t = N_TILES - 1 - tl.program_id(1)  # heaviest tiles first
        z = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP

    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < S
    if TMA:
        k_base = K  # unused: the descriptors address the tiles themselves
        v_base = V
        q = Q.load([z, h, t * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_D)  # rows past S: zeros
    else:
        q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
        k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
        v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)

    meta = pid_bh.to(tl.int64) * N_TILES + t
    count = tl.load(COUNTS + meta)
    n_full = tl.load(NFULL + meta)
    e_base = ENTRIES + meta * L
    row_blk = tl.arange(0, BLOCK_M) // BLOCK  # which of the QPT query blocks a row belongs to

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    # Loop 1: key blocks strictly before this tile's first query block; complete, no causal mask.
    # Two copies so that warp_specialize is never passed when WS is off; PAIR takes two blocks
    # per step (then the odd one out).
    if PAIR:
        for n in tl.range(0, n_full // 2):
            m_i, l_i, acc = _pair_step(q, K, V, k_base, v_base, z, kvh, tl.load(e_base + 2 * n),
                                       tl.load(e_base + 2 * n + 1), offs_n, offs_d, skn, svn, S,
                                       row_blk, qk_scale, cap_log2, m_i, l_i, acc, HEAD_D, BLOCK,
                                       QPT, SOFTCAP, TMA)
        if n_full % 2 == 1:
            m_i, l_i, acc = _full_step(q, K, V, k_base, v_base, z, kvh,
                                       tl.load(e_base + n_full - 1), offs_n, offs_d, skn, svn, S,
                                       row_blk, qk_scale, cap_log2, m_i, l_i, acc, HEAD_D, BLOCK,
                                       QPT, SOFTCAP, TMA)
    elif WS:
        for n in tl.range(0, n_full, warp_specialize=True):
            m_i, l_i, acc = _full_step(q, K, V, k_base, v_base, z, kvh, tl.load(e_base + n),
                                       offs_n, offs_d, skn, svn, S, row_blk, qk_scale, cap_log2,
                                       m_i, l_i, acc, HEAD_D, BLOCK, QPT, SOFTCAP, TMA)
    else:
        for n in tl.range(0, n_full):
            m_i, l_i, acc = _full_step(q, K, V, k_base, v_base, z, kvh, tl.load(e_base + n),
                                       offs_n, offs_d, skn, svn, S, row_blk, qk_scale, cap_log2,
                                       m_i, l_i, acc, HEAD_D, BLOCK, QPT, SOFTCAP, TMA)

    # Loop 2: the key blocks that meet the diagonal (and the partial last block); masked, last.
    for n in tl.range(n_full, count):
        e = tl.load(e_base + n)
        col0 = (e & ENTRY_BLOCK_MASK_TL) * BLOCK
        cols = col0 + offs_n
        kT, v = _load_kv(K, V, k_base, v_base, z, kvh, col0, offs_n, offs_d, skn, svn, S,
                         HEAD_D, BLOCK, TMA, True)
        s = tl.dot(q, kT) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2
        keep = offs_m[:, None] >= cols[None, :]  # also drops the keys past S of valid rows
        if QPT > 1:
            bits = ((e >> ENTRY_SHIFT_TL) >> row_blk) & 1
            keep = keep & (bits[:, None] != 0)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, True)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows with nothing kept: acc is 0, the output 0
    out = acc / l_i[:, None]
    if TMA:
        # rows past S fall outside the descriptor's shape: the store clips them
        O.store([z, h, t * BLOCK_M, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, HEAD_D))
    else:
        o_base = O + z.to(tl.int64) * soz + h.to(tl.int64) * soh
        tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
    if STORE_LSE:
        # log2 of the row's softmax denominator in the scaled-score domain, what the backward
        # recomputes probabilities from: p = exp2(s * qk_scale - lse) (with the soft-cap:
        # exp2(tanh(s * qk_scale) * cap_log2 - lse)); +inf where nothing is kept.
        lse = tl.where(m_i == float("-inf"), float("inf"), m_i + tl.log2(l_i))
        tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=row_ok)


TMA_MAX_ROWS = 256  # a TMA box holds at most 256 elements along each dimension


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether a CUDA device has the tensor memory accelerator (sm_90, Hopper, and later)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def tma_rule_broken(t: torch.Tensor) -> str | None:
    """Which of TMA's rules the (B, H, S, d) tensor `t` breaks, in words, or None: a base address
    16-byte aligned, every stride but the last a multiple of 16 bytes, the last stride 1."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return f"its base address is {t.data_ptr() % 16} bytes past a 16-byte boundary"
    if t.stride(-1) != 1:
        return f"its last stride is {t.stride(-1)}; TMA needs 1"
    for dim in reversed(range(t.dim() - 1)):  # innermost first: the row stride is the usual one
        stride = t.stride(dim)
        if stride * size % 16:
            return (f"its stride {dim} is {stride} elements = {stride * size} bytes; TMA needs "
                    "a multiple of 16 bytes")
    return None


def _use_tma(tma: bool | None, block_m: int, named: dict) -> bool:
    """Resolve the wrapper's `tma` for these (name -> tensor) operands and tile height."""
    if tma is None:
        q = named["q"]
        if interpreting() or q.device.type != "cuda" or not _has_tma(q.device):
            return False
        return block_m <= TMA_MAX_ROWS and all(tma_rule_broken(t) is None
                                               for t in named.values())
    if not tma:
        return False
    if block_m > TMA_MAX_ROWS:
        raise ValueError(f"tma=True needs tiles of at most {TMA_MAX_ROWS} rows; rows_per_tile x "
                         f"block_size is {block_m}")
    for name, t in named.items():
        broken = tma_rule_broken(t)
        if broken is not None:
            raise ValueError(f"tma=True: {name} breaks TMA's rules: {broken}")
    return True


def sparse_launch(block_m: int, d: int, tma: bool) -> dict:
    """num_warps / num_stages of the forward, from the tune at 32k on an H100 (2026-12-06,
    bench/results/H100-80GB-HBM3-2026-12-06*-tune-32768.json; NOTES.md): 64-row tiles run best
    at 4 warps, 2 stages on either path and head dim; 128-row tiles through TMA at 4 warps with
    2 stages at d 128 and 4 at d 64; the pointer path's 128-row tiles keep 8 warps, 3 stages."""
    if block_m < 128:
        return {"num_warps": 4, "num_stages": 2}
    if tma:
        return {"num_warps": 4, "num_stages": 2 if d >= 128 else 4}
    return default_launch(block_m, d)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A (B, H, S, d) tensor as a TMA descriptor of (1, 1, rows, d) boxes."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask_or_index,
    block_size: int,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    rows_per_tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    kv_major: bool = True,
    sync_free: bool = False,
    lse: torch.Tensor | None = None,
    softcap: float | None = None,
    tma: bool | None = None,
    warp_specialize: bool = False,
    pair_blocks: bool = False,
) -> torch.Tensor:
    """Causal attention over the kept (query block, key block) tiles; the reference's contract.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d); bf16/fp16 on CUDA, fp32 under TRITON_INTERPRET=1.
        block_mask_or_index: bool (B, Hq, nb, nb) mask, `mask_to_index`'s (counts (B, Hq, nb),
            indices (B, Hq, nb, m)), or a prepared `BlockIndex` (reuse it across calls).
        block_size: b in {16, 32, 64, 128}; nb = ceil(S / b).
        scale: score scale, 1/sqrt(d) by default.
        out: optional (B, Hq, S, d) buffer to write into.
        rows_per_tile, num_warps, num_stages: launch overrides (benchmarks, tests).
        kv_major: launch order; True runs one kv head's programs together (L2 reuse of its K/V).
        sync_free: build the index without a device-to-host read (`build_block_index`;
            rows_per_tile defaults to 1 then).
        lse: optional (B, Hq, S) float32 buffer that receives each row's log2 sum-exp of the
            scaled scores (log2 domain, +inf for a row with nothing kept), for the backward.
        softcap: logit soft-cap c (scaled scores x -> c * tanh(x / c)), or None.
        tma: load Q, K, V and store O through TMA tensor descriptors. None: on a CUDA device of
            sm_90 or later when q, k, v, out all meet TMA's rules (`tma_rule_broken`) and the
            tile has at most 256 rows, else the pointer path (always under the interpreter).
            True forces it (ValueError naming the tensor and the rule if one breaks them).
        warp_specialize: run the unmasked loop as `tl.range(..., warp_specialize=True)`; with
            Triton 3.6 on an H100 this fails to compile at 4 warps and gains nothing at 8
            (bench/NOTES.md), so it is off by default.
        pair_blocks: the unmasked loop takes two key blocks per step with one softmax update
            (one rescale of the accumulator per two blocks); a tune option, off by default until
            measured (bench/NOTES.md); not with warp_specialize.
    Returns:
        out: (B, Hq, S, d) in q's dtype; rows with nothing kept are zeros.
    """
    B, Hq, Hkv, S, d = check_inputs(q, k, v, block_size)
    softcap = check_softcap(softcap)
    if pair_blocks and warp_specialize:
        raise ValueError("pair_blocks and warp_specialize are two forms of loop 1; choose one")
    if isinstance(block_mask_or_index, BlockIndex):
        index = block_mask_or_index
        if (index.shape != (B, Hq) or index.block_size != block_size or index.seq_len != S
                or index.counts.device != q.device):
            raise ValueError(
                f"BlockIndex was built for (B, H) = {index.shape}, block {index.block_size}, "
                f"S = {index.seq_len} on {index.counts.device}; got {(B, Hq)}, block {block_size}, "
                f"S = {S} on {q.device}"
            )
        if rows_per_tile is not None and rows_per_tile != index.rows_per_tile:
            raise ValueError("rows_per_tile differs from the one the BlockIndex was built with")
    else:
        if isinstance(block_mask_or_index, torch.Tensor) and block_mask_or_index.device != q.device:
            raise ValueError(f"block_mask is on {block_mask_or_index.device}; q is on {q.device}")
        if sync_free and rows_per_tile is None:
            rows_per_tile = 1
        index = build_block_index(block_mask_or_index, B, Hq, S, block_size, rows_per_tile,
                                  sync_free=sync_free)
        if index.counts.device != q.device:
            raise ValueError(f"the block index is on {index.counts.device}; q is on {q.device}")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = check_out(out, q)
    if lse is not None:
        lse = float32_buffer(lse, (B, Hq, S), q.device, "lse", "(B, Hq, S)")
        if not lse.is_contiguous():
            raise ValueError("lse must be contiguous")
    qpt = index.rows_per_tile
    n_tiles = index.counts.shape[-1]
    use_tma = _use_tma(tma, qpt * block_size, {"q": q, "k": k, "v": v, "out": out})
    launch = sparse_launch(qpt * block_size, d, use_tma)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    qk_scale, cap_log2 = score_scales(d, scale, softcap)
    grid = (B * Hq * n_tiles,) if kv_major else (B * Hq, n_tiles)
    if use_tma:
        qd, kd, vd, od = (_descriptor(q, qpt * block_size), _descriptor(k, block_size),
                          _descriptor(v, block_size), _descriptor(out, qpt * block_size))
    else:
        qd, kd, vd, od = q, k, v, out
    _block_sparse_fwd[grid](
        qd, kd, vd, od, out if lse is None else lse, index.counts, index.n_full, index.entries,
        qk_scale, cap_log2,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, S, n_tiles, index.entries.shape[-1],
        HEAD_D=d, BLOCK=block_size, QPT=qpt, KV_MAJOR=bool(kv_major),
        STORE_LSE=lse is not None, SOFTCAP=softcap is not None, TMA=use_tma,
        WS=bool(warp_specialize), PAIR=bool(pair_blocks), **launch,
    )
    return out
