"""seerlib.eval on an extended or fine-tuned model (issue 16): --context, --model-diff, --text.

The models are tiny random Llamas (2 layers, context 4096) with SmolLM2's vocabulary, handed to
the CLI in place of SmolLM2 (`cli.load_model`); the tokenizer is the cached one (`make data`).
The long text is a cache of two small documents written here: no download.
"""

import hashlib
import json
import re

import pytest
import torch

from seerlib import data, longtext
from seerlib.distill import tiny_config
from seerlib.eval import cli, main, perplexity
from seerlib.finetune import base_snapshot, save_model_diff
from seerlib.gate import GateSet
from seerlib.io import config_hash, save_gates
from seerlib.targets import model_fingerprint
from seerlib.yarn import extend_context

pytestmark = pytest.mark.model

FAST = ["--lengths", "128", "--windows", "1", "--block-size", "16", "--attention", "ops"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer  # lazy: seconds to import

    return AutoTokenizer.from_pretrained(data.verify_model_cache())


def _tiny(tok, seed=0, context=None):
    from transformers import LlamaForCausalLM  # lazy, as in tok

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    if context:
        extend_context(model, context / 4096)
    return model


@pytest.fixture
def models(tok, monkeypatch):
    """The CLI loads a fresh tiny model (seed 0); the models it evaluated are kept in a list."""
    seen = []
    real = cli.evaluate

    def load_model(dtype, device, name):
        assert name == "smollm2-135m-instruct"
        return _tiny(tok).to(device=device, dtype=dtype), tok

    def evaluate(model, *a, **kw):
        seen.append((model, kw.get("gates")))
        return real(model, *a, **kw)

    monkeypatch.setattr(cli, "load_model", load_model)
    monkeypatch.setattr(cli, "evaluate", evaluate)
    return seen


def _doc(out):
    return json.loads(out.with_suffix(".json").read_text())


def _dense_ppl(out):
    return next(r["ppl"] for r in _doc(out)["rows"] if r["label"] == "dense")


def _ppl(model, tok, text="kjv", n=1):
    w = longtext.text_windows(tok, text, "eval", 128, n)
    return perplexity(model, w, progress=False).ppl


def _gate_file(path, model, **info):
    save_gates(GateSet.from_config(model.config, block_size=16), path, **info)
    return str(path)


def test_context_extends_the_model_before_the_gates_load(tok, models, tmp_path, capsys):
    gates = _gate_file(tmp_path / "g.safetensors", _tiny(tok, context=8192))
    out = tmp_path / "q"
    main(["--out", str(out), "--context", "8192", "--methods", "dense", "gate",
          "--densities", "0.5", "--gates", gates, *FAST])
    (model, gate_set), = models
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0
    assert model.config.max_position_embeddings == 8192
    # the gates were built for the extended config: YaRN's rotation in their block RoPE
    assert config_hash(gate_set.config) == config_hash(model.config)
    assert gate_set.rope.rotary.attention_scaling == model.model.rotary_emb.attention_scaling
    assert gate_set.rope.rotary.attention_scaling != 1.0
    doc = _doc(out)
    assert doc["meta"]["context"] == 8192 and doc["meta"]["yarn_factor"] == 2.0
    assert {r["label"] for r in doc["rows"]} == {"dense", "gate@0.5"}
    # the dense row is the extended model's perplexity, not the base's
    assert _dense_ppl(out) == pytest.approx(_ppl(_tiny(tok, context=8192), tok), rel=1e-5)
    assert _dense_ppl(out) != pytest.approx(_ppl(_tiny(tok), tok), rel=1e-3)
    assert "extended by YaRN to 8192 tokens (factor 2.0)" in out.with_suffix(".md").read_text()
    # a base-model gate file is refused on the extended model, an extended one on the base
    base_gates = _gate_file(tmp_path / "base.safetensors", _tiny(tok))
    for args, gate in [(["--context", "8192"], base_gates), ([], gates)]:
        with pytest.raises(SystemExit, match="config hash.*YaRN settings included.*nothing was"):
            main(["--out", str(tmp_path / "r"), *args, "--methods", "gate", "--densities", "0.5",
                  "--gates", gate, *FAST])
    assert not (tmp_path / "r.json").exists()


def test_context_keeps_yarn_frequencies_in_float32_under_bf16(tok, models, tmp_path):
    main(["--out", str(tmp_path / "q"), "--context", "8192", "--methods", "dense",
          "--dtype", "bfloat16", *FAST])
    (model, _), = models
    want = _tiny(tok, context=8192).model.rotary_emb
    got = model.model.rotary_emb
    assert next(model.parameters()).dtype == torch.bfloat16
    assert got.inv_freq.dtype == torch.float32
    torch.testing.assert_close(got.inv_freq, want.inv_freq, rtol=0, atol=0)
    assert got.attention_scaling == want.attention_scaling != 1.0


def _finetuned(tok, path, context=8192, base_seed=0):
    """A 'fine-tuned' tiny model (every q_proj and the final norm moved) and its diff at `path`
    against the seed-`base_seed` base extended to `context`."""
    model = _tiny(tok, seed=base_seed, context=context)
    base, sha = base_snapshot(model), model_fingerprint(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.q_proj.weight
            w.add_(0.5 * torch.randn(w.shape, generator=g))
        model.model.norm.weight.mul_(1.5)
    save_model_diff(model, base, path, sha, steps=7)
    return model


def test_model_diff_is_applied_and_its_gates_read_it(tok, models, tmp_path, capsys):
    diff = tmp_path / "ft.model.safetensors"
    tuned = _finetuned(tok, diff)
    gates = _gate_file(tmp_path / "ft.safetensors", tuned, model_sha256=model_fingerprint(tuned))
    out = tmp_path / "q"
    main(["--out", str(out), "--context", "8192", "--model-diff", str(diff), "--methods",
          "dense", "gate", "--densities", "0.5", "--gates", gates, *FAST])
    assert _dense_ppl(out) == pytest.approx(_ppl(tuned, tok), rel=1e-5)
    assert _dense_ppl(out) != pytest.approx(_ppl(_tiny(tok, context=8192), tok), rel=1e-3)
    assert "warning" not in capsys.readouterr().err
    meta = _doc(out)["meta"]
    assert meta["model_diff"] == str(diff) and meta["model_diff_steps"] == 7
    assert meta["model_diff_sha256"] == hashlib.sha256(diff.read_bytes()).hexdigest()
    assert meta["model_diff_meta"]["changed_tensors"] == 3
    assert "fine-tuned weights" in out.with_suffix(".md").read_text()
    # rows of the base model are never merged with the fine-tuned model's
    with pytest.raises(SystemExit, match="model_diff_sha256 '[0-9a-f]+' there, None here"):
        main(["--out", str(out), "--context", "8192", "--methods", "dense", *FAST])
    # a gate trained on other weights is run, with a warning that says so
    base_gates = _gate_file(tmp_path / "b.safetensors", _tiny(tok, context=8192),
                            model_sha256=model_fingerprint(_tiny(tok)))
    main(["--out", str(tmp_path / "w"), "--context", "8192", "--model-diff", str(diff),
          "--methods", "gate", "--densities", "0.5", "--gates", base_gates, *FAST])
    assert re.search(r"warning: .*b\.safetensors was trained on a model whose weights",
                     capsys.readouterr().err)


@pytest.mark.parametrize("case, match", [
    ("other base", r"another base model.*nothing was run"),
    ("no context", r"made for a model extended by YaRN to 8192 tokens \(factor 2.0\); pass "
                   r"--context 8192 \(this run: --context None\)"),
    ("gate file", r"has format 'seerlib-gates.*expected 'seerlib-model-diff/1'"),
    ("missing", r"no such file; expected the <out>.model.safetensors"),
])
def test_a_wrong_model_diff_is_refused(tok, models, tmp_path, capsys, case, match):
    diff = tmp_path / "ft.model.safetensors"
    _finetuned(tok, diff, base_seed=1 if case == "other base" else 0)
    args = ["--context", "8192"] if case != "no context" else []
    path = {"gate file": _gate_file(tmp_path / "g.safetensors", _tiny(tok)),
            "missing": str(tmp_path / "none.safetensors")}.get(case, str(diff))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "q"), *args, "--model-diff", path, "--methods", "dense",
              *FAST])
    assert re.search(match, str(e.value.code) + capsys.readouterr().err)
    assert not (tmp_path / "q.json").exists() and not models


