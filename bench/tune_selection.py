"""Choose the gate's selection rule on TRAINING text only, never on the evaluation text.

Every candidate is the shipped gate with a forced sink and local block at density 0.3, spreading
top-k's block budget adaptively (`seerlib.select.select_blocks`) with a different rule: plain
(`@a=`), relative (`@r=`) and relative or plain with a row floor (`+floorF`). Three steps, each
writing into OUT (default bench/results/tune-selection):

    python bench/tune_selection.py ppl      # perplexity on training windows (4096 and 8192 tokens)
    python bench/tune_selection.py passkey  # passkeys hidden in training text (seed 1)
    python bench/tune_selection.py choose   # the rule below -> OUT.json, OUT.md

The rule was fixed before any result was seen: a candidate is eligible when its passkey total is
at most one key below dense's; among the eligible, the lowest mean perplexity increase over dense
(both lengths) wins; if none is eligible, the highest passkey total wins (ties: that increase).

The training windows start at token 200000 of the training split. The gate itself was trained on
the whole split, so this measures the rules on text the gate has seen, never on the test text.
On an H100 the three steps take about 1.5, 4.5 and 0 minutes (`--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from seerlib.data import load_model, token_windows
from seerlib.eval import passkey, perplexity
from seerlib.integrate import sparsify
from seerlib.io import load_gates
from seerlib.methods import SparseConfig, resolve_config
from seerlib.select import Selection

GATE = "data/gates/smollm2-135m-instruct-b64-s8192.safetensors"
BASE = Selection(density=0.3, forced={"sink": 1, "local": 1})
# (budget rule, row floor) of each candidate; results are keyed by the configs' labels
RULES = [("layer", 0.0), ("relative", 0.0), ("relative", 0.25), ("relative", 0.5),
         ("relative", 0.75), ("layer", 0.5)]
CANDIDATES = [SparseConfig("gate", replace(BASE, budget=b, row_floor=f)).label for b, f in RULES]
PPL_WINDOWS = [(4096, 8), (8192, 6)]  # (tokens, windows)
PASSKEY = dict(lengths=[2048, 4096, 8192], depths=[0, 0.25, 0.5, 0.75, 1], trials=4, seed=1)
OFFSET = 200_000


def _load(device: str):
    model, tok = load_model()
    model = model.to(device)
    return model, tok, load_gates(GATE, model, block_size=64).to(device)


def _config(spec: str, device: str):
    return resolve_config(spec, attention="ops" if device.startswith("cuda") else "flex")


def run_ppl(device: str) -> dict:
    model, tok, gates = _load(device)
    out = {}
    for L, n in PPL_WINDOWS:
        windows = token_windows(tok, "train", L, n=n, offset=OFFSET)
        for spec in ["dense", "oracle-max@0.3", *CANDIDATES]:
            t = time.time()
            if spec == "dense":
                r, density = perplexity(model, windows, progress=False), 1.0
            else:
                cfg = _config(spec, device)
                with sparsify(model, cfg, gates=gates if cfg.spec.needs_gate else None) as sp:
                    r = perplexity(model, windows, progress=False)
                density = sp.stats.achieved_density
            out[f"{L}|{spec}"] = {"ppl": r.ppl, "density": density}
            print(L, spec, f"{r.ppl:.4f}", f"{density:.4f}", f"{time.time() - t:.1f}s",
                  flush=True)
    return out


def run_passkey(device: str) -> dict:
    model, tok, gates = _load(device)
    kw = dict(PASSKEY, progress=False, split="train")
    lengths, depths, trials = kw.pop("lengths"), kw.pop("depths"), kw.pop("trials")
    out = {}
    for spec in ["dense", *CANDIDATES]:
        if spec == "dense":
            tr = passkey(model, tok, lengths, depths, trials, **kw)
        else:
            with sparsify(model, _config(spec, device), gates=gates):
                tr = passkey(model, tok, lengths, depths, trials, **kw)
        out[spec] = [[x.length, x.depth, x.correct] for x in tr]
        print(spec, sum(x.correct for x in tr), "/", len(tr), flush=True)
    return out


def choose(ppl: dict, pk: dict) -> tuple[str, list[dict]]:
    """The rule in the module docstring: (chosen spec, one summary row per candidate)."""
    lengths = sorted({int(k.split("|")[0]) for k in ppl})
    total = {s: sum(c for _, _, c in v) for s, v in pk.items()}
    inc = {s: sum(ppl[f"{L}|{s}"]["ppl"] - ppl[f"{L}|dense"]["ppl"] for L in lengths)
           / len(lengths) for s in CANDIDATES}
    ok = [s for s in CANDIDATES if total[s] >= total["dense"] - 1]
    best = (min(ok, key=inc.get) if ok else
            min(CANDIDATES, key=lambda s: (-total[s], inc[s])))
    rows = [{"spec": s, "passkey": total[s], "keys": len(pk[s]), "ppl_increase": inc[s],
             **{f"ppl_{L}": ppl[f"{L}|{s}"]["ppl"] for L in lengths}, "eligible": s in ok}
            for s in CANDIDATES]
    return best, rows


def markdown(doc: dict) -> str:
    lengths = sorted({int(k.split("|")[0]) for k in doc["ppl"]})
    dense = {L: doc["ppl"][f"{L}|dense"]["ppl"] for L in lengths}
    oracle = {L: doc["ppl"][f"{L}|oracle-max@0.3"]["ppl"] for L in lengths}
    oracle_inc = sum(oracle[L] - dense[L] for L in lengths) / len(lengths)
    lines = ["**Choosing the selection rule on training text** (gate "
             f"`{GATE}`, density 0.3; {doc['device']}). Perplexity on training windows "
             f"({', '.join(f'{n} x {L}' for L, n in PPL_WINDOWS)} tokens, from token {OFFSET}); "
             f"passkeys hidden in training text ({PASSKEY['trials']} keys per length and depth, "
             f"lengths {PASSKEY['lengths']}, seed {PASSKEY['seed']}).", "",
             "| rule | " + " | ".join(f"ppl {L}" for L in lengths)
             + " | mean increase over dense | passkey | eligible |",
             "|---|" + "---|" * len(lengths) + "---|---|---|",
             "| dense | " + " | ".join(f"{dense[L]:.3f}" for L in lengths) + " | – | "
             f"{sum(c for _, _, c in doc['passkey']['dense'])}/{len(doc['passkey']['dense'])} "
             "| – |",
             "| oracle-max@0.3 (top-k) | " + " | ".join(f"{oracle[L]:.3f}" for L in lengths)
             + f" | {oracle_inc:.3f} | – | – |"]
    for r in doc["summary"]:
        name = f"**{r['spec']}** (chosen)" if r["spec"] == doc["chosen"] else r["spec"]
        lines.append(f"| {name} | " + " | ".join(f"{r[f'ppl_{L}']:.3f}" for L in lengths)
                     + f" | {r['ppl_increase']:.3f} | {r['passkey']}/{r['keys']} | "
                     + ("yes" if r["eligible"] else "no") + " |")
    lines += ["", "The rule (fixed before the run): eligible = passkey total at most one key "
              "below dense's; the eligible rule with the lowest mean perplexity increase wins.",
              "", "Produced by `python bench/tune_selection.py ppl|passkey|choose --device cuda` "
              "(see its docstring).", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["ppl", "passkey", "choose"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/tune-selection",
                    help="output path without extension (steps write OUT.<step>.json)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.step in ("ppl", "passkey"):
        res = run_ppl(a.device) if a.step == "ppl" else run_passkey(a.device)
        device = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
        doc = {"device": f"{device}, torch {torch.__version__}", "results": res}
        out.with_suffix(f".{a.step}.json").write_text(json.dumps(doc, indent=1))
        return
    ppl = json.loads(out.with_suffix(".ppl.json").read_text())
    pk = json.loads(out.with_suffix(".passkey.json").read_text())
    best, rows = choose(ppl["results"], pk["results"])
    doc = {"chosen": best, "summary": rows, "ppl": ppl["results"], "passkey": pk["results"],
           "device": ppl["device"]}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
