"""Sparsity against quality (notebook 04): perplexity and recall of the attention mass against
the achieved block density per selection method, the table of the same rows, and passkey
retrieval. Every figure says how many windows it measured, and when a run is too small to rank
methods (`rank_caveat`) it says so on the figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from seerlib.methods import PRESETS
from seerlib.names import color, display_name, series
from seerlib.select import density_to_k
from seerlib.viz.common import table_figure, wrap_title

# Below this many scored tokens (windows x (length - 1)), perplexity differences between methods
# are within the spread of one window to the next: the figure says the run cannot rank methods.
MIN_PREDICTIONS = 16_384
# Series drawn first (and kept when a figure has more than `max_series`): the methods a reader
# compares; the other series stay in the table.
LEAD_SERIES = ("gate", series(PRESETS["recommended"]), "oracle-max", "sink_window",
               "vertical_slash", "oracle-sum")


def method_name(label: str, target: bool = False) -> str:
    """A reader's name for a result row's label or a series: "gate@0.3" -> "gate (learned)",
    the recommended preset's label -> "gate, recommended", "dense" -> "dense"; with `target`,
    a label's budget number follows ("gate (learned) @ 0.3")."""
    if "@" not in label:
        return display_name(label)
    name = display_name(series({"label": label}))
    return name + (f" @ {label.rsplit('@', 1)[1].split('=')[-1]}" if target else "")


def rank_caveat(rows: Sequence[Mapping], block_size: int | None = None) -> str | None:
    """One line saying why these rows cannot rank methods, or None when they can.

    Two reasons, read from the rows: too few scored tokens (`MIN_PREDICTIONS`), or top-k keeping
    one key block per query-block row (k = 1: the diagonal only, so every top-k method keeps the
    same blocks) at some target density. The block count needs `block_size` (or a row's
    "block_size"); without either only the first reason is checked.
    """
    if not rows:
        return None
    out = []
    length = rows[0]["length"]
    windows = max(int(r.get("windows") or 1) for r in rows)
    scored = windows * (length - 1)
    if scored < MIN_PREDICTIONS:
        out.append(f"{windows} window{'s' * (windows > 1)} of {length} tokens ({scored} scored) "
                   "is too few to rank methods")
    b = block_size or next((r["block_size"] for r in rows if r.get("block_size")), None)
    if b:
        nb = math.ceil(length / b)
        ones = sorted({r["density_target"] for r in rows if r.get("density_target")
                       and r.get("threshold") is None and density_to_k(r["density_target"],
                                                                       nb) == 1})
        if ones:
            out.append(f"at target {', '.join(f'{d:g}' for d in ones)} top-k keeps 1 of {nb} "
                       "blocks per row (the diagonal only), the same blocks for every method")
    return "; ".join(out) if out else None


def density_range(rows: Sequence[Mapping]) -> list[float]:
    """An x range that fits the sparse rows' achieved densities, with a margin, within [0, 1]."""
    xs = [r["achieved_density"] for r in rows if series(r) != "dense"] or [0.0, 1.0]
    lo, hi = min(xs), max(xs)
    pad = max(0.08 * (hi - lo), 0.02)
    return [max(0.0, lo - pad), min(1.02, hi + pad)]


def _series_order(keys) -> list[str]:
    lead = [k for k in LEAD_SERIES if k in keys]
    return lead + [k for k in keys if k not in lead]


def _summary(rows: Sequence[Mapping], length: int) -> str:
    """"12 windows of 8192 tokens; achieved density 0.091 / 0.287 at target 0.1 / 0.3" (the
    median over top-k methods per target)."""
    windows = max(int(r.get("windows") or 1) for r in rows)
    topk = [r for r in rows if r.get("density_target") and r.get("threshold") is None]
    targets = sorted({r["density_target"] for r in topk})
    achieved = [float(np.median([r["achieved_density"] for r in topk
                                 if r["density_target"] == t])) for t in targets]
    return (f"{windows} window{'s' * (windows > 1)} of {length} tokens; achieved density "
            + " / ".join(f"{d:.3f}" for d in achieved) + " at target "
            + " / ".join(f"{t:g}" for t in targets))


