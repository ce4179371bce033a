"""`python -m seerlib.finetune`: fine-tune a (YaRN-extended) model with sparsity in the loop.
The method and its outputs: the package docstring (`seerlib.finetune`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seerlib import longtext
from seerlib.data import MODEL_NAME, load_model
from seerlib.distill.cli import (
    _positive_float,
    _windows,
    int_at_least,
    number_in,
    refuse_earlier_run,
    tiny_model,
)
from seerlib.distill.train import TINY_MODEL, DivergedError
from seerlib.finetune.checkpoint import (
    checkpoint_path,
    load_finetune_checkpoint,
    read_finetune_checkpoint,
    save_finetune_checkpoint,
)
from seerlib.finetune.diff import apply_model_diff, base_snapshot, save_model_diff
from seerlib.finetune.train import (
    ATTENTION_MODES,
    PRECISIONS,
    TRAIN_PARTS,
    FinetuneConfig,
    FineTuner,
)
from seerlib.gate import GateSet
from seerlib.io import file_sha256, fresh_path, load_gates, save_gates
from seerlib.methods import resolve_config
from seerlib.targets import TARGETS, default_target, model_fingerprint
from seerlib.yarn import extend_context, load_extended, original_context

__all__ = ["default_finetune_out", "main", "run_options", "run_paths"]

PROG = "seerlib.finetune"
DEFAULT_SPARSE = "gate@0.5"  # the paper's long-context fine-tune ran at 50% density
TEXTS = longtext.TEXTS
# The options a resumed call must repeat (its checkpoint records them): what the run trains on,
# how, and from what. --steps may grow (a finished run goes on; the cosine schedule then follows
# the new length); --device, --save-dtype, --checkpoint-every and --quiet may change.
FIXED_OPTIONS = ("model", "context", "seq_len", "text", "train_windows", "eval_windows",
                 "eval_every", "batch_size", "lr", "gate_lr", "warmup", "clip", "train",
                 "attention", "sparse", "gates", "model_diff", "block_size", "target",
                 "precision", "gradient_checkpointing", "seed")


def default_finetune_out() -> Path:
    """The gate file of a run given no --out: a fresh, timestamped path in data/gates/runs/."""
    return fresh_path("data/gates/runs", "finetune", ".safetensors")


def run_paths(out) -> tuple[Path, Path, Path]:
    """(gates, model diff, loss log) of a run whose gate file is `out`."""
    out = Path(out)
    return (out, out.with_name(out.stem + ".model.safetensors"),
            out.with_name(out.stem + ".loss.jsonl"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seerlib.finetune",
        description="Fine-tune a model and/or its gates on long windows: LM loss through the "
        "gate's block selection and the block-sparse kernel, plus the gate's distillation loss.")
    p.add_argument("--model", default="smollm2", choices=["smollm2", TINY_MODEL])
    p.add_argument("--context", type=int_at_least(0), default=32768,
                   help="extend the model by YaRN to this many tokens (0: keep its context)")
    p.add_argument("--seq-len", type=int_at_least(1), default=32768)
    p.add_argument("--text", default="longtext", choices=TEXTS,
                   help="the long documents (seerlib.longtext, `make longtext`), with the King "
                   "James text, or the King James text alone; the train split trains, the eval "
                   "split evaluates")
    p.add_argument("--train-windows", type=int_at_least(1), default=None,
                   help="windows of the train split (default: all that fit; 4 for the tiny model)")
    p.add_argument("--eval-windows", type=int_at_least(0), default=0,
                   help="held-out windows of the eval split for the eval LM loss")
    p.add_argument("--eval-every", type=int_at_least(0), default=0)
    p.add_argument("--steps", type=int_at_least(0), default=400)
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="windows per step, run one at a time (gradients accumulated)")
    p.add_argument("--lr", type=_positive_float, default=1e-5, help="the model's learning rate")
    p.add_argument("--gate-lr", type=_positive_float, default=1e-4)
    p.add_argument("--warmup", type=int_at_least(0), default=20)
    p.add_argument("--clip", type=number_in(0, 1e6), default=1.0,
                   help="the model's gradient-norm clip (0: none)")
    p.add_argument("--train", default="both", choices=TRAIN_PARTS, help="what trains; the rest "
                   "is frozen")
    p.add_argument("--attention", default="sparse", choices=ATTENTION_MODES,
                   help="sparse: through the sparse configuration (--sparse); dense: the model's "
                   "own attention")
    p.add_argument("--sparse", default=None,
                   help=f"the sparse configuration, a preset or label (default {DEFAULT_SPARSE})")
    p.add_argument("--gates", default=None, help="start from this gate file (made for the "
                   "extended model); default: fresh gates built after extending")
    p.add_argument("--model-diff", default=None,
                   help="start from a fine-tuned model: this diff (made by an earlier run, for "
                   "the same --context) applied to the base; this run's diff is again against "
                   "the base")
    p.add_argument("--block-size", type=int_at_least(1), default=None,
                   help="block size of fresh gates (default 64)")
    p.add_argument("--target", default=None, choices=list(TARGETS),
                   help="the gate's ground truth (default: kernel on CUDA, exact on CPU)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="fp32, or amp: fp32 weights under bf16 autocast (default: amp on CUDA)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder layers in the backward pass (needed at 32k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None,
                   help="the trained gate file (default: a fresh data/gates/runs/finetune-<UTC "
                   "time>.safetensors); the model diff <out>.model.safetensors, the loss log "
                   "<out>.loss.jsonl and the checkpoint <out>.ckpt.safetensors sit beside it. An "
                   "earlier run there is refused unless --resume continues it")
    p.add_argument("--checkpoint-every", type=int_at_least(0), default=0,
                   help="write the checkpoint every this many steps and at the end (0: none); "
                   "it holds the model's and gates' trained tensors and optimizer state, about 3x "
                   "the trained weights' size")
    p.add_argument("--resume", action="store_true",
                   help="continue the run at --out from its checkpoint, with the same options "
                   "(--steps may grow); the loss log is appended to")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                   help="the gate file's dtype (the model diff keeps the trained dtype)")
    p.add_argument("--quiet", action="store_true")
    return p


def _check_args(parser, args) -> None:
    """Refuse contradictory options before anything is loaded."""
    if args.attention == "dense" and args.sparse is not None:
        parser.error("--sparse configures the sparse attention; --attention dense runs the "
                     "model's own")
    args.sparse = args.sparse or DEFAULT_SPARSE
    if args.attention == "sparse":
        try:
            cfg = resolve_config(args.sparse)
        except ValueError as e:
            parser.error(f"--sparse {args.sparse!r}: {e}")
        if not cfg.spec.sparse:
            parser.error(f"--sparse {args.sparse!r} keeps every block; use --attention dense")
        needs_gate = cfg.spec.needs_gate
    else:
        needs_gate = False
    if args.gates is not None and args.block_size is not None:
        parser.error("--block-size is for fresh gates; a gate file (--gates) has its own")
    if args.train == "model" and needs_gate and args.gates is None:
        parser.error(f"--train model with --sparse {args.sparse!r} would select blocks with "
                     "fresh gates that never learn: pass distilled --gates, or --train both")
    if args.gates is not None and not (needs_gate or args.train != "model"):
        parser.error("--gates is unused: nothing reads or trains a gate in this run")
    if args.eval_every and not args.eval_windows:
        parser.error("--eval-every needs --eval-windows")


def run_options(args) -> dict:
    """{"--seq-len": 32768, ...}: the FIXED_OPTIONS as this call resolved them, and the sha256
    of the --gates and --model-diff files (None when not given or missing)."""
    opts = {"--" + name.replace("_", "-"): getattr(args, name) for name in FIXED_OPTIONS}
    for flag, path in (("--gates", args.gates), ("--model-diff", args.model_diff)):
        opts[f"{flag} sha256"] = file_sha256(path) if path and Path(path).is_file() else None
    return opts


def _resume_point(args, paths, ckpt: Path, options: dict) -> dict:
    """The checkpoint's metadata, once it is found to continue this call's run (its options, a
    --steps not below its step, a loss log at least as long as at its step); else SystemExit,
    nothing changed."""
    curve = paths[-1]
    if not ckpt.exists():
        there = [str(p) for p in paths if p.exists()]
        why = (f"the run there ({', '.join(there)}) wrote none (it ran without --checkpoint-every "
               "or stopped before its first checkpoint): remove its files to start over, or "
               "choose another --out" if there else "start the run without --resume")
        raise SystemExit(f"{PROG}: --resume found no checkpoint at {ckpt}; {why} (nothing was "
                         "changed)")
    try:
        meta = read_finetune_checkpoint(ckpt, options)
    except ValueError as e:
        raise SystemExit(f"{PROG}: --resume: {e} (nothing was changed)") from e
    step, log_bytes = meta["state"]["step"], meta["state"]["log_bytes"]
    if args.steps < step:
        raise SystemExit(f"{PROG}: --steps {args.steps} is below step {step} of the checkpoint "
                         f"{ckpt}; pass --steps {step} or more (nothing was changed)")
    log = curve.read_bytes() if curve.exists() else b""
    lines = log[:log_bytes].count(b"\n")
    if len(log) < log_bytes or lines != step:
        raise SystemExit(f"{PROG}: the loss log {curve} does not lead to the checkpoint's step "
                         f"{step}: it holds {len(log)} bytes, {lines} lines in its first "
                         f"{log_bytes}; expected {step} lines in {log_bytes} bytes, as at the "
                         "checkpoint. Restore it (nothing was changed)")
    return meta


def _load(parser, args):
    """(model, tokenizer, model name), extended by YaRN to --context when asked."""
    try:
        if args.model == TINY_MODEL:
            model, tok = tiny_model().to(args.device), None
            if args.context:
                orig = original_context(model.config)
                if args.context <= orig:
                    raise ValueError(f"context {args.context} is not above the model's original "
                                     f"{orig} tokens")
                extend_context(model, args.context / orig)
        elif args.context:
            model, tok = load_extended(context=args.context, device=args.device)
        else:
            model, tok = load_model(device=args.device)
    except ValueError as e:
        parser.error(f"--context {args.context}: {e}")
    ctx = model.config.max_position_embeddings
    if args.seq_len > ctx:
        parser.error(f"--seq-len {args.seq_len} is longer than the model's context {ctx} "
                     "(extend it with --context)")
    return model, tok, TINY_MODEL if args.model == TINY_MODEL else MODEL_NAME


def _text_windows(args, model_name, tok, split: str, n) -> torch.Tensor:
    if model_name == TINY_MODEL:
        return _windows(args, model_name, tok, split, n)  # random ids
    return longtext.text_windows(tok, args.text, split, args.seq_len, n)


def _gates(args, model, model_name, needed: bool):
    if args.gates is not None:
        try:
            return load_gates(args.gates, model)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{PROG}: --gates {args.gates}: {e} (gate files record the config "
                             "hash of the model they were made for, YaRN settings included)") from e
    if not needed:
        return None
    return GateSet.from_config(model.config, block_size=args.block_size or 64,
                               model_name=model_name)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.resume and args.out is None:
        parser.error("--resume needs --out: the gate file of the run to continue")
    paths = run_paths(args.out or default_finetune_out())
    (out, diff_path, curve), ckpt = paths, checkpoint_path(paths[0])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    args.target = args.target or default_target(args.device)
    args.precision = args.precision or ("amp" if cuda else "fp32")
    if args.train_windows is None and args.model == TINY_MODEL:
        args.train_windows = 4
    options = run_options(args) if args.resume or args.checkpoint_every else None
    if args.resume:
        resumed = _resume_point(args, paths, ckpt, options)
    else:
        refuse_earlier_run(PROG, out, (*paths, ckpt), resumable=ckpt.exists())
        resumed = None
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    model, tok, model_name = _load(parser, args)
    needs_gate = args.attention == "sparse" and resolve_config(args.sparse).spec.needs_gate
    gates = _gates(args, model, model_name, needed=needs_gate or args.train != "model")
    train = _text_windows(args, model_name, tok, "train", args.train_windows)
    ev = (_text_windows(args, model_name, tok, "eval", args.eval_windows)
          if args.eval_windows else None)
    base_sha = model_fingerprint(model)
    base = base_snapshot(model) if args.train != "gate" else None
    if args.model_diff is not None:
        try:
            apply_model_diff(model, args.model_diff)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{PROG}: --model-diff {args.model_diff}: {e}") from e
    cfg = FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr,
        warmup=args.warmup, clip=args.clip, train=args.train, attention=args.attention,
        sparse=args.sparse, target=args.target, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
        seed=args.seed)
    torch.manual_seed(args.seed)
    tuner = FineTuner(model, train, cfg, gates=gates, eval_windows=ev, device=args.device)
    say(f"{model_name}: context {model.config.max_position_embeddings}, {len(train)} train "
        f"windows of {args.seq_len}, train {args.train}, attention "
        f"{args.sparse if args.attention == 'sparse' else 'dense'}, base sha256 {base_sha[:16]}")
    if resumed is not None:
        try:
            load_finetune_checkpoint(ckpt, tuner, options, base_sha256=base_sha)
        except ValueError as e:
            raise SystemExit(f"{PROG}: --resume: {e} (nothing was changed)") from e
        if curve.exists():  # drop the lines of steps after the checkpoint: they run again
            with curve.open("r+b") as f:
                f.truncate(resumed["state"]["log_bytes"])
        say(f"resumed from {ckpt} at step {tuner.step}")
    out.parent.mkdir(parents=True, exist_ok=True)
    saved_at = tuner.step if resumed is not None else None  # the step the checkpoint holds

    def checkpoint():
        save_finetune_checkpoint(ckpt, tuner, options, base_sha,
                                 log_bytes=curve.stat().st_size if curve.exists() else 0)
        return tuner.step

    t0 = time.time()
    try:
        for m in tuner.steps():
            with curve.open("a") as f:  # new (refuse_earlier_run) or resumed: appended to
                f.write(json.dumps(m) + "\n")
            if m["step"] % 10 == 0 or m["step"] == cfg.steps or "eval_lm_loss" in m:
                gl = "" if m["gate_loss"] is None else f" gate {m['gate_loss']:.4f}"
                ev_txt = f" eval lm {m['eval_lm_loss']:.4f}" if "eval_lm_loss" in m else ""
                say(f"step {m['step']:5d} lm {m['lm_loss']:.4f}{gl} density {m['density']:.3f} "
                    f"{m['tokens_per_s']:.0f} tok/s{ev_txt} ({time.time() - t0:.0f}s)")
            if args.checkpoint_every and m["step"] % args.checkpoint_every == 0:
                saved_at = checkpoint()
    except DivergedError as e:
        last = f"; the last checkpoint is {ckpt}" if ckpt.exists() else ""
        raise SystemExit(f"{PROG}: {e}. Nothing was saved to {out} or {diff_path}{last}.") from e
    if args.checkpoint_every and saved_at != tuner.step:
        checkpoint()
    last = tuner.history[-1] if tuner.history else {}
    command = f"python -m seerlib.finetune {' '.join(argv if argv is not None else sys.argv[1:])}"
    facts = dict(steps=tuner.step, tokens_seen=tuner.tokens_seen, seq_len=args.seq_len,
                 train_windows=len(train), text=args.text, finetune=tuner.state()["config"],
                 final_lm_loss=last.get("lm_loss"), final_eval_lm_loss=last.get("eval_lm_loss"),
                 base_model_sha256=base_sha, command=command)
    if cfg.trains_model:
        meta = save_model_diff(model, base, diff_path, base_sha, start_diff=args.model_diff,
                               gates_file=str(out) if cfg.trains_gate else args.gates, **facts)
        say(f"saved {diff_path} ({diff_path.stat().st_size / 1e6:.1f} MB, "
            f"{meta['changed_tensors']} of {meta['total_tensors']} tensors changed)")
    if cfg.trains_gate:
        meta = save_gates(gates, out, dtype=getattr(torch, args.save_dtype),
                          final_loss=last.get("gate_loss"), target=args.target,
                          model_sha256=model_fingerprint(model),
                          model_diff=str(diff_path) if cfg.trains_model else args.model_diff,
                          **facts)
        say(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
