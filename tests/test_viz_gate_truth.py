"""seerlib.viz.gate_truth (notebook 02): a gate set against the model's attention."""

import torch

from seerlib import viz


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


def _tiny_comparison():
    from seerlib.capture import capture_qkv
    from seerlib.distill import tiny_model
    from seerlib.gate import GateSet

    model = tiny_model()
    ids = torch.randint(0, 211, (1, 100), generator=torch.Generator().manual_seed(0))
    return viz.GateComparison(capture_qkv(model, ids), GateSet.from_config(model.config,
                                                                           block_size=16))


def test_query_row_keeps_what_the_selection_functions_keep():
    import numpy as np

    from seerlib.methods import LayerInputs, SparseConfig, layer_block_mask
    from seerlib.select import Selection, select_blocks

    gc = _tiny_comparison()
    d, c = gc.layer(1), gc.captured[1]
    row = viz.query_row(gc, 1, 2, 5, density=0.4)
    gate = select_blocks(d["logits"], Selection(density=0.4))[0, 2, 5, :6]
    oracle = layer_block_mask(SparseConfig(viz.ORACLE, Selection(density=0.4), block_size=16),
                              LayerInputs(c.q, c.k, c.v, 16))[0, 2, 5, :6]
    np.testing.assert_array_equal(row["gate"], gate.numpy())
    np.testing.assert_array_equal(row["oracle"], oracle.numpy())
    np.testing.assert_allclose(row["mass"], d["mass"][0, 2, 5, :6].numpy())
    assert row["recall_gate"] <= row["recall_oracle"] + 1e-6
    assert 0 < row["density"] <= 1
    fig = viz.query_row_figure(row, 1, 2, 5, 16, "density 0.4")
    assert len(fig.data) == 3 and f"achieved density {row['density']:.3f}" in fig.layout.title.text
    import pytest

    with pytest.raises(ValueError, match="outside the 7 query blocks"):
        viz.query_row(gc, 1, 2, 7, density=0.4)


def test_recall_gap_is_the_difference_of_the_recalls():
    import numpy as np

    gc = _tiny_comparison()
    for kw in ({"density": 0.3}, {"threshold": 1e-2}):
        sc = gc.scores(**kw)
        fig = viz.recall_gap_figure(sc, gc.layers, str(kw))
        np.testing.assert_allclose(fig.data[0].z, sc["recall"] - sc["oracle_recall"])
        assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax
        assert viz.ORACLE in fig.layout.title.text
