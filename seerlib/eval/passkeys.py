"""Passkey retrieval: a five-digit key hidden at a chosen depth of a haystack of text."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from seerlib.data import tokens

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
# The answer is primed with the key's first digit: SmolLM2-135M otherwise answers "a key that is
# used to open..." even at 1024 tokens; primed, it must still copy the other four digits from the
# needle's position.
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is {first}"


def passkey_prompt(tokenizer, length: int, depth: float, key: int | str, offset: int = 0,
                   split: str = "eval"):
    """A passkey retrieval prompt of exactly `length` tokens (plain text, no chat template).

    An instruction, then evaluation text (`data.tokens(tok, split)` from `offset`) with the needle
    sentence inserted after `depth` of the haystack's tokens, then the question, ending in
    "The pass key is" and the key's first digit: the model must continue with the other digits.

    Args:
        tokenizer: the model's tokenizer.
        length: prompt length in tokens.
        depth: where the needle goes, in [0, 1]: the share of haystack tokens before it.
        key: the number to hide (at least two digits).
        offset: first haystack token in the text.
        split: the haystack's text, "eval" (the test) or "train" (for tuning without the test).
    Returns:
        (ids (1, length) LongTensor, needle_start: token index where the needle begins,
        needle_len: its length in tokens).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    key = str(key)
    if not key.isdigit() or len(key) < 2:
        raise ValueError(f"key must be a number of at least two digits; got {key!r}")

    def enc(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    head_ids, tail_ids = enc(PASSKEY_INTRO), enc(PASSKEY_QUESTION.format(first=key[0]))
    needle = enc(PASSKEY_NEEDLE.format(key=key))
    n_hay = length - len(head_ids) - len(tail_ids) - len(needle)
    if n_hay < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt; need at least "
                         f"{length - n_hay + 1} tokens")
    hay = tokens(tokenizer, split)[offset : offset + n_hay].tolist()
    if len(hay) < n_hay:
        raise ValueError(
            f"the {split} text has {len(hay)} tokens from offset {offset}; need {n_hay}"
        )
    at = round(depth * n_hay)
    ids = head_ids + hay[:at] + needle + hay[at:] + tail_ids
    return torch.tensor([ids], dtype=torch.long), len(head_ids) + at, len(needle)


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str
    correct: bool


@torch.no_grad()
def passkey(model, tokenizer, lengths, depths, trials: int = 1, seed: int = 0,
            max_new_tokens: int = 6, progress: bool = True,
            split: str = "eval") -> list[PasskeyTrial]:
    """Passkey retrieval: for each length, depth and trial, hide a random five-digit key, decode
    greedily after the primed first digit and check that the reply's number is the key. Wrap in
    `sparsify` to test a sparse prefill. `split="train"` hides the keys in training text (for
    tuning a selection rule without touching the test).

    Returns:
        One PasskeyTrial per (length, depth, trial); `passkey_accuracy` tabulates them.
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    cells = [(L, d, t) for L in lengths for d in depths for t in range(trials)]
    for L, d, t in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
        ids, _, _ = passkey_prompt(tokenizer, L, d, key, offset=t * 997, split=split)
        gen = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        reply = key[0] + tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        found = re.match(r"\d+", reply)
        out.append(PasskeyTrial(L, d, key, reply.strip(), bool(found and found.group() == key)))
    return out


def passkey_accuracy(trials: list[PasskeyTrial]) -> dict[tuple[int, float], float]:
    """{(length, depth): share of correct trials}."""
    cells = defaultdict(list)
    for t in trials:
        cells[(t.length, t.depth)].append(t.correct)
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}
