"""seerlib.viz.quality (notebook 04): quality and passkey figures, method names."""

import numpy as np
import pytest

from seerlib import viz
from seerlib.names import display_name, series, sweep


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
    assert names == ["dense (10.000)", "gate (learned)", "oracle (max-pooled)"]
    assert list(fig.data[1].x) == pytest.approx([0.12, 0.32])
    pk = viz.passkey_figure({"dense": {(256, 0.5): 1.0}, "gate": {(256, 0.5): 0.0}})
    assert np.asarray(pk.data[0].z).tolist() == [[1.0], [0.0]]
    assert series(rows[2]) == "oracle-max"
    for spec, method in (("gate+sink@a=0.3", "gate+sink adaptive"),
                         ("gate+sink+local@r=0.3", "gate+sink+local relative"),
                         ("gate+sink+local+floor0.5@r=0.3", "gate+sink+local+floor0.5 relative")):
        assert series({"label": spec}) == method
        assert [c.label for c in sweep(method, [0.3])] == [spec]  # its inverse
    assert display_name("gate+sink+local+floor0.5 relative") == "gate, recommended"
    assert display_name("gate+sink adaptive") == "gate (learned) + sink block, adaptive budget"
    rows.append({"label": "gate+sink@t=0.01", "mode": "gate", "length": 256, "ppl": 12.0,
                 "recall": 0.7, "achieved_density": 0.2, "density_target": None,
                 "threshold": 0.01})
    names = [t.name for t in viz.quality_figure(rows).data if t.showlegend is not False]
    assert "gate (learned) + sink block, threshold" in names


def _rows(length=1024, windows=1, densities=(0.3, 0.5), ppl_of=lambda d: 30 - 10 * d):
    rows = [{"label": "dense", "length": length, "windows": windows, "ppl": 20.0, "recall": 1.0,
             "achieved_density": 1.0, "density_target": None, "threshold": None}]
    for d in densities:
        for label in (f"gate@{d}", f"sink_window@{d}"):
            rows.append({"label": label, "length": length, "windows": windows,
                         "ppl": ppl_of(d), "recall": 0.5 + d, "achieved_density": d - 0.02,
                         "density_target": d, "threshold": None})
    return rows


def test_the_caveat_appears_for_few_windows_or_one_block_per_row_and_not_otherwise():
    few = viz.rank_caveat(_rows(windows=1), block_size=64)
    assert "1 window of 1024 tokens" in few and "diagonal" not in few
    # 1024 tokens, block 64: 16 blocks a row; target 0.1 keeps 1 (the diagonal only)
    one = viz.rank_caveat(_rows(windows=32, densities=(0.1, 0.3)), block_size=64)
    assert "target 0.1" in one and "1 of 16 blocks" in one and "window" not in one
    assert viz.rank_caveat(_rows(windows=32), block_size=64) is None
    assert viz.rank_caveat(_rows(length=8192, windows=12, densities=(0.1,)), 64) is None
    # the block size may come from the rows
    rows = [dict(r, block_size=64) for r in _rows(windows=32, densities=(0.1,))]
    assert "diagonal" in viz.rank_caveat(rows)
    title = viz.quality_figure(_rows(windows=1), block_size=64).layout.title.text
    assert "Too small to rank methods" in title and "1 window of 1024 tokens" in title
    title = viz.quality_figure(_rows(windows=32), block_size=64).layout.title.text
    assert "Too small" not in title
    assert "32 windows of 1024 tokens; achieved density 0.280 / 0.480 at target 0.3 / 0.5" in title


def test_the_x_axis_fits_the_data_and_dense_leads_the_legend():
    fig = viz.quality_figure(_rows(windows=32, densities=(0.05, 0.3, 0.55)), block_size=64)
    lo, hi = fig.layout.xaxis.range
    assert 0.0 <= lo < 0.03 and 0.53 < hi < 0.6  # data 0.03-0.53, not 0-1
    fig = viz.quality_figure(_rows(windows=32, densities=(0.2, 0.3)), block_size=64)
    lo, hi = fig.layout.xaxis.range
    assert 0.15 < lo < 0.18 and 0.28 < hi < 0.31
    assert fig.data[0].name == "dense (20.000)" and list(fig.data[0].x) == [lo, hi]


def test_at_most_max_series_lines_lead_methods_first_distinct_colours():
    rows = _rows(windows=32)
    extra = ["gate+sink", "gate+sink@a", "oracle-max", "oracle-sum", "vertical_slash",
             "gate+sink+local+floor0.5@r", "oracle-max@a"]
    for label in extra:
        for d in (0.3, 0.5):
            spec = f"{label}={d}" if "@" in label else f"{label}@{d}"
            rows.append(dict(rows[1], label=spec, ppl=25.0, density_target=d))
    fig = viz.quality_figure(rows, block_size=64)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert len(names) == 7 and names[0].startswith("dense")
    assert names[1:] == ["gate (learned)", "gate, recommended", "oracle (max-pooled)",
                         "sink + window", "vertical-slash", "oracle (attention mass)"]
    assert "3 more series not drawn" in fig.layout.title.text
    colours = [t.line.color for t in fig.data if t.showlegend is not False][1:]
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colours]
    assert all(sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) ** 0.5 > 60
               for i, x in enumerate(rgb) for y in rgb[i + 1:]), rgb


def test_method_names_for_labels_and_series():
    assert viz.method_name("gate@0.3") == "gate (learned)"
    assert viz.method_name("gate+sink+local+floor0.5@r=0.3", target=True) == (
        "gate, recommended @ 0.3")
    assert viz.method_name("sink_window@0.1", target=True) == "sink + window @ 0.1"
    assert viz.method_name("oracle-max") == "oracle (max-pooled)"
    assert viz.method_name("dense") == "dense"


def test_the_table_shows_every_row_and_dense_failures_are_named():
    rows = _rows(windows=32, densities=(0.1, 0.2, 0.3, 0.4, 0.5))
    fig = viz.quality_table(rows, "t", seconds=False)
    cells = fig.data[0].cells.values
    assert len(cells[0]) == len(rows) and cells[2][0] == "dense"
    assert fig.layout.height >= 60 + 28 * (len(rows) + 1)  # no inner scroll
    acc = {"dense": {(8192, 0.0): 0.0, (8192, 0.5): 1.0}, "gate": {(8192, 0.0): 0.0}}
    assert "8192 tok, depth 0%" in viz.dense_failures(acc)
    assert viz.dense_failures({"dense": {(2048, 0.0): 1.0}}) is None
    assert "there the model fails" in viz.passkey_figure(
        acc, note=viz.dense_failures(acc)).layout.title.text
