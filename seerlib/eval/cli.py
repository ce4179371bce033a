"""`python -m seerlib.eval ...`: the comparison as JSON + a markdown table.

The model is `--model` as the cache holds it (SmolLM2 by default, or Gemma 3 270M; a gate file
made for another model is refused naming both), or (issue 16) changed before anything else runs:
`--context N` extends it by YaRN to N tokens (`seerlib.yarn.extend_context`, factor N over its
original context), then `--model-diff PATH` loads a fine-tuned model's changed tensors
(`seerlib.finetune.apply_model_diff`, which refuses a diff made for another base, weights or
config), and only then are the gates loaded (a gate file records the config hash, YaRN settings
included). Both happen in float32, before the cast to `--dtype`; the rotary buffers of an
extended model are rebuilt in float32 after it (`seerlib.yarn.rebuild_rotary`). `--text` picks
the evaluation split (`seerlib.longtext.TEXTS`; the long-text cache is checked before the model
loads). The context, the diff (sha256 of the file and its metadata) and the text are in the
results' meta, and results of another context, diff or text are never merged into a file.

Results go to a fresh timestamped path (`default_out`) unless `--out` is given. An existing
`--out` is checked before anything runs: it must be a readable results file made under the same
settings (`results.MERGE_KEYS`, gate file), or the run is refused. Should it go bad while the run
goes on (another run, a damaged disk), the run's rows are written beside it and the message says
where; a finished run is never thrown away.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from seerlib import longtext
from seerlib.data import DataError, load_model
from seerlib.distill import int_at_least, number_in
from seerlib.eval.passkeys import passkey
from seerlib.eval.quality import evaluate
from seerlib.eval.results import ResultsError, _update_results, check_mergeable, markdown
from seerlib.finetune.diff import FORMAT as DIFF_FORMAT
from seerlib.finetune.diff import apply_model_diff
from seerlib.integrate import sparsify
from seerlib.io import GateFileError, file_sha256, fresh_path, load_gates, read_metadata
from seerlib.methods import resolve_config
from seerlib.models import (
    add_model_argument,
    check_gate_file_model,
    get_model,
    resolve_model_argument,
)
from seerlib.names import sweep
from seerlib.targets import model_fingerprint
from seerlib.yarn import extend_context, original_context, rebuild_rotary


def default_out() -> Path:
    """Where results go when no --out is given: a fresh path, never a committed table."""
    return fresh_path("bench/results/runs", "quality", ".json").with_suffix("")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seerlib.eval",
        description="Perplexity, recall and passkey of dense, oracle, gate and pattern attention "
                    "on the evaluation text; writes OUT.json and OUT.md (merged with earlier "
                    "runs of the same settings).")
    add_model_argument(parser)
    parser.add_argument("--context", type=int_at_least(1), default=None,
                        help="extend the model by YaRN to this many tokens first (factor: over "
                             "its original context, 8192 for SmolLM2); gates and a model diff "
                             "must be made for the extended model")
    parser.add_argument("--model-diff", default=None,
                        help="a fine-tuned model's diff against the base (<out>.model.safetensors "
                             "of python -m seerlib.finetune), applied after --context")
    parser.add_argument("--text", default="kjv", choices=longtext.TEXTS,
                        help="evaluation split: the King James text (default), the long "
                             "documents (`make longtext`), or both")
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


def _check_model_args(parser, args) -> dict:
    """Refuse a missing text cache or a model diff that is absent, foreign or made for another
    context, before the model loads; returns the diff's metadata ({} without one)."""
    try:
        longtext.check_text(args.text, splits=("eval",))
    except DataError as e:
        parser.error(f"--text {args.text}: {e}")
    if args.model_diff is None:
        return {}
    path = Path(args.model_diff)
    if not path.is_file():
        parser.error(f"--model-diff {path}: no such file; expected the <out>.model.safetensors "
                     "that python -m seerlib.finetune writes")
    try:
        meta = read_metadata(path)
    except (GateFileError, ValueError, OSError) as e:
        parser.error(f"--model-diff {path}: {e}")
    if meta.get("format") != DIFF_FORMAT:
        parser.error(f"--model-diff {path} has format {meta.get('format')!r}; expected "
                     f"{DIFF_FORMAT!r} (a model diff written by python -m seerlib.finetune)")
    made_at = meta.get("max_position_embeddings") if meta.get("yarn_factor") else None
    if made_at != args.context:
        made, fix = ((f"a model extended by YaRN to {made_at} tokens (factor "
                      f"{meta['yarn_factor']})", f"pass --context {made_at}") if made_at else
                     ("the model at its own context", "leave out --context"))
        parser.error(f"--model-diff {path} was made for {made}; {fix} (this run: --context "
                     f"{args.context})")
    return meta


def _load(args, diff_meta: dict):
    """(model, tokenizer, facts for the meta): loaded in float32, extended by YaRN (--context),
    the model diff applied; still float32 (the diff's base sha256 is of float32 weights)."""
    model, tok = load_model(dtype=torch.float32, device=args.device, name=args.model)
    facts = {}
    if args.context is not None:
        try:
            orig = original_context(model.config)
            if args.context <= orig:
                raise ValueError(f"not above the model's original context of {orig} tokens")
            rope = extend_context(model, args.context / orig)
        except ValueError as e:
            raise SystemExit(f"seerlib.eval: --context {args.context}: {e}; nothing was "
                             "run") from e
        facts.update(yarn_factor=rope["factor"], rope_parameters=rope)
    if args.model_diff is not None:
        try:
            apply_model_diff(model, args.model_diff)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"seerlib.eval: --model-diff {args.model_diff}: {e}; nothing was "
                             "run") from e
        facts.update(model_diff_steps=diff_meta.get("steps"), model_diff_meta=diff_meta)
    return model, tok, facts


