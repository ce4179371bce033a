"""seerlib.eval.recall: the gate recall table on the quality table's harness."""

import torch

from seerlib.distill import tiny_model
from seerlib.eval.recall import recall_markdown, recall_table
from seerlib.gate import GateSet


def test_recall_table_on_a_tiny_model():

    model = tiny_model()
    windows = torch.randint(0, 211, (2, 160), generator=torch.Generator().manual_seed(0))
    gates = {"g": GateSet.from_config(model.config, block_size=16)}
    t = recall_table(model, windows, gates, 16, (0.5, 0.1))
    assert set(t["recall"]) == {"g", "oracle", "sink_window", "vertical_slash"}
    for m, row in t["recall"].items():
        assert 0 < row["0.1"] <= row["0.5"] <= 1 + 1e-6, m
        assert len(t["per_layer"][m]["0.5"]) == 2
    assert t["recall"]["oracle"]["0.1"] >= t["recall"]["sink_window"]["0.1"] - 0.02
    md = recall_markdown(t)
    assert "| oracle |" in md and "density 0.1" in md
