"""bench/bench_prefill.py end to end on a CPU: a tiny random Llama at 256 tokens (the CUDA-only
rows skipped with a reason), its JSON and markdown, a recorded failure, and --merge."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seerlib import ops
from seerlib.distill import tiny_config
from seerlib.gate import GateSet
from seerlib.methods import SparseConfig
from seerlib.select import Selection

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_prefill.py"
_spec = importlib.util.spec_from_file_location("bench_prefill", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_prefill"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def _records(stem):
    return json.loads(Path(f"{stem}.json").read_text())


def test_cpu_run_records_every_row_and_merges(tmp_path):
    common = ["--device", "cpu", "--preset", "tiny", "--reps", "2"]
    stem_a = bench.main([*common, "--seq-lens", "256", "--out", str(tmp_path / "a"), "--tag", "_a"])
    records = _records(stem_a)
    rows = {r["provider"]: r for r in records if r["kind"] == "row"}
    assert list(rows) == bench.row_order(bench.DEFAULT_PROVIDERS)
    graphed = [p for p in bench.DEFAULT_PROVIDERS if "graph" in bench.split_modes(p)[0]]
    assert "graph+compile:gate@0.1" in graphed
    for p in ("sdpa_flash", "sdpa_cudnn", "flex", "step@0.1", "cstep@0.1", *graphed):
        assert rows[p]["status"] == "skipped" and "CUDA" in rows[p]["reason"]
    ran = {p: r for p, r in rows.items() if r["status"] != "skipped"}
    for p, r in ran.items():
        assert r["status"] == "ok", (p, r.get("error"))
        assert r["ms"] > 0 and len(r["ms_samples"]) == 2 and min(r["ms_samples"]) > 0
        assert r["seq_len"] == 256 and r["layers"] == 2 and r["vs_sdpa"] > 0
        assert "random weights" in r["weights"] and r["torch"] == torch.__version__
        if p == "sdpa":
            continue
        assert 0 < r["achieved_density"] <= 1, p
        bd = r["breakdown"]
        parts = [bd[f"{n}_ms"] for n in bench.PARTS]
        assert all(isinstance(x, float) and x >= 0 for x in parts), (p, bd)
        assert bd["rest_ms"] == pytest.approx(bd["total_ms"] - sum(parts))
        assert bd["kernel_ms"] > 0 and bd["calls"]["kernel"] == 2, (p, bd)  # one per layer
        if p.startswith(("gate", "recommended")):
            # per layer the gate is four calls (pool q, pool k, ops.gate_logits and, on a CPU,
            # the gate's block_scores inside it), then one selection
            assert bd["gate_ms"] > 0 and bd["calls"]["gate"] == 8 and bd["calls"]["selection"] == 2
            assert r["stats"]["dense_calls"] == 0 and r["gate"] == "untrained"
    assert rows["ideal@0.1"]["breakdown"]["calls"]["gate"] == 0
    (check,) = [r for r in records if r["kind"] == "check"]
    assert check["status"] == "ok" and check["ok"] and check["max_abs_diff"] < 1e-3
    assert check["achieved_density"] == 1.0
    md = Path(f"{stem_a}.md").read_text()
    for p in bench.DEFAULT_PROVIDERS:
        assert f"| {p} |" in md or bench.row_kind(p) == "step"  # steps: their own table
    assert "## Breakdown" in md and "## Check" in md and "random weights" in md

    # a second run at another length, with a row that fails (density 2): recorded, not raised
    # and a compiled selection (inductor's C++ backend here), which gets no breakdown
    stem_b = bench.main([*common, "--seq-lens", "128", "--providers", "sdpa", "gate@0.5",
                         "compile:gate@0.5", "ideal@2", "--no-check", "--profile", "--out",
                         str(tmp_path / "b"), "--tag", "_b"])
    by = {r["provider"]: r for r in _records(stem_b)}
    prof = by["gate@0.5"]["profile"]  # one more call under torch.profiler (host ops on a CPU)
    assert prof["wall_ms"] > 0 and prof["top"] and all(e["calls"] > 0 for e in prof["top"])
    assert "profile" not in by["sdpa"]
    assert by["compile:gate@0.5"]["status"] == "ok" and "breakdown" not in by["compile:gate@0.5"]
    assert by["compile:gate@0.5"]["achieved_density"] == by["gate@0.5"]["achieved_density"]
    bad = by["ideal@2"]
    assert bad["status"] == "failed" and "ValueError" in bad["error"]
    assert "ideal@2 at 128: failed" in Path(f"{stem_b}.md").read_text()

    merged = bench.main(["--merge", f"{stem_a}.json", f"{stem_b}.json", "--out",
                         str(tmp_path / "m")])
    both = _records(merged)
    assert len(both) == len(records) + len(_records(stem_b))
    assert {r["seq_len"] for r in both} == {128, 256}
    assert "| provider | 128 | 256 |" in Path(f"{merged}.md").read_text()


def test_every_patch_target_resolves_and_is_restored():
    """The breakdown's patch table names functions that exist now (a rename shows up here, not
    as a silent n/a in a GPU run), and the instrumented call puts the originals back."""
    import seerlib.gate
    import seerlib.methods

    before = (seerlib.gate.AttnGate.block_scores, seerlib.methods.select_blocks)
    with bench.instrumented(torch.device("cpu")) as timer:
        assert not timer.missing and timer.present == set(bench.PARTS)
        assert seerlib.gate.AttnGate.block_scores is not before[0]
    assert (seerlib.gate.AttnGate.block_scores, seerlib.methods.select_blocks) == before


def test_part_timer_subtracts_nested_calls():
    timer = bench.PartTimer(torch.device("cpu"))
    inner = timer.wrap("index", lambda: sum(range(20000)))
    outer = timer.wrap("kernel", lambda: [inner() for _ in range(3)])
    outer()
    assert timer.calls == {"gate": 0, "selection": 0, "index": 3, "kernel": 1}
    assert timer.ms["kernel"] >= 0 and timer.ms["index"] > 0


def test_pooled_step_row_on_the_kernels_with_its_graph_called(monkeypatch):
    """The pstep row's glue (shapes, the kernel-alone timing, the graph-vs-eager check) on a CPU:
    its CUDA graph replaced by a plain call, the kernels under the interpreter."""
    class Called(bench.StepGraphs):
        def replay(self, key, fn, statics):
            return fn(*statics)

    monkeypatch.setattr(bench, "StepGraphs", Called)
    Hq, Hkv, S, d, b = 4, 2, 97, 16, 16  # tiny_config's heads and head dim
    gates = GateSet.from_config(tiny_config(), block_size=b)
    g = torch.Generator().manual_seed(0)
    q, q_pre = (torch.randn(1, Hq, S, d, generator=g) for _ in range(2))
    k, v, k_pre = (torch.randn(1, Hkv, S, d, generator=g) for _ in range(3))
    scfg = SparseConfig("gate", Selection(density=0.4), block_size=b)
    layer = bench.LayerInputs(q, k, v, b, scale=d ** -0.5, gate=gates[0], q_pre=q_pre, k_pre=k_pre)

    def step():
        mask = bench.layer_block_mask(scfg, layer)
        return ops.block_sparse_attention(q, k, v, mask, b, scale=d ** -0.5, sync_free=True)

    run = SimpleNamespace(device=torch.device("cpu"), gates=gates)
    with ops.use_backend("triton"):
        r = bench.pooled_step(run, "pstep", step, layer, scfg, 1, 0)
    assert r["path"] == "graphed_gate_step" and r["ms"] > 0 and r["kernel_ms"] > 0
    assert r["graph_vs_eager_max_abs_diff"] < 1e-5 and 0 < r["achieved_density"] <= 1
    # the one-launch selection beside the mask path, the same attention
    assert r["select_index_fused"] and r["mask_path_graph_ms"] > 0
    assert r["mask_path_vs_fused_max_abs_diff"] < 1e-5


def test_whole_forward_rows_on_a_cpu_with_the_graph_called(monkeypatch, tmp_path):
    """The whole: rows' glue on a CPU: PrefillGraph replaced by a plain call of the model (its
    capture needs a GPU; tests/test_prefill_graph.py tests it there): timing, the check against
    eager logits, and their own markdown table; 'whole' takes no per-layer graphs."""
    class Called:
        def __init__(self, model, ids, *, warmup, **kwargs):
            self.model, self.kwargs = model, kwargs

        def __call__(self, ids):
            with torch.no_grad():
                return self.model(input_ids=ids, use_cache=False, **self.kwargs).logits

    monkeypatch.setattr(bench, "PrefillGraph", Called)
    cfg = bench.BenchConfig(shapes=("tiny",), seq_lens=(128,), device="cpu", dtype="fp32",
                            reps=2)
    model = bench.build_model("tiny", None, cfg, 128)
    gates = GateSet.from_config(model.config, block_size=64)
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    run = bench.Run(cfg, torch.device("cpu"), model, gates, ids)
    r = bench.whole_graph(run)
    assert r["ms"] > 0 and r["graph_vs_eager_max_abs_diff"] == 0 and r["capture_s"] >= 0
    with pytest.raises(ValueError, match="takes no per-layer graphs"):
        bench.split_modes("whole+graph:gate@0.1")
    assert bench.split_modes("whole+compile:gate@0.1") == ({"whole", "compile"}, "gate@0.1")
    assert bench.row_kind("whole:sdpa_cudnn") == "dense"
    assert bench.row_kind("whole:gate@0.1") == "sparse"
    stem = bench.main(["--device", "cpu", "--preset", "tiny", "--seq-lens", "128", "--reps", "1",
                       "--providers", "sdpa", "whole:sdpa", "whole:gate@0.1", "--no-check",
                       "--out", str(tmp_path), "--tag", "_w"])
    rows = {x["provider"]: x for x in _records(stem)}
    assert all(rows[p]["status"] == "skipped" and "CUDA" in rows[p]["reason"]
               for p in ("whole:sdpa", "whole:gate@0.1"))
    record = {**rows["sdpa"], **r, "provider": "whole:gate@0.1", "status": "ok"}
    md = bench.markdown([rows["sdpa"], record])
    assert "## One CUDA graph of the whole forward" in md
    assert "| tiny | 2 | 128 | whole:gate@0.1 |" in md
    assert "## One CUDA graph" not in bench.markdown([rows["sdpa"]])


def test_tune_gate_logits_on_a_cpu(tmp_path):
    """bench/tune_gate_logits.py at a tiny size under the interpreter: every variant runs and
    equals the gate's logits, the torch peer and the gate step are timed, the tables name them."""
    path = Path(__file__).resolve().parents[1] / "bench" / "tune_gate_logits.py"
    spec = importlib.util.spec_from_file_location("tune_gate_logits", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    stem = tune.main(["--device", "cpu", "--shapes", "tiny", "--seq-lens", "300", "--out",
                      str(tmp_path)])
    records = _records(stem)
    variants = [r for r in records if r["kind"] == "variant"]
    assert len(variants) == len(tune.variants(torch.device("cpu"))) == 3
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in variants)
    assert all(r["max_abs_diff"] <= 1e-4 * max(1.0, r["ref_max_abs"]) for r in variants)
    (step,) = [r for r in records if r["kind"] == "step"]
    assert step["status"] == "ok", step.get("error")
    assert step["torch_eager_ms"] > 0 and step["step_fused_ms"] > 0 and step["blocks"] == 5
    md = Path(f"{stem}.md").read_text()
    assert "| tiny | 300 |" in md and "step, fused logits µs" in md
    assert len(tune.variants(torch.device("cuda"))) == 1 + 3 * 3 * 3
