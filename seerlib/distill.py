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

Ground-truth source (`target`, SEERATTENTION.md §3):
- "kernel" (default on CUDA): the forward's attention runs through `seerlib.ops.pooled_attention`
  (the Triton kernel, bf16 inputs on CUDA), which returns the attention output and the pooled map
  in one pass: the paper's cheap extraction, no second attention pass. On CPU the same op goes to
  the reference (or to the kernels under `ops.use_backend("triton")`) in the model's dtype.
- "exact" (default on CPU): the model's own attention (SDPA) plus `metrics.block_maps`, the exact
  fp32 map. The two agree to about 1e-6 in fp32 (tested) and to bf16 rounding on a GPU.

Cache files: <cache root>/distill/<model>-<config hash>-b<block>-s<seq>-<split>[<target tag>]/
w<index>.safetensors with keys L<layer>.q_<op>, L<layer>.k_<op> ((1, H, nb, d) float16) and
L<layer>.pooled ((1, Hq, nb, nb) float32); the header records the target. The target tag is empty
for "exact" (every cache made before the option was exact) and "-tkernel-<dtype>" for "kernel", so
caches of different sources never mix; `WindowCache` also refuses files of mixed targets.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from seerlib import ops
from seerlib.gate import POOL_OPS, GateSet, pool_blocks
from seerlib.io import config_hash, load_checkpoint, save_checkpoint, save_gates
from seerlib.metrics import block_maps, kl_div, normalize_rows, recall
from seerlib.select import select_blocks

__all__ = [
    "DistillConfig",
    "Distiller",
    "WindowCache",
    "build_cache",
    "cache_folder",
    "capture_features",
    "default_target",
    "TARGETS",
    "model_fingerprint",
    "window_features",
    "main",
]

TINY_MODEL = "tiny-random-llama"
TARGETS = ("kernel", "exact")


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


# ---------------------------------------------------------------- cache


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes: proves the base model was not changed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_target(device) -> str:
    """The ground-truth source used when none is given: "kernel" on CUDA, else "exact"."""
    return "kernel" if torch.device(device).type == "cuda" else "exact"


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    return target


def target_dtype(target: str, device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the target is computed from: bf16 for the kernel on CUDA, else the model's."""
    if _check_target(target) == "kernel" and torch.device(device).type == "cuda":
        return torch.bfloat16
    return dtype if target == "kernel" else torch.float32


def _target_tag(target: str, device, dtype: torch.dtype) -> str:
    if _check_target(target) == "exact":
        return ""  # caches made before the option existed were exact: keep their folder name
    return f"-tkernel-{str(target_dtype(target, device, dtype)).removeprefix('torch.')}"


def cache_folder(
    model,
    model_name: str,
    block_size: int,
    seq_len: int,
    split: str,
    root=None,
    target: str | None = None,
) -> Path:
    """Where `build_cache` puts the windows of one (model, block size, seq len, split, target).

    `target` defaults to `default_target` of the model's device, as in `build_cache`.
    """
    if root is None:
        from seerlib.data import cache_dir

        root = cache_dir()
    p = next(model.parameters())
    target = default_target(p.device) if target is None else target
    tag = f"{model_name}-{config_hash(model.config)}-b{block_size}-s{seq_len}-{split}"
    return Path(root) / "distill" / (tag + _target_tag(target, p.device, p.dtype))


@torch.no_grad()
def window_features(
    qkv: dict, block_size: int, scale: float | None = None
) -> dict[str, torch.Tensor]:
    """Pooled gate inputs and the pooled attention target of one captured batch.

    Args:
        qkv: {layer: LayerQKV} from `seerlib.capture.capture_qkv`.
        block_size: b.
        scale: attention score scale (the model's; 1 / sqrt(d) by default).
    Returns:
        {"L<i>.q_<op>": (B, Hq, nb, d) f16, "L<i>.k_<op>": (B, Hkv, nb, d) f16 for op in
        avg/max/min, "L<i>.pooled": (B, Hq, nb, nb) f32 from `pooled_attention`}.
    """
    out = {}
    for i, t in qkv.items():
        for op in POOL_OPS:
            out[f"L{i}.q_{op}"] = pool_blocks(t.q_pre, block_size, (op,)).half().cpu()
            out[f"L{i}.k_{op}"] = pool_blocks(t.k_pre, block_size, (op,)).half().cpu()
        # The exact map (equal to pooled_attention's, tested), without P @ V and scoring causal
        # keys only: half the reference's cost on a CPU, and exact fp32 on a GPU as well.
        _, pooled = block_maps(t.q, t.k, block_size, causal=True, scale=scale)
        out[f"L{i}.pooled"] = pooled.float().cpu()
    return out


@torch.no_grad()
def capture_features(
    model,
    input_ids: torch.Tensor,
    block_size: int,
    target: str = "exact",
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """One frozen forward that pools each layer's gate inputs and its target as it goes.

    The attention of every layer is routed through `seerlib.capture.attention_override`: with
    target "kernel" it *is* `ops.pooled_attention` (its output feeds the next layer, its pooled map
    is the target); with "exact" the model's own attention runs and `block_maps` gives the map.
    Only pooled tensors are kept, so memory does not grow with the layer count.

    Args:
        model: a transformers Llama-family model (the lm head is skipped when it has `.model`).
        input_ids: (B, S) token ids, no padding (plain causal attention).
        block_size: b.
        target: "kernel" or "exact" (see the module docstring).
        scale: score scale when the model passes none (1 / sqrt(d)).
    Returns:
        the same keys as `window_features`, on the CPU.
    """
    from seerlib.capture import attention_override, pre_rope_hooks

    _check_target(target)
    pre: dict = {}
    out: dict[str, torch.Tensor] = {}

    def attend(module, query, key, value, attention_mask, *, default, **kwargs):
        i = module.layer_idx
        p = pre.pop(i)
        for op in POOL_OPS:
            out[f"L{i}.q_{op}"] = pool_blocks(p["q_pre"], block_size, (op,)).half().cpu()
            out[f"L{i}.k_{op}"] = pool_blocks(p["k_pre"], block_size, (op,)).half().cpu()
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"layer {i}: {query.shape[2]} queries against {key.shape[2]} keys; distillation "
                "expects one full causal pass (no KV cache)"
            )
        s = kwargs.get("scaling") or scale
        if target == "exact":
            _, pooled = block_maps(query, key, block_size, causal=True, scale=s)
            out[f"L{i}.pooled"] = pooled.float().cpu()
            return default(module, query, key, value, attention_mask, **kwargs)
        kd = target_dtype(target, query.device, query.dtype)
        o, pooled = ops.pooled_attention(
            query.to(kd), key.to(kd), value.to(kd), block_size, causal=True, scale=s
        )
        out[f"L{i}.pooled"] = pooled.float().cpu()
        return o.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, S, Hq, d)

    with pre_rope_hooks(model, pre), attention_override(model, attend):
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    return out


