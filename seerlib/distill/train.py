"""Gate self-distillation: `DistillConfig`, `Distiller` (the loop, API and DDP), `DivergedError`.
The method and the loss: the package docstring (`seerlib.distill`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from seerlib.gate import GateSet
from seerlib.io import load_checkpoint, save_checkpoint
from seerlib.metrics import kl_div, recall
from seerlib.select import Selection, select_blocks
from seerlib.targets import (
    WindowCache,
)

__all__ = ["TINY_MODEL", "DistillConfig", "DivergedError", "Distiller", "lr_lambda",
           "window_order"]

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
    recall_tokens: tuple[int, ...] = (256, 1024)  # decode gates: recall at these token budgets
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
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                   for t in self.recall_tokens):
            raise ValueError(f"recall_tokens must be whole numbers >= 1; got "
                             f"{self.recall_tokens!r}")
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


def window_order(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Window indices of a step's global batch over n windows: epoch-wise permutations seeded by
    (seed, epoch), so a resumed or repeated run sees the same windows."""
    out = []
    for j in range(step * batch_size, step * batch_size + batch_size):
        epoch, pos = divmod(j, n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def lr_lambda(cfg):
    """LambdaLR's factor for a config with steps, warmup and min_lr_ratio: linear warm-up, then
    cosine decay to min_lr_ratio."""

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
        self._check_data()
        self.rank, self.world = _dist()
        if self.cfg.batch_size % self.world:
            raise ValueError(
                f"global batch {self.cfg.batch_size} does not split over {self.world} processes"
            )
        self.gates.to(self.device)
        self.module = self._module()
        if self.world > 1:
            dev = [self.device] if torch.device(self.device).type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.module, device_ids=dev)
        params = list(self.gates.parameters())
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []

    # What a subclass with other data changes (seerlib.distill.decode): the data check, the
    # module DDP wraps, the window count and length, and one batch's loss.

    def _check_data(self) -> None:
        if (
            self.cache.block_size != self.gates.block_size
            or self.cfg.block_size != self.gates.block_size
        ):
            raise ValueError(
                f"block sizes differ: cache {self.cache.block_size}, config {self.cfg.block_size}, "
                f"gates {self.gates.block_size}"
            )

    def _module(self) -> nn.Module:
        return _PooledGates(self.gates)

    def _num_windows(self) -> int:
        return len(self.cache)

    def _seq_len(self) -> int:
        return self.cache.seq_len

    def _batch_loss(self, idx: list[int]):
        """(loss, per-layer losses, recall()) of training windows idx; recall() is called after
        the backward pass and returns {budget: mean recall}."""
        batch = self.cache.batch(idx, self.gates.q_pool, self.gates.k_pool, self.device)
        self.module.train()
        logits = self._forward(batch, self.module)
        loss, per_layer = self._loss(batch, logits)
        return loss, per_layer, lambda: self._recall(batch, [lg.detach() for lg in logits])

    def _global_batch(self, step: int) -> list[int]:
        return window_order(step, self._num_windows(), self.cfg.batch_size, self.cfg.seed)

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
            loss, per_layer, recall_of = self._batch_loss(idx)
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
            self.tokens_seen += self.cfg.batch_size * self._seq_len()
            m = {
                "step": self.step,
                "lr": lr,
                "loss": global_loss,
                "loss_per_layer": [float(x.detach()) for x in per_layer],
                "recall": recall_of(),
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

    def load_checkpoint(self, path) -> dict:
        """Restore the run from `save_checkpoint`'s file; returns its saved state."""
        st = load_checkpoint(path, self.gates, self.optimizer, self.scheduler)
        self.step, self.tokens_seen, self.history = st["step"], st["tokens_seen"], st["history"]
        return st
