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


def test_long_titles_are_wrapped_to_fit_a_narrow_cell():
    import plotly.io as pio

    from seerlib.viz.common import TITLE_CHARS, wrap_title

    text, added = wrap_title("word " * 40)
    assert added >= 2 and all(len(line) <= TITLE_CHARS for line in text.split("<br>"))
    assert wrap_title("short") == ("short", 0)
    text, added = wrap_title("Title<br><sub>" + "w " * 50 + "</sub>")
    assert added == 1 and text.count("<sub>") == 2 and text.count("</sub>") == 2
    assert text.split("<br>")[1].endswith("</sub>") and text.split("<br>")[2].startswith("<sub>")
    assert wrap_title("<b>short</b> text") == ("<b>short</b> text", 0)
    fig = go.Figure(go.Scatter(y=[1]), layout=dict(title="long " * 30, margin=dict(t=60)))
    bundle = pio.renderers["seerlib"].to_mimebundle(fig.to_dict())
    layout = bundle["application/vnd.plotly.v1+json"]["layout"]
    lines = layout["title"]["text"].split("<br>")
    assert len(lines) >= 3 and layout["margin"]["t"] == max(60, 40 + 19 * len(lines))
    assert layout["title"]["yanchor"] == "top" and layout["title"]["yref"] == "container"


def test_gate_files_look_into_subfolders_after_the_folder(tmp_path, monkeypatch):
    from seerlib import GateSet, save_gates
    from seerlib.distill import tiny_config

    gates = GateSet.from_config(tiny_config(), block_size=32, model_name="tiny")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "seerlib").mkdir()
    for rel in ("g/sub/a.safetensors", "g/b.safetensors", "g/c.ckpt.safetensors"):
        save_gates(gates, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in viz.gate_files(None, "g")] == [
        "g/b.safetensors", "g/sub/a.safetensors"]
