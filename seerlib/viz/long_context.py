"""Long context (notebook 07): YaRN's effect on dense perplexity against length, how much of the
attention mass the best blocks hold as the context grows, and the committed GPU runs at 32k.

Live (any device): `yarn_perplexity` (the model as it is, then extended by YaRN) and
`mass_by_length` (the exact block mass of every layer and the oracle's best blocks of it).
Committed (GPU): `bench/yarn_ppl.py`'s tables (`yarn_views`), `python -m seerlib.eval --context`
quality and passkey files (`long_results`, `quality_views`) and `bench/bench_backward.py`'s
forward+backward timings with `bench/bench_prefill.py`'s prefill (`speed_views`). Each `*_views`
returns what a notebook section shows: figures, or one line saying what is not measured yet and
which command measures it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from seerlib import metrics, yarn
from seerlib.capture import attention_override
from seerlib.eval.passkeys import PasskeyTrial, passkey_accuracy
from seerlib.eval.ppl import perplexity
from seerlib.eval.results import ResultsError, load_results, read_results
from seerlib.integrate import count_blocks
from seerlib.methods import LayerInputs, SparseConfig, layer_block_mask
from seerlib.names import color, display_name, series
from seerlib.select import Selection
from seerlib.viz.common import show, table_figure
from seerlib.viz.quality import passkey_figure
from seerlib.viz.speed import PROVIDER_NAMES, _list_records, prefill_figure, prefill_records

# what bench/yarn_ppl.py calls its variants, for a reader
VARIANT_NAMES = {"base-as-loaded": "base, rope as loaded", "base": "base (no YaRN)",
                 "yarn": "YaRN"}
VARIANT_COLORS = {"base-as-loaded": "#aaaaaa", "base": "#1f77b4", "yarn": "#d62728"}
YARN_PATTERN = "yarn-ppl-H200-*.json"
BACKWARD_PATTERN = "backward-H200-*.json"
# the oracle whose recall is the mass its blocks hold; the max-pooled one where it is missing
MASS_ORACLES = ("oracle-sum", "oracle-max")
# bars of the forward+backward figure, in order: (provider, legend name)
BACKWARD_ROWS = [("sdpa_flash", "SDPA flash, dense"), ("sdpa_cudnn", "SDPA cuDNN, dense"),
                 ("seer_dense", "our kernel, dense"), ("seer", "block-sparse, via autograd"),
                 ("seer_kernels", "block-sparse kernels alone")]


def _k(S: int) -> str:
    return f"{S // 1024}k" if S % 1024 == 0 else str(S)


def show_views(views: Sequence) -> None:
    """Show a section's views: figures through `show`, lines of text printed."""
    for v in views:
        if isinstance(v, str):
            print(v)
        else:
            show(v)


# ---------------------------------------------------------------- YaRN and perplexity


@torch.no_grad()
def yarn_perplexity(model, windows: Mapping[int, torch.Tensor], factor: float = 4.0
                    ) -> list[dict]:
    """Dense perplexity per length of the model as it is ("base"), then extended by YaRN
    (`seerlib.yarn.extend_context`, "yarn"), each window scored on its own
    (`seerlib.eval.perplexity`). The model is extended in place and stays extended.

    Args:
        model: a RoPE model not extended yet (rope_type "default").
        windows: {length: (N, length) token ids}.
        factor: YaRN's factor (4: SmolLM2's 8192 tokens to 32768).
    Returns:
        rows with bench/yarn_ppl.py's keys: variant, seq_len, windows, tokens, ppl, per_window,
        status ("ok"), factor, seconds.
    """
    kind = model.config.rope_parameters.get("rope_type")
    if kind != "default":
        raise ValueError(f"the model's rope is {kind!r} already; yarn_perplexity scores the base "
                         "model first, so pass one as seerlib.load_model gives it")
    rows = []
    for variant in ("base", "yarn"):
        if variant == "yarn":
            yarn.extend_context(model, factor)
        for S, ids in windows.items():
            t0 = time.time()
            res = perplexity(model, ids, progress=False)
            rows.append({"variant": variant, "seq_len": S, "windows": int(ids.shape[0]),
                         "tokens": res.tokens, "ppl": res.ppl, "per_window": res.per_window,
                         "status": "ok", "factor": factor, "seconds": time.time() - t0})
    return rows


