"""Your own text (notebooks 01 and 02): the `TEXT` parameter (a string, a .txt file or "eval")
turned into the token window the maps are drawn from, and a prompt box that redraws them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from seerlib.data import token_windows

EVAL = "eval"  # the KJV evaluation split (held-out books), as `token_windows` reads it


def read_text(text: str) -> str | None:
    """The text `TEXT` names: None for "eval" (the evaluation split), a file's contents for a
    path ending in ".txt", otherwise the string itself.

    Raises:
        FileNotFoundError: a ".txt" path that does not exist.
        ValueError: an empty string, or not a string at all.
    """
    if not isinstance(text, str):
        raise ValueError(f"TEXT must be a string, a path to a .txt file or {EVAL!r}; "
                         f"got {type(text).__name__}")
    if text == EVAL:
        return None
    if text.strip().endswith(".txt") and "\n" not in text:
        path = Path(text.strip()).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TEXT names the file {str(path)!r}, which does not exist "
                                    f"(give a .txt file, a string of text or {EVAL!r})")
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError("TEXT is empty; give a string of text, a .txt file or 'eval'")
    return text


def text_ids(tokenizer, text: str, seq_len: int, block_size: int, window: int = 0) -> torch.Tensor:
    """(1, S) token ids of `TEXT`: window `window` of `seq_len` tokens of the evaluation split for
    "eval"; otherwise the text's first `seq_len` tokens (S may be shorter).

    Raises:
        ValueError: the text has fewer tokens than one block of `block_size`.
    """
    own = read_text(text)
    if own is None:
        return token_windows(tokenizer, EVAL, seq_len, n=window + 1)[window:window + 1]
    ids = tokenizer(own, add_special_tokens=False)["input_ids"][:seq_len]
    if len(ids) < block_size:
        raise ValueError(f"TEXT has {len(ids)} tokens; the maps need at least one block of "
                         f"{block_size} tokens (give a longer text or a smaller BLOCK_SIZE)")
    return torch.tensor([ids], dtype=torch.long)


def prompt_box(draw: Callable[[str], None], value: str = "", rows: int = 6):
    """A Textarea and a button: the button calls `draw(text)` inside an Output, with a busy
    label while it runs and the error message (too short, missing file) in place of a trace.

    Returns:
        an `ipywidgets.VBox` (text box, button and status above the output).
    """
    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

    # width "auto": the cell's width (100% plus the widget's margins would overflow it)
    box = W.Textarea(value=value, placeholder="Type or paste text (or a .txt path), then run",
                     rows=rows, layout=W.Layout(width="auto"))
    button, status, out = W.Button(description="draw maps"), W.Label(), W.Output()

    def run(_=None):
        status.value = "running the model on the text…"
        button.disabled = True
        with out:
            out.clear_output(wait=True)
            try:
                draw(box.value)
                status.value = ""
            except (ValueError, FileNotFoundError) as err:
                status.value = f"not drawn: {err}"
            finally:
                button.disabled = False

    button.on_click(run)
    return W.VBox([box, W.HBox([button, status]), out])
