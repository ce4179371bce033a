"""Figures and interactive panels for the notebooks.

Every `*_figure` builder returns a plain `plotly.graph_objects.Figure`: it renders in JupyterLab,
survives papermill and exports to self-contained HTML (`seerlib.report` embeds plotly.js once per
page). A `*_panel` builder returns ipywidgets only when `interactive=True`; otherwise it returns the
plain figures of its default view, so the report path never holds widget state.

Importing this module registers the plotly renderer "seerlib" and makes it the default: each figure
is emitted both as plotly JSON (JupyterLab's plotly renderer draws it) and as an HTML div without
plotly.js or MathJax (what nbconvert exports; the report adds plotly.js to the page).

Panels redraw plain figures inside `ipywidgets.Output` areas, so no widget-backed figure (and no
`anywidget`) is needed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

from seerlib.eval import method_of

__all__ = [
    "KEY_FIGURES_MIME",
    "PROVIDER_NAMES",
    "AttentionMaps",
    "GateComparison",
    "LossCurve",
    "METHOD_NAMES",
    "attention_grid_figure",
    "attention_head_figure",
    "attention_maps_panel",
    "bench_records",
    "blocks_to_cover",
    "coverage_density",
    "dense_throughput_figure",
    "display_tokens",
    "gate_files",
    "gate_panel",
    "gate_vs_truth_figure",
    "key_figures",
    "layer_head_heatmap",
    "layer_loss_figure",
    "loss_curve_figure",
    "method_of",
    "passkey_figure",
    "quality_figure",
    "repo_path",
    "show",
    "sparsity_by_layer_figure",
    "sparsity_heatmap_figure",
    "speed_panel",
    "speedup_figure",
    "speedups",
    "table_figure",
]

# Colour range of log-scaled attention maps: probabilities below 10**LOG_FLOOR share one colour.
LOG_FLOOR = -4.0
MAP_COLORSCALE = "Viridis"
KEY_FIGURES_MIME = "application/vnd.seerlib.key-figures+json"


# ---------------------------------------------------------------- rendering


class _OfflineRenderer(pio.base_renderers.MimetypeRenderer):
    """Plotly JSON for JupyterLab plus an HTML div that needs a page-level plotly.js."""

    def to_mimebundle(self, fig_dict):
        bundle = pio.base_renderers.PlotlyRenderer().to_mimebundle(fig_dict)
        bundle["text/html"] = pio.to_html(
            fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
            default_height="520px", validate=False,
        )
        return bundle


pio.renderers["seerlib"] = _OfflineRenderer()
pio.renderers.default = "seerlib"


def show(fig: go.Figure) -> None:
    """Display a figure through the "seerlib" renderer (same as ending a cell with `fig`)."""
    fig.show(renderer="seerlib")


def key_figures(figures: Mapping[str, object], title: str = "Key figures") -> None:
    """Display a notebook's headline numbers as a table; `seerlib.report` collects them for the
    report index (mimetype `KEY_FIGURES_MIME`)."""
    from IPython.display import display

    rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(value)}</td></tr>" for name, value in figures.items()
    )
    html = f"<h4>{title}</h4><table><tr><th>figure</th><th>value</th></tr>{rows}</table>"
    # a list of pairs: notebook JSON sorts object keys, and the order is the author's
    data = {"figures": [[k, v if isinstance(v, (int, float, str, bool)) or v is None else str(v)]
                        for k, v in figures.items()]}
    display({KEY_FIGURES_MIME: data, "text/html": html,
             "text/plain": "\n".join(f"{k}: {_fmt(v)}" for k, v in figures.items())}, raw=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- attention maps: data


def blocks_to_cover(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """Per query-block row, the fewest key blocks whose attention mass reaches `coverage`.

    Args:
        mass: (B, H, nb, nb) row-stochastic block mass (`seerlib.metrics.block_mass`).
        coverage: share of each row's mass to cover, in (0, 1].
    Returns:
        (B, H, nb) int64 counts, at least 1 and at most the row's i + 1 causal blocks.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
    if mass.dim() != 4 or mass.shape[-1] != mass.shape[-2]:
        raise ValueError(f"mass must be (B, H, nb, nb); got {tuple(mass.shape)}")
    nb = mass.shape[-1]
    cum = mass.float().sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (B, H, nb, nb)
    # float sums of a full row can fall a hair short of 1: compare with a small tolerance
    need = (cum < coverage - 1e-6).sum(dim=-1) + 1
    return need.clamp(max=torch.arange(1, nb + 1, device=mass.device))


