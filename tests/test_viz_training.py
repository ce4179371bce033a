"""seerlib.viz.training (notebook 03): the live loss curve."""

from seerlib import viz


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
