"""Dense perplexity of SmolLM2 before and after YaRN context extension, without fine-tuning.

Issue 16's "before" table: SmolLM2-135M-Instruct (8k context) as it is and extended by YaRN
(`seerlib.yarn.extend_context`, factor 4 by default: 32k), each scored by
`seerlib.eval.perplexity` on the non-overlapping windows of an evaluation text (every window on
its own, no carried context) at 4k, 8k, 16k and 32k tokens. `--text` picks the text, with the
names the library's CLIs give them:
- `longtext+kjv` (default): the held-out long documents, Alice and Persuasion
  (`seerlib.longtext.EVAL_DOCUMENTS`, 155,219 tokens), with the King James evaluation split last
  (`longtext.token_windows(..., kjv=True)`, 264,501 tokens in all): windows lie inside one
  document each, taken from the documents in turn; 7 windows of 32k (1 Alice, 3 Persuasion,
  3 KJV), 15 of 16k;
- `longtext`: the long documents alone (4 windows of 32k, 9 of 16k);
- `kjv`: the King James evaluation split alone (`seerlib.data.token_windows`, 109,282 tokens,
  `make data`): 3 windows of 32k, 6 of 16k.
The first two need the long-text cache (`make longtext`). Every row says how many windows it
used and from which documents.

Variants, run in this order on one loaded model (YaRN extends it in place, so it comes last):
- `base-as-loaded`: the model as `seerlib.data.load_model` gives it, its rotary buffers cast to
  `--dtype` with the weights (inv_freq in bf16 on a GPU run);
- `base`: the same model with its rotary embedding rebuilt, inv_freq in float32
  (`seerlib.yarn.rebuild_rotary`), as transformers' own loading keeps it;
- `yarn`: extended by `--factor` (inv_freq float32, YaRN's attention factor on cos / sin).

Writes OUT.json (meta: device, GPU, versions, dtype, text and its documents; rows: variant,
length, windows and their documents, tokens scored, perplexity, each window's perplexity, rope
settings, seconds, peak memory) and OUT.md (the table), rewritten after every row. A length the
text cannot fill once is recorded as skipped. CPU smoke run (seconds): `python bench/yarn_ppl.py
--device cpu --text kjv --lengths 256 --max-windows 1 --out /tmp/yarn-ppl`; the H200 command is
in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from seerlib import longtext, yarn
from seerlib.data import EVAL_BOOKS, MODEL_NAME, DataError, load_model, tokens
from seerlib.eval.ppl import perplexity
from seerlib.io import atomic_write_text, fresh_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _results beside it
from _results import free, versions, write_json  # noqa: E402

VARIANTS = ("base-as-loaded", "base", "yarn")  # the order they run in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)


def prepare(model, variant: str, factor: float) -> None:
    """Put the loaded model in the state of `variant` (the variants run in `VARIANTS` order)."""
    if variant == "base":
        yarn.rebuild_rotary(model)
    elif variant == "yarn":
        yarn.extend_context(model, factor)


def rope_state(model) -> dict:
    """What the model's rotary embedding does: its config's rope settings, the attention
    scaling on cos / sin and the dtype of inv_freq."""
    rot = model.model.rotary_emb
    return {"rope_parameters": dict(model.config.rope_parameters),
            "max_position_embeddings": model.config.max_position_embeddings,
            "attention_scaling": float(rot.attention_scaling),
            "inv_freq_dtype": str(rot.inv_freq.dtype).removeprefix("torch.")}


def text_documents(tok, text: str, split: str) -> dict[str, torch.Tensor]:
    """{document: 1-D token ids} of the text, in the order its windows are taken from them:
    the long-text documents of the split ("longtext"), them and the King James split last
    ("longtext+kjv"), or the King James split alone ("kjv")."""
    if text == "kjv":
        return {longtext.KJV: tokens(tok, split)}
    return longtext.document_tokens(tok, split, kjv=text == "longtext+kjv")


def text_description(text: str, split: str, docs: dict[str, torch.Tensor]) -> str:
    """What the text is, in words, for the table: its documents, the King James split last."""
    kjv = f"the King James {split} split" + (f" ({', '.join(EVAL_BOOKS)})" if split == "eval"
                                             else "")
    if text == "kjv":
        return kjv
    names = [name for name in docs if name != longtext.KJV]
    long = f"the long-text {split} documents ({', '.join(names)})"
    return long + (f", then {kjv}" if text == "longtext+kjv" else "")


def windows_by_document(docs: dict[str, torch.Tensor], seq_len: int,
                        n: int | None = None) -> dict[str, int]:
    """How many of the first n windows of seq_len (all by default) come from each document;
    window i of every document is taken in turn, as `longtext.token_windows` does. Documents
    that give none are left out."""
    avail = {name: max(0, (len(ids) - seq_len) // seq_len + 1) for name, ids in docs.items()}
    order = [name for i in range(max(avail.values(), default=0)) for name in docs
             if avail[name] > i]  # the document of each window, in order
    order = order if n is None else order[:n]
    return {name: order.count(name) for name in docs if name in order}


def score(model, tok, text: str, split: str, seq_len: int, max_windows: int | None,
          batch_size: int) -> dict:
    """One row's figures: perplexity over the text's windows of seq_len tokens (at most
    max_windows of them), or a skip when the text holds none."""
    docs = text_documents(tok, text, split)
    avail = sum(windows_by_document(docs, seq_len).values())
    n = avail if max_windows is None else min(avail, max_windows)
    base = {"seq_len": seq_len, "windows": n, "windows_available": avail,
            "windows_by_document": windows_by_document(docs, seq_len, n)}
    if n == 0:
        longest = max(len(ids) for ids in docs.values())
        return {**base, "status": "skipped",
                "reason": f"the text's longest document has {longest} tokens: no window of "
                          f"{seq_len}"}
    windows = longtext.text_windows(tok, text, split, seq_len, n)  # (n, seq_len)
    res = perplexity(model, windows, batch_size=batch_size, progress=False)
    return {**base, "status": "ok", "tokens": res.tokens, "ppl": res.ppl, "nll": res.nll,
            "per_window": res.per_window}


def _name(variant: str, factor: float) -> str:
    return {"base-as-loaded": "base, rope as loaded", "base": "base",
            "yarn": f"YaRN x{factor:g}"}[variant]


def markdown(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lengths = sorted({r["seq_len"] for r in rows})
    cell = {(r["variant"], r["seq_len"]): r for r in rows}
    factor = meta["factor"]
    lines = [
        f"# Dense perplexity of {meta['model']}: base and YaRN x{factor:g} (no fine-tuning)",
        "",
        f"{meta['gpu'] or meta['device']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['dtype']}, {meta['attention']} attention. "
        f"Text (`--text {meta['text_option']}`): {meta['text']}, {meta['text_tokens']:,} tokens "
        f"in {len(meta['documents'])} document(s); every non-overlapping window inside one "
        f"document, each scored on its own (`seerlib.eval.perplexity`). YaRN: "
        f"{meta['original_context']} -> {meta['extended_context']} tokens, rope settings in the "
        "JSON. Lower is better.",
        "",
        "| tokens | windows | tokens scored | " + " | ".join(_name(v, factor) for v in variants)
        + " | windows by document |",
        "|---" * (4 + len(variants)) + "|",
    ]
    for S in lengths:
        first = next(cell[(v, S)] for v in variants if (v, S) in cell)
        scored = first.get("tokens")
        vals = []
        for v in variants:
            r = cell.get((v, S))
            if r is None:
                vals.append("")
            elif r["status"] == "ok":
                vals.append(f"{r['ppl']:.2f}")
            else:
                vals.append(r["status"])
        scored = "" if scored is None else f"{scored:,}"
        by_doc = ", ".join(f"{k} {v}" for k, v in first.get("windows_by_document", {}).items())
        lines.append(f"| {S} | {first.get('windows', '')} | {scored} | " + " | ".join(vals)
                     + f" | {by_doc} |")
    lines += ["", f"Produced by: `{meta['command']}` ({meta['date']})", ""]
    return "\n".join(lines)


def write(stem: Path, doc: dict) -> None:
    write_json(Path(f"{stem}.json"), doc)
    atomic_write_text(Path(f"{stem}.md"), markdown(doc))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/yarn_ppl.py",
        description="Dense perplexity of SmolLM2 as it is and extended by YaRN (no fine-tuning) "
                    "on the evaluation text; writes OUT.json and OUT.md.")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS),
                   help="window lengths in tokens (default 4096 8192 16384 32768)")
    p.add_argument("--factor", type=float, default=4.0, help="YaRN factor (default 4: 8k -> 32k)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which models to score (they run in the order base-as-loaded, base, yarn)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="at most this many windows per length (default: all that fit)")
    p.add_argument("--text", choices=longtext.TEXTS, default="longtext+kjv",
                   help="longtext+kjv (default): the long-text documents of the split, the King "
                        "James split last; longtext: the documents alone (both need `make "
                        "longtext`); kjv: the King James split alone")
    p.add_argument("--split", choices=("eval", "train"), default="eval")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--attention", default="sdpa", help="transformers attention (sdpa, eager)")
    p.add_argument("--out", default=None,
                   help="output path without extension (default: a fresh "
                        "bench/results/runs/yarn-ppl-<UTC time>)")
    args = p.parse_args(argv)
    if any(S < 2 for S in args.lengths):
        p.error(f"--lengths must be >= 2 tokens each; got {args.lengths}")
    if args.max_windows is not None and args.max_windows < 1:
        p.error(f"--max-windows must be >= 1; got {args.max_windows}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1; got {args.batch_size}")
    if not math.isfinite(args.factor) or args.factor <= 1:
        p.error(f"--factor must be > 1; got {args.factor}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv=None) -> Path:
    args = parse(argv)
    command = shlex.join(["python", "bench/yarn_ppl.py", *(sys.argv[1:] if argv is None
                                                          else argv)])
    try:  # before the model loads: a missing cache costs no GPU minutes
        longtext.check_text(args.text, splits=(args.split,))
    except DataError as e:
        raise SystemExit(f"--text {args.text} needs the long-text cache, which `make longtext` "
                         f"builds (or pass --text kjv for the King James text alone): {e}"
                         ) from e
    stem = Path(args.out) if args.out else fresh_path("bench/results/runs", "yarn-ppl")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, tok = load_model(dtype=DTYPES[args.dtype], device=device,
                            attn_implementation=args.attention)
    orig = yarn.original_context(model.config)
    docs = text_documents(tok, args.text, args.split)
    meta = {
        "model": MODEL_NAME, "split": args.split, "text_option": args.text,
        "text": text_description(args.text, args.split, docs),
        "text_tokens": sum(len(ids) for ids in docs.values()),
        "documents": {name: len(ids) for name, ids in docs.items()},
        "factor": args.factor, "original_context": orig,
        "extended_context": round(orig * args.factor),
        "dtype": args.dtype, "attention": args.attention, "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        **versions(), "python": platform.python_version(), "fine_tuned": False,
        "batch_size": args.batch_size, "max_windows": args.max_windows, "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    doc = {"meta": meta, "rows": []}
    print(f"{meta['gpu'] or device.type}: {MODEL_NAME} loaded ({time.perf_counter() - t0:.0f} s);"
          f" writing {stem}.json/.md", flush=True)
    for variant in [v for v in VARIANTS if v in args.variants]:
        prepare(model, variant, args.factor)
        for S in args.lengths:
            t = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                fields = score(model, tok, args.text, args.split, S, args.max_windows,
                               args.batch_size)
            except torch.cuda.OutOfMemoryError as e:
                fields = {"seq_len": S, "status": "oom", "error": str(e)[:500]}
            except Exception as e:  # noqa: BLE001 - a failed row is a result; the others go on
                fields = {"seq_len": S, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            row = {"variant": variant, **fields, **rope_state(model),
                   "seconds": time.perf_counter() - t}
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            free(device)
            doc["rows"].append(row)
            write(stem, doc)
            what = (f"ppl {row['ppl']:.3f} over {row['windows']} windows" if "ppl" in row
                    else row.get("reason") or row.get("error"))
            print(f"[{time.perf_counter() - t0:5.0f} s] {variant:>14} {S:>6}: {what} "
                  f"({row['seconds']:.1f} s)", flush=True)
    print(markdown(doc), flush=True)
    return stem


if __name__ == "__main__":
    main()