def yarn_ppl_figure(rows: Sequence[Mapping], note: str, original_context: int | None = None
                    ) -> go.Figure:
    """Dense perplexity against window length, one line per variant (base, YaRN); a dotted line
    at the context the model was trained for."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    lengths = sorted({r["seq_len"] for r in ok})
    fig = go.Figure()
    for v in [v for v in VARIANT_NAMES if any(r["variant"] == v for r in ok)]:
        pts = sorted((r for r in ok if r["variant"] == v), key=lambda r: r["seq_len"])
        factor = pts[0].get("factor")
        name = VARIANT_NAMES[v] + (f" x{factor:g}" if v == "yarn" and factor else "")
        fig.add_trace(go.Scatter(
            x=[r["seq_len"] for r in pts], y=[r["ppl"] for r in pts], mode="lines+markers",
            name=name, line=dict(color=VARIANT_COLORS[v]),
            customdata=[r["windows"] for r in pts],
            hovertemplate=name + ": %{x} tokens, ppl %{y:.2f} (%{customdata} window(s))"
                                 "<extra></extra>"))
    if original_context:
        fig.add_vline(x=original_context, line_dash="dot", line_color="gray",
                      annotation_text=f"trained context {original_context}")
    fig.update_xaxes(type="log", title="window length (tokens, log scale)",
                     tickvals=lengths, ticktext=[_k(S) for S in lengths])
    fig.update_yaxes(title="dense perplexity (lower is better)")
    fig.update_layout(title=dict(text=f"YaRN's effect on dense perplexity<br><sub>{note}</sub>"),
                      height=420, legend=dict(orientation="h", y=-0.3),
                      margin=dict(t=110))
    return fig


def yarn_ppl_table(rows: Sequence[Mapping], title: str) -> go.Figure:
    """The perplexity table: one row per length, one column per variant, YaRN against base."""
    variants = [v for v in VARIANT_NAMES if any(r["variant"] == v for r in rows)]
    cell = {(r["variant"], r["seq_len"]): r for r in rows}
    out = []
    for S in sorted({r["seq_len"] for r in rows}):
        first = next(cell[(v, S)] for v in variants if (v, S) in cell)
        row = {"tokens": S, "windows": first.get("windows"), "scored": first.get("tokens")}
        for v in variants:
            r = cell.get((v, S), {})
            row[v] = r.get("ppl") if r.get("status", "ok") == "ok" else r.get("status")
        if isinstance(row.get("yarn"), float) and isinstance(row.get("base"), float):
            row["YaRN vs base"] = row["yarn"] / row["base"] - 1
        out.append(row)
    headers = {v: VARIANT_NAMES[v] for v in variants} | {"scored": "tokens scored"}
    return table_figure(out, ["tokens", "windows", "scored", *variants, "YaRN vs base"],
                        title=title, headers=headers,
                        formats={v: ".2f" for v in variants} | {"YaRN vs base": "+.1%"})


def _json_docs(folder, pattern: str) -> tuple[list[dict], list[str]]:
    """({meta, rows} documents of the files matching pattern, each with "_file"), notes on the
    files passed over."""
    docs, notes = [], []
    for p in sorted(Path(folder).glob(pattern)):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{p.name} passed over: unreadable ({e})")
            continue
        if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict)
                and isinstance(doc.get("rows"), list)):
            notes.append(f"{p.name} passed over: not a {{meta, rows}} document")
            continue
        docs.append(dict(doc, _file=p.name))
    return docs, notes


def yarn_views(folder, pattern: str = YARN_PATTERN) -> list:
    """The committed `bench/yarn_ppl.py` runs (GPU) in `folder`: per file its figure and table,
    or a line saying none is committed yet."""
    docs, notes = _json_docs(folder, pattern)
    if not docs:
        return [*notes, f"Not yet measured on a GPU: no {pattern} in {folder} (written by "
                        "`bench/yarn_ppl.py`, stage `yarn` of bench/h200_long.sh)."]
    views = list(notes)
    for doc in docs:
        m = doc["meta"]
        note = (f"{m.get('model', '?')}, {m.get('gpu') or m.get('device', '?')}, "
                f"{m.get('dtype', '?')}; text: {m.get('text', '?')}; no fine-tuning; "
                f"{doc['_file']}")
        rows = [dict(r, factor=m.get("factor")) for r in doc["rows"]]
        views += [f"{doc['_file']}: {m.get('command', '')}",
                  yarn_ppl_figure(rows, note, m.get("original_context")),
                  yarn_ppl_table(rows, f"Dense perplexity, base and YaRN ({note})")]
    return views


# ---------------------------------------------------------------- sparsity against length


@torch.no_grad()
def mass_by_length(model, windows: Mapping[int, torch.Tensor],
                   densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
                   block_size: int = 64) -> list[dict]:
    """How much of the attention mass the best blocks hold, per length and density.

    One dense forward per window (`seerlib.eval.perplexity`); inside every layer the exact block
    mass (`metrics.block_mass`, post-RoPE Q/K), the oracle's selection of it at each density
    ("oracle-sum": each query-block row's top-k tiles by that mass, the mask `sparsify` builds,
    `methods.layer_block_mask`), and the share of the mass those blocks hold (`metrics.recall`).

    Args:
        model: a transformers model (dense).
        windows: {length: (N, length) token ids}.
        densities: target densities (kept shares of the causal blocks).
        block_size: b.
    Returns:
        rows with `seerlib.eval.evaluate`'s keys: label, method, density_target, threshold,
        length, windows, achieved_density, recall (the mass held: mean over layers, heads,
        query-block rows and windows), per_layer_recall, ppl (dense), seconds.
    """
    configs = [SparseConfig("oracle-sum", Selection(density=d), block_size=block_size)
               for d in densities]
    rows = []
    for S, ids in windows.items():
        acc = {c.label: {"layers": {}, "kept": 0, "causal": 0} for c in configs}
        t0 = time.time()
        with attention_override(model, _mass_hook(configs, block_size, acc)):
            res = perplexity(model, ids, progress=False)
        seconds = time.time() - t0
        for c in configs:
            a = acc[c.label]
            per_layer = [sum(v) / len(v) for _, v in sorted(a["layers"].items())]
            rows.append(dict(label=c.label, method=c.method, density_target=c.selection.density,
                             threshold=None, length=S, windows=int(ids.shape[0]),
                             achieved_density=a["kept"] / a["causal"],
                             recall=sum(per_layer) / len(per_layer), per_layer_recall=per_layer,
                             ppl=res.ppl, seconds=seconds))
    return rows


def _mass_hook(configs, block_size: int, acc: dict):
    """An `attention_override` function that adds each layer's held mass and kept / causal block
    counts per config to `acc` ({label: {"layers": {layer: [recall]}, "kept", "causal"}}) and
    returns the dense attention."""

    def score(module, query, key, value, attention_mask, *, default, **kwargs):
        scale, softcap = kwargs.get("scaling"), kwargs.get("softcap")
        mass = metrics.block_mass(query, key, block_size, scale=scale,
                                  softcap=softcap)  # (B, Hq, nb, nb)
        for c in configs:
            mask = layer_block_mask(c, LayerInputs(query, key, value, block_size, scale=scale,
                                                   weights=mass, softcap=softcap))
            a = acc[c.label]
            a["layers"].setdefault(module.layer_idx, []).append(float(metrics.recall(mass, mask)))
            kept, causal = count_blocks(mask)
            a["kept"] += kept
            a["causal"] += causal
        return default(module, query, key, value, attention_mask, **kwargs)

    return score


def mass_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The rows of `seerlib.eval` results that say how much mass the best blocks hold: the top-k
    rows of "oracle-sum" (its recall is exactly that), else of "oracle-max" (top-k of the
    max-pooled map, a little less)."""
    for method in MASS_ORACLES:
        got = [dict(r) for r in rows if r.get("threshold") is None and series(r) == method]
        if got:
            return got
    return []


