"""Block selection: a `Selection` says what each query-block row keeps; `select_blocks` applies it
to a block score map (gate logits, or any monotone score) and returns a (B, H, nb, nb) bool mask.

A Selection has three parts (SEERATTENTION.md §5):
- **the budget**: a `density` ρ, the target kept share of the causal blocks, spent by a budget
  rule (`BUDGET_RULES`), or a softmax `threshold` τ (keep the blocks whose softmax over the row's
  key blocks exceeds τ), or (decode only, `seerlib.decode.select`) a token budget `tokens`: each
  query reads tokens // b key blocks, forced ones included. No budget keeps every causal block.
- **the budget rule** (`budget=`), how a density's blocks are spent:
  - "row": top-k per query-block row, k = max(1, int((1 - sqrt(1 - ρ)) * nb)) (at most the
    row's i + 1 causal blocks), so the kept share of the causal triangle is ≈ ρ;
  - "layer": top-k's number of blocks per (batch, layer), spread over heads and rows by the
    row-softmax score (the threshold rule with τ calibrated to the budget): heads and rows that
    need more blocks get them, and the achieved density equals top-k's exactly;
  - "relative": the same budget ranked by the score relative to a uniform row (softmax × the
    row's causal block count), so long rows, whose probabilities are small only because they are
    spread over more blocks, are not starved.

  `row_floor=f` (with "layer"/"relative"): before the budget is spread, every row keeps its best
  ceil(f × k) blocks, out of the same budget; f=0 is the layer rule, f=1 is top-k.
- **forced blocks** (`forced={name: n}`, rules in `FORCED_BLOCKS`): "sink" (the first n key
  blocks), "local" (the n blocks left of the diagonal), "last" (the last n query-block rows dense);
  the diagonal always, unless `diagonal=False`. Under a density they count toward the budget.
  A new rule is one function registered with `@forced_rule(name)`.

Blocks above the diagonal are never kept. Each Selection has a short label (`label()`, read back
by `parse_selection`): "+sink+local2+floor0.25@r=0.2" is a forced sink block and two local blocks,
a row floor of 0.25 and the relative rule at density 0.2; "@0.3" is top-k, "@a=0.3" the layer
rule, "@t=0.005" a threshold, "@tok=1024" a decode token budget. `achieved_density(mask)`
reports the kept share of the causal blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from seerlib.reference import causal_block_count, causal_block_mask

__all__ = [
    "BUDGET_RULES",
    "DECODE_FORCED",
    "DECODE_KERNEL_FORCED",
    "FORCED_BLOCKS",
    "Selection",
    "achieved_density",
    "causal_block_mask",
    "density_to_k",
    "forced_rule",
    "kernel_forced_args",
    "parse_selection",
    "row_topk_kernel_args",
    "select_blocks",
    "topk_density",
]


def density_to_k(density: float, nb: int) -> int:
    """Blocks kept per row for a target density: max(1, int((1 - sqrt(1 - density)) * nb))."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    return max(1, int((1.0 - math.sqrt(1.0 - density)) * nb))


def topk_density(density: float, nb: int) -> float:
    """The kept share of causal blocks of top-k selection at `density` with nb blocks: row i keeps
    min(i + 1, k) of its i + 1 blocks, k = `density_to_k(density, nb)` (at 4096 tokens and block
    64, density 0.3 keeps 0.286)."""
    k = density_to_k(density, nb)
    return sum(min(i + 1, k) for i in range(nb)) / causal_block_count(nb)


def achieved_density(block_mask: torch.Tensor) -> float:
    """Kept share of the causal blocks of a (..., nb, nb) bool mask, over all batches and heads."""
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError("block_mask must be a torch.bool tensor of shape (..., nb, nb)")
    nb = block_mask.shape[-1]
    causal = causal_block_mask(nb, block_mask.device)
    n_mats = block_mask.numel() // (nb * nb)
    return float((block_mask & causal).sum()) / (n_mats * causal_block_count(nb))


# ---------------------------------------------------------------- forced blocks

ForcedRule = Callable[[int, int, torch.device], torch.Tensor]
# name -> fn(nb, n, device) -> (nb, nb) bool; the order here is the order labels print them in
FORCED_BLOCKS: dict[str, ForcedRule] = {}
FORCED_WORDS: dict[str, str] = {}  # name -> what a reader calls it ("sink block")
# the rules that mean something at decode: there a query in block c reads row c of the rule's mask
DECODE_FORCED: list[str] = []
# name -> the keyword of the decode selection kernels that applies the rule itself
# (`seerlib.kernels.decode_select`: sink = blocks 0 .. n-1, local = the n blocks before the own)
DECODE_KERNEL_FORCED: dict[str, str] = {}