def _gates_model_warning(gates_path, weights_sha256: str) -> str | None:
    """A warning when the gate file says it was trained on other weights than these (a gate
    distilled on the base read by a fine-tuned model, or the other way round), else None."""
    want = read_metadata(gates_path).get("model_sha256")
    if not want or want == weights_sha256:
        return None
    return (f"seerlib.eval: warning: {gates_path} was trained on a model whose weights hash to "
            f"{want[:16]}...; this model's hash to {weights_sha256[:16]}... (a gate made on "
            "another model or before a fine-tune: pass the --model-diff it was trained with)")


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
    args.model = resolve_model_argument(args.model)
    model_info = get_model(args.model)
    if needs_gate and Path(args.gates).is_file():
        try:  # before the model loads: a gate file of another model names both
            check_gate_file_model(args.gates, model_info)
        except ValueError as e:
            parser.error(str(e))
    longest = max([*args.lengths, *(args.passkey_lengths if pk_configs else [])], default=0)
    if args.context is not None and longest > args.context:
        parser.error(f"--lengths/--passkey-lengths reach {longest} tokens, beyond --context "
                     f"{args.context}")
    diff_meta = _check_model_args(parser, args)

    out = Path(args.out) if args.out is not None else default_out()
    command = "python -m seerlib.eval " + " ".join(shlex.quote(a) for a in
                                                   (argv if argv is not None else sys.argv[1:]))
    meta = dict(model=model_info.model_name, text=longtext.describe_text(args.text, "eval"),
                block_size=b, attention=args.attention, torch=torch.__version__, device=args.device,
                dtype=args.dtype)
    if args.context is not None:
        meta["context"] = args.context
    if args.model_diff is not None:
        meta["model_diff"] = args.model_diff
        meta["model_diff_sha256"] = file_sha256(Path(args.model_diff))
    if pk_configs:
        meta["passkey_haystack"] = longtext.describe_text("kjv", "eval")
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    if args.gates:
        meta["gates"] = args.gates
        if Path(args.gates).is_file():
            meta["gates_sha256"] = file_sha256(Path(args.gates))
    try:  # before anything runs: a run that could not be written is not started
        check_mergeable(out.with_suffix(".json"), meta)
    except ResultsError as e:
        raise SystemExit(f"seerlib.eval: {e}; nothing was run") from e

    import torch._dynamo as dynamo  # lazy: ~2 s to import, needed only here

    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    model, tok, facts = _load(args, diff_meta)
    ctx = model.config.max_position_embeddings
    if longest > ctx:
        raise SystemExit(f"seerlib.eval: --lengths/--passkey-lengths reach {longest} tokens, "
                         f"beyond the model's context of {ctx} (extend it with --context); "
                         "nothing was run")
    meta.update(facts)
    weights_sha = model_fingerprint(model) if needs_gate else None  # float32, as gates record it
    model = model.to(dtype=getattr(torch, args.dtype))
    if args.context is not None:
        rebuild_rotary(model)  # the cast rounded inv_freq; YaRN's frequencies stay float32
    gates = None
    if needs_gate:
        try:
            gates = load_gates(args.gates, model, block_size=b).to(args.device)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"seerlib.eval: --gates {args.gates}: {e} (gate files record the "
                             "config hash of the model they were made for, YaRN settings "
                             "included); nothing was run") from e
        warning = _gates_model_warning(args.gates, weights_sha)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    write = _Writer(out, meta, command)
    cache = Path(args.cache) if args.cache else None
    if configs and args.lengths:
        evaluate(model, tok, configs, args.lengths, args.windows, gates=gates, block_size=b,
                 offset=args.offset, cache=cache, on_row=lambda row: write(rows=[row]),
                 recall=not args.no_recall, text=args.text)
    failed = []  # (label, length, error): the other methods still run, then the exit says
    for c in pk_configs:
        for L in args.passkey_lengths:
            try:
                with sparsify(model, c, gates=gates if c.spec.needs_gate else None) as sp:
                    trials = passkey(model, tok, [L], args.passkey_depths, args.passkey_trials)
            except Exception as e:  # noqa: BLE001 - named in the exit status below, not dropped
                failed.append((c.label, L, f"{type(e).__name__}: {e}"))
                print(f"seerlib.eval: passkey {c.label} L={L} failed:\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                continue
            dens = sp.stats.achieved_density  # over every prefill at this length
            write(passkey=[dict(asdict(t), method=c.label, density=dens) for t in trials])
            print(f"passkey {c.label} L={L}: " + ", ".join(
                f"{t.depth:g}:{'ok' if t.correct else repr(t.answer)}" for t in trials),
                file=sys.stderr, flush=True)
    results = write()
    print(markdown(results))
    where = f"{write.out.with_suffix('.json')} and {write.out.with_suffix('.md')}"
    if failed:
        raise SystemExit("seerlib.eval: " + "; ".join(
            f"passkey {label} at {L} tokens failed ({err})" for label, L, err in failed)
            + f"; the other rows are in {where}")
    print(f"seerlib.eval: results in {where}", file=sys.stderr)
