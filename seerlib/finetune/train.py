"""The fine-tuning loop: `FinetuneConfig`, `FineTuner`. The method: the package docstring
(`seerlib.finetune`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from seerlib import ops
from seerlib.capture import AttentionSwitch
from seerlib.distill.train import DivergedError, lr_lambda, window_order
from seerlib.families import family_of
from seerlib.gate import GateSet
from seerlib.integrate import sparsify
from seerlib.methods import resolve_config
from seerlib.metrics import block_maps, kl_div, normalize_rows
from seerlib.targets import TARGETS, target_dtype

__all__ = ["ATTENTION_MODES", "PRECISIONS", "TRAIN_PARTS", "FineTuner", "FinetuneConfig"]

TRAIN_PARTS = ("model", "gate", "both")
ATTENTION_MODES = ("sparse", "dense")
PRECISIONS = ("fp32", "amp")


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run does (validated on construction).

    Attributes:
        steps: optimizer steps; batch_size: windows per step (run one at a time, gradients
            accumulated, so memory is one window's).
        lr: the model's learning rate; gate_lr: the gates'. Both: linear warm-up over `warmup`
            steps, then cosine to min_lr_ratio x lr (`seerlib.distill.lr_lambda`).
        weight_decay: AdamW's, for the model (the gates take none, as in distillation).
        clip: the model's gradient-norm clip (0: none).
        train: "model", "gate" or "both" (the other part is frozen).
        attention: "sparse" (through `sparsify(model, sparse, gates=...)`: the gate's selection
            and the block-sparse kernel) or "dense" (the model's own attention).
        sparse: the sparse configuration, a preset or label (`seerlib.methods.resolve_config`).
        target: the gate's ground truth, "kernel" (`ops.pooled_attention`, bf16 on CUDA) or
            "exact" (`metrics.block_maps`, fp32).
        precision: "fp32", or "amp": fp32 weights (the AdamW master copy) under bf16 autocast,
            the attention inputs cast to bf16 so the Triton kernels take them.
        gradient_checkpointing: recompute each decoder layer in the backward pass
            (`model.gradient_checkpointing_enable`); needed for 32k windows.
        skip_first_quarter: leave the first quarter of query-block rows out of the gate loss.
        eval_every: held-out LM loss every this many steps (and at the last), 0: at the last.
        seed: the window order's seed.
    """

    steps: int = 400
    batch_size: int = 1
    lr: float = 1e-5
    gate_lr: float = 1e-4
    warmup: int = 20
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    train: str = "both"
    attention: str = "sparse"
    sparse: str = "gate@0.5"
    target: str = "exact"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    skip_first_quarter: bool = True
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup", 0), ("eval_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
        for name in ("lr", "gate_lr"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
        for name, high in (("min_lr_ratio", 1.0), ("weight_decay", math.inf), ("clip", math.inf)):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0 <= v <= high or v == math.inf:
                raise ValueError(f"{name} must be a finite number in [0, {high:g}]; got {v!r}")
        for name, allowed in (("train", TRAIN_PARTS), ("attention", ATTENTION_MODES),
                              ("target", TARGETS), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.attention == "sparse":
            resolve_config(self.sparse)  # raises on an unknown label

    @property
    def trains_model(self) -> bool:
        return self.train in ("model", "both")

    @property
    def trains_gate(self) -> bool:
        return self.train in ("gate", "both")


class _Tap(AttentionSwitch):
    """The outermost attention function of a training forward: per layer it keeps the gate's
    pooled inputs (pre-RoPE Q/K, detached) and its target (the pooled attention map of the
    post-RoPE Q/K, detached), casts Q/K/V to the autocast dtype, and calls the attention below it
    (sparsify's, or the model's own). While `collecting` is off (the recomputation of a
    checkpointed layer in the backward pass) it only casts and delegates: nothing it records
    saves a tensor for backward, so a recomputed layer saves the same tensors as the first pass.
    """

    def __init__(self, model, gates: GateSet | None, target: str, collect: bool):
        super().__init__(model)
        self.gates, self.target, self.collecting = gates, target, collect
        self.family = family_of(model)
        self.features: dict[int, tuple] = {}  # layer -> (q_pooled, k_pooled, target)

    def _wants_pre_rope(self) -> bool:
        return self.collecting

    def _attend(self, module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        pre = self._pre.pop(layer, None)
        S = query.shape[2]
        if (self.collecting and pre is not None and S == key.shape[2]
                and not self.family.keeps_own_attention(self.model.config, layer, S)):
            with torch.no_grad():
                gate = self.gates[layer]
                qp, kp = gate.pool(pre["q_pre"].detach(), pre["k_pre"].detach())
                scale = kwargs.get("scaling")
                softcap = kwargs.get("softcap")  # Gemma2's attn_logit_softcapping, else None
                self.features[layer] = (qp, kp, _target(query.detach(), key.detach(),
                                                        value.detach(), gate.block_size,
                                                        self.target, scale, softcap))
        if torch.is_autocast_enabled(query.device.type):
            dt = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        return default(module, query, key, value, attention_mask, **kwargs)

    def gate_loss(self, skip_first_quarter: bool) -> tuple[torch.Tensor, list[float]]:
        """Sum over layers of KL(target ‖ softmax(gate logits)), and the per-layer values."""
        per_layer = []
        for layer, (qp, kp, target) in sorted(self.features.items()):
            logits = self.gates[layer].forward_pooled(qp, kp)
            skip = target.shape[-2] // 4 if skip_first_quarter else 0
            per_layer.append(kl_div(target, logits, skip_rows=skip))
        return torch.stack(per_layer).sum(), [float(x.detach()) for x in per_layer]


def _target(q, k, v, block_size: int, target: str, scale, softcap=None) -> torch.Tensor:
    """The row-normalized pooled attention map (B, Hq, nb, nb) float32 of post-RoPE q, k: one
    dense pass over the layer's scores (the cost of the gate loss); of the soft-capped attention
    when `softcap` (the model's logit soft-cap) is given."""
    if target == "exact":
        pooled = block_maps(q, k, block_size, causal=True, scale=scale, softcap=softcap)[1]
    else:
        kd = target_dtype(target, q.device, q.dtype)
        pooled = ops.pooled_attention(q.to(kd), k.to(kd), v.to(kd), block_size, causal=True,
                                      scale=scale, softcap=softcap)[1]
    return normalize_rows(pooled)


class FineTuner:
    """Fine-tune a model (and/or its gates) on token windows with LM loss and the gate loss.

    Args:
        model: a transformers causal LM (extended by YaRN already, if it is to be).
        windows: (N, S) training token ids.
        cfg: FinetuneConfig.
        gates: the GateSet (built after any context extension); needed when the gate trains or
            the sparse configuration reads a gate.
        eval_windows: (M, S) held-out token ids for the eval LM loss, or None.
        device: where the model and gates train.
    Use: `for m in FineTuner(...).steps(): ...`; m holds step, lr, gate_lr, lm_loss, gate_loss
    (None when the gate is frozen: its target costs a dense pass), gate_loss_per_layer, density
    (achieved by the sparse attention; 1.0 dense), grad_norm, tokens_seen, seconds, tokens_per_s,
    and eval_lm_loss when evaluated.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig,
                 gates: GateSet | None = None, eval_windows: torch.Tensor | None = None,
                 device="cpu"):
        if windows.dim() != 2 or len(windows) == 0:
            raise ValueError(f"windows must be (N, S) token ids, N >= 1; got shape "
                             f"{tuple(windows.shape)}")
        self.model, self.cfg, self.device = model.to(device), cfg, device
        self.windows, self.eval_windows = windows, eval_windows
        self.sparse_cfg = resolve_config(cfg.sparse) if cfg.attention == "sparse" else None
        needs_gate = self.sparse_cfg is not None and self.sparse_cfg.spec.needs_gate
        if gates is None and (cfg.trains_gate or needs_gate):
            why = "the gate trains" if cfg.trains_gate else f"{cfg.sparse!r} reads a gate"
            raise ValueError(f"gates are needed ({why}): build GateSet.from_config(model.config) "
                             "after extending the context, or load a gate file")
        self.gates = gates.to(device) if gates is not None else None
        self.sparse = (sparsify(model, self.sparse_cfg, gates=gates if needs_gate else None)
                       if self.sparse_cfg is not None else None)
        model.requires_grad_(cfg.trains_model)
        if gates is not None:
            gates.requires_grad_(cfg.trains_gate)
        if cfg.gradient_checkpointing:
            # transformers >= 5.x names it activation checkpointing; older: gradient_...
            enable = getattr(model, "activation_checkpointing_enable", None)
            kw = {"use_reentrant": False}
            if enable is not None:
                enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        groups = []
        if cfg.trains_model:
            groups.append({"params": [p for p in model.parameters()], "lr": cfg.lr,
                           "weight_decay": cfg.weight_decay})
        if cfg.trains_gate:
            groups.append({"params": list(gates.parameters()), "lr": cfg.gate_lr,
                           "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step, self.tokens_seen = 0, 0
        self.history: list[dict] = []

    def _autocast(self):
        if self.cfg.precision == "amp":
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _window(self, windows: torch.Tensor, n: int) -> torch.Tensor:
        return windows[n : n + 1].to(self.device)

    def _pass(self, ids: torch.Tensor, train: bool, scale: float = 1.0) -> dict:
        """One window's forward (and backward when `train`); returns its losses and density."""
        cfg = self.cfg
        collect = train and cfg.trains_gate
        tap = _Tap(self.model, self.gates, cfg.target, collect)
        self.model.train(train)
        with contextlib.ExitStack() as stack:
            # the backward runs inside too: checkpointed layers recompute through the same path
            if self.sparse is not None:
                stack.enter_context(self.sparse)
                self.sparse.stats.reset()
            stack.enter_context(tap)
            with self._autocast(), torch.set_grad_enabled(train and cfg.trains_model):
                lm = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            tap.collecting = False
            density = self.sparse.stats.achieved_density if self.sparse is not None else 1.0
            out = {"lm_loss": float(lm.detach()), "density": density, "gate_loss": None,
                   "gate_loss_per_layer": None}
            loss = lm if train and cfg.trains_model else None
            if collect:
                gl, per_layer = tap.gate_loss(cfg.skip_first_quarter)
                out["gate_loss"], out["gate_loss_per_layer"] = float(gl.detach()), per_layer
                loss = gl if loss is None else loss + gl  # disjoint graphs: no weighting needed
            for name in ("lm_loss", "gate_loss"):
                if out[name] is not None and not math.isfinite(out[name]):
                    raise DivergedError(
                        f"training diverged at step {self.step + 1}: non-finite {name} "
                        f"({out[name]}); the weights of step {self.step} are kept. Try a lower "
                        "learning rate")
            if loss is not None:
                (loss * scale).backward()
        return out

    def _clip_and_check(self) -> float:
        """Clip the model's gradients; raise DivergedError on a non-finite gradient."""
        norms = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            is_model = self.cfg.trains_model and group is self.optimizer.param_groups[0]
            clip = self.cfg.clip if is_model and self.cfg.clip > 0 else math.inf
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        if not all(math.isfinite(n) for n in norms):
            raise DivergedError(
                f"training diverged at step {self.step + 1}: a non-finite gradient (norms "
                f"{norms}); the weights of step {self.step} are kept. Try a lower learning rate")
        return norms[0] if norms else 0.0

    def steps(self) -> Iterator[dict]:
        """Train from the current step to cfg.steps, yielding one metrics dict per step."""
        cfg = self.cfg
        while self.step < cfg.steps:
            t0 = time.time()
            self.optimizer.zero_grad(set_to_none=True)
            parts = [self._pass(self._window(self.windows, n), True, 1 / cfg.batch_size)
                     for n in window_order(self.step, len(self.windows), cfg.batch_size,
                                           cfg.seed)]
            grad_norm = self._clip_and_check()
            lrs = self.scheduler.get_last_lr()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            tokens = cfg.batch_size * self.windows.shape[1]
            self.tokens_seen += tokens
            seconds = time.time() - t0
            m = {
                "step": self.step,
                "lr": lrs[0] if cfg.trains_model else None,
                "gate_lr": lrs[-1] if cfg.trains_gate else None,
                **{k: _mean([p[k] for p in parts]) for k in ("lm_loss", "gate_loss", "density")},
                "gate_loss_per_layer": ([_mean(x) for x in zip(*(p["gate_loss_per_layer"]
                                                                for p in parts), strict=True)]
                                        if cfg.trains_gate else None),
                "grad_norm": grad_norm,
                "tokens_seen": self.tokens_seen,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else None,
            }
            last = self.step == cfg.steps
            if self.eval_windows is not None and (
                    last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                m["eval_lm_loss"] = self.evaluate()
            self.history.append(m)
            yield m

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor | None = None) -> float:
        """Mean LM loss over held-out windows, through the same attention as training."""
        windows = self.eval_windows if windows is None else windows
        losses = [self._pass(self._window(windows, n), False)["lm_loss"]
                  for n in range(len(windows))]
        return sum(losses) / len(losses)

    def state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "config": asdict(self.cfg)}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None