def build_cache(
    model,
    windows: torch.Tensor,
    folder,
    block_size: int,
    indices: Sequence[int] | None = None,
    log=print,
    target: str | None = None,
) -> Path:
    """Run the model once per window and store its gate features; existing windows are kept.

    Args:
        model: the frozen transformers model.
        windows: (N, S) token ids.
        folder: the cache folder (see `cache_folder`, with the same target).
        block_size: b.
        indices: which windows to build (all by default; DDP ranks split them).
        log: called with a progress line per window (None for silence).
        target: ground-truth source, "kernel" or "exact" (default: `default_target` of the
            model's device).
    Returns:
        the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = next(model.parameters())
    device = p.device
    target = default_target(device) if target is None else _check_target(target)
    meta = {
        "block_size": str(block_size),
        "seq_len": str(windows.shape[1]),
        "target": target,
        "target_dtype": str(target_dtype(target, device, p.dtype)).removeprefix("torch."),
    }
    scale = (
        getattr(model.model.layers[0].self_attn, "scaling", None)
        if hasattr(model, "model")
        else None
    )
    for n in range(len(windows)) if indices is None else indices:
        path = folder / f"w{n:05d}.safetensors"
        if path.exists():
            continue
        t0 = time.time()
        feats = capture_features(model, windows[n : n + 1].to(device), block_size, target, scale)
        tmp = path.with_name(path.name + ".tmp")
        save_file(feats, str(tmp), metadata=meta)
        tmp.replace(path)
        if log:
            log(f"cache {path.name}: {time.time() - t0:.1f}s")
    return folder


class WindowCache:
    """The cached windows of one folder, read lazily from disk.

    Args:
        folder: a `build_cache` folder.
        n: use windows 0..n-1 (all present by default).
        preload: read every window into memory once (fast epochs; about 5.5 MB a window for
            SmolLM2 at 2048 tokens and block 64).
    """

    def __init__(self, folder, n: int | None = None, preload: bool = False):
        self.folder = Path(folder)
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        files = sorted(self.folder.glob("w*.safetensors"))
        if n is not None:
            files = [self.folder / f"w{i:05d}.safetensors" for i in range(n)]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(
                    f"{self.folder} lacks {len(missing)} of {n} windows (first: {missing[0]}); "
                    "run build_cache first"
                )
        if not files:
            raise FileNotFoundError(f"no cached windows in {self.folder}; run build_cache first")
        self.files = files
        with safe_open(str(files[0]), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata()
        self.block_size = int(meta["block_size"])
        self.seq_len = int(meta["seq_len"])
        # files written before the target option carry no target: they are exact
        self.target = meta.get("target", "exact")
        for path in files[1:]:
            with safe_open(str(path), framework="pt") as f:
                other = f.metadata().get("target", "exact")
            if other != self.target:
                raise ValueError(
                    f"{self.folder} mixes targets ({files[0].name}: {self.target}, "
                    f"{path.name}: {other}); one folder must hold one ground-truth source"
                )
        self.layers = sorted({int(k.split(".")[0][1:]) for k in keys})
        if preload:
            for n in range(len(files)):
                with safe_open(str(files[n]), framework="pt") as f:
                    self._mem[n] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def __len__(self) -> int:
        return len(self.files)

    def _add(self, parts, get, q_pool, k_pool):
        for i in self.layers:
            parts[i][0].append(torch.cat([get(f"L{i}.q_{op}") for op in q_pool], -1))
            parts[i][1].append(torch.cat([get(f"L{i}.k_{op}") for op in k_pool], -1))
            parts[i][2].append(get(f"L{i}.pooled"))

    def batch(self, indices: Sequence[int], q_pool, k_pool, device="cpu") -> dict[int, tuple]:
        """Stacked windows, per layer: (q_pooled, k_pooled, target).

        Shapes: q_pooled (n, Hq, nb, nq*d), k_pooled (n, Hkv, nb, nk*d), target (n, Hq, nb, nb).

        The target is the pooled map, row-normalized; features come back in float32.
        """
        parts: dict[int, list] = {i: [[], [], []] for i in self.layers}
        for n in indices:
            if n in self._mem:
                self._add(parts, self._mem[n].__getitem__, q_pool, k_pool)
                continue
            with safe_open(str(self.files[n]), framework="pt") as f:
                self._add(parts, f.get_tensor, q_pool, k_pool)
        return {
            i: (
                torch.cat(q).float().to(device),
                torch.cat(k).float().to(device),
                normalize_rows(torch.cat(t)).to(device),
            )
            for i, (q, k, t) in parts.items()
        }


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
                recall(t, select_blocks(lg, density=d))
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
            self.optimizer.step()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.step += 1
            self.tokens_seen += self.cfg.batch_size * self.cache.seq_len
            m = {
                "step": self.step,
                "lr": lr,
                "loss": float(loss.detach()),
                "loss_per_layer": [float(x.detach()) for x in per_layer],
                "recall": self._recall(batch, [lg.detach() for lg in logits]),
                "tokens_seen": self.tokens_seen,
                "seconds": time.time() - t0,
            }
            if self.world > 1:  # report the global-batch loss, the same on every rank
                t = torch.tensor([m["loss"]], device=self.device)
                torch.distributed.all_reduce(t)
                m["loss"] = float(t) / self.world
            last = self.step == self.cfg.steps
            if self.eval_cache is not None and (
                last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            ):
                ev = self.evaluate()
                m["eval_loss"], m["eval_recall"] = ev["loss"], ev["recall"]
            self.history.append({k: v for k, v in m.items() if k != "loss_per_layer"})
            yield m

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
    from transformers import LlamaConfig

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
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    return model


def _windows(args, model_name: str, tokenizer, split: str, n: int) -> torch.Tensor:
    if model_name == TINY_MODEL:
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        return torch.randint(0, 211, (n, args.seq_len), generator=g)
    from seerlib.data import token_windows

    return token_windows(tokenizer, split, args.seq_len, n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seerlib.distill",
        description="Train SeerAttention gates by self-distillation (single process or torchrun).",
    )
    p.add_argument("--model", default="smollm2", choices=["smollm2", TINY_MODEL])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--train-windows", type=int, default=256, help="windows of the train split")
    p.add_argument("--eval-windows", type=int, default=0, help="held-out windows of the eval split")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (windows per step)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--q-pool", default="avg", help="comma-separated ops of avg,max,min")
    p.add_argument("--k-pool", default="max,min,avg")
    p.add_argument("--d-gate", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/gates/gates.safetensors", help="the trained gate file")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument(
        "--checkpoint", default=None, help="training checkpoint path (default: <out>.ckpt)"
    )
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if present")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        from seerlib.data import MODEL_NAME, load_model

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
        q_pool=tuple(args.q_pool.split(",")),
        k_pool=tuple(args.k_pool.split(",")),
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
    out = Path(args.out)
    ckpt = (
        Path(args.checkpoint) if args.checkpoint else out.with_name(out.stem + ".ckpt.safetensors")
    )
    if args.resume and ckpt.exists():
        distiller.load_checkpoint(ckpt)
        say(f"resumed from {ckpt} at step {distiller.step}")
    curve = out.with_name(out.stem + ".loss.jsonl")
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if distiller.step == 0:
            curve.write_text("")
    t0 = time.time()
    for m in distiller.steps():
        if rank == 0:
            with curve.open("a") as f:
                f.write(json.dumps(m) + "\n")
            if m["step"] % 10 == 0 or m["step"] == cfg.steps or "eval_loss" in m:
                ev = f" eval {m['eval_loss']:.4f} {m['eval_recall']}" if "eval_loss" in m else ""
                say(
                    f"step {m['step']:5d} lr {m['lr']:.2e} loss {m['loss']:.4f} "
                    f"recall {m['recall']}{ev} ({time.time() - t0:.0f}s)"
                )
            if args.checkpoint_every and m["step"] % args.checkpoint_every == 0:
                distiller.save_checkpoint(ckpt)
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the base model's weights changed during training")
    if rank == 0:
        distiller.save_checkpoint(ckpt)
        last = distiller.history[-1] if distiller.history else {}
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
