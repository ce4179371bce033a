"""Decode methods: one function per method scores the key blocks of decode queries, one registry
names them, and `DecodeConfig` (method + Selection + block size) describes a decode sparsity once.

- `DECODE_METHODS`: name -> `DecodeMethod`. Each method is `fn(inputs: DecodeInputs) ->
  (B, Hkv, Sq, nb)` block scores (higher = read first), registered with
  `@register_decode_method(name, ...)`; `seerlib.decode.select.select_decode` spends the
  Selection's budget on them. One selection per kv group, as the sparse decode kernel reads it:
  - "dense": every block (the model's own attention runs);
  - "gate": the SeerAttention-R decode gate (`seerlib.decode.gate.DecodeGate`);
  - "quest": Quest (Tang et al. 2024) with pages of one block: per block the element-wise min and
    max of the (post-RoPE) keys; a query's upper bound of q·k over the block is
    sum_i max(q_i min_i, q_i max_i); the group's score is the max over its query heads;
  - "sink_window": the first block and the most recent ones (StreamingLLM): block 0 ranks first,
    then the blocks by recency (forced sink blocks add more at the start);
  - "oracle": the true block scores (`ops`/`reference.decode_block_truth`: the attention, max-pooled
    over each block and over the group's heads), the gate's training target: its top-k is the best
    any block-score predictor can do. Of the soft-capped attention on a model that caps its
    logits (Gemma2, `DecodeInputs.softcap`); Quest's bound needs no cap: c * tanh(x / c) is
    increasing, so it ranks the blocks alike.
  - "oracle_mass": the blocks by the group's mean attention mass (`decode_block_truth(...,
    pooling="mass")`): the selection of highest recall of attention mass; beside the max-pooled
    oracle it shows whether ranking by peaks or by mass keeps what perplexity needs.
- `DecodeConfig.label` ("gate+sink@tok=1024", "quest@tok=512", "dense") is read back by
  `parse_decode_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from seerlib import ops
from seerlib.reference import check_block_size, decode_block_truth, default_scale, num_blocks
from seerlib.select import Selection, parse_selection

from .select import check_decode_selection

__all__ = [
    "DECODE_METHODS",
    "DecodeConfig",
    "DecodeInputs",
    "DecodeMethod",
    "decode_scores",
    "gate_step",
    "config_series",
    "parse_decode_config",
    "register_decode_method",
    "step_index",
]


@dataclass(frozen=True)
class DecodeInputs:
    """What one attention layer offers a decode method.

    Attributes:
        q: (B, Hq, Sq, d) post-RoPE queries at `positions`; k: (B, Hkv, S, d) post-RoPE keys.
        positions: (Sq,) token positions of the queries (S - Sq .. S - 1 for a teacher-forced
            window or one decode step).
        block_size: b.
        scale: score scale (1 / sqrt(d) by default).
        gate: the layer's DecodeGate (method "gate").
        q_pre: (B, Hq, Sq, d) pre-RoPE queries (the gate's input).
        k_pre: (B, Hkv, S, d) pre-RoPE keys, or None when `k_gate` is given.
        k_gate: (B, Hkv, n, d_gate) gate keys of the first n full blocks (the K-compression
            cache), instead of pooling k_pre again.
        softcap: the model's attention logit soft-cap (Gemma2), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    block_size: int
    scale: float | None = None
    gate: nn.Module | None = None
    q_pre: torch.Tensor | None = None
    k_pre: torch.Tensor | None = None
    k_gate: torch.Tensor | None = None
    softcap: float | None = None

    @property
    def nb(self) -> int:
        return num_blocks(self.k.shape[2], self.block_size)


Scorer = Callable[[DecodeInputs], torch.Tensor]
# fn(inputs, selection, max_blocks) -> (block_index, block_count): a method's own decode step
StepIndex = Callable[[DecodeInputs, Selection, "int | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DecodeMethod:
    """A registered decode method: its scorer and what it needs.

    Attributes:
        name: registry key and the label's first word.
        scores: fn(inputs) -> (B, Hkv, Sq, nb) float block scores.
        sparse: False for "dense".
        needs_gate: reads the layer's DecodeGate (`decode_gates=`).
        step: optional fn(inputs, selection, max_blocks) -> (block_index, block_count) of
            one decode step (`step_index`), a faster path to what `scores` then
            `ops.decode_select` give; None: those two.
    """

    name: str
    scores: Scorer
    sparse: bool = True
    needs_gate: bool = False
    step: StepIndex | None = None

    def check(self, selection: Selection) -> None:
        """Raise ValueError when `selection` has no meaning for this method at decode."""
        check_decode_selection(selection)
        if not self.sparse and (selection.has_budget or selection.forced):
            raise ValueError(f"decode method {self.name!r} reads every block; got "
                             f"{selection.label()}")
        if self.sparse and not selection.has_budget:
            raise ValueError(f"decode method {self.name!r} needs a token budget (tok=N), a "
                             "threshold or a density; got none")


DECODE_METHODS: dict[str, DecodeMethod] = {}


def register_decode_method(name: str, **options) -> Callable[[Scorer], Scorer]:
    """Register `fn(inputs: DecodeInputs) -> (B, Hkv, Sq, nb)` scores as a decode method;
    `options` are `DecodeMethod`'s fields (sparse, needs_gate, step)."""
    if not name or any(c in name for c in "+@ "):
        raise ValueError(f"a method name has no '+', '@' or spaces; got {name!r}")

    def register(fn: Scorer) -> Scorer:
        DECODE_METHODS[name] = DecodeMethod(name, fn, **options)
        return fn

    return register


def _group_max(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hq, Sq, nb) -> (B, Hkv, Sq, nb): the max over each kv group's query heads."""
    B, Hq, Sq, nb = x.shape
    return x.view(B, Hkv, Hq // Hkv, Sq, nb).amax(dim=2)


@register_decode_method("dense", sparse=False)
def dense(inputs: DecodeInputs) -> torch.Tensor:
    B, Hkv = inputs.k.shape[:2]
    return torch.zeros(B, Hkv, inputs.q.shape[2], inputs.nb, device=inputs.q.device)


def _gate_inputs(inputs: DecodeInputs):
    """(the gate, its queries (B, Hkv, Sq, d_gate), its keys (B, Hkv, n, d_gate))."""
    g = inputs.gate
    if g is None or inputs.q_pre is None or (inputs.k_pre is None and inputs.k_gate is None):
        raise ValueError("decode method 'gate' needs the layer's DecodeGate, its pre-RoPE queries "
                         "and the pre-RoPE keys or the K-compression cache")
    kg = inputs.k_gate if inputs.k_gate is not None else g.keys(g.pool(inputs.k_pre))
    return g, g.query(inputs.q_pre, inputs.positions), kg[:, :, :inputs.nb]


def gate_step(inputs: DecodeInputs, selection: Selection, max_blocks: int | None):
    """One decode step of the gate: `ops.decode_gate_select` on the K-compression cache (its
    query, logits, selection and index in one launch on CUDA)."""
    g = inputs.gate
    if g is None or inputs.q_pre is None or inputs.k_gate is None:
        raise ValueError("decode method 'gate' needs, at a decode step, the layer's DecodeGate, "
                         "its pre-RoPE queries and the K-compression cache's gate keys")
    return ops.decode_gate_select(g, inputs.q_pre, inputs.k_gate[:, :, :inputs.nb], selection,
                                  inputs.positions, inputs.nb, max_blocks)


@register_decode_method("gate", needs_gate=True, step=gate_step)
@torch.no_grad()
def gate(inputs: DecodeInputs) -> torch.Tensor:
    g, qg, kg = _gate_inputs(inputs)
    nb = inputs.nb
    if kg.shape[2] < nb:  # the cache holds full blocks only: pad to the blocks of the keys
        kg = torch.nn.functional.pad(kg, (0, 0, 0, nb - kg.shape[2]))
    return g.scores(qg, kg, inputs.positions)


def block_min_max(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's page metadata: the element-wise min and max of k (B, Hkv, S, d) over each block,
    (B, Hkv, nb, d) each (a partial last block over its real keys)."""
    B, H, S, d = k.shape
    nb = num_blocks(S, block_size)
    pad = nb * block_size - S
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    kk = k.to(dt)
    hi = torch.nn.functional.pad(kk, (0, 0, 0, pad), value=float("-inf")) if pad else kk
    lo = torch.nn.functional.pad(kk, (0, 0, 0, pad), value=float("inf")) if pad else kk
    # (B, H, nb * b, d) -> (B, H, nb, b, d)
    return (lo.view(B, H, nb, block_size, d).amin(3), hi.view(B, H, nb, block_size, d).amax(3))


@register_decode_method("quest")
def quest(inputs: DecodeInputs) -> torch.Tensor:
    q, k = inputs.q, inputs.k
    B, Hq, Sq, d = q.shape
    Hkv = k.shape[1]
    lo, hi = block_min_max(k, inputs.block_size)  # (B, Hkv, nb, d)
    qq = (q.to(lo.dtype) * default_scale(d, inputs.scale)).view(B, Hkv, Hq // Hkv, Sq, d)
    # sum_i max(q_i lo_i, q_i hi_i) = q⁺ · hi + q⁻ · lo, per query head
    bound = (torch.matmul(qq.clamp_min(0), hi.unsqueeze(2).transpose(-1, -2))
             + torch.matmul(qq.clamp_max(0), lo.unsqueeze(2).transpose(-1, -2)))
    return bound.amax(dim=2).float()  # (B, Hkv, Sq, nb)


@register_decode_method("sink_window")
def sink_window(inputs: DecodeInputs) -> torch.Tensor:
    B, Hkv = inputs.k.shape[:2]
    rank = torch.arange(inputs.nb, device=inputs.q.device, dtype=torch.float32)
    rank[0] = inputs.nb  # the first block, then the latest ones
    return rank.expand(B, Hkv, inputs.q.shape[2], inputs.nb)


@register_decode_method("oracle")
def oracle(inputs: DecodeInputs) -> torch.Tensor:
    return decode_block_truth(inputs.q, inputs.k, inputs.block_size, inputs.scale,
                              softcap=inputs.softcap).float()


@register_decode_method("oracle_mass")
def oracle_mass(inputs: DecodeInputs) -> torch.Tensor:
    return decode_block_truth(inputs.q, inputs.k, inputs.block_size, inputs.scale,
                              softcap=inputs.softcap, pooling="mass").float()


def decode_scores(config: DecodeConfig, inputs: DecodeInputs) -> torch.Tensor:
    """The block scores (B, Hkv, Sq, nb) of a config's method on one layer."""
    return DECODE_METHODS[config.method].scores(inputs)


def step_index(config: DecodeConfig, inputs: DecodeInputs, max_blocks: int | None = None):
    """One decode step's kept blocks as the sparse decode kernel's index (inputs of one query
    per row): the method's `step` where it has one, else its scores through `ops.decode_select`.
    Returns (block_index (B, Hkv, K) int32, block_count (B, Hkv) int32), K = max_blocks or nb."""
    spec = DECODE_METHODS[config.method]
    if spec.step is not None:
        return spec.step(inputs, config.selection, max_blocks)
    return ops.decode_select(spec.scores(inputs), config.selection, inputs.positions, inputs.nb,
                             inputs.block_size, max_blocks)


@dataclass(frozen=True)
class DecodeConfig:
    """What a sparse decode runs: a method, a Selection (token budget, threshold or density, and
    forced blocks) and the block size. Validated on construction; `label` prints it."""

    method: str = "gate"
    selection: Selection = Selection(tokens=1024)
    block_size: int = 64

    def __post_init__(self):
        if self.method not in DECODE_METHODS:
            raise ValueError(f"unknown decode method {self.method!r}; expected one of "
                             f"{tuple(DECODE_METHODS)}")
        check_block_size(self.block_size)
        DECODE_METHODS[self.method].check(self.selection)

    @property
    def spec(self) -> DecodeMethod:
        return DECODE_METHODS[self.method]

    @property
    def label(self) -> str:
        """"gate+sink@tok=1024", "quest@tok=512", "dense" (read back by `parse_decode_config`)."""
        return self.method + self.selection.label()

    def at(self, tokens: int) -> DecodeConfig:
        """The same config at another token budget."""
        return replace(self, selection=replace(self.selection, tokens=tokens, density=None,
                                               threshold=None))


def parse_decode_config(label: str, block_size: int = 64) -> DecodeConfig:
    """A DecodeConfig from its label: "gate@tok=1024", "sink_window+sink2@tok=512", "dense"."""
    if not isinstance(label, str) or not label:
        raise ValueError(f"a decode config label is a string like 'gate@tok=1024'; got {label!r}")
    cut = min((i for i in (label.find("+"), label.find("@")) if i >= 0), default=len(label))
    return DecodeConfig(label[:cut], parse_selection(label[cut:]), block_size)


def config_series(label: str) -> str:
    """A config label without its budget, the series a budget sweep draws: "gate+sink@tok=1024"
    -> "gate+sink", "dense" -> "dense"."""
    return label.partition("@")[0]
