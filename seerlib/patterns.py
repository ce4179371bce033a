"""Baseline block selections to compare the learned gate with.

Every pattern returns a (B, H, nb, nb) bool block mask (True = tile computed, False above the block
diagonal, the diagonal always kept) for a requested `density`, the target kept share of the causal
blocks, with the same per-row budget k = max(1, int((1 - sqrt(1 - density)) * nb)) that
`seerlib.select.select_blocks` uses, so that patterns and gates compare at equal cost. Measure what
a mask really keeps with `seerlib.select.achieved_density(mask)`.

- `sink_window(nb, density)`: the first `num_sink` key blocks plus the most recent blocks
  (StreamingLLM-like), static.
- `vertical_slash(q, k, density, block_size)`: MInference-like, per head: vertical lines (key
  blocks) and slash lines (block diagonals) ranked by the attention of the last query block.
"""

from __future__ import annotations

import torch

from seerlib.reference import (
    causal_block_count,
    causal_block_mask,
    check_block_size,
    check_qkv,
    check_softcap,
    default_scale,
    grouped_scores,
    num_blocks,
)
from seerlib.select import density_to_k

__all__ = ["sink_window", "vertical_slash"]


def sink_window(
    nb: int,
    density: float,
    num_sink: int = 1,
    batch: int = 1,
    num_heads: int = 1,
    device=None,
) -> torch.Tensor:
    """Sink + sliding-window blocks: per row the first `num_sink` key blocks and the latest ones.

    Args:
        nb: number of blocks, ceil(S / b).
        density: target kept share of causal blocks, in (0, 1]; each row keeps
            k = max(1, int((1 - sqrt(1 - density)) * nb)) blocks (all of them if it has fewer):
            min(num_sink, k - 1) sink blocks and the rest as a window ending on the diagonal.
        num_sink: leading "attention sink" key blocks.
        batch, num_heads: leading dims of the result (the pattern is the same everywhere).
        device: torch device of the result.
    Returns:
        (batch, num_heads, nb, nb) bool.
    """
    if nb <= 0:
        raise ValueError(f"nb must be positive; got {nb}")
    if num_sink < 0:
        raise ValueError(f"num_sink must be >= 0; got {num_sink}")
    k = density_to_k(density, nb)
    sink = min(num_sink, k - 1)
    window = k - sink
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    mask = ((j < sink) | (j > i - window)) & (j <= i)  # (nb, nb)
    return mask.expand(batch, num_heads, nb, nb).clone()


def vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    density: float,
    block_size: int,
    last_q: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """MInference-like vertical + slash block pattern, estimated per head from the last queries.

    The attention of the last `last_q` query tokens to every key is summed per key block
    ("vertical" score of column j) and per block diagonal offset o = i - j measured at token level,
    offset (query position - key position) // b ("slash" score). Lines are taken best-score-first
    (the diagonal, offset 0, always first) until the lines' causal blocks reach the budget of
    density * nb * (nb + 1) / 2 blocks (counted with overlaps, the line that crosses the budget
    included, so the achieved density is close to the target, not exact).

    Args:
        q: (B, Hq, S, d) post-RoPE queries; k: (B, Hkv, S, d) post-RoPE keys.
        density: target kept share of the causal blocks, in (0, 1].
        block_size: tile size b.
        last_q: query tokens used for the estimate, default b (the last query block).
        scale: score scale, 1 / sqrt(d) by default.
        softcap: the model's logit soft-cap c (scores -> c * tanh(scores / c)), or None.
    Returns:
        (B, Hq, nb, nb) bool.
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, k)
    softcap = check_softcap(softcap)
    b = check_block_size(block_size)
    density_to_k(density, 1)  # validates the range
    nb = num_blocks(S, b)
    last_q = min(S, b if last_q is None else int(last_q))
    qpos = torch.arange(S - last_q, S, device=q.device)
    kpos = torch.arange(S, device=q.device)
    s = grouped_scores(q[:, :, S - last_q :].float(), k.float(), default_scale(d, scale))
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # (B, Hq, last_q, S)
    vert = torch.zeros(B, Hq, nb, device=q.device).index_add_(-1, kpos // b, p.sum(dim=2))
    offset = ((qpos[:, None] - kpos[None, :]).clamp_min(0) // b).clamp_max(nb - 1)  # (last_q, S)
    slash = torch.zeros(B, Hq, nb, device=q.device).index_add_(
        -1, offset.reshape(-1), p.reshape(B, Hq, -1)
    )  # (B, Hq, nb): mass per block diagonal offset
    slash[..., 0] = float("inf")  # the diagonal first

    # candidates: vertical line j covers nb - j causal blocks, slash offset o covers nb - o
    cover = torch.cat([nb - torch.arange(nb), nb - torch.arange(nb)]).to(q.device).float()
    score = torch.cat([vert, slash], dim=-1)  # (B, Hq, 2nb)
    order = score.argsort(dim=-1, descending=True)
    cum = cover[order].cumsum(dim=-1)
    budget = density * causal_block_count(nb)
    # take candidates until the budget is reached (the one that crosses it included)
    take_sorted = torch.cat(
        [torch.ones_like(cum[..., :1], dtype=torch.bool), cum[..., :-1] < budget], dim=-1
    )
    take = torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)  # (B, Hq, 2nb)
    cols, diags = take[..., :nb], take[..., nb:]
    i = torch.arange(nb, device=q.device)[:, None]
    j = torch.arange(nb, device=q.device)[None, :]
    mask = cols[:, :, None, :].expand(B, Hq, nb, nb) | diags[..., (i - j).clamp_min(0)]
    return mask & causal_block_mask(nb, q.device)
