"""Result files: reading them back, merging new rows into them, and the markdown table.

A result file holds the rows of runs made under one setting (`MERGE_KEYS`: model, evaluation text,
block size, attention path, dtype, device and GPU, gate file; `STRICT_KEYS`: YaRN context and
model diff, where a missing one means the base model): `_update_results` merges a run into
an existing file only when its settings match, and refuses it naming the difference otherwise.
Every file is read with checks (`read_results`) and written atomically.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from seerlib.eval.passkeys import PasskeyTrial
from seerlib.io import atomic_write_text
from seerlib.methods import METHODS, split_label, split_method
from seerlib.names import display_name, series

# The settings every row of one file shares (None where a run did not say, e.g. "gpu" on a CPU).
MERGE_KEYS = ("model", "text", "block_size", "attention", "dtype", "device", "gpu")
# ... and those whose absence says something: no "context", the model's own (not extended by
# YaRN); no "model_diff_sha256", the base weights. Compared even where only one run records them.
STRICT_KEYS = ("context", "model_diff_sha256")
_WHAT = "the JSON document `python -m seerlib.eval` writes"


class ResultsError(ValueError):
    """A result file is unreadable, or holds results of other settings; the message names it."""


def read_results(path) -> dict:
    """A result file's document, checked: a JSON object with a "meta" object and lists of rows and
    passkey trials ({} when there is no file).

    Raises:
        ResultsError: the file is unreadable or not such a document (the message names it).
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path} is not a readable results file ({e}); expected {_WHAT}") from e
    if not (isinstance(doc, dict) and isinstance(doc.get("meta", {}), dict)
            and isinstance(doc.get("rows", []), list)
            and isinstance(doc.get("passkey", []), list)):
        raise ResultsError(
            f"{path} is not a results file (got a JSON {type(doc).__name__} without a meta object "
            f"and lists of rows and passkey trials); expected {_WHAT}"
        )
    return doc


def merge_conflicts(old: dict, new: dict) -> list[str]:
    """The settings in which two runs' metadata differ, in words ([] when they may be merged).

    A setting only one of them records does not conflict (a run without gates next to one with a
    gate file; an older file without a field). Gate files compare by checksum when both have one.
    """
    out = []
    for key in MERGE_KEYS:
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None and a != b:
            out.append(f"{key} {a!r} there, {b!r} here")
    for key in STRICT_KEYS if old else ():  # {}: no file yet
        a, b = old.get(key), new.get(key)
        if a != b:
            out.append(f"{key} {a!r} there, {b!r} here")
    if old.get("gates_sha256") and new.get("gates_sha256"):
        same_gate = old["gates_sha256"] == new["gates_sha256"]
    else:
        same_gate = old.get("gates") is None or new.get("gates") is None or (
            old["gates"] == new["gates"])
    if not same_gate:
        out.append(f"gates {old.get('gates')!r} there, {new.get('gates')!r} here")
    return out


def check_mergeable(json_path, meta: dict) -> dict:
    """The document at `json_path`, refused (ResultsError) if it is unreadable or was made under
    other settings than `meta`; the message names the differences."""
    doc = read_results(json_path)
    diffs = merge_conflicts(doc.get("meta", {}), meta)
    if diffs:
        raise ResultsError(
            f"{json_path} holds results made under other settings ({'; '.join(diffs)}); rows are "
            "only merged with rows of the same block size, gate file, model (context, model "
            "diff), text, dtype and device: "
            "choose another --out"
        )
    return doc


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
        results = read_results(path)
        meta = results.get("meta", {})
        gate_file = gate_file or meta.get("gates")
        same_gate = meta.get("gates") == gate_file
        notes.append(f"{path.name}: {meta.get('device', '?')} {meta.get('gpu', '')}, gates "
                     f"{meta.get('gates')}" + ("" if same_gate else " (its gate rows left out)"))
        for r in results.get("rows", []):
            if not _reads_gate(r["label"]) or same_gate:
                rows.setdefault((r["label"], r["length"]), r)
        here: dict[str, list[PasskeyTrial]] = {}
        for p in results.get("passkey", []):
            if p["method"] not in trials and (not _reads_gate(p["method"]) or same_gate):
                here.setdefault(p["method"], []).append(PasskeyTrial(
                    p["length"], p["depth"], p["key"], p["answer"], p["correct"]))
        trials.update(here)
    return list(rows.values()), trials, notes


def _reads_gate(label: str) -> bool:
    return METHODS[split_label(label)[0]].needs_gate


def _is_dense(row) -> bool:
    return not METHODS[split_label(row["label"])[0]].sparse


