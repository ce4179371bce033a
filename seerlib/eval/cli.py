"""`python -m seerlib.eval ...`: the comparison as JSON + a markdown table.

Results go to a fresh timestamped path (`default_out`) unless `--out` is given. An existing
`--out` is checked before anything runs: it must be a readable results file made under the same
settings (`results.MERGE_KEYS`, gate file), or the run is refused. Should it go bad while the run
goes on (another run, a damaged disk), the run's rows are written beside it and the message says
where; a finished run is never thrown away.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from seerlib.data import MODEL_NAME, load_model
from seerlib.distill import int_at_least, number_in
from seerlib.eval.passkeys import passkey
from seerlib.eval.quality import evaluate
from seerlib.eval.results import ResultsError, _update_results, check_mergeable, markdown
from seerlib.integrate import sparsify
from seerlib.io import fresh_path, load_gates
from seerlib.methods import resolve_config
from seerlib.names import sweep


def default_out() -> Path:
    """Where results go when no --out is given: a fresh path, never a committed table."""
    return fresh_path("bench/results/runs", "quality", ".json").with_suffix("")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seerlib.eval",
        description="Perplexity, recall and passkey of dense, oracle, gate and pattern attention "
                    "on the evaluation text; writes OUT.json and OUT.md (merged with earlier "
                    "runs of the same settings).")
    parser.add_argument("--out", default=None,
                        help="output path without extension (default: a fresh "
                             "bench/results/runs/quality-<UTC time>); an existing one is merged "
                             "into only if made under the same block size, gate file, model, "
                             "dtype and device")
    parser.add_argument("--methods", nargs="*",
                        default=["dense", "oracle-max", "oracle-sum", "sink_window",
                                 "vertical_slash", "gate"],
                        help="series run at every --densities (dense once): a method or label "
                             "without a budget (gate+sink), a series name ('gate+sink relative'), "
                             "a preset (recommended) or a label whose density is replaced")
    parser.add_argument("--densities", nargs="+", type=number_in(0, 1, low_open=True),
                        default=[0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--thresholds", nargs="*", type=number_in(0, 1, high_open=True),
                        default=[], help="gate threshold selections to run")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="extra labels or presets such as gate@0.25, oracle-sum@t=0.01 or "
                             "recommended")
    parser.add_argument("--lengths", nargs="*", type=int_at_least(2), default=[4096, 8192],
                        help="tokens per window (at least 2: one prediction)")
    parser.add_argument("--windows", type=int_at_least(1), default=1,
                        help="eval windows per length")
    parser.add_argument("--offset", type=int_at_least(0), default=0, help="first eval token")
    parser.add_argument("--block-size", type=int_at_least(1), default=64)
    parser.add_argument("--gates", default=None, help="gate file (.safetensors) for gate methods")
    parser.add_argument("--attention", choices=("ops", "flex"), default=None,
                        help="block-sparse path: seerlib.ops or compiled FlexAttention (default: "
                             "flex on CPU, where it is the fast path, ops elsewhere)")
    parser.add_argument("--passkey-methods", nargs="*", default=[],
                        help="labels or presets run through the passkey test, e.g. dense "
                             "gate@0.3 recommended")
    parser.add_argument("--passkey-lengths", nargs="+", type=int_at_least(1),
                        default=[2048, 4096, 8192])
    parser.add_argument("--passkey-depths", nargs="+", type=number_in(0, 1),
                        default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--passkey-trials", type=int_at_least(1), default=1)
    parser.add_argument("--cache", default=None,
                        help="folder for the dense passes' ground-truth maps (reused by reruns "
                             "of the same model, text and block size; any other file is rebuilt)")
    parser.add_argument("--no-recall", action="store_true",
                        help="skip the ground-truth maps (recall; slow on CPU); no oracle methods")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


class _Writer:
    """Merges this run's results into OUT as they come; if OUT cannot take them (gone bad, or
    written meanwhile under other settings), all of this run's results go to a fresh path beside
    it, said on stderr."""

    def __init__(self, out: Path, meta: dict, command: str):
        self.out, self.update = out, {"meta": meta, "command": command}
        self.rows: list[dict] = []
        self.passkey: list[dict] = []

    def __call__(self, rows=(), passkey=()) -> dict:
        self.rows += rows
        self.passkey += passkey
        try:
            return _update_results(self.out, rows=rows, passkey=passkey, **self.update)
        except ResultsError as e:
            old, self.out = self.out, fresh_path(self.out.parent, self.out.name, ".json")
            self.out = self.out.with_suffix("")
            print(f"seerlib.eval: {e}\nseerlib.eval: {old.with_suffix('.json')} is left as it "
                  f"is; this run's results go to {self.out.with_suffix('.json')} instead",
                  file=sys.stderr, flush=True)
            return _update_results(self.out, rows=self.rows, passkey=self.passkey, **self.update)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    b = args.block_size
    if args.attention is None:
        args.attention = "flex" if args.device == "cpu" else "ops"
    configs = [c for m in args.methods
               for c in sweep(m, args.densities, block_size=b, attention=args.attention)]
    labels = [f"gate@t={t:g}" for t in args.thresholds] + args.configs
    configs += [resolve_config(s, b, args.attention) for s in labels]
    pk_configs = [resolve_config(s, b, args.attention) for s in args.passkey_methods]
    needs_gate = any(c.spec.needs_gate for c in configs + pk_configs)
    if needs_gate and not args.gates:
        raise SystemExit("gate methods need --gates PATH (a file written by seerlib.io)")

    out = Path(args.out) if args.out is not None else default_out()
    command = "python -m seerlib.eval " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
    meta = dict(model=MODEL_NAME, text="KJV eval split (Isaiah, Luke, Acts)", block_size=b,
                attention=args.attention, torch=torch.__version__, device=args.device,
                dtype=args.dtype)
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    if args.gates:
        meta["gates"] = args.gates
        if Path(args.gates).is_file():
            meta["gates_sha256"] = hashlib.sha256(Path(args.gates).read_bytes()).hexdigest()
    try:  # before anything runs: a run that could not be written is not started
        check_mergeable(out.with_suffix(".json"), meta)
    except ResultsError as e:
        raise SystemExit(f"seerlib.eval: {e}; nothing was run") from e

    import torch._dynamo as dynamo  # lazy: ~2 s to import, needed only here

    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    model, tok = load_model(dtype=getattr(torch, args.dtype), device=args.device)
    gates = None
    if needs_gate:
        gates = load_gates(args.gates, model, block_size=b).to(args.device)

    write = _Writer(out, meta, command)
    cache = Path(args.cache) if args.cache else None
    if configs and args.lengths:
        evaluate(model, tok, configs, args.lengths, args.windows, gates=gates, block_size=b,
                 offset=args.offset, cache=cache, on_row=lambda row: write(rows=[row]),
                 recall=not args.no_recall)
    for c in pk_configs:
        for L in args.passkey_lengths:
            with sparsify(model, c, gates=gates if c.spec.needs_gate else None) as sp:
                trials = passkey(model, tok, [L], args.passkey_depths, args.passkey_trials)
            dens = sp.stats.achieved_density  # over every prefill at this length
            write(passkey=[dict(asdict(t), method=c.label, density=dens) for t in trials])
            print(f"passkey {c.label} L={L}: " + ", ".join(
                f"{t.depth:g}:{'ok' if t.correct else repr(t.answer)}" for t in trials),
                file=sys.stderr, flush=True)
    results = write()
    print(markdown(results))
    print(f"seerlib.eval: results in {write.out.with_suffix('.json')} and "
          f"{write.out.with_suffix('.md')}", file=sys.stderr)
