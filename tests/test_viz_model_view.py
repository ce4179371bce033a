"""seerlib.viz.model_view (notebook 01): every layer x head as thumbnails, one head enlarged."""

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from seerlib import viz
from tests.test_viz_maps import fake_maps


def test_thumbnail_is_the_max_over_larger_tiles():
    m = np.random.default_rng(0).random((2, 10, 10)).astype(np.float32)
    m[:, ~np.tri(10, dtype=bool)] = np.nan
    t, f = viz.thumbnail(m, max_blocks=4)
    assert f == 3 and t.shape == (2, 4, 4)
    assert t[1, 1, 0] == np.nanmax(m[1, 3:6, 0:3])
    assert t[0, 3, 3] == np.nanmax(m[0, 9:, 9:])
    assert np.isnan(t[:, 0, 1]).all() and not np.isnan(t[:, np.tri(4, dtype=bool)]).any()
    same, one = viz.thumbnail(m, max_blocks=10)
    assert one == 1 and same is m


def test_model_view_structure_hover_and_dropdown():
    am = fake_maps(S=40, layers=3, Hq=6, token_level_max=32)  # blocks of 16: 3 x 3 maps
    fig = viz.model_view_panel(am, 16, layer=1, head=2, interactive=False)
    L, H = 3, 6
    assert len(fig.data) == L * H + 1  # thumbnails, then the enlarged head
    assert all(t.type == "heatmap" and t.coloraxis == "coloraxis" for t in fig.data)
    for t in fig.data:
        assert "log10" not in t.hovertemplate and "customdata" in t.hovertemplate
        assert t.hoverongaps is False  # no hover label (no NaN) above the diagonal
        z, p = np.asarray(t.z, dtype=float), np.asarray(t.customdata, dtype=float)
        upper = ~np.tri(z.shape[0], dtype=bool)
        assert np.isnan(z[upper]).all() and not np.isnan(p[~upper]).any()
        assert (p[~upper] >= 0).all() and (p[~upper] <= 1).all()  # probabilities, not logs
    assert "layer 0, head 5" in fig.data[5].hovertemplate
    np.testing.assert_array_equal(fig.data[-1].customdata, am.maps(1, 16)[2])
    texts = [a.text for a in fig.layout.annotations]
    assert [f"layer {ly}" for ly in range(L)] + [f"h{h}" for h in range(H)] == texts[:L + H]
    assert not any(getattr(fig.layout[f"xaxis{i}"], "title", None) and
                   fig.layout[f"xaxis{i}"].title.text for i in range(1, L * H + 1))
    (menu,) = fig.layout.updatemenus
    assert len(menu.buttons) == len(fig.frames) == L * H and menu.active == 1 * H + 2
    assert menu.buttons[7].label == "layer 1 head 1" and menu.buttons[7].method == "animate"
    fr = fig.frames[7]
    assert list(fr.traces) == [L * H]
    np.testing.assert_array_equal(fr.data[0].customdata, am.maps(1, 16)[1])
    assert fig.layout.width is None  # it takes its cell's width (test_browser checks at 1000 px)


def test_model_view_pools_token_maps_and_says_so():
    am = fake_maps(S=40, layers=2, Hq=6, token_level_max=64)  # token level: 40 x 40
    fig = viz.model_view_figure([am.maps(ly, 16) for ly in am.layers], am.layers, 1,
                                max_blocks=16)
    assert np.asarray(fig.data[0].z).shape == (14, 14)  # 40 tokens pooled by 3
    assert "3x3-token tiles" in fig.layout.title.text and "pooled 3x" in fig.layout.title.text
    assert "enlarged: 2x2" in fig.layout.title.text


def test_model_view_panel_interactive_hover_previews_and_click_pins():
    import ipywidgets as W
    from plotly.callbacks import Points

    am = fake_maps()  # 3 layers, 6 heads
    panel = viz.model_view_panel(am, 16, 0, 1, interactive=True)
    assert isinstance(panel, W.VBox)
    grid, menus = panel.children[:2]
    assert isinstance(grid, go.FigureWidget) and not grid.layout.updatemenus
    w_layer, w_head = menus.children[:2]
    big = grid.data[-1]

    def shown():
        return np.asarray(big.customdata, dtype=np.float32)

    np.testing.assert_array_equal(shown(), am.maps(0, 16)[1])
    thumb = grid.data[2 * 6 + 4]  # layer 2, head 4
    assert thumb.meta == "layer 2 head 4"

    def points(t):
        return Points(point_inds=[0], xs=[0], ys=[0], trace_name=None,
                      trace_index=list(grid.data).index(t))

    thumb._dispatch_on_hover(points(thumb), None)  # hover previews
    np.testing.assert_array_equal(shown(), am.maps(2, 16)[4])
    assert (w_layer.value, w_head.value) == (0, 1)
    thumb._dispatch_on_unhover(points(thumb), None)  # leaving brings the pinned head back
    np.testing.assert_array_equal(shown(), am.maps(0, 16)[1])
    thumb._dispatch_on_click(points(thumb), None)  # a click pins it, menus follow
    assert (w_layer.value, w_head.value) == (2, 4)
    np.testing.assert_array_equal(shown(), am.maps(2, 16)[4])
    thumb._dispatch_on_unhover(points(thumb), None)
    np.testing.assert_array_equal(shown(), am.maps(2, 16)[4])


def test_report_figure_carries_the_click_script():
    am = fake_maps()
    fig = viz.model_view_panel(am, 16, 0, 1, interactive=False)
    bundle = pio.renderers["seerlib"].to_mimebundle(fig.to_dict())
    html = bundle["text/html"]
    assert "plotly_click" in html and "plotly_hover" in html and "{plot_id}" not in html
    plain = pio.renderers["seerlib"].to_mimebundle(go.Figure(go.Scatter(y=[1])).to_dict())
    assert "plotly_click" not in plain["text/html"]
