"""The recall table of gates against the baselines (the README's gate table), on the quality
table's harness: `quality.dense_pass` scores every selection inside one dense forward.

    python -m seerlib.eval.recall --gates GATE.safetensors --seq-len 4096 --windows 24 --out OUT

Methods: every gate set given (top-k of its logits), "oracle" (top-k of the max-pooled ground
truth, `oracle-max`), "sink_window" and "vertical_slash" (at top-k's achieved density, as in the
quality table), each at every density.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from seerlib.data import load_model, token_windows
from seerlib.eval.quality import dense_pass
from seerlib.gate import GateSet
from seerlib.io import atomic_write_text, load_gates, read_metadata
from seerlib.methods import SparseConfig
from seerlib.models import (
    add_model_argument,
    check_gate_file_model,
    get_model,
    resolve_model_argument,
)
from seerlib.select import Selection

__all__ = ["DEFAULT_DENSITIES", "main", "recall_markdown", "recall_table"]

DEFAULT_DENSITIES = (0.5, 0.3, 0.1)
# table name -> method of each baseline row
BASELINES = {"oracle": "oracle-max", "sink_window": "sink_window",
             "vertical_slash": "vertical_slash"}


@torch.no_grad()
def recall_table(model, windows: torch.Tensor, gates: dict, block_size: int = 64,
                 densities: Sequence[float] = DEFAULT_DENSITIES, log=None) -> dict:
    """Mean recall of attention mass of gates and baseline patterns on text windows.

    For every window and layer the exact block mass of the dense model's attention is the weight;
    each method's block mask at each density keeps a share of it (`metrics.recall`), averaged over
    layers, heads and query-block rows, then over windows.

    Args:
        model: the frozen transformers model.
        windows: (N, S) token ids.
        gates: {name: GateSet} with the model's block size.
        block_size: b.
        densities: target densities.
        log: optional callable for a progress line per window.
    Returns:
        {"recall": {method: {density: mean}}, "achieved_density": {method: {density: mean}},
         "per_layer": {method: {density: [mean per layer]}}, "windows", "seq_len", "block_size"}.
    """
    for name, g in gates.items():
        if g.block_size != block_size:
            raise ValueError(f"gate set {name!r} has block size {g.block_size}; "
                             f"expected {block_size}")
    keys = [str(d) for d in densities]

    def configs(method):
        return {k: SparseConfig(method, Selection(density=d), block_size=block_size)
                for d, k in zip(densities, keys, strict=True)}

    rows = {**{n: configs("gate") for n in gates}, **{n: configs(m) for n, m in BASELINES.items()}}
    per = {n: {k: [] for k in keys} for n in rows}  # per window: [recall per layer]
    kept = {n: {k: [0, 0] for k in keys} for n in rows}
    device = next(model.parameters()).device
    for w in range(len(windows)):
        ids = windows[w : w + 1].to(device)
        maps = None
        for name, by_density in rows.items():
            _, scores, maps = dense_pass(model, ids, list(by_density.values()),
                                         gates=gates.get(name), block_size=block_size,
                                         maps=maps)
            for k, cfg in by_density.items():
                s = scores[cfg.label]
                per[name][k].append(s["recall"])
                kept[name][k][0] += s["kept"]
                kept[name][k][1] += s["causal"]
        if log:
            last = keys[-1]
            log(f"window {w + 1}/{len(windows)}: " + ", ".join(
                f"{n} {torch.tensor(per[n][last]).mean():.3f}" for n in rows)
                + f" (recall at {last})")

    def per_layer(xs):
        return torch.tensor(xs, dtype=torch.float64).mean(dim=0).tolist()  # (layers,)

    return {
        "recall": {n: {k: sum(per_layer(per[n][k])) / len(per[n][k][0]) for k in keys}
                   for n in rows},
        "achieved_density": {n: {k: kept[n][k][0] / kept[n][k][1] for k in keys} for n in rows},
        "per_layer": {n: {k: per_layer(per[n][k]) for k in keys} for n in rows},
        "windows": len(windows),
        "seq_len": int(windows.shape[1]),
        "block_size": block_size,
    }


def recall_markdown(table: dict, labels: dict | None = None) -> str:
    """The recall table as markdown: one row per method, one column per density."""
    labels = labels or {}
    keys = list(next(iter(table["recall"].values())))
    head = "| method | " + " | ".join(f"density {d}" for d in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for m, row in table["recall"].items():
        cells = [f"{row[d]:.3f} ({table['achieved_density'][m][d]:.2f})" for d in keys]
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nMean recall of attention mass (achieved density in parentheses), "
        f"{table['windows']} windows of {table['seq_len']} tokens, block {table['block_size']}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m seerlib.eval.recall`: the recall table of a gate file against the baselines."""
    p = argparse.ArgumentParser(prog="python -m seerlib.eval.recall", description=main.__doc__)
    add_model_argument(p)
    p.add_argument("--gates", required=True, help="trained gate file (save_gates)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--windows", type=int, default=8, help="windows of the eval split")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--densities", default="0.5,0.3,0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained gate")
    p.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model_info = get_model(resolve_model_argument(args.model))
    try:  # before the model loads: a gate file of another model names both
        check_gate_file_model(args.gates, model_info)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))

    model, tok = load_model(device=args.device, name=model_info.name)
    trained = load_gates(args.gates, model, block_size=args.block_size,
                         model_name=model_info.model_name)
    meta = read_metadata(args.gates)
    torch.manual_seed(args.seed)
    untrained = GateSet.from_config(model.config, block_size=args.block_size,
                                    q_pool=trained.q_pool, k_pool=trained.k_pool,
                                    d_gate=trained.d_gate)
    windows = token_windows(tok, "eval", args.seq_len, args.windows)
    densities = [float(x) for x in args.densities.split(",")]
    gate_sets = {"gate": trained.to(args.device), "untrained_gate": untrained.to(args.device)}
    table = recall_table(model, windows, gate_sets, args.block_size, densities,
                         log=lambda s: print(s, flush=True))
    table["model"] = model_info.model_name
    table["gate_file"] = str(args.gates)
    table["gate_steps"], table["gate_tokens_seen"] = meta.get("steps"), meta.get("tokens_seen")
    table["command"] = "python -m seerlib.eval.recall " + " ".join(
        argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(table, indent=1))
    labels = {"gate": "SeerAttention gate (shipped)", "untrained_gate": "untrained gate",
              "oracle": "oracle top-k (pooled ground truth)", "sink_window": "sink + window",
              "vertical_slash": "vertical-slash (last-block estimate)"}
    md = recall_markdown(table, labels)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
