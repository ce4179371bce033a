"""Decode selection: which key blocks each decode query reads, from any block score.

`select_decode(scores, selection, positions, block_size)` applies a `seerlib.select.Selection` at
decode time. A query at position t sees key blocks 0 .. c, c = t // b, its own (newest, possibly
partial) block c always read; the Selection decides the rest:
- **budget**: `tokens` (each query reads tokens // b blocks, at least one, its own and the forced
  ones included: SeerAttention-R's token budget), `threshold` (blocks whose softmax over the
  scored candidates exceeds it) or `density` (that share of the row's c + 1 blocks, rounded up);
  no budget reads every block. A budget that covers the context reads it all: exactly dense.
- **forced blocks**: the rules registered with `decode=True` (`seerlib.select.DECODE_FORCED`): a
  query of block c reads row c of the rule's prefill mask, so the sink rule forces blocks
  0 .. n-1 and the local rule the n blocks before the query's own. Other rules (dense last rows)
  are refused, as are `diagonal=False` (the own block has no cached key to score) and layer
  budgets.

Scores are (B, Hkv, Sq, nb), higher = read first; -inf or NaN for blocks that are no candidate.
One selection per (batch, kv head, query): the query heads of a group read the same blocks, as the
sparse decode kernel takes them (`decode_index`).
"""

from __future__ import annotations

import math

import torch

from seerlib.select import DECODE_FORCED, Selection, forced_blocks

__all__ = [
    "blocks_per_query",
    "check_decode_selection",
    "decode_index",
    "most_blocks",
    "select_decode",
    "visible_blocks",
]

def visible_blocks(positions: torch.Tensor, nb: int, block_size: int) -> torch.Tensor:
    """(Sq, nb) bool: key blocks 0 .. pos // b, those holding a key at or before each position."""
    j = torch.arange(nb, device=positions.device)
    return j[None, :] <= (positions[:, None] // block_size)


def check_decode_selection(selection: Selection) -> None:
    """Raise ValueError for the parts of a Selection that have no meaning at decode."""
    if not isinstance(selection, Selection):
        raise ValueError(f"selection must be a seerlib Selection; got {type(selection).__name__}")
    bad = selection.unsupported(tuple(DECODE_FORCED), False)  # no layer budgets
    if bad:
        raise ValueError(f"decode selection does not honour {', '.join(bad)}; it takes a token "
                         f"budget, a threshold or a density, the query's own block always, and "
                         f"forced blocks of {DECODE_FORCED}")


def blocks_per_query(selection: Selection, block_size: int) -> int | None:
    """The blocks a query reads under a token budget (tokens // b, at least 1), else None."""
    if selection.tokens is None:
        return None
    return max(1, selection.tokens // block_size)


def most_blocks(selection: Selection, block_size: int) -> int | None:
    """The most blocks any query can read under a token budget: the budget's blocks, or its own
    block and the forced ones when they are more (None without a token budget). A bound known on
    the host, so the kernel's index has a fixed width and building it never syncs."""
    k = blocks_per_query(selection, block_size)
    return None if k is None else max(k, 1 + sum(n for _, n in selection.forced))


def _forced(selection: Selection, own: torch.Tensor, nb: int) -> torch.Tensor:
    """(Sq, nb) bool: each query's own block and the Selection's forced blocks, row `own` of the
    prefill's forced-block mask (diagonal included, causal)."""
    return forced_blocks(selection, nb, own.device)[own]


def select_decode(scores: torch.Tensor, selection: Selection, positions: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """The key blocks each decode query reads.

    Args:
        scores: (B, Hkv, Sq, nb) block scores (gate logits, Quest bounds, true block scores, ...),
            higher = more important; -inf / NaN = no candidate (never picked by the budget).
        selection: the Selection (see the module docstring for what decode honours).
        positions: (Sq,) int token positions of the queries (their keys are 0 .. position).
        block_size: b.
    Returns:
        keep: (B, Hkv, Sq, nb) bool, never past a query's own block.
    """
    check_decode_selection(selection)
    if scores.dim() != 4 or positions.dim() != 1 or positions.shape[0] != scores.shape[2]:
        raise ValueError(f"scores must be (B, Hkv, Sq, nb) and positions (Sq,); got "
                         f"{tuple(scores.shape)} and {tuple(positions.shape)}")
    nb, b = scores.shape[-1], block_size
    if positions.device.type == "cpu" and positions.numel() and int(positions.max()) // b >= nb:
        # checked only where it costs no sync: device positions are the caller's (generate's)
        raise ValueError(f"a query at position {int(positions.max())} needs key block "
                         f"{int(positions.max()) // b}; the scores have {nb} blocks")
    positions = positions.to(scores.device)
    own = positions // b  # (Sq,)
    visible = visible_blocks(positions, nb, b)  # (Sq, nb)
    if not selection.has_budget:
        return visible.expand(scores.shape).clone()
    forced = _forced(selection, own, nb)
    # NaN and -inf: no candidate (nan_to_num would make -inf the lowest finite score)
    s = torch.nan_to_num(scores.float(), nan=float("-inf"), neginf=float("-inf"))
    s = s.masked_fill(~visible, float("-inf"))
    if selection.threshold is not None:
        cand = s.masked_fill(forced, float("-inf"))
        p = torch.softmax(cand, dim=-1).nan_to_num(0.0)  # a row without candidates: none
        return (p > selection.threshold) | forced
    n_vis = own + 1  # (Sq,)
    # kmax, the widest row, is known on the host (never read back from the device: no sync)
    if selection.tokens is not None:
        kmax = min(blocks_per_query(selection, b), nb)
        k = torch.full_like(n_vis, kmax)
    else:
        k = torch.ceil(selection.density * n_vis.double() - 1e-9).long().clamp_min(1)
        kmax = min(nb, max(1, math.ceil(selection.density * nb - 1e-9)))
    # forced blocks rank first, then by score; a row keeps its k best, never an invisible block
    rank = torch.where(forced, torch.full_like(s, float("inf")), s)
    top = rank.topk(kmax, dim=-1).indices  # (B, Hkv, Sq, kmax)
    take = torch.arange(kmax, device=s.device)[None, :] < k[:, None]  # (Sq, kmax)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, take.expand_as(top))
    return (keep & visible & (rank > float("-inf"))) | forced


def decode_index(keep: torch.Tensor, max_blocks: int | None = None):
    """A decode selection as the sparse decode kernel reads it.

    Args:
        keep: (B, Hkv, nb) bool, one query per row (or (B, Hkv, 1, nb)).
        max_blocks: K, entries per row (default nb). It must be at least the most blocks a row
            keeps (`most_blocks` of the Selection that made `keep`): a row keeping more would
            lose its last ones, and this function does not read the device to check.
    Returns:
        block_index (B, Hkv, K) int32, the kept blocks ascending then padding (-1);
        block_count (B, Hkv) int32.
    """
    if keep.dim() == 4:
        keep = keep[:, :, -1]
    nb = keep.shape[-1]
    K = nb if max_blocks is None else min(int(max_blocks), nb)
    cols = torch.arange(nb, device=keep.device, dtype=torch.int32)
    key = torch.where(keep, cols, cols + nb)  # kept blocks sort first, ascending
    idx = key.sort(dim=-1).values[..., :K]
    count = keep.sum(-1, dtype=torch.int32).clamp_max(K)
    return torch.where(idx < nb, idx, torch.full_like(idx, -1)), count
