"""bench/bench_decode.py on a CPU: budget arithmetic, the random keep mask, the bytes counted, the
FlexAttention block mask, the targets' arithmetic, and both parts end to end at tiny sizes (the
kernel under the Triton interpreter, the CUDA-only rows skipped with a reason), their JSON and
markdown, and --merge."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_decode.py"
_spec = importlib.util.spec_from_file_location("bench_decode", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_decode"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)
peers = sys.modules["_decode_peers"]  # imported by the script from bench/
report = sys.modules["_decode_report"]


def _records(stem):
    return json.loads(Path(f"{stem}.json").read_text())


def test_budget_blocks_rounds_half_up_within_the_cache():
    # the lengths: round((1 - s) S / 64)
    assert [bench.budget_blocks(0.9, S, 64) for S in (8192, 32768, 131072)] == [13, 51, 205]
    assert [bench.budget_blocks(0.95, S, 64) for S in (8192, 32768, 131072)] == [6, 26, 102]
    assert bench.budget_blocks(0.5, 192, 64) == 2  # 1.5 -> 2 (half up, not to even)
    assert bench.budget_blocks(0.99, 100, 64) == 1  # at least one block: the newest
    assert bench.budget_blocks(0.0, 1000, 64) == 16  # never more than ceil(S / b)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            bench.budget_blocks(bad, 1000, 64)


@pytest.mark.parametrize("S, kept", [(1000, 3), (97, 2), (4096, 64), (64, 1)])
def test_random_keep_has_the_newest_block_and_exactly_the_budget(S, kept):
    keep = bench.random_keep(3, 2, S, 64, kept, "cpu", seed=S)
    nb = -(-S // 64)
    assert keep.shape == (3, 2, nb) and keep.dtype == torch.bool  # no block past kv_len
    assert keep[..., -1].all()
    assert (keep.sum(-1) == kept).all()
    if 1 < kept < nb:  # random earlier blocks: rows differ
        assert len({tuple(r.tolist()) for r in keep.reshape(6, nb)}) > 1
    with pytest.raises(ValueError, match="kept_blocks"):
        bench.random_keep(1, 1, S, 64, nb + 1, "cpu")


def test_bytes_count_the_kept_keys_and_the_partial_newest_block():
    assert bench.kept_tokens(3, 1000, 64) == 2 * 64 + 40  # 1000 = 15 * 64 + 40
    assert bench.kept_tokens(16, 1024, 64) == 1024
    t = bench.traffic(B=2, Hq=8, Hkv=2, d=16, elt=2, tokens=168, meta=10, extra=4)
    assert t["kv_bytes"] == 2 * 2 * 2 * 168 * 16 * 2  # K and V, per (batch, kv head)
    assert t["qo_bytes"] == 2 * 2 * 8 * 16 * 2
    assert t["bytes"] == t["kv_bytes"] + t["qo_bytes"] + 14
    repeated = bench.traffic(B=2, Hq=8, Hkv=2, d=16, elt=2, tokens=168, kv_heads_read=8)
    assert repeated["kv_bytes"] == 4 * t["kv_bytes"]


def test_flex_block_mask_lists_the_kept_blocks_of_each_group():
    from seerlib.decode.select import decode_index

    B, Hq, Hkv, S = 2, 6, 2, 1000
    keep = bench.random_keep(B, Hkv, S, 64, 4, "cpu", seed=1)
    idx, cnt = decode_index(keep, 4)
    bm = peers.flex_block_mask(idx, cnt, Hq, S, 64)
    dense = bm.to_dense()[:, :, 0, : keep.shape[-1]].bool()  # (B, Hq, nb) from the block lists
    assert torch.equal(dense, keep.repeat_interleave(Hq // Hkv, 1))


def test_the_check_is_relative_to_the_output_and_fails_zeros():
    cfg = bench.BenchConfig(device="cpu", dtype="fp32")
    case = bench.Case(cfg, torch.device("cpu"), bench.attention_config("tiny"), 300, 2)
    want = case.dense_ref()
    assert case.check(want, want)["check_ok"]
    bad = case.check(torch.zeros_like(case.q), want)
    assert not bad["check_ok"] and bad["max_abs_diff"] == pytest.approx(bad["ref_max_abs"])


def _step(r, share):
    return {"run_id": "x", "part": "step", "kind": "row", "status": "ok", "batch": 16,
            "kv_len": 32768, "sparsity": 0.9, "provider": "seer_step", "ms": r, "ms_from": "graph",
            "eager_ms": 2 * r, "gate_share_eager": 0.5, "gate_share_graph": share}


def test_targets_report_the_measured_ratio_and_whether_it_is_met():
    sdpa = {"run_id": "x", "part": "step", "kind": "row", "status": "ok", "batch": 16,
            "kv_len": 32768, "sparsity": None, "provider": "sdpa_flash", "ms": 0.475}
    slower = {**sdpa, "provider": "sdpa_cudnn", "ms": 0.6}
    records = [sdpa, slower, _step(0.0700, 0.15)]
    report.add_ratios(records)
    assert records[2]["sdpa_best"] == "sdpa_flash"
    assert records[2]["vs_sdpa_best"] == pytest.approx(0.475 / 0.07)
    lines = report.targets(records)
    assert "6.79× (target ≥ 6×: met)" in lines[1] and "share 15% (target ≤ 20%: met)" in lines[1]
    assert "not measured" in lines[2]  # batch 1, 128k: no rows
    records = [sdpa, _step(0.1, 0.3)]
    report.add_ratios(records)
    line = report.targets(records)[1]
    assert "4.75× (target ≥ 6×: NOT met)" in line and "30% (target ≤ 20%: NOT met)" in line


def test_cpu_runs_of_both_parts_record_every_row_and_merge(tmp_path):
    common = ["--device", "cpu", "--preset", "tiny", "--batches", "2"]
    provs = ["sdpa_flash", "sdpa_cudnn", "seer_dense", "seer_kernel", "seer_step", "flex_sparse"]
    stem_a = bench.main([*common, "--kv-lens", "300", "--sparsities", "0.5", "--rep-ms", "25",
                         "--providers", *provs, "--out", str(tmp_path / "a"), "--tag", "_a"])
    records = _records(stem_a)
    rows = {(r["provider"], r["sparsity"]): r for r in records}
    assert [p for p, _ in rows] == ["sdpa_cudnn", "sdpa_flash", "seer_dense", "seer_kernel",
                                    "seer_step", "flex_sparse"]  # step_plan's order
    assert rows[("sdpa_cudnn", None)]["status"] == "skipped"
    assert "CUDA" in rows[("sdpa_cudnn", None)]["reason"]
    nb, kept = 5, bench.budget_blocks(0.5, 300, 64)  # 300 tokens: 5 blocks; 0.5 * 300 / 64 -> 2
    assert kept == 2
    for (p, s), r in rows.items():
        if p == "sdpa_cudnn":
            continue
        assert r["status"] == "ok", (p, r.get("error"))
        assert r["ms"] > 0 and r["us"] == pytest.approx(1e3 * r["ms"]) and r["gbs"] > 0
        assert r["copy_share"] == pytest.approx(r["gbs"] / r["copy_gbs"])
        assert r["batch"] == 2 and r["kv_len"] == 300 and r["torch"] == torch.__version__
        assert r["check_ok"] and r["max_abs_diff"] < 1e-4, (p, r["max_abs_diff"])
        assert r["vs_sdpa_best"] > 0 and r["sdpa_best"] == "sdpa_flash"
        want = 300 if s is None else bench.kept_tokens(kept, 300, 64)
        assert r["kv_bytes"] == 2 * 2 * 2 * want * 16 * 4, p  # Hkv 2, d 16, fp32
        assert r["kept_blocks"] == (nb if s is None else kept)
    step = rows[("seer_step", 0.5)]
    assert step["step_kept_blocks"] == kept and step["config"] == "gate@tok=128"
    assert step["kernel_ms"] > 0 and "CUDA" in step["graph_error"] and step["ms_from"] == "eager"
    assert step["impl"].startswith("triton kernel")  # the interpreter ran the kernel
    assert rows[("flex_sparse", 0.5)]["flex_mode"].startswith("eager")
    md = Path(f"{stem_a}.md").read_text()
    assert "| seer_kernel@0.5 |" in md and "## The sparse step" in md and "## Checks" in md

    stem_b = bench.main([*common, "--part", "generate", "--prompt-len", "300", "--new-tokens",
                         "4", "--labels", "gate@tok=1024", "sink_window@tok=128", "--out",
                         str(tmp_path / "b"), "--tag", "_b"])
    gen = {r["provider"]: r for r in _records(stem_b)}
    assert list(gen) == ["dense", "gate@tok=1024", "sink_window@tok=128"]
    for p, r in gen.items():
        assert r["status"] == "ok", (p, r.get("error"))
        # two separate timings: on a loaded CPU the prefill alone can take longer than the whole
        # generate, so only their signs and the derived figures are checked, not their order
        assert r["prefill_s"] > 0 and r["total_s"] > 0
        assert r["decode_s"] == pytest.approx(r["total_s"] - r["prefill_s"])
        if r["total_s"] > r["prefill_s"]:
            assert r["decode_tok_s"] > 0
        else:  # no decode time left to divide by: NaN, not a made-up rate
            assert math.isnan(r["decode_tok_s"])
        assert len(r["tokens"]) == 2 and all(len(t) == 4 for t in r["tokens"])
        assert "RANDOM" in r["weights"]
    # a budget that covers the 300-token context reads every block: exactly dense's tokens
    assert gen["gate@tok=1024"]["kept_share"] == 1.0
    assert gen["gate@tok=1024"]["same_tokens_as_dense"] == 1.0
    assert gen["sink_window@tok=128"]["kept_share"] == pytest.approx(2 / 5)  # 2 of 5 blocks
    assert "## Generation" in Path(f"{stem_b}.md").read_text()

    merged = bench.main(["--merge", f"{stem_a}.json", f"{stem_b}.json", f"{stem_a}.json",
                         "--out", str(tmp_path / "m")])
    both = _records(merged)
    assert len(both) == len(records) + len(gen)  # the repeated file adds nothing
    md = Path(f"{merged}.md").read_text()
    assert "### batch 2" in md and "## Generation" in md and "Issue 15 targets" in md


def test_bad_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="sparsity"):
        bench.parse(["--device", "cpu", "--sparsities", "1.0"])
    with pytest.raises(ValueError, match="decode method"):
        bench.parse(["--device", "cpu", "--labels", "nosuch@tok=64"])
    with pytest.raises(bench.Skip, match="too big"):
        bench.row(None, "seer_kernel", 0.9, "too big")


def test_tune_decode_index_on_a_cpu(tmp_path):
    """bench/tune_decode_index.py at a tiny size under the interpreter: every variant runs, gives
    the default launch's index, and the table names the best."""
    path = Path(__file__).resolve().parents[1] / "bench" / "tune_decode_index.py"
    spec = importlib.util.spec_from_file_location("tune_decode_index", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    stem = tune.main(["--device", "cpu", "--preset", "tiny", "--kv-lens", "1024", "--batches",
                      "2", "--out", str(tmp_path)])
    records = _records(stem)
    assert len(records) == len(tune.variants(torch.device("cpu"))) == 3
    assert all(r["status"] == "ok" and r["same_index"] and r["ms"] > 0 for r in records)
    assert records[0]["chunk_c"] == 32 and records[0]["split"] == "default"
    assert {r["blocks_per_program"] for r in records} == {None, 4}  # 16 cached blocks / 4
    md = Path(f"{stem}.md").read_text()
    assert "| 2 | 1024 |" in md and "| True |" in md
    assert len(tune.variants(torch.device("cuda"))) == 1 + 3 * 3 * 2 * 3
    # the whole step's table (CUDA graphs only: a record as the GPU writes it)
    step = {**records[0], "kind": "step", "status": "ok", "step_default_ms": 0.2,
            "step_best_ms": 0.1, "kernel_ms": 0.08, "sdpa_cudnn_ms": 0.6}
    md = tune.markdown([*records, step])
    assert "| 2 | 1024 | 200.0 | 100.0 | 80.0 | 600.0 | 3.00× | 6.00× | 20% |" in md
    assert md.count("| 2 | 1024 |") == Path(f"{stem}.md").read_text().count("| 2 | 1024 |") + 1