def _series_order(keys) -> list[str]:
    """Series sorted by method (the registry's order), then by name."""
    order = list(METHODS)
    return sorted(keys, key=lambda k: (order.index(split_method(k)[0]), k))


def markdown(results: dict) -> str:
    """The quality table(s) as markdown from the JSON document `main` writes."""
    rows, meta = results.get("rows", []), results.get("meta", {})
    lines = []
    topk = [r for r in rows if r["threshold"] is None]
    dens = sorted({r["density_target"] for r in topk if not _is_dense(r)}, reverse=True)
    for S in sorted({r["length"] for r in rows}):
        at = [r for r in topk if r["length"] == S]
        if not at:
            continue
        n = max(r["windows"] for r in at)
        dense = next((r for r in at if _is_dense(r)), None)
        lines += [f"**{S} tokens** ({n} eval window{'s' * (n > 1)} of {S} tokens, "
                  f"{n * (S - 1)} predictions; block {meta.get('block_size', 64)}). "
                  "Perplexity (recall of attention mass, achieved density):", "",
                  "| method | " + " | ".join(f"density {d:g}" for d in dens) + " |",
                  "|---|" + "---|" * len(dens)]
        if dense is not None:
            lines.append("| dense | " + " | ".join(f"{dense['ppl']:.3f}" for _ in dens) + " |")
        # one row per series, methods in the registry's order
        for key in _series_order({series(r) for r in at if not _is_dense(r)}):
            name = display_name(key)
            cells, any_ = [], False
            for d in dens:
                r = next((r for r in at if series(r) == key and r["density_target"] == d), None)
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
        for r in sorted(thr, key=lambda r: (r["length"], series(r), -r["threshold"])):
            ref = _interp_topk(topk, r)
            lines.append(f"| {series(r)} | {r['length']} | {r['threshold']:g} | "
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
        if meta.get("context") or meta.get("model_diff") or meta.get("text"):
            lines += [_model_line(meta), ""]
    if meta.get("command"):
        lines += ["Produced by:", "", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def _model_line(meta: dict) -> str:
    """Which model and text: the YaRN context, the model diff applied, the evaluation text."""
    parts = []
    if meta.get("context"):
        parts.append(f"extended by YaRN to {meta['context']} tokens (factor "
                     f"{meta.get('yarn_factor', '?')})")
    if meta.get("model_diff"):
        parts.append(f"fine-tuned weights `{meta['model_diff']}` applied (sha256 "
                     f"{str(meta.get('model_diff_sha256'))[:16]}…, "
                     f"{meta.get('model_diff_steps', '?')} steps)")
    head = "The model " + ", ".join(parts) + "; text" if parts else "Text"
    return f"{head}: {meta.get('text', '?')}."


def _interp_topk(topk_rows, r) -> float | None:
    """The method's top-k perplexity at r's achieved density, linear between measured points."""
    pts = sorted((x["achieved_density"], x["ppl"]) for x in topk_rows
                 if x["length"] == r["length"] and series(x) == series(r))
    d = r["achieved_density"]
    for (d0, p0), (d1, p1) in zip(pts, pts[1:], strict=False):
        if d0 <= d <= d1:
            return p0 + (p1 - p0) * (d - d0) / (d1 - d0) if d1 > d0 else p0
    return None


def _merge(old: list, new: list, key) -> list:
    fresh = {key(x) for x in new}
    return [x for x in old if key(x) not in fresh] + new


def _update_results(out: Path, meta: dict, command: str, rows=(), passkey=()) -> dict:
    """Merge rows / passkey trials into OUT.json under a file lock (several runs may write the
    same table), then rewrite OUT.md, both atomically. Later results replace earlier ones with the
    same key.

    Raises:
        ResultsError: OUT.json is unreadable or holds results of other settings (`MERGE_KEYS`,
            gate file); nothing is written then.
    """
    import fcntl  # lazy: Unix-only, so that the rest of seerlib.eval imports anywhere

    out = Path(out)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = check_mergeable(json_path, meta)
        m = results.setdefault("meta", {})
        m.update(meta)
        # a file from before "commands" has only "command" (its runs, one a line): keep them
        cmds = m.setdefault("commands", (m.get("command") or "").splitlines())
        if command not in cmds:
            cmds.append(command)
        m["command"] = "\n".join(cmds)
        results["rows"] = _merge(results.get("rows", []), list(rows),
                                 lambda r: (r["label"], r["length"]))
        results["passkey"] = _merge(results.get("passkey", []), list(passkey),
                                    lambda p: (p["method"], p["length"], p["depth"]))
        md = markdown(results)  # first: a row the table cannot show changes neither file
        atomic_write_text(json_path, json.dumps(results, indent=1))
        atomic_write_text(md_path, md)
    return results
