import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from seerlib import viz
from seerlib.capture import LayerQKV
from seerlib.eval import method_spec
from seerlib.metrics import block_mass


def fake_maps(S=40, layers=3, Hq=6, Hkv=2, d=16, seed=0, token_level_max=32):
    g = torch.Generator().manual_seed(seed)
    captured = {}
    for i in range(layers):
        q, k, v = (torch.randn(1, h, S, d, generator=g) for h in (Hq, Hkv, Hkv))
        captured[i] = LayerQKV(q_pre=q, k_pre=k, q=q, k=k, v=v)
    return viz.AttentionMaps(captured, [f"t{i}" for i in range(S)], token_level_max)


def test_blocks_to_cover_by_hand():
    # one head, 3 blocks; rows: [1], [0.7, 0.3], [0.5, 0.1, 0.4]
    mass = torch.tensor([[1.0, 0, 0], [0.7, 0.3, 0], [0.5, 0.1, 0.4]])[None, None]
    assert viz.blocks_to_cover(mass, 0.5).tolist() == [[[1, 1, 1]]]
    assert viz.blocks_to_cover(mass, 0.7).tolist() == [[[1, 1, 2]]]
    assert viz.blocks_to_cover(mass, 0.95).tolist() == [[[1, 2, 3]]]
    assert viz.blocks_to_cover(mass, 1.0).tolist() == [[[1, 2, 3]]]
    # densities are shares of the 6 causal blocks
    assert viz.coverage_density(mass, 0.7).item() == pytest.approx(4 / 6)
    assert viz.coverage_density(mass, 1.0).item() == pytest.approx(1.0)


def test_blocks_to_cover_bounds_and_errors():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 97, 16, generator=g), torch.randn(1, 2, 97, 16, generator=g)
    mass = block_mass(q, k, 16)  # nb = 7, last block partial
    need = viz.blocks_to_cover(mass, 0.99)
    assert need.shape == (1, 4, 7)
    assert (need >= 1).all() and (need <= torch.arange(1, 8)).all()
    assert (viz.blocks_to_cover(mass, 0.5) <= need).all()  # monotone in the coverage
    with pytest.raises(ValueError, match="coverage"):
        viz.blocks_to_cover(mass, 0.0)
    with pytest.raises(ValueError, match="nb, nb"):
        viz.blocks_to_cover(mass[..., :3], 0.9)


def test_attention_maps_token_and_block_level():
    short = fake_maps(S=24, token_level_max=32)
    assert short.map_block(16) == 1
    m = short.maps(0, 16)
    assert m.shape == (6, 24, 24)
    assert np.isnan(m[:, 0, 1]).all() and not np.isnan(np.tril(m[0])).any()
    np.testing.assert_allclose(np.nansum(m, axis=-1), 1.0, rtol=1e-5)  # token rows: probabilities
    long = fake_maps(S=40, token_level_max=32)
    assert long.map_block(16) == 16 and long.maps(1, 16).shape == (6, 3, 3)
    assert len(long.labels(16)) == 3 and len(set(long.labels(1))) == 40
    table = long.sparsity(16, [0.5, 0.99])
    assert table.shape == (3, 6, 2)
    assert (table[..., 0] <= table[..., 1]).all() and (table > 0).all() and (table <= 1).all()


def test_figures_are_plain_plotly():
    am = fake_maps()
    b = am.map_block(16)
    grid = viz.attention_grid_figure(am.maps(0, 16), 0, b, am.labels(b))
    assert isinstance(grid, go.Figure) and len(grid.data) == 6
    assert all(t.type == "heatmap" for t in grid.data)
    head = viz.attention_head_figure(am.maps(0, 16)[2], 0, 2, b, am.labels(b))
    assert "head 2" in head.layout.title.text
    table = am.sparsity(16, [0.9, 0.95])
    heat = viz.sparsity_heatmap_figure(table[:, :, 0], 0.9, 16, am.layers)
    assert np.asarray(heat.data[0].z).shape == (3, 6)
    lines = viz.sparsity_by_layer_figure(table, [0.9, 0.95], 16)
    assert [t.name for t in lines.data if t.showlegend is not False] == ["90%", "95%"]


