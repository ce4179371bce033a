"""seerlib.viz.long_context (notebook 07): YaRN perplexity and the mass the best blocks hold on the
tiny random Llama, and the committed GPU sections read from small fake result files (and from none:
"not yet measured on a GPU")."""

import json
import shutil

import plotly.graph_objects as go
import pytest
import torch

from seerlib import viz
from seerlib.distill import tiny_model
from seerlib.eval import dense_pass, perplexity
from seerlib.methods import SparseConfig
from seerlib.reference import num_blocks
from seerlib.select import Selection, topk_density
from seerlib.viz.common import repo_path

B16 = 16


def _windows(*lengths, n=1):
    g = torch.Generator().manual_seed(0)
    return {S: torch.randint(0, 211, (n, S), generator=g) for S in lengths}


def test_yarn_perplexity_scores_base_then_extends_in_place():
    model = tiny_model()
    windows = _windows(48, 96)
    base = {S: perplexity(model, w, progress=False).ppl for S, w in windows.items()}
    rows = viz.yarn_perplexity(model, windows, factor=4.0)
    assert [(r["variant"], r["seq_len"]) for r in rows] == [
        ("base", 48), ("base", 96), ("yarn", 48), ("yarn", 96)]
    assert all(r["status"] == "ok" and r["windows"] == 1 and r["tokens"] == r["seq_len"] - 1
               for r in rows)
    assert [r["ppl"] for r in rows[:2]] == pytest.approx([base[48], base[96]])
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.max_position_embeddings == 4 * 4096
    assert rows[2]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-6), "YaRN changed nothing"
    with pytest.raises(ValueError, match="rope is 'yarn' already"):
        viz.yarn_perplexity(model, windows)
    fig = viz.yarn_ppl_figure(rows, "tiny Llama, random tokens", original_context=4096)
    assert [t.name for t in fig.data] == ["base (no YaRN)", "YaRN x4"]
    assert "tiny Llama" in fig.layout.title.text
    table = viz.yarn_ppl_table(rows, "t")
    cells = table.data[0].cells.values
    assert list(table.data[0].header.values)[-1] == "YaRN vs base" and len(cells[0]) == 2


def test_mass_by_length_is_the_oracle_sum_recall_of_the_quality_harness():
    model = tiny_model()
    windows = _windows(96, 160, n=2)
    rows = viz.mass_by_length(model, windows, densities=(0.1, 0.7, 1.0), block_size=B16)
    assert [(r["length"], r["density_target"]) for r in rows] == [
        (S, d) for S in (96, 160) for d in (0.1, 0.7, 1.0)]
    for S, w in windows.items():
        mine = {r["density_target"]: r for r in rows if r["length"] == S}
        assert mine[1.0]["recall"] == pytest.approx(1.0, abs=1e-5)
        assert mine[0.1]["recall"] < mine[0.7]["recall"] < mine[1.0]["recall"] + 1e-6
        for d, r in mine.items():
            assert r["achieved_density"] == pytest.approx(topk_density(d, num_blocks(S, B16)))
            assert r["windows"] == 2 and len(r["per_layer_recall"]) == 2
            assert r["ppl"] == pytest.approx(perplexity(model, w, progress=False).ppl)
        # the same numbers as seerlib.eval's dense pass (window by window, then averaged)
        cfg = SparseConfig("oracle-sum", Selection(density=0.7), block_size=B16)
        per_window = [dense_pass(model, w[i:i + 1], [cfg], block_size=B16)[1][cfg.label]
                      for i in range(2)]
        want = [sum(s["recall"][layer] for s in per_window) / 2 for layer in range(2)]
        assert mine[0.7]["per_layer_recall"] == pytest.approx(want, abs=1e-6)
    fig = viz.mass_by_length_figure(rows, "tiny Llama", density=0.7)
    assert [t.name for t in fig.data if t.showlegend is not False] == [
        "96 tokens (2 window(s))", "160 tokens (2 window(s))"]
    assert len(fig.data) == 4 and "oracle (attention mass)" in fig.layout.title.text
    assert fig.layout.shapes[0].x0 == pytest.approx(viz.common_density(rows))
    table = viz.mass_table(rows, 0.7)
    assert list(table.data[0].cells.values[0]) == ["96", "160"]
    common = viz.common_density(rows)  # top-1 of 6 blocks per row at 96 tokens: 6 / 21
    assert common == pytest.approx(6 / 21)
    at = viz.mass_at_density(rows, common)
    assert at[96] == pytest.approx(next(r["recall"] for r in rows
                                        if r["length"] == 96 and r["density_target"] == 0.1))
    lo, hi = sorted((r["achieved_density"], r["recall"]) for r in rows if r["length"] == 160)[:2]
    assert at[160] == pytest.approx(lo[1] + (hi[1] - lo[1]) * (common - lo[0]) / (hi[0] - lo[0]))
    assert viz.mass_at_density(rows, 0.01) == {96: None, 160: None}


def _yarn_doc():
    rows = [{"variant": v, "seq_len": S, "windows": 2, "tokens": 2 * (S - 1), "ppl": p,
             "status": "ok"} for v, S, p in [("base", 4096, 20.0), ("base", 32768, 900.0),
                                             ("yarn", 4096, 21.0), ("yarn", 32768, 25.0)]]
    rows.append({"variant": "yarn", "seq_len": 65536, "status": "skipped", "reason": "short"})
    return {"meta": {"model": "SmolLM2-135M-Instruct", "gpu": "NVIDIA H200", "dtype": "bfloat16",
                     "text": "the long-text eval documents", "factor": 4.0,
                     "original_context": 8192, "command": "python bench/yarn_ppl.py"},
            "rows": rows}


