"""seerlib/yarn.py: YaRN context extension of a loaded model, the gates' BlockRoPE on the extended
config, float32 rope buffers in gates moved to bf16, and bench/yarn_ppl.py on a CPU (the King James
text, and the long-text path on stand-in documents: CI has no long-text cache)."""

import copy
import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import seerlib.data
from seerlib import yarn
from seerlib.decode.gate import DecodeGateSet
from seerlib.distill.cli import tiny_config
from seerlib.gate import BlockRoPE, GateSet

ORIG, FACTOR = 512, 4
THETA = 10000.0


def base_config(**kw):
    return tiny_config(**{"max_position_embeddings": ORIG,
                          "rope_parameters": {"rope_type": "default", "rope_theta": THETA}, **kw})


def yarn_config():
    return tiny_config(max_position_embeddings=ORIG * FACTOR, rope_parameters={
        "rope_type": "yarn", "rope_theta": THETA, "factor": float(FACTOR),
        "original_max_position_embeddings": ORIG})


@pytest.fixture
def models():
    """(base, extended): one tiny random Llama, and a copy of it extended by YaRN x4 in place."""
    base = LlamaForCausalLM(base_config()).eval()
    ext = copy.deepcopy(base)
    yarn.extend_context(ext, FACTOR)
    return base, ext


def test_extended_model_equals_one_built_from_a_yarn_config(models):
    base, ext = models
    rope = ext.config.rope_parameters
    assert rope == {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0,
                    "original_max_position_embeddings": ORIG}
    assert ext.config.max_position_embeddings == ORIG * FACTOR
    assert base.config.rope_parameters["rope_type"] == "default"  # the copy's config was its own
    direct = LlamaForCausalLM(yarn_config()).eval()
    direct.load_state_dict(ext.state_dict())
    mine, theirs = ext.model.rotary_emb, direct.model.rotary_emb
    assert mine.inv_freq.dtype == torch.float32
    assert torch.equal(mine.inv_freq, theirs.inv_freq)
    assert mine.attention_scaling == theirs.attention_scaling == pytest.approx(
        0.1 * math.log(FACTOR) + 1)
    x = torch.randn(1, 3, 64)
    pos = torch.arange(0, ORIG * FACTOR, 5)[None]
    for a, b in zip(mine(x, pos), theirs(x, pos), strict=True):
        assert torch.equal(a, b)
    ids = torch.randint(0, 211, (1, ORIG + 100))  # past the original context
    with torch.no_grad():
        assert torch.equal(ext(ids).logits, direct(ids).logits)


def test_block_rope_of_the_extended_config_is_the_models_rope(models):
    """At block starts the gate's cos / sin are the model's exactly, YaRN's attention factor
    included, for the prefill gate, the decode gate and in bf16."""
    _, ext = models
    b, nb = 64, ORIG * FACTOR // 64
    d = ext.config.head_dim
    starts = torch.arange(nb) * b
    x = torch.randn(1, 2, nb, d)
    for rope in (BlockRoPE(ext.config, d), GateSet.from_config(ext.config, block_size=b).rope,
                 DecodeGateSet.from_config(ext.config, block_size=b).rope):
        cos, sin = rope.rotary(x, starts[None])
        want_cos, want_sin = ext.model.rotary_emb(x, starts[None])
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        assert cos[0, 0].max().item() == pytest.approx(0.1 * math.log(FACTOR) + 1)  # position 0
        want, _ = apply_rotary_pos_emb(x, x, want_cos, want_sin)
        assert torch.equal(rope(x, b), want)
        assert torch.equal(rope.at(x, starts), want)
    # bf16: the gate's frequencies stay float32, cos / sin rounded as the model rounds them
    rope = BlockRoPE(ext.config, d).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    want, _ = apply_rotary_pos_emb(xb, xb, *ext.model.rotary_emb(xb, starts[None]))
    assert torch.equal(rope(xb, b), want)