def forced_rule(name: str, words: str | None = None, decode: bool = False,
                kernel: str | None = None):
    """Register a forced-block rule `fn(nb, n, device) -> (nb, nb) bool` under `name`; a Selection
    then takes `forced={name: n}`, its label reads "+name" (n = 1) or "+nameN", and tables call
    it `words` (default: the name). `decode=True`: the rule also holds at decode, where a query
    of key block c is forced to read row c of the mask (`seerlib.decode.select`); `kernel`: the
    decode selection kernels' keyword that computes that row itself (else the torch path runs)."""
    if not re.fullmatch(r"[a-z_]+", name) or name in ("floor", "nodiag"):
        raise ValueError(f"a forced-block rule needs a lower-case name other than floor/nodiag; "
                         f"got {name!r}")

    def register(fn: ForcedRule) -> ForcedRule:
        FORCED_BLOCKS[name] = fn
        FORCED_WORDS[name] = words or name.replace("_", " ")
        if decode:
            DECODE_FORCED.append(name)
        if kernel is not None:
            DECODE_KERNEL_FORCED[name] = kernel
        return fn

    return register


@forced_rule("sink", "sink block", decode=True, kernel="sink")
def sink_blocks(nb: int, n: int, device=None) -> torch.Tensor:
    """The first n key blocks of every row: (nb, nb) bool."""
    out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    out[:, :n] = True
    return out


@forced_rule("local", "local block", decode=True, kernel="local")
def local_band(nb: int, n: int, device=None) -> torch.Tensor:
    """Blocks (i, i - 1) ... (i, i - n), the band left of the diagonal: (nb, nb) bool."""
    causal = causal_block_mask(nb, device)
    return causal & ~causal.tril(-n - 1) & ~torch.eye(nb, dtype=torch.bool, device=device)


@forced_rule("last", "dense last row")
def last_rows(nb: int, n: int, device=None) -> torch.Tensor:
    """Every block of the last n query-block rows: (nb, nb) bool."""
    out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    out[max(0, nb - n):] = True
    return out


# ---------------------------------------------------------------- the Selection

# budget rule -> (its token after '@' in a label, its word in a series name, words for readers)
BUDGET_NAMES = {"row": ("", "", "top-k"), "layer": ("a=", " adaptive", "adaptive budget"),
                "relative": ("r=", " relative", "relative adaptive budget")}
BUDGETS = tuple(BUDGET_NAMES)


