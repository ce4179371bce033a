"""The model and text cache: loads, splits, windows, corruption detection."""

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
