"""Block selection: gate logits (or any block score map) -> boolean block mask (B, H, nb, nb).

Two rules (SEERATTENTION.md §5):
- density ρ: per query-block row keep the top k = max(1, int((1 - sqrt(1 - ρ)) * nb)) causal key
  blocks (at most the row's i + 1 causal blocks), so the kept share of the causal triangle is ≈ ρ.
- threshold τ: keep the blocks whose softmax over the row's key blocks exceeds τ.
- adaptive density (`adaptive=True`): the same number of blocks as top-k at ρ keeps per (batch,
  layer), spread over the heads and rows by that softmax score instead of k per row: the threshold
  rule with τ calibrated to the budget, so heads and rows that need more blocks get them and the
  achieved density equals top-k's exactly.
- relative adaptive density (`adaptive=True, relative=True`): the same budget, ranked by the score
  relative to a uniform row (softmax × the row's causal block count), so long rows, whose
  probabilities are small only because they are spread over more blocks, are not starved.
- a row floor (`adaptive=True, row_floor=f`): before the budget is spread, every row keeps its
  best ceil(f × k) blocks (k = top-k's count for the row), so no row falls below that share (the
  relative ranking would otherwise starve the short early rows); f=0 is the adaptive rule, f=1 is
  top-k.

Forced blocks (the diagonal unless `keep_diagonal=False`, block 0 with `keep_sink=True`, the
`keep_local` blocks left of the diagonal, whole rows with `dense_last_rows`) are always kept; under
a density they count toward the row's k. Blocks above the diagonal are never kept.
`achieved_density(mask)` reports the kept share of the causal blocks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["achieved_density", "causal_block_mask", "check_budget_options", "density_to_k",
           "select_blocks"]


def density_to_k(density: float, nb: int) -> int:
    """Blocks kept per row for a target density: max(1, int((1 - sqrt(1 - density)) * nb))."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    return max(1, int((1.0 - math.sqrt(1.0 - density)) * nb))


def check_budget_options(adaptive: bool, relative: bool, row_floor: float) -> None:
    """Raise ValueError unless `relative` and `row_floor` come with `adaptive` and the floor is a
    share in [0, 1] (shared by `select_blocks` and `integrate.SparseConfig`)."""
    if relative and not adaptive:
        raise ValueError("relative=True asks for the relative ranking of an adaptive budget; "
                         "it needs adaptive=True")
    if row_floor and not adaptive:
        raise ValueError("row_floor is a floor under the adaptive budget; it needs adaptive=True")
    if not 0.0 <= row_floor <= 1.0:
        raise ValueError(f"row_floor must be in [0, 1] (a share of top-k's blocks per row); "
                         f"got {row_floor}")


