"""The table of real models (seerlib/models.py): names, the GGUF parts joined and checked, the
Gemma cache's manifest and its repair by fetch, the CLIs' --model, and (with `make gemma`) the
real Gemma 3 270M: its shape, capture of what RoPE receives, density 1.0 against dense logits.

The tests that need the real Gemma cache skip without it (CI does not fetch it); the others build
small stand-ins and run everywhere."""

import hashlib
import json
import shutil
import zipfile
from dataclasses import replace

import pytest
import torch

from seerlib import data, models
from seerlib.data import DataError, Wheel
from seerlib.gate import GateSet
from seerlib.io import save_gates

GEMMA = "gemma3-270m"


# ---------------------------------------------------------------- the table


def test_the_table_names_both_models_default_first():
    assert models.model_names() == ("smollm2-135m-instruct", GEMMA)
    assert models.DEFAULT_MODEL == data._MODEL_DIR
    smol, gemma = models.get_model(models.DEFAULT_MODEL), models.get_model(GEMMA)
    assert smol.model_name == data.MODEL_NAME and smol.parts == (data.MODEL_WHEEL,)
    assert smol.source_sha256 == data.MODEL_WHEEL.sha256  # existing caches stay valid
    assert [w.member.rsplit(".", 1)[1] for w in gemma.parts] == [f"part0{i}" for i in range(4)]
    assert gemma.gguf_size == 253_113_024 and gemma.source_sha256 == gemma.gguf_sha256
    assert "Gemma Terms of Use" in gemma.license
    assert {"GEMMA_TERMS.html", "NOTICE.md"} <= set(gemma.required_files)


def test_an_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="no real model named 'gemma-7b'.*smollm2-135m-instruct, "
                                         "gemma3-270m"):
        models.get_model("gemma-7b")
    with pytest.raises(ValueError, match="no real model named"):
        data.load_model(name="gemma-7b")


# ---------------------------------------------------------------- joining the GGUF parts


def _wheel(folder, i: int, payload: bytes) -> Wheel:
    """A small wheel holding one part, and its Wheel record."""
    name = f"part{i}-1.0.0-py3-none-any.whl"
    member = f"part{i}/data/x.gguf.part{i:02d}"
    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr(member, payload)
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return Wheel(spec=f"part{i}==1.0.0", filename=name, sha256=digest, member=member)


@pytest.fixture
def parted(tmp_path):
    """(RealModel of three small parts, cache root, the joined bytes)."""
    root = tmp_path / "cache"
    (root / "wheels").mkdir(parents=True)
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    parts = tuple(_wheel(root / "wheels", i, c) for i, c in enumerate(chunks))
    whole = b"".join(chunks)
    m = replace(models.get_model(GEMMA), parts=parts, gguf_size=len(whole),
                gguf_sha256=hashlib.sha256(whole).hexdigest())
    return m, root, whole


def test_parts_are_joined_in_order_and_checked(parted, tmp_path):
    m, root, whole = parted
    out = models._join_parts(m, root, tmp_path / "x.gguf")
    assert out.read_bytes() == whole
    swapped = replace(m, parts=(m.parts[1], m.parts[0], m.parts[2]))
    with pytest.raises(DataError, match="has sha256 .*; expected .*parts part1==1.0.0 \\+ part0"):
        models._join_parts(swapped, root, tmp_path / "y.gguf")
    short = replace(m, parts=m.parts[:2])
    with pytest.raises(DataError, match="has 2,001 bytes; expected 3,003"):
        models._join_parts(short, root, tmp_path / "z.gguf")
    lost = replace(m, parts=(replace(m.parts[0], member="part0/data/other"), *m.parts[1:]))
    with pytest.raises(DataError, match="has no part0/data/other"):
        models._join_parts(lost, root, tmp_path / "w.gguf")


# ---------------------------------------------------------------- the Gemma cache, repaired


def _fake_build(root, name=data._MODEL_DIR):
    """Stands in for the dequantizing build (minutes): the files the model needs, manifest last."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    for file in models.get_model(name).required_files:
        (out / file).write_text(f"fake {file} of {name}")
    data._write_model_manifest(out, name)
    _fake_build.built.append(name)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private cache with the real text (copied) and fake model builds; returns its root."""
    src = data.cache_dir()
    root = tmp_path / "cache"
    root.mkdir()
    for f in ("kjv_train.txt", "kjv_eval.txt", data._TEXT_MANIFEST):
        shutil.copy(src / f, root / f)
    monkeypatch.setenv("SEERLIB_CACHE", str(root))
    monkeypatch.setattr(data, "_build_model_cache", _fake_build)
    _fake_build.built = []
    return root


