"""bench/bench_backward.py on a CPU: the FLOP count, the ratios against the SDPA rows of the same
shape and length, the markdown's target lines, and a tiny run end to end (the kernels under the
Triton interpreter, checked against the reference; the CUDA-only rows skipped with a reason)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_backward.py"
_spec = importlib.util.spec_from_file_location("bench_backward", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_backward"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_tflops_counts_kept_tiles_and_passes():
    shape = bench.SHAPES["8b"]
    dense_fwd = bench.tflops(shape, 32768, 1.0, 1.0, "fwd")
    # causal forward: 4 * H * S^2 * d / 2 FLOPs in 1 ms
    assert dense_fwd == pytest.approx(4 * 32 * 32768**2 * 128 / 2 / 1e-3 / 1e12)
    assert bench.tflops(shape, 32768, 0.1, 1.0, "fwd+bwd") == pytest.approx(0.35 * dense_fwd)
    assert bench.tflops(shape, 32768, 0.1, 1.0, "index") == 0.0


def _rec(provider, ms, shape="smollm2", S=32768, pass_="fwd+bwd"):
    return {"gpu": "H200", "date": "2026-12-03", "torch": "2.11", "triton": "3.6",
            "command": "x", "block_size": 64, "shape": shape, "seq_len": S,
            "provider": provider, "pass": pass_, "ms": ms, "status": "ok"}


def test_ratios_pair_rows_of_one_shape_and_length_and_the_target_is_judged():
    recs = [_rec("sdpa_cudnn", 10.0), _rec("sdpa_flash", 15.0), _rec("seer", 2.5),
            _rec("seer", 1.0, shape="8b"), _rec("sdpa_cudnn", 6.0, shape="8b"),
            _rec("seer_fwd", 0.4, pass_="fwd")]
    bench.add_ratios(recs)
    assert recs[2]["x_cudnn"] == pytest.approx(4.0) and recs[2]["x_flash"] == pytest.approx(6.0)
    assert recs[3]["x_cudnn"] == pytest.approx(6.0) and recs[3]["x_flash"] is None
    assert "x_cudnn" not in recs[5]  # a forward alone is not compared with fwd+bwd
    md = bench.markdown(recs)
    assert "smollm2 at 32768: 4.00x (missed)" in md and "8b at 32768: 6.00x (met)" in md


def test_a_tiny_run_writes_checked_rows(tmp_path):
    stem = bench.main(["--device", "cpu", "--shapes", "tiny", "--seq-lens", "97", "--block", "16",
                       "--check-len", "97", "--reps", "25", "--out", str(tmp_path),
                       "--providers", "seer", "seer_kernels", "seer_index", "sdpa_cudnn"])
    recs = json.loads(Path(stem + ".json").read_text())
    by = {r.get("provider") or r.get("check"): r for r in recs}
    assert by["seer"]["status"] == "ok" and by["seer"]["pass"] == "fwd+bwd"
    assert by["seer_kernels"]["ms"] > 0 and 0 < by["seer_kernels"]["density"] < 1
    assert by["sdpa_cudnn"]["status"] == "skipped" and "CUDA" in by["sdpa_cudnn"]["reason"]
    check = by["kernels vs float32 reference"]
    assert check["ok"] and check["rel_err_dk"] < 1e-4 and check["seq_len"] == 97
    assert "| tiny | 97 | seer_kernels | fwd+bwd |" in Path(stem + ".md").read_text()


def test_bad_arguments_are_refused(capsys):
    for argv in (["--sparsity", "1.0"], ["--block", "48"], ["--seq-lens", "0"]):
        with pytest.raises(SystemExit):
            bench.parse(argv)
    assert "--block a power of two" in capsys.readouterr().err
