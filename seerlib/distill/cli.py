"""`python -m seerlib.distill`: the distillation CLI (single process or under torchrun), its
argument types, and the tiny random Llama that tests and smoke runs train on."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from seerlib.data import load_model, token_windows
from seerlib.decode.gate import DecodeGateSet
from seerlib.distill.decode import DecodeDistiller
from seerlib.distill.train import (
    TINY_MODEL,
    DistillConfig,
    Distiller,
    DivergedError,
    _dist,
)
from seerlib.families import family_of
from seerlib.gate import POOL_OPS, GateSet
from seerlib.io import fresh_path, save_gates
from seerlib.models import add_model_argument, get_model, resolve_model_argument
from seerlib.targets import (
    TARGETS,
    WindowCache,
    build_cache,
    cache_folder,
    decode_target_source,
    model_fingerprint,
)

__all__ = ["default_out", "int_at_least", "main", "number_in", "refuse_earlier_run", "tiny_config",
           "tiny_model"]


def tiny_config(**overrides):
    """The config of a tiny Llama (2 layers, 4 q heads, 2 kv heads, d 16); keywords override it."""
    from transformers import LlamaConfig  # lazy: seconds to import; only tests need it

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=4096,
        initializer_range=0.2,
    )
    return LlamaConfig(**{**base, **overrides})


def tiny_model(seed: int = 0):
    """A tiny random Llama (`tiny_config()`) for tests and smoke runs."""
    from transformers import LlamaForCausalLM  # lazy, as in tiny_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    return model


def _windows(args, model_name: str, tokenizer, split: str, n: int) -> torch.Tensor:
    if model_name == TINY_MODEL:
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        return torch.randint(0, 211, (n, args.seq_len), generator=g)

    return token_windows(tokenizer, split, args.seq_len, n)


def int_at_least(low: int):
    """An argparse type: an integer >= low, refused with a message that says so."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text}")
        return v

    return parse


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type: a number in [low, high] (an open end excludes it), refused with a
    message that names the interval."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
        if not ok:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be a number in {interval}; got {text}")
        return v

    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return v


def _pool_ops(text: str) -> tuple[str, ...]:
    ops = tuple(text.split(","))
    bad = [op for op in ops if op not in POOL_OPS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"got {text!r}: {', '.join(map(repr, bad))} is not one of {', '.join(POOL_OPS)} "
            "(comma-separated)"
        )
    if len(set(ops)) != len(ops):
        raise argparse.ArgumentTypeError(f"got {text!r}: each op may appear once")
    return ops


