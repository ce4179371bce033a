"""A whole prefill call as one CUDA graph: capture `model(input_ids=..., **kwargs)` once, replay it.

At short lengths a prefill is bound by the host, dense or sparse: on SmolLM2's shape at 8192
tokens an H100 was busy 24.5 ms of a 70.9 ms sparse call (bench/NOTES.md, 12-07). Per-layer
graphs (`sparsify(cuda_graphs=True)`, `seerlib.graphs`) remove the selection's launches but not
the rest of each layer's Python. `PrefillGraph` captures the model's whole forward at one input
shape, so a replay costs the device's time and one launch.

What can be captured: a forward with no host sync. Dense SDPA is; so is `sparsify` with its
default eager path on the kernel path (the gate's selection goes straight to the sync-free block
index; the kept counts stay on the device). Not capturable, and refused up front: a `sparsify`
handle with `cuda_graphs=True` (a graph inside a graph) or `record_masks=True` (kept for the
host to read), a KV cache (`use_cache=True`: it grows), autograd. A sparsify handle's `stats`
count the captured call once; the device scalars behind them are rewritten by every replay.
"""

from __future__ import annotations

import torch

from seerlib.graphs import capture, warm_up
from seerlib.integrate import active_handle

__all__ = ["PrefillGraph"]


class PrefillGraph:
    """`model(input_ids=ids, **kwargs)` captured as one CUDA graph at `ids`' shape.

    Args:
        model: a transformers causal LM on CUDA, with any `sparsify` handle already enabled.
        input_ids: (B, S) int64 on the model's CUDA device: the shape every replay takes (the
            values are copied; the tensor is not kept).
        warmup: eager calls before the capture (Triton compiles, cuBLAS / cuDNN choose plans).
        **kwargs: the model's keyword arguments for every replay, e.g. `logits_to_keep=1`;
            `use_cache` is False unless given, and True is refused.
    Call: `graph(input_ids)` -> logits (B, logits_to_keep or S, vocab), the graph's own output
    tensor, overwritten by the next replay (clone it to keep it).
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, *, warmup: int = 2,
                 **kwargs):
        if kwargs.setdefault("use_cache", False):
            raise ValueError("PrefillGraph captures a prefill without a KV cache (it would grow "
                             "inside the graph); pass use_cache=False or leave it out")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (kernels compile in it); got {warmup}")
        handle = active_handle(model)
        if handle is not None and (handle.graphs is not None or handle.record_masks):
            raise ValueError(
                f"the model's sparsify handle ({handle!r}) uses "
                f"{'cuda_graphs=True' if handle.graphs is not None else 'record_masks=True'}, "
                "which cannot run inside one graph of the whole forward; enable sparsify with "
                "cuda_graphs=False and record_masks=False for a PrefillGraph")
        self._check_ids(input_ids)
        self.model, self.kwargs = model, kwargs
        self.shape, self.device = tuple(input_ids.shape), input_ids.device
        self._ids = input_ids.detach().clone()
        with torch.no_grad():
            warm_up(self._forward, self.device, warmup)
            try:
                self.graph, self._logits = capture(self._forward, self.device)
            except Exception as e:  # noqa: BLE001 - said again with what to change
                raise RuntimeError(
                    f"capturing the prefill as one CUDA graph failed ({type(e).__name__}: {e}); "
                    "the forward must not sync with the host (.item(), a padding mask, data-"
                    "dependent shapes)") from e

    def _check_ids(self, ids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = (f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor)
                   else type(ids).__name__)
            raise ValueError(f"input_ids must be a (B, S) int64 tensor; got {got}")
        if ids.device.type != "cuda":
            raise ValueError(f"PrefillGraph runs on CUDA; input_ids are on {ids.device}")
        shape = getattr(self, "shape", None)
        if shape is not None and (tuple(ids.shape) != shape or ids.device != self.device):
            raise ValueError(f"this graph was captured for input_ids {shape} on {self.device}; "
                             f"got {tuple(ids.shape)} on {ids.device} (capture another)")

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self._ids, **self.kwargs).logits

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(input_ids)
        self._ids.copy_(input_ids)
        self.graph.replay()
        return self._logits

    def __repr__(self) -> str:
        return f"PrefillGraph(input_ids {self.shape} on {self.device}, {self.kwargs})"