@dataclass(frozen=True)
class Selection:
    """What a query-block row keeps (validated on construction; see the module docstring).

    Attributes:
        density: target kept share of the causal blocks, in (0, 1].
        threshold: keep blocks whose softmax over the row's causal key blocks exceeds it, in
            [0, 1).
        tokens: (decode) key tokens each query reads, a whole number >= 1: tokens // b blocks,
            at least one. At most one of density / threshold / tokens; none keeps every block.
        budget: how a density is spent: "row" (top-k per row), "layer" (top-k's budget spread
            over the layer's heads and rows by score), "relative" (likewise, score × row length).
        row_floor: with "layer"/"relative", in [0, 1]: each row first keeps its ceil(f × k) best
            blocks (k = top-k's count for the row), out of the same budget.
        forced: {rule name in FORCED_BLOCKS: n}, blocks always kept (stored as sorted pairs).
        diagonal: always keep block (i, i), so no row is empty.
    """

    density: float | None = None
    threshold: float | None = None
    tokens: int | None = None
    budget: str = "row"
    row_floor: float = 0.0
    forced: tuple[tuple[str, int], ...] | dict = field(default=())
    diagonal: bool = True

    def __post_init__(self):
        forced = dict(self.forced)
        for name, n in forced.items():
            if name not in FORCED_BLOCKS:
                raise ValueError(f"unknown forced-block rule {name!r}; expected one of "
                                 f"{tuple(FORCED_BLOCKS)} (or register one with forced_rule)")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"forced {name!r} takes a whole number of blocks >= 1; got {n!r}")
        order = list(FORCED_BLOCKS)
        object.__setattr__(self, "forced", tuple(sorted(forced.items(),
                                                        key=lambda x: order.index(x[0]))))
        given = {k: v for k in ("density", "threshold", "tokens")
                 if (v := getattr(self, k)) is not None}
        if len(given) > 1:
            raise ValueError("give one budget (density, threshold or tokens); got "
                             + ", ".join(f"{k}={v}" for k, v in given.items()))
        if self.tokens is not None and (isinstance(self.tokens, bool) or
                                        not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"tokens (a decode token budget) must be a whole number >= 1; got "
                             f"{self.tokens!r}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1); got {self.threshold}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}; got {self.budget!r}")
        if self.budget != "row" and self.density is None:
            raise ValueError(f"budget {self.budget!r} spreads a density's blocks over the layer; "
                             f"give a density (got threshold={self.threshold})")
        if not 0.0 <= self.row_floor <= 1.0:
            raise ValueError(f"row_floor must be in [0, 1] (a share of top-k's blocks per row); "
                             f"got {self.row_floor}")
        if self.row_floor and self.budget == "row":
            raise ValueError("row_floor is a floor under a layer budget; it needs budget='layer' "
                             "or 'relative' (top-k per row already keeps k in every row)")

    @property
    def has_budget(self) -> bool:
        return self.density is not None or self.threshold is not None or self.tokens is not None

    def count(self, rule: str) -> int:
        """The forced blocks of one rule (0 when not forced)."""
        return dict(self.forced).get(rule, 0)

    def label(self) -> str:
        """The short label: "+sink+local2+floor0.25@r=0.2", "@0.3", "@t=0.005", "" (no budget)."""
        parts = [f"+{name}{n if n > 1 else ''}" for name, n in self.forced]
        if self.row_floor:
            parts.append(f"+floor{self.row_floor:g}")
        if not self.diagonal:
            parts.append("+nodiag")
        if self.threshold is not None:
            parts.append(f"@t={self.threshold:g}")
        elif self.tokens is not None:
            parts.append(f"@tok={self.tokens}")
        elif self.density is not None:
            parts.append(f"@{BUDGET_NAMES[self.budget][0]}{self.density:g}")
        return "".join(parts)

    def series(self) -> str:
        """The label less its budget's number, the rule in a word: "+sink+local+floor0.5
        relative" (rows of one sweep share it; `series_selection` reads it back)."""
        bare = replace(self, density=None, threshold=None, tokens=None, budget="row",
                       row_floor=0.0).label()
        floor = f"+floor{self.row_floor:g}" if self.row_floor else ""
        return bare + floor + BUDGET_NAMES[self.budget][1]

    def describe(self) -> str:
        """Words for a reader, the budget's number left out: " + sink block + local block ×2, row
        floor 0.5, relative adaptive budget" ("" for plain top-k)."""
        text = "".join(f" + {FORCED_WORDS[f]}" + (f" ×{n}" if n > 1 else "")
                       for f, n in self.forced)
        if self.row_floor:
            text += f", row floor {self.row_floor:g}"
        if self.budget != "row":
            text += f", {BUDGET_NAMES[self.budget][2]}"
        return text

    def unsupported(self, forced: tuple[str, ...] | None, layer_budget: bool) -> list[str]:
        """What this Selection asks for beyond what a method honours: forced-block rules outside
        `forced` (None: all honoured; the diagonal switch counts as "nodiag") and, unless
        `layer_budget`, a layer budget or row floor. Returns short descriptions ([] if none)."""
        out = []
        if forced is not None:
            out += [f"+{n}" for n, _ in self.forced if n not in forced]
            out += [] if self.diagonal else ["+nodiag"]
        if not layer_budget and (self.budget != "row" or self.row_floor):
            out.append(f"budget {self.budget!r} / row_floor {self.row_floor:g} (no layer budget)")
        return out


