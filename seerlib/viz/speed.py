"""Kernel speed (notebook 05): benchmark records of `bench/bench_attention.py`, the block-sparse
kernel's speedup over each baseline and dense attention throughput."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from seerlib.viz.common import show

PROVIDER_NAMES = {"sdpa_flash": "FlashAttention-2 (SDPA)", "sdpa_cudnn": "cuDNN (SDPA)",
                  "flex": "FlexAttention (same mask)", "seer_dense": "our dense kernel"}


PREFILL_PREFIX = "prefill-"
# rows of the end-to-end figure, in order: (provider, legend name)
PREFILL_ROWS = [("sdpa_cudnn", "SDPA cuDNN (dense)"), ("sdpa_flash", "SDPA flash (dense)"),
                ("flex", "FlexAttention (dense)"), ("gate@0.1", "gate, density 0.1"),
                ("graph:gate@0.1", "gate, density 0.1, CUDA graphs"),
                ("sink_window@0.1", "sink + window, 0.1"),
                ("ideal@0.1", "ideal: kernel on a prebuilt index")]


def _list_records(files, keep) -> list[dict]:
    """The dict records of the JSON lists in `files` that `keep(record)` accepts, each with its
    file's name under "_file"; unreadable files are passed over."""
    recs = []
    for p in files:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, list):
            recs += [dict(r, _file=p.name) for r in data if isinstance(r, dict) and keep(r)]
    return recs


def prefill_records(folder) -> tuple[list[dict], list[str]]:
    """Rows of `bench/bench_prefill.py` result files (`prefill-*.json`) in `folder` that ran
    (status ok), and the file names read."""
    recs = _list_records(sorted(Path(folder).glob(f"{PREFILL_PREFIX}*.json")),
                         lambda r: r.get("kind") == "row" and r.get("status") == "ok")
    return recs, sorted({r["_file"] for r in recs})


def prefill_figure(records: Sequence[Mapping]) -> go.Figure:
    """End-to-end prefill time through `sparsify` against dense, per model shape and length:
    bars of the speed-up over SDPA's cuDNN backend measured in the same run (> 1: faster)."""
    shapes = list(dict.fromkeys((r["shape"], r["layers"]) for r in records))
    fig = make_subplots(rows=1, cols=max(1, len(shapes)), subplot_titles=[
        f"{s}, {n} layers" for s, n in shapes] or [""])
    for j, (shape, layers) in enumerate(shapes, start=1):
        mine = [r for r in records if (r["shape"], r["layers"]) == (shape, layers)]
        lens = sorted({r["seq_len"] for r in mine})
        for i, (prov, name) in enumerate(PREFILL_ROWS):
            by = {r["seq_len"]: r for r in mine if r["provider"] == prov and "vs_sdpa_cudnn" in r}
            if not by:
                continue
            fig.add_trace(go.Bar(
                x=[f"{S // 1024}k" for S in lens], y=[by[S]["vs_sdpa_cudnn"] if S in by else None
                                                      for S in lens],
                name=name, legendgroup=name, showlegend=j == 1,
                marker_color=px.colors.qualitative.Plotly[i % 10],
                customdata=[by[S]["ms"] if S in by else None for S in lens],
                hovertemplate=name + ": %{y:.2f}× cuDNN (%{customdata:.1f} ms)<extra></extra>"),
                row=1, col=j)
        fig.add_hline(y=1.0, line_dash="dot", line_color="black", row=1, col=j)
    gpu = next((r.get("gpu") for r in records if r.get("gpu")), "")
    fig.update_yaxes(title_text="speed-up over SDPA cuDNN (same run)", row=1, col=1)
    fig.update_layout(barmode="group", height=440, legend=dict(orientation="h", y=-0.2),
                      title=f"Whole-model prefill through sparsify vs dense ({gpu}; random "
                            "weights, untrained gate: timing only)")
    return fig


