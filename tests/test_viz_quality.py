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
    assert names == ["gate (learned)", "oracle (max-pooled)", "dense (10.000)"]
    assert list(fig.data[0].x) == pytest.approx([0.12, 0.32])
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