def test_make_data_does_not_fetch_gemma(tmp_cache, capsys):
    data.main(["fetch"])
    assert _fake_build.built == [data._MODEL_DIR] and not (tmp_cache / GEMMA).exists()
    data.main(["fetch", "--model", GEMMA])
    assert _fake_build.built == [data._MODEL_DIR, GEMMA]
    assert "data ready" in capsys.readouterr().out
    manifest = json.loads((tmp_cache / GEMMA / "manifest.json").read_text())
    assert manifest["model"] == "gemma-3-270m"
    assert manifest["source_sha256"] == models.get_model(GEMMA).gguf_sha256
    assert "part1==1.0.0 + " in manifest["source"]
    data.main(["fetch", "--model", GEMMA])  # intact: nothing rebuilt
    assert _fake_build.built == [data._MODEL_DIR, GEMMA]


@pytest.mark.parametrize("damage", ["file", "license", "manifest", "source"])
def test_a_damaged_gemma_cache_is_named_and_fetch_rebuilds_it(tmp_cache, damage):
    data.fetch(models=(GEMMA,))
    folder = models.verify_model_cache(GEMMA)
    m = folder / "manifest.json"
    good = json.loads(m.read_text())
    if damage == "file":
        (folder / "config.json").write_text("{}")
        match = "config.json is corrupt"
    elif damage == "license":  # a license text is part of the cache like the weights
        (folder / "GEMMA_TERMS.html").unlink()
        match = "GEMMA_TERMS.html is missing"
    elif damage == "manifest":
        m.write_text('{"files": {"config')
        match = "manifest .* is damaged"
    else:
        m.write_text(json.dumps(dict(good, source_sha256="0" * 64)))
        match = "was made from"
    with pytest.raises(DataError, match=f"{match}.*make gemma.*--model gemma3-270m"):
        models.verify_model_cache(GEMMA)
    with pytest.raises(DataError, match=match):
        data.load_model(name=GEMMA)  # checked on every load
    data.main(["fetch", "--model", GEMMA])
    assert _fake_build.built[-1] == GEMMA
    assert json.loads(m.read_text())["files"] == good["files"]
    models.verify_model_cache(GEMMA)


def test_a_missing_gemma_cache_says_make_gemma(tmp_cache):
    with pytest.raises(DataError, match="gemma3-270m model cache .* is missing.*make gemma"):
        data.load_model(name=GEMMA)


def test_fetch_refuses_an_unknown_model_name(tmp_cache, capsys):
    with pytest.raises(SystemExit):
        data.main(["fetch", "--model", "gemma-7b"])
    assert "invalid choice: 'gemma-7b'" in capsys.readouterr().err


# ---------------------------------------------------------------- windows start with the prefix


class _BosTokenizer:
    """Bytes as tokens, with a <bos> (id 255) where special tokens are asked for."""

    name_or_path = "bos-chars"

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False):
        ids = list(text.encode()[:20000])
        return {"input_ids": ([255] if add_special_tokens else []) + ids}


def test_windows_start_with_the_tokenizers_bos(tmp_cache):
    tok = _BosTokenizer()
    whole = data.tokens(tok, "eval")
    w = data.token_windows(tok, "eval", 100, n=3)
    assert w.shape == (3, 100) and (w[:, 0] == 255).all()
    assert torch.equal(w[1, 1:], whole[99:198])  # text tiles: the stride is the text per window
    assert data.token_windows(tok, "eval", 100).shape[0] == (len(whole) - 99) // 99 + 1
    with pytest.raises(ValueError, match="seq_len 1 leaves no text after the tokenizer's 1"):
        data.token_windows(tok, "eval", 1)


# ---------------------------------------------------------------- the CLIs' --model


def _gate_file(path, model_name):
    from seerlib.distill import tiny_config

    save_gates(GateSet.from_config(tiny_config(), block_size=16, model_name=model_name), path)
    return str(path)


def test_eval_refuses_a_gate_file_of_another_model_before_loading(tmp_path, monkeypatch, capsys):
    from seerlib.eval import cli

    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    smol = _gate_file(tmp_path / "smol.safetensors", data.MODEL_NAME)
    with pytest.raises(SystemExit):
        cli.main(["--model", GEMMA, "--gates", smol, "--methods", "gate", "--densities", "0.5",
                  "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert ("was made for model 'SmolLM2-135M-Instruct'; this run's model is 'gemma-3-270m' "
            "(--model gemma3-270m) (pass --model smollm2-135m-instruct)") in err
    gemma = _gate_file(tmp_path / "gemma.safetensors", "gemma-3-270m")
    with pytest.raises(SystemExit):
        cli.main(["--gates", gemma, "--methods", "gate", "--out", str(tmp_path / "q")])
    assert "this run's model is 'SmolLM2-135M-Instruct'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", "gemma-7b", "--out", str(tmp_path / "q")])
    assert "argument --model: invalid choice: 'gemma-7b'" in capsys.readouterr().err


