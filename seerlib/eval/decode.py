"""Decode-sparsity quality: teacher-forced perplexity and recall, passkeys under sparse decoding,
and generation lengths, for every decode method at every token budget.

    python -m seerlib.eval.decode --gates data/gates/<decode gate>.safetensors \\
        --lengths 4096,8192 --windows 8 --budgets 256,512,1024,2048 --out bench/results/decode-q

- **Perplexity / recall** (`decode_quality`): each evaluation window is one teacher-forced forward
  (`seerlib.decode.decode_teacher_forced`): every token attends as a decode step under the config.
  `ppl` is over every next-token prediction of the windows; `ppl_late` over the second half's
  (the queries whose past is long enough for a budget to drop blocks: at 4096 tokens, every
  budget up to 2048); recall and tokens read are over the second half too.
- **Passkey** (`decode_passkey`): `seerlib.eval.passkey` inside `sparse_generation`: the prompt is
  prefilled densely, the answer decoded sparsely.
- **Generation length** (`generation_lengths`): greedy continuations of the same prompts until
  EOS or a cap; inaccurate sparsity tends to make them longer (SeerAttention-R).
The text is the evaluation split's (`seerlib.data.token_windows(tok, "eval", ...)`), never the
training text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from seerlib.decode import DecodeConfig, decode_teacher_forced, parse_decode_config
from seerlib.decode.generate import sparse_generation
from seerlib.decode.methods import config_series
from seerlib.eval.passkeys import passkey, passkey_accuracy, passkey_prompt
from seerlib.eval.ppl import _nll

__all__ = ["decode_configs", "decode_passkey", "decode_quality", "generation_lengths",
           "main", "markdown"]


def decode_configs(methods, budgets, block_size: int = 64) -> list[DecodeConfig]:
    """"dense" plus every method at every token budget, e.g. methods ("gate", "quest")."""
    out = [parse_decode_config("dense", block_size)]
    for m in methods:
        out += [parse_decode_config(f"{m}@tok={t}", block_size) for t in budgets]
    return out


def _gates_for(config: DecodeConfig, gates):
    return gates if config.spec.needs_gate else None


@torch.no_grad()
def decode_quality(model, windows: torch.Tensor, configs, gates=None, on_row=None,
                   progress: bool = True) -> list[dict]:
    """Teacher-forced decode perplexity, recall and tokens read of each config.

    Args:
        model: the transformers model.
        windows: (N, S) evaluation token ids.
        configs: DecodeConfigs ("dense" runs the model's own attention).
        gates: the DecodeGateSet for method "gate".
        on_row: called with each finished row.
    Returns:
        one dict per config: label, method, tokens (budget), length, windows, ppl, ppl_late,
        nll, recall, recall_p10 (`DecodeStats.recall_p10`), kept_tokens, context_tokens,
        seconds, and per_layer_recall ({layer: mean recall over the windows}, empty for dense:
        where a gate falls short of the oracle).
    """
    S = windows.shape[1]
    rows = []
    for cfg in configs:
        t0 = time.time()
        nlls, stats, layers = [], None, {}
        for w in range(windows.shape[0]):
            ids = windows[w : w + 1]
            if cfg.spec.sparse:
                with decode_teacher_forced(model, cfg, _gates_for(cfg, gates)) as tf:
                    nlls.append(_nll(model, ids).cpu())
                st = tf.stats.as_dict()
                stats = st if stats is None else {k: stats[k] + st[k] for k in st}
                for layer, r in tf.stats.per_layer_recall.items():
                    layers[layer] = layers.get(layer, 0.0) + r
            else:
                nlls.append(_nll(model, ids).cpu())
        nll = torch.cat(nlls).double()  # (N, S - 1)
        n = windows.shape[0]
        late = nll[:, S // 2 - 1:]  # the predictions made by queries S/2 .. S-2
        row = dict(label=cfg.label, method=cfg.method, tokens=cfg.selection.tokens, length=S,
                   windows=n, ppl=math.exp(nll.mean()), ppl_late=math.exp(late.mean()),
                   nll=float(nll.mean()),
                   recall=stats["recall"] / n if stats else 1.0,
                   recall_p10=stats["recall_p10"] / n if stats else 1.0,
                   kept_tokens=stats["kept_tokens"] / n if stats else (S + S // 2 + 1) / 2,
                   context_tokens=(S + S // 2 + 1) / 2, seconds=time.time() - t0,
                   per_layer_recall={str(i): r / n for i, r in sorted(layers.items())})
        rows.append(row)
        if progress:
            print(f"S={S} {cfg.label}: ppl {row['ppl']:.3f} (late {row['ppl_late']:.3f}) recall "
                  f"{row['recall']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(row)
    return rows


@torch.no_grad()
def decode_passkey(model, tokenizer, configs, lengths, depths, trials: int = 2, gates=None,
                   on_row=None, progress: bool = False) -> list[dict]:
    """Passkey accuracy of each config (dense prefill, sparse decode): one row per (config,
    length, depth) with its accuracy over `trials` keys."""
    rows = []
    for cfg in configs:
        if cfg.spec.sparse:
            with sparse_generation(model, cfg, decode_gates=_gates_for(cfg, gates)):
                trials_ = passkey(model, tokenizer, lengths, depths, trials, progress=progress)
        else:
            trials_ = passkey(model, tokenizer, lengths, depths, trials, progress=progress)
        for (L, d), acc in passkey_accuracy(trials_).items():
            row = dict(label=cfg.label, method=cfg.method, tokens=cfg.selection.tokens, length=L,
                       depth=d, accuracy=acc, trials=trials)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


@torch.no_grad()
def generation_lengths(model, tokenizer, configs, length: int, prompts: int = 4,
                       max_new_tokens: int = 256, gates=None) -> list[dict]:
    """Greedy continuation lengths: `prompts` evaluation-text prompts of `length` tokens (the
    passkey prompt's haystack, asked for its pass key and left to go on), decoded together until
    EOS or `max_new_tokens`. One row per config: mean new tokens, share that hit the cap, and the
    share of tokens equal to the first config's (position by position; `decode_configs` puts
    "dense" first)."""
    device = next(model.parameters()).device
    ids = torch.cat([passkey_prompt(tokenizer, length, 0.5, 10000 + 7919 * i, offset=i * 997)[0]
                     for i in range(prompts)]).to(device)
    rows, first = [], None
    eos = tokenizer.eos_token_id
    for cfg in configs:
        ctx = (sparse_generation(model, cfg, decode_gates=_gates_for(cfg, gates))
               if cfg.spec.sparse else contextlib.nullcontext())
        with ctx:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=eos)
        new = out[:, ids.shape[1]:].cpu()
        ended = (new == eos).int()
        n = torch.where(ended.any(1), ended.argmax(1) + 1, torch.full((prompts,), new.shape[1]))
        if first is None:
            first = new
        m = min(new.shape[1], first.shape[1])
        rows.append(dict(label=cfg.label, method=cfg.method, tokens=cfg.selection.tokens,
                         length=length, prompts=prompts, mean_new_tokens=float(n.double().mean()),
                         hit_cap=float((n >= max_new_tokens).double().mean()),
                         same_as_first=float((new[:, :m] == first[:, :m]).double().mean())))
    return rows


def markdown(results: dict) -> str:
    """The quality tables of a results dict (`main`'s output) as markdown."""
    lines = []
    q = results.get("quality", [])
    for S in sorted({r["length"] for r in q}):
        rows = [r for r in q if r["length"] == S]
        budgets = sorted({r["tokens"] for r in rows if r["tokens"]})
        dense = next((r for r in rows if r["method"] == "dense"), None)
        lines += [f"### {S} tokens: teacher-forced decode perplexity (second half) / recall",
                  "", "| method | " + " | ".join(f"{t} tokens" for t in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        if dense:
            lines.append(f"| dense | {dense['ppl_late']:.3f} (all tokens {dense['ppl']:.3f}) |"
                         + " |" * (len(budgets) - 1))
        for m in dict.fromkeys(config_series(r["label"]) for r in rows if r["method"] != "dense"):
            cells = []
            for t in budgets:
                r = next((r for r in rows if config_series(r["label"]) == m
                          and r["tokens"] == t), None)
                cells.append(f"{r['ppl_late']:.3f} / {r['recall']:.3f}" if r else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    pk = results.get("passkey", [])
    if pk:
        lines += ["### Passkey accuracy (dense prefill, sparse decode)", "",
                  "| config | length | " + " | ".join(
                      f"depth {d:g}" for d in sorted({r['depth'] for r in pk})) + " |",
                  "|---|---|" + "---|" * len({r['depth'] for r in pk})]
        for (label, L) in dict.fromkeys((r["label"], r["length"]) for r in pk):
            cells = [f"{r['accuracy']:.2f}" for r in sorted(
                (r for r in pk if r["label"] == label and r["length"] == L),
                key=lambda r: r["depth"])]
            lines.append(f"| {label} | {L} | " + " | ".join(cells) + " |")
        lines.append("")
    gl = results.get("generation", [])
    if gl:
        lines += ["### Generation length (greedy, until EOS or the cap)", "",
                  "| config | mean new tokens | hit the cap | tokens equal to dense's |",
                  "|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['mean_new_tokens']:.1f} | {r['hit_cap']:.2f} | "
                  f"{r['same_as_first']:.3f} |" for r in gl]
    return "\n".join(lines) + "\n"


def _csv(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s; got "
                                             f"{text!r}") from None
    return parse


def main(argv=None) -> int:
    from seerlib.data import load_model, token_windows  # (lazy: the model loads on demand)
    from seerlib.io import atomic_write_text, fresh_path, load_gates

    p = argparse.ArgumentParser(prog="python -m seerlib.eval.decode", description=__doc__.split(
        "\n")[0])
    p.add_argument("--gates", default=None, help="a decode gate file (method 'gate')")
    p.add_argument("--methods", type=_csv(str), default=["gate", "quest", "sink_window", "oracle"])
    p.add_argument("--budgets", type=_csv(int), default=[256, 512, 1024, 2048])
    p.add_argument("--lengths", type=_csv(int), default=[4096, 8192])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--passkey-lengths", type=_csv(int), default=[])
    p.add_argument("--passkey-budgets", type=_csv(int), default=None)
    p.add_argument("--depths", type=_csv(float), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--generation-length", type=int, default=0,
                   help="prompt length for the generation-length table (0: skip it)")
    p.add_argument("--generation-budgets", type=_csv(int), default=[1024])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="results stem (writes .json and .md); default a "
                   "fresh bench/results/runs/decode-quality-<time>")
    args = p.parse_args(argv)
    try:  # every label checked before the model loads; a gate variant needs the gate file too
        needs_gates = [c.label for c in decode_configs(args.methods, args.budgets[:1] or [1024])
                       if c.method == "gate"]
    except ValueError as e:
        p.error(str(e))
    if needs_gates and not args.gates:
        p.error(f"method {needs_gates[0]!r} needs --gates (a decode gate file)")
    out = Path(args.out) if args.out else fresh_path("bench/results/runs", "decode-quality")
    for suffix in (".json", ".md"):
        if out.with_suffix(suffix).exists():
            p.error(f"{out.with_suffix(suffix)} exists; choose another --out (nothing written)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(device=device)
    gates = (load_gates(args.gates, model, block_size=args.block_size, phase="decode").to(device)
             if args.gates else None)
    results = {"command": "python -m seerlib.eval.decode " + " ".join(
        argv if argv is not None else sys.argv[1:]), "device": str(device),
        "torch": torch.__version__, "gates": args.gates, "quality": [], "passkey": [],
        "generation": []}
    if torch.cuda.is_available():
        results["device_name"] = torch.cuda.get_device_name()

    def save():
        atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1))
        atomic_write_text(out.with_suffix(".md"), markdown(results))

    b = args.block_size
    for S in args.lengths:
        ids = token_windows(tok, "eval", S, n=args.windows)
        decode_quality(model, ids, decode_configs(args.methods, args.budgets, b), gates,
                       on_row=lambda r: (results["quality"].append(r), save()))
    if args.passkey_lengths:
        budgets = args.passkey_budgets or args.budgets
        decode_passkey(model, tok, decode_configs(args.methods, budgets, b),
                       args.passkey_lengths, args.depths, args.trials, gates,
                       on_row=lambda r: (results["passkey"].append(r), save()))
    if args.generation_length:
        results["generation"] = generation_lengths(
            model, tok, decode_configs(args.methods, args.generation_budgets, b),
            args.generation_length, max_new_tokens=args.max_new_tokens, gates=gates)
    save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
