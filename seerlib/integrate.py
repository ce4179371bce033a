"""SeerAttention inside a transformers model: block-sparse prefill in one line.

    with sparsify(model, "gate", gates=gates, density=0.3) as sp:
        logits = model(input_ids).logits
    print(sp.stats.achieved_density)

Every attention layer is routed through a function of ours registered in transformers'
AttentionInterface (`seerlib.capture.attention_override`); the gate reads the pre-RoPE Q/K taken by
forward hooks (`seerlib.capture.pre_rope_hooks`). No modeling code is copied. On exit the model's
previous attention is restored. `sparsify(...).enable()` is the permanent form (`.disable()` undoes
it).

Modes (which blocks a prefill keeps):
- "dense": the model's own attention (the stats still count every block).
- "gate": AttnGate logits -> `select_blocks` (top-k by `density`, or `threshold`).
- "oracle": the ground truth itself, `pooling="max"` (max-pooled attention map, the gate's training
  target, `ops.pooled_attention`) or `pooling="sum"` (the exact attention mass of each tile,
  `metrics.block_mass`): top-k by `density`, or `threshold` on the row-normalized map.
- "sink_window": the first block(s) plus the latest blocks (StreamingLLM-like).
- "vertical_slash": per head, key-block columns and block diagonals ranked by the attention of the
  last query block (MInference-like).

With a `density`, "gate", "oracle" and "sink_window" keep the same k blocks per query-block row
(`select.density_to_k`), so their achieved densities are equal; "vertical_slash" takes whole lines
until the same number of blocks is met, so it lands near it, not on it. `sp.stats` reports what was
kept.

Single-token decode steps (and any call whose query is shorter than its keys, i.e. a cached
continuation) stay dense. The block-sparse product goes through `seerlib.ops` (Triton on CUDA, the
exact reference on CPU) or, with `attention="flex"`, through FlexAttention with the selection's
`BlockMask` (`to_flex_block_mask`), compiled: on CPU this is the fast path (it skips dropped tiles;
the reference computes every score).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from seerlib import ops
from seerlib.capture import attention_layers, attention_override, pre_rope_hooks
from seerlib.reference import check_block_size, mask_to_index, num_blocks
from seerlib.select import check_budget_options

__all__ = [
    "ATTENTIONS",
    "MODES",
    "POOLINGS",
    "SparseConfig",
    "Sparsified",
    "SparsityStats",
    "layer_block_mask",
    "sparsify",
    "sparsify_config",
    "to_flex_block_mask",
]

MODES = ("dense", "gate", "oracle", "sink_window", "vertical_slash")
POOLINGS = ("max", "sum")
ATTENTIONS = ("ops", "flex")
_DENSITY_ONLY = ("sink_window", "vertical_slash")


@dataclass(frozen=True)
class SparseConfig:
    """What a sparse prefill keeps and how it computes it (validated on construction).

    Attributes:
        mode: one of MODES.
        density: target kept share of the causal blocks, in (0, 1] (top-k per row).
        threshold: keep blocks whose softmax score over the row exceeds it ("gate", "oracle").
        block_size: tile size b.
        pooling: "oracle" ground truth, "max" (pooled map) or "sum" (attention mass).
        num_sink: leading key blocks of "sink_window".
        keep_sink: "gate"/"oracle": also always keep key block 0 (counts toward k).
        keep_local: "gate"/"oracle": also always keep the this-many key blocks left of the
            diagonal (counts toward k).
        dense_last_rows: "gate"/"oracle": keep the last this-many query-block rows dense.
        adaptive: "gate"/"oracle" with a density: top-k's block budget spread over all heads and
            rows of the layer by row-softmax score (`select_blocks(adaptive=True)`).
        relative: with `adaptive`, rank by the score relative to a uniform row (softmax × the
            row's causal block count), so long rows are not starved (`select_blocks`).
        row_floor: with `adaptive`, in [0, 1]: every row keeps at least ceil(row_floor × top-k's
            count for the row) of its best blocks, out of the same budget (`select_blocks`).
        attention: "ops" (the dispatch point) or "flex" (FlexAttention with a BlockMask).
        compile_flex: compile FlexAttention (needed for speed; eager flex computes every score).
    """

    mode: str
    density: float | None = None
    threshold: float | None = None
    block_size: int = 64
    pooling: str = "max"
    num_sink: int = 1
    keep_sink: bool = False
    keep_local: int = 0
    dense_last_rows: int = 0
    adaptive: bool = False
    relative: bool = False
    row_floor: float = 0.0
    attention: str = "ops"
    compile_flex: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        check_block_size(self.block_size)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}; got {self.attention!r}")
        if self.density is not None and self.threshold is not None:
            raise ValueError(
                f"give density or threshold, not both; got density={self.density}, "
                f"threshold={self.threshold}"
            )
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1); got {self.threshold}")
        if self.mode == "dense":
            if self.threshold is not None or self.density not in (None, 1.0):
                raise ValueError(
                    f"mode 'dense' keeps every block; got density={self.density}, "
                    f"threshold={self.threshold}"
                )
        elif self.density is None and self.threshold is None:
            raise ValueError(f"mode {self.mode!r} needs a density or a threshold; got neither")
        if self.mode in _DENSITY_ONLY and self.threshold is not None:
            raise ValueError(
                f"mode {self.mode!r} selects by density only; got threshold={self.threshold}"
            )
        if self.adaptive and (self.mode not in ("gate", "oracle") or self.density is None):
            raise ValueError(
                f"adaptive selection needs mode 'gate' or 'oracle' with a density; got mode "
                f"{self.mode!r}, density={self.density}"
            )
        check_budget_options(self.adaptive, self.relative, self.row_floor)
        if self.num_sink < 0 or self.dense_last_rows < 0 or self.keep_local < 0:
            raise ValueError(
                f"num_sink, dense_last_rows and keep_local must be >= 0; got {self.num_sink}, "
                f"{self.dense_last_rows}, {self.keep_local}"
            )

    @property
    def label(self) -> str:
        """A short name for tables: "oracle-max@0.3", "gate@t=0.001", "gate+sink@0.3",
        "gate+sink+local@a=0.3" (sink, one local block, adaptive), "gate+sink+local+last@a=0.3"
        (and the last query-block row dense), "gate+sink+local@r=0.3" (relative adaptive),
        "gate+sink+local+floor0.5@a=0.3" (adaptive, every row at least half its top-k blocks),
        "dense"."""
        name = f"oracle-{self.pooling}" if self.mode == "oracle" else self.mode
        name += "+sink" if self.keep_sink else ""
        if self.keep_local:
            name += "+local" + (str(self.keep_local) if self.keep_local > 1 else "")
        if self.dense_last_rows:
            name += "+last" + (str(self.dense_last_rows) if self.dense_last_rows > 1 else "")
        if self.row_floor:
            name += f"+floor{self.row_floor:g}"
        if self.adaptive:
            return f"{name}@{'r' if self.relative else 'a'}={self.density:g}"
        if self.density is not None and self.mode != "dense":
            return f"{name}@{self.density:g}"
        if self.threshold is not None:
            return f"{name}@t={self.threshold:g}"
        return name


@dataclass
class SparsityStats:
    """What the sparse prefills kept, summed over layers and calls since the last `reset()`.

    Attributes:
        kept_blocks: kept causal (query block, key block) tiles, over batch and heads.
        causal_blocks: causal tiles there were.
        per_layer: {layer: [kept, causal]}.
        prefill_calls: attention calls that ran sparse (or counted, in "dense" mode).
        dense_calls: calls that stayed dense (decode steps, cached continuations).
    """

    kept_blocks: int = 0
    causal_blocks: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)
    prefill_calls: int = 0
    dense_calls: int = 0

    @property
    def achieved_density(self) -> float:
        """Kept share of the causal tiles over every sparse prefill (nan before any)."""
        return self.kept_blocks / self.causal_blocks if self.causal_blocks else float("nan")

    def layer_density(self, layer: int) -> float:
        kept, causal = self.per_layer[layer]
        return kept / causal

    def add(self, layer: int, mask: torch.Tensor) -> None:
        kept, causal = count_blocks(mask)
        self.kept_blocks += kept
        self.causal_blocks += causal
        row = self.per_layer.setdefault(layer, [0, 0])
        row[0] += kept
        row[1] += causal
        self.prefill_calls += 1

    def reset(self) -> None:
        self.kept_blocks = self.causal_blocks = self.prefill_calls = self.dense_calls = 0
        self.per_layer.clear()

    def as_dict(self) -> dict:
        return {
            "achieved_density": self.achieved_density,
            "kept_blocks": self.kept_blocks,
            "causal_blocks": self.causal_blocks,
            "prefill_calls": self.prefill_calls,
            "dense_calls": self.dense_calls,
        }


# ---------------------------------------------------------------- FlexAttention


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def to_flex_block_mask(block_mask: torch.Tensor, seq_len: int, block_size: int = 64,
                       mask_mod_from_blocks: bool = False):
    """A FlexAttention `BlockMask` computing exactly the kept tiles of a selection, causally.

    Kept tiles strictly below the diagonal are passed as full blocks (no per-score mask), the
    diagonal tiles as partial blocks with the causal `mask_mod`. Compiled `flex_attention` visits
    only the listed blocks; uncompiled (eager) `flex_attention` ignores the block lists and applies
    `mask_mod` to every score, so for eager use pass `mask_mod_from_blocks=True`, which also encodes
    the selection in `mask_mod` (a new function per call: under torch.compile it would recompile).

    Args:
        block_mask: (B, H, nb, nb) bool, nb = ceil(seq_len / block_size); tiles above the block
            diagonal are ignored.
        seq_len: S, query and key length.
        block_size: tile size b.
        mask_mod_from_blocks: make `mask_mod` causal AND in a kept tile (eager flex_attention).
    Returns:
        torch.nn.attention.flex_attention.BlockMask with BLOCK_SIZE (b, b) and seq_lengths (S, S);
        its `to_dense()` (cropped to nb x nb) equals the causal part of `block_mask`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b = check_block_size(block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        got = block_mask.dtype if torch.is_tensor(block_mask) else type(block_mask).__name__
        raise ValueError(f"block_mask must be a torch.bool tensor (B, H, nb, nb); got {got}")
    nb = num_blocks(seq_len, b)
    if block_mask.dim() != 4 or tuple(block_mask.shape[-2:]) != (nb, nb):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; seq_len {seq_len} at block size {b} "
            f"needs (B, H, {nb}, {nb})"
        )
    eye = torch.eye(nb, dtype=torch.bool, device=block_mask.device)
    below = torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril(-1)
    partial_counts, partial_idx = mask_to_index(block_mask & eye)
    full_counts, full_idx = mask_to_index(block_mask & below)
    mask_mod = _causal_mask_mod
    if mask_mod_from_blocks:
        kept = block_mask.tril()

        def mask_mod(b_, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & kept[b_, h, q_idx // b, kv_idx // b]

    # entries past each row's count are -1 in mask_to_index; flex reads only the first `count`
    # entries in its kernels but its dense conversion indexes them all, so keep them in range
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_idx.clamp_min(0),
        full_counts,
        full_idx.clamp_min(0),
        BLOCK_SIZE=b,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


_COMPILED_FLEX = None


def _flex(compiled: bool):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _sparse_attention(q, k, v, mask, cfg: SparseConfig, scale: float) -> torch.Tensor:
    """(B, Hq, S, d) block-sparse attention of the kept tiles, by the configured path."""
    if cfg.attention == "ops":
        return ops.block_sparse_attention(q, k, v, mask, cfg.block_size, scale=scale)
    bm = to_flex_block_mask(mask, q.shape[2], cfg.block_size,
                            mask_mod_from_blocks=not cfg.compile_flex)
    fn = _flex(cfg.compile_flex)
    kw = {}
    if q.is_cuda and cfg.block_size < 128:
        # the CUDA kernel's default tiles (128) must divide the mask's block size
        kw["kernel_options"] = {"BLOCK_M": cfg.block_size, "BLOCK_N": cfg.block_size}
    with _warnings_off():
        return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kw)


@contextlib.contextmanager
def _warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- selection


def _threshold_scores(weights: torch.Tensor) -> torch.Tensor:
    """Log of a non-negative map, so that `select_blocks`' row softmax is the row-normalized map."""
    return torch.log(weights.float().clamp_min(0))


def layer_block_mask(
    cfg: SparseConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    gate: nn.Module | None = None,
    q_pre: torch.Tensor | None = None,
    k_pre: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One layer's block selection under `cfg` (what `sparsify` runs inside each layer).

    Args:
        cfg: the SparseConfig.
        q: (B, Hq, S, d) post-RoPE queries; k, v: (B, Hkv, S, d) post-RoPE keys and values.
        gate: the layer's AttnGate ("gate" mode), reading q_pre (B, Hq, S, d) and
            k_pre (B, Hkv, S, d), the projections before RoPE.
        weights: (B, Hq, nb, nb) ground-truth map for "oracle" (max-pooled or mass, per
            cfg.pooling); computed from q, k, v when None.
        scale: score scale (1 / sqrt(d) by default).
    Returns:
        (B, Hq, nb, nb) bool, False above the block diagonal.
    """
    from seerlib import patterns
    from seerlib.select import causal_block_mask, select_blocks

    B, Hq, S, _ = q.shape
    b = cfg.block_size
    nb = num_blocks(S, b)
    # forced blocks and the budget rule (adaptive/relative are False on the oracle's top-k path)
    extras = dict(keep_sink=cfg.keep_sink, keep_local=cfg.keep_local,
                  dense_last_rows=cfg.dense_last_rows, adaptive=cfg.adaptive,
                  relative=cfg.relative, row_floor=cfg.row_floor)
    if cfg.mode == "dense":
        return causal_block_mask(nb, q.device).expand(B, Hq, nb, nb).clone()
    if cfg.mode == "gate":
        if gate is None or q_pre is None or k_pre is None:
            raise ValueError("mode 'gate' needs the layer's gate and its pre-RoPE q_pre, k_pre")
        with torch.no_grad():
            logits = gate(q_pre, k_pre)
        return select_blocks(logits, density=cfg.density, threshold=cfg.threshold, **extras)
    if cfg.mode == "oracle":
        if weights is None:
            weights = ground_truth(q, k, v, b, cfg.pooling, scale)
        if cfg.threshold is not None or cfg.adaptive:
            return select_blocks(_threshold_scores(weights), density=cfg.density,
                                 threshold=cfg.threshold, **extras)
        if cfg.keep_sink or cfg.keep_local or cfg.dense_last_rows:
            return select_blocks(weights.float(), density=cfg.density, **extras)
        return patterns.oracle(weights, cfg.density)
    if cfg.mode == "sink_window":
        return patterns.sink_window(nb, cfg.density, num_sink=cfg.num_sink, batch=B,
                                    num_heads=Hq, device=q.device)
    if cfg.density == 1.0:  # its lines overlap, so a full budget of lines can miss blocks
        return causal_block_mask(nb, q.device).expand(B, Hq, nb, nb).clone()
    # vertical_slash fills a block budget; give it the budget the top-k modes really keep
    return patterns.vertical_slash(q, k, topk_density(cfg.density, nb), b, scale=scale)


def topk_density(density: float, nb: int) -> float:
    """The kept share of causal blocks of top-k selection at `density` with nb blocks: row i keeps
    min(i + 1, k) of its i + 1 blocks, k = `select.density_to_k(density, nb)` (at 4096 tokens and
    block 64, density 0.3 keeps 0.286)."""
    from seerlib.select import density_to_k

    k = density_to_k(density, nb)
    return sum(min(i + 1, k) for i in range(nb)) / (nb * (nb + 1) / 2)


def ground_truth(q, k, v, block_size: int, pooling: str, scale: float | None = None):
    """The oracle's map (B, Hq, nb, nb): "max" = `ops.pooled_attention`'s max-pooled attention,
    "sum" = `metrics.block_mass`, the exact attention mass of each tile (rows sum to 1)."""
    from seerlib.metrics import block_mass

    if pooling == "max":
        if v is None:
            v = k
        return ops.pooled_attention(q, k, v, block_size, scale=scale)[1]
    if pooling == "sum":
        return block_mass(q, k, block_size, scale=scale)
    raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")


# ---------------------------------------------------------------- the model switch


def _check_gates(gates, model, block_size: int) -> None:
    from seerlib.gate import GateSet
    from seerlib.io import config_hash

    if not isinstance(gates, GateSet):
        raise ValueError(
            f"mode 'gate' needs a seerlib GateSet (see seerlib.io.load_gates); got "
            f"{type(gates).__name__}"
        )
    layers = attention_layers(model)
    cfg = model.config
    have, want = config_hash(gates.config), config_hash(cfg)
    if have != want:
        raise ValueError(
            f"these gates were built for model {gates.model_name!r} (config hash {have}); this "
            f"model {getattr(cfg, '_name_or_path', '') or type(model).__name__!r} hashes to {want}"
        )
    if len(gates) != len(layers):
        raise ValueError(f"the gate set has {len(gates)} layers; the model has {len(layers)}")
    if gates.block_size != block_size:
        raise ValueError(
            f"the gates work at block size {gates.block_size}; sparsify was given {block_size}"
        )


class Sparsified:
    """A model switched (or switchable) to block-sparse prefill. Made by `sparsify`.

    Use as a context manager (`with sparsify(...) as sp:`) or permanently (`sp.enable()`, later
    `sp.disable()`). `sp.stats` is a SparsityStats; `sp.masks` holds the last prefill's selection
    per layer when `record_masks=True`.
    """

    def __init__(self, model: nn.Module, cfg: SparseConfig, gates=None, weights=None,
                 record_masks: bool = False):
        self.model, self.config, self.gates = model, cfg, gates
        self.weights = weights
        self.record_masks = record_masks
        self.masks: dict[int, torch.Tensor] = {}
        self.stats = SparsityStats()
        self._stack: contextlib.ExitStack | None = None
        self._pre: dict = {}

    @property
    def enabled(self) -> bool:
        return self._stack is not None

    def enable(self) -> Sparsified:
        """Switch the model's attention to ours until `disable()`; returns self."""
        if self._stack is not None:
            raise RuntimeError("this sparsify handle is already enabled")
        stack = contextlib.ExitStack()
        try:
            if self.config.mode == "gate":
                stack.enter_context(pre_rope_hooks(self.model, self._pre))
            stack.enter_context(attention_override(self.model, self._attend))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def disable(self) -> None:
        """Restore the model's previous attention (a no-op when not enabled)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._pre.clear()

    def __enter__(self) -> Sparsified:
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        dens = self.stats.achieved_density
        return f"Sparsified({self.config.label}, {state}, density={dens:.3f})"

    def _attend(self, module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        pre = self._pre.pop(layer, None)
        B, Hq, Sq, d = query.shape
        Sk = key.shape[2]
        if Sq != Sk or Sq == 1:
            self.stats.dense_calls += 1
            return default(module, query, key, value, attention_mask, **kwargs)
        _check_no_padding(attention_mask, Sq)
        cfg = self.config
        scale = kwargs.get("scaling")
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        gate = self.gates[layer] if self.gates is not None else None
        weights = self.weights.get(layer) if self.weights is not None else None
        mask = layer_block_mask(
            cfg, query, key, value, gate=gate,
            q_pre=pre["q_pre"] if pre else None, k_pre=pre["k_pre"] if pre else None,
            weights=weights, scale=scale,
        )
        self.stats.add(layer, mask)
        if self.record_masks:
            self.masks[layer] = mask
        if cfg.mode == "dense":
            return default(module, query, key, value, attention_mask, **kwargs)
        out = _sparse_attention(query, key, value, mask, cfg, scale)  # (B, Hq, S, d)
        return out.transpose(1, 2).contiguous(), None  # (B, S, Hq, d), like transformers


def count_blocks(mask: torch.Tensor) -> tuple[int, int]:
    """(kept causal tiles, all causal tiles) of a (B, H, nb, nb) block mask."""
    B, H, nb, _ = mask.shape
    return int(mask.tril().sum()), B * H * nb * (nb + 1) // 2


def _check_no_padding(attention_mask, S: int) -> None:
    """Sparse prefill assumes plain causal attention: refuse padding masks."""
    if attention_mask is None:
        return
    m = attention_mask[..., -S:, -S:]
    allowed = m if m.dtype == torch.bool else m == 0  # additive float masks: 0 where allowed
    causal = torch.ones(S, S, dtype=torch.bool, device=m.device).tril()
    ok = bool((allowed == causal).all())
    if not ok:
        raise NotImplementedError(
            "sparse prefill takes plain causal attention only; got an attention mask with padding "
            "or other masked positions (run batches of equal-length, unpadded sequences)"
        )


def sparsify(
    model: nn.Module,
    mode: str,
    *,
    gates=None,
    density: float | None = None,
    threshold: float | None = None,
    block_size: int | None = None,
    pooling: str = "max",
    num_sink: int = 1,
    keep_sink: bool = False,
    keep_local: int = 0,
    dense_last_rows: int = 0,
    adaptive: bool = False,
    relative: bool = False,
    row_floor: float = 0.0,
    attention: str = "ops",
    compile_flex: bool = True,
    oracle_weights: dict[int, torch.Tensor] | None = None,
    record_masks: bool = False,
) -> Sparsified:
    """Make a transformers Llama-family model run block-sparse prefill.

    Args:
        model: the transformers causal LM (its attention layers need q/k/v projections).
        mode: "dense" | "gate" | "oracle" | "sink_window" | "vertical_slash" (module docstring).
        gates: a `GateSet` for this model (mode "gate"), e.g. `seerlib.io.load_gates(path, model)`.
        density: target kept share of the causal blocks, in (0, 1] (top-k per query-block row).
            density=1.0 keeps everything and reproduces dense logits.
        threshold: "gate"/"oracle": keep blocks whose softmax score over the row exceeds it.
        block_size: tile size b; default the gates' block size in "gate" mode, else 64.
        pooling: "oracle" ground truth, "max" or "sum".
        num_sink: leading key blocks of "sink_window".
        keep_sink, keep_local, dense_last_rows: "gate"/"oracle" forced blocks (see
            `select_blocks`).
        adaptive: "gate"/"oracle" with a density: keep top-k's number of blocks per layer, spread
            over heads and rows by row-softmax score (`select_blocks(adaptive=True)`); the
            achieved density equals top-k's.
        relative: with `adaptive`, rank by the score relative to a uniform row, so long rows
            (the last ones, where a prompt's question sits) are not starved of blocks.
        row_floor: with `adaptive`, in [0, 1]: each row first keeps ceil(row_floor × top-k's count
            for it) of its best blocks, out of the same budget.
        attention: "ops" (seerlib.ops dispatch point) or "flex" (FlexAttention BlockMask).
        compile_flex: compile FlexAttention (leave on except for tiny tests).
        oracle_weights: {layer: (B, Hq, nb, nb)} ground-truth maps to select from instead of
            computing them inside each layer (e.g. from a dense pass over the same tokens).
        record_masks: keep the last prefill's block mask of each layer in `.masks`.
    Returns:
        A `Sparsified` handle: a context manager, or `.enable()` for the permanent form.
    Raises:
        ValueError: unknown mode, both density and threshold, neither (sparse modes), a threshold
            for a density-only mode, gates missing or made for another model or block size.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if block_size is None:
        block_size = getattr(gates, "block_size", 64) if mode == "gate" else 64
    cfg = SparseConfig(
        mode=mode, density=density, threshold=threshold, block_size=block_size, pooling=pooling,
        num_sink=num_sink, keep_sink=keep_sink, keep_local=keep_local,
        dense_last_rows=dense_last_rows, adaptive=adaptive, relative=relative, row_floor=row_floor,
        attention=attention, compile_flex=compile_flex,
    )
    if mode == "gate":
        if gates is None:
            raise ValueError("mode 'gate' needs gates=GateSet (see seerlib.io.load_gates)")
        _check_gates(gates, model, block_size)
    elif gates is not None:
        raise ValueError(f"gates are only used by mode 'gate'; got mode {mode!r} with gates")
    if oracle_weights is not None and mode != "oracle":
        raise ValueError(f"oracle_weights are only used by mode 'oracle'; got mode {mode!r}")
    attention_layers(model)  # fails early on a model without attention layers
    return Sparsified(model, cfg, gates=gates, weights=oracle_weights, record_masks=record_masks)


def sparsify_config(model: nn.Module, cfg: SparseConfig, *, gates=None, **kwargs) -> Sparsified:
    """`sparsify` with every setting taken from a SparseConfig (e.g. `eval.parse_config(spec)`).

    `gates` are passed on in "gate" mode only, so one GateSet can serve a list of configs of
    several modes; `kwargs` are `sparsify`'s other arguments (oracle_weights, record_masks).
    """
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "mode"}
    return sparsify(model, cfg.mode, gates=gates if cfg.mode == "gate" else None, **settings,
                    **kwargs)