def _long_text_cache(root, monkeypatch):
    """A long-text cache of two eval documents and one train document under `root`."""
    fake = data.Wheel("fake==1.0", "fake-1.0.tar.gz", "0" * 64, "")
    words = "the lady walked in the garden and said never a letter in the rain ".split()
    g = torch.Generator().manual_seed(3)
    docs = (longtext.Document("doc-a", "A Story", fake, "test"),
            longtext.Document("doc-b", "B Story", fake, "test"),
            longtext.Document("doc-t", "T", fake, "test"))
    monkeypatch.setattr(longtext, "DOCUMENTS", docs)
    monkeypatch.setattr(longtext, "EVAL_DOCUMENTS", ("doc-a", "doc-b"))
    monkeypatch.setenv("SEERLIB_CACHE", str(root))
    folder = root / "longtext"
    folder.mkdir(parents=True)
    for d in docs:
        idx = torch.randint(len(words), (900,), generator=g).tolist()
        (folder / f"{d.name}.txt").write_text(" ".join(words[i] for i in idx), encoding="utf-8")
    data._write_manifest(folder / "manifest.json", [f"{d.name}.txt" for d in docs],
                         **longtext._source())
    longtext._TOKEN_CACHE.clear()


def test_text_longtext_reads_the_eval_documents(tok, models, tmp_path, monkeypatch):
    _long_text_cache(tmp_path / "cache", monkeypatch)
    out = tmp_path / "q"
    main(["--out", str(out), "--text", "longtext", "--methods", "dense", *FAST[:2],
          "--windows", "2", *FAST[4:]])
    meta = _doc(out)["meta"]
    assert meta["text"] == "long-text eval split (A Story; B Story)"
    assert _dense_ppl(out) == pytest.approx(_ppl(_tiny(tok), tok, "longtext", n=2), rel=1e-5)
    # another text is another table
    with pytest.raises(SystemExit, match="text 'long-text eval split .*' there, 'KJV eval split"):
        main(["--out", str(out), "--text", "kjv", "--methods", "dense", *FAST])
    longtext._TOKEN_CACHE.clear()


