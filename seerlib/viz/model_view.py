"""The model view (notebook 01): every layer x head of one text as block-pooled thumbnails in one
figure, with one head enlarged beside the grid (bertviz's model view, CircuitsVis' head grid).

Hover over a thumbnail previews that head in the enlarged panel; a click pins it there (CircuitsVis'
head grid). In an exported report this runs in the page (`CLICK_SCRIPT`, added by the "seerlib"
renderer to figures whose `layout.meta` asks for it) and a dropdown of layer/head swaps the same
frames, so it works offline without a kernel. In a live kernel (`model_view_panel(...,
interactive=True)`) the figure is a `go.FigureWidget` whose click and hover callbacks swap the
enlarged map, and the chosen head is also drawn at full resolution below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from seerlib.viz.common import (
    LOG_FLOOR,
    MAP_COLORSCALE,
    POST_SCRIPTS,
    _log_colorbar,
    _log_map,
    show,
)

# the thumbnails are max-pooled further until a map has at most this many tiles per side (at
# ~50 px a thumbnail, 16 tiles are 3 px each: more would not show, only weigh), the enlarged head
# to at most BIG_BLOCKS; every head's enlarged map travels in the figure (one frame each: at
# SmolLM2's 270 heads, 24 tiles a side weigh 1.7 MB of the page, 32 would weigh 3 MB)
THUMB_BLOCKS = 16
BIG_BLOCKS = 24
# the width the geometry is laid out for: a 1000 px JupyterLab window with its file browser open
# leaves a cell about 570 px
WIDTH = 560
CLICK_META = "seerlib-model-view"  # layout.meta of a model view: the renderer adds CLICK_SCRIPT

# In a report page: hover shows a thumbnail's head in the enlarged panel (the data of its frame,
# named by the trace's meta), leaving it brings back the pinned head, a click pins one.
# "{plot_id}" is filled in by plotly.io.to_html(post_script=...).
CLICK_SCRIPT = """
(function () {
  var gd = document.getElementById('{plot_id}');
  if (!gd || !gd.on) return;
  var pinned = null;
  // the enlarged trace takes the head's frame data by restyle (Plotly.animate, interrupted by
  // the next hover, rejects promises it does not hand back)
  var current = null;
  function show(name) {
    var hash = gd._transitionData && gd._transitionData._frameHash;
    var frame = hash && hash[name];
    if (!frame || name === current) return;
    current = name;
    var d = frame.data[0];
    Plotly.restyle(gd, {z: [d.z], customdata: [d.customdata], hovertemplate: [d.hovertemplate]},
                   frame.traces);
  }
  function head(ev) { return ev && ev.points && ev.points[0] && ev.points[0].data.meta; }
  gd.on('plotly_click', function (ev) { var n = head(ev); if (n) { pinned = n; show(n); } });
  gd.on('plotly_hover', function (ev) { var n = head(ev); if (n) show(n); });
  gd.on('plotly_unhover', function () { if (pinned) show(pinned); });
})();
"""
POST_SCRIPTS[CLICK_META] = CLICK_SCRIPT


def thumbnail(maps: np.ndarray, max_blocks: int = THUMB_BLOCKS) -> tuple[np.ndarray, int]:
    """Max-pool (H, n, n) maps (NaN above the diagonal) to at most `max_blocks` tiles per side.

    The max of max-pooled tiles is the max-pooled map at the larger tile, so a thumbnail is the
    SeerAttention target at `factor` times the tile size.

    Returns:
        ((H, m, m) pooled maps, NaN above the diagonal; factor f with m = ceil(n / f)).
    """
    H, n, _ = maps.shape
    f = max(1, math.ceil(n / max_blocks))
    if f == 1:
        return maps, 1
    m = math.ceil(n / f)
    padded = np.full((H, m * f, m * f), np.nan, dtype=np.float32)
    padded[:, :n, :n] = maps
    tiles = padded.reshape(H, m, f, m, f)  # (H, n', n') -> (H, m, f, m, f)
    with warnings.catch_warnings():  # tiles above the diagonal are all NaN, and stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(tiles, axis=(2, 4)), f


def _tile_words(tokens: int) -> str:
    return "token" if tokens == 1 else f"block of {tokens} tokens"


def _hover(layer: int, head: int, tokens: int) -> str:
    unit = "token" if tokens == 1 else "block"
    value = "p" if tokens == 1 else "max p"
    return (f"layer {layer}, head {head}<br>query {unit} %{{y}}, key {unit} %{{x}}<br>"
            f"{value} = %{{customdata:.3g}}<extra></extra>")


def _heat(m: np.ndarray, layer: int, head: int, tokens: int, **kw) -> dict:
    # z carries the log colour, customdata the probability that hover shows; gaps (above the
    # diagonal) get no hover label at all
    # (a dict, not go.Heatmap: validating 540 traces one by one costs seconds)
    return dict(type="heatmap", z=_log_map(m), customdata=m.astype(np.float32),
                coloraxis="coloraxis", hoverongaps=False, hovertemplate=_hover(layer, head, tokens),
                **kw)


def model_view_figure(maps: Sequence[np.ndarray], layers: Sequence[int], map_block: int,
                      layer: int | None = None, head: int = 0, max_blocks: int = THUMB_BLOCKS,
                      big_blocks: int = BIG_BLOCKS, width: int = WIDTH) -> go.Figure:
    """Every layer x head as a thumbnail (rows "layer L", columns "head H", one log colour
    scale), and one head enlarged to the right. In a report page, hovering a thumbnail previews
    its head there and a click pins it (`CLICK_SCRIPT`); a dropdown picks one too.

    Args:
        maps: per layer, (H, n, n) max-pooled attention probabilities, NaN above the diagonal
            (`AttentionMaps.maps`).
        layers: the layer index of each entry of `maps`.
        map_block: tokens per tile of `maps` (1: token level).
        layer, head: the head enlarged first (default: the first layer, head 0).
        max_blocks: thumbnails are max-pooled to at most this many tiles per side.
        big_blocks: the enlarged head, to at most this many.
        width: the width in pixels the geometry is laid out for; the figure itself takes its
            cell's width (no fixed width), so thumbnails stretch or narrow with it.
    Returns:
        A figure with L*H thumbnail traces (each with `meta` "layer L head H") then the enlarged
        trace, and one frame (dropdown entry) per layer x head of that name; `layout.meta` is
        `CLICK_META`.
    """
    layers = list(layers)
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    thumbs = [thumbnail(m, max_blocks) for m in maps]
    bigs = [thumbnail(m, big_blocks) for m in maps]
    f, fb = thumbs[0][1], bigs[0][1]
    tokens, big_tokens = map_block * f, map_block * fb
    L, H = len(layers), thumbs[0][0].shape[0]
    layer = layers[0] if layer is None else layer

    # geometry in pixels: labels | thumbnail grid | gap | enlarged head | colour bar
    ml, mr, mt, mb, gap = 64, 70, 90, 30, 3
    big = int(width * 0.40)
    s = max(12, (width - ml - mr - big - 40 - (H - 1) * gap) // H)
    grid_w = H * s + (H - 1) * gap
    grid_h = L * s + (L - 1) * gap
    plot_h = max(grid_h, big + 130)  # the enlarged head, its two-line axis title, the menu
    plot_w = width - ml - mr

    data, axes = [], {}
    for li, ly in enumerate(layers):
        for h in range(H):
            i = li * H + h + 1
            x0, y1 = h * (s + gap), li * (s + gap)
            # fixed ranges: no zoom, so no drag handles, which on small thumbnails would cover
            # their neighbours and take the hover and click
            axes[f"xaxis{i}"] = dict(domain=[x0 / plot_w, (x0 + s) / plot_w], anchor=f"y{i}",
                                     visible=False, fixedrange=True)
            axes[f"yaxis{i}"] = dict(domain=[1 - (y1 + s) / plot_h, 1 - y1 / plot_h],
                                     anchor=f"x{i}", visible=False, autorange="reversed",
                                     fixedrange=True)
            data.append(_heat(thumbs[li][0][h], ly, h, tokens, xaxis=f"x{i}", yaxis=f"y{i}",
                              meta=f"layer {ly} head {h}"))
    n = L * H + 1
    bx0 = (grid_w + 40) / plot_w
    axes[f"xaxis{n}"] = dict(domain=[bx0, bx0 + big / plot_w], anchor=f"y{n}", showgrid=False,
                             title=dict(text=f"key ({_tile_words(big_tokens)})<br>"
                                        "<i>hover a thumbnail, click to pin it</i>"))
    axes[f"yaxis{n}"] = dict(domain=[1 - big / plot_h, 1], anchor=f"x{n}", showgrid=False,
                             autorange="reversed", title=dict(text="query", standoff=2))
    li0 = layers.index(layer)
    data.append(_heat(bigs[li0][0][head], layer, head, big_tokens, xaxis=f"x{n}",
                      yaxis=f"y{n}"))

    big_title = dict(text="enlarged head", xref="paper", yref="paper", x=bx0 + big / plot_w / 2,
                     y=1.0, xanchor="center", yanchor="bottom", showarrow=False,
                     font=dict(size=12))
    notes = [dict(text=f"layer {ly}", x=-0.005, y=1 - (li * (s + gap) + s / 2) / plot_h,
                  xref="paper", yref="paper", xanchor="right", showarrow=False,
                  font=dict(size=9)) for li, ly in enumerate(layers)]
    # (head labels at 8 px: "h10" fits a 15 px thumbnail)
    notes += [dict(text=f"h{h}", x=(h * (s + gap) + s / 2) / plot_w, y=1.0, xref="paper",
                   yref="paper", yanchor="bottom", showarrow=False, font=dict(size=8))
              for h in range(H)]
    # one frame per head: the dropdown swaps the enlarged trace's data, nothing else
    frames = [dict(name=f"layer {ly} head {h}", traces=[n - 1],
                   data=[_heat(bigs[li][0][h], ly, h, big_tokens, xaxis=f"x{n}",
                               yaxis=f"y{n}")])
              for li, ly in enumerate(layers) for h in range(H)]
    buttons = [dict(label=fr["name"], method="animate", args=[[fr["name"]], dict(
        mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
        for fr in frames]
    how = "token level" if tokens == 1 else f"max over {tokens}x{tokens}-token tiles"
    if f > 1:
        how += f" (pooled {f}x)"
    if big_tokens != tokens:
        how += "; enlarged: " + ("tokens" if big_tokens == 1 else f"{big_tokens}x{big_tokens}")
    layout = dict(
        **axes, annotations=[*notes, big_title], meta=CLICK_META,
        coloraxis=dict(cmin=LOG_FLOOR, cmax=0.0, colorscale=MAP_COLORSCALE,
                       colorbar=_log_colorbar(title=dict(text="prob."), len=big / plot_h,
                                              y=1, yanchor="top", thickness=12)),
        title=dict(text=f"Every layer x head (h: query head), log colour<br>"
                   f"<span style='font-size:11px'>{how}</span>", font=dict(size=14)),
        updatemenus=[dict(buttons=buttons, direction="down", showactive=True,
                          active=li0 * H + head, x=bx0, xanchor="left", y=1 - (big + 90) / plot_h,
                          yanchor="top", pad=dict(t=0, r=0))],
        height=plot_h + mt + mb, plot_bgcolor="white",
        margin=dict(l=ml, r=mr, t=mt, b=mb),
    )
    return go.Figure(dict(data=data, layout=layout, frames=frames))


def model_view_panel(am, block_size: int, layer: int, head: int, interactive: bool,
                     max_blocks: int = THUMB_BLOCKS, big_blocks: int = BIG_BLOCKS):
    """The model view of an `AttentionMaps`. With `interactive`, the figure is a live
    `go.FigureWidget` (anywidget): hovering a thumbnail previews its head in the enlarged panel,
    a click pins it; layer and head dropdowns pin one too, and the pinned head is also drawn at
    full resolution with its token labels (`attention_head_figure`).

    Returns:
        interactive: an `ipywidgets.VBox`; otherwise the model view figure.
    """
    from seerlib.viz.maps import attention_head_figure  # maps imports nothing from here

    b = am.map_block(block_size)
    fig = model_view_figure([am.maps(ly, block_size) for ly in am.layers], am.layers, b,
                            layer, head, max_blocks, big_blocks)
    if not interactive:
        return fig

    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

    w_layer = W.Dropdown(options=am.layers, value=layer, description="layer")
    w_head = W.Dropdown(options=list(range(am.num_heads)), value=head, description="head")
    status, out_head = W.Label(), W.Output()
    grid, enlarge = _live_grid(fig, lambda ly, h: (setattr(w_layer, "value", ly),
                                                   setattr(w_head, "value", h)))
    if grid is None:  # no anywidget: the report's figure (menu, no click)
        grid = W.Output()
        with grid:
            show(fig)
        status.value = "click-to-enlarge needs anywidget (pip install anywidget)"

    def redraw_head(*_):
        status.value = "drawing…"
        if enlarge is not None:
            enlarge(f"layer {w_layer.value} head {w_head.value}", pin=True)
        with out_head:
            out_head.clear_output(wait=True)
            show(attention_head_figure(am.maps(w_layer.value, block_size)[w_head.value],
                                       w_layer.value, w_head.value, b, am.labels(b)))
        status.value = ""

    w_layer.observe(redraw_head, "value")
    w_head.observe(redraw_head, "value")
    redraw_head()
    menus = W.HBox([w_layer, w_head, status], layout=W.Layout(flex_flow="row wrap"))
    return W.VBox([grid, menus, out_head])


def _json_map(m) -> list:
    """A map as nested lists with None for NaN (JSON has no NaN; plotly leaves None a gap)."""
    a = np.asarray(m, dtype=np.float64)
    return np.where(np.isnan(a), None, a).tolist()


def _live_grid(fig: go.Figure, pick):
    """`fig` (a `model_view_figure`) as a `go.FigureWidget`, and its `enlarge(name, pin=False)`:
    hover on a thumbnail shows its head enlarged, leaving shows the pinned head again, a click
    calls `pick(layer, head)`. (None, None) when anywidget (which FigureWidget needs) is
    missing."""
    frames = {fr.name: fr.data[0] for fr in fig.frames}  # the enlarged trace of each head
    try:
        fw = go.FigureWidget(layout=fig.layout)  # (FigureWidget has no frames)
    except ImportError:
        return None, None
    fw.layout.updatemenus = []
    fw.layout.width = WIDTH  # a widget does not follow its cell's width: the width laid out for
    # the widget sends plain JSON, where NaN (the gaps above the diagonal) is not allowed: None
    fw.add_traces([t.update(z=_json_map(t.z), customdata=_json_map(t.customdata))
                   for t in fig.data])
    big = fw.data[-1]
    pinned = [None]

    def enlarge(name: str, pin: bool = False) -> None:
        if pin:
            pinned[0] = name
        frame = frames.get(name)
        if frame is not None:
            with fw.batch_update():
                big.z, big.customdata = _json_map(frame.z), _json_map(frame.customdata)
                big.hovertemplate = frame.hovertemplate

    def on_hover(trace, points, _state):
        if points.point_inds:
            enlarge(trace.meta)

    def on_unhover(_trace, points, _state):
        if points.point_inds and pinned[0]:
            enlarge(pinned[0])

    def on_click(trace, points, _state):
        if points.point_inds:
            _, ly, _, h = trace.meta.split()  # "layer L head H"
            pick(int(ly), int(h))

    for t in fw.data[:-1]:
        t.on_hover(on_hover)
        t.on_unhover(on_unhover)
        t.on_click(on_click)
    return fw, enlarge
