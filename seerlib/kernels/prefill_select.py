"""A prefill layer's top-k block selection and the block-sparse kernel's index, in one launch.

What it computes: `build_block_index(select_blocks(logits, selection), B, H, S, b,
rows_per_tile=1, sync_free=True)` for the "row" rule (top-k per query-block row, k =
`density_to_k(density, nb)`, the forced sink / local blocks and the diagonal counted first): for
every (batch, head, query block i), the ascending list of key blocks it keeps, each entry
`block | (1 << 24)` (bit 0: the tile's one query block), its length, and how many entries lie
before block i (all but the diagonal, which every row keeps).

How: one program per (batch, head, query block) runs the decode selection's row
(`seerlib.kernels.decode_select.select_row`: a radix search for the k-th best score, no sort) with
the query's own block c = i; the blocks after i are not visible to it. Before, the graphed gate
step ran about ten launches between the logits and the index: the forced-block mask, a -inf fill,
topk, a scatter into an (nb, nb) mask, its causal and forced ORs, and the index builder's two
passes over that mask.

Scores that are -inf or NaN are never kept by the budget (`select_blocks` may fill a short row
with them; gate logits below the diagonal are finite). Equal scores at the cut go to the lower
block (torch.topk leaves the order of ties open).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ENTRY_BITS_SHIFT, check_kernel_device, interpreting
from .block_index import BlockIndex
from .decode_select import MAX_BLOCKS, search_passes, select_row

__all__ = ["prefill_select"]

# bit 0 of an entry's row bits: its tile's one query block keeps the key block
_ROW_BIT = tl.constexpr(1 << ENTRY_BITS_SHIFT)


@triton.jit
def _prefill_select(
    S, ENT, CNT, NFULL,
    ssz, ssh, ssi, sez, seh, sei,
    H, NB, K_BUDGET, SINK, LOCAL,
    NB_P2: tl.constexpr,
    RADIX: tl.constexpr,
    PASSES: tl.constexpr,
):
    zh = tl.program_id(0)
    i = tl.program_id(1)
    z = zh // H
    h = zh % H
    at = zh.to(tl.int64) * NB + i  # (B, H, nb) counts and n_full
    count = select_row(
        S + z.to(tl.int64) * ssz + h.to(tl.int64) * ssh + i.to(tl.int64) * ssi,
        ENT + z.to(tl.int64) * sez + h.to(tl.int64) * seh + i.to(tl.int64) * sei, CNT + at,
        i, NB, NB, NB, K_BUDGET, SINK, LOCAL, CNT, 0.0,
        0, NB_P2, NB_P2, RADIX, PASSES, _ROW_BIT)
    tl.store(NFULL + at, count - 1)  # every entry but the row's own block lies before it


def prefill_select(logits: torch.Tensor, seq_len: int, block_size: int, k: int, *,
                   sink: int = 0, local: int = 0) -> BlockIndex:
    """The kept key blocks of every query-block row, as the block-sparse kernel's index.

    Args:
        logits: (B, H, nb, nb) float block scores (higher = kept first; above the diagonal
            ignored), nb = ceil(seq_len / block_size), a contiguous last dim.
        seq_len: S; block_size: b.
        k: blocks per row in all, forced ones first (`seerlib.select.density_to_k`); a row i
            keeps at most its i + 1.
        sink, local: the forced sink blocks (key blocks 0 .. sink - 1) and local blocks (the
            `local` blocks left of the diagonal); the diagonal always.
    Returns:
        a `BlockIndex` with rows_per_tile 1, entries sized nb (sync-free: entries past a row's
        count are unspecified).
    """
    if logits.dim() != 4 or logits.shape[-1] != logits.shape[-2] or not logits.is_floating_point():
        raise ValueError(f"logits must be (B, H, nb, nb) float; got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    B, H, nb, _ = logits.shape
    want_nb = -(-int(seq_len) // int(block_size))
    if nb != want_nb:
        raise ValueError(f"logits have {nb} blocks a row; seq_len {seq_len} at block size "
                         f"{block_size} has {want_nb}")
    if not 1 <= nb <= MAX_BLOCKS:
        raise ValueError(f"rows of 1 .. {MAX_BLOCKS} blocks fit one program; got {nb}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k (blocks per row) must be a whole number >= 1; got {k!r}")
    if min(sink, local) < 0:
        raise ValueError(f"sink and local must be >= 0; got {sink}, {local}")
    check_kernel_device("prefill selection kernel", logits=logits)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    entries = torch.empty(B, H, nb, nb, dtype=torch.int32, device=dev)
    counts = torch.empty(B, H, nb, dtype=torch.int32, device=dev)
    n_full = torch.empty(B, H, nb, dtype=torch.int32, device=dev)
    nb_p2 = max(16, triton.next_power_of_2(nb))
    launch = {} if interpreting() else {"num_warps": 4 if nb_p2 <= 2048 else 8}
    _prefill_select[(B * H, nb)](
        logits, entries, counts, n_full,
        logits.stride(0), logits.stride(1), logits.stride(2),
        entries.stride(0), entries.stride(1), entries.stride(2),
        H, nb, int(k), int(sink), int(local),
        NB_P2=nb_p2, **search_passes(nb_p2), **launch,
    )
    return BlockIndex(counts=counts, n_full=n_full, entries=entries, block_size=int(block_size),
                      rows_per_tile=1, seq_len=int(seq_len))
