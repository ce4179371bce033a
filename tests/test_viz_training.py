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


def test_log_axis_ticks_are_round_and_increasing():
    assert viz.log_ticks(0.3, 4.0) == [0.5, 1.0, 2.0]
    assert viz.log_ticks(0.02, 30.0) == [0.1, 1.0, 10.0]  # over two decades: powers of ten
    assert viz.log_ticks(2.1, 2.6) == [2.0, 5.0]  # narrow: the ticks either side
    history = [{"step": s, "loss": 3.0 / s, "recall": {"0.5": 0.5}} for s in range(1, 9)]
    fig = viz.loss_curve_figure(history)
    ticks = list(fig.layout.yaxis.tickvals)
    assert ticks == sorted(ticks) and ticks == [0.5, 1.0, 2.0]
    assert list(fig.layout.yaxis.ticktext) == ["0.5", "1", "2"]


def test_progress_text_counts_steps_and_time_left():
    assert viz.progress_text(25, 100, 30.0) == "step 25 / 100, 0:30 elapsed, about 1:30 left"
    assert viz.progress_text(100, 100, 95.0).endswith("about 0:00 left")
    assert viz.progress_text(3, None, 5.0) == "step 3, 0:05 elapsed"
    curve = viz.LossCurve(interactive=False, print_every=0, total=4, blocks=16)
    curve.update({"step": 1, "loss": 1.0, "recall": {"0.1": 0.4, "0.5": 0.8}})
    fig = curve.figure()
    assert "step 1 / 4" in fig.layout.title.text
    # 0.1 of 16 blocks keeps 1 per row: noted as flat by construction
    assert "recall @ 0.1 keeps 1 block per row" in fig.layout.title.text
    assert [t.name for t in fig.data][1:] == ["recall @ 0.1 (1 of 16 blocks)",
                                              "recall @ 0.5 (4 of 16 blocks)"]


def test_tracked_densities_skip_one_block_per_row():
    assert viz.tracked_densities(512, 32) == (0.5, 0.4, 0.3)  # k = 4, 3, 2 of 16
    assert viz.tracked_densities(256, 32) == (0.5,)  # 8 blocks: 0.4 and below keep 1
    assert viz.tracked_densities(64, 32) == (0.5,)  # none keeps 2: the largest
    assert viz.tracked_densities(4096, 64, (0.5, 0.3, 0.1)) == (0.5, 0.3, 0.1)
