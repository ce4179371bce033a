"""seerlib.viz.text (notebooks 01 and 02): the TEXT parameter."""

import pytest

from seerlib import viz


class CharTokenizer:
    """One token per character (what the tests need of a tokenizer)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 211 for c in text]}


def test_read_text_string_file_and_eval(tmp_path):
    assert viz.read_text("eval") is None
    assert viz.read_text("In the beginning") == "In the beginning"
    f = tmp_path / "mine.txt"
    f.write_text("my own words", encoding="utf-8")
    assert viz.read_text(str(f)) == "my own words"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        viz.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="empty"):
        viz.read_text("  ")
    with pytest.raises(ValueError, match="string"):
        viz.read_text(3)


def test_text_ids_truncates_and_refuses_short_text(tmp_path):
    tok = CharTokenizer()
    ids = viz.text_ids(tok, "x" * 100, seq_len=64, block_size=16)
    assert ids.shape == (1, 64)
    assert viz.text_ids(tok, "y" * 40, seq_len=64, block_size=16).shape == (1, 40)
    with pytest.raises(ValueError, match="10 tokens.*one block of 16"):
        viz.text_ids(tok, "z" * 10, seq_len=64, block_size=16)


def test_prompt_box_draws_and_reports_errors():
    import ipywidgets as W

    drawn = []
    box = viz.prompt_box(drawn.append, value="hello")
    assert isinstance(box, W.VBox)
    button, status = box.children[1].children
    button.click()
    assert drawn == ["hello"] and status.value == ""

    def fail(text):
        raise ValueError("too short")

    box = viz.prompt_box(fail, value="a")
    button, status = box.children[1].children
    button.click()
    assert "too short" in status.value and not button.disabled
