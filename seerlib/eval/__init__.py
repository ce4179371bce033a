"""Evaluation: perplexity, recall of attention mass, passkey retrieval, and the quality table.

- `perplexity(model, windows)`: token-weighted perplexity over windows, with each window's figure.
  Wrap it in `seerlib.sparsify(...)` to measure a sparse model.
- `dense_pass(model, ids, configs, ...)`: one dense forward that, inside every layer, scores each
  selection config on the dense model's own attention: recall (the share of each query-block
  row's exact attention mass that the kept blocks hold) and achieved density; it also returns the
  ground-truth maps that the oracle configs select from.
- `passkey_prompt` / `passkey(...)`: a five-digit number hidden at a chosen depth in a haystack of
  evaluation text; accuracy per length and depth (greedy decoding; decode steps stay dense).
- `python -m seerlib.eval ...`: the comparison as JSON + a markdown table (README's quality table).
  With `--context N` (YaRN), `--model-diff PATH` (a fine-tuned model from `seerlib.finetune`)
  and `--text longtext` it evaluates the long-context model (issue 16; `cli`'s docstring).

Modules: `ppl` (perplexity), `passkeys` (passkey retrieval), `quality` (`dense_pass`,
`evaluate`), `maps_cache` (`evaluate`'s checked cache of ground-truth maps), `results` (result
files, markdown), `cli` (`main`). Configs come from `seerlib.methods` (labels, presets), table
names from `seerlib.names`.
"""

from seerlib.eval.cli import main
from seerlib.eval.passkeys import (
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    PasskeyTrial,
    passkey,
    passkey_accuracy,
    passkey_prompt,
)
from seerlib.eval.ppl import PerplexityResult, perplexity
from seerlib.eval.quality import RecallResult, dense_pass, evaluate
from seerlib.eval.results import load_results, markdown

__all__ = [
    "PASSKEY_INTRO",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "PasskeyTrial",
    "PerplexityResult",
    "RecallResult",
    "dense_pass",
    "evaluate",
    "load_results",
    "main",
    "markdown",
    "passkey",
    "passkey_accuracy",
    "passkey_prompt",
    "perplexity",
]