def mass_by_length_figure(rows: Sequence[Mapping], note: str, density: float = 0.1
                          ) -> go.Figure:
    """Left: the attention mass the oracle's blocks hold against the achieved density, one line
    per length (a higher line: sparser attention). Right: that mass per layer at `density`."""
    lengths = sorted({r["length"] for r in rows})
    method = display_name(series(rows[0])) if rows else "oracle"
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "mass held against density (all layers)", f"per layer, at target density {density:g}"])
    palette = ["#9ecae1", "#4292c6", "#08519c", "#08306b", "#e6550d"]
    for i, S in enumerate(lengths):
        pts = sorted((r for r in rows if r["length"] == S), key=lambda r: r["achieved_density"])
        c = palette[min(i, len(palette) - 1)] if len(lengths) > 1 else palette[2]
        name = f"{_k(S)} tokens ({pts[0].get('windows', '?')} window(s))"
        fig.add_trace(go.Scatter(
            x=[r["achieved_density"] for r in pts], y=[r["recall"] for r in pts],
            mode="lines+markers", name=name, legendgroup=name, line=dict(color=c),
            customdata=[r["density_target"] for r in pts],
            hovertemplate=f"{_k(S)}: density %{{x:.3f}} (target %{{customdata}}), mass held "
                          "%{y:.3f}<extra></extra>"), row=1, col=1)
        at = next((r for r in pts if r["density_target"] == density), None)
        if at is not None and at.get("per_layer_recall"):
            fig.add_trace(go.Scatter(
                x=list(range(len(at["per_layer_recall"]))), y=at["per_layer_recall"],
                mode="lines+markers", line=dict(color=c), legendgroup=name, showlegend=False,
                name=f"{_k(S)}, density {at['achieved_density']:.3f}",
                hovertemplate=f"{_k(S)}, achieved density {at['achieved_density']:.3f}: layer "
                              "%{x}, mass held %{y:.3f}<extra></extra>"), row=1, col=2)
    if len(lengths) > 1:
        fig.add_vline(x=common_density(rows), line_dash="dot", line_color="gray", row=1, col=1,
                      annotation_text="every length reaches this density",
                      annotation_position="bottom right")
    fig.update_xaxes(title="achieved density (kept share of causal blocks)", range=[0, None],
                     row=1, col=1)
    fig.update_xaxes(title="layer", row=1, col=2)
    fig.update_yaxes(title="attention mass held (mean per query block)", range=[0, 1.02])
    fig.update_layout(title=dict(text=f"Attention gets sparser with length: the mass the best "
                                      f"blocks hold ({method})<br><sub>{note}</sub>"),
                      height=440, legend=dict(orientation="h", y=-0.3),
                      margin=dict(t=110))
    return fig


