"""Gate training (notebook 03): the window cache built with a progress bar, the distillation loss
and recall curves, drawn live or at the end with "step n / N" and the time left, and the loss per
layer."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from seerlib.data import token_windows
from seerlib.select import density_to_k
from seerlib.targets import WindowCache, build_cache, cache_folder
from seerlib.viz.common import show


def build_caches(model, tokenizer, model_name: str, block_size: int, seq_len: int,
                 windows: Mapping[str, int], interactive: bool = True) -> dict[str, WindowCache]:
    """`targets.build_cache` for each split's windows ({"train": 8, "eval": 2}), one window at a
    time, with progress: a tqdm bar (windows done, time left) when `interactive`, else a printed
    `progress_text` line per window (what a static report keeps). Windows already cached are
    only checked.

    Returns:
        {split: its WindowCache, preloaded}.
    """
    caches = {}
    for split, n in windows.items():
        t0 = time.time()
        folder = cache_folder(model, model_name, block_size, seq_len, split)
        ids = token_windows(tokenizer, split, seq_len, n)  # (n, seq_len)
        bar = tqdm(total=n, desc=f"{split} cache", unit="window") if interactive else None
        for i in range(n):
            build_cache(model, ids, folder, block_size, indices=[i], log=None)
            if bar is not None:
                bar.update()
            else:
                text = progress_text(i + 1, n, time.time() - t0).replace("step", "window", 1)
                print(f"{split} cache: {text}", flush=True)
        if bar is not None:
            bar.close()
        caches[split] = WindowCache(folder, n, preload=True)
        print(f"{split}: {n} windows of {seq_len} tokens cached in {folder.name} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return caches


def tracked_densities(seq_len: int, block_size: int,
                      candidates: Sequence[float] = (0.5, 0.4, 0.3, 0.2, 0.1)) -> tuple:
    """The candidate densities whose top-k keeps more than one block per row at this length and
    each a different number (k = 1 keeps only the diagonal, so its recall is flat by
    construction); the largest candidate when none does."""
    nb = math.ceil(seq_len / block_size)
    out, seen = [], set()
    for d in sorted(candidates, reverse=True):
        k = density_to_k(d, nb)
        if k > 1 and k not in seen:
            out.append(d)
            seen.add(k)
    return tuple(out) or (max(candidates),)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi]: 1, 2, 5 x 10^n when it spans at most two
    decades, powers of ten otherwise; always at least the two ends' neighbours."""
    if not (lo > 0 and hi > 0):
        return []
    lo, hi = min(lo, hi), max(lo, hi)
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if b - a <= 2 else (1,)
    ticks = [m * 10.0**e for e in range(a, b + 1) for m in steps]
    inside = [t for t in ticks if lo <= t * (1 + 1e-9) and t <= hi * (1 + 1e-9)]
    if len(inside) < 2:  # a narrow range: the ticks either side
        below = max((t for t in ticks if t <= lo), default=ticks[0])
        above = min((t for t in ticks if t >= hi), default=ticks[-1])
        inside = sorted({below, *inside, above})
    return [float(f"{t:.6g}") for t in inside]


def progress_text(step: int, total: int | None, elapsed_s: float) -> str:
    """ "step 12 / 100, 0:35 elapsed, about 4:17 left" (no total: only the step and elapsed)."""
    def mmss(s):
        s = int(round(s))
        return f"{s // 60}:{s % 60:02d}"

    if not total:
        return f"step {step}, {mmss(elapsed_s)} elapsed"
    left = elapsed_s / max(step, 1) * max(total - step, 0)
    return f"step {step} / {total}, {mmss(elapsed_s)} elapsed, about {mmss(left)} left"


