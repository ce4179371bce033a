"""CUDA graphs of a sparse layer step: capture once per (layer, shapes), then replay.

At short lengths a sparse prefill is bound by the host: the gate, the selection, the index and
the kernel are some 60 small launches per layer, each costing more host time than GPU time.
`StepGraphs.run(key, fn, inputs, out)` captures `fn(*inputs, out)` in a CUDA graph the first time
`key` is seen and replays it afterwards. Inputs are copied into static buffers shared by every
key of the same shapes (layers replay one after another, so one set serves them all), and `fn`
writes its main result into the shared `out` buffer, so memory does not grow with the number of
layers; what `fn` returns (small tensors such as a kept-block count) is per graph.
`statics(specs)` hands out such shared buffers for a caller to fill in place (a kernel writing
its result straight into them, with no copy), and `replay(key, fn, statics)` replays the graph
of `fn(*statics)`; `run` is the two with the inputs copied in.

`fn` must be capturable: no host syncs (`.item()`, `.tolist()`, data-dependent shapes) and no
CPU tensors; seerlib's selection and its `sync_free` block index are written that way.

`capture(fn, device, warmup)` is the one capture recipe (warm-up on a side stream, then the
graph) that `StepGraphs`, `seerlib.prefill_graph.PrefillGraph` and the benchmarks share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["StepGraphs", "capture", "warm_up"]


def warm_up(fn: Callable, device, times: int) -> None:
    """Call fn() `times` times on a side stream and make the current stream wait for it: the
    warm-up CUDA graph capture asks for (lazy initialization, Triton compiles, cuBLAS plans)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    current.wait_stream(side)


def capture(fn: Callable, device, warmup: int = 0, pool=None):
    """`warm_up(fn, device, warmup)`, then fn() captured as a CUDA graph (in memory pool `pool`).
    Returns (the graph, what the captured call returned: tensors of the graph's memory)."""
    warm_up(fn, device, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = fn()
    return graph, result


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

    def statics(self, specs: Sequence[tuple[tuple, torch.dtype, torch.device]]) -> list:
        """The static buffers for these (shape, dtype, device) specs, made on first use and shared
        by every step of the same specs: fill them, then `replay` a step that reads them."""
        specs = tuple((tuple(shape), dtype, device) for shape, dtype, device in specs)
        if specs not in self._buffers:
            self._buffers[specs] = [torch.empty(shape, dtype=dtype, device=device)
                                    for shape, dtype, device in specs]
        return self._buffers[specs]

    def replay(self, key, fn: Callable, statics: Sequence[torch.Tensor]):
        """Replay the graph of `fn(*statics)` for `key` (captured on first use; `statics` from
        `statics()`, already filled) and return what the captured call returned: tensors of the
        graph's memory, overwritten by the graph's next replay."""
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in statics)
        entry = self._graphs.get((key, shapes))
        if entry is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            entry = self._graphs[(key, shapes)] = capture(
                lambda: fn(*statics), statics[0].device, self.warmup, self._pool)
        graph, result = entry
        graph.replay()
        return result

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
        *statics, out = self.statics([(t.shape, t.dtype, t.device) for t in (*inputs, out_like)])
        for s, t in zip(statics, inputs, strict=True):
            s.copy_(t)
        return out, self.replay(key, fn, [*statics, out])