def common_density(rows: Sequence[Mapping]) -> float:
    """The lowest achieved density that every length's rows reach (top-k keeps whole blocks per
    row, so short windows cannot go as low as long ones)."""
    return max(min(r["achieved_density"] for r in rows if r["length"] == S)
               for S in {r["length"] for r in rows})


def mass_at_density(rows: Sequence[Mapping], density: float) -> dict[int, float | None]:
    """{length: the mass held at achieved `density`}, linear between the two measured points
    around it; None where the length's points do not reach it."""
    out = {}
    for S in sorted({r["length"] for r in rows}):
        pts = sorted((r["achieved_density"], r["recall"]) for r in rows if r["length"] == S)
        out[S] = next((m0 + (m1 - m0) * (density - d0) / (d1 - d0) if d1 > d0 else m0
                       for (d0, m0), (d1, m1) in zip(pts, pts[1:] or pts, strict=False)
                       if d0 <= density <= d1), None)
    return out


def mass_table(rows: Sequence[Mapping], density: float = 0.1) -> go.Figure:
    """One row per length: the oracle's row at target `density` (achieved density, mass held,
    dense perplexity when the rows have it), and the mass held at the density every length
    reaches (`common_density`, interpolated), the fair comparison across lengths."""
    common = common_density(rows)
    equal = mass_at_density(rows, common)
    eq = f"mass held at density {common:.3f} (interpolated)"
    out = [{"tokens": r["length"], "windows": r.get("windows"),
            "achieved density": r["achieved_density"], "mass held": r["recall"],
            eq: equal[r["length"]], "dense ppl": r.get("ppl")}
           for r in sorted(rows, key=lambda r: r["length"]) if r["density_target"] == density]
    return table_figure(out, title=f"Attention mass the oracle's blocks hold, target density "
                                   f"{density:g}, and at one density for every length",
                        formats={"achieved density": ".3f", "mass held": ".3f", eq: ".3f",
                                 "dense ppl": ".2f"})