def default_out() -> Path:
    """Where a run writes its gates when no --out is given: a fresh, timestamped path."""
    return fresh_path("data/gates/runs", "gates", ".safetensors")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seerlib.distill",
        description="Train SeerAttention gates by self-distillation (single process or torchrun).",
    )
    add_model_argument(p, extra=(TINY_MODEL,))
    p.add_argument("--block-size", type=int_at_least(1), default=64)
    p.add_argument("--seq-len", type=int_at_least(1), default=2048)
    p.add_argument(
        "--train-windows", type=int_at_least(1), default=256, help="windows of the train split"
    )
    p.add_argument(
        "--eval-windows", type=int_at_least(0), default=0, help="held-out windows of the eval split"
    )
    p.add_argument("--steps", type=int_at_least(0), default=300)
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=4, help="global batch (windows per step)"
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--warmup", type=int_at_least(0), default=20)
    p.add_argument("--eval-every", type=int_at_least(0), default=0)
    p.add_argument("--phase", default="prefill", choices=["prefill", "decode"],
                   help="prefill: the SeerAttention gate (cached targets); decode: the "
                   "SeerAttention-R decode gate (targets computed in the loop, see --rows)")
    p.add_argument("--rows", type=int_at_least(1), default=1024,
                   help="decode phase: query rows per window sampled for the loss each step")
    p.add_argument("--decode-target", default="max", choices=["max", "mass"],
                   help="decode phase: the target's pooling, max (SeerAttention-R's) or mass "
                   "(each block's share of the group's attention; computed exactly, --target "
                   "exact)")
    p.add_argument("--q-pool", type=_pool_ops, default=None,
                   help="prefill phase: comma-separated ops of avg,max,min (default avg)")
    p.add_argument("--k-pool", type=_pool_ops, default=("max", "min", "avg"))
    p.add_argument("--d-gate", type=int_at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="the trained gate file (default: a fresh data/gates/runs/gates-<UTC time>.safetensors)"
        "; its loss log <out>.loss.jsonl and checkpoint <out>.ckpt.safetensors sit beside it. An "
        "existing run there is refused unless --resume continues it",
    )
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument(
        "--checkpoint", default=None, help="training checkpoint path (default: <out>.ckpt)"
    )
    p.add_argument("--checkpoint-every", type=int_at_least(0), default=50)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run at --out from its checkpoint if present (the loss log is "
        "appended to)",
    )
    p.add_argument(
        "--cache-root", default=None, help="cache root (default: seerlib.data.cache_dir())"
    )
    p.add_argument("--cache-only", action="store_true", help="build the cache and stop")
    p.add_argument("--preload", action="store_true", help="hold the whole cache in memory")
    p.add_argument(
        "--backend",
        default=None,
        choices=["gloo", "nccl"],
        help="torch.distributed backend under torchrun (default: nccl on GPU, else gloo)",
    )
    p.add_argument(
        "--device", default=None, help="default: cuda:<local rank> if available, else cpu"
    )
    p.add_argument(
        "--target",
        default=None,
        choices=list(TARGETS),
        help="ground truth: the pooled_attention kernel (bf16, one attention pass) or the exact "
        "fp32 map (default: kernel on CUDA, exact on CPU)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def refuse_earlier_run(prog: str, out: Path, paths, resumable: bool = True) -> None:
    """Exit (SystemExit, nothing changed) when any of a new run's `paths` exists already."""
    there = [str(p) for p in paths if Path(p).exists()]
    if there:
        hint = "pass --resume to continue it, or choose" if resumable else "choose"
        raise SystemExit(f"{prog}: an earlier run is at {', '.join(there)}; {hint} another --out "
                         f"(nothing was changed). --out was {out}")


def _run_paths(parser, args) -> tuple[Path, Path, Path]:
    """(gates, checkpoint, loss log) of the run, refusing to replace or empty an earlier one."""
    if args.out is None and args.resume:
        parser.error("--resume needs --out: the gate file of the run to continue")
    out = Path(args.out) if args.out is not None else default_out()
    ckpt = (
        Path(args.checkpoint) if args.checkpoint else out.with_name(out.stem + ".ckpt.safetensors")
    )
    curve = out.with_name(out.stem + ".loss.jsonl")
    if args.cache_only:
        return out, ckpt, curve
    if not args.resume:
        refuse_earlier_run("seerlib.distill", out, (out, ckpt, curve))
    elif out.exists() and not ckpt.exists():
        raise SystemExit(
            f"seerlib.distill: --resume found no checkpoint at {ckpt}, so the run would start "
            f"over and replace {out}; restore the checkpoint or choose another --out (nothing "
            "was changed)"
        )
    return out, ckpt, curve


def _prefill_distiller(args, cfg, model, model_name, folders) -> Distiller:
    gates = GateSet.from_config(model.config, block_size=cfg.block_size, q_pool=cfg.q_pool,
                                k_pool=cfg.k_pool, d_gate=cfg.d_gate, model_name=model_name)
    eval_cache = (WindowCache(folders["eval"], args.eval_windows, args.preload)
                  if "eval" in folders else None)
    return Distiller(gates, WindowCache(folders["train"], args.train_windows, args.preload), cfg,
                     eval_cache=eval_cache, device=args.device)


def _decode_distiller(args, cfg, model, model_name, tokenizer) -> DecodeDistiller:
    gates = DecodeGateSet.from_config(model.config, block_size=cfg.block_size, k_pool=cfg.k_pool,
                                      d_gate=cfg.d_gate, model_name=model_name)
    ev = (_windows(args, model_name, tokenizer, "eval", args.eval_windows)
          if args.eval_windows else None)
    return DecodeDistiller(gates, cfg=cfg, device=args.device, model=model,
                           windows=_windows(args, model_name, tokenizer, "train",
                                            args.train_windows),
                           eval_windows=ev, rows=args.rows, target=args.target,
                           pooling=args.decode_target)


def _gated_layers(model) -> list[int] | None:
    """The layers whose prefill gates sparsify reads (not Gemma's sliding-window layers, which
    keep their window and were not trained), or None where that is every layer."""
    cfg = model.config
    n = cfg.num_hidden_layers
    gated = [i for i in range(n) if not family_of(cfg).keeps_own_attention(cfg, i, 0)]
    return gated if len(gated) < n else None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.phase == "decode" and (args.q_pool is not None or args.cache_only or args.preload):
        parser.error("--q-pool, --cache-only and --preload are prefill options: the decode gate "
                     "reads every query head of its group and computes its targets in the loop")
    args.q_pool = args.q_pool or ("avg",)
    out, ckpt, curve = _run_paths(parser, args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is None:
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if args.phase != "decode" and args.decode_target != "max":
        parser.error("--decode-target is a decode-phase option")
    try:
        args.target = decode_target_source(args.decode_target, args.target, args.device)
    except ValueError as e:
        parser.error(f"--decode-target {args.decode_target}: {e}; use --target exact (or leave "
                     "it out)")
    if world > 1 and not torch.distributed.is_initialized():
        backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group(backend)
    rank, world = _dist()
    say = (lambda *a: None) if (args.quiet or rank) else (lambda *a: print(*a, flush=True))

    args.model = resolve_model_argument(args.model)
    if args.model == TINY_MODEL:
        model, tokenizer, model_name = tiny_model().to(args.device), None, TINY_MODEL
    else:
        model, tokenizer = load_model(device=args.device, name=args.model)
        model_name = get_model(args.model).model_name
    ctx = model.config.max_position_embeddings
    if args.seq_len > ctx:
        parser.error(f"--seq-len {args.seq_len} is longer than {args.model}'s context of {ctx} "
                     "tokens")
    fingerprint = model_fingerprint(model)
    b = args.block_size
    folders = {}
    for split, n in (("eval", args.eval_windows), ("train", args.train_windows)):
        if n <= 0 or args.phase == "decode":
            continue
        folder = cache_folder(
            model, model_name, b, args.seq_len, split, args.cache_root, target=args.target
        )
        windows = _windows(args, model_name, tokenizer, split, n)
        # every rank builds its share of the windows, then all wait for the whole cache
        build_cache(
            model, windows, folder, b, indices=range(rank, n, world), log=say, target=args.target
        )
        folders[split] = folder
    if world > 1:
        torch.distributed.barrier()
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the base model's weights changed while building the cache")
    say(f"base model unchanged (sha256 {fingerprint[:16]})")
    if args.cache_only:
        return 0

    cfg = DistillConfig(
        block_size=b,
        q_pool=args.q_pool,
        k_pool=args.k_pool,
        d_gate=args.d_gate,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    if args.phase == "decode":
        distiller = _decode_distiller(args, cfg, model, model_name, tokenizer)
    else:
        distiller = _prefill_distiller(args, cfg, model, model_name, folders)
    gates = distiller.gates
    if args.resume and ckpt.exists():

        distiller.load_checkpoint(ckpt)
        say(f"resumed from {ckpt} at step {distiller.step}")
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        for m in distiller.steps():
            if rank == 0:
                with curve.open("a") as f:  # appended to, never emptied (see _run_paths)
                    f.write(json.dumps(m) + "\n")
                if m["step"] % 10 == 0 or m["step"] == cfg.steps or "eval_loss" in m:
                    ev = (f" eval {m['eval_loss']:.4f} {m['eval_recall']}" if "eval_loss" in m
                          else "")
                    say(
                        f"step {m['step']:5d} lr {m['lr']:.2e} loss {m['loss']:.4f} "
                        f"recall {m['recall']}{ev} ({time.time() - t0:.0f}s)"
                    )
                if args.checkpoint_every and m["step"] % args.checkpoint_every == 0:
                    distiller.save_checkpoint(ckpt)
    except DivergedError as e:
        last = f"the last checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
        raise SystemExit(f"seerlib.distill: {e}. Nothing was saved to {out}; {last}.") from e
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the base model's weights changed during training")
    if rank == 0:
        distiller.save_checkpoint(ckpt)
        last = distiller.history[-1] if distiller.history else {}
        try:
            meta = save_gates(
                gates,
                out,
                dtype=getattr(torch, args.save_dtype),
                layers=_gated_layers(model) if args.phase == "prefill" else None,
                tokens_seen=distiller.tokens_seen,
                steps=distiller.step,
                final_loss=last.get("loss"),
                final_eval_loss=last.get("eval_loss"),
                seq_len=args.seq_len,
                model=args.model,
                train_windows=args.train_windows,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                world_size=world,
                target=args.target,
                **({"rows": args.rows, "decode_target": args.decode_target}
                   if args.phase == "decode" else {}),
                base_model_sha256=fingerprint,
                command="python -m seerlib.distill "
                + " ".join(argv if argv is not None else sys.argv[1:]),
            )
        except ValueError as e:  # non-finite in the storage dtype: weights out of its range
            raise SystemExit(
                f"seerlib.distill: the trained gates were not saved: {e}. Nothing was saved to "
                f"{out}; the checkpoint {ckpt} holds the weights as trained (weights this large "
                "mean the run diverged: lower --lr)"
            ) from e
        say(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB): {json.dumps(meta)}")
    if world > 1:
        # Release DistributedDataParallel (its reducer holds gloo/NCCL work objects) before the
        # process group goes, so no collective outlives it into interpreter shutdown.
        del distiller
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