def test_yarn_changes_the_dense_model_only_as_yarn_says(models):
    """Weights untouched, frequencies kept / interpolated / ramped, the first token unchanged, and
    the rotary embedding the only difference (how much the real model's perplexity moves is
    checked on SmolLM2 in test_bench_runs_on_cpu_and_records_windows)."""
    base, ext = models
    for (n1, t1), (n2, t2) in zip(base.state_dict().items(), ext.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(t1, t2)  # no weight changes
    # fast rotations are kept, slow ones interpolated by the factor, a monotone ramp between
    ratio = base.model.rotary_emb.inv_freq / ext.model.rotary_emb.inv_freq
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(FACTOR)
    assert (ratio.diff() >= 0).all() and ((ratio > 1) & (ratio < FACTOR)).any()
    ids = torch.randint(0, 211, (1, 300))  # inside the original context
    with torch.no_grad():
        lb, le = base(ids).logits, ext(ids).logits
        # token 0 attends to itself only: the attention factor cancels in its softmax
        torch.testing.assert_close(le[:, 0], lb[:, 0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(le[:, 1:], lb[:, 1:])
        ext.model.rotary_emb = base.model.rotary_emb  # everything else is the same
        assert torch.equal(ext(ids).logits, lb)


def test_extending_twice_is_refused_unless_it_is_the_same():
    cfg = base_config()
    assert yarn.extend_context(cfg, 4) == yarn.extend_context(cfg, 4.0)
    assert yarn.original_context(cfg) == ORIG and cfg.max_position_embeddings == ORIG * 4
    with pytest.raises(ValueError, match=r"extended by YaRN x4.0 from 512 tokens already"):
        yarn.extend_context(cfg, 8)


@pytest.mark.parametrize("factor", [1, 0.5, 0, -2, float("nan"), float("inf"), True, "4", None])
def test_bad_factors_are_refused(factor):
    with pytest.raises(ValueError, match="factor must be"):
        yarn.yarn_rope_parameters(base_config(), factor)


def test_configs_yarn_cannot_extend_are_refused():
    scaled = base_config(rope_parameters={"rope_type": "linear", "rope_theta": THETA,
                                          "factor": 2.0})
    with pytest.raises(ValueError, match="scaled by 'linear' already"):
        yarn.extend_context(scaled, 4)
    for rope in (None, {}):
        with pytest.raises(ValueError, match="has no rope settings"):
            yarn.extend_context(types.SimpleNamespace(rope_parameters=rope,
                                                      max_position_embeddings=ORIG), 4)
    nested = types.SimpleNamespace(max_position_embeddings=ORIG, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": THETA},
        "sliding_attention": {"rope_type": "default", "rope_theta": THETA}})
    with pytest.raises(ValueError, match="per layer type"):
        yarn.extend_context(nested, 4)
    with pytest.raises(ValueError, match="whole number of tokens"):
        yarn.extend_context(base_config(), 1.3)
    with pytest.raises(ValueError, match="no rotary embedding"):
        yarn.rebuild_rotary(torch.nn.Linear(2, 2))
    cfg = base_config()
    with pytest.raises(ValueError):
        yarn.extend_context(cfg, 0.5)
    assert cfg.rope_parameters["rope_type"] == "default"  # a refusal changes nothing


def test_load_extended(monkeypatch):
    tiny = LlamaForCausalLM(base_config()).eval().to(torch.bfloat16)
    monkeypatch.setattr(seerlib.data, "load_model", lambda **kw: (copy.deepcopy(tiny), "tok"))
    model, tok = yarn.load_extended(context=ORIG * 4)
    assert tok == "tok" and model.config.rope_parameters["factor"] == 4.0
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # rebuilt, not left in bf16
    for bad in (ORIG, ORIG // 2, 0, "32k"):
        with pytest.raises(ValueError, match="context"):
            yarn.load_extended(context=bad)


@pytest.mark.parametrize("gate_set", [GateSet, DecodeGateSet])
def test_gate_sets_keep_rope_frequencies_float32(gate_set):
    """gates.to(bf16) once cast the RoPE inv_freq to bf16; it now keeps float32 values and
    follows the device only."""
    gates = gate_set.from_config(yarn_config(), block_size=16)
    buffers = dict(gates.rope.rotary.named_buffers())
    assert set(buffers) >= {"inv_freq"} and all(b.dtype == torch.float32 for b in buffers.values())
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        moved = copy.deepcopy(gates).to(dtype)
        assert moved[0].k_proj.dtype == dtype
        for name, buf in moved.rope.rotary.named_buffers():
            assert buf.dtype == torch.float32 and torch.equal(buf, buffers[name]), (dtype, name)
        assert all(g.rope is moved.rope for g in moved.gates)  # still one shared rope
    meta = copy.deepcopy(gates).to(device="meta", dtype=torch.bfloat16)
    assert meta.rope.rotary.inv_freq.device.type == "meta"
    assert meta.rope.rotary.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------- bench/yarn_ppl.py

_PATH = Path(__file__).resolve().parents[1] / "bench" / "yarn_ppl.py"
_spec = importlib.util.spec_from_file_location("yarn_ppl", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["yarn_ppl"] = bench
_spec.loader.exec_module(bench)


def test_bench_runs_on_cpu_and_records_windows(tmp_path):
    stem = bench.main(["--device", "cpu", "--text", "kjv", "--lengths", "256", "200000",
                       "--max-windows", "1", "--out", str(tmp_path / "yarn")])
    doc = json.loads(Path(f"{stem}.json").read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["transformers"] and meta["dtype"] == "float32" and meta["fine_tuned"] is False
    assert meta["text_option"] == "kjv" and meta["text"].startswith("the King James eval split")
    assert list(meta["documents"]) == ["kjv"] and meta["text_tokens"] == meta["documents"]["kjv"]
    assert (meta["original_context"], meta["extended_context"]) == (8192, 32768)
    assert [(r["variant"], r["seq_len"]) for r in rows] == [
        (v, S) for v in bench.VARIANTS for S in (256, 200000)]
    ok = {r["variant"]: r for r in rows if r["seq_len"] == 256}
    for r in ok.values():
        assert r["status"] == "ok" and r["windows"] == 1 and r["tokens"] == 255
        assert r["windows_available"] > 1 and math.isfinite(r["ppl"])
        assert r["windows_by_document"] == {"kjv": 1}
        assert r["inv_freq_dtype"] == "float32"
    assert ok["base"]["ppl"] == ok["base-as-loaded"]["ppl"]  # float32: rebuilding changes nothing
    assert ok["yarn"]["rope_parameters"]["rope_type"] == "yarn"
    assert ok["yarn"]["attention_scaling"] == pytest.approx(0.1 * math.log(4) + 1)
    # within the original context YaRN without fine-tuning costs a little, not everything
    assert 1 < ok["yarn"]["ppl"] / ok["base"]["ppl"] < 1.3
    long = [r for r in rows if r["seq_len"] == 200000]
    assert all(r["status"] == "skipped" and r["windows"] == 0 for r in long)
    md = Path(f"{stem}.md").read_text()
    assert "| 256 | 1 | 255 |" in md and "YaRN x4" in md and "skipped" in md
    assert "--text kjv" in md and "| kjv 1 |" in md


def _words(seed: int, n: int) -> str:
    """n words that SmolLM2's tokenizer reads as n tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = ["apple", "river", "stone", "cloud", "green", "house", "light", "water", "night"]
    return " ".join(vocab[i] for i in torch.randint(len(vocab), (n,), generator=g))


def test_bench_scores_long_documents_in_turn_with_the_kjv_last(tmp_path, monkeypatch):
    """--text longtext+kjv: windows inside each document, taken in turn, the King James split
    last; a document shorter than the window gives none; --text longtext leaves the King James
    split out. The cache is stood in for by three texts."""
    texts = {"doc-long": _words(0, 600), "doc-mid": _words(1, 300), "doc-short": _words(2, 100)}
    monkeypatch.setattr(bench.longtext, "verify_cache", lambda splits: tmp_path)
    monkeypatch.setattr(bench.longtext, "documents", lambda split: dict(texts))
    monkeypatch.setattr(bench.longtext, "_TOKEN_CACHE", {})
    stem = bench.main(["--device", "cpu", "--lengths", "256", "--max-windows", "4",
                       "--variants", "yarn", "--out", str(tmp_path / "yarn")])
    doc = json.loads(Path(f"{stem}.json").read_text())
    meta, (row,) = doc["meta"], doc["rows"]
    assert meta["text_option"] == "longtext+kjv"  # the default
    assert meta["text"].startswith("the long-text eval documents (doc-long, doc-mid, doc-short)")
    assert list(meta["documents"]) == [*texts, "kjv"]
    assert [meta["documents"][k] for k in texts] == [600, 300, 100]
    assert row["status"] == "ok" and row["windows"] == 4 and row["tokens"] == 4 * 255
    assert row["windows_by_document"] == {"doc-long": 2, "doc-mid": 1, "kjv": 1}
    assert row["windows_available"] == 3 + meta["documents"]["kjv"] // 256
    md = Path(f"{stem}.md").read_text()
    assert "`--text longtext+kjv`" in md and "| doc-long 2, doc-mid 1, kjv 1 |" in md
    stem = bench.main(["--device", "cpu", "--text", "longtext", "--lengths", "256",
                       "--variants", "base", "--out", str(tmp_path / "docs")])
    doc = json.loads(Path(f"{stem}.json").read_text())
    assert list(doc["meta"]["documents"]) == list(texts)
    assert doc["meta"]["text"] == "the long-text eval documents (doc-long, doc-mid, doc-short)"
    assert doc["rows"][0]["windows_by_document"] == {"doc-long": 2, "doc-mid": 1}


def test_bench_without_the_long_text_cache_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SEERLIB_CACHE", str(tmp_path))  # an empty cache: no long text
    for text in ("longtext+kjv", "longtext"):
        with pytest.raises(SystemExit, match=rf"--text {re.escape(text)} needs .*`make "
                                             r"longtext` builds.*--text kjv"):
            bench.main(["--device", "cpu", "--text", text, "--out", str(tmp_path / "yarn")])
    assert not list(tmp_path.glob("yarn*"))  # refused before anything was loaded or written


def test_bench_refuses_bad_arguments():
    for argv in (["--factor", "1"], ["--lengths", "1"], ["--max-windows", "0"],
                 ["--text", "bible"]):
        with pytest.raises(SystemExit):
            bench.parse(argv)
