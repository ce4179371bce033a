"""How well a block selection or a gate matches the model's own attention.

- `block_mass(q, k, block_size)`: the exact share of attention mass in each (query block, key
  block) tile, averaged over the tile's query rows: (B, Hq, nb, nb), rows sum to 1.
- `recall(weights, block_mask)`: the share of each row's attention mass that the kept blocks hold.
- `kl_div(target, logits)`: KL(target ‖ softmax(logits)) per row, the distillation loss.

The recall table of a gate against the baselines is `seerlib.eval.recall` (one harness with the
quality table's dense pass).
"""

from __future__ import annotations

import torch

from seerlib.reference import (
    check_block_mask,
    check_block_size,
    check_qkv,
    check_softcap,
    default_scale,
    grouped_scores,
    num_blocks,
)

__all__ = [
    "block_maps",
    "block_mass",
    "kl_div",
    "normalize_rows",
    "recall",
]


def normalize_rows(weights: torch.Tensor) -> torch.Tensor:
    """Row-normalize a (..., nb, nb) non-negative map; rows summing to 0 stay 0."""
    w = weights.float()
    s = w.sum(dim=-1, keepdim=True)
    return w / torch.where(s > 0, s, torch.ones_like(s))


def block_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact block maps of the attention probabilities, without the attention output.

    One pass over the scores gives both: the tile-summed mass (what a block selection keeps) and the
    tile max (the distillation ground truth, equal to `reference.pooled_attention`'s map). Only the
    keys up to each query chunk's end are scored under causal masking, and no P @ V is done, so it
    is about twice as fast on a CPU as the full reference.

    Args:
        q: (B, Hq, S, d) post-RoPE queries; k: (B, Hkv, S, d) post-RoPE keys.
        block_size: tile size b.
        causal: causal attention.
        scale: score scale, 1 / sqrt(d) by default.
        softcap: the model's logit soft-cap c (scores -> c * tanh(scores / c), Gemma2), or None.
    Returns:
        mass: (B, Hq, nb, nb) float32; mass[b, h, i, j] = mean over the query rows r of block i of
            the probability mass row r puts on key block j (rows sum to 1).
        pooled: (B, Hq, nb, nb) float32; the largest probability inside each tile (not normalized).
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, k)
    b = check_block_size(block_size)
    nb = num_blocks(S, b)
    scale, softcap = default_scale(d, scale), check_softcap(softcap)
    mass = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    pooled = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    kf = k.float()
    pos = torch.arange(S, device=q.device)
    rows = max(b, (1 << 23) // max(1, B * Hq * S) // b * b)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        kend = r1 if causal else S  # keys past the chunk's last query are all masked
        nk = num_blocks(kend, b)
        # q is scaled first (R * d multiplies instead of R * kend), so the scores take scale 1
        qc = q[:, :, r0:r1].float() * scale
        s = grouped_scores(qc, kf[:, :, :kend], 1.0)  # (B, Hq, R, kend)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if causal:
            s.masked_fill_(pos[None, :kend] > pos[r0:r1, None], float("-inf"))
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        s.div_(s.sum(dim=-1, keepdim=True))  # probabilities (B, Hq, R, kend)
        pad_q = (-(r1 - r0)) % b
        p = torch.nn.functional.pad(s, (0, nk * b - kend, 0, pad_q))  # zeros change no sum or max
        R = p.shape[2]
        # (B, Hq, R, nk*b) -> (B, Hq, R/b, b, nk, b)
        p = p.reshape(B, Hq, R // b, b, nk, b)
        qb = slice(r0 // b, r0 // b + R // b)
        mass[:, :, qb, :nk] = p.sum(dim=(3, 5))
        pooled[:, :, qb, :nk] = p.amax(dim=(3, 5))
    rows_per_block = torch.bincount(pos // b, minlength=nb).float()
    return mass / rows_per_block[None, None, :, None], pooled


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention mass per tile, averaged over each query block's rows: (B, Hq, nb, nb).

    See `block_maps` (q (B, Hq, S, d), k (B, Hkv, S, d) post-RoPE; softcap, the logit soft-cap);
    rows sum to 1.
    """
    return block_maps(q, k, block_size, causal, scale, softcap)[0]


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


# ---------------------------------------------------------------- the recall table
