"""Sparse methods: one function per method builds a layer's block mask, one registry names them,
and `SparseConfig` (method + Selection + attention path) describes a sparse prefill once.

- `METHODS`: name -> `Method`. Each method is a function `fn(layer: LayerInputs, selection) ->
  (B, Hq, nb, nb) bool`, registered with `@register_method(name, ...)`, which also says what the
  method needs (the gate, a ground-truth map) and which parts of a Selection it honours:
  - "dense": every causal block (the model's own attention runs);
  - "gate": AttnGate logits -> `select_blocks`;
  - "oracle-max" / "oracle-sum": the ground truth itself, the max-pooled attention map (the gate's
    training target, `ops.pooled_attention`) or the exact attention mass of each tile
    (`metrics.block_mass`), through `select_blocks`;
  - "sink_window": the first block(s) plus the latest blocks (StreamingLLM-like); "+sinkN" sets
    its sink blocks (1 by default);
  - "vertical_slash": per head, key-block columns and block diagonals ranked by the attention of
    the last query block (MInference-like).
- `SparseConfig`: what `sparsify` runs; its `label` ("gate+sink+local@r=0.3", "oracle-max@0.3",
  "dense") is read back by `parse_config`, so printing and parsing share one grammar
  (`seerlib.select.parse_selection` reads the Selection part).
- `PRESETS`: named configurations; "recommended" is the gate configuration that met the quality
  targets (README). Nothing else spells it out: use `preset("recommended")`.
- `resolve_config(x)`: a SparseConfig from a config, a preset name or a label.

With a density, "gate", "oracle-*" and "sink_window" keep the same k blocks per query-block row
(`select.density_to_k`), so their achieved densities are equal; "vertical_slash" takes whole lines
until the same number of blocks is met, so it lands near it, not on it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from seerlib import ops, patterns
from seerlib.metrics import block_mass
from seerlib.reference import causal_block_mask, check_block_size, num_blocks
from seerlib.select import Selection, parse_selection, select_blocks, topk_density

__all__ = [
    "ATTENTIONS",
    "METHODS",
    "PRESETS",
    "LayerInputs",
    "Method",
    "SparseConfig",
    "check_gate_inputs",
    "gate_block_mask",
    "gate_logits",
    "gate_scores",
    "ground_truth",
    "layer_block_mask",
    "parse_config",
    "pooled_features",
    "preset",
    "register_method",
    "resolve_config",
    "split_label",
    "split_method",
]

ATTENTIONS = ("ops", "flex")


@dataclass(frozen=True)
class LayerInputs:
    """What one attention layer offers a method (shapes checked by the methods that use them).

    Attributes:
        q: (B, Hq, S, d) post-RoPE queries; k, v: (B, Hkv, S, d) post-RoPE keys and values.
        block_size: tile size b.
        scale: score scale (1 / sqrt(d) by default).
        gate: the layer's AttnGate, for methods that need one.
        q_pre: (B, Hq, S, d), k_pre: (B, Hkv, S, d): the projections before RoPE (the gate's input).
        weights: (B, Hq, nb, nb) ground-truth map for the oracles (computed when None).
        softcap: the model's attention logit soft-cap (Gemma2), or None: the ground truth and the
            attention-based patterns are taken of the soft-capped attention.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    block_size: int
    scale: float | None = None
    gate: nn.Module | None = None
    q_pre: torch.Tensor | None = None
    k_pre: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    softcap: float | None = None

    @property
    def nb(self) -> int:
        return num_blocks(self.q.shape[2], self.block_size)

    def all_causal(self) -> torch.Tensor:
        """(B, Hq, nb, nb) bool: every causal block."""
        B, Hq = self.q.shape[:2]
        return causal_block_mask(self.nb, self.q.device).expand(B, Hq, self.nb, self.nb).clone()


MaskBuilder = Callable[[LayerInputs, Selection], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered method: its mask builder and what it needs and honours.

    Attributes:
        name: registry key and the label's first word.
        build: fn(layer, selection) -> (B, Hq, nb, nb) bool block mask.
        sparse: False for "dense" (the model's own attention runs; the stats count every block).
        needs_gate: reads the layer's gate (sparsify then needs `gates=`).
        ground_truth: "max" / "sum": selects from that ground-truth map (`LayerInputs.weights`).
        threshold: takes a threshold budget.
        rules: the Selection parts it honours beyond a density: "forced" (forced blocks, the
            diagonal switch), "budget" (layer budgets, row floors); or a tuple of the forced-block
            rule names it reads itself.
    """

    name: str
    build: MaskBuilder
    sparse: bool = True
    needs_gate: bool = False
    ground_truth: str | None = None
    threshold: bool = True
    rules: tuple[str, ...] = ("forced", "budget")

    def check(self, selection: Selection) -> None:
        """Raise ValueError when `selection` asks for something this method does not honour."""
        if not self.sparse:
            if selection.has_budget or selection.forced or selection.row_floor:
                raise ValueError(f"method {self.name!r} keeps every block; got "
                                 f"{selection.label() or selection}")
            return
        if not selection.has_budget:
            raise ValueError(f"method {self.name!r} needs a density or a threshold; got neither")
        if selection.tokens is not None:
            raise ValueError(f"method {self.name!r} is a prefill method; a token budget "
                             f"(tokens={selection.tokens}) is for decode (seerlib.decode)")
        if selection.threshold is not None and not self.threshold:
            raise ValueError(f"method {self.name!r} selects by density only; got "
                             f"threshold={selection.threshold}")
        forced = None if "forced" in self.rules else tuple(r for r in self.rules
                                                            if r != "budget")
        extra = selection.unsupported(forced, layer_budget="budget" in self.rules)
        if extra:
            raise ValueError(f"method {self.name!r} does not honour {', '.join(extra)}; it takes "
                             f"{list(self.rules) or 'a density only'}")


METHODS: dict[str, Method] = {}


def register_method(name: str, **options) -> Callable[[MaskBuilder], MaskBuilder]:
    """Register `fn(layer: LayerInputs, selection: Selection) -> (B, Hq, nb, nb) bool` as a
    method; `options` are `Method`'s fields (sparse, needs_gate, ground_truth, threshold, rules)."""
    if not name or any(c in name for c in "+@ "):
        raise ValueError(f"a method name has no '+', '@' or spaces; got {name!r}")

    def register(fn: MaskBuilder) -> MaskBuilder:
        METHODS[name] = Method(name, fn, **options)
        return fn

    return register


@register_method("dense", sparse=False)
def dense(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    return layer.all_causal()


def check_gate_inputs(gate, q_pre, k_pre) -> None:
    """Raise ValueError unless a "gate" layer has its gate and its pre-RoPE q_pre, k_pre."""
    if gate is None or q_pre is None or k_pre is None:
        raise ValueError("method 'gate' needs the layer's gate and its pre-RoPE q_pre, k_pre")


@register_method("gate", needs_gate=True)
def gate(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    check_gate_inputs(layer.gate, layer.q_pre, layer.k_pre)
    return gate_block_mask(layer.gate, *pooled_features(layer.gate, layer.q_pre, layer.k_pre),
                           selection)


def pooled_features(gate: nn.Module, q_pre: torch.Tensor, k_pre: torch.Tensor, out=None):
    """The gate's pooled q_pre, k_pre: `ops.pool_blocks` (one pass each, the kernel on CUDA), or,
    inside torch.compile and with no `out`, the gate's torch pooling, which inductor fuses itself.

    Args:
        q_pre: (B, Hq, S, d); k_pre: (B, Hkv, S, d).
        out: optional pair of buffers that receive them (a CUDA graph's static inputs).
    Returns:
        (B, Hq, nb, len(q_pool) * d), (B, Hkv, nb, len(k_pool) * d) float32: `out` when given.
    """
    if out is None and torch.compiler.is_compiling():
        return gate.pool(q_pre, k_pre)
    gate.check_pre(q_pre, k_pre)
    q_out, k_out = (None, None) if out is None else out
    return (ops.pool_blocks(q_pre, gate.block_size, gate.q_pool, out=q_out),
            ops.pool_blocks(k_pre, gate.block_size, gate.k_pool, out=k_out))


def gate_logits(gate: nn.Module, q_pooled: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
    """The gate's block logits for selection (no autograd) from its pooled features
    (`AttnGate.pool`'s output, or `ops.pool_blocks`').

    Args:
        q_pooled: (B, Hq, nb, len(q_pool) * d); k_pooled: (B, Hkv, nb, len(k_pool) * d).
    Returns:
        (B, Hq, nb, nb): `forward_pooled`'s logits on and below the block diagonal, the entries
        above it unspecified; from one launch on CUDA (`ops.gate_logits`, float32), else (and
        inside torch.compile, which fuses them itself) the gate's own ops in its dtype
        (`AttnGate.block_scores`).
    """
    with torch.no_grad():
        if torch.compiler.is_compiling():
            return gate.block_scores(q_pooled, k_pooled)
        return ops.gate_logits(gate, q_pooled, k_pooled)


def gate_scores(gate: nn.Module, q_pre: torch.Tensor, k_pre: torch.Tensor) -> torch.Tensor:
    """`gate_logits` of the gate's pooled q_pre (B, Hq, S, d), k_pre (B, Hkv, S, d): the
    (B, Hq, nb, nb) logits a gate layer's selection reads (entries above the block diagonal
    unspecified)."""
    return gate_logits(gate, *pooled_features(gate, q_pre, k_pre))


def gate_block_mask(gate: nn.Module, q_pooled: torch.Tensor, k_pooled: torch.Tensor,
                    selection: Selection) -> torch.Tensor:
    """The "gate" method's (B, Hq, nb, nb) bool mask: `gate_logits` through `select_blocks`."""
    return select_blocks(gate_logits(gate, q_pooled, k_pooled), selection)


def ground_truth(q, k, v, block_size: int, pooling: str, scale: float | None = None,
                 softcap: float | None = None):
    """The oracle's map (B, Hq, nb, nb): "max" = `ops.pooled_attention`'s max-pooled attention,
    "sum" = `metrics.block_mass`, the exact attention mass of each tile (rows sum to 1); of the
    soft-capped attention when `softcap` (the model's logit soft-cap) is given."""
    if pooling == "max":
        return ops.pooled_attention(q, k, k if v is None else v, block_size, scale=scale,
                                    softcap=softcap)[1]
    if pooling == "sum":
        return block_mass(q, k, block_size, scale=scale, softcap=softcap)
    raise ValueError(f"pooling must be 'max' or 'sum'; got {pooling!r}")


def _oracle(layer: LayerInputs, selection: Selection, pooling: str) -> torch.Tensor:
    w = layer.weights
    if w is None:
        w = ground_truth(layer.q, layer.k, layer.v, layer.block_size, pooling, layer.scale,
                         layer.softcap)
    B, Hq, S, _ = layer.q.shape
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (B, Hq, layer.nb, layer.nb):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(
            f"the oracle's ground-truth map has shape {got}; {S} tokens at block size "
            f"{layer.block_size} with {Hq} query heads need (B, Hq, nb, nb) = "
            f"{(B, Hq, layer.nb, layer.nb)} (oracle_weights from a pass over other tokens?)")
    if selection.threshold is not None or selection.budget != "row":
        # the log of the map, so that the row softmax is the row-normalized map
        return select_blocks(torch.log(w.float().clamp_min(0)), selection)
    return select_blocks(w.float(), selection)


@register_method("oracle-max", ground_truth="max")
def oracle_max(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    return _oracle(layer, selection, "max")


@register_method("oracle-sum", ground_truth="sum")
def oracle_sum(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    return _oracle(layer, selection, "sum")


@register_method("sink_window", threshold=False, rules=("sink",))
def sink_window(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    B, Hq = layer.q.shape[:2]
    return patterns.sink_window(layer.nb, selection.density, num_sink=selection.count("sink") or 1,
                                batch=B, num_heads=Hq, device=layer.q.device)


@register_method("vertical_slash", threshold=False, rules=())
def vertical_slash(layer: LayerInputs, selection: Selection) -> torch.Tensor:
    if selection.density == 1.0:  # its lines overlap, so a full budget of lines can miss blocks
        return layer.all_causal()
    # it fills a block budget; give it the budget the top-k methods really keep
    return patterns.vertical_slash(layer.q, layer.k, topk_density(selection.density, layer.nb),
                                   layer.block_size, scale=layer.scale, softcap=layer.softcap)


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class SparseConfig:
    """What a sparse prefill keeps and how it computes it (validated on construction).

    Attributes:
        method: a name in METHODS.
        selection: the Selection (budget, budget rule, forced blocks).
        block_size: tile size b.
        attention: "ops" (the dispatch point) or "flex" (FlexAttention with a BlockMask).
        compile_flex: compile FlexAttention (needed for speed; eager flex computes every score).
    """

    method: str
    selection: Selection = field(default_factory=Selection)
    block_size: int = 64
    attention: str = "ops"
    compile_flex: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {tuple(METHODS)}")
        if not isinstance(self.selection, Selection):
            raise ValueError(f"selection must be a seerlib Selection; got "
                             f"{type(self.selection).__name__}")
        if not METHODS[self.method].sparse and self.selection.density == 1.0:
            object.__setattr__(self, "selection", Selection())  # dense keeps everything anyway
        METHODS[self.method].check(self.selection)
        check_block_size(self.block_size)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}; got {self.attention!r}")

    @property
    def spec(self) -> Method:
        """The registered Method."""
        return METHODS[self.method]

    @property
    def label(self) -> str:
        """The short name tables use and `parse_config` reads: "gate+sink@0.3", "oracle-sum@t=0.01",
        "gate+sink+local+last@a=0.3", "dense"."""
        return self.method + self.selection.label()

    def at(self, density: float | None = None, threshold: float | None = None) -> SparseConfig:
        """The same config at another budget (a sweep point)."""
        return replace(self, selection=replace(self.selection, density=density,
                                               threshold=threshold))


def split_method(text: str) -> tuple[str, str]:
    """(method name, the rest) of a label or a series name: "gate+sink@0.3" -> ("gate",
    "+sink@0.3"), "gate+sink relative" -> ("gate", "+sink relative")."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"a config label is a non-empty string; got {text!r}")
    name = re.split(r"[+@ ]", text, maxsplit=1)[0]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {text!r}; expected one of "
                         f"{tuple(METHODS)} or a preset {tuple(PRESETS)}")
    return name, text[len(name):]


def split_label(label: str) -> tuple[str, Selection]:
    """(method name, Selection) of a label, the method's own checks not applied (a series name
    such as "gate+sink" has no budget yet)."""
    name, rest = split_method(label)
    return name, parse_selection(rest)


def parse_config(label: str, block_size: int = 64, attention: str = "ops") -> SparseConfig:
    """A SparseConfig from its label: the method name, then the Selection's tokens
    (`select.parse_selection`): "dense", "gate@0.3", "gate@t=0.002", "oracle-max@0.3",
    "sink_window@0.2", "vertical_slash@0.1", "gate+sink+local+floor0.25@r=0.2". Older result files'
    labels use the same grammar and read back unchanged."""
    name, selection = split_label(label)
    return SparseConfig(name, selection, block_size=block_size, attention=attention)


PRESETS: dict[str, SparseConfig] = {
    # the gate configuration chosen on training text (bench/tune_selection.py) that met the
    # quality targets: sink and local block forced, the relative budget, a row floor of 0.5
    "recommended": SparseConfig("gate", Selection(density=0.3, budget="relative", row_floor=0.5,
                                                  forced={"sink": 1, "local": 1})),
}


def preset(name: str, **changes) -> SparseConfig:
    """A named preset, with `changes` to SparseConfig's fields (block_size=, attention=)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return replace(PRESETS[name], **changes)


def resolve_config(config, block_size: int | None = None,
                   attention: str | None = None) -> SparseConfig:
    """A SparseConfig from a SparseConfig, a preset name or a label; `block_size` / `attention`
    replace the config's own when given."""
    if isinstance(config, str):
        config = PRESETS[config] if config in PRESETS else parse_config(config)
    if not isinstance(config, SparseConfig):
        raise ValueError(f"expected a SparseConfig, a preset name {tuple(PRESETS)} or a label "
                         f"like 'gate@0.3'; got {type(config).__name__}")
    changes = {k: v for k, v in (("block_size", block_size), ("attention", attention))
               if v is not None}
    return replace(config, **changes) if changes else config


def layer_block_mask(cfg: SparseConfig, layer: LayerInputs) -> torch.Tensor:
    """One layer's block selection under `cfg` (what `sparsify` runs inside each layer).

    Returns:
        (B, Hq, nb, nb) bool, False above the block diagonal.
    """
    return cfg.spec.build(layer, cfg.selection)


@functools.cache
def compiled_layer_block_mask() -> Callable[[SparseConfig, LayerInputs], torch.Tensor]:
    """`layer_block_mask` through `torch.compile` (inductor, static shapes), built once.

    The gate's pooling, projections, block RoPE and logits and the selection (top-k, threshold,
    layer budgets, forced blocks) are some 50 small operations per layer; compiled, they fuse into
    a few kernels. Every layer of one shape and config shares a compiled graph; the first call at
    a new shape compiles (seconds). The masks are those of `layer_block_mask` (tested).
    """
    return torch.compile(layer_block_mask, dynamic=False)


@functools.cache
def compiled_gate_block_mask() -> Callable[..., torch.Tensor]:
    """`gate_block_mask` through `torch.compile` (inductor, static shapes), built once: what a
    graphed gate layer replays (`seerlib.integrate`), the same masks as eager (tested)."""
    return torch.compile(gate_block_mask, dynamic=False)


@functools.cache
def compiled_gate_logits() -> Callable[..., torch.Tensor]:
    """`gate_logits` through `torch.compile` (inductor, static shapes), built once: the gate's
    projections, block RoPE and logits in a few kernels instead of some fifteen, for a graphed
    gate layer whose top-k and index are one launch (`ops.select_index`). The same logits as
    eager up to rounding (tested)."""
    return torch.compile(gate_logits, dynamic=False)


@functools.cache
def compiled_gate_scores() -> Callable[..., torch.Tensor]:
    """`gate_scores` (pooling included) through `torch.compile`, built once: what an eager gate
    layer on the kernel path runs under `compile_selection` before `ops.select_index`."""
    return torch.compile(gate_scores, dynamic=False)
