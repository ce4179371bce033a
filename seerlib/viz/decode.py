"""Decode sparsity (notebook 06, SeerAttention-R): which key blocks each step of a generation reads
against the true block scores of that step's query, recall and perplexity against the token
budget per decode method, and the committed GPU tables (decode quality, decode speed).

`trace_generation` runs `model.generate` inside `seerlib.decode.generate.sparse_generation` with
an `attention_override` of its own around the sparse one: it passes every call through and, at
each decode step, records per layer the blocks the step read (`SparseGeneration.last_index`),
the true block scores of the step's query (`reference.decode_block_truth`) and the share of the
query's dense attention mass on the keys it read (the recall, as `seerlib.decode.teacher`
measures it), and the same for the budget spent on the true scores (method "oracle").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from seerlib import reference
from seerlib.capture import attention_override
from seerlib.decode.generate import sparse_generation
from seerlib.decode.methods import DecodeConfig, config_series, parse_decode_config
from seerlib.decode.select import select_decode
from seerlib.names import METHOD_STYLE
from seerlib.viz.common import (
    LOG_FLOOR,
    MAP_COLORSCALE,
    _log_colorbar,
    _log_map,
    show,
    table_figure,
)
from seerlib.viz.quality import passkey_figure

__all__ = [
    "DECODE_STYLE",
    "DecodeTrace",
    "decode_generation_table",
    "decode_layer_recall_figure",
    "decode_panel",
    "decode_passkey_figure",
    "decode_quality_figure",
    "decode_quality_results",
    "decode_speed_figure",
    "decode_speed_records",
    "decode_speed_tables",
    "decode_steps_figure",
    "trace_generation",
]

# decode method -> (display name, colour); the colours of notebook 04 where the idea is the same
DECODE_STYLE = {
    "dense": ("dense", METHOD_STYLE["dense"][1]),
    "gate": ("gate (learned decode gate)", METHOD_STYLE["gate"][1]),
    "quest": ("Quest (block key bounds)", "#ff7f0e"),
    "sink_window": ("sink + window", METHOD_STYLE["sink_window"][1]),
    "oracle": ("oracle (true block scores)", METHOD_STYLE["oracle-max"][1]),
    "oracle_mass": ("oracle (attention mass)", METHOD_STYLE["oracle-sum"][1]),
}
QUALITY_PREFIX = "decode-quality-"  # seerlib.eval.decode's result files
SPEED_PREFIX = "decode-"  # bench/bench_decode.py's result files (decode-quality-* excluded)


def _name(method: str) -> str:
    return DECODE_STYLE.get(method, (method,))[0]


def _color(method: str) -> str | None:
    return DECODE_STYLE.get(method, (None, None))[1]


def _subtitle(note: str) -> str:
    return f"<br><sup>{note}</sup>" if note else ""


# ---------------------------------------------------------------- one generation, step by step


@dataclass
class DecodeTrace:
    """What every decode step of one generation read, per layer, against the truth.

    Step i is the decode call of the query at position prompt_len + i (the first new token comes
    from the prefill, so `max_new_tokens` tokens give max_new_tokens - 1 steps). nb is the key
    blocks of the last step; a step's blocks past its own are 0 in `truth` and never picked.

    Attributes:
        label: the DecodeConfig's label ("gate@tok=256"); block_size: b; prompt_len: S0.
        truth: {layer: (T, Hkv, nb) float32}, the true block scores of each step's query
            (`reference.decode_block_truth`: attention max-pooled per block and over the group's
            query heads, summing to 1 over the visible blocks).
        picked: {layer: (T, Hkv, nb) bool}, the blocks each step read.
        recall: {layer: (T,) float}, the share of the step's dense attention mass on the keys it
            read, averaged over query heads.
        oracle_recall: {layer: (T,) float}, the same for the same Selection spent on the true
            block scores: what a gate that predicted its training target exactly would read.
        new_tokens: (T + 1,) the generated token ids; token_text: their text (with a tokenizer).
    """

    label: str
    block_size: int
    prompt_len: int
    truth: dict[int, np.ndarray]
    picked: dict[int, np.ndarray]
    recall: dict[int, np.ndarray]
    oracle_recall: dict[int, np.ndarray]
    new_tokens: np.ndarray
    token_text: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted(self.truth)

    @property
    def steps(self) -> int:
        return next(iter(self.truth.values())).shape[0] if self.truth else 0

    @property
    def positions(self) -> np.ndarray:
        """(T,) the query position of each step."""
        return self.prompt_len + np.arange(self.steps)

    def visible(self) -> np.ndarray:
        """(T, nb) bool: the blocks holding a key at or before each step's query."""
        nb = next(iter(self.truth.values())).shape[-1]
        return np.arange(nb)[None, :] <= (self.positions[:, None] // self.block_size)

    def mean_recall(self, layer: int | None = None, oracle: bool = False) -> float:
        """Mean recall over steps (and layers when `layer` is None)."""
        src = self.oracle_recall if oracle else self.recall
        vals = [src[layer]] if layer is not None else list(src.values())
        return float(np.mean(np.concatenate(vals))) if vals else math.nan

    def kept_share(self) -> float:
        """Read share of the visible key blocks over every step, layer and kv head."""
        vis = self.visible()[:, None, :]
        kept = sum(int((p & vis).sum()) for p in self.picked.values())
        total = len(self.picked) * int(vis.sum()) * next(iter(self.picked.values())).shape[1]
        return kept / total if total else math.nan


def _block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale,
                softcap=None) -> torch.Tensor:
    """(Hq, nb): one decode query's dense attention mass per key block; q (1, Hq, 1, d) against
    all of k (1, Hkv, S, d), of the soft-capped logits when the model caps them."""
    s = reference.grouped_scores(q.float(), k.float(), scale)[0, :, 0]  # (Hq, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s, dim=-1)
    nb = reference.num_blocks(k.shape[2], block_size)
    p = torch.nn.functional.pad(p, (0, nb * block_size - k.shape[2]))
    return p.view(p.shape[0], nb, block_size).sum(-1)  # (Hq, nb * b) -> (Hq, nb)


