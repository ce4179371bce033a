"""seerlib.viz.maps (notebook 01): blocks to cover a mass share, attention maps, their figures and
panel."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from seerlib import viz
from seerlib.capture import LayerQKV
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


def test_map_hover_shows_the_probability_and_nothing_above_the_diagonal():
    am = fake_maps(S=40)
    m = am.maps(1, 8)[2]  # (nb, nb), NaN above the diagonal
    fig = viz.attention_head_figure(m, 1, 2, 8, am.labels(8))
    (t,) = fig.data
    np.testing.assert_array_equal(t.customdata, m.astype(np.float32))
    assert "customdata" in t.hovertemplate and "log10" not in t.hovertemplate
    assert t.hoverongaps is False
    assert fig.layout.width is None and fig.layout.yaxis.scaleanchor == "x"


def test_gated_layers_leave_out_sliding_window_layers():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=1)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(**small, num_hidden_layers=6, head_dim=16,
                                               sliding_window=8))
    assert viz.gated_layers(gemma, 100) == [5]  # 5 sliding layers, then the global one
    llama = LlamaForCausalLM(LlamaConfig(**small, num_hidden_layers=3))
    assert viz.gated_layers(llama, 100) == [0, 1, 2]


def test_maps_of_a_soft_capped_model_are_of_its_own_attention():
    """On a tiny Gemma2 (cap 1, so that it binds; query_pre_attn_scalar 32, so the scale is not
    1/sqrt(d)) the capture records the scale and cap the model passes its attention, and the
    drawn maps, the block mass and the gate comparison's truth are of that attention: the plain
    maps differ by far more than the tolerance."""
    from seerlib import reference
    from seerlib.capture import capture_qkv
    from seerlib.gate import GateSet
    from seerlib.tiny import tiny_family

    model = tiny_family("gemma2", attn_logit_softcapping=1.0)
    ids = torch.randint(3, 101, (1, 96), generator=torch.Generator().manual_seed(0))
    cap = capture_qkv(model, ids, layers=[1])  # the global layer
    c = cap[1]
    assert c.softcap == 1.0 and c.scale == pytest.approx(32 ** -0.5) != 16 ** -0.5
    am = viz.AttentionMaps(cap, [str(i) for i in range(96)], token_level_max=32)
    want = reference.pooled_attention(c.q, c.k, c.v, 16, scale=c.scale, softcap=1.0)[1][0]
    plain = reference.pooled_attention(c.q, c.k, c.v, 16)[1][0]
    got = torch.from_numpy(np.nan_to_num(am.maps(1, 16)))
    torch.testing.assert_close(got, want.tril_(), atol=1e-6, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-2
    torch.testing.assert_close(am.mass(1, 16), block_mass(c.q, c.k, 16, scale=c.scale,
                                                          softcap=1.0))
    gc = viz.GateComparison(cap, GateSet.from_config(model.config, block_size=16))
    torch.testing.assert_close(gc.layer(1)["mass"], am.mass(1, 16))
