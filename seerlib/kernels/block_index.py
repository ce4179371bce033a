"""The block index the sparse kernel reads: a bool block mask as per-tile lists of kept keys.

What it computes: for every (batch, head) and every tile of QPT consecutive query blocks (QPT =
`rows_per_tile`, 1, 2 or 4), the ascending list of key blocks on or below the diagonal that any of
the tile's query blocks keeps, each entry `block | (bits << 24)` where bit r says query block
`tile * QPT + r` keeps it, plus the list's length and how many entries lie strictly before the
tile's first query block (those need no causal mask). `BlockIndex` holds the result.

What it must move, per (batch, head), with nb blocks and n_tiles = ceil(nb / QPT) tiles of at most
L entries: reads the mask, nb * nb bytes, twice (a counting pass, then a writing pass); writes
3 * 4 * n_tiles bytes of counts and 4 * n_tiles * L bytes of entries; no FLOPs to speak of. At
S = 32768, b = 64, 32 heads: 8.4 MB of mask read twice. Between the passes one device-to-host read
(the longest list, which sizes the entries) syncs the stream. Timings: bench/NOTES.md.

Two builders: the Triton kernel (`_index_pass`, the default on CUDA) and a sort-based torch one
(the default on CPU, and the oracle for the kernel's tests). `choose_rows_per_tile` picks QPT from
the mask: the largest tile whose union of kept lists wastes at most 1.3x the rows the mask asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seerlib.reference import causal_block_mask, check_block_mask, index_to_mask, num_blocks

from ._common import ENTRY_BITS_SHIFT, ENTRY_BLOCK_MASK, ENTRY_SHIFT_TL

__all__ = [
    "BlockIndex", "build_block_index", "build_key_index", "choose_rows_per_tile", "index_mask",
]

_MAX_WASTE = 1.3
# Index builder used on CUDA by default: the kernel, verified there and 3-10x faster than the
# sort-based torch builder at S = 32768 (bench/NOTES.md).
_DEFAULT_INDEX_METHOD = "triton"


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
        tl.store(ENTRIES + meta * L + pos, cols | (bits << ENTRY_SHIFT_TL), mask=keep != 0)
    else:
        tl.store(COUNTS + meta, count)
        tl.store(NFULL + meta, tl.sum(tl.where(cols < t * QPT, keep, 0), 0))
        tl.store(ROWS + meta, rows_kept)


def as_block_mask(block_mask_or_index, B, H, nb):
    """A checked bool mask (B, H, nb, nb) from a mask or mask_to_index's (counts, indices)."""
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