def test_recall_refuses_a_gate_file_of_another_model(tmp_path, monkeypatch, capsys):
    from seerlib.eval import recall

    monkeypatch.setattr(recall, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    smol = _gate_file(tmp_path / "smol.safetensors", data.MODEL_NAME)
    with pytest.raises(SystemExit):
        recall.main(["--model", GEMMA, "--gates", smol, "--out", str(tmp_path / "r")])
    assert "was made for model 'SmolLM2-135M-Instruct'" in capsys.readouterr().err


def test_distill_takes_the_model_names_and_the_old_alias(tmp_path, monkeypatch, capsys):
    from seerlib.distill import cli

    asked = []

    def load_model(device, name):
        asked.append(name)
        raise SystemExit("stop before training")

    monkeypatch.setattr(cli, "load_model", load_model)
    for value, name in (("smollm2", data._MODEL_DIR), (GEMMA, GEMMA)):
        with pytest.raises(SystemExit, match="stop before training"):
            cli.main(["--model", value, "--out", str(tmp_path / f"{value}.safetensors")])
        assert asked[-1] == name
    with pytest.raises(SystemExit):
        cli.main(["--model", "gemma-7b"])
    assert "argument --model: invalid choice: 'gemma-7b'" in capsys.readouterr().err


# ---------------------------------------------------------------- the real Gemma 3 270M


@pytest.fixture(scope="module")
def gemma():
    """(model, tokenizer): the cached Gemma 3 270M; skips without it (`make gemma`)."""
    try:
        models.verify_model_cache(GEMMA)
    except DataError as e:
        pytest.skip(f"no Gemma 3 270M cache ({e})")
    return models.load_model(GEMMA)


@pytest.mark.model
def test_gemma_is_the_270m_base_model(gemma):
    model, tok = gemma
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        18, 4, 1, 256)
    assert c.layer_types.count("sliding_attention") == 15 and c.sliding_window == 512
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert c.max_position_embeddings == 32768
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(640**0.5)
    assert data.window_prefix(tok) == [tok.bos_token_id]


@pytest.mark.model
def test_gemma_perplexity_on_eval_text_is_sane(gemma):
    from seerlib.eval import perplexity

    model, tok = gemma
    res = perplexity(model, data.token_windows(tok, "eval", 512, n=1, offset=4096),
                     progress=False)
    # 18.1 at 1024 tokens with its <bos>; a broken load (embed_scale, RoPE) gives hundreds
    assert 5 < res.ppl < 40


@pytest.mark.model
def test_gemma_capture_reads_what_rope_receives_and_density_one_is_dense(gemma, monkeypatch):
    import transformers.models.gemma3.modeling_gemma3 as modeling

    from seerlib.capture import capture_qkv
    from seerlib.integrate import sparsify

    model, tok = gemma
    x = data.token_windows(tok, "eval", 640, n=1)  # beyond the 512-token window
    seen, rope = [], modeling.apply_rotary_pos_emb

    def spy(q, k, *args, **kwargs):
        out = rope(q, k, *args, **kwargs)
        seen.append((q, k, *out))
        return out

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", spy)
    cap = capture_qkv(model, x)
    monkeypatch.undo()
    assert len(seen) == len(cap) == 18
    for i, (q_in, k_in, q_out, k_out) in enumerate(seen):
        assert cap[i].q_pre.shape == (1, 4, 640, 256) and cap[i].k_pre.shape == (1, 1, 640, 256)
        for got, want in ((cap[i].q_pre, q_in), (cap[i].k_pre, k_in), (cap[i].q, q_out),
                          (cap[i].k, k_out)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    del cap
    seen.clear()
    with torch.no_grad():
        dense = model(input_ids=x, use_cache=False).logits
        with sparsify(model, "oracle-max@1", block_size=64) as sp:
            out = model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(out, dense, atol=1e-3, rtol=1e-4)
    assert (sp.stats.prefill_calls, sp.stats.dense_calls) == (3, 15)  # the 3 global layers
    assert sp.stats.achieved_density == 1.0


@pytest.mark.model
def test_gemma_distill_stores_the_global_layers_gates_only(gemma, tmp_path):
    from seerlib.distill import cli
    from seerlib.io import load_gates, read_metadata

    out = tmp_path / "g.safetensors"
    cli.main(["--model", GEMMA, "--seq-len", "256", "--train-windows", "1", "--steps", "1",
              "--batch-size", "1", "--warmup", "0", "--target", "exact", "--quiet",
              "--cache-root", str(tmp_path / "cache"), "--out", str(out)])
    meta = read_metadata(out)
    assert meta["saved_layers"] == [5, 11, 17] and meta["model_name"] == "gemma-3-270m"
    assert meta["model"] == GEMMA
    gates = load_gates(out, gemma[0], block_size=64, model_name="gemma-3-270m")
    assert len(gates) == 18
