"""Attention maps (notebook 01): per-layer, per-head maps of one text, and how many key blocks
each query block needs to cover a share of its attention mass."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from seerlib import ops
from seerlib.families import family_of
from seerlib.metrics import block_mass
from seerlib.viz.common import _map_trace, show

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
            c = self.captured[layer]
            _, pooled = ops.pooled_attention(c.q, c.k, c.v, b, scale=c.scale,
                                             softcap=c.softcap)  # (1, H, nb, nb)
            m = pooled[0].float().numpy().copy()
            nb = m.shape[-1]
            m[:, ~np.tri(nb, dtype=bool)] = np.nan
            self._maps[key] = m
        return self._maps[key]

    def mass(self, layer: int, block_size: int) -> torch.Tensor:
        """(1, H, nb, nb) exact block mass of `layer` (`seerlib.metrics.block_mass`)."""
        key = (layer, block_size)
        if key not in self._mass:
            c = self.captured[layer]
            self._mass[key] = block_mass(c.q, c.k, block_size, scale=c.scale,
                                         softcap=c.softcap)
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


def gated_layers(model, num_keys: int) -> list[int]:
    """The layers SeerAttention applies to at `num_keys` keys: every layer of SmolLM2; Gemma 3's
    global layers only (a sliding-window layer keeps its window, so a full causal map of it would
    show attention the model never computes)."""
    family = family_of(model)
    n = model.config.num_hidden_layers
    return [i for i in range(n) if not family.keeps_own_attention(model.config, i, num_keys)]


def display_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable per-token strings (spaces as '·', newlines as '⏎') for axis labels."""
    return [tokenizer.decode([i]).replace(" ", "·").replace("\n", "⏎") for i in ids]


# ---------------------------------------------------------------- attention maps: figures


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
    # square tiles at any width: the y axis keeps the x axis' scale, the plot shrinks to fit
    fig.update_yaxes(autorange="reversed", title=f"query ({_unit(block)})", tickfont_size=9,
                     showgrid=False, scaleanchor="x", constrain="domain")
    fig.update_xaxes(title=f"key ({_unit(block)})", tickfont_size=9, tickangle=-60, showgrid=False)
    fig.update_layout(title=f"Layer {layer}, head {head} ({_how(block)}, log scale)",
                      plot_bgcolor="white",
                      height=680, margin=dict(l=40, r=20, t=60, b=40))
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
        height=max(360, 22 * L + 140), margin=dict(l=40, r=20, t=60, b=40),
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

    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

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
    # the controls wrap onto more rows in a narrow notebook; the figures stack
    controls = W.HBox([w_layer, w_head, w_block, w_cov, status],
                      layout=W.Layout(flex_flow="row wrap"))
    return W.VBox([controls, out_grid, out_head, out_sparse])