def parse_selection(text: str) -> Selection:
    """The Selection of a label's tail, `Selection.label()`'s inverse: "+sink+local@r=0.3",
    "+last2@a=0.3", "+floor0.5@r=0.3", "@0.3", "@t=0.002", "" (every block)."""
    where = f" in {text!r}"
    head, at, arg = text.partition("@")
    kw: dict = {"forced": {}}
    for tok in head.split("+")[1:] if head.startswith("+") else ([head] if head else []):
        if tok.startswith("floor"):
            try:
                kw["row_floor"] = float(tok[5:])
            except ValueError:
                raise ValueError(f"cannot read '+{tok}'{where}; expected a share like "
                                 "+floor0.5") from None
        elif tok == "nodiag":
            kw["diagonal"] = False
        else:
            m = re.fullmatch(r"([a-z_]+?)(\d*)", tok)
            if m is None or m.group(1) not in FORCED_BLOCKS:
                names = ", ".join(f"+{n}[N]" for n in FORCED_BLOCKS)
                raise ValueError(f"cannot read '+{tok}'{where}; expected {names} or +floorF")
            kw["forced"][m.group(1)] = int(m.group(2) or 1)
    if at:
        budget = next((b for b, (t, _, _) in BUDGET_NAMES.items() if t and arg.startswith(t)),
                      "row")
        try:
            if arg.startswith("t="):
                kw["threshold"] = float(arg[2:])
            elif arg.startswith("tok="):
                kw["tokens"] = int(arg[4:])
            else:
                kw["density"] = float(arg[len(BUDGET_NAMES[budget][0]):])
        except ValueError:
            raise ValueError(f"cannot read {arg!r}{where}; expected a density like 0.3, a layer "
                             "budget like a=0.3 or r=0.3, a threshold like t=0.002 or a token "
                             "budget like tok=1024") from None
        kw["budget"] = budget
    return Selection(**kw)


def series_selection(tail: str, density: float) -> Selection:
    """A series' Selection at a density (`Selection.series`' inverse): "+sink+floor0.5 relative",
    "+sink" (top-k), or a label tail whose budget's number is replaced ("+sink@a=0.3")."""
    head, _, rule = tail.partition(" ")
    budget = next((b for b, (_, word, _) in BUDGET_NAMES.items()
                   if word == (f" {rule}" if rule else "")), None)
    if budget is None:
        words = [w.strip() for _, w, _ in BUDGET_NAMES.values() if w]
        raise ValueError(f"cannot read the rule {rule!r} in {tail!r}; expected one of {words}")
    floor = re.search(r"\+floor([^+@]*)", head)
    head = re.sub(r"\+floor[^+@]*", "", head)
    head, at, arg = head.partition("@")
    sel = parse_selection(head)  # the forced blocks
    if at and not rule:
        budget = parse_selection("@" + arg).budget
    row_floor = parse_selection(f"+floor{floor.group(1)}@a=1").row_floor if floor else 0.0
    return replace(sel, density=density, budget=budget, row_floor=row_floor)


# ---------------------------------------------------------------- the rules


def forced_blocks(selection: Selection, nb: int, device=None) -> torch.Tensor:
    """(nb, nb) bool: the Selection's forced blocks (diagonal included), causal part only."""
    causal = causal_block_mask(nb, device)
    forced = torch.eye(nb, dtype=torch.bool, device=device) if selection.diagonal else \
        torch.zeros(nb, nb, dtype=torch.bool, device=device)
    for name, n in selection.forced:
        forced |= FORCED_BLOCKS[name](nb, n, device)
    return forced & causal


def topk_per_row(scores, forced, causal, selection: Selection) -> torch.Tensor:
    """Rule "row": the k best causal blocks of each row, forced ones first. scores (B, H, nb, nb)
    with -inf above the diagonal; returns (B, H, nb, nb) bool."""
    nb = scores.shape[-1]
    k = density_to_k(selection.density, nb)
    # forced blocks rank first, then by score; masked (-inf) blocks never beat a causal one
    rank = torch.where(forced, torch.full_like(scores, float("inf")), scores)
    rank = torch.nan_to_num(rank, nan=float("-inf"))
    top = rank.topk(min(k, nb), dim=-1).indices  # (B, H, nb, k)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    # a row i has only i + 1 causal blocks; topk may have picked masked ones there
    return mask & causal


def _floor_blocks(rank: torch.Tensor, k_row: torch.Tensor, k: int,
                  row_floor: float) -> torch.Tensor:
    """Each row's best ceil(f * k_row) blocks of `rank` (B, H, nb, nb): a prefix of top-k's
    choice, so within the budget (k_row = min(i + 1, k), no larger than k). Returns
    (B, H, nb, nb) bool."""
    floor_k = torch.ceil(row_floor * k_row - 1e-6).long()
    most = math.ceil(row_floor * min(k, rank.shape[-1]) - 1e-6)  # floor_k.max(), no host sync
    best = rank.topk(most, dim=-1).indices
    take = torch.arange(best.shape[-1], device=rank.device) < floor_k[:, None]
    floor = torch.zeros_like(rank, dtype=torch.bool)
    return floor.scatter_(-1, best, take.expand_as(best))