# ---------------------------------------------------------------- quality at 8k-32k (GPU)


@dataclass
class LongResults:
    """The committed `python -m seerlib.eval --context` results of one model (one YaRN context
    and one fine-tuned diff, or none): rows and passkey trials merged by `load_results`."""

    model: str  # a reader's name: model, context, fine-tuned or not, device
    rows: list[dict]
    trials: dict[str, list[PasskeyTrial]]
    files: list[str]
    notes: list[str] = field(default_factory=list)


def _model_name(meta: Mapping) -> str:
    diff = meta.get("model_diff")
    tuned = (f"fine-tuned ({Path(diff).name}, {meta.get('model_diff_steps', '?')} steps)"
             if diff else "not fine-tuned")
    return (f"{meta.get('model', '?')} + YaRN to {meta.get('context')} tokens, {tuned}; "
            f"{meta.get('gpu') or meta.get('device', '?')}, {meta.get('dtype', '?')}; text: "
            f"{meta.get('text', '?')}")


def long_results(folder, patterns: Sequence[str] = ("quality-*.json", "passkey-*.json")
                 ) -> tuple[list[LongResults], list[str]]:
    """The result files in `folder` made with `--context` (YaRN), one `LongResults` per model
    (context and model diff: a fine-tuned model's rows never merge with the base's), and notes
    on the files passed over (unreadable)."""
    groups: dict[tuple, list[Path]] = {}
    metas, notes = {}, []
    for p in sorted({p for pat in patterns for p in Path(folder).glob(pat)}):
        try:
            meta = read_results(p).get("meta", {})
        except ResultsError as e:
            notes.append(f"{p.name} passed over: {e}")
            continue
        if meta.get("context"):
            key = (meta["context"], meta.get("model_diff_sha256"))
            groups.setdefault(key, []).append(p)
            metas.setdefault(key, meta)
    out = []
    for key, paths in groups.items():
        rows, trials, read = load_results(paths)
        out.append(LongResults(_model_name(metas[key]), rows, trials,
                               [p.name for p in paths], read))
    return out, notes


def quality_by_length_figure(rows: Sequence[Mapping], note: str, density: float = 0.1
                             ) -> go.Figure:
    """Left: each method's perplexity increase over dense at the same length, at target
    `density` (top-k); right: its recall of the attention mass. One line per method."""
    dense = {r["length"]: r["ppl"] for r in rows if series(r) == "dense"}
    at = [r for r in rows if r.get("density_target") == density and r.get("threshold") is None]
    lengths = sorted({r["length"] for r in at})
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "perplexity increase over dense (lower is better)", "recall of the attention mass"])
    for key in dict.fromkeys(series(r) for r in at):
        pts = sorted((r for r in at if series(r) == key), key=lambda r: r["length"])
        name, common = display_name(key), dict(mode="lines+markers")
        x = [_k(r["length"]) for r in pts]
        dens = [r["achieved_density"] for r in pts]
        fig.add_trace(go.Scatter(
            x=x, y=[r["ppl"] / dense[r["length"]] - 1 if r["length"] in dense else None
                    for r in pts], name=name, legendgroup=name, line=dict(color=color(key)),
            customdata=dens, hovertemplate=name + " at %{x}: %{y:+.1%} (density "
                                                  "%{customdata:.3f})<extra></extra>", **common),
            row=1, col=1)
        fig.add_trace(go.Scatter(
            x=x, y=[r["recall"] for r in pts], name=name, legendgroup=name, showlegend=False,
            line=dict(color=color(key)), customdata=dens,
            hovertemplate=name + " at %{x}: recall %{y:.3f} (density %{customdata:.3f})"
                                 "<extra></extra>", **common), row=1, col=2)
    fig.update_xaxes(title="window length (tokens)", type="category",
                     categoryarray=[_k(S) for S in lengths])
    fig.update_yaxes(tickformat="+.0%", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=dict(text=f"Quality against length at target density {density:g}"
                                      f"<br><sub>{note}</sub>"),
                      height=440, legend=dict(orientation="h", y=-0.3),
                      margin=dict(t=110))
    return fig