def _recall(mass: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over query heads of the mass (Hq, nb) on the kv groups' kept blocks (Hkv, nb)."""
    group = mass.shape[0] // keep.shape[0]
    r = float((mass.double() * keep.repeat_interleave(group, dim=0)).sum(-1).mean())
    return min(1.0, r)  # a covering budget sums the whole softmax: 1 up to rounding


@torch.no_grad()
def trace_generation(model, ids: torch.Tensor, config, decode_gates=None,
                     max_new_tokens: int = 32, layers: Sequence[int] | None = None,
                     tokenizer=None) -> DecodeTrace:
    """Greedy generation under a sparse decode config, recording every decode step.

    Args:
        model: a transformers causal LM (`seerlib.families`).
        ids: (1, S0) the prompt's token ids (one sequence).
        config: a DecodeConfig or its label ("gate@tok=256", "quest@tok=256", "dense").
        decode_gates: the DecodeGateSet for method "gate".
        max_new_tokens: tokens generated (exactly: EOS is suppressed until then).
        layers: layers to record (default all).
        tokenizer: to keep each new token's text (hover labels).
    Returns:
        a DecodeTrace of max_new_tokens - 1 steps.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, S): one prompt; got {tuple(ids.shape)}")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2 (the first comes from the prefill, "
                         f"each later one is a decode step); got {max_new_tokens}")
    if isinstance(config, str):
        config = parse_decode_config(config, getattr(decode_gates, "block_size", None) or 64)
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig or its label; got {type(config).__name__}")
    b = config.block_size
    wanted = None if layers is None else set(layers)
    steps: dict[int, list] = {}

    def record(module, query, key, value, attention_mask, *, default, **kwargs):
        out = default(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        if query.shape[2] != 1 or (wanted is not None and layer not in wanted):
            return out
        scale, softcap = kwargs.get("scaling"), kwargs.get("softcap")
        S = key.shape[2]
        nb = reference.num_blocks(S, b)
        positions = torch.tensor([S - 1], device=query.device)
        truth = reference.decode_block_truth(query, key, b, scale,
                                             softcap=softcap)  # (1, Hkv, 1, nb)
        if config.spec.sparse:
            keep = reference.decode_index_to_mask(*sg.last_index[layer], nb)[0]  # (Hkv, nb)
        else:
            keep = torch.ones(key.shape[1], nb, dtype=torch.bool, device=query.device)
        best = select_decode(truth, config.selection, positions, b)[0, :, 0]  # (Hkv, nb)
        mass = _block_mass(query, key, b, scale, softcap)
        steps.setdefault(layer, []).append((truth[0, :, 0].float().cpu(), keep.cpu(),
                                            _recall(mass, keep), _recall(mass, best)))
        return out

    gates = decode_gates if config.spec.needs_gate else None
    eos = getattr(model.generation_config, "eos_token_id", None)
    with sparse_generation(model, config, decode_gates=gates) as sg, \
            attention_override(model, record):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=eos if isinstance(eos, int) else None)
    nb = reference.num_blocks(ids.shape[1] + max_new_tokens - 1, b)

    def stack(rows, j, dtype):  # pad each step's (Hkv, nb_t) to (Hkv, nb), then (T, Hkv, nb)
        return np.stack([np.pad(r[j].numpy(), ((0, 0), (0, nb - r[j].shape[-1])))
                         for r in rows]).astype(dtype)

    new = out[0, ids.shape[1]:].cpu().numpy()
    return DecodeTrace(
        label=config.label, block_size=b, prompt_len=ids.shape[1],
        truth={i: stack(r, 0, np.float32) for i, r in sorted(steps.items())},
        picked={i: stack(r, 1, bool) for i, r in sorted(steps.items())},
        recall={i: np.array([x[2] for x in r]) for i, r in sorted(steps.items())},
        oracle_recall={i: np.array([x[3] for x in r]) for i, r in sorted(steps.items())},
        new_tokens=new,
        token_text=[tokenizer.decode([int(t)]) for t in new] if tokenizer is not None else [])


def decode_steps_figure(trace: DecodeTrace, layer: int, note: str = "",
                        max_heads: int = 4) -> go.Figure:
    """Step (x) by key block (y) for one layer: the true block scores of each step's query
    (log colour) with the blocks the step read marked, one panel per kv head (the first
    `max_heads`), and below them the per-step recall of the read blocks and of the oracle at the
    same budget."""
    if layer not in trace.truth:
        raise ValueError(f"layer {layer} was not recorded; the trace has layers {trace.layers}")
    truth, picked = trace.truth[layer], trace.picked[layer]  # (T, Hkv, nb)
    T, Hkv, nb = truth.shape
    heads = min(Hkv, max_heads)
    x = trace.positions
    # step i's query is new token i (the prefill made it; step i predicts token i + 1)
    text = [repr(t)[1:-1] for t in trace.token_text[:T]] if trace.token_text else None
    fig = make_subplots(
        rows=heads + 1, cols=1, shared_xaxes=True, vertical_spacing=0.05,
        row_heights=[1.0] * heads + [0.8],
        subplot_titles=[f"kv head {h}" + (f" of {Hkv}" if heads < Hkv else "")
                        for h in range(heads)] + ["recall of the attention mass per step"])
    hidden = ~trace.visible()  # (T, nb)
    for h in range(heads):
        z = _log_map(truth[:, h]).T  # (T, nb) -> (nb, T)
        z[hidden.T] = np.nan
        fig.add_trace(go.Heatmap(
            z=z, x=x, y=np.arange(nb), zmin=LOG_FLOOR, zmax=0.0, colorscale=MAP_COLORSCALE,
            showscale=h == 0, customdata=None if text is None else [text] * nb,
            colorbar=_log_colorbar(title=dict(text="true block score"), len=0.6, y=0.65),
            hovertemplate="query at %{x}" + (" (%{customdata})" if text else "")
            + "<br>key block %{y}<br>log10 score %{z:.2f}<extra></extra>"), row=h + 1, col=1)
        t, j = np.nonzero(picked[:, h])
        fig.add_trace(go.Scatter(
            x=x[t], y=j, mode="markers", name="block read", legendgroup="read",
            showlegend=h == 0, marker=dict(symbol="square-open", color="#ff2d2d", size=7,
                                           line=dict(width=1.5)),
            hovertemplate="query at %{x}: reads block %{y}<extra></extra>"), row=h + 1, col=1)
        fig.update_yaxes(title_text=f"key block (b={trace.block_size})", row=h + 1, col=1)
    for src, name, dash, colour in ((trace.recall, f"{trace.label}: blocks read", None, "black"),
                                    (trace.oracle_recall, "oracle, same budget", "dash",
                                     DECODE_STYLE["oracle"][1])):
        fig.add_trace(go.Scatter(
            x=x, y=src[layer], mode="lines+markers", name=f"{name} (mean "
            f"{np.mean(src[layer]):.3f})", line=dict(dash=dash, color=colour),
            hovertemplate="query at %{x}: recall %{y:.3f}<extra></extra>"), row=heads + 1, col=1)
    fig.update_yaxes(title_text="recall", range=[0, 1.02], row=heads + 1, col=1)
    fig.update_xaxes(title_text="decode step: position of the query token", row=heads + 1, col=1)
    fig.update_layout(
        title=f"Layer {layer}: key blocks each decode step reads ({trace.label}), over the true "
              f"block scores of its query{_subtitle(note)}",
        height=190 * heads + 260, legend=dict(orientation="h", y=-0.12),
        plot_bgcolor="white", margin=dict(l=60, r=40, t=90, b=60))
    return fig


def decode_layer_recall_figure(traces: Mapping[int, DecodeTrace], note: str = "") -> go.Figure:
    """Mean recall over the steps of a generation per layer, one line per traced budget
    ({token budget: DecodeTrace}), and the oracle at the same budget dashed."""
    fig = go.Figure()
    colours = ["#d62728", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for n, (_, tr) in enumerate(sorted(traces.items())):
        c = colours[n % len(colours)]
        for oracle in (False, True):
            y = [tr.mean_recall(i, oracle) for i in tr.layers]
            fig.add_trace(go.Scatter(
                x=tr.layers, y=y, mode="lines+markers", line=dict(color=c,
                                                                  dash="dash" if oracle else None),
                name=(f"oracle, budget of {tr.label}" if oracle else tr.label)
                + f" (mean {np.mean(y):.3f})",
                hovertemplate="layer %{x}: recall %{y:.3f}<extra></extra>"))
    first = next(iter(traces.values()))
    fig.update_xaxes(title="layer", dtick=1, range=[min(first.layers) - 0.5,
                                                    max(first.layers) + 0.5])
    fig.update_yaxes(title="mean recall of the attention mass", range=[0, 1.02])
    fig.update_layout(title=f"Recall per layer over {first.steps} decode steps after a "
                            f"{first.prompt_len}-token prompt{_subtitle(note)}", height=420)
    return fig


def decode_panel(traces: Mapping[int, DecodeTrace], layer: int, budget: int, interactive: bool,
                 note: str = ""):
    """The step-by-step figure with controls for the layer and the token budget.

    Args:
        traces: {token budget: DecodeTrace}, one generation per budget offered.
    Returns:
        interactive: an `ipywidgets.VBox` (budget dropdown, layer slider, figure); otherwise the
        figure of (budget, layer).
    """
    if budget not in traces:
        raise ValueError(f"no generation was traced at budget {budget}; traced: {sorted(traces)}")
    if not interactive:
        return decode_steps_figure(traces[budget], layer, note)
    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

    layers = traces[budget].layers
    w_budget = W.Dropdown(options=sorted(traces), value=budget, description="budget (tokens)",
                          style={"description_width": "initial"})
    w_layer = W.IntSlider(value=layer, min=min(layers), max=max(layers), description="layer",
                          continuous_update=False)
    out = W.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            show(decode_steps_figure(traces[w_budget.value], w_layer.value, note))

    for w in (w_budget, w_layer):
        w.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([w_budget, w_layer]), out])


# ---------------------------------------------------------------- quality against the budget


def decode_quality_figure(rows: Sequence[Mapping], length: int | None = None,
                          note: str = "") -> go.Figure:
    """Perplexity of the second half (left) and recall of the attention mass (right) against the
    token budget, one line per method, dense dashed; rows of `seerlib.eval.decode.decode_quality`
    at one length (`length`, default the first row's)."""
    length = length or rows[0]["length"]
    rows = [r for r in rows if r["length"] == length]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "perplexity, second half of each window (lower is better)",
        "recall of the attention mass (second half)"])
    budgets = sorted({r["tokens"] for r in rows if r.get("tokens")})
    for m in dict.fromkeys(config_series(r["label"]) for r in rows if r["method"] != "dense"):
        pts = sorted((r for r in rows if config_series(r["label"]) == m and r.get("tokens")),
                     key=lambda r: r["tokens"])
        common = dict(mode="lines+markers", legendgroup=m, line=dict(color=_color(m)),
                      x=[r["tokens"] for r in pts],
                      customdata=[r.get("kept_tokens", math.nan) for r in pts])
        fig.add_trace(go.Scatter(y=[r["ppl_late"] for r in pts], name=_name(m),
                                 hovertemplate="budget %{x} tokens (reads %{customdata:.0f})"
                                 "<br>ppl %{y:.3f}<extra></extra>", **common), row=1, col=1)
        fig.add_trace(go.Scatter(y=[r["recall"] for r in pts], showlegend=False,
                                 hovertemplate="budget %{x} tokens<br>recall %{y:.3f}"
                                 "<extra></extra>", **common), row=1, col=2)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is not None and budgets:
        span = [budgets[0], budgets[-1]]
        fig.add_trace(go.Scatter(x=span, y=[dense["ppl_late"]] * 2, mode="lines",
                                 name=f"dense ({dense['ppl_late']:.3f})", legendgroup="dense",
                                 line=dict(color="black", dash="dash")), row=1, col=1)
        fig.add_trace(go.Scatter(x=span, y=[1.0, 1.0], mode="lines", showlegend=False,
                                 legendgroup="dense", line=dict(color="black", dash="dash")),
                      row=1, col=2)
    fig.update_xaxes(title="token budget (keys a decode query may read)", type="log",
                     tickvals=budgets, ticktext=[str(t) for t in budgets])
    fig.update_yaxes(title="perplexity", row=1, col=1)
    fig.update_yaxes(title="recall", range=[0, 1.02], row=1, col=2)
    windows = rows[0].get("windows", "?")
    fig.update_layout(title=f"Teacher-forced decode sparsity against the token budget, "
                            f"{length}-token windows ({windows} of evaluation text)"
                            f"{_subtitle(note)}", height=460)
    return fig


