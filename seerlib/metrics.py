"""How well a block selection or a gate matches the model's own attention.

- `block_mass(q, k, block_size)`: the exact share of attention mass in each (query block, key
  block) tile, averaged over the tile's query rows: (B, Hq, nb, nb), rows sum to 1.
- `recall(weights, block_mask)`: the share of each row's attention mass that the kept blocks hold.
- `kl_div(target, logits)`: KL(target ‖ softmax(logits)) per row, the distillation loss.
- `recall_table(...)` / `python -m seerlib.metrics`: the README's recall table (gate vs baselines).
"""

from __future__ import annotations

import math

import torch

from seerlib.reference import check_block_mask, check_block_size, check_qkv, num_blocks

__all__ = ["block_mass", "kl_div", "normalize_rows", "recall"]


def normalize_rows(weights: torch.Tensor) -> torch.Tensor:
    """Row-normalize a (..., nb, nb) non-negative map; rows summing to 0 stay 0."""
    w = weights.float()
    s = w.sum(dim=-1, keepdim=True)
    return w / torch.where(s > 0, s, torch.ones_like(s))


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention mass per tile, averaged over each query block's rows.

    Args:
        q: (B, Hq, S, d) post-RoPE queries; k: (B, Hkv, S, d) post-RoPE keys.
        block_size: tile size b.
        causal: causal attention.
        scale: score scale, 1 / sqrt(d) by default.
    Returns:
        mass: (B, Hq, nb, nb) float32; mass[b, h, i, j] = mean over query rows r of block i of the
        softmax probability mass that row r puts on key block j. Each row sums to 1.
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, k)
    b = check_block_size(block_size)
    nb = num_blocks(S, b)
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mass = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, S, d)
    pos = torch.arange(S, device=q.device)
    key_block = pos // b
    rows = max(b, (1 << 24) // max(1, B * Hq * S) // b * b)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, group, r1 - r0, d)
        s = torch.matmul(qc, kf.transpose(-1, -2)).reshape(B, Hq, r1 - r0, S) * scale
        if causal:
            s = s.masked_fill(pos[None, :] > pos[r0:r1, None], float("-inf"))
        p = torch.softmax(s, dim=-1)  # (B, Hq, R, S)
        # sum probabilities over key blocks: (B, Hq, R, S) -> (B, Hq, R, nb)
        pk = torch.zeros(B, Hq, r1 - r0, nb, device=q.device).index_add_(-1, key_block, p)
        qb = pos[r0:r1] // b
        mass.index_add_(2, qb, pk)  # sum rows into their query block
    counts = torch.bincount(key_block, minlength=nb).float()  # rows per query block
    return mass / counts[None, None, :, None]


def recall(
    weights: torch.Tensor,
    block_mask: torch.Tensor,
    per_head: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """The share of each row's attention mass that the kept blocks hold.

    Args:
        weights: (B, H, nb, nb) non-negative block weights: `block_mass` (exact attention mass) or
            a pooled map from `pooled_attention` (a proxy). Rows are normalized to sum 1 first
            unless `normalize=False`.
        block_mask: (B, H, nb, nb) bool, True = kept.
        per_head: return (B, H), the mean over query-block rows per head; else the scalar mean.
        normalize: row-normalize the weights.
    Returns:
        float32 tensor: (B, H) if per_head else a 0-D mean over batches, heads and rows.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise ValueError(
            f"weights must be (B, H, nb, nb); got {getattr(weights, 'shape', weights)}"
        )
    B, H, nb, nb2 = weights.shape
    if nb != nb2:
        raise ValueError(f"weights must be square in its last two dims; got {tuple(weights.shape)}")
    check_block_mask(block_mask, B, H, nb)
    w = normalize_rows(weights) if normalize else weights.float()
    row = (w * block_mask).sum(dim=-1)  # (B, H, nb)
    per = row.mean(dim=-1)
    return per if per_head else per.mean()


def kl_div(
    target: torch.Tensor,
    logits: torch.Tensor,
    skip_rows: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(target ‖ softmax(logits)) over key blocks.

    Args:
        target: (B, H, nb, nb) row-normalized target distribution (zeros above the diagonal).
        logits: (B, H, nb, nb) logits, -inf above the diagonal.
        skip_rows: leave out the first this-many query-block rows.
        reduction: "mean" (over batches, heads and kept rows) or "none" -> (B, H, nb - skip_rows).
    Returns:
        float32 tensor.
    """
    if target.shape != logits.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)}; logits have {tuple(logits.shape)}"
        )
    t = target[..., skip_rows:, :].float()
    logp = torch.log_softmax(logits[..., skip_rows:, :].float(), dim=-1)
    # 0 * log 0 = 0, and never 0 * (-inf)
    terms = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    kl = terms.sum(dim=-1)
    if reduction == "none":
        return kl
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    return kl.mean()
