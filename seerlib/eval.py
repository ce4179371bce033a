"""Evaluation: perplexity on token windows (more metrics join here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over windows, with each window's own figure."""

    ppl: float
    nll: float
    tokens: int
    per_window: list[float] = field(default_factory=list)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on token windows, each scored on its own (no carried context).

    Args:
        model: a transformers causal LM.
        windows: (N, S) token ids.
        batch_size: windows per forward.
        progress: show a progress bar.
    Returns:
        PerplexityResult: exp of the mean next-token NLL over all N * (S - 1) predictions, and the
        perplexity of each window.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, S) with S >= 2; got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total, count, per_window = 0.0, 0, []
    batches = range(0, windows.shape[0], batch_size)
    for i in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)  # (b, S - 1)
        per_window += [math.exp(x) for x in nll.mean(dim=1).tolist()]
        total += nll.sum().item()
        count += nll.numel()
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, per_window=per_window)