def quality_table(rows: Sequence[Mapping], title: str) -> go.Figure:
    """Every top-k row: tokens, method, target and achieved density, perplexity and its change
    from dense at that length, recall."""
    dense = {r["length"]: r["ppl"] for r in rows if series(r) == "dense"}
    out = [{"tokens": r["length"], "method": display_name(series(r)),
            "target": r.get("density_target"), "density": r["achieved_density"],
            "ppl": r["ppl"], "vs dense": r["ppl"] / dense[r["length"]] - 1
            if r["length"] in dense else None,
            "recall": None if math.isnan(r["recall"]) else r["recall"],
            "windows": r.get("windows")}
           for r in sorted(rows, key=lambda r: (r["length"], series(r) != "dense", series(r),
                                                -(r.get("density_target") or 1)))
           if r.get("threshold") is None]
    return table_figure(out, title=title, formats={
        "target": ".2f", "density": ".3f", "ppl": ".3f", "vs dense": "+.2%", "recall": ".3f"})


def long_passkey_figure(trials: Mapping[str, list[PasskeyTrial]], note: str) -> go.Figure:
    """`viz.passkey_figure` of the trials, titled with the model and lengths."""
    fig = passkey_figure({m: passkey_accuracy(t) for m, t in trials.items()})
    lengths = sorted({t.length for ts in trials.values() for t in ts})
    fig.update_layout(title=dict(text="Passkey retrieval at " + ", ".join(map(_k, lengths))
                                      + f" tokens: is the hidden number read back?<br><sub>"
                                        f"{note}</sub>"))
    return fig


def quality_views(folder, density: float = 0.1) -> list:
    """Per model with `--context` results in `folder`: the mass the oracle's blocks hold against
    length, quality against length at `density`, the quality table and the passkey heatmap; or a
    line saying none is committed yet."""
    groups, notes = long_results(folder)
    if not groups:
        return [*notes, f"Not yet measured on a GPU: no quality-*.json or passkey-*.json in "
                        f"{folder} made with `python -m seerlib.eval --context` (YaRN)."]
    views = list(notes)
    for g in groups:
        views.append(f"{g.model}: " + ", ".join(g.files))
        mass = mass_rows(g.rows)
        if mass:
            views.append(mass_by_length_figure(mass, g.model, density))
        if g.rows:
            lengths = ", ".join(_k(S) for S in sorted({r["length"] for r in g.rows}))
            views += [quality_by_length_figure(g.rows, g.model, density),
                      quality_table(g.rows, f"Quality at {lengths} tokens ({g.model})")]
        if g.trials:
            views.append(long_passkey_figure(g.trials, g.model))
    return views


# ---------------------------------------------------------------- speed (GPU)


def backward_records(folder, pattern: str = BACKWARD_PATTERN) -> tuple[list[dict], list[str]]:
    """`bench/bench_backward.py`'s forward+backward records in `folder` (and the failures, e.g.
    FlexAttention's compile errors): for a repeated (shape, seq_len, provider), the newest file's;
    and the file names read."""
    recs = _list_records(sorted(Path(folder).glob(pattern)),
                         lambda r: r.get("pass") == "fwd+bwd" or r.get("status") == "failed")
    keep = {}
    for r in sorted(recs, key=lambda r: (r.get("date", ""), r["_file"])):
        keep[(r.get("shape"), r.get("seq_len"), r.get("provider"))] = r
    out = list(keep.values())
    return out, sorted({r["_file"] for r in out})


