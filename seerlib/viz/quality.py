"""Sparsity against quality (notebook 04): perplexity and recall of the attention mass against
the achieved block density per selection method, and passkey retrieval."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from seerlib.names import color, display_name, series


def quality_figure(rows: Sequence[Mapping], length: int | None = None) -> go.Figure:
    """Perplexity (left) and recall of the attention mass (right) against the achieved block
    density, one line per method; dense as a dashed line. `rows` come from
    `seerlib.eval.evaluate` (one length: `length`, default the first)."""
    length = length or rows[0]["length"]
    rows = [r for r in rows if r["length"] == length]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "perplexity (lower is better)", "recall of the attention mass"])
    dense = next((r for r in rows if series(r) == "dense"), None)
    # one line per method and rule (top-k by density, or threshold: dashed)
    lines = list(dict.fromkeys((series(r), r.get("threshold") is not None)
                               for r in rows if series(r) != "dense"))
    for m, by_threshold in lines:
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
                                 "<extra></extra>", **common), row=1, col=2)
    if dense is not None:  # a trace, not a shape: shapes' labels misplace on log axes
        fig.add_trace(go.Scatter(x=[0, 1], y=[dense["ppl"]] * 2, mode="lines",
                                 name=f"dense ({dense['ppl']:.3f})",
                                 line=dict(color="black", dash="dash")), row=1, col=1)
    fig.update_xaxes(title="achieved density (kept share of causal blocks)", range=[0, 1.02])
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=f"Sparsity against quality at {length} tokens "
                      f"({rows[0].get('windows', '?')} window(s) of evaluation text)",
                      height=440)
    return fig


def passkey_figure(accuracy: Mapping[str, Mapping[tuple, float]]) -> go.Figure:
    """Passkey accuracy per method (rows) and (length, depth) (columns): a heatmap.

    Args:
        accuracy: {method label: {(length, depth): share correct}} (`eval.passkey_accuracy`).
    """
    labels = list(accuracy)
    cells = sorted({c for acc in accuracy.values() for c in acc})
    z = [[accuracy[m].get(c, np.nan) for c in cells] for m in labels]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{L} tok, depth {d:.0%}" for L, d in cells], y=labels, zmin=0, zmax=1,
        colorscale="RdYlGn", texttemplate="%{z:.0%}", colorbar=dict(title=dict(text="correct")),
        hovertemplate="%{y}<br>%{x}: %{z:.0%}<extra></extra>"))
    fig.update_layout(title="Passkey retrieval: is the hidden number recalled?",
                      height=max(260, 60 * len(labels) + 140))
    return fig