def test_panel_plain_figures_unless_interactive():
    am = fake_maps()
    figs = viz.attention_maps_panel(am, 1, 0, 16, 0.9, interactive=False)
    assert len(figs) == 3 and all(isinstance(f, go.Figure) for f in figs)
    import ipywidgets as W

    panel = viz.attention_maps_panel(am, 1, 0, 16, 0.9, interactive=True)
    assert isinstance(panel, W.VBox)
    sliders = [w for w in panel.children[0].children if isinstance(w, W.IntSlider)]
    assert [s.description for s in sliders] == ["layer", "head"]
    sliders[0].value = 2  # redraws without error (Outputs are inert outside a kernel)


def test_renderer_bundle_has_json_and_html_without_plotlyjs():
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    bundle = viz.pio.renderers["seerlib"].to_mimebundle(fig.to_dict())
    assert "application/vnd.plotly.v1+json" in bundle
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html and len(html) < 50_000  # plotly.js is not inlined per figure
    assert "mathjax" not in html.lower()


def test_gate_comparison_and_panel_on_a_tiny_model():
    from seerlib.capture import capture_qkv
    from seerlib.distill import tiny_model
    from seerlib.gate import GateSet

    model = tiny_model()
    ids = torch.randint(0, 211, (1, 100), generator=torch.Generator().manual_seed(0))
    gc = viz.GateComparison(capture_qkv(model, ids), GateSet.from_config(model.config,
                                                                         block_size=16))
    d = gc.layer(1)
    assert d["mass"].shape == d["truth"].shape == d["pred"].shape == (1, 4, 7, 7)
    torch.testing.assert_close(d["truth"].sum(-1), torch.ones(1, 4, 7))
    mask, orc = gc.masks(1, density=0.5)
    assert mask.sum() == orc.sum()  # same k per row
    sc = gc.scores(density=0.5)
    assert set(sc) == {"recall", "oracle_recall", "kl", "density"}
    assert sc["recall"].shape == (2, 4)
    assert (sc["recall"] <= sc["oracle_recall"] + 1e-6).all()  # the oracle is the upper bound
    th = gc.scores(threshold=1e-3)
    assert (th["density"] > 0).all()
    figs = viz.gate_panel({16: gc}, 1, 2, 0.5, None, interactive=False)
    assert len(figs) == 3 and len(figs[0].data) == 4
    import ipywidgets as W

    assert isinstance(viz.gate_panel({16: gc}, 1, 2, None, 1e-3, interactive=True), W.VBox)


def test_loss_curve_collects_and_draws():
    curve = viz.LossCurve(interactive=False, print_every=0)
    for s in range(1, 4):
        m = {"step": s, "loss": 1.0 / s, "recall": {"0.5": 0.5 + s / 10}, "loss_per_layer": [1]}
        if s == 3:
            m.update(eval_loss=0.4, eval_recall={"0.5": 0.7})
        curve.update(m)
    fig = curve.finish()
    assert [t.name for t in fig.data] == ["train loss", "held-out loss", "recall @ 0.5",
                                          "held-out @ 0.5"]
    assert "loss_per_layer" not in curve.history[0]
    assert len(viz.layer_loss_figure([0.1, 0.2]).data[0].x) == 2


def _record(provider, S, ms, sparsity=0.0, pattern="dense", gpu="GPU-A", date="2026-01-01"):
    return {"provider": provider, "seq_len": S, "ms": ms, "sparsity": sparsity,
            "target_sparsity": sparsity, "pattern": pattern, "gpu": gpu, "date": date,
            "torch": "t", "triton": "t"}