def coverage_density(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """Share of the causal blocks needed to cover `coverage` of every row's mass: (B, H) float.

    The density a per-row oracle selection needs for that coverage; 1 means no sparsity at all.
    """
    nb = mass.shape[-1]
    return blocks_to_cover(mass, coverage).sum(dim=-1).float() / (nb * (nb + 1) / 2)


@dataclass
class AttentionMaps:
    """One text's per-layer Q/K/V and what the attention-map views compute from them, cached.

    Args:
        captured: {layer: LayerQKV} from `seerlib.capture.capture_qkv` (batch of one).
        tokens: the text's tokens as display strings, length S.
        token_level_max: inputs up to this many tokens are drawn token by token, longer ones
            block-pooled.
    """

    captured: Mapping[int, object]
    tokens: Sequence[str]
    token_level_max: int = 256
    _maps: dict = field(default_factory=dict, repr=False)
    _mass: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.captured)

    @property
    def num_heads(self) -> int:
        return next(iter(self.captured.values())).q.shape[1]

    @property
    def seq_len(self) -> int:
        return len(self.tokens)

    def map_block(self, block_size: int) -> int:
        """The tile size the maps are drawn at: 1 (tokens) for short inputs, else block_size."""
        return 1 if self.seq_len <= self.token_level_max else block_size

    def maps(self, layer: int, block_size: int) -> np.ndarray:
        """(H, nb, nb) max-pooled attention probabilities of `layer` (the SeerAttention target),
        token level for short inputs; NaN above the diagonal."""
        b = self.map_block(block_size)
        key = (layer, b)
        if key not in self._maps:
            from seerlib import ops

            c = self.captured[layer]
            _, pooled = ops.pooled_attention(c.q, c.k, c.v, b)  # (1, H, nb, nb)
            m = pooled[0].float().numpy().copy()
            nb = m.shape[-1]
            m[:, ~np.tri(nb, dtype=bool)] = np.nan
            self._maps[key] = m
        return self._maps[key]

    def mass(self, layer: int, block_size: int) -> torch.Tensor:
        """(1, H, nb, nb) exact block mass of `layer` (`seerlib.metrics.block_mass`)."""
        key = (layer, block_size)
        if key not in self._mass:
            from seerlib.metrics import block_mass

            c = self.captured[layer]
            self._mass[key] = block_mass(c.q, c.k, block_size)
        return self._mass[key]

    def sparsity(self, block_size: int, coverages: Sequence[float]) -> np.ndarray:
        """(L, H, C): density needed to cover each coverage, per layer and head."""
        out = np.zeros((len(self.layers), self.num_heads, len(coverages)))
        for li, layer in enumerate(self.layers):
            mass = self.mass(layer, block_size)
            for ci, c in enumerate(coverages):
                out[li, :, ci] = coverage_density(mass, c)[0].numpy()
        return out

    def labels(self, block: int) -> list[str]:
        """Axis labels: 'position token' for tokens, 'block: first tokens' for blocks (unique)."""
        if block == 1:
            return [f"{i} {t}" for i, t in enumerate(self.tokens)]
        return [f"{i}: {''.join(self.tokens[i * block:i * block + 4])[:18]}"
                for i in range(math.ceil(self.seq_len / block))]


def display_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable per-token strings (spaces as '·', newlines as '⏎') for axis labels."""
    return [tokenizer.decode([i]).replace(" ", "·").replace("\n", "⏎") for i in ids]


# ---------------------------------------------------------------- attention maps: figures


def _log_map(m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.clip(m, 10**LOG_FLOOR, None)).astype(np.float32)


def _log_colorbar(**kw) -> dict:
    ticks = list(range(int(LOG_FLOOR), 1))
    return dict(tickvals=ticks, ticktext=[f"1e{t}" if t else "1" for t in ticks], **kw)


def _map_trace(m: np.ndarray, labels: Sequence[str] | None, show_scale: bool,
               hover: bool = True) -> go.Heatmap:
    return go.Heatmap(
        z=_log_map(m), x=labels, y=labels, zmin=LOG_FLOOR, zmax=0.0,
        colorscale=MAP_COLORSCALE, showscale=show_scale,
        colorbar=_log_colorbar(title=dict(text="prob.")),
        hovertemplate="query %{y}<br>key %{x}<br>log10 p = %{z:.2f}<extra></extra>"
        if hover else None,
    )


def _unit(block: int) -> str:
    return "token" if block == 1 else f"block of {block}"


def _how(block: int) -> str:
    return "token level" if block == 1 else f"max over {block}x{block} tiles"


def attention_grid_figure(maps: np.ndarray, layer: int, block: int,
                          labels: Sequence[str] | None = None, cols: int = 3) -> go.Figure:
    """A grid of one layer's per-head attention maps (log colour scale).

    Args:
        maps: (H, nb, nb) max-pooled attention probabilities, NaN above the diagonal.
        layer: the layer shown (title).
        block: the tile size the maps were pooled at (1: token level).
        labels: nb axis labels (hover only).
        cols: subplot columns.
    """
    H = maps.shape[0]
    rows = math.ceil(H / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(H)],
                        horizontal_spacing=0.03, vertical_spacing=0.06)
    for h in range(H):
        fig.add_trace(_map_trace(maps[h], labels, show_scale=h == 0), row=h // cols + 1,
                      col=h % cols + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, showgrid=False, autorange="reversed")
    fig.update_layout(
        title=f"Layer {layer}: attention per head ({_how(block)}, log scale)",
        plot_bgcolor="white",
        height=300 * rows + 60, margin=dict(l=20, r=20, t=80, b=20),
    )
    return fig


def attention_head_figure(m: np.ndarray, layer: int, head: int, block: int,
                          labels: Sequence[str] | None = None) -> go.Figure:
    """One head's attention map, large, with query/key labels on the axes (log colour scale)."""
    fig = go.Figure(_map_trace(m, labels, show_scale=True))
    fig.update_yaxes(autorange="reversed", title=f"query ({_unit(block)})", tickfont_size=9,
                     showgrid=False)
    fig.update_xaxes(title=f"key ({_unit(block)})", tickfont_size=9, tickangle=-60, showgrid=False)
    fig.update_layout(title=f"Layer {layer}, head {head} ({_how(block)}, log scale)",
                      plot_bgcolor="white",
                      height=680, width=760, margin=dict(l=40, r=20, t=60, b=40))
    return fig