def test_yarn_views_say_not_measured_without_a_file_and_draw_one(tmp_path):
    (views,) = viz.yarn_views(tmp_path)
    assert isinstance(views, str) and views.startswith("Not yet measured on a GPU")
    (tmp_path / "yarn-ppl-H200-2026-12-04.json").write_text(json.dumps(_yarn_doc()))
    (tmp_path / "yarn-ppl-H200-broken.json").write_text("{")
    views = viz.yarn_views(tmp_path)
    assert "passed over" in views[0] and "bench/yarn_ppl.py" in views[1]
    fig, table = views[2:]
    assert [t.name for t in fig.data] == ["base (no YaRN)", "YaRN x4"]
    assert list(fig.data[1].y) == [21.0, 25.0]  # the skipped length is not drawn
    assert "NVIDIA H200" in fig.layout.title.text
    cells = dict(zip(table.data[0].header.values, table.data[0].cells.values, strict=True))
    assert cells["YaRN vs base"] == ["+5.0%", "-97.2%", ""] and cells["YaRN"][2] == "skipped"


def _quality_doc(context=32768, diff=None):
    meta = {"model": "SmolLM2-135M-Instruct", "device": "cuda", "gpu": "NVIDIA H200",
            "dtype": "bfloat16", "block_size": 64, "text": "long-text eval split",
            "context": context, "yarn_factor": 4.0}
    if diff:
        meta |= {"model_diff": diff, "model_diff_sha256": "ab" * 32, "model_diff_steps": 60}
    rows = []
    for S in (8192, 32768):
        rows.append({"label": "dense", "length": S, "windows": 2, "ppl": 20.0, "recall": 1.0,
                     "achieved_density": 1.0, "threshold": None, "density_target": None})
        for label, ppl, rec in [("gate@0.1", 21.0, 0.9), ("oracle-max@0.1", 20.5, 0.95),
                                ("oracle-max@0.3", 20.1, 0.99)]:
            rows.append({"label": label, "length": S, "windows": 2, "ppl": ppl, "recall": rec,
                         "achieved_density": 0.09, "threshold": None,
                         "density_target": float(label.split("@")[1]),
                         "per_layer_recall": [rec] * 3})
    passkey = [{"method": m, "length": S, "depth": d, "key": "12345", "answer": "12345.",
                "correct": m == "dense" or d < 0.5, "density": 0.1}
               for m in ("dense", "gate@0.1") for S in (8192, 32768) for d in (0.0, 0.5)]
    return {"meta": meta, "rows": rows, "passkey": passkey}


def test_quality_views_group_models_and_say_not_measured_without_context_files(tmp_path):
    no_context = _quality_doc()
    del no_context["meta"]["context"]
    (tmp_path / "quality-smollm2.json").write_text(json.dumps(no_context))  # the 8k model's
    (views,) = viz.quality_views(tmp_path)
    assert views.startswith("Not yet measured on a GPU") and "--context" in views
    (tmp_path / "quality-yarn32k.json").write_text(json.dumps(_quality_doc()))
    (tmp_path / "quality-yarn32k-joint.json").write_text(
        json.dumps(_quality_doc(diff="runs/joint.safetensors")))
    (tmp_path / "passkey-broken.json").write_text("[]")
    groups, notes = viz.long_results(tmp_path)
    assert len(groups) == 2 and len(notes) == 1 and "passkey-broken.json" in notes[0]
    tuned = next(g for g in groups if "fine-tuned (joint" in g.model)
    assert tuned.files == ["quality-yarn32k-joint.json"] and "60 steps" in tuned.model
    base = next(g for g in groups if "not fine-tuned" in g.model)
    assert "YaRN to 32768 tokens" in base.model and len(base.rows) == 8
    assert [r["label"] for r in viz.mass_rows(base.rows)] == ["oracle-max@0.1", "oracle-max@0.3"
                                                              ] * 2
    views = viz.quality_views(tmp_path, density=0.1)
    figs = [v for v in views if isinstance(v, go.Figure)]
    assert len(figs) == 8  # per model: mass, quality by length, table, passkey
    mass, by_length, table, pk = figs[:4]
    assert [t.name for t in mass.data if t.showlegend is not False] == [
        "8k tokens (2 window(s))", "32k tokens (2 window(s))"]
    assert {t.name for t in by_length.data} == {"gate (learned)", "oracle (max-pooled)"}
    assert list(by_length.data[0].y) == pytest.approx([0.05, 0.05])
    assert "32k" in pk.layout.title.text and pk.data[0].z[0] == [1.0, 1.0, 1.0, 1.0]
    assert table.data[0].cells.values[1][0] == "dense"


def test_speed_views_draw_the_committed_backward_run(tmp_path):
    views = viz.speed_views(tmp_path)
    assert len(views) == 2 and all(v.startswith("Not yet measured on a GPU") for v in views)
    src = repo_path("bench/results/backward-H200-2026-12-03.json")
    shutil.copy(src, tmp_path / src.name)
    recs, files = viz.backward_records(tmp_path)
    assert files == [src.name]
    assert {r["provider"] for r in recs} >= {"seer", "sdpa_cudnn", "sdpa_flash", "flex"}
    fig = viz.backward_figure(recs, 32768)
    assert len(fig.data) == 2 and "H200" in fig.layout.title.text
    smol = fig.data[0]
    assert "block-sparse, via autograd" in smol.x and "SDPA cuDNN, dense" in smol.x
    assert any("4.68x cuDNN" in t for t in smol.text)
    failed = [a.text for a in fig.layout.annotations if "did not run" in a.text]
    assert failed == ["did not run: FlexAttention (same mask)"] * 2
    views = viz.speed_views(tmp_path)
    assert isinstance(views[1], go.Figure) and views[2].startswith("Not yet measured")