def layer_budget(scores, forced, causal, selection: Selection) -> torch.Tensor:
    """Rules "layer" and "relative": top-k's number of blocks per batch element, the ones with
    the highest row-softmax score (× the row's causal block count for "relative"), forced blocks
    and each row's floor first. scores (B, H, nb, nb); returns (B, H, nb, nb) bool."""
    nb = scores.shape[-1]
    k = density_to_k(selection.density, nb)
    k_row = causal.sum(-1).clamp(max=k)  # top-k's count per row
    # top-k's blocks per (batch, layer), counted on the host: no device sync
    budget = sum(min(i + 1, k) for i in range(nb)) * scores.shape[1]
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    if selection.budget == "relative":
        probs = probs * causal.sum(-1, keepdim=True)
    # causal blocks rank by score; forced ones above all; non-causal ones below all
    rank = torch.where(causal, probs, torch.full_like(probs, -1.0))
    rank = torch.where(forced, torch.full_like(probs, float("inf")), rank)
    if selection.row_floor:
        floor = _floor_blocks(rank, k_row, k, selection.row_floor)
        rank = torch.where(floor, torch.full_like(probs, float("inf")), rank)
        forced = forced | floor
    rank = rank.flatten(1)
    top = rank.topk(budget, dim=-1).indices  # (B, budget); budget <= causal blocks
    mask = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, top, True)
    return mask.view_as(scores) | forced


def threshold_rule(scores, forced, causal, selection: Selection) -> torch.Tensor:
    """Blocks whose softmax over the row's causal blocks exceeds the threshold."""
    return (torch.softmax(scores, dim=-1) > selection.threshold) & causal


BUDGET_RULES = {"row": topk_per_row, "layer": layer_budget, "relative": layer_budget}


def kernel_forced_args(selection: Selection) -> dict | None:
    """The selection kernels' forced-block keywords for `selection` ({"sink": n, "local": m}),
    or None when one of its forced rules has no kernel form (`DECODE_KERNEL_FORCED`)."""
    if any(n not in DECODE_KERNEL_FORCED for n, _ in selection.forced):
        return None
    return {DECODE_KERNEL_FORCED[n]: k for n, k in selection.forced}


def row_topk_kernel_args(selection: Selection) -> dict | None:
    """The prefill selection kernel's forced-block keywords for `selection` ({"sink": n, ...}),
    or None when it is not plain top-k per row that the kernel computes: a density under the
    "row" rule, no row floor, the diagonal kept, and only forced rules with a kernel form
    (`kernel_forced_args`; their rows are the same at prefill)."""
    if (selection.density is None or selection.budget != "row" or selection.row_floor
            or not selection.diagonal):
        return None
    return kernel_forced_args(selection)


def select_blocks(logits: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Choose the (query block, key block) tiles to compute.

    Args:
        logits: (B, H, nb, nb) block scores, higher = more important (gate logits; any monotone
            score such as a pooled attention map works for a density under the "row" rule).
            Entries above the diagonal are ignored.
        selection: the Selection (budget, rule, forced blocks).
    Returns:
        block_mask: (B, H, nb, nb) bool, False above the diagonal. `achieved_density(mask)`
        gives the kept share of causal blocks.
    """
    if not isinstance(selection, Selection):
        raise ValueError(f"selection must be a seerlib Selection; got {type(selection).__name__}")
    if selection.tokens is not None:
        raise ValueError(f"a token budget (tokens={selection.tokens}) is a decode budget "
                         "(seerlib.decode.select_decode); a prefill selection takes a density or "
                         "a threshold")
    if (
        not isinstance(logits, torch.Tensor)
        or logits.dim() != 4
        or logits.shape[-1] != logits.shape[-2]
    ):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, H, nb, nb) tensor; got {shape}")
    nb = logits.shape[-1]
    causal = causal_block_mask(nb, logits.device)
    if not selection.has_budget:
        return causal.expand(logits.shape).clone()
    forced = forced_blocks(selection, nb, logits.device)
    scores = logits.float().masked_fill(~causal, float("-inf"))
    rule = threshold_rule if selection.threshold is not None else BUDGET_RULES[selection.budget]
    return rule(scores, forced, causal, selection) | forced