def decode_passkey_figure(rows: Sequence[Mapping], note: str = "") -> go.Figure:
    """Passkey accuracy (rows of `seerlib.eval.decode.decode_passkey`: dense prefill, sparse
    decode) per config and (length, depth), as notebook 04's passkey heatmap."""
    acc: dict = {}
    for r in rows:
        acc.setdefault(r["label"], {})[(r["length"], r["depth"])] = r["accuracy"]
    fig = passkey_figure(acc)
    trials = sorted({r.get("trials") for r in rows if r.get("trials")})
    fig.update_layout(title="Passkey retrieval with sparse decoding (dense prefill; "
                            f"{'/'.join(map(str, trials)) or '?'} keys per cell){_subtitle(note)}")
    return fig


def decode_generation_table(rows: Sequence[Mapping], note: str = "") -> go.Figure:
    """Greedy generation lengths per config (rows of `seerlib.eval.decode.generation_lengths`)."""
    return table_figure(
        rows, ["label", "length", "prompts", "mean_new_tokens", "hit_cap", "same_as_first"],
        title=f"Generation length until EOS or the cap{_subtitle(note)}",
        formats={"mean_new_tokens": ".1f", "hit_cap": ".2f", "same_as_first": ".3f"},
        headers={"label": "config", "length": "prompt tokens", "mean_new_tokens":
                 "mean new tokens", "hit_cap": "share at the cap",
                 "same_as_first": "tokens equal to dense's"})


