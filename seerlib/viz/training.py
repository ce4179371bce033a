"""Gate training (notebook 03): the distillation loss and recall curves, drawn live or at the end,
and the loss per layer."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from seerlib.viz.common import show


def loss_curve_figure(history: Sequence[Mapping], title: str = "Gate distillation") -> go.Figure:
    """Training loss (log scale) and recall at the tracked densities against the step; held-out
    values as markers. `history` holds `Distiller.steps()` metrics dicts."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "KL loss (summed over layers)", "recall of the pooled target at density"])
    steps = [m["step"] for m in history]
    fig.add_trace(go.Scatter(x=steps, y=[m["loss"] for m in history], name="train loss",
                             mode="lines", line_color="#1f77b4"), row=1, col=1)
    ev = [m for m in history if "eval_loss" in m]
    if ev:
        fig.add_trace(go.Scatter(x=[m["step"] for m in ev], y=[m["eval_loss"] for m in ev],
                                 name="held-out loss", mode="markers",
                                 marker=dict(size=9, color="#d62728")), row=1, col=1)
    colors = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    densities = list(history[0].get("recall", {})) if history else []
    for i, dens in enumerate(densities):
        col = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=steps, y=[m["recall"][dens] for m in history],
                                 name=f"recall @ {dens}", mode="lines", line_color=col),
                      row=1, col=2)
        if ev and dens in ev[0].get("eval_recall", {}):
            fig.add_trace(go.Scatter(x=[m["step"] for m in ev],
                                     y=[m["eval_recall"][dens] for m in ev],
                                     name=f"held-out @ {dens}", mode="markers",
                                     marker=dict(size=9, color=col, symbol="diamond")),
                          row=1, col=2)
    fig.update_yaxes(type="log", dtick="D2", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title="step")
    fig.update_layout(title=title, height=420)
    return fig


def layer_loss_figure(loss_per_layer: Sequence[float], title: str = "") -> go.Figure:
    """Bar chart of the KL loss of each layer's gate."""
    fig = go.Figure(go.Bar(x=list(range(len(loss_per_layer))), y=list(loss_per_layer)))
    fig.update_layout(title=title or "KL loss per layer (last step)", xaxis_title="layer",
                      yaxis_title="KL", height=360)
    return fig


class LossCurve:
    """Collects training metrics; when interactive, shows a loss curve that redraws as steps come
    in (at most every `every_s` seconds, and on `finish`). In the report path it only collects
    and prints a line every `print_every` steps.
    """

    def __init__(self, interactive: bool, every_s: float = 1.0, print_every: int = 10,
                 title: str = "Gate distillation"):
        self.history: list[dict] = []
        self.interactive, self.every_s, self.print_every = interactive, every_s, print_every
        self.title = title
        self._last = 0.0
        self.output = None
        if interactive:
            # lazy: only a live curve needs widgets and IPython (~0.6 s to import)
            import ipywidgets as W
            from IPython.display import display

            self.output = W.Output()
            display(self.output)

    def update(self, metrics: Mapping) -> None:
        m = {k: v for k, v in metrics.items() if k != "loss_per_layer"}
        self.history.append(m)
        if self.print_every and m["step"] % self.print_every == 0:
            print(f"step {m['step']:4d}  loss {m['loss']:.4f}  recall "
                  + " ".join(f"{k}:{v:.3f}" for k, v in m.get("recall", {}).items()), flush=True)
        if self.output is not None and time.time() - self._last >= self.every_s:
            self._draw()

    def finish(self) -> go.Figure:
        fig = self.figure()
        if self.output is not None:
            self._draw()
        return fig

    def figure(self) -> go.Figure:
        return loss_curve_figure(self.history, self.title)

    def _draw(self) -> None:
        with self.output:
            self.output.clear_output(wait=True)
            show(self.figure())
        self._last = time.time()
