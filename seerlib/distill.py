"""Self-distillation of the gates from the model's own attention (SEERATTENTION.md §4).

The base model is frozen and neither the gates' inputs (pre-RoPE Q, K) nor their target (the pooled
attention map of post-RoPE Q, K) depend on the gates, so the model runs once per text window:
`build_cache` stores, per window and layer, the block-pooled Q/K features (avg, max and min, so any
pooling config trains from one cache) and the pooled attention map. Training then runs over the
cache for as many epochs as needed, with no model in the loop.

- Loss per layer: KL(row-normalized pooled map ‖ softmax(gate logits)) averaged over batches, heads
  and query-block rows, the first quarter of the rows left out; summed over layers.
- AdamW (no weight decay), linear warm-up then cosine decay; only gate parameters train.
- `Distiller(...).steps()` yields one metrics dict per step (a notebook can draw them live); the CLI
  `python -m seerlib.distill` runs the same loop single-process or under `torchrun`
  (DistributedDataParallel, gloo on CPU, NCCL on GPU), with checkpoints and `--resume`.
- A run that diverges (a non-finite loss or gradient) stops with `DivergedError` before the step
  is applied; the CLI then exits non-zero and saves nothing.
- The CLI writes to a fresh timestamped path unless `--out` is given, and never replaces or empties
  an earlier run's files (gates, checkpoint, loss log) unless told to continue it (`--resume`).

Ground-truth sources and the cache of per-window features and targets: `seerlib.targets`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from seerlib.data import MODEL_NAME, load_model, token_windows
from seerlib.gate import POOL_OPS, GateSet
from seerlib.io import fresh_path, load_checkpoint, save_checkpoint, save_gates
from seerlib.metrics import kl_div, recall
from seerlib.select import Selection, select_blocks
from seerlib.targets import (
    TARGETS,
    WindowCache,
    build_cache,
    cache_folder,
    default_target,
    model_fingerprint,
)

__all__ = ["DistillConfig", "DivergedError", "Distiller", "main", "tiny_config", "tiny_model"]

TINY_MODEL = "tiny-random-llama"


@dataclass(frozen=True)
class DistillConfig:
    """What a distillation run does. `batch_size` is the global batch (windows per step)."""

    block_size: int = 64
    q_pool: tuple[str, ...] = ("avg",)
    k_pool: tuple[str, ...] = ("max", "min", "avg")
    d_gate: int | None = None
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    skip_first_quarter: bool = True
    recall_densities: tuple[float, ...] = (0.5, 0.3, 0.1)
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for name, low in (("block_size", 1), ("steps", 0), ("batch_size", 1), ("warmup", 0),
                          ("eval_every", 0)):
            _check_int(name, getattr(self, name), low)
        if self.d_gate is not None:
            _check_int("d_gate", self.d_gate, 1)
        for name in ("lr",):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
        if not _is_number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(
                f"weight_decay must be a finite number >= 0; got {self.weight_decay!r}"
            )
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if not all(_is_number(d) and 0 < d <= 1 for d in self.recall_densities):
            raise ValueError(f"recall_densities must be in (0, 1]; got {self.recall_densities!r}")


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message says at which step."""


# ---------------------------------------------------------------- training


class _PooledGates(nn.Module):
    """GateSet over pooled features, so DistributedDataParallel sees one forward."""

    def __init__(self, gates: GateSet):
        super().__init__()
        self.gates = gates

    def forward(self, q_list: list[torch.Tensor], k_list: list[torch.Tensor], layers: list[int]):
        return [
            self.gates[i].forward_pooled(q, k)
            for i, q, k in zip(layers, q_list, k_list, strict=True)
        ]


