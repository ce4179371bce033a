"""seerlib.viz.common: the "seerlib" renderer registered on import."""

import plotly.graph_objects as go

from seerlib import viz


def test_renderer_bundle_has_json_and_html_without_plotlyjs():
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    bundle = viz.pio.renderers["seerlib"].to_mimebundle(fig.to_dict())
    assert "application/vnd.plotly.v1+json" in bundle
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html and len(html) < 50_000  # plotly.js is not inlined per figure
    assert "mathjax" not in html.lower()
