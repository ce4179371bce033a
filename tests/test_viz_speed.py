"""seerlib.viz.speed (notebook 05): benchmark records, speedups and their figures."""

from seerlib import viz


def _record(provider, S, ms, sparsity=0.0, pattern="dense", gpu="GPU-A", date="2026-01-01"):
    return {"provider": provider, "seq_len": S, "ms": ms, "sparsity": sparsity,
            "target_sparsity": sparsity, "pattern": pattern, "gpu": gpu, "date": date,
            "torch": "t", "triton": "t"}


def test_bench_records_and_speedups(tmp_path):
    import json

    recs = [_record("sdpa_flash", 1024, 4.0), _record("sdpa_cudnn", 1024, 2.0),
            _record("seer_dense", 1024, 3.0),
            _record("seer", 1024, 1.0, 0.5, "random"), _record("flex", 1024, 1.5, 0.5, "random"),
            _record("seer", 1024, 2.0, 0.5, "random", date="2025-01-01")]  # older file loses
    (tmp_path / "GPU-A-2026-01-01.json").write_text(json.dumps(recs[:5]))
    (tmp_path / "GPU-A-2025-01-01.json").write_text(json.dumps(recs[5:]))
    (tmp_path / "GPU-A-2026-01-01-checks.json").write_text(json.dumps([{"check": "x"}]))
    (tmp_path / "GPU-B-2024-01-01.json").write_text(json.dumps(
        [_record("seer", 1024, 9.0, 0.5, "random", gpu="GPU-B", date="2024-01-01")]))
    records, files = viz.bench_records(tmp_path)
    assert files == ["GPU-A-2026-01-01.json"] and len(records) == 5
    (row,) = viz.speedups(records, "random")
    assert row["sdpa_flash"] == 4.0 and row["sdpa_cudnn"] == 2.0 and row["flex"] == 1.5
    assert row["seer_dense"] == 3.0
    fig = viz.speedup_figure(records)
    names = {t.name for t in fig.data}
    assert {"ideal 1/(1-s)", "vs FlashAttention-2 (SDPA)", "vs FlexAttention (same mask)"} <= names
    for r in records:
        r.setdefault("tflops", 100.0)
    bars = viz.dense_throughput_figure(records)
    assert [t.name for t in bars.data] == ["ours, dense", "FlashAttention-2 (SDPA)",
                                           "cuDNN (SDPA)"]
    assert viz.bench_records(tmp_path, gpu="GPU-B")[0][0]["ms"] == 9.0
    assert viz.bench_records(tmp_path / "none") == ([], [])
    table = viz.table_figure([row], ["seq_len", "sdpa_flash"], headers={"sdpa_flash": "vs FA2"})
    assert list(table.data[0].header.values) == ["seq_len", "vs FA2"]


def test_prefill_figure_draws_the_committed_end_to_end_run(tmp_path):
    import json
    import shutil

    from seerlib.viz.common import repo_path

    src = repo_path("bench/results/prefill-H200-2026-12-01.json")
    shutil.copy(src, tmp_path / src.name)
    (tmp_path / "H200-2026-12-01.json").write_text(json.dumps(
        [{"provider": "seer", "seq_len": 8192, "ms": 1.0, "gpu": "H200", "date": "2026-12-01"}]))
    recs, files = viz.prefill_records(tmp_path)
    assert files == [src.name] and recs and all(r["status"] == "ok" for r in recs)
    fig = viz.prefill_figure(recs)
    bars = {t.name: t for t in fig.data if t.legendgroup}
    assert "gate, density 0.1, CUDA graphs" in bars and "SDPA cuDNN (dense)" in bars
    cudnn = [t for t in fig.data if t.name == "SDPA cuDNN (dense)"]
    assert all(y == 1.0 for t in cudnn for y in t.y if y is not None)  # its own reference
    # the kernel sweep's reader leaves bench_prefill's files alone
    kernel, kernel_files = viz.bench_records(tmp_path)
    assert kernel_files == ["H200-2026-12-01.json"]
