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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = [
    "PerplexityResult",
    "RecallResult",
    "dense_pass",
    "main",
    "parse_config",
    "passkey",
    "passkey_prompt",
    "perplexity",
]


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over windows, with each window's own figure."""

    ppl: float
    nll: float
    tokens: int
    per_window: list[float] = field(default_factory=list)


def _nll(model, ids: torch.Tensor) -> torch.Tensor:
    """(b, S) ids -> (b, S - 1) next-token negative log-likelihoods."""
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise ValueError(f"windows must be (N, S) token ids with S >= 2; got {shape}")


def _result(nlls: list[torch.Tensor]) -> PerplexityResult:
    nll = torch.cat(nlls)  # (N, S - 1)
    mean = nll.double().mean().item()
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, tokens=nll.numel(),
        per_window=[math.exp(x) for x in nll.double().mean(dim=1).tolist()],
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on token windows, each scored on its own (no carried context).

    Args:
        model: a transformers causal LM (sparsified or not).
        windows: (N, S) token ids.
        batch_size: windows per forward.
        progress: show a progress bar.
    Returns:
        PerplexityResult: exp of the mean next-token NLL over all N * (S - 1) predictions, and the
        perplexity of each window.
    """
    _check_windows(windows)
    device = next(model.parameters()).device
    nlls = []
    batches = range(0, windows.shape[0], batch_size)
    for i in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        nlls.append(_nll(model, windows[i : i + batch_size].to(device)).cpu())
    return _result(nlls)


# ---------------------------------------------------------------- configs


# method-name suffix -> spec rule of an adaptive budget ("gate+sink adaptive" <-> "…@a=0.3")
_BUDGET_RULES = {" adaptive": "a=", " relative": "r="}


def method_spec(method: str, density: float) -> str:
    """The spec of a method at a density: "gate", 0.3 -> "gate@0.3"; "gate+sink adaptive", 0.3 ->
    "gate+sink@a=0.3"; "gate+sink relative", 0.3 -> "gate+sink@r=0.3" (the names `markdown` and
    `viz.method_of` give rows)."""
    for suffix, rule in _BUDGET_RULES.items():
        if method.endswith(suffix):
            return f"{method.removesuffix(suffix)}@{rule}{density:g}"
    return f"{method}@{density:g}"


def parse_config(spec: str, block_size: int = 64, attention: str = "ops"):
    """A SparseConfig from a short spec: "dense", "gate@0.3", "gate@t=0.002", "oracle-max@0.3",
    "oracle-sum@t=0.01", "sink_window@0.2", "vertical_slash@0.1"; "+sink" after gate/oracle
    forces key block 0 ("gate+sink@0.3"), "+local" the block left of the diagonal ("+local3":
    three), "+last" the whole last query-block row ("+last2": two rows); "@a=0.3" spreads density
    0.3's budget adaptively ("gate+sink+local@a=0.3", see `select_blocks`), "@r=0.3" likewise,
    ranked relative to a uniform row; "+floor0.5" under an adaptive budget keeps at least half of
    top-k's blocks in every row. These are the labels of the table."""
    from seerlib.integrate import MODES, SparseConfig

    name, _, arg = spec.partition("@")
    pooling = "max"
    name, *forced = name.split("+")
    keep_sink, keep_local, last_rows, row_floor = False, 0, 0, 0.0
    for f in forced:
        if f.startswith("floor"):
            try:
                row_floor = float(f[5:])
            except ValueError:
                raise ValueError(f"cannot read '+{f}' in {spec!r}; expected a share like "
                                 "+floor0.5") from None
        elif f == "sink":
            keep_sink = True
        elif f.startswith("local") and (f == "local" or f[5:].isdigit()):
            keep_local = int(f[5:] or 1)
        elif f.startswith("last") and (f == "last" or f[4:].isdigit()):
            last_rows = int(f[4:] or 1)
        else:
            raise ValueError(f"cannot read '+{f}' in {spec!r}; expected +sink, +local[N], "
                             "+last[N] or +floorF")
    if name.startswith("oracle-"):
        name, pooling = "oracle", name.removeprefix("oracle-")
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r} in {spec!r}; expected one of {MODES} "
                         "(oracle as oracle-max / oracle-sum)")
    density = threshold = None
    adaptive = arg.startswith(("a=", "r="))
    relative = arg.startswith("r=")
    try:
        if arg.startswith("t="):
            threshold = float(arg[2:])
        elif adaptive:
            density = float(arg[2:])
        elif arg:
            density = float(arg)
    except ValueError:
        raise ValueError(f"cannot read {arg!r} in {spec!r}; expected a density like 0.3, an "
                         "adaptive density like a=0.3 or r=0.3 or a threshold like t=0.002"
                         ) from None
    return SparseConfig(mode=name, density=density, threshold=threshold, block_size=block_size,
                        pooling=pooling, attention=attention, keep_sink=keep_sink,
                        keep_local=keep_local, dense_last_rows=last_rows, adaptive=adaptive,
                        relative=relative, row_floor=row_floor)