def choose_rows_per_tile(
    block_mask: torch.Tensor, block_size: int, max_waste: float = _MAX_WASTE
) -> int:
    """Query blocks per program: the largest tile up to 128 rows whose union of kept lists computes
    at most `max_waste` times the rows the mask asks for (1 where b-row tiles are already 128)."""
    nb = block_mask.shape[-1]
    m = block_mask & causal_block_mask(nb, block_mask.device)
    need = m.sum().item() * block_size
    qpt = max(1, 128 // block_size)
    while qpt > 1:
        pad = (-nb) % qpt
        u = torch.nn.functional.pad(m, (0, 0, 0, pad)).reshape(*m.shape[:2], -1, qpt, nb).any(3)
        if need == 0 or u.sum().item() * qpt * block_size <= max_waste * need:
            return qpt
        qpt //= 2
    return 1


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


def _build_block_index_triton(mask, batch, heads, seq_len, block_size, rows_per_tile,
                              sync_free=False):
    nb = mask.shape[-1]
    m8 = mask.contiguous().view(torch.uint8)
    qpt = max(1, 128 // block_size) if rows_per_tile is None else rows_per_tile
    if sync_free:  # no device-to-host read: entries sized for the longest possible list
        counts, n_full, rows = _index_counts(m8, batch, heads, nb, qpt)
        return _write_entries(m8, counts, n_full, rows, batch, heads, nb, nb, qpt, block_size,
                              seq_len, torch.empty)
    while True:
        counts, n_full, rows = _index_counts(m8, batch, heads, nb, qpt)
        used, need, longest = torch.stack(
            [counts.sum(dtype=torch.int64), rows.sum(dtype=torch.int64),
             counts.max().to(torch.int64)]
        ).tolist()
        if rows_per_tile is not None or qpt == 1 or used * qpt <= _MAX_WASTE * need:
            break
        qpt //= 2
    return _write_entries(m8, counts, n_full, rows, batch, heads, nb, max(1, longest), qpt,
                          block_size, seq_len, torch.zeros)


def _write_entries(m8, counts, n_full, rows, batch, heads, nb, L, qpt, block_size, seq_len,
                   alloc):
    """The writing pass: (B, H, n_tiles, L) entries; `alloc` torch.empty when the kernel reads
    only each tile's first `count` entries anyway (the sync-free path), else torch.zeros."""
    n_tiles = counts.shape[-1]
    entries = alloc(batch, heads, n_tiles, L, dtype=torch.int32, device=m8.device)
    _index_pass[(batch * heads, n_tiles)](
        m8, counts, n_full, rows, entries,
        m8.stride(0), m8.stride(1), m8.stride(2),
        heads, nb, n_tiles, L,
        QPT=qpt, NB_P2=triton.next_power_of_2(nb), WRITE=True,
    )
    return BlockIndex(counts=counts, n_full=n_full, entries=entries, block_size=block_size,
                      rows_per_tile=qpt, seq_len=seq_len)


def _build_block_index_torch(mask, batch, heads, seq_len, block_size, rows_per_tile,
                             sync_free=False):
    nb = mask.shape[-1]
    qpt = choose_rows_per_tile(mask, block_size) if rows_per_tile is None else rows_per_tile
    dev = mask.device
    m = mask & causal_block_mask(nb, dev)  # (B, H, nb, nb)
    n_tiles = -(-nb // qpt)
    m = torch.nn.functional.pad(m, (0, 0, 0, n_tiles * qpt - nb))
    m = m.reshape(batch, heads, n_tiles, qpt, nb)  # (B, H, nT, QPT, nb)
    union = m.any(3)  # (B, H, nT, nb)
    weights = (1 << torch.arange(qpt, device=dev, dtype=torch.int32)).view(qpt, 1)
    bits = (m.to(torch.int32) * weights).sum(3, dtype=torch.int32)  # (B, H, nT, nb)
    counts = union.sum(-1, dtype=torch.int32)
    L = nb if sync_free else max(1, int(counts.max().item()))
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


def build_block_index(
    block_mask_or_index, batch: int, heads: int, seq_len: int, block_size: int,
    rows_per_tile: int | None = None, method: str = "auto", sync_free: bool = False,
) -> BlockIndex:
    """Turn a bool mask (B, H, nb, nb) or mask_to_index's (counts, indices) into a BlockIndex.

    Blocks above the diagonal are dropped (they contribute nothing under the causal mask).
    rows_per_tile (query blocks per program, 1, 2 or 4) defaults to `choose_rows_per_tile`'s rule.
    method: "triton" (a small kernel, two passes over the mask) or "torch" (sort-based; the
    oracle for the kernel's tests); "auto" takes `_DEFAULT_INDEX_METHOD` on CUDA, torch on CPU.
    sync_free: never read the device from the host (so a model step can run ahead of the GPU and
    be captured in a CUDA graph): needs `rows_per_tile`, and sizes the entries for the longest
    possible list, nb (4 * B * H * n_tiles * nb bytes), instead of reading the longest one.
    """
    nb = num_blocks(seq_len, block_size)
    mask = as_block_mask(block_mask_or_index, batch, heads, nb)
    if rows_per_tile is not None and int(rows_per_tile) not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_tile must be 1, 2, 4 or 8; got {rows_per_tile}")
    if method not in ("auto", "triton", "torch"):
        raise ValueError(f"method must be 'auto', 'triton' or 'torch'; got {method!r}")
    if method == "auto":
        method = _DEFAULT_INDEX_METHOD if mask.is_cuda else "torch"
    rpt = None if rows_per_tile is None else int(rows_per_tile)
    if sync_free and rpt is None:
        raise ValueError("sync_free=True needs rows_per_tile (choosing it reads the mask)")
    build = _build_block_index_triton if method == "triton" else _build_block_index_torch
    return build(mask, batch, heads, seq_len, block_size, rpt, sync_free=sync_free)


def index_mask(index: BlockIndex) -> torch.Tensor:
    """The (B, H, nb, nb) bool mask a BlockIndex lists (on or below the diagonal): its inverse."""
    B, H = index.shape
    qpt, nb = index.rows_per_tile, num_blocks(index.seq_len, index.block_size)
    n_tiles, L = index.entries.shape[-2:]
    dev = index.entries.device
    valid = torch.arange(L, device=dev) < index.counts[..., None].long()  # (B, H, nT, L)
    cols = (index.entries & ENTRY_BLOCK_MASK).long()
    bits = index.entries >> ENTRY_BITS_SHIFT
    mask = torch.zeros(B, H, n_tiles * qpt, nb, dtype=torch.bool, device=dev)
    for r in range(qpt):
        keep = valid & (((bits >> r) & 1) != 0)
        rows = mask[:, :, r::qpt]  # query blocks tile * qpt + r, a view
        hit = torch.zeros(B, H, n_tiles, nb + 1, dtype=torch.bool, device=dev)
        hit.scatter_(-1, torch.where(keep, cols, nb), True)
        rows |= hit[..., :nb]
    return mask[:, :, :nb]


def build_key_index(
    block_mask_or_index, batch: int, heads: int, seq_len: int, block_size: int,
    rows_per_tile: int = 1, method: str = "auto", sync_free: bool = False,
) -> BlockIndex:
    """The transposed index the backward's dK/dV pass reads: for each key block, the query blocks
    that keep it, as a BlockIndex of the mask flipped on both axes and transposed.

    Row a of the flipped mask is key block j = nb - 1 - a, and its entry c is query block
    i = nb - 1 - c, so the causal part (i >= j) is again on or below the diagonal, the diagonal
    entry (i == j, the one that needs the causal mask) comes last, and `n_full` counts the
    entries with i > j. Takes what `build_block_index` takes, or a BlockIndex (its `index_mask`).
    """
    nb = num_blocks(seq_len, block_size)
    if isinstance(block_mask_or_index, BlockIndex):
        mask = index_mask(block_mask_or_index)
    else:
        mask = as_block_mask(block_mask_or_index, batch, heads, nb)
    flipped = mask.flip(-2, -1).transpose(-2, -1).contiguous()
    return build_block_index(flipped, batch, heads, seq_len, block_size, rows_per_tile,
                             method=method, sync_free=sync_free)