def backward_figure(records: Sequence[Mapping], seq_len: int = 32768) -> go.Figure:
    """Forward+backward milliseconds at `seq_len` per provider, one panel per model shape; the
    block-sparse bars are labelled with their speed-up over cuDNN's dense forward+backward."""
    at = [r for r in records if r.get("seq_len") == seq_len]
    shapes = list(dict.fromkeys(r["shape"] for r in at))
    fig = make_subplots(rows=1, cols=max(1, len(shapes)), subplot_titles=[
        f"{s} shape" for s in shapes] or [""])
    for j, shape in enumerate(shapes, start=1):
        mine = {r["provider"]: r for r in at if r["shape"] == shape and r.get("status") == "ok"}
        rows = [(p, n) for p, n in BACKWARD_ROWS if p in mine]
        fig.add_trace(go.Bar(
            x=[n for _, n in rows], y=[mine[p]["ms"] for p, _ in rows], showlegend=False,
            marker_color=["#7f7f7f" if mine[p].get("density", 1) >= 1 else "#d62728"
                          for p, _ in rows],
            text=[f"{mine[p]['ms']:.1f} ms" + (f"<br>{mine[p]['x_cudnn']:.2f}x cuDNN"
                                              if mine[p].get("density", 1) < 1 else "")
                  for p, _ in rows], textposition="outside",
            hovertemplate="%{x}: %{y:.2f} ms<extra></extra>", cliponaxis=False), row=1, col=j)
        if rows:  # room above the tallest bar for its label
            fig.update_yaxes(range=[0, 1.25 * max(mine[p]["ms"] for p, _ in rows)], row=1, col=j)
        failed = [r for r in at if r["shape"] == shape and r.get("status") == "failed"]
        if failed:
            fig.add_annotation(text="did not run: " + ", ".join(
                PROVIDER_NAMES.get(r["provider"], r["provider"]) for r in failed),
                xref=f"x{j if j > 1 else ''} domain", x=0.02, xanchor="left", y=0.97,
                yref=f"y{j if j > 1 else ''} domain", showarrow=False,
                font=dict(size=11, color="#b00"))
    fig.update_yaxes(title_text="forward + backward (ms)", row=1, col=1)
    r0 = at[0] if at else {}
    dens = next((r["density"] for r in at if r.get("density", 1) < 1), None)
    fig.update_layout(height=460, margin=dict(t=110), title=dict(text=(
        f"Attention forward + backward at {_k(seq_len)} tokens ({r0.get('gpu', '?')}, "
        f"{r0.get('date', '?')})<br><sub>bf16, causal, block {r0.get('block_size', '?')}, random "
        f"tensors and random mask at density {'?' if dens is None else f'{dens:.2f}'}; "
        "red: block-sparse</sub>")))
    return fig


def speed_views(folder, seq_len: int = 32768, pattern: str = BACKWARD_PATTERN) -> list:
    """The committed forward+backward figure and the end-to-end prefill figure at `seq_len`
    (`viz.prefill_figure`), or lines saying what is not committed yet."""
    recs, files = backward_records(folder, pattern)
    views = []
    if any(r.get("seq_len") == seq_len for r in recs):
        views += [f"forward+backward: {', '.join(files)}", backward_figure(recs, seq_len)]
    else:
        views.append(f"Not yet measured on a GPU: no {pattern} in {folder} with {seq_len} tokens "
                     "(written by `bench/bench_backward.py`, stage `backward` of "
                     "bench/h200_long.sh).")
    pre, pre_files = prefill_records(folder)
    pre = [r for r in pre if r.get("seq_len") == seq_len]
    if pre:
        views += [f"prefill: {', '.join(pre_files)}", prefill_figure(pre)]
    else:
        views.append(f"Not yet measured on a GPU: no prefill-*.json rows at {seq_len} tokens in "
                     f"{folder} (written by `bench/bench_prefill.py`).")
    return views
