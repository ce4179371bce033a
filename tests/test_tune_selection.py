"""The rule bench/tune_selection.py uses to pick a selection rule from training-text results."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "tune_selection.py"
_spec = importlib.util.spec_from_file_location("tune_selection", _PATH)
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)


def _results(increase, keys):
    """ppl and passkey results: candidate i has the given perplexity increase and passkey hits."""
    ppl, pk = {}, {"dense": [[2048, 0.5, True]] * 10}
    for L in (4096, 8192):
        ppl[f"{L}|dense"] = {"ppl": 10.0, "density": 1.0}
        for s, inc in zip(tune.CANDIDATES, increase, strict=True):
            ppl[f"{L}|{s}"] = {"ppl": 10.0 + inc, "density": 0.3}
    for s, hits in zip(tune.CANDIDATES, keys, strict=True):
        pk[s] = [[2048, 0.5, i < hits] for i in range(10)]
    return ppl, pk


def test_choose_takes_the_lowest_increase_among_rules_near_dense_passkey():
    ppl, pk = _results([0.1, 0.2, 0.3, 0.15, 0.4, 0.5], [7, 10, 9, 9, 10, 8])
    best, rows = tune.choose(ppl, pk)
    # candidate 0 has the lowest increase but is 3 keys short; 3 is the best of the eligible
    assert best == tune.CANDIDATES[3]
    assert [r["eligible"] for r in rows] == [False, True, True, True, True, False]
    assert rows[3]["ppl_increase"] == pytest.approx(0.15)


def test_choose_falls_back_to_the_best_passkey_when_none_is_near_dense():
    ppl, pk = _results([0.1, 0.2, 0.3, 0.15, 0.4, 0.5], [5, 7, 7, 6, 3, 2])
    best, _ = tune.choose(ppl, pk)
    assert best == tune.CANDIDATES[1]  # 7 keys like candidate 2, with the lower increase


def test_the_committed_choice_is_the_recommended_preset():
    import json

    from seerlib.methods import PRESETS

    doc = json.loads((_PATH.parent / "results" / "tune-selection.json").read_text())
    assert doc["chosen"] == PRESETS["recommended"].label
    assert [r["spec"] for r in doc["summary"]] == tune.CANDIDATES