# ---------------------------------------------------------------- recall


@dataclass
class RecallResult:
    """Recall of attention mass of one selection config, averaged over windows, layers, heads and
    query-block rows, with its achieved density (kept share of causal blocks)."""

    label: str
    recall: float
    density: float
    per_layer_recall: list[float] = field(default_factory=list)


@torch.no_grad()
def dense_pass(model, ids: torch.Tensor, configs, gates=None, block_size: int = 64,
               maps: dict | None = None, need_maps: bool | None = None):
    """One dense forward over `ids`, scoring block selections inside every layer.

    For each layer the exact attention mass per tile (`metrics.block_mass`, post-RoPE Q/K) is the
    reference: each config's mask (built by `integrate.layer_block_mask`, the code `sparsify` runs)
    gets its recall and kept/causal counts. Oracle configs select from the dense maps.

    Args:
        model: the (dense) transformers model.
        ids: (B, S) token ids.
        configs: SparseConfigs to score (dense ones are skipped).
        gates: GateSet for "gate" configs.
        block_size: tile size b (every config must use it).
        maps: {layer: {"max": (B, Hq, nb, nb), "sum": ...}} from an earlier pass over the same ids
            (skips the ground-truth computation), or None.
        need_maps: compute the maps (default: when a config needs them, i.e. any sparse config).
    Returns:
        (nll (B, S - 1), scores, maps): scores maps each config label to
        {"recall": [per layer], "kept": int, "causal": int}; maps as the `maps` argument.
    """
    from seerlib.capture import attention_override, pre_rope_hooks
    from seerlib.integrate import count_blocks, ground_truth, layer_block_mask
    from seerlib.metrics import recall

    configs = [c for c in configs if c.mode != "dense"]
    for c in configs:
        if c.block_size != block_size:
            raise ValueError(
                f"config {c.label} has block size {c.block_size}; expected {block_size}"
            )
    if need_maps is None:
        need_maps = bool(configs)
    maps = {} if maps is None else maps
    scores = {c.label: {"recall": [], "kept": 0, "causal": 0} for c in configs}
    pre: dict = {}

    def score(module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        p = pre.pop(layer, None)
        scale = kwargs.get("scaling")
        if need_maps:
            if layer not in maps:
                maps[layer] = {pool: ground_truth(query, key, value, block_size, pool, scale)
                               for pool in ("max", "sum")}
            mass = maps[layer]["sum"]
            for c in configs:
                mask = layer_block_mask(
                    c, query, key, value, gate=gates[layer] if gates is not None else None,
                    q_pre=p["q_pre"] if p else None, k_pre=p["k_pre"] if p else None,
                    weights=maps[layer][c.pooling] if c.mode == "oracle" else None, scale=scale,
                )
                s = scores[c.label]
                s["recall"].append(float(recall(mass, mask)))
                kept, causal = count_blocks(mask)
                s["kept"] += kept
                s["causal"] += causal
        return default(module, query, key, value, attention_mask, **kwargs)

    use_gate = any(c.mode == "gate" for c in configs)
    hooks = pre_rope_hooks(model, pre) if use_gate else contextlib.nullcontext()
    with hooks, attention_override(model, score):
        nll = _nll(model, ids).cpu()
    return nll, scores, maps


# ---------------------------------------------------------------- passkey

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
    from seerlib.data import tokens

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


# ---------------------------------------------------------------- the quality table


def load_results(paths) -> tuple[list[dict], dict[str, list[PasskeyTrial]], list[str]]:
    """Merge committed result files (`main`'s JSON) for drawing: an earlier file's rows win over a
    later one's with the same (label, length); gate rows (and gate passkey trials) only from files
    that measured the same gate file as the first one found, so two gates never mix; each method's
    passkey trials from the first file that has any.

    Returns:
        (rows, {passkey method: its trials}, one line per path saying what was read or missing).
    """
    rows: dict[tuple, dict] = {}
    trials: dict[str, list[PasskeyTrial]] = {}
    notes, gate_file = [], None
    for path in map(Path, paths):
        if not path.exists():
            notes.append(f"No committed results at {path} yet (run `python -m seerlib.eval`).")
            continue
        results = json.loads(path.read_text())
        meta = results.get("meta", {})
        gate_file = gate_file or meta.get("gates")
        same_gate = meta.get("gates") == gate_file
        notes.append(f"{path.name}: {meta.get('device', '?')} {meta.get('gpu', '')}, gates "
                     f"{meta.get('gates')}" + ("" if same_gate else " (its gate rows left out)"))
        for r in results.get("rows", []):
            if r["mode"] != "gate" or same_gate:
                rows.setdefault((r["label"], r["length"]), r)
        here: dict[str, list[PasskeyTrial]] = {}
        for p in results.get("passkey", []):
            if p["method"] not in trials and (not p["method"].startswith("gate") or same_gate):
                here.setdefault(p["method"], []).append(PasskeyTrial(
                    p["length"], p["depth"], p["key"], p["answer"], p["correct"]))
        trials.update(here)
    return list(rows.values()), trials, notes


def _maps_path(cache: Path, length: int, index: int, offset: int, block_size: int) -> Path:
    return cache / f"maps-S{length}-w{index}-o{offset}-b{block_size}.pt"


def evaluate(model, tokenizer, configs, lengths, windows: int, gates=None, block_size: int = 64,
             offset: int = 0, cache: Path | None = None, on_row=None, progress: bool = True,
             recall: bool = True):
    """Perplexity, recall and achieved density of each config at each length.

    Per window: one dense pass (dense perplexity, ground-truth maps, every config's recall and
    density on the dense attention), then one sparse forward per sparse config. Oracle configs
    select from the dense pass's maps of that window (the blocks of the dense model's own
    attention), so they need no second ground-truth pass. With `recall=False` the dense pass skips
    the ground truth (the slow part on a CPU): recall is nan, the achieved density is counted in
    the sparse forwards, and oracle configs are refused.

    Returns:
        list of row dicts (label, mode, pooling, density_target, threshold, length, windows, ppl,
        nll, tokens, per_window, achieved_density, recall, per_layer_recall).
    """
    from seerlib.integrate import sparsify_config

    rows = []
    sparse = [c for c in configs if c.mode != "dense"]
    if not recall and any(c.mode == "oracle" for c in sparse):
        raise ValueError("oracle configs select from the ground-truth maps; they need recall=True")
    for S in lengths:
        ids_all = _windows(tokenizer, S, windows, offset)
        acc = {c.label: {"nll": [], "recall": [], "kept": 0, "causal": 0, "sec": 0.0}
               for c in configs}
        for w in range(ids_all.shape[0]):
            ids = ids_all[w : w + 1]
            maps = None
            path = _maps_path(cache, S, w, offset, block_size) if cache else None
            if path is not None and path.exists():
                maps = torch.load(path)
            t0 = time.time()
            nll, scores, maps = dense_pass(model, ids, sparse, gates=gates, block_size=block_size,
                                           maps=maps, need_maps=recall)
            dense_sec = time.time() - t0
            if path is not None and maps:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(maps, path)
            for c in configs:
                a = acc[c.label]
                if c.mode == "dense":
                    a["nll"].append(nll)
                    a["sec"] += dense_sec
                    continue
                s = scores[c.label]
                a["recall"].append(s["recall"])
                a["kept"] += s["kept"]
                a["causal"] += s["causal"]
                kw = {}
                if c.mode == "oracle":
                    kw["oracle_weights"] = {i: m[c.pooling] for i, m in maps.items()}
                t0 = time.time()
                with sparsify_config(model, c, gates=gates, **kw) as sp:
                    a["nll"].append(_nll(model, ids).cpu())
                a["sec"] += time.time() - t0
                if not recall:
                    a["kept"] += sp.stats.kept_blocks
                    a["causal"] += sp.stats.causal_blocks
                if progress:
                    print(f"  S={S} window {w}: {c.label} ppl "
                          f"{math.exp(a['nll'][-1].double().mean()):.3f} density "
                          f"{sp.stats.achieved_density:.3f} ({time.time() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
            if progress:
                print(f"S={S} window {w} done; dense ppl {math.exp(nll.double().mean()):.3f} "
                      f"({dense_sec:.0f} s)", file=sys.stderr, flush=True)
        for c in configs:
            a = acc[c.label]
            res = _result(a["nll"])
            if c.mode == "dense":
                rec, dens, per_layer = 1.0, 1.0, []
            elif not recall:
                rec, dens, per_layer = float("nan"), a["kept"] / a["causal"], []
            else:
                per_layer = torch.tensor(a["recall"]).mean(dim=0).tolist()  # (layers,)
                rec, dens = sum(per_layer) / len(per_layer), a["kept"] / a["causal"]
            row = dict(label=c.label, mode=c.mode,
                       pooling=c.pooling if c.mode == "oracle" else None,
                       density_target=c.density, threshold=c.threshold, length=S,
                       windows=ids_all.shape[0], ppl=res.ppl, nll=res.nll, tokens=res.tokens,
                       per_window=res.per_window, achieved_density=dens, recall=rec,
                       per_layer_recall=per_layer, seconds=a["sec"])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _windows(tokenizer, S: int, n: int, offset: int) -> torch.Tensor:
    from seerlib.data import token_windows

    return token_windows(tokenizer, "eval", S, n=n, offset=offset)


# ---------------------------------------------------------------- markdown

_METHODS = [
    ("dense", "dense"), ("oracle-max", "oracle (max-pooled, top-k)"),
    ("oracle-sum", "oracle (attention mass, top-k)"), ("gate", "gate (top-k)"),
    ("gate+sink", "gate + forced sink block (top-k)"),
    ("gate adaptive", "gate (adaptive budget)"),
    ("gate+sink adaptive", "gate + forced sink block (adaptive budget)"),
    ("gate+sink+local adaptive", "gate + forced sink and local block (adaptive budget)"),
    ("gate+sink+local+last adaptive",
     "gate + forced sink and local block, last row dense (adaptive budget)"),
    ("gate+sink+local relative", "gate + forced sink and local block (relative adaptive budget)"),
    ("gate+sink+local+floor0.5 relative",
     "gate + forced sink and local block, row floor 0.5 (relative adaptive budget)"),
    ("oracle-max relative", "oracle (max-pooled, relative adaptive budget)"),
    ("oracle-max adaptive", "oracle (max-pooled, adaptive budget)"),
    ("sink_window", "sink + window"), ("vertical_slash", "vertical-slash"),
]


def method_of(row) -> str:
    """A row's method: its label before '@' ("gate", "gate+sink", "oracle-max", ...) with
    " adaptive" for adaptive-budget rows ("gate+sink@a=0.3") and " relative" for relative ones
    ("gate+sink@r=0.3"), else 'oracle-<pooling>' for oracle rows and the mode for the others.
    The inverse of `method_spec`."""
    if row.get("label"):
        name, _, arg = row["label"].partition("@")
        suffix = next((s for s, rule in _BUDGET_RULES.items() if arg.startswith(rule)), "")
        return name + suffix
    return f"oracle-{row.get('pooling') or 'max'}" if row["mode"] == "oracle" else row["mode"]



def markdown(results: dict) -> str:
    """The quality table(s) as markdown from the JSON document `main` writes."""
    rows, meta = results.get("rows", []), results.get("meta", {})
    lines = []
    topk = [r for r in rows if r["threshold"] is None]
    dens = sorted({r["density_target"] for r in topk if r["mode"] != "dense"}, reverse=True)
    for S in sorted({r["length"] for r in rows}):
        at = [r for r in topk if r["length"] == S]
        if not at:
            continue
        n = max(r["windows"] for r in at)
        dense = next((r for r in at if r["mode"] == "dense"), None)
        lines += [f"**{S} tokens** ({n} eval window{'s' * (n > 1)} of {S} tokens, "
                  f"{n * (S - 1)} predictions; block {meta.get('block_size', 64)}). "
                  "Perplexity (recall of attention mass, achieved density):", "",
                  "| method | " + " | ".join(f"density {d:g}" for d in dens) + " |",
                  "|---|" + "---|" * len(dens)]
        if dense is not None:
            lines.append("| dense | " + " | ".join(f"{dense['ppl']:.3f}" for _ in dens) + " |")
        # named methods in their order, then any other method under its own name
        named = dict(_METHODS[1:])
        others = sorted({method_of(r) for r in at if r["mode"] != "dense"} - named.keys())
        for key, name in [*named.items(), *((m, m) for m in others)]:
            cells, any_ = [], False
            for d in dens:
                r = next((r for r in at if method_of(r) == key and r["density_target"] == d), None)
                any_ |= r is not None
                rec = "–" if r is None or math.isnan(r["recall"]) else f"{r['recall']:.3f}"
                cells.append("–" if r is None else
                             f"{r['ppl']:.3f} ({rec}, {r['achieved_density']:.3f})")
            if any_:
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    thr = [r for r in rows if r["threshold"] is not None]
    if thr:
        lines += ["**Threshold selection** (softmax score over the row's key blocks > τ; "
                  "gate top-k perplexity interpolated at the same achieved density):", "",
                  "| method | tokens | τ | achieved density | perplexity | recall | "
                  "top-k ppl at that density |", "|---|---|---|---|---|---|---|"]
        for r in sorted(thr, key=lambda r: (r["length"], method_of(r), -r["threshold"])):
            ref = _interp_topk(topk, r)
            lines.append(f"| {method_of(r)} | {r['length']} | {r['threshold']:g} | "
                         f"{r['achieved_density']:.3f} | {r['ppl']:.3f} | {r['recall']:.3f} | "
                         f"{'–' if ref is None else f'{ref:.3f}'} |")
        lines.append("")
    pk = results.get("passkey", [])
    if pk:
        depths = sorted({p["depth"] for p in pk})
        lines += ["**Passkey retrieval** (accuracy; a five-digit key at each depth of a haystack "
                  "of evaluation text; the reply is primed with the key's first digit and must "
                  "continue with the other four; greedy decoding):", "",
                  "| method | tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
                  "|---|---|" + "---|" * len(depths)]
        groups = defaultdict(list)
        for p in pk:
            groups[(p["method"], p["length"])].append(p)
        for (m, L), ps in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0] != "dense")):
            dens = ps[0].get("density")
            if m != "dense" and dens is not None and not math.isnan(dens):
                m = f"{m} (density {dens:.3f})"
            cells = []
            for d in depths:
                hit = [p["correct"] for p in ps if p["depth"] == d]
                cells.append("–" if not hit else f"{sum(hit)}/{len(hit)}")
            lines.append(f"| {m} | {L} | " + " | ".join(cells) + " |")
        lines.append("")
    if meta.get("device"):
        where = meta["device"] + (f" ({meta['gpu']})" if meta.get("gpu") else "")
        lines += [f"Model {meta.get('model', '?')}, {meta.get('dtype', '?')}, on {where}, torch "
                  f"{meta.get('torch', '?')}; block-sparse attention through "
                  f"`{meta.get('attention', '?')}`; gates `{meta.get('gates', '–')}`. Recall: "
                  "share of each query-block row's exact attention mass in the kept blocks, on the "
                  "dense model's attention, mean over layers, heads, rows and windows. Oracle rows "
                  "select from the dense model's own maps of the same window.", ""]
    if meta.get("command"):
        lines += ["Produced by:", "", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def _interp_topk(topk_rows, r) -> float | None:
    """The method's top-k perplexity at r's achieved density, linear between measured points."""
    pts = sorted((x["achieved_density"], x["ppl"]) for x in topk_rows
                 if x["length"] == r["length"] and method_of(x) == method_of(r))
    d = r["achieved_density"]
    for (d0, p0), (d1, p1) in zip(pts, pts[1:], strict=False):
        if d0 <= d <= d1:
            return p0 + (p1 - p0) * (d - d0) / (d1 - d0) if d1 > d0 else p0
    return None


# ---------------------------------------------------------------- CLI


def _merge(old: list, new: list, key) -> list:
    fresh = {key(x) for x in new}
    return [x for x in old if key(x) not in fresh] + new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seerlib.eval",
        description="Perplexity, recall and passkey of dense, oracle, gate and pattern attention "
                    "on the evaluation text; writes OUT.json and OUT.md (merged with earlier "
                    "runs).")
    parser.add_argument("--out", default="bench/results/quality-smollm2",
                        help="output path without extension")
    parser.add_argument("--methods", nargs="*",
                        default=["dense", "oracle-max", "oracle-sum", "sink_window",
                                 "vertical_slash", "gate"],
                        help="methods run at every --densities (dense once)")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--thresholds", nargs="*", type=float, default=[],
                        help="gate threshold selections to run")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="extra specs such as gate@0.25 or oracle-sum@t=0.01")
    parser.add_argument("--lengths", nargs="*", type=int, default=[4096, 8192])
    parser.add_argument("--windows", type=int, default=1, help="eval windows per length")
    parser.add_argument("--offset", type=int, default=0, help="first eval token")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gates", default=None, help="gate file (.safetensors) for gate methods")
    parser.add_argument("--attention", choices=("ops", "flex"), default=None,
                        help="block-sparse path: seerlib.ops or compiled FlexAttention (default: "
                             "flex on CPU, where it is the fast path, ops elsewhere)")
    parser.add_argument("--passkey-methods", nargs="*", default=[],
                        help="specs run through the passkey test, e.g. dense gate@0.3")
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--passkey-depths", nargs="+", type=float,
                        default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--passkey-trials", type=int, default=1)
    parser.add_argument("--cache", default=None,
                        help="folder for the dense passes' ground-truth maps (reused by reruns)")
    parser.add_argument("--no-recall", action="store_true",
                        help="skip the ground-truth maps (recall; slow on CPU); no oracle methods")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)

    from seerlib.data import MODEL_NAME, load_model
    from seerlib.integrate import sparsify_config

    if args.threads:
        torch.set_num_threads(args.threads)
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    b = args.block_size
    if args.attention is None:
        args.attention = "flex" if args.device == "cpu" else "ops"
    specs = []
    for m in args.methods:
        specs += ["dense"] if m == "dense" else [method_spec(m, d) for d in args.densities]
    specs += [f"gate@t={t:g}" for t in args.thresholds] + args.configs
    configs = [parse_config(s, b, args.attention) for s in specs]
    pk_configs = [parse_config(s, b, args.attention) for s in args.passkey_methods]
    model, tok = load_model(dtype=getattr(torch, args.dtype), device=args.device)
    gates = None
    if any(c.mode == "gate" for c in configs + pk_configs):
        if not args.gates:
            raise SystemExit("gate methods need --gates PATH (a file written by seerlib.io)")
        from seerlib.io import load_gates

        gates = load_gates(args.gates, model, block_size=b).to(args.device)

    out = Path(args.out)
    command = "python -m seerlib.eval " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
    meta = dict(model=MODEL_NAME, text="KJV eval split (Isaiah, Luke, Acts)", block_size=b,
                attention=args.attention, torch=torch.__version__, device=args.device,
                dtype=args.dtype)
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    if args.gates:
        meta["gates"] = args.gates
    update = {"meta": meta, "command": command}

    def on_row(row):
        _update_results(out, rows=[row], **update)

    def on_passkey(trials):
        _update_results(out, passkey=trials, **update)

    cache = Path(args.cache) if args.cache else None
    if configs and args.lengths:
        evaluate(model, tok, configs, args.lengths, args.windows, gates=gates, block_size=b,
                 offset=args.offset, cache=cache, on_row=on_row, recall=not args.no_recall)
    for c in pk_configs:
        for L in args.passkey_lengths:
            with sparsify_config(model, c, gates=gates) as sp:
                trials = passkey(model, tok, [L], args.passkey_depths, args.passkey_trials)
            dens = sp.stats.achieved_density  # over every prefill at this length
            on_passkey([dict(asdict(t), method=c.label, density=dens) for t in trials])
            print(f"passkey {c.label} L={L}: " + ", ".join(
                f"{t.depth:g}:{'ok' if t.correct else repr(t.answer)}" for t in trials),
                file=sys.stderr, flush=True)
    results = _update_results(out, **update)
    print(markdown(results))


def _update_results(out: Path, meta: dict, command: str, rows=(), passkey=()) -> dict:
    """Merge rows / passkey trials into OUT.json under a file lock (several runs may write the
    same table), then rewrite OUT.md. Later results replace earlier ones with the same key."""
    import fcntl

    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(json_path.read_text()) if json_path.exists() else {}
        m = results.setdefault("meta", {})
        m.update(meta)
        cmds = m.setdefault("commands", [])
        if command not in cmds:
            cmds.append(command)
        m["command"] = "\n".join(cmds)
        results["rows"] = _merge(results.get("rows", []), list(rows),
                                 lambda r: (r["label"], r["length"]))
        results["passkey"] = _merge(results.get("passkey", []), list(passkey),
                                    lambda p: (p["method"], p["length"], p["depth"]))
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(json_path)
        md_path.write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
