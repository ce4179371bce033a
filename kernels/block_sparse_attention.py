"""Block-sparse causal FlashAttention over a CSR list of kept key blocks.

What it computes: for every query block i of size b, softmax attention over the keys of the kept
key blocks j <= i (causal inside the diagonal block), exactly `seerlib.reference.
block_sparse_attention`. A row with nothing kept gives zeros.

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
  mask.
- Entries are split: those strictly before the program's first query block need no causal mask
  (loop 1, no boundary checks: those key blocks are always complete); the last <= QPT entries
  touch the diagonal and the partial last key block (loop 2, masked, done last).
- GQA: K and V are read at kv head = q head // group; nothing is repeated.
- The heaviest tiles (last query blocks) are launched first.
- exp2 with log2(e) folded into the score scale; fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seerlib.reference import check_block_mask, index_to_mask, num_blocks

from ._common import (
    ENTRY_BITS_SHIFT,
    ENTRY_BLOCK_MASK,
    LOG2E,
    check_inputs,
    check_out,
    default_launch,
    last_dim_contiguous,
    resolve_scale,
    softmax_step,
)

__all__ = ["block_sparse_attention", "BlockIndex", "build_block_index", "choose_rows_per_tile"]

# The same constants as seen from inside @triton.jit (compiled Triton reads only constexpr globals).
_SHIFT = tl.constexpr(ENTRY_BITS_SHIFT)
_BLOCK_MASK = tl.constexpr(ENTRY_BLOCK_MASK)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, COUNTS, NFULL, ENTRIES,
    qk_scale,
    sqz, sqh, sqm,
    skz, skh, skn,
    svz, svh, svn,
    soz, soh, som,
    H, GROUP, S, N_TILES, L,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    QPT: tl.constexpr,
    KV_MAJOR: tl.constexpr,
):
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

    q_base = Q + z.to(tl.int64) * sqz + h.to(tl.int64) * sqh
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    o_base = O + z.to(tl.int64) * soz + h.to(tl.int64) * soh

    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < S
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    meta = pid_bh.to(tl.int64) * N_TILES + t
    count = tl.load(COUNTS + meta)
    n_full = tl.load(NFULL + meta)
    e_base = ENTRIES + meta * L
    row_blk = tl.arange(0, BLOCK_M) // BLOCK  # which of the QPT query blocks a row belongs to

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    # Loop 1: key blocks strictly before this tile's first query block; complete, no causal mask.
    for n in tl.range(0, n_full):
        e = tl.load(e_base + n)
        cols = (e & _BLOCK_MASK) * BLOCK + offs_n
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :])
        s = tl.dot(q, kT) * qk_scale
        if QPT > 1:
            keep = ((e >> _SHIFT) >> row_blk) & 1
            s = tl.where(keep[:, None] != 0, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, QPT > 1)

    # Loop 2: the key blocks that meet the diagonal (and the partial last block); masked, last.
    for n in tl.range(n_full, count):
        e = tl.load(e_base + n)
        cols = (e & _BLOCK_MASK) * BLOCK + offs_n
        col_ok = cols < S
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :],
                     other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT) * qk_scale
        keep = offs_m[:, None] >= cols[None, :]
        if QPT > 1:
            bits = ((e >> _SHIFT) >> row_blk) & 1
            keep = keep & (bits[:, None] != 0)
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, True)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows with nothing kept: acc is 0, the output 0
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


@dataclass(frozen=True)
class BlockIndex:
    """Kept key blocks per tile of `rows_per_tile` query blocks, as the kernel reads them.

    counts: (B, H, n_tiles) int32, entries per tile. n_full: (B, H, n_tiles) int32, entries before
    the tile's first query block (no causal mask). entries: (B, H, n_tiles, L) int32, ascending key
    blocks, each `block | (bits << 24)` where bit r says query block `tile * rows_per_tile + r`
    keeps it. Only key blocks on or below the block diagonal appear.
    """

    counts: torch.Tensor
    n_full: torch.Tensor
    entries: torch.Tensor
    block_size: int
    rows_per_tile: int
    seq_len: int

    @property
    def shape(self):
        return tuple(self.counts.shape[:2])


def _as_mask(block_mask_or_index, B, H, nb):
    if isinstance(block_mask_or_index, torch.Tensor):
        check_block_mask(block_mask_or_index, B, H, nb)
        return block_mask_or_index
    if isinstance(block_mask_or_index, (tuple, list)) and len(block_mask_or_index) == 2:
        counts, indices = block_mask_or_index
        if not (isinstance(counts, torch.Tensor) and isinstance(indices, torch.Tensor)):
            raise ValueError("a block index must be the (counts, indices) tensors of mask_to_index")
        if (tuple(counts.shape) != (B, H, nb) or indices.dim() != 4
                or tuple(indices.shape[:3]) != (B, H, nb)):
            raise ValueError(
                f"block index must be counts (B, H, nb) = {(B, H, nb)} and indices (B, H, nb, m); "
                f"got {tuple(counts.shape)} and {tuple(indices.shape)}"
            )
        ints = (torch.int32, torch.int64)
        if counts.dtype not in ints or indices.dtype not in ints:
            raise ValueError(
                f"counts and indices must be int32 or int64; got {counts.dtype}, {indices.dtype}"
            )
        return index_to_mask(counts, indices, nb)
    raise ValueError(
        "block_mask_or_index must be a bool mask (B, H, nb, nb), a (counts, indices) pair from "
        f"mask_to_index, or a BlockIndex; got {type(block_mask_or_index).__name__}"
    )


_MAX_WASTE = 1.3
# Index builder used on CUDA by default: the kernel, verified there and 3-10x faster than the
# sort-based torch builder at S = 32768 (bench/NOTES.md).
_DEFAULT_INDEX_METHOD = "triton"


def choose_rows_per_tile(
    block_mask: torch.Tensor, block_size: int, max_waste: float = _MAX_WASTE
) -> int:
    """Query blocks per program: the largest tile up to 128 rows whose union of kept lists computes
    at most `max_waste` times the rows the mask asks for (1 where b-row tiles are already 128)."""
    nb = block_mask.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril_()
    m = block_mask & causal
    need = m.sum().item() * block_size
    qpt = max(1, 128 // block_size)
    while qpt > 1:
        pad = (-nb) % qpt
        u = torch.nn.functional.pad(m, (0, 0, 0, pad)).reshape(*m.shape[:2], -1, qpt, nb).any(3)
        if need == 0 or u.sum().item() * qpt * block_size <= max_waste * need:
            return qpt
        qpt //= 2
    return 1


@triton.jit
def _index_pass(
    MASK, COUNTS, NFULL, ROWS, ENTRIES,
    smz, smh, smi,
    H, NB, N_TILES, L,
    QPT: tl.constexpr,
    NB_P2: tl.constexpr,
    WRITE: tl.constexpr,
):
    """One program per (batch*head, tile): union of the tile's QPT mask rows (on or below the
    diagonal), its row bits, count, n_full and the summed per-row counts; with WRITE, the
    compacted entries (cumsum positions, ascending)."""
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    z = pid_bh // H
    h = pid_bh % H
    cols = tl.arange(0, NB_P2)
    base = MASK + z.to(tl.int64) * smz + h.to(tl.int64) * smh
    bits = tl.zeros([NB_P2], dtype=tl.int32)
    rows_kept = 0
    for r in tl.static_range(QPT):
        i = t * QPT + r
        ok = (cols < NB) & (cols <= i) & (i < NB)
        row = (tl.load(base + i.to(tl.int64) * smi + cols, mask=ok, other=0) != 0).to(tl.int32)
        bits = bits | (row << r)
        rows_kept += tl.sum(row, 0)
    keep = (bits != 0).to(tl.int32)
    meta = pid_bh.to(tl.int64) * N_TILES + t
    count = tl.sum(keep, 0)
    if WRITE:
        pos = tl.cumsum(keep, 0) - 1
        tl.store(ENTRIES + meta * L + pos, cols | (bits << _SHIFT), mask=keep != 0)
    else:
        tl.store(COUNTS + meta, count)
        tl.store(NFULL + meta, tl.sum(tl.where(cols < t * QPT, keep, 0), 0))
        tl.store(ROWS + meta, rows_kept)


def _index_counts(mask_u8, batch, heads, nb, qpt):
    n_tiles = -(-nb // qpt)
    counts, n_full, rows = (
        torch.empty(batch, heads, n_tiles, dtype=torch.int32, device=mask_u8.device)
        for _ in range(3)
    )
    _index_pass[(batch * heads, n_tiles)](
        mask_u8, counts, n_full, rows, counts,
        mask_u8.stride(0), mask_u8.stride(1), mask_u8.stride(2),
        heads, nb, n_tiles, 1,
        QPT=qpt, NB_P2=triton.next_power_of_2(nb), WRITE=False,
    )
    return counts, n_full, rows


def _build_block_index_triton(mask, batch, heads, seq_len, block_size, rows_per_tile):
    nb = mask.shape[-1]
    m8 = mask.contiguous().view(torch.uint8)
    qpt = max(1, 128 // block_size) if rows_per_tile is None else rows_per_tile
    while True:
        counts, n_full, rows = _index_counts(m8, batch, heads, nb, qpt)
        used, need, longest = torch.stack(
            [counts.sum(dtype=torch.int64), rows.sum(dtype=torch.int64),
             counts.max().to(torch.int64)]
        ).tolist()
        if rows_per_tile is not None or qpt == 1 or used * qpt <= _MAX_WASTE * need:
            break
        qpt //= 2
    n_tiles = counts.shape[-1]
    L = max(1, longest)
    entries = torch.zeros(batch, heads, n_tiles, L, dtype=torch.int32, device=mask.device)
    _index_pass[(batch * heads, n_tiles)](
        m8, counts, n_full, rows, entries,
        m8.stride(0), m8.stride(1), m8.stride(2),
        heads, nb, n_tiles, L,
        QPT=qpt, NB_P2=triton.next_power_of_2(nb), WRITE=True,
    )
    return BlockIndex(counts=counts, n_full=n_full, entries=entries, block_size=block_size,
                      rows_per_tile=qpt, seq_len=seq_len)


def build_block_index(
    block_mask_or_index, batch: int, heads: int, seq_len: int, block_size: int,
    rows_per_tile: int | None = None, method: str = "auto",
) -> BlockIndex:
    """Turn a bool mask (B, H, nb, nb) or mask_to_index's (counts, indices) into a BlockIndex.

    Blocks above the diagonal are dropped (they contribute nothing under the causal mask).
    rows_per_tile (query blocks per program, 1, 2 or 4) defaults to `choose_rows_per_tile`'s rule.
    method: "triton" (a small kernel, two passes over the mask) or "torch" (sort-based; the
    oracle for the kernel's tests); "auto" takes `_DEFAULT_INDEX_METHOD` on CUDA, torch on CPU.
    """
    nb = num_blocks(seq_len, block_size)
    mask = _as_mask(block_mask_or_index, batch, heads, nb)
    if rows_per_tile is not None and int(rows_per_tile) not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_tile must be 1, 2, 4 or 8; got {rows_per_tile}")
    if method not in ("auto", "triton", "torch"):
        raise ValueError(f"method must be 'auto', 'triton' or 'torch'; got {method!r}")
    if method == "auto":
        method = _DEFAULT_INDEX_METHOD if mask.is_cuda else "torch"
    if method == "triton":
        rpt = None if rows_per_tile is None else int(rows_per_tile)
        return _build_block_index_triton(mask, batch, heads, seq_len, block_size, rpt)
    qpt = choose_rows_per_tile(mask, block_size) if rows_per_tile is None else int(rows_per_tile)
    dev = mask.device
    causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril_()
    m = mask & causal  # (B, H, nb, nb)
    n_tiles = -(-nb // qpt)
    m = torch.nn.functional.pad(m, (0, 0, 0, n_tiles * qpt - nb))
    m = m.reshape(batch, heads, n_tiles, qpt, nb)  # (B, H, nT, QPT, nb)
    union = m.any(3)  # (B, H, nT, nb)
    weights = (1 << torch.arange(qpt, device=dev, dtype=torch.int32)).view(qpt, 1)
    bits = (m.to(torch.int32) * weights).sum(3, dtype=torch.int32)  # (B, H, nT, nb)
    counts = union.sum(-1, dtype=torch.int32)
    L = max(1, int(counts.max().item()))
    cols = torch.arange(nb, device=dev, dtype=torch.int32)
    key = torch.where(union, cols, cols + nb)
    idx = key.sort(dim=-1).values[..., :L]  # kept columns first, ascending
    valid = idx < nb
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    ent_bits = torch.gather(bits, -1, idx.long())
    entries = torch.where(valid, idx | (ent_bits << ENTRY_BITS_SHIFT), torch.zeros_like(idx))
    first = (torch.arange(n_tiles, device=dev, dtype=torch.int32) * qpt).view(n_tiles, 1)
    n_full = (union & (cols.view(1, nb) < first)).sum(-1, dtype=torch.int32)
    return BlockIndex(
        counts=counts.contiguous(), n_full=n_full.contiguous(), entries=entries.contiguous(),
        block_size=block_size, rows_per_tile=qpt, seq_len=seq_len,
    )


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
    Returns:
        out: (B, Hq, S, d) in q's dtype; rows with nothing kept are zeros.
    """
    B, Hq, Hkv, S, d = check_inputs(q, k, v, block_size)
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
        index = build_block_index(block_mask_or_index, B, Hq, S, block_size, rows_per_tile)
        if index.counts.device != q.device:
            raise ValueError(f"the block index is on {index.counts.device}; q is on {q.device}")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = check_out(out, q)
    qpt = index.rows_per_tile
    n_tiles = index.counts.shape[-1]
    launch = default_launch(qpt * block_size, d)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    qk_scale = resolve_scale(scale, d) * LOG2E
    grid = (B * Hq * n_tiles,) if kv_major else (B * Hq, n_tiles)
    _block_sparse_fwd[grid](
        q, k, v, out, index.counts, index.n_full, index.entries,
        qk_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, S, n_tiles, index.entries.shape[-1],
        HEAD_D=d, BLOCK=block_size, QPT=qpt, KV_MAJOR=bool(kv_major),
        **launch,
    )
    return out
