"""seerlib.viz.decode (notebook 06): a generation traced step by step on the tiny random Llama, the
budget figures, and the readers of the committed GPU tables."""

import json

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from seerlib import viz
from seerlib.decode import DecodeGateSet, decode_teacher_forced, parse_decode_config
from seerlib.distill import tiny_model
from seerlib.eval.decode import decode_configs, decode_quality
from seerlib.reference import num_blocks

B16, PROMPT, NEW = 16, 70, 12
STEPS = NEW - 1  # the first new token comes from the prefill


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def gates(model):
    torch.manual_seed(0)
    return DecodeGateSet(model.config, block_size=B16)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 211, (1, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sparse(model, gates, prompt):
    return viz.trace_generation(model, prompt, "gate@tok=32", decode_gates=gates,
                                max_new_tokens=NEW)


@pytest.fixture(scope="module")
def covering(model, gates, prompt):
    return viz.trace_generation(model, prompt, "gate@tok=4096", decode_gates=gates,
                                max_new_tokens=NEW)


def test_trace_shapes_truth_and_picks(sparse):
    nb = num_blocks(PROMPT + STEPS, B16)
    assert sparse.steps == STEPS and sparse.layers == [0, 1] and sparse.label == "gate@tok=32"
    assert list(sparse.positions) == list(range(PROMPT, PROMPT + STEPS))
    assert sparse.new_tokens.shape == (NEW,)
    vis = sparse.visible()  # (T, nb)
    own = sparse.positions // B16
    for i in sparse.layers:
        assert sparse.truth[i].shape == sparse.picked[i].shape == (STEPS, 2, nb)
        assert sparse.recall[i].shape == sparse.oracle_recall[i].shape == (STEPS,)
        np.testing.assert_allclose(sparse.truth[i].sum(-1), 1.0, atol=1e-5)
        assert not (sparse.truth[i] * ~vis[:, None]).any(), "a score past the query's block"
        assert not (sparse.picked[i] & ~vis[:, None]).any(), "a block past the query's read"
        assert sparse.picked[i][np.arange(STEPS), :, own].all(), "its own block is always read"
        assert (sparse.picked[i].sum(-1) == 32 // B16).all()
        for r in (sparse.recall[i], sparse.oracle_recall[i]):
            assert ((r >= 0) & (r <= 1)).all()
    assert sparse.mean_recall() < 0.999  # 2 of 5-6 blocks miss some attention
    assert sparse.kept_share() == pytest.approx(
        2 * STEPS / vis.sum())


def test_trace_recall_equals_teacher_forced_decode(model, gates, prompt, sparse):
    # the same tokens teacher-forced: its queries PROMPT .. PROMPT + STEPS - 1 are the steps
    ids = torch.cat([prompt, torch.as_tensor(sparse.new_tokens[None, :STEPS])], dim=1)
    with torch.no_grad(), decode_teacher_forced(model, parse_decode_config("gate@tok=32", B16),
                                                gates, score_from=PROMPT, prefix=PROMPT) as tf:
        model(ids, use_cache=False)
    for i, r in tf.stats.per_layer_recall.items():
        assert sparse.mean_recall(i) == pytest.approx(r, abs=1e-5)


def test_a_covering_budget_reads_everything_and_decodes_as_dense(model, prompt, covering):
    vis = covering.visible()
    for i in covering.layers:
        assert np.array_equal(covering.picked[i], np.broadcast_to(vis[:, None], (STEPS, 2,
                                                                                  vis.shape[1])))
        np.testing.assert_allclose(covering.recall[i], 1.0, atol=1e-6)
        np.testing.assert_allclose(covering.oracle_recall[i], 1.0, atol=1e-6)
    assert covering.kept_share() == 1.0
    dense = viz.trace_generation(model, prompt, "dense", max_new_tokens=NEW)
    assert np.array_equal(dense.new_tokens, covering.new_tokens)
    assert dense.mean_recall() == pytest.approx(1.0)


def test_trace_refusals(model, gates, prompt):
    with pytest.raises(ValueError, match="one prompt"):
        viz.trace_generation(model, prompt.expand(2, -1), "quest@tok=32", max_new_tokens=4)
    with pytest.raises(ValueError, match="at least 2"):
        viz.trace_generation(model, prompt, "quest@tok=32", max_new_tokens=1)
    with pytest.raises(ValueError, match="DecodeGateSet"):
        viz.trace_generation(model, prompt, "gate@tok=32", max_new_tokens=4)


def test_steps_figure_and_panel(sparse, covering):
    fig = viz.decode_steps_figure(sparse, 1, note="untrained decode gate, tiny random model")
    title = fig.layout.title.text
    assert "Layer 1" in title and "gate@tok=32" in title and "untrained" in title
    maps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    marks = [t for t in fig.data if isinstance(t, go.Scatter) and t.mode == "markers"]
    assert len(maps) == len(marks) == 2  # one per kv head
    nb = sparse.truth[1].shape[-1]
    z = np.asarray(maps[0].z, dtype=float)
    assert z.shape == (nb, STEPS)  # key blocks x steps
    assert np.isnan(z[~sparse.visible().T]).all() and not np.isnan(z[sparse.visible().T]).any()
    assert len(marks[1].x) == sparse.picked[1][:, 1].sum()
    assert fig.layout.xaxis3.title.text.startswith("decode step")
    assert fig.layout.yaxis.title.text == "key block (b=16)"
    assert fig.layout.yaxis3.title.text == "recall"
    one = viz.decode_steps_figure(sparse, 0, max_heads=1)
    assert sum(isinstance(t, go.Heatmap) for t in one.data) == 1
    assert "kv head 0 of 2" in [a.text for a in one.layout.annotations]
    with pytest.raises(ValueError, match="not recorded"):
        viz.decode_steps_figure(sparse, 5)
    traces = {32: sparse, 4096: covering}
    assert isinstance(viz.decode_panel(traces, 1, 32, interactive=False), go.Figure)
    assert isinstance(viz.decode_panel(traces, 1, 32, interactive=True), W.VBox)
    with pytest.raises(ValueError, match="traced: \\[32, 4096\\]"):
        viz.decode_panel(traces, 1, 64, interactive=False)
    layers = viz.decode_layer_recall_figure(traces, note="CPU small")
    assert len(layers.data) == 4 and "CPU small" in layers.layout.title.text
    assert list(layers.data[2].y) == pytest.approx([1.0, 1.0])


def test_quality_figure_from_decode_quality(model, gates):
    w = torch.randint(0, 211, (1, 128), generator=torch.Generator().manual_seed(3))
    rows = decode_quality(model, w, decode_configs(["gate", "oracle"], [32, 64], B16), gates,
                          progress=False)
    fig = viz.decode_quality_figure(rows, note="untrained gate")
    assert "128-token windows" in fig.layout.title.text and "untrained" in fig.layout.title.text
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names[:2] == ["gate (learned decode gate)", "oracle (true block scores)"]
    assert names[-1].startswith("dense (")
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [32, 64]
    recall = [t for t in fig.data if t.xaxis == "x2" and t.legendgroup == "oracle"][0]
    assert all(0 <= y <= 1 for y in recall.y)
    assert fig.layout.xaxis.title.text.startswith("token budget")


def test_quality_figure_draws_forced_block_variants_apart():
    """gate and gate+sink are two lines, not one line keyed by the method."""
    rows = [dict(label=f"gate{f}@tok={t}", method="gate", tokens=t, length=64, ppl=3.0,
                 ppl_late=3.0 - len(f), recall=0.5) for f in ("", "+sink") for t in (16, 32)]
    fig = viz.decode_quality_figure(rows)
    lines = {t.name: list(t.y) for t in fig.data if t.showlegend is not False}
    assert lines == {"gate (learned decode gate)": [3.0, 3.0], "gate+sink": [-2.0, -2.0]}


def test_committed_quality_results_are_read(tmp_path):
    row = dict(label="gate@tok=512", method="gate", tokens=512, length=4096, windows=8, ppl=9.0,
               ppl_late=8.5, recall=0.9, kept_tokens=500.0, context_tokens=3000.0)
    (tmp_path / "decode-quality-smollm2-4096.json").write_text(json.dumps(
        {"device": "cuda", "device_name": "NVIDIA H200", "gates": "g.safetensors",
         "quality": [row], "passkey": [], "generation": []}))
    (tmp_path / "decode-quality-broken.json").write_text("{not json")
    got = viz.decode_quality_results(tmp_path)
    assert [r["_file"] for r in got] == ["decode-quality-smollm2-4096.json"]
    assert got[0]["device_name"] == "NVIDIA H200" and got[0]["quality"] == [row]
    assert viz.decode_quality_results(tmp_path / "missing") == []
    passkeys = [dict(label=c, method=c.split("@")[0], tokens=None, length=8192, depth=d,
                     accuracy=a, trials=2)
                for c, d, a in [("dense", 0.1, 1.0), ("dense", 0.9, 1.0),
                                ("gate@tok=512", 0.1, 0.5), ("gate@tok=512", 0.9, 0.0)]]
    pk = viz.decode_passkey_figure(passkeys, note="NVIDIA H200")
    assert list(pk.data[0].y) == ["dense", "gate@tok=512"]
    assert np.array_equal(np.asarray(pk.data[0].z, float), [[1.0, 1.0], [0.5, 0.0]])
    assert "2 keys per cell" in pk.layout.title.text and "H200" in pk.layout.title.text
    gen = viz.decode_generation_table([dict(label="dense", length=4096, prompts=4,
                                            mean_new_tokens=97.75, hit_cap=0.75,
                                            same_as_first=1.0)])
    assert "tokens equal to dense's" in list(gen.data[0].header.values)
    assert list(gen.data[0].cells.values[3]) == ["97.8"]
    assert viz.decode_speed_records(tmp_path) == ([], [])  # quality files are not speed records


def test_committed_speed_records_table_and_figure(tmp_path):
    common = dict(batch=1, gpu="NVIDIA H200", torch="2.9.0", triton="3.5.0", date="2026-12-02")
    recs = [dict(common, provider=p, kv_len=L, sparsity=s, ms=ms)
            for p, s, L, ms in [("sdpa_flash", 0.0, 8192, 0.20), ("sdpa_cudnn", 0.0, 8192, 0.10),
                                ("seer_sparse", 0.9, 8192, 0.05),
                                ("sdpa_flash", 0.0, 32768, 0.80), ("seer_sparse", 0.9, 32768,
                                                                   0.10)]]
    for r in recs:
        r["speedup_vs_sdpa"] = 1.0
    (tmp_path / "decode-H200-2026-12-02_step.json").write_text(json.dumps(recs))
    (tmp_path / "decode-H200-2026-12-02_gen.json").write_text(json.dumps(
        {"records": [dict(common, provider="gate@tok=1024", ms=12.0)]}))
    records, files = viz.decode_speed_records(tmp_path)
    assert files == ["decode-H200-2026-12-02_gen.json", "decode-H200-2026-12-02_step.json"]
    assert len(records) == 6
    tables = viz.decode_speed_tables(records)
    assert len(tables) == 2
    step = next(t for t in tables if "_step" in t.layout.title.text)
    assert list(step.data[0].header.values) == ["provider", "batch", "kv_len", "sparsity", "ms",
                                                "speedup_vs_sdpa"]
    assert "NVIDIA H200" in step.layout.title.text and "triton 3.5.0" in step.layout.title.text
    fig = viz.decode_speed_figure(records)
    (line,) = [t for t in fig.data if t.name == "seer_sparse, sparsity 0.90"]
    assert list(line.x) == [8192, 32768] and list(line.y) == pytest.approx([2.0, 8.0])
    assert "fastest SDPA" in fig.layout.yaxis.title.text
    assert viz.decode_speed_figure([r for r in records if r["provider"] == "seer_sparse"]) is None