@pytest.mark.parametrize("text", ["longtext", "longtext+kjv"])
def test_text_longtext_without_its_cache_is_refused_before_loading(tmp_path, monkeypatch,
                                                                   capsys, text):
    monkeypatch.setenv("SEERLIB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "q"), "--text", text, "--methods", "dense", *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--text {text}:" in err and "make longtext" in err
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("args, match", [
    (["--context", "0"], "--context: must be an integer >= 1; got 0"),
    (["--text", "bible"], "--text: invalid choice: 'bible'"),
    (["--context", "4096", "--lengths", "8192"], "reach 8192 tokens, beyond --context 4096"),
    (["--context", "8192", "--passkey-methods", "dense", "--passkey-lengths", "16384"],
     "reach 16384 tokens, beyond --context 8192"),
])
def test_bad_long_context_arguments_are_refused_before_loading(tmp_path, monkeypatch, capsys,
                                                               args, match):
    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "q"), "--methods", "dense", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, match", [
    (["--context", "2048"], "--context 2048: not above the model's original context of 4096"),
    (["--lengths", "8192"], "reach 8192 tokens, beyond the model's context of 4096 (extend it "
                            "with --context)"),
])
def test_contexts_the_model_cannot_take_are_refused(tok, models, tmp_path, args, match):
    with pytest.raises(SystemExit, match=re.escape(match)):
        main(["--out", str(tmp_path / "q"), "--methods", "dense", *FAST, *args])
    assert not models and not (tmp_path / "q.json").exists()


def test_a_failing_passkey_method_is_named_and_the_others_still_run(tok, models, tmp_path,
                                                                     monkeypatch):
    """The joint run of issue 16 (YaRN, a model diff, its gates): a sparse passkey method that
    raises ends the run non-zero, naming the method, the length and the error, after the other
    methods ran and were written; nothing is dropped without a word."""
    diff = tmp_path / "ft.model.safetensors"
    tuned = _finetuned(tok, diff)
    gates = _gate_file(tmp_path / "ft.safetensors", tuned, model_sha256=model_fingerprint(tuned))
    real = cli.passkey

    def passkey(model, *a, **kw):
        if model._seerlib_sparsified.config.spec.needs_gate:  # the handle sparsify enabled
            raise RuntimeError("the gate kernel broke")
        return real(model, *a, **kw)

    monkeypatch.setattr(cli, "passkey", passkey)
    out = tmp_path / "pk"
    methods = ["dense", "gate@0.1", "gate+sink+local+floor0.5@r=0.1", "sink_window@0.1"]
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--context", "8192", "--model-diff", str(diff), "--gates", gates,
              "--dtype", "bfloat16", "--lengths", "--methods", "--passkey-methods", *methods,
              "--passkey-lengths", "256", "512", "--passkey-depths", "0", "1",
              "--block-size", "16", "--attention", "ops"])
    msg = str(e.value.code)
    for label in methods[1:3]:
        for L in (256, 512):
            assert f"passkey {label} at {L} tokens failed (RuntimeError: the gate kernel broke)" \
                in msg
    assert str(out.with_suffix(".json")) in msg
    got = {(p["method"], p["length"]) for p in _doc(out)["passkey"]}
    assert got == {(m, L) for m in ("dense", "sink_window@0.1") for L in (256, 512)}
    assert "| sink_window@0.1 (density" in out.with_suffix(".md").read_text()
