"""CUDA graphs of a sparse layer step: capture once per (layer, shapes), then replay.

At short lengths a sparse prefill is bound by the host: the gate, the selection, the index and
the kernel are some 60 small launches per layer, each costing more host time than GPU time.
`StepGraphs.run(key, fn, inputs, out)` captures `fn(*inputs, out)` in a CUDA graph the first time
`key` is seen and replays it afterwards. Inputs are copied into static buffers shared by every
key of the same shapes (layers replay one after another, so one set serves them all), and `fn`
writes its main result into the shared `out` buffer, so memory does not grow with the number of
layers; what `fn` returns (small tensors such as a kept-block count) is per graph.

`fn` must be capturable: no host syncs (`.item()`, `.tolist()`, data-dependent shapes) and no
CPU tensors; seerlib's selection and its `sync_free` block index are written that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["StepGraphs"]


class StepGraphs:
    """Captured steps, their static buffers and one memory pool (see the module docstring)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._graphs: dict = {}  # key -> (graph, outputs)
        self._buffers: dict = {}  # shapes -> (static inputs, static out)
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._buffers.clear()
        self._pool = None

    def _statics(self, inputs: Sequence[torch.Tensor], out_like: torch.Tensor):
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in (*inputs, out_like))
        if shapes not in self._buffers:
            self._buffers[shapes] = ([torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                      for t in inputs], torch.empty_like(out_like))
        return shapes, *self._buffers[shapes]

    def run(self, key, fn: Callable, inputs: Sequence[torch.Tensor], out_like: torch.Tensor):
        """Run `fn(*inputs, out)` through the graph of `key` (captured on first use).

        Args:
            key: what makes a step distinct besides its shapes (e.g. the layer index).
            fn: the step; writes into `out` (shaped like `out_like`) and returns small tensors.
            inputs: the step's tensors, copied into the static buffers.
            out_like: a tensor of the output's shape and dtype (its values are not read).
        Returns:
            (out, what `fn` returned): `out` is the shared buffer, valid until the next run of a
            step of the same shapes: copy it (the caller's `.contiguous()` on a transpose does).
        """
        shapes, statics, out = self._statics(inputs, out_like)
        for s, t in zip(statics, inputs, strict=True):
            s.copy_(t)
        entry = self._graphs.get((key, shapes))
        if entry is None:
            current = torch.cuda.current_stream(out.device)
            side = torch.cuda.Stream(out.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs ask
                for _ in range(self.warmup):
                    fn(*statics, out)
            current.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                result = fn(*statics, out)
            entry = self._graphs[(key, shapes)] = (graph, result)
        graph, result = entry
        graph.replay()
        return out, result