def loss_curve_figure(history: Sequence[Mapping], title: str = "Gate distillation",
                      blocks: int | None = None, status: str = "") -> go.Figure:
    """Training loss (log scale) and recall at the tracked densities against the step; held-out
    values as markers. `history` holds `Distiller.steps()` metrics dicts; `blocks` (key blocks
    per row at the window length) names each density's k in the legend and notes a k = 1 line;
    `status` (e.g. `progress_text`) goes under the title."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=[
        "KL loss (sum over layers)", "recall at density"])
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
    flat = []
    for i, dens in enumerate(densities):
        col = colors[i % len(colors)]
        k = density_to_k(float(dens), blocks) if blocks else None
        flat += [dens] if k == 1 else []
        fig.add_trace(go.Scatter(x=steps, y=[m["recall"][dens] for m in history],
                                 name=f"recall @ {dens}" + (f" ({k} of {blocks} blocks)" if k
                                                            else ""),
                                 mode="lines", line_color=col), row=1, col=2)
        if ev and dens in ev[0].get("eval_recall", {}):
            fig.add_trace(go.Scatter(x=[m["step"] for m in ev],
                                     y=[m["eval_recall"][dens] for m in ev],
                                     name=f"held-out @ {dens}", mode="markers",
                                     marker=dict(size=9, color=col, symbol="diamond")),
                          row=1, col=2)
    losses = [m["loss"] for m in history] + [m["eval_loss"] for m in ev]
    ticks = log_ticks(min(losses), max(losses)) if losses else []
    fig.update_yaxes(type="log", tickvals=ticks or None, ticktext=[f"{t:g}" for t in ticks]
                     or None, row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title="recall of the pooled target", row=1, col=2)
    fig.update_xaxes(title="step")
    sub = [status] if status else []
    if flat:
        sub.append(f"recall @ {', '.join(flat)} keeps 1 block per row (the diagonal only): "
                   "flat by construction")
    # the notes and the legend take their own rows (above and below the plots), so that nothing
    # overlaps the subplot titles in a narrow cell
    fig.update_layout(title=dict(text=title + "".join(f"<br><sub>{s}</sub>" for s in sub)),
                      legend=dict(orientation="h", y=-0.25, yanchor="top", x=0),
                      height=480 + 22 * len(sub), margin=dict(t=100 + 22 * len(sub), b=110))
    return fig


def layer_loss_figure(loss_per_layer: Sequence[float], title: str = "") -> go.Figure:
    """Bar chart of the KL loss of each layer's gate."""
    fig = go.Figure(go.Bar(x=list(range(len(loss_per_layer))), y=list(loss_per_layer)))
    fig.update_layout(title=title or "KL loss per layer (last step)", xaxis_title="layer",
                      yaxis_title="KL", height=360)
    return fig


class LossCurve:
    """Collects training metrics; when interactive, shows a loss curve that redraws as steps come
    in (at most every `every_s` seconds, and on `finish`), titled with "step n / total" and the
    time left. In the report path it only collects and prints that line (and the loss) every
    `print_every` steps and at the last one.
    """

    def __init__(self, interactive: bool, every_s: float = 1.0, print_every: int = 10,
                 title: str = "Gate distillation", total: int | None = None,
                 blocks: int | None = None):
        self.history: list[dict] = []
        self.interactive, self.every_s, self.print_every = interactive, every_s, print_every
        self.title, self.total, self.blocks = title, total, blocks
        self._last = 0.0
        self._t0 = self._t_step = time.time()
        self.output = None
        if interactive:
            # lazy: only a live curve needs widgets and IPython (~0.6 s to import)
            import ipywidgets as W
            from IPython.display import display

            self.output = W.Output()
            display(self.output)

    def status(self) -> str:
        """`progress_text` of the last step (timed when it came in)."""
        step = self.history[-1]["step"] if self.history else 0
        return progress_text(step, self.total, self._t_step - self._t0)

    def update(self, metrics: Mapping) -> None:
        m = {k: v for k, v in metrics.items() if k != "loss_per_layer"}
        self.history.append(m)
        self._t_step = time.time()
        last = self.total is not None and m["step"] >= self.total
        if self.print_every and (m["step"] % self.print_every == 0 or last):
            print(f"{self.status()}  loss {m['loss']:.4f}  recall "
                  + " ".join(f"{k}:{v:.3f}" for k, v in m.get("recall", {}).items()), flush=True)
        if self.output is not None and time.time() - self._last >= self.every_s:
            self._draw()

    def finish(self) -> go.Figure:
        fig = self.figure()
        if self.output is not None:
            self._draw()
        return fig

    def figure(self) -> go.Figure:
        return loss_curve_figure(self.history, self.title, self.blocks, self.status())

    def _draw(self) -> None:
        with self.output:
            self.output.clear_output(wait=True)
            show(self.figure())
        self._last = time.time()