def _lr_lambda(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Distiller:
    """The distillation loop over a `WindowCache`.

    Args:
        gates: the GateSet to train (its block size and pooling must match the cache / config).
        cache: training windows.
        cfg: DistillConfig.
        eval_cache: optional held-out windows; their loss and recall are reported every
            `cfg.eval_every` steps and at the last step.
        device: where the gates train.
    Under torch.distributed (initialized by the caller), each rank takes its share of every global
    batch and the gradients are averaged by DistributedDataParallel; all ranks hold the same gates.

    Use: `for m in Distiller(...).steps(): ...`; each m is a dict with step, lr, loss,
    loss_per_layer, recall ({density: mean recall of pooled mass on the batch}), tokens_seen,
    seconds, and eval_loss / eval_recall when evaluated.
    """

    gates: GateSet
    cache: WindowCache
    cfg: DistillConfig = field(default_factory=DistillConfig)
    eval_cache: WindowCache | None = None
    device: str | torch.device = "cpu"

    def __post_init__(self):
        if (
            self.cache.block_size != self.gates.block_size
            or self.cfg.block_size != self.gates.block_size
        ):
            raise ValueError(
                f"block sizes differ: cache {self.cache.block_size}, config {self.cfg.block_size}, "
                f"gates {self.gates.block_size}"
            )
        self.rank, self.world = _dist()
        if self.cfg.batch_size % self.world:
            raise ValueError(
                f"global batch {self.cfg.batch_size} does not split over {self.world} processes"
            )
        self.gates.to(self.device)
        self.module = _PooledGates(self.gates)
        if self.world > 1:
            dev = [self.device] if torch.device(self.device).type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.module, device_ids=dev)
        params = list(self.gates.parameters())
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg))
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []

    def _global_batch(self, step: int) -> list[int]:
        """Window indices of a step: epoch-wise permutations seeded by (seed, epoch)."""
        n, G = len(self.cache), self.cfg.batch_size
        out = []
        for j in range(step * G, step * G + G):
            epoch, pos = divmod(j, n)
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
            out.append(int(torch.randperm(n, generator=g)[pos]))
        return out

    def _loss(self, batch: dict, logits: list[torch.Tensor]):
        per_layer = []
        for (_, _, target), lg in zip(batch.values(), logits, strict=True):
            skip = target.shape[-2] // 4 if self.cfg.skip_first_quarter else 0
            per_layer.append(kl_div(target, lg, skip_rows=skip))
        return torch.stack(per_layer).sum(), per_layer

    @torch.no_grad()
    def _recall(self, batch: dict, logits: list[torch.Tensor]) -> dict[str, float]:
        out = {}
        for d in self.cfg.recall_densities:
            vals = [
                recall(t, select_blocks(lg, Selection(density=d)))
                for (_, _, t), lg in zip(batch.values(), logits, strict=True)
            ]
            out[str(d)] = float(torch.stack(vals).mean())
        return out

    def _forward(self, batch: dict, module):
        layers = list(batch)
        return module([batch[i][0] for i in layers], [batch[i][1] for i in layers], layers)

    @torch.no_grad()
    def evaluate(self, cache: WindowCache | None = None) -> dict:
        """Mean loss and recall (pooled proxy) of the current gates over a cache's windows."""
        cache = cache or self.eval_cache
        losses, recalls = [], []
        for n in range(len(cache)):
            batch = cache.batch([n], self.gates.q_pool, self.gates.k_pool, self.device)
            logits = self._forward(batch, _PooledGates(self.gates))
            losses.append(float(self._loss(batch, logits)[0]))
            recalls.append(self._recall(batch, logits))
        return {
            "loss": sum(losses) / len(losses),
            "recall": {d: sum(r[d] for r in recalls) / len(recalls) for d in recalls[0]},
        }

    def steps(self) -> Iterator[dict]:
        """Train from the current step to cfg.steps, yielding one metrics dict per step."""
        while self.step < self.cfg.steps:
            t0 = time.time()
            idx = self._global_batch(self.step)[self.rank :: self.world]
            batch = self.cache.batch(idx, self.gates.q_pool, self.gates.k_pool, self.device)
            self.module.train()
            logits = self._forward(batch, self.module)
            loss, per_layer = self._loss(batch, logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_loss = float(loss.detach())
            if self.world > 1:  # the global-batch loss, the same on every rank
                t = torch.tensor([global_loss], device=self.device)
                torch.distributed.all_reduce(t)
                global_loss = float(t) / self.world
            lr = self.scheduler.get_last_lr()[0]
            # Checked before the step is applied (the gradients are the same on every rank, and
            # so is the global loss), so the gates keep the last finite weights.
            self._check_finite(global_loss, lr, "gradient", applied=False)
            try:
                self.optimizer.step()
            except RuntimeError as e:  # an update too large for the dtype
                if "overflow" not in str(e):
                    raise
                raise DivergedError(
                    f"training diverged at step {self.step + 1} (lr {lr:.3g}): the update "
                    f"overflows ({e}). Try a lower learning rate"
                ) from e
            self._check_finite(global_loss, lr, "weight", applied=True)
            self.scheduler.step()
            self.step += 1
            self.tokens_seen += self.cfg.batch_size * self.cache.seq_len
            m = {
                "step": self.step,
                "lr": lr,
                "loss": global_loss,
                "loss_per_layer": [float(x.detach()) for x in per_layer],
                "recall": self._recall(batch, [lg.detach() for lg in logits]),
                "tokens_seen": self.tokens_seen,
                "seconds": time.time() - t0,
            }
            last = self.step == self.cfg.steps
            if self.eval_cache is not None and (
                last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            ):
                ev = self.evaluate()
                m["eval_loss"], m["eval_recall"] = ev["loss"], ev["recall"]
            self.history.append({k: v for k, v in m.items() if k != "loss_per_layer"})
            yield m

    def _check_finite(self, loss: float, lr: float, what: str, applied: bool) -> None:
        """Raise DivergedError on a non-finite loss or parameter gradient / weight."""
        named = [(name, p if what == "weight" else p.grad)
                 for name, p in self.gates.named_parameters()]
        named = [(name, t) for name, t in named if t is not None]
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]) if named else None
        if math.isfinite(loss) and (finite is None or bool(finite.all())):  # one device sync
            return
        bad = [] if math.isfinite(loss) else [f"loss ({loss})"]
        if finite is not None:
            oks = finite.tolist()
            bad += [f"{what} of {name}" for (name, _), ok in zip(named, oks, strict=True) if not ok]
        kept = "hold that step's broken weights" if applied else (
            f"keep the weights of step {self.step}")
        raise DivergedError(
            f"training diverged at step {self.step + 1} (lr {lr:.3g}): non-finite "
            f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the gates {kept}. "
            "Try a lower learning rate"
        )

    def state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "history": self.history,
            "config": asdict(self.cfg),
        }

    def save_checkpoint(self, path) -> None:
        save_checkpoint(path, self.gates, self.optimizer, self.scheduler, self.state())

    def load_checkpoint(self, path) -> None:
        st = load_checkpoint(path, self.gates, self.optimizer, self.scheduler)
        self.step, self.tokens_seen, self.history = st["step"], st["tokens_seen"], st["history"]