def test_bench_records_and_speedups(tmp_path):
    import json

    recs = [_record("sdpa_flash", 1024, 4.0), _record("sdpa_cudnn", 1024, 2.0),
            _record("seer_dense", 1024, 3.0),
            _record("seer", 1024, 1.0, 0.5, "random"), _record("flex", 1024, 1.5, 0.5, "random"),
            _record("seer", 1024, 2.0, 0.5, "random", date="2025-01-01")]  # older file loses
    (tmp_path / "GPU-A-2026-01-01.json").write_text(json.dumps(recs[:5]))
    (tmp_path / "GPU-A-2025-01-01.json").write_text(json.dumps(recs[5:]))
    (tmp_path / "GPU-A-2026-01-01-checks.json").write_text(json.dumps([{"check": "x"}]))
    (tmp_path / "GPU-B-2024-01-01.json").write_text(json.dumps(
        [_record("seer", 1024, 9.0, 0.5, "random", gpu="GPU-B", date="2024-01-01")]))
    records, files = viz.bench_records(tmp_path)
    assert files == ["GPU-A-2026-01-01.json"] and len(records) == 5
    (row,) = viz.speedups(records, "random")
    assert row["sdpa_flash"] == 4.0 and row["sdpa_cudnn"] == 2.0 and row["flex"] == 1.5
    assert row["seer_dense"] == 3.0
    fig = viz.speedup_figure(records)
    names = {t.name for t in fig.data}
    assert {"ideal 1/(1-s)", "vs FlashAttention-2 (SDPA)", "vs FlexAttention (same mask)"} <= names
    for r in records:
        r.setdefault("tflops", 100.0)
    bars = viz.dense_throughput_figure(records)
    assert [t.name for t in bars.data] == ["ours, dense", "FlashAttention-2 (SDPA)",
                                           "cuDNN (SDPA)"]
    assert viz.bench_records(tmp_path, gpu="GPU-B")[0][0]["ms"] == 9.0
    assert viz.bench_records(tmp_path / "none") == ([], [])
    table = viz.table_figure([row], ["seq_len", "sdpa_flash"], headers={"sdpa_flash": "vs FA2"})
    assert list(table.data[0].header.values) == ["seq_len", "vs FA2"]


def test_quality_and_passkey_figures():
    rows = [{"label": "dense", "mode": "dense", "length": 256, "ppl": 10.0, "recall": 1.0,
             "achieved_density": 1.0, "density_target": None, "windows": 1}]
    for d, ppl in ((0.1, 14.0), (0.3, 11.0)):
        rows.append({"label": f"gate@{d}", "mode": "gate", "length": 256, "ppl": ppl,
                     "recall": 0.5 + d, "achieved_density": d + 0.02, "density_target": d})
        rows.append({"label": f"oracle-max@{d}", "mode": "oracle", "pooling": "max",
                     "length": 256, "ppl": ppl - 1, "recall": 0.6 + d,
                     "achieved_density": d + 0.02, "density_target": d})
    fig = viz.quality_figure(rows)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["gate (learned)", "oracle (pooled max)", "dense (10.000)"]
    assert list(fig.data[0].x) == pytest.approx([0.12, 0.32])
    pk = viz.passkey_figure({"dense": {(256, 0.5): 1.0}, "gate": {(256, 0.5): 0.0}})
    assert np.asarray(pk.data[0].z).tolist() == [[1.0], [0.0]]
    assert viz.method_of(rows[2]) == "oracle-max"
    for spec, method in (("gate+sink@a=0.3", "gate+sink adaptive"),
                         ("gate+sink+local@r=0.3", "gate+sink+local relative")):
        assert viz.method_of({"label": spec}) == method
        assert method_spec(method, 0.3) == spec  # its inverse
    rows.append({"label": "gate+sink@t=0.01", "mode": "gate", "length": 256, "ppl": 12.0,
                 "recall": 0.7, "achieved_density": 0.2, "density_target": None,
                 "threshold": 0.01})
    names = [t.name for t in viz.quality_figure(rows).data if t.showlegend is not False]
    assert "gate + sink block, threshold" in names