def sparsity_heatmap_figure(density: np.ndarray, coverage: float, block_size: int,
                            layers: Sequence[int] | None = None) -> go.Figure:
    """Layer x head heatmap of the block density needed to cover `coverage` of the attention mass.

    Args:
        density: (L, H) shares of the causal blocks, from `coverage_density`.
    """
    L, H = density.shape
    layers = list(range(L)) if layers is None else list(layers)
    fig = go.Figure(go.Heatmap(
        z=density, x=[f"h{h}" for h in range(H)], y=layers, zmin=0.0, zmax=1.0,
        colorscale="Magma", reversescale=True, texttemplate="%{z:.2f}", textfont_size=9,
        colorbar=dict(title=dict(text="density")),
        hovertemplate="layer %{y}, %{x}<br>density %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title="layer", dtick=1, tickfont_size=9)
    fig.update_xaxes(title="head")
    fig.update_layout(
        title=f"Share of causal blocks (b={block_size}) needed for {coverage:.0%} of the mass "
        f"(mean {density.mean():.2f})",
        height=max(360, 22 * L + 140), width=620, margin=dict(l=40, r=20, t=60, b=40),
    )
    return fig


def sparsity_by_layer_figure(table: np.ndarray, coverages: Sequence[float], block_size: int,
                             layers: Sequence[int] | None = None) -> go.Figure:
    """Per layer, the mean over heads (line) and the range (band) of the density needed for
    each coverage. `table` is (L, H, C) from `AttentionMaps.sparsity`."""
    L = table.shape[0]
    layers = list(range(L)) if layers is None else list(layers)
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd"]
    for ci, c in enumerate(coverages):
        col = colors[ci % len(colors)]
        lo, hi = table[:, :, ci].min(axis=1), table[:, :, ci].max(axis=1)
        fig.add_trace(go.Scatter(x=layers + layers[::-1], y=list(hi) + list(lo[::-1]),
                                 fill="toself", fillcolor=col, opacity=0.15, line_width=0,
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=layers, y=table[:, :, ci].mean(axis=1), name=f"{c:.0%}",
                                 mode="lines+markers", line_color=col))
    fig.update_layout(
        title=f"Density needed per layer (b={block_size}): mean over heads, band = min..max",
        xaxis_title="layer", yaxis_title="share of causal blocks", yaxis_range=[0, 1],
        legend_title="coverage", height=420,
    )
    return fig


# ---------------------------------------------------------------- attention maps: panel


def attention_maps_panel(
    am: AttentionMaps,
    layer: int,
    head: int,
    block_size: int,
    coverage: float,
    interactive: bool,
    block_sizes: Sequence[int] = (16, 32, 64, 128),
    coverages: Sequence[float] = (0.8, 0.9, 0.95, 0.99),
):
    """Head grid, one head large and the layer x head sparsity heatmap, with controls.

    Returns:
        interactive: an `ipywidgets.VBox` with sliders for layer, head, block size and coverage.
        otherwise: [grid figure, head figure, sparsity heatmap] for the given settings.
    """
    def figures(layer, head, block_size, coverage):
        b = am.map_block(block_size)
        maps = am.maps(layer, block_size)
        labels = am.labels(b)
        return (attention_grid_figure(maps, layer, b, labels),
                attention_head_figure(maps[head], layer, head, b, labels),
                sparsity_heatmap_figure(am.sparsity(block_size, [coverage])[:, :, 0], coverage,
                                        block_size, am.layers))

    if not interactive:
        return list(figures(layer, head, block_size, coverage))

    import ipywidgets as W

    style = {"description_width": "initial"}
    w_layer = W.IntSlider(value=layer, min=min(am.layers), max=max(am.layers),
                          description="layer", continuous_update=False, style=style)
    w_head = W.IntSlider(value=head, min=0, max=am.num_heads - 1, description="head",
                         continuous_update=False, style=style)
    sizes = sorted(set(block_sizes) | {block_size})
    w_block = W.SelectionSlider(options=sizes, value=block_size, description="block size",
                                continuous_update=False, style=style)
    covs = sorted(set(coverages) | {coverage})
    w_cov = W.SelectionSlider(options=covs, value=coverage, description="coverage",
                              continuous_update=False, style=style)
    status = W.Label()
    out_grid, out_head, out_sparse = W.Output(), W.Output(), W.Output()

    def draw(out: W.Output, make: Callable[[], go.Figure]) -> None:
        with out:
            out.clear_output(wait=True)
            show(make())

    def redraw_maps(*_):
        status.value = "computing…"
        b = am.map_block(w_block.value)
        maps, labels = am.maps(w_layer.value, w_block.value), am.labels(b)
        draw(out_grid, lambda: attention_grid_figure(maps, w_layer.value, b, labels))
        redraw_head()
        status.value = ""

    def redraw_head(*_):
        b = am.map_block(w_block.value)
        maps, labels = am.maps(w_layer.value, w_block.value), am.labels(b)
        draw(out_head, lambda: attention_head_figure(maps[w_head.value], w_layer.value,
                                                     w_head.value, b, labels))

    def redraw_sparsity(*_):
        status.value = "computing block mass for every layer…"
        dens = am.sparsity(w_block.value, [w_cov.value])[:, :, 0]
        draw(out_sparse, lambda: sparsity_heatmap_figure(dens, w_cov.value, w_block.value,
                                                         am.layers))
        status.value = ""

    w_layer.observe(redraw_maps, "value")
    w_head.observe(redraw_head, "value")
    w_block.observe(redraw_maps, "value")
    w_block.observe(redraw_sparsity, "value")
    w_cov.observe(redraw_sparsity, "value")
    redraw_maps()
    redraw_sparsity()
    controls = W.HBox([w_layer, w_head, w_block, w_cov, status])
    return W.VBox([controls, out_grid, W.HBox([out_head, out_sparse])])


# ---------------------------------------------------------------- generic


def layer_head_heatmap(z: np.ndarray, title: str, colorbar: str, zrange=(0.0, 1.0),
                       colorscale: str = "Viridis", reverse: bool = False, fmt: str = ".2f",
                       layers: Sequence[int] | None = None) -> go.Figure:
    """A layer (rows) x head (columns) heatmap with the values written in the cells."""
    L, H = z.shape
    layers = list(range(L)) if layers is None else list(layers)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"h{h}" for h in range(H)], y=layers, zmin=zrange[0], zmax=zrange[1],
        colorscale=colorscale, reversescale=reverse, texttemplate=f"%{{z:{fmt}}}",
        textfont_size=9, colorbar=dict(title=dict(text=colorbar)),
        hovertemplate=f"layer %{{y}}, %{{x}}<br>{colorbar} %{{z:.4f}}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title="layer", dtick=1, tickfont_size=9)
    fig.update_xaxes(title="head")
    fig.update_layout(title=title, height=max(360, 22 * L + 140), width=620,
                      margin=dict(l=40, r=20, t=60, b=40))
    return fig


# ---------------------------------------------------------------- gate vs truth (notebook 02)


@dataclass
class GateComparison:
    """A trained gate set against the model's own attention on one text, per layer, cached.

    Args:
        captured: {layer: LayerQKV} from `capture_qkv` (batch of one).
        gates: a `seerlib.gate.GateSet` (its block size is the comparison's).
    """

    captured: Mapping[int, object]
    gates: object
    _layers: dict = field(default_factory=dict, repr=False)

    @property
    def block_size(self) -> int:
        return self.gates.block_size

    @property
    def layers(self) -> list[int]:
        return sorted(self.captured)

    def layer(self, layer: int) -> dict:
        """{"mass", "truth", "logits", "pred"}, each (1, Hq, nb, nb): exact block mass, the
        row-normalized max-pooled map (the training target), gate logits and their softmax."""
        if layer not in self._layers:
            from seerlib.metrics import block_maps, normalize_rows

            c = self.captured[layer]
            mass, pooled = block_maps(c.q, c.k, self.block_size)
            with torch.no_grad():
                logits = self.gates[layer](c.q_pre, c.k_pre).float()
            self._layers[layer] = {"mass": mass, "truth": normalize_rows(pooled),
                                   "logits": logits, "pred": torch.softmax(logits, dim=-1)}
        return self._layers[layer]

    def masks(self, layer: int, density: float | None = None,
              threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate mask, oracle mask), (1, Hq, nb, nb) bool. The gate's blocks come from
        `select_blocks`; the oracle keeps the heaviest blocks of the exact mass at the same
        per-head density (`patterns.oracle`)."""
        from seerlib.patterns import oracle
        from seerlib.select import achieved_density, select_blocks

        d = self.layer(layer)
        mask = select_blocks(d["logits"], density=density, threshold=threshold)
        if density is not None:
            return mask, oracle(d["mass"], density)
        heads = [oracle(d["mass"][:, h:h + 1], max(1e-3, achieved_density(mask[:, h:h + 1])))
                 for h in range(mask.shape[1])]
        return mask, torch.cat(heads, dim=1)

    def scores(self, density: float | None = None,
               threshold: float | None = None) -> dict[str, np.ndarray]:
        """Per layer and head, (L, H) arrays: "recall" of the exact mass by the gate's blocks,
        "oracle_recall" at the same density, "kl" (target ‖ gate) and the achieved "density"."""
        from seerlib.metrics import kl_div, recall
        from seerlib.select import causal_block_mask

        out = {k: [] for k in ("recall", "oracle_recall", "kl", "density")}
        for layer in self.layers:
            d = self.layer(layer)
            mask, orc = self.masks(layer, density, threshold)
            out["recall"].append(recall(d["mass"], mask, per_head=True)[0].numpy())
            out["oracle_recall"].append(recall(d["mass"], orc, per_head=True)[0].numpy())
            out["kl"].append(kl_div(d["truth"], d["logits"], reduction="none")[0].mean(-1)
                             .numpy())
            nb = mask.shape[-1]
            kept = (mask & causal_block_mask(nb)).sum(dim=(-1, -2))[0].float()
            out["density"].append((kept / (nb * (nb + 1) / 2)).numpy())
        return {k: np.stack(v) for k, v in out.items()}


_DIFF_COLORS = [(0, "#f2f2f2"), (1, "#2b8cbe"), (2, "#fdae61"), (3, "#d7191c")]


def gate_vs_truth_figure(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                         oracle_mask: np.ndarray, layer: int, head: int,
                         block_size: int, recall: float | None = None) -> go.Figure:
    """Ground truth, gate prediction, selected blocks and their difference from the oracle,
    side by side for one head. Maps are (nb, nb); masks bool (nb, nb)."""
    nb = truth.shape[-1]
    upper = ~np.tri(nb, dtype=bool)
    fig = make_subplots(rows=1, cols=4, horizontal_spacing=0.04, subplot_titles=[
        "ground truth (pooled, row-normalized)", "gate prediction (softmax)",
        "selected blocks", "selection vs oracle"])
    for col, m in ((1, truth), (2, pred)):
        m = np.array(m, dtype=np.float32)
        m[upper] = np.nan
        fig.add_trace(_map_trace(m, None, show_scale=col == 1), row=1, col=col)
    sel = np.where(upper, np.nan, np.asarray(mask, dtype=np.float32))
    fig.add_trace(go.Heatmap(z=sel, zmin=0, zmax=1, showscale=False,
                             colorscale=[[0, "#f2f2f2"], [1, "#08306b"]],
                             hovertemplate="q %{y} k %{x}: kept %{z}<extra></extra>"),
                  row=1, col=3)
    m, o = np.asarray(mask, bool), np.asarray(oracle_mask, bool)
    diff = np.select([m & o, m & ~o, ~m & o], [1, 2, 3], 0).astype(np.float32)
    diff[upper] = np.nan
    scale = []
    for i, (_, c) in enumerate(_DIFF_COLORS):
        scale += [[i / 4, c], [(i + 1) / 4, c]]
    fig.add_trace(go.Heatmap(
        z=diff, zmin=-0.5, zmax=3.5, colorscale=scale,
        colorbar=dict(x=1.08, tickvals=[0, 1, 2, 3],
                      ticktext=["neither", "both", "gate only", "oracle only"]),
        hovertemplate="q %{y} k %{x}: %{z}<extra></extra>"), row=1, col=4)
    fig.update_xaxes(showgrid=False, constrain="domain", title=f"key block (b={block_size})")
    fig.update_yaxes(showgrid=False, autorange="reversed")
    fig.update_yaxes(title="query block", row=1, col=1)
    extra = "" if recall is None else f"; recall of the mass {recall:.3f}"
    fig.update_layout(title=f"Layer {layer}, head {head}: gate vs ground truth{extra}",
                      height=400, plot_bgcolor="white", margin=dict(l=40, r=40, t=80, b=40))
    return fig


def gate_panel(comparisons: Mapping[int, GateComparison], layer: int, head: int,
               density: float | None, threshold: float | None, interactive: bool,
               densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
               thresholds: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)):
    """Gate vs truth for one head plus recall and KL per head across layers, with controls.

    Args:
        comparisons: {block size: GateComparison}, one per available gate file.
    Returns:
        interactive: an `ipywidgets.VBox` with layer, head, block size and density / threshold
        controls. Otherwise: [side-by-side figure, recall heatmap, KL heatmap].
    """
    def figures(b, layer, head, density, threshold):
        gc = comparisons[b]
        d = gc.layer(layer)
        mask, orc = gc.masks(layer, density, threshold)
        sc = gc.scores(density, threshold)
        rule = f"density {density}" if density is not None else f"threshold {threshold:g}"
        return (
            gate_vs_truth_figure(d["truth"][0, head].numpy(), d["pred"][0, head].numpy(),
                                 mask[0, head].numpy(), orc[0, head].numpy(), layer, head, b,
                                 float(sc["recall"][gc.layers.index(layer), head])),
            layer_head_heatmap(sc["recall"], f"Recall of the attention mass, gate at {rule} "
                               f"(mean {sc['recall'].mean():.3f}; oracle "
                               f"{sc['oracle_recall'].mean():.3f})", "recall",
                               colorscale="Viridis", layers=gc.layers),
            layer_head_heatmap(sc["kl"], f"KL(truth ‖ gate) per head (mean {sc['kl'].mean():.3f})",
                               "KL", zrange=(0.0, float(max(0.5, np.percentile(sc["kl"], 95)))),
                               colorscale="Magma", reverse=True, layers=gc.layers),
        )

    b0 = next(iter(comparisons))
    if not interactive:
        return list(figures(b0, layer, head, density, threshold))

    import ipywidgets as W

    gc = comparisons[b0]
    style = {"description_width": "initial"}
    w_block = W.Dropdown(options=sorted(comparisons), value=b0, description="block size",
                         style=style)
    w_layer = W.IntSlider(value=layer, min=min(gc.layers), max=max(gc.layers),
                          description="layer", continuous_update=False, style=style)
    w_head = W.IntSlider(value=head, min=0, max=gc.layer(layer)["logits"].shape[1] - 1,
                         description="head", continuous_update=False, style=style)
    w_rule = W.ToggleButtons(options=["density", "threshold"],
                             value="density" if density is not None else "threshold")
    w_density = W.SelectionSlider(options=sorted(set(densities) | {density or 0.3}),
                                  value=density or 0.3, description="density",
                                  continuous_update=False, style=style)
    w_threshold = W.SelectionSlider(options=sorted(set(thresholds) | {threshold or 1e-3}),
                                    value=threshold or 1e-3, description="threshold",
                                    continuous_update=False, style=style)
    status = W.Label()
    out_head, out_recall, out_kl = W.Output(), W.Output(), W.Output()

    def redraw(*_):
        status.value = "computing…"
        dens = w_density.value if w_rule.value == "density" else None
        thr = w_threshold.value if w_rule.value == "threshold" else None
        figs = figures(w_block.value, w_layer.value, w_head.value, dens, thr)
        for out, fig in zip((out_head, out_recall, out_kl), figs, strict=True):
            with out:
                out.clear_output(wait=True)
                show(fig)
        status.value = ""

    for w in (w_block, w_layer, w_head, w_rule, w_density, w_threshold):
        w.observe(redraw, "value")
    redraw()
    controls = W.VBox([W.HBox([w_block, w_layer, w_head]),
                       W.HBox([w_rule, w_density, w_threshold, status])])
    return W.VBox([controls, out_head, W.HBox([out_recall, out_kl])])


# ---------------------------------------------------------------- training (notebook 03)


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


# ---------------------------------------------------------------- kernel speed (notebook 05)

PROVIDER_NAMES = {"sdpa_flash": "FlashAttention-2 (SDPA)", "sdpa_cudnn": "cuDNN (SDPA)",
                  "flex": "FlexAttention (same mask)", "seer_dense": "our dense kernel"}


def bench_records(folder, gpu: str | None = None) -> tuple[list[dict], list[str]]:
    """Benchmark records of `bench/bench_attention.py` result files in `folder`.

    Takes the sweep files (`<gpu>-<date>[tag].json`, not `-checks` / `-tune`), keeps one GPU
    (`gpu`, else the one with the newest date) and, for a repeated (provider, seq_len, pattern,
    sparsity) point, the record of the newest file.
    Returns:
        (records, the file names used).
    """
    from pathlib import Path

    files = sorted(p for p in Path(folder).glob("*.json")
                   if not p.stem.endswith("-checks") and "-tune" not in p.stem)
    recs = []
    for p in files:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, list):
            recs += [dict(r, _file=p.name) for r in data
                     if isinstance(r, dict) and {"provider", "seq_len", "ms"} <= set(r)]
    if not recs:
        return [], []
    if gpu is None:
        gpu = max(recs, key=lambda r: (r.get("date", ""), r["_file"]))["gpu"]
    recs = [r for r in recs if r.get("gpu") == gpu]
    recs.sort(key=lambda r: (r.get("date", ""), r["_file"]))
    keep = {}
    for r in recs:
        key = (r["provider"], r["seq_len"], r.get("pattern", "dense"),
               round(r.get("target_sparsity", r.get("sparsity", 0.0)), 3))
        keep[key] = r
    out = list(keep.values())
    return out, sorted({r["_file"] for r in out})


def speedups(records: Sequence[Mapping], pattern: str = "random") -> list[dict]:
    """Per seer record of `pattern`: the speedup over each baseline at the same length:
    dense baselines (FA2, cuDNN, our dense kernel) by their sparsity-0 time, FlexAttention by its
    time on the same mask."""
    dense = {(r["provider"], r["seq_len"]): r["ms"] for r in records
             if r.get("pattern", "dense") == "dense"}
    flex = {(r["seq_len"], round(r.get("target_sparsity", r["sparsity"]), 3)): r["ms"]
            for r in records if r["provider"] == "flex" and r.get("pattern") == pattern}
    rows = []
    for r in records:
        if r["provider"] != "seer" or r.get("pattern") != pattern:
            continue
        S, target = r["seq_len"], round(r.get("target_sparsity", r["sparsity"]), 3)
        row = {"seq_len": S, "sparsity": r["sparsity"], "target": target, "ms": r["ms"]}
        for p in ("sdpa_flash", "sdpa_cudnn", "seer_dense"):
            if (p, S) in dense:
                row[p] = dense[(p, S)] / r["ms"]
        if (S, target) in flex:
            row["flex"] = flex[(S, target)] / r["ms"]
        rows.append(row)
    return sorted(rows, key=lambda x: (x["seq_len"], x["sparsity"]))


def speedup_figure(records: Sequence[Mapping], pattern: str = "random",
                   baselines: Sequence[str] = ("sdpa_flash", "sdpa_cudnn", "flex", "seer_dense"),
                   title: str | None = None) -> go.Figure:
    """Speedup of the block-sparse kernel against sparsity, one panel per sequence length, one line
    per baseline, with the ideal 1 / (1 - s) line (log y)."""
    rows = speedups(records, pattern)
    lengths = sorted({r["seq_len"] for r in rows})
    fig = make_subplots(rows=1, cols=max(1, len(lengths)), shared_yaxes=True,
                        subplot_titles=[f"S = {S:,}" for S in lengths])
    colors = {"sdpa_flash": "#1f77b4", "sdpa_cudnn": "#2ca02c", "flex": "#9467bd",
              "seer_dense": "#7f7f7f"}
    for c, S in enumerate(lengths, start=1):
        pts = [r for r in rows if r["seq_len"] == S]
        xs = [r["sparsity"] for r in pts]
        for p in baselines:
            ys = [r.get(p) for r in pts]
            if all(y is None for y in ys):
                continue
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", name=f"vs {PROVIDER_NAMES.get(p, p)}",
                line=dict(color=colors.get(p), dash="dot" if p == "seer_dense" else None),
                legendgroup=p, showlegend=c == 1,
                hovertemplate="sparsity %{x:.2f}: %{y:.2f}x<extra></extra>"), row=1, col=c)
        s = np.linspace(0, max(xs + [0.95]), 50)
        fig.add_trace(go.Scatter(x=s, y=1 / (1 - s), mode="lines", name="ideal 1/(1-s)",
                                 line=dict(color="black", dash="dash", width=1),
                                 legendgroup="ideal", showlegend=c == 1), row=1, col=c)
        fig.add_hline(y=1, line_width=1, line_color="#bbbbbb", row=1, col=c)
    fig.update_yaxes(type="log", tickvals=[0.5, 1, 2, 5, 10, 20, 50],
                     ticktext=["0.5", "1", "2", "5", "10", "20", "50"])
    fig.update_yaxes(title="speedup (x)", row=1, col=1)
    fig.update_xaxes(title="sparsity", range=[-0.03, 1.0])
    gpu = next((r.get("gpu") for r in records if r.get("gpu")), "")
    date = next((r.get("date") for r in records if r.get("date")), "")
    fig.update_layout(title=title or f"Block-sparse attention speedup, {pattern} masks "
                      f"({gpu}, {date}); sparsity = dropped share of the causal blocks", height=460)
    return fig


def table_figure(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                 title: str = "", formats: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> go.Figure:
    """A plain table (list of dicts) as a plotly Table, so it survives HTML export.

    Args:
        rows: one dict per row.
        columns: keys to show, in order (default: the first row's).
        title: figure title.
        formats: format spec per column for floats (default ".4g").
        headers: display name per column (default: the key).
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    formats = dict(formats or {})
    headers = dict(headers or {})

    def cell(v, c):
        if v is None:
            return ""
        if isinstance(v, float):
            return format(v, formats.get(c, ".4g"))
        return str(v)

    fig = go.Figure(go.Table(
        header=dict(values=[headers.get(c, c) for c in columns], align="left",
                    fill_color="#e8e8e8"),
        cells=dict(values=[[cell(r.get(c), c) for r in rows] for c in columns], align="left")))
    fig.update_layout(title=title, height=min(900, (60 if title else 20) + 22 * (len(rows) + 2)),
                      margin=dict(l=10, r=10, t=50 if title else 10, b=10))
    return fig


def speed_panel(records: Sequence[Mapping], pattern: str, interactive: bool):
    """The speedup figure with a pattern selector.

    Returns:
        interactive: an `ipywidgets.VBox` (pattern dropdown + figure); otherwise the figure.
    """
    if not interactive:
        return speedup_figure(records, pattern)
    import ipywidgets as W

    patterns = sorted({r.get("pattern") for r in records if r["provider"] == "seer"})
    w = W.Dropdown(options=patterns, value=pattern if pattern in patterns else patterns[0],
                   description="pattern")
    out = W.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            show(speedup_figure(records, w.value))

    w.observe(redraw, "value")
    redraw()
    return W.VBox([w, out])


def gate_files(gate: str | None, gate_dir: str) -> list:
    """Trained gate files for a notebook: `gate` first (when given and present), then every
    `*.safetensors` in `gate_dir` that is not a training checkpoint; paths relative to the repo."""
    files = [repo_path(gate)] if gate else []
    folder = repo_path(gate_dir)
    if folder.is_dir():
        files += sorted(folder.glob("*.safetensors"))
    return [f for f in dict.fromkeys(files) if f.exists() and ".ckpt" not in f.name]


def repo_path(relative: str):
    """A path inside the source tree (where pyproject.toml is), for notebook parameters."""
    from pathlib import Path

    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists() and (p / "seerlib").is_dir():
            return p / relative
    return Path(__file__).resolve().parent.parent / relative


# ---------------------------------------------------------------- quality (notebook 04)

METHOD_NAMES = {"dense": "dense", "gate": "gate (learned)", "gate+sink": "gate + sink block",
                "gate adaptive": "gate, adaptive budget",
                "gate+sink adaptive": "gate + sink block, adaptive budget",
                "gate+sink+local adaptive": "gate + sink + local block, adaptive budget",
                "gate+sink+local+last adaptive":
                    "gate + sink + local block + dense last row, adaptive budget",
                "gate+sink+local relative": "gate + sink + local block, relative adaptive budget",
                "gate+sink+local+floor0.5 relative":
                    "gate + sink + local block, row floor 0.5, relative adaptive budget",
                "oracle-max relative": "oracle (pooled max), relative adaptive budget",
                "oracle-max adaptive": "oracle (pooled max), adaptive budget",
                "oracle-max": "oracle (pooled max)",
                "oracle-sum": "oracle (attention mass)", "sink_window": "sink + window",
                "vertical_slash": "vertical-slash"}
_METHOD_COLORS = {"gate": "#d62728", "gate+sink": "#ff7f0e", "gate adaptive": "#e377c2",
                  "gate+sink adaptive": "#8c564b", "oracle-max adaptive": "#17becf",
                  "gate+sink+local adaptive": "#bcbd22", "gate+sink+local+last adaptive": "#7f7f7f",
                  "gate+sink+local relative": "#393b79",
                  "gate+sink+local+floor0.5 relative": "#e6550d", "oracle-max relative": "#9edae5",
                  "oracle-max": "#2ca02c",
                  "oracle-sum": "#98df8a", "sink_window": "#1f77b4", "vertical_slash": "#9467bd",
                  "dense": "black"}


def quality_figure(rows: Sequence[Mapping], length: int | None = None) -> go.Figure:
    """Perplexity (left) and recall of the attention mass (right) against the achieved block
    density, one line per method; dense as a dashed line. `rows` come from
    `seerlib.eval.evaluate` (one length: `length`, default the first)."""
    length = length or rows[0]["length"]
    rows = [r for r in rows if r["length"] == length]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "perplexity (lower is better)", "recall of the attention mass"])
    dense = next((r for r in rows if r["mode"] == "dense"), None)
    # one line per method and rule (top-k by density, or threshold: dashed)
    series = list(dict.fromkeys((method_of(r), r.get("threshold") is not None)
                                for r in rows if r["mode"] != "dense"))
    for m, by_threshold in series:
        pts = sorted((r for r in rows if (method_of(r), r.get("threshold") is not None)
                      == (m, by_threshold)), key=lambda r: r["achieved_density"])
        x = [r["achieved_density"] for r in pts]
        name = METHOD_NAMES.get(m, m) + (", threshold" if by_threshold else "")
        common = dict(mode="lines+markers", legendgroup=name,
                      line=dict(color=_METHOD_COLORS.get(m), dash="dot" if by_threshold else None),
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


def dense_throughput_figure(records: Sequence[Mapping]) -> go.Figure:
    """Dense causal attention throughput (TFLOP/s) per provider and sequence length: our dense
    kernel, our pooled kernel (dense + the block max-pooled map the gate trains on), SDPA's
    FlashAttention-2 and cuDNN backends."""
    order = ["seer_dense", "seer_pooled", "sdpa_flash", "sdpa_cudnn"]
    names = {"seer_dense": "ours, dense", "seer_pooled": "ours, dense + pooled map",
             "sdpa_flash": "FlashAttention-2 (SDPA)", "sdpa_cudnn": "cuDNN (SDPA)"}
    colors = {"seer_dense": "#7f7f7f", "seer_pooled": "#d62728", "sdpa_flash": "#1f77b4",
              "sdpa_cudnn": "#2ca02c"}
    dense = [r for r in records if r.get("pattern", "dense") == "dense" and r["provider"] in order]
    lengths = sorted({r["seq_len"] for r in dense})
    fig = go.Figure()
    for p in order:
        by = {r["seq_len"]: r for r in dense if r["provider"] == p}
        if not by:
            continue
        fig.add_trace(go.Bar(
            x=[f"{S:,}" for S in lengths], y=[by[S]["tflops"] if S in by else None
                                             for S in lengths],
            name=names[p], marker_color=colors[p],
            customdata=[by[S]["ms"] if S in by else None for S in lengths],
            hovertemplate="S=%{x}: %{y:.0f} TFLOP/s (%{customdata:.2f} ms)<extra></extra>"))
    gpu = next((r.get("gpu") for r in records if r.get("gpu")), "")
    fig.update_layout(barmode="group", title=f"Dense causal attention throughput ({gpu})",
                      xaxis_title="sequence length", yaxis_title="TFLOP/s", height=400)
    return fig
