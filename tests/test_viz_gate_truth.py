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
