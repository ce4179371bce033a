"""Perplexity of a causal LM over token windows, with each window's own figure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over windows, with each window's own figure."""

    ppl: float
    nll: float
    tokens: int
    per_window: list[float] = field(default_factory=list)


def _nll(model, ids: torch.Tensor) -> torch.Tensor:
    """(b, S) ids -> (b, S - 1) next-token negative log-likelihoods."""
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise ValueError(f"windows must be (N, S) token ids with S >= 2; got {shape}")


def _result(nlls: list[torch.Tensor]) -> PerplexityResult:
    nll = torch.cat(nlls)  # (N, S - 1)
    mean = nll.double().mean().item()
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, tokens=nll.numel(),
        per_window=[math.exp(x) for x in nll.double().mean(dim=1).tolist()],
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on token windows, each scored on its own (no carried context).

    Args:
        model: a transformers causal LM (sparsified or not).
        windows: (N, S) token ids.
        batch_size: windows per forward.
        progress: show a progress bar.
    Returns:
        PerplexityResult: exp of the mean next-token NLL over all N * (S - 1) predictions, and the
        perplexity of each window.
    """
    _check_windows(windows)
    device = next(model.parameters()).device
    nlls = []
    batches = range(0, windows.shape[0], batch_size)
    for i in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        nlls.append(_nll(model, windows[i : i + batch_size].to(device)).cpu())
    return _result(nlls)