def bench_records(folder, gpu: str | None = None) -> tuple[list[dict], list[str]]:
    """Benchmark records of `bench/bench_attention.py` result files in `folder`.

    Takes the sweep files (`<gpu>-<date>[tag].json`, not `-checks` / `-tune`), keeps one GPU
    (`gpu`, else the one with the newest date) and, for a repeated (provider, seq_len, pattern,
    sparsity) point, the record of the newest file.
    Returns:
        (records, the file names used).
    """
    files = sorted(p for p in Path(folder).glob("*.json")
                   if not p.stem.endswith("-checks") and "-tune" not in p.stem
                   and not p.stem.startswith(PREFILL_PREFIX))  # bench_prefill's own files
    recs = _list_records(files, lambda r: {"provider", "seq_len", "ms"} <= set(r))
    if not recs:
        return [], []
    if gpu is None:
        gpu = max(recs, key=lambda r: (r.get("date", ""), r["_file"]))["gpu"]
    recs = [r for r in recs if r.get("gpu") == gpu]
    recs.sort(key=lambda r: (r.get("date", ""), r["_file"]))
    keep = {}
    for r in recs:
        key = (r["provider"], r["seq_len"], r.get("pattern", "dense"),
               round(r.get("target_sparsity", r.get("sparsity", 0.0)), 3))
        keep[key] = r
    out = list(keep.values())
    return out, sorted({r["_file"] for r in out})


def speedups(records: Sequence[Mapping], pattern: str = "random") -> list[dict]:
    """Per seer record of `pattern`: the speedup over each baseline at the same length:
    dense baselines (FA2, cuDNN, our dense kernel) by their sparsity-0 time, FlexAttention by its
    time on the same mask."""
    dense = {(r["provider"], r["seq_len"]): r["ms"] for r in records
             if r.get("pattern", "dense") == "dense"}
    flex = {(r["seq_len"], round(r.get("target_sparsity", r["sparsity"]), 3)): r["ms"]
            for r in records if r["provider"] == "flex" and r.get("pattern") == pattern}
    rows = []
    for r in records:
        if r["provider"] != "seer" or r.get("pattern") != pattern:
            continue
        S, target = r["seq_len"], round(r.get("target_sparsity", r["sparsity"]), 3)
        row = {"seq_len": S, "sparsity": r["sparsity"], "target": target, "ms": r["ms"]}
        for p in ("sdpa_flash", "sdpa_cudnn", "seer_dense"):
            if (p, S) in dense:
                row[p] = dense[(p, S)] / r["ms"]
        if (S, target) in flex:
            row["flex"] = flex[(S, target)] / r["ms"]
        rows.append(row)
    return sorted(rows, key=lambda x: (x["seq_len"], x["sparsity"]))