def _json_files(folder, prefix: str) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob(f"{prefix}*.json")) if folder.is_dir() else []


def decode_quality_results(folder) -> list[dict]:
    """The committed `seerlib.eval.decode` results (`decode-quality-*.json`) in `folder`: one dict
    per readable file, its JSON (device, device_name, gates, quality, passkey, generation rows)
    with "_file" its name; unreadable files are passed over."""
    out = []
    for p in _json_files(folder, QUALITY_PREFIX):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("quality", []), list):
            out.append(dict(data, _file=p.name))
    return out


# ---------------------------------------------------------------- speed

# columns of a decode speed table, in order, when present (others: those naming a speed-up)
SPEED_COLUMNS = ["provider", "batch", "kv_len", "sparsity", "ms"]


def decode_speed_records(folder) -> tuple[list[dict], list[str]]:
    """The records of `bench/bench_decode.py` result files (`decode-*.json`, not the
    `decode-quality-*` tables) in `folder`: dicts of a JSON list (or of a dict's "records"), each
    with its file's name under "_file"; and the file names read."""
    recs = []
    for p in _json_files(folder, SPEED_PREFIX):
        if p.name.startswith(QUALITY_PREFIX):
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            data = data.get("records", [])
        if isinstance(data, list):
            recs += [dict(r, _file=p.name) for r in data if isinstance(r, dict) and "ms" in r]
    return recs, sorted({r["_file"] for r in recs})


