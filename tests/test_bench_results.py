"""bench/_results.py: the run's metadata, the result files written after every row, the merge of
partial files, a row run into a record; and the committed result files still come out byte for
byte from their records (markdown) and from their parts (merge), written under tmp_path only;
and bench_attention's tune (bench/_attention_tune.py): its variants, its summary, a tiny run on
the CPU (the kernels under the Triton interpreter, a fake timer)."""

import importlib
import importlib.util
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks' helpers are top-level modules there
res = importlib.import_module("_results")


def _script(name):
    """bench/<name>.py as a module (the one already loaded by another test, if any)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _md(records):
    return f"{len(records)} records: " + ", ".join(r["name"] for r in records) + "\n"


def _ratios(records):
    for r in records:
        r["double"] = 2 * r["x"]


FILES = res.ResultFiles("toy", ("run_id", "name"), _md, _ratios)


def test_versions_name_torch_and_say_absent_for_a_missing_package():
    v = res.versions(("triton", "no-such-package-seerlib"))
    assert v == {"torch": torch.__version__, "triton": v["triton"],
                 "no-such-package-seerlib": "absent"}
    assert v["triton"] != "absent"
    assert list(res.versions()) == ["torch", "triton", "transformers"]


def test_run_meta_on_a_cpu():
    device = res.resolve_device("cpu")
    assert device == torch.device("cpu") and res.device_name(device) == "cpu"
    meta = res.run_meta(device, "python bench/x.py --a 1")
    assert list(meta)[:5] == ["gpu", "device", "date", "command", "run_id"]
    assert meta["gpu"] == "cpu" and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["command"] == "python bench/x.py --a 1"
    assert meta["run_id"].startswith(meta["date"] + "T") and meta["run_id"].count("-") == 3


def test_results_write_both_files_after_every_add(tmp_path):
    stem = FILES.stem(str(tmp_path / "out"), "H200", "2026-12-03", "_a")
    assert stem == str(tmp_path / "out" / "toy-H200-2026-12-03_a")
    r = res.Results(stem, FILES)
    r.add({"run_id": "1", "name": "a", "x": 1})
    assert json.loads(Path(stem + ".json").read_text()) == [
        {"run_id": "1", "name": "a", "x": 1, "double": 2}]
    r.add({"run_id": "1", "name": "b", "x": 5})
    assert Path(stem + ".md").read_text() == "2 records: a, b\n"
    text = Path(stem + ".json").read_text()
    assert text == json.dumps(r.records, indent=1) and not text.endswith("\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "toy-H200-2026-12-03_a.json", "toy-H200-2026-12-03_a.md"]  # no temporary file left


def test_merge_keeps_the_first_copy_of_a_record_and_names_the_pair(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rec = {"gpu": "H200", "date": "2026-12-01", "run_id": "1"}
    a.write_text(json.dumps([{**rec, "name": "x", "x": 1}, {**rec, "name": "y", "x": 2}]))
    b.write_text(json.dumps([{**rec, "name": "x", "x": 9}, {**rec, "run_id": "2", "name": "x",
                                                            "x": 3}]))
    stem = res.merge([str(a), str(b), str(a)], str(tmp_path / "m"), FILES, "_all")
    assert stem == str(tmp_path / "m" / "toy-H200-2026-12-01_all")
    merged = json.loads(Path(stem + ".json").read_text())
    assert [(r["run_id"], r["name"], r["x"], r["double"]) for r in merged] == [
        ("1", "x", 1, 2), ("1", "y", 2, 4), ("2", "x", 3, 6)]
    assert Path(stem + ".md").read_text() == "3 records: x, y, x\n"


@pytest.mark.parametrize("text, match", [
    ("[]", "no records"),
    ('[{"gpu": ', "not valid JSON"),
    ('{"meta": {}, "rows": []}', "JSON dict, not a list of records"),
    ("[1, 2]", "not a list of records"),
])
def test_merge_refuses_empty_and_foreign_files_naming_them(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        res.merge([str(p)], str(tmp_path / "m"), FILES)
    assert "bad.json" in str(e.value)
    assert not (tmp_path / "m").exists()


def _runner(tmp_path, **kw):
    out = res.Results(str(tmp_path / "r"), FILES)
    seen = []
    guarded = res.row_runner(out, {"run_id": "1", "x": 0}, torch.device("cpu"),
                             lambda rec, t: seen.append((rec["name"], rec["status"], t)), **kw)
    return out, seen, guarded


def test_a_row_becomes_a_record_whatever_it_does(tmp_path, capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def skip():
        raise res.Skip("runs on CUDA only")

    def fail():
        raise ValueError("density 2")

    out, seen, guarded = _runner(tmp_path, t_start=0.0, oom_status="oom",
                                 finish=lambda rec: rec.setdefault("finished", rec["status"]))
    got = [guarded({"name": "ok"}, lambda: {"x": 4, "ms": 1.0}),
           guarded({"name": "skip"}, skip), guarded({"name": "fail"}, fail),
           guarded({"name": "oom"}, oom)]
    assert [r["status"] for r in got] == ["ok", "skipped", "failed", "oom"]
    assert got[0]["x"] == 4 and got[0]["double"] == 8 and got[0]["run_id"] == "1"
    assert got[1]["reason"] == "runs on CUDA only" and "error" not in got[1]
    assert got[2]["error"] == "ValueError: density 2"
    assert got[3]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert all(r["finished"] == r["status"] and r["row_s"] >= 0 for r in got)
    assert out.records == got and [s[:2] for s in seen] == [(r["name"], r["status"]) for r in got]
    assert json.loads(Path(out.stem + ".json").read_text()) == got  # written after every row
    assert "ValueError: density 2" in capsys.readouterr().out  # the traceback is printed
    _, _, prefill_like = _runner(tmp_path, t_start=0.0)
    assert prefill_like({"name": "oom"}, oom)["status"] == "failed"  # the default oom_status


def test_a_spent_budget_stops_before_the_next_row(tmp_path, capsys):
    out, _, guarded = _runner(tmp_path, t_start=0.0, budget_s=1e-9)  # long spent
    ran = []
    with res.stop_when_out_of_time(1e-9):
        guarded({"name": "a"}, lambda: ran.append(1) or {})
    assert ran == [] and out.records == []
    assert "time budget of 0 s spent: stopped; results so far kept" in capsys.readouterr().out
    _, _, unlimited = _runner(tmp_path, t_start=0.0, budget_s=0.0)
    assert unlimited({"name": "a"}, dict)["status"] == "ok"


# --- the committed results come out of the shared code unchanged (written under tmp_path) ------


def _bytes(paths):
    return {p: p.read_bytes() for p in paths}


def test_decode_parts_merge_into_the_committed_file_byte_for_byte(tmp_path):
    _script("bench_decode")
    report = sys.modules["_decode_report"]
    day = RESULTS / "decode-H200-2026-12-02"
    parts = [Path(f"{day}{t}.json") for t in ("_step_a", "_step_b", "_gen")]
    before = _bytes([*parts, *(p.with_suffix(".md") for p in parts)])
    stem = res.merge([str(p) for p in parts], str(tmp_path), report.FILES)
    assert Path(stem).name == day.name
    assert Path(stem + ".json").read_bytes() == Path(f"{day}.json").read_bytes()
    assert Path(stem + ".md").read_bytes() == Path(f"{day}.md").read_bytes()
    for p in parts:  # each part's markdown from its records
        records = json.loads(p.read_text())
        report.add_ratios(records)
        assert report.markdown(records) == p.with_suffix(".md").read_text(encoding="utf-8")
    assert _bytes(before) == before


def test_prefill_file_remerges_to_itself(tmp_path):
    bench = _script("bench_prefill")
    day = RESULTS / "prefill-H200-2026-12-01"
    before = _bytes([Path(f"{day}.json"), Path(f"{day}.md")])
    stem = bench.merge([f"{day}.json"], str(tmp_path), bench.FILES)
    assert Path(stem).name == day.name
    assert Path(stem + ".json").read_bytes() == Path(f"{day}.json").read_bytes()
    assert Path(stem + ".md").read_bytes() == Path(f"{day}.md").read_bytes()
    assert _bytes(before) == before


def test_attention_parts_merge_into_the_committed_files(tmp_path):
    bench = _script("bench_attention")
    day = RESULTS / "H100-80GB-HBM3-2026-11-24"
    with redirect_stdout(io.StringIO()):
        bench.merge([f"{day}_a.json", f"{day}_b.json"], str(tmp_path))
    for suffix in (".json", "-checks.json", ".md"):
        got = (tmp_path / f"{day.name}{suffix}").read_bytes()
        assert got == Path(f"{day}{suffix}").read_bytes(), suffix


def test_attention_tune_variants_and_summary():
    _script("bench_attention")
    tune = sys.modules["_attention_tune"]
    variants = tune.seer_variants()
    assert len(variants) == 2 * 6 * 3 and len({tuple(v.values()) for v in variants}) == 36
    assert all(v["tma"] for v in variants if v["warp_specialize"])
    row = {"kernel": "seer", "variant": "sweep", "sparsity": 0.9, "rows_per_tile": 1,
           "num_warps": 4, "num_stages": 3, "tma": False, "warp_specialize": False}
    rows = [
        {**row, "ms": 2.0, "tflops": 1.0, "rel_err": 1e-3},
        {**row, "tma": True, "ms": 1.0, "tflops": 2.0, "rel_err": 1e-3},
        {**row, "tma": True, "warp_specialize": True, "ms": 0.5, "tflops": 4.0, "rel_err": 0.9},
        {**row, "num_stages": 4, "ms": None, "tflops": None, "error": "CompilationError: x"},
        {**row, "variant": "default", "ms": 1.5, "tflops": 1.3, "rel_err": 0.0},
        {"kernel": "flex", "sparsity": 0.9, "ms": 3.0, "tflops": 0.7, "rel_err": 1e-3},
        {"kernel": "sdpa_cudnn", "sparsity": 0.0, "ms": None, "tflops": None, "error": "no"},
    ]
    lines = tune.summary(rows)
    assert "| 0.9 | 1 | False | 4 | 3 | True | False | 1.000 | 2.0 | 1.0e-03 | 1.500 |" in lines
    assert "seer variants: 5, failed 1, wrong output 1" in lines  # the 0.5 ms one is wrong
    assert "| flex | 0.9 | 3.000 | 0.7 | 1.0e-03 | 3.00 | 3.00 |" in lines
    assert any(line.startswith("| sdpa_cudnn | 0.0 | failed: no") for line in lines)
    pair = tune.seer_variants("pair")  # the paired loop beside the unpaired one, 8 variants
    assert len(pair) == 8 and sum(v["pair_blocks"] for v in pair) == 4
    assert all("num_warps" not in v for v in pair)  # the library's launch
    paired = {**row, "pair_blocks": True, "ms": 0.8, "tflops": 2.5, "rel_err": 1e-3}
    assert any(line.startswith("| 0.9 | 1 | True | 4 | 3 | False | False | 0.800 |")
               for line in tune.summary([*rows, paired]))
    with pytest.raises(ValueError, match="'sweep' or 'pair'"):
        tune.seer_variants("all")


def test_attention_tune_runs_on_a_cpu_and_records_a_failed_variant(tmp_path, monkeypatch):
    bench = _script("bench_attention")
    tune = sys.modules["_attention_tune"]
    picked = [tune.seer_variants()[i] for i in (0, 1, 2)]  # pointer, TMA, TMA + warp spec.
    monkeypatch.setattr(tune, "seer_variants", lambda which: [*picked, {"rows_per_tile": 3}])
    cfg = bench.Config(q_heads=4, kv_heads=2, head_dim=16, block_size=32, dtype=torch.float32,
                       meta={"gpu": "cpu", "shape": "tiny"})
    path = tmp_path / "tune.json"
    with redirect_stdout(io.StringIO()):
        tune.tune(cfg, 97, str(path), kernels=("seer",), peers=("sdpa_cudnn",), device="cpu",
                  timer=lambda fn: 1.0)
    doc = json.loads(path.read_text())
    assert doc["seq_len"] == 97 and doc["shape"] == "tiny" and doc["q_heads"] == 4
    seer = [r for r in doc["rows"] if r["kernel"] == "seer"]
    assert len(seer) == 2 * 5 and {r["sparsity"] for r in seer} == {0.0, 0.9}
    for r in seer:  # the earlier tune files' fields, and the new ones
        assert {"rows_per_tile", "num_warps", "num_stages", "kv_major", "ms", "tflops", "tma",
                "warp_specialize"} <= set(r)
    ok = [r for r in seer if r["ms"] is not None]
    assert len(ok) == 2 * 4 and all(r["rel_err"] < 1e-6 for r in ok)
    failed = [r for r in seer if r["ms"] is None]
    assert len(failed) == 2 and all("rows_per_tile must be 1, 2, 4 or 8" in r["error"]
                                    for r in failed)
    cudnn = [r for r in doc["rows"] if r["kernel"] == "sdpa_cudnn"]
    assert len(cudnn) == 1 and cudnn[0]["ms"] is None and cudnn[0]["error"]