def speedup_figure(records: Sequence[Mapping], pattern: str = "random",
                   baselines: Sequence[str] = ("sdpa_flash", "sdpa_cudnn", "flex", "seer_dense"),
                   title: str | None = None) -> go.Figure:
    """Speedup of the block-sparse kernel against sparsity, one panel per sequence length, one line
    per baseline, with the ideal 1 / (1 - s) line (log y)."""
    rows = speedups(records, pattern)
    lengths = sorted({r["seq_len"] for r in rows})
    fig = make_subplots(rows=1, cols=max(1, len(lengths)), shared_yaxes=True,
                        subplot_titles=[f"S = {S:,}" for S in lengths])
    colors = {"sdpa_flash": "#1f77b4", "sdpa_cudnn": "#2ca02c", "flex": "#9467bd",
              "seer_dense": "#7f7f7f"}
    for c, S in enumerate(lengths, start=1):
        pts = [r for r in rows if r["seq_len"] == S]
        xs = [r["sparsity"] for r in pts]
        for p in baselines:
            ys = [r.get(p) for r in pts]
            if all(y is None for y in ys):
                continue
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", name=f"vs {PROVIDER_NAMES.get(p, p)}",
                line=dict(color=colors.get(p), dash="dot" if p == "seer_dense" else None),
                legendgroup=p, showlegend=c == 1,
                hovertemplate="sparsity %{x:.2f}: %{y:.2f}x<extra></extra>"), row=1, col=c)
        s = np.linspace(0, max(xs + [0.95]), 50)
        fig.add_trace(go.Scatter(x=s, y=1 / (1 - s), mode="lines", name="ideal 1/(1-s)",
                                 line=dict(color="black", dash="dash", width=1),
                                 legendgroup="ideal", showlegend=c == 1), row=1, col=c)
        fig.add_hline(y=1, line_width=1, line_color="#bbbbbb", row=1, col=c)
    fig.update_yaxes(type="log", tickvals=[0.5, 1, 2, 5, 10, 20, 50],
                     ticktext=["0.5", "1", "2", "5", "10", "20", "50"])
    fig.update_yaxes(title="speedup (x)", row=1, col=1)
    fig.update_xaxes(title="sparsity", range=[-0.03, 1.0])
    gpu = next((r.get("gpu") for r in records if r.get("gpu")), "")
    date = next((r.get("date") for r in records if r.get("date")), "")
    fig.update_layout(title=title or f"Block-sparse attention speedup, {pattern} masks "
                      f"({gpu}, {date}); sparsity = dropped share of the causal blocks", height=460)
    return fig


def speed_panel(records: Sequence[Mapping], pattern: str, interactive: bool):
    """The speedup figure with a pattern selector.

    Returns:
        interactive: an `ipywidgets.VBox` (pattern dropdown + figure); otherwise the figure.
    """
    if not interactive:
        return speedup_figure(records, pattern)
    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

    patterns = sorted({r.get("pattern") for r in records if r["provider"] == "seer"})
    w = W.Dropdown(options=patterns, value=pattern if pattern in patterns else patterns[0],
                   description="pattern")
    out = W.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            show(speedup_figure(records, w.value))

    w.observe(redraw, "value")
    redraw()
    return W.VBox([w, out])


def dense_throughput_figure(records: Sequence[Mapping]) -> go.Figure:
    """Dense causal attention throughput (TFLOP/s) per provider and sequence length: our dense
    kernel, our pooled kernel (dense + the block max-pooled map the gate trains on), SDPA's
    FlashAttention-2 and cuDNN backends."""
    order = ["seer_dense", "seer_pooled", "sdpa_flash", "sdpa_cudnn"]
    names = {"seer_dense": "ours, dense", "seer_pooled": "ours, dense + pooled map",
             "sdpa_flash": "FlashAttention-2 (SDPA)", "sdpa_cudnn": "cuDNN (SDPA)"}
    colors = {"seer_dense": "#7f7f7f", "seer_pooled": "#d62728", "sdpa_flash": "#1f77b4",
              "sdpa_cudnn": "#2ca02c"}
    dense = [r for r in records if r.get("pattern", "dense") == "dense" and r["provider"] in order]
    lengths = sorted({r["seq_len"] for r in dense})
    fig = go.Figure()
    for p in order:
        by = {r["seq_len"]: r for r in dense if r["provider"] == p}
        if not by:
            continue
        fig.add_trace(go.Bar(
            x=[f"{S:,}" for S in lengths], y=[by[S]["tflops"] if S in by else None
                                             for S in lengths],
            name=names[p], marker_color=colors[p],
            customdata=[by[S]["ms"] if S in by else None for S in lengths],
            hovertemplate="S=%{x}: %{y:.0f} TFLOP/s (%{customdata:.2f} ms)<extra></extra>"))
    gpu = next((r.get("gpu") for r in records if r.get("gpu")), "")
    fig.update_layout(barmode="group", title=f"Dense causal attention throughput ({gpu})",
                      xaxis_title="sequence length", yaxis_title="TFLOP/s", height=400)
    return fig