def _speed_columns(records: Sequence[Mapping]) -> list[str]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    extra = [k for k in keys if k not in SPEED_COLUMNS and ("speed" in k or k.startswith("vs_"))
             and any(isinstance(r.get(k), int | float) for r in records)]
    return [k for k in SPEED_COLUMNS if k in keys] + extra


def _machine(records: Sequence[Mapping]) -> str:
    r = records[0]
    parts = [str(r[k]) for k in ("gpu", "date") if r.get(k)]
    parts += [f"{k} {r[k]}" for k in ("torch", "triton") if r.get(k)]
    return ", ".join(parts) or "device not recorded"


def decode_speed_tables(records: Sequence[Mapping]) -> list[go.Figure]:
    """One table per result file: each record's provider, batch, cache length, sparsity, time
    and speed-up columns, titled with the file, GPU, date, torch and triton."""
    figs = []
    for f in dict.fromkeys(r["_file"] for r in records):
        mine = [r for r in records if r["_file"] == f]
        cols = _speed_columns(mine)
        figs.append(table_figure(mine, cols, title=f"Decode attention speed, {f} "
                                 f"({_machine(mine)})",
                                 formats={c: ".2f" for c in cols} | {"ms": ".4g"}))
    return figs


def decode_speed_figure(records: Sequence[Mapping]) -> go.Figure | None:
    """Speed-up over the fastest SDPA provider at the same batch and cache length (its time over
    each other provider's) against the cache length, one panel per batch, one line per
    (provider, sparsity); None when the records hold no SDPA provider or no cache lengths."""
    recs = [r for r in records if {"provider", "kv_len", "ms"} <= set(r)]
    base: dict = {}
    for r in recs:
        if str(r["provider"]).startswith("sdpa"):
            key = (r.get("batch"), r["kv_len"])
            base[key] = min(base.get(key, math.inf), r["ms"])
    if not base:
        return None
    batches = sorted({r.get("batch") for r in recs}, key=lambda b: (b is None, b))
    fig = make_subplots(rows=1, cols=len(batches), shared_yaxes=True,
                        subplot_titles=[f"batch {b}" for b in batches])
    lines = list(dict.fromkeys((r["provider"], r.get("sparsity")) for r in recs
                               if not str(r["provider"]).startswith("sdpa")))
    for c, batch in enumerate(batches, start=1):
        for n, (prov, sp) in enumerate(lines):
            pts = sorted((r for r in recs if (r["provider"], r.get("sparsity")) == (prov, sp)
                          and r.get("batch") == batch and (batch, r["kv_len"]) in base),
                         key=lambda r: r["kv_len"])
            if not pts:
                continue
            name = f"{prov}" + (f", sparsity {sp:.2f}" if isinstance(sp, int | float) else "")
            fig.add_trace(go.Scatter(
                x=[r["kv_len"] for r in pts], y=[base[(batch, r["kv_len"])] / r["ms"]
                                                  for r in pts],
                mode="lines+markers", name=name, legendgroup=name, showlegend=c == 1,
                line=dict(color=_SPEED_COLOURS[n % len(_SPEED_COLOURS)]),
                customdata=[r["ms"] for r in pts],
                hovertemplate=name + ": %{y:.2f}x (%{customdata:.3f} ms)<extra></extra>"),
                row=1, col=c)
        fig.add_hline(y=1.0, line_dash="dot", line_color="black", row=1, col=c)
    fig.update_xaxes(title="KV cache length (tokens)", type="log")
    fig.update_yaxes(title="speed-up over the fastest SDPA (x)", type="log", row=1, col=1)
    fig.update_layout(title=f"One decode attention step against dense SDPA ({_machine(recs)})",
                      height=440)
    return fig


_SPEED_COLOURS = ["#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#1f77b4", "#8c564b", "#7f7f7f"]