def quality_figure(rows: Sequence[Mapping], length: int | None = None,
                   block_size: int | None = None, max_series: int = 6,
                   source: str = "") -> go.Figure:
    """Perplexity (top) and recall of the attention mass (below) against the achieved block
    density, one line per method; dense as a dashed line (the first legend entry). Stacked, so
    that both fit a narrow cell.

    Args:
        rows: `seerlib.eval.evaluate` rows (or a result file's); those at `length` are drawn
            (default: the first row's length).
        length: which length.
        block_size: for `rank_caveat`'s k = 1 check (default: the rows' "block_size").
        max_series: at most this many method series are drawn (`LEAD_SERIES` first, threshold
            series after the top-k ones); the subtitle counts those left to the table.
        source: where the rows come from (e.g. "committed, H100"), the subtitle's first line.
    Returns:
        the figure; its subtitle holds the windows, the achieved densities and, when the run is
        too small to rank methods, the caveat (starting "Too small to rank methods:").
    """
    length = length or rows[0]["length"]
    rows = [r for r in rows if r["length"] == length]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["perplexity (lower is better)",
                                        "recall of the attention mass"])
    x_range = density_range(rows)
    dense = next((r for r in rows if series(r) == "dense"), None)
    if dense is not None:  # a trace, not a shape: shapes' labels misplace on log axes
        fig.add_trace(go.Scatter(x=x_range, y=[dense["ppl"]] * 2, mode="lines",
                                 name=f"dense ({dense['ppl']:.3f})",
                                 line=dict(color="black", dash="dash")), row=1, col=1)
    # one line per method and rule (top-k by density, or threshold: dotted)
    keys = _series_order(list(dict.fromkeys(series(r) for r in rows if series(r) != "dense")))
    lines = [(k, t) for t in (False, True) for k in keys
             if any(series(r) == k and (r.get("threshold") is not None) == t for r in rows)]
    left = lines[max_series:]
    for m, by_threshold in lines[:max_series]:
        pts = sorted((r for r in rows if (series(r), r.get("threshold") is not None)
                      == (m, by_threshold)), key=lambda r: r["achieved_density"])
        x = [r["achieved_density"] for r in pts]
        name = display_name(m) + (", threshold" if by_threshold else "")
        common = dict(mode="lines+markers", legendgroup=name,
                      line=dict(color=color(m), dash="dot" if by_threshold else None),
                      customdata=[r.get("density_target") or r.get("threshold") for r in pts])
        fig.add_trace(go.Scatter(x=x, y=[r["ppl"] for r in pts], name=name,
                                 hovertemplate="density %{x:.3f} (target %{customdata})"
                                 "<br>ppl %{y:.3f}<extra></extra>", **common), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[r["recall"] for r in pts], showlegend=False,
                                 hovertemplate="density %{x:.3f}<br>recall %{y:.3f}"
                                 "<extra></extra>", **common), row=2, col=1)
    fig.update_xaxes(range=x_range)
    fig.update_xaxes(title="achieved density (kept share of causal blocks)", row=2, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=2, col=1)
    sub = _summary(rows, length)
    if left:
        sub += f"; {len(left)} more series not drawn"
    caveat = rank_caveat(rows, block_size)
    if caveat:
        sub += f"<br><b>Too small to rank methods:</b> {caveat}."
    if source:
        sub = f"{source}<br>{sub}"
    fig.update_layout(title=dict(text=f"Sparsity against quality at {length} tokens"
                                      f"<br><sub>{sub}</sub>"),
                      height=760 + 20 * (bool(caveat) + bool(source)),
                      margin=dict(t=100 + 20 * (bool(caveat) + bool(source))),
                      legend=dict(orientation="h", y=-0.12, x=0))
    return fig


def quality_table(rows: Sequence[Mapping], title: str, seconds: bool = False) -> go.Figure:
    """Every top-k row (dense first, then by length, method, target): tokens, windows, method,
    target and achieved density, perplexity and its change from dense at that length, recall
    (and the seconds each took, with `seconds`). Tall enough that no row scrolls."""
    dense = {r["length"]: r["ppl"] for r in rows if series(r) == "dense"}
    order = {k: i for i, k in enumerate(_series_order(list(dict.fromkeys(map(series, rows)))))}
    out = [{"tokens": r["length"], "windows": r.get("windows"), "method": display_name(series(r)),
            "target": r.get("density_target"), "density": r["achieved_density"],
            "ppl": r["ppl"], "vs dense": r["ppl"] / dense[r["length"]] - 1
            if r["length"] in dense else None,
            "recall": None if math.isnan(r["recall"]) else r["recall"],
            **({"seconds": r.get("seconds")} if seconds else {})}
           for r in sorted(rows, key=lambda r: (r["length"], series(r) != "dense",
                                                order[series(r)], -(r.get("density_target") or 1)))
           if r.get("threshold") is None]
    fig = table_figure(out, title=title, formats={
        "target": ".2f", "density": ".3f", "ppl": ".3f", "vs dense": "+.2%", "recall": ".3f",
        "seconds": ".0f"})
    widths = [0.6, 0.6, 3.2, 0.6, 0.7, 0.7, 0.8, 0.7] + [0.7] * seconds
    fig.data[0].columnwidth = widths
    # rows wrap where the method's name is longer than its column (~45 characters at 900 px)
    lines = sum(max(1, math.ceil(len(r["method"]) / 45)) for r in out)
    fig.update_layout(height=(60 if title else 20) + 32 + 21 * lines + 8 * len(out))
    return fig


def dense_failures(accuracy: Mapping[str, Mapping[tuple, float]]) -> str | None:
    """A note naming the (length, depth) cells where dense itself reads no key back (there the
    model, not the block selection, fails), or None."""
    dense = accuracy.get("dense", {})
    cells = [c for c, a in sorted(dense.items()) if a == 0]
    if not cells:
        return None
    return ("dense reads no key back at " + ", ".join(f"{L} tok, depth {d:.0%}" for L, d in cells)
            + ": there the model fails, not the selection")


def passkey_figure(accuracy: Mapping[str, Mapping[tuple, float]], note: str = "") -> go.Figure:
    """Passkey accuracy per method (rows) and (length, depth) (columns): a heatmap.

    Args:
        accuracy: {method label: {(length, depth): share correct}} (`eval.passkey_accuracy`).
        note: a line under the title (trials per cell, what a column means).
    """
    labels = list(accuracy)
    cells = sorted({c for acc in accuracy.values() for c in acc})
    z = [[accuracy[m].get(c, np.nan) for c in cells] for m in labels]
    # long method names on two or three lines, so that the cells keep the width of a narrow cell
    names = [wrap_title(m, 26)[0] for m in labels]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{L} tok, depth {d:.0%}" for L, d in cells], y=names, zmin=0, zmax=1,
        colorscale="RdYlGn", texttemplate="%{z:.0%}", colorbar=dict(title=dict(text="correct")),
        hovertemplate="%{y}<br>%{x}: %{z:.0%}<extra></extra>"))
    title = "Passkey retrieval: is the hidden number recalled?"
    fig.update_layout(title=dict(text=title + (f"<br><sub>{note}</sub>" if note else "")),
                      height=max(260, 60 * len(labels) + 140))
    return fig