def causal_block_mask(nb: int, device=None) -> torch.Tensor:
    """(nb, nb) bool, True on and below the block diagonal."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def achieved_density(block_mask: torch.Tensor) -> float:
    """Kept share of the causal blocks of a (..., nb, nb) bool mask, over all batches and heads."""
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError("block_mask must be a torch.bool tensor of shape (..., nb, nb)")
    nb = block_mask.shape[-1]
    causal = causal_block_mask(nb, block_mask.device)
    n_mats = block_mask.numel() // (nb * nb)
    return float((block_mask & causal).sum()) / (n_mats * nb * (nb + 1) / 2)


def select_blocks(
    logits: torch.Tensor,
    density: float | None = None,
    threshold: float | None = None,
    keep_diagonal: bool = True,
    keep_sink: bool = False,
    dense_last_rows: int = 0,
    adaptive: bool = False,
    keep_local: int = 0,
    relative: bool = False,
    row_floor: float = 0.0,
) -> torch.Tensor:
    """Choose the (query block, key block) tiles to compute.

    Args:
        logits: (B, H, nb, nb) block scores, higher = more important (gate logits; any monotone
            score such as a pooled attention map works for `density`). Entries above the diagonal
            are ignored.
        density: target kept share of the causal blocks, in (0, 1]; top-k per row.
        threshold: keep blocks whose softmax over the row's causal key blocks exceeds it.
            Exactly one of density / threshold.
        keep_diagonal: always keep block (i, i), so no row is empty.
        keep_sink: always keep block (i, 0).
        dense_last_rows: keep every causal block of the last this-many query-block rows.
        keep_local: always keep blocks (i, i - 1) ... (i, i - keep_local), a local band.
        adaptive: with `density`, keep as many blocks as top-k would over all heads and rows of
            each batch element, the ones with the highest row-softmax score (forced blocks first).
        relative: with `adaptive`, rank by row-softmax score × the row's number of causal blocks
            (1 = a uniform row's share), not by the raw score.
        row_floor: with `adaptive`, in [0, 1]: each row first keeps its ceil(row_floor × k_row)
            highest-scoring blocks (forced ones first; k_row = top-k's count for the row), and
            the rest of the budget is spread as `adaptive` spreads it. The budget is unchanged.
    Returns:
        block_mask: (B, H, nb, nb) bool, False above the diagonal. Use `achieved_density(mask)`
        for the kept share of causal blocks.
    """
    if (density is None) == (threshold is None):
        raise ValueError(
            f"give exactly one of density or threshold; got density={density}, "
            f"threshold={threshold}"
        )
    if (
        not isinstance(logits, torch.Tensor)
        or logits.dim() != 4
        or logits.shape[-1] != logits.shape[-2]
    ):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, H, nb, nb) tensor; got {shape}")
    if adaptive and density is None:
        raise ValueError("adaptive=True spreads a density's block budget; give a density")
    check_budget_options(adaptive, relative, row_floor)
    if dense_last_rows < 0 or keep_local < 0:
        raise ValueError(
            f"dense_last_rows and keep_local must be >= 0; got {dense_last_rows}, {keep_local}"
        )
    nb = logits.shape[-1]
    device = logits.device
    causal = causal_block_mask(nb, device)
    forced = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    if keep_diagonal:
        forced |= torch.eye(nb, dtype=torch.bool, device=device)
    if keep_sink:
        forced[:, 0] = True
    if keep_local:
        forced |= causal & ~causal.tril(-keep_local - 1)
    if dense_last_rows:
        forced[max(0, nb - dense_last_rows) :] = True
    forced &= causal

    scores = logits.float().masked_fill(~causal, float("-inf"))
    if adaptive:
        k = density_to_k(density, nb)
        k_row = causal.sum(-1).clamp(max=k)  # top-k's count per row
        budget = (k_row.sum() * logits.shape[1]).item()
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        if relative:
            probs = probs * causal.sum(-1, keepdim=True)
        # causal blocks rank by score; forced ones above all; non-causal ones below all
        rank = torch.where(causal, probs, torch.full_like(probs, -1.0))
        rank = torch.where(forced, torch.full_like(probs, float("inf")), rank)
        if row_floor:
            # each row's best ceil(f * k_row) blocks: a prefix of top-k's choice, so within budget
            floor_k = torch.ceil(row_floor * k_row - 1e-6).long()
            best = rank.topk(int(floor_k.max()), dim=-1).indices
            take = torch.arange(best.shape[-1], device=device) < floor_k[:, None]
            floor = torch.zeros_like(rank, dtype=torch.bool)
            floor.scatter_(-1, best, take.expand_as(best))
            rank = torch.where(floor, torch.full_like(probs, float("inf")), rank)
            forced = forced | floor
        rank = rank.flatten(1)
        top = rank.topk(budget, dim=-1).indices  # (B, budget); budget <= causal blocks
        mask = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, top, True)
        return mask.view_as(scores) | forced
    if density is not None:
        k = density_to_k(density, nb)
        # forced blocks rank first, then by score; masked (-inf) blocks never beat a causal one
        rank = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        rank = torch.nan_to_num(rank, nan=float("-inf"))
        top = rank.topk(min(k, nb), dim=-1).indices  # (B, H, nb, k)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        # a row i has only i + 1 causal blocks; topk may have picked masked ones there
        mask &= causal
    else:
        probs = torch.softmax(scores, dim=-1)
        mask = (probs > threshold) & causal
    return mask | forced