# ---------------------------------------------------------------- CLI


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
    p.add_argument("--model", default="smollm2", choices=["smollm2", TINY_MODEL])
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
    p.add_argument("--q-pool", type=_pool_ops, default=("avg",),
                   help="comma-separated ops of avg,max,min")
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
        there = [str(p) for p in (out, ckpt, curve) if p.exists()]
        if there:
            raise SystemExit(
                f"seerlib.distill: an earlier run is at {', '.join(there)}; pass --resume to "
                f"continue it, or choose another --out (nothing was changed). --out was {out}"
            )
    elif out.exists() and not ckpt.exists():
        raise SystemExit(
            f"seerlib.distill: --resume found no checkpoint at {ckpt}, so the run would start "
            f"over and replace {out}; restore the checkpoint or choose another --out (nothing "
            "was changed)"
        )
    return out, ckpt, curve


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out, ckpt, curve = _run_paths(parser, args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is None:
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if args.target is None:
        args.target = default_target(args.device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group(backend)
    rank, world = _dist()
    say = (lambda *a: None) if (args.quiet or rank) else (lambda *a: print(*a, flush=True))

    if args.model == TINY_MODEL:
        model, tokenizer, model_name = tiny_model().to(args.device), None, TINY_MODEL
    else:

        model, tokenizer = load_model(device=args.device)
        model_name = MODEL_NAME
    fingerprint = model_fingerprint(model)
    b = args.block_size
    folders = {}
    for split, n in (("eval", args.eval_windows), ("train", args.train_windows)):
        if n <= 0:
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
    gates = GateSet.from_config(
        model.config,
        block_size=b,
        q_pool=cfg.q_pool,
        k_pool=cfg.k_pool,
        d_gate=cfg.d_gate,
        model_name=model_name,
    )
    distiller = Distiller(
        gates,
        WindowCache(folders["train"], args.train_windows, args.preload),
        cfg,
        eval_cache=(
            WindowCache(folders["eval"], args.eval_windows, args.preload)
            if "eval" in folders
            else None
        ),
        device=args.device,
    )
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
                tokens_seen=distiller.tokens_seen,
                steps=distiller.step,
                final_loss=last.get("loss"),
                final_eval_loss=last.get("eval_loss"),
                seq_len=args.seq_len,
                train_windows=args.train_windows,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                world_size=world,
                target=args.target,
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

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip interpreter finalization: gloo's worker threads can abort the
        # process there ("terminate called without an active exception", pytorch#179291) after
        # all work is done and saved. Flush first so no output is lost.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
