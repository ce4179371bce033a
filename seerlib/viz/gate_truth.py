"""Gate against ground truth (notebook 02): a trained gate's block predictions and selections next
to the model's own attention, with recall and KL per layer and head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from seerlib.methods import METHODS, LayerInputs
from seerlib.metrics import block_maps, kl_div, normalize_rows, recall
from seerlib.select import Selection, achieved_density, causal_block_mask, select_blocks
from seerlib.viz.common import _map_trace, layer_head_heatmap, show

# The oracle of this story: top-k of the exact attention mass of each tile, what `seerlib.eval`
# calls "oracle-sum" (notebook 04's "oracle-max" ranks the max-pooled map instead).
ORACLE = "oracle-sum"
ORACLE_WORDS = "oracle-sum (top-k of the exact block mass)"


@dataclass
class GateComparison:
    """A trained gate set against the model's own attention on one text, per layer, cached.

    Args:
        captured: {layer: LayerQKV} from `capture_qkv` (batch of one).
        gates: a `seerlib.gate.GateSet` (its block size is the comparison's).
    """

    captured: Mapping[int, object]
    gates: object
    _layers: dict = field(default_factory=dict, repr=False)

    @property
    def block_size(self) -> int:
        return self.gates.block_size

    @property
    def layers(self) -> list[int]:
        return sorted(self.captured)

    def layer(self, layer: int) -> dict:
        """{"mass", "truth", "logits", "pred"}, each (1, Hq, nb, nb): exact block mass, the
        row-normalized max-pooled map (the training target), gate logits and their softmax."""
        if layer not in self._layers:
            c = self.captured[layer]
            mass, pooled = block_maps(c.q, c.k, self.block_size, scale=c.scale,
                                      softcap=c.softcap)
            with torch.no_grad():
                logits = self.gates[layer](c.q_pre, c.k_pre).float()
            self._layers[layer] = {"mass": mass, "truth": normalize_rows(pooled),
                                   "logits": logits, "pred": torch.softmax(logits, dim=-1)}
        return self._layers[layer]

    def masks(self, layer: int, density: float | None = None,
              threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate mask, oracle mask), (1, Hq, nb, nb) bool. The gate's blocks come from
        `select_blocks`; the oracle is `ORACLE` ("oracle-sum": the heaviest blocks of the exact
        mass) at the same per-head density."""
        d = self.layer(layer)
        mask = select_blocks(d["logits"], Selection(density=density, threshold=threshold))
        if density is not None:
            return mask, self.oracle(layer, Selection(density=density))
        heads = [self.oracle(layer, Selection(density=max(1e-3, achieved_density(
                     mask[:, h:h + 1]))))[:, h:h + 1] for h in range(mask.shape[1])]
        return mask, torch.cat(heads, dim=1)

    def oracle(self, layer: int, selection: Selection) -> torch.Tensor:
        """(1, Hq, nb, nb) bool: the `ORACLE` method of `seerlib.methods` on this layer."""
        c, d = self.captured[layer], self.layer(layer)
        return METHODS[ORACLE].build(LayerInputs(c.q, c.k, c.v, self.block_size, scale=c.scale,
                                                 weights=d["mass"], softcap=c.softcap), selection)

    def scores(self, density: float | None = None,
               threshold: float | None = None) -> dict[str, np.ndarray]:
        """Per layer and head, (L, H) arrays: "recall" of the exact mass by the gate's blocks,
        "oracle_recall" at the same density, "kl" (target ‖ gate) and the achieved "density"."""
        out = {k: [] for k in ("recall", "oracle_recall", "kl", "density")}
        for layer in self.layers:
            d = self.layer(layer)
            mask, orc = self.masks(layer, density, threshold)
            out["recall"].append(recall(d["mass"], mask, per_head=True)[0].numpy())
            out["oracle_recall"].append(recall(d["mass"], orc, per_head=True)[0].numpy())
            out["kl"].append(kl_div(d["truth"], d["logits"], reduction="none")[0].mean(-1)
                             .numpy())
            nb = mask.shape[-1]
            kept = (mask & causal_block_mask(nb)).sum(dim=(-1, -2))[0].float()
            out["density"].append((kept / (nb * (nb + 1) / 2)).numpy())
        return {k: np.stack(v) for k, v in out.items()}


# gate minus oracle: red where the gate misses mass, white at 0, blue (rare) where it does better
_GAP_COLORS = [[0.0, "#b2182b"], [0.5, "#f7f7f7"], [1.0, "#2166ac"]]
_DIFF_COLORS = [(0, "#f2f2f2"), (1, "#2b8cbe"), (2, "#fdae61"), (3, "#d7191c")]


def gate_vs_truth_figure(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                         oracle_mask: np.ndarray, layer: int, head: int,
                         block_size: int, recall: float | None = None) -> go.Figure:
    """Ground truth, gate prediction, selected blocks and their difference from the oracle,
    for one head, in a 2 x 2 grid (it fits a narrow cell). Maps are (nb, nb); masks bool
    (nb, nb)."""
    nb = truth.shape[-1]
    upper = ~np.tri(nb, dtype=bool)
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.14,
                        subplot_titles=["ground truth (pooled)", "gate prediction (softmax)",
                                        "selected blocks", "selection vs oracle"])
    at = {1: (1, 1), 2: (1, 2), 3: (2, 1), 4: (2, 2)}  # panel -> (row, col)
    for col, m in ((1, truth), (2, pred)):
        m = np.array(m, dtype=np.float32)
        m[upper] = np.nan
        fig.add_trace(_map_trace(m, None, show_scale=col == 1), *at[col])
    sel = np.where(upper, np.nan, np.asarray(mask, dtype=np.float32))
    fig.add_trace(go.Heatmap(z=sel, zmin=0, zmax=1, showscale=False,
                             colorscale=[[0, "#f2f2f2"], [1, "#08306b"]],
                             hovertemplate="q %{y} k %{x}: kept %{z}<extra></extra>"),
                  *at[3])
    m, o = np.asarray(mask, bool), np.asarray(oracle_mask, bool)
    diff = np.select([m & o, m & ~o, ~m & o], [1, 2, 3], 0).astype(np.float32)
    diff[upper] = np.nan
    scale = []
    for i, (_, c) in enumerate(_DIFF_COLORS):
        scale += [[i / 4, c], [(i + 1) / 4, c]]
    fig.add_trace(go.Heatmap(
        z=diff, zmin=-0.5, zmax=3.5, colorscale=scale,
        colorbar=dict(x=1.02, y=0.0, yanchor="bottom", len=0.43, tickvals=[0, 1, 2, 3],
                      ticktext=["neither", "both", "gate only", "oracle only"]),
        hovertemplate="q %{y} k %{x}: %{z}<extra></extra>"), *at[4])
    # the probability colour bar beside the maps (top row), the selection key beside the bottom
    fig.update_traces(colorbar=dict(y=1.0, yanchor="top", len=0.43), selector=dict(showscale=True),
                      row=1, col=1)
    fig.update_xaxes(showgrid=False, constrain="domain", title=f"key block (b={block_size})")
    fig.update_yaxes(showgrid=False, autorange="reversed")
    fig.update_yaxes(title="query block", col=1)
    extra = "" if recall is None else f"; recall of the mass {recall:.3f}"
    fig.update_layout(title=f"Layer {layer}, head {head}: gate vs ground truth{extra}",
                      height=720, plot_bgcolor="white", margin=dict(l=40, r=40, t=80, b=40))
    return fig


def gate_panel(comparisons: Mapping[int, GateComparison], layer: int, head: int,
               density: float | None, threshold: float | None, interactive: bool,
               densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
               thresholds: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)):
    """Gate vs truth for one head plus recall and KL per head across layers, with controls.

    Args:
        comparisons: {block size: GateComparison}, one per available gate file.
    Returns:
        interactive: an `ipywidgets.VBox` with layer, head, block size and density / threshold
        controls. Otherwise: [side-by-side figure, recall heatmap, KL heatmap].
    """
    def figures(b, layer, head, density, threshold):
        gc = comparisons[b]
        d = gc.layer(layer)
        mask, orc = gc.masks(layer, density, threshold)
        sc = gc.scores(density, threshold)
        rule = f"density {density}" if density is not None else f"threshold {threshold:g}"
        return (
            gate_vs_truth_figure(d["truth"][0, head].numpy(), d["pred"][0, head].numpy(),
                                 mask[0, head].numpy(), orc[0, head].numpy(), layer, head, b,
                                 float(sc["recall"][gc.layers.index(layer), head])),
            layer_head_heatmap(sc["recall"], f"Recall of the attention mass, gate at {rule} "
                               f"(mean {sc['recall'].mean():.3f}; oracle "
                               f"{sc['oracle_recall'].mean():.3f})", "recall",
                               colorscale="Viridis", layers=gc.layers),
            layer_head_heatmap(sc["kl"], f"KL(truth ‖ gate) per head (mean {sc['kl'].mean():.3f})",
                               "KL", zrange=(0.0, float(max(0.5, np.percentile(sc["kl"], 95)))),
                               colorscale="Magma", reverse=True, layers=gc.layers),
        )

    b0 = next(iter(comparisons))
    if not interactive:
        return list(figures(b0, layer, head, density, threshold))

    import ipywidgets as W  # lazy: only interactive panels need widgets (~0.35 s to import)

    gc = comparisons[b0]
    style = {"description_width": "initial"}
    w_block = W.Dropdown(options=sorted(comparisons), value=b0, description="block size",
                         style=style)
    w_layer = W.IntSlider(value=layer, min=min(gc.layers), max=max(gc.layers),
                          description="layer", continuous_update=False, style=style)
    w_head = W.IntSlider(value=head, min=0, max=gc.layer(layer)["logits"].shape[1] - 1,
                         description="head", continuous_update=False, style=style)
    w_rule = W.ToggleButtons(options=["density", "threshold"],
                             value="density" if density is not None else "threshold")
    w_density = W.SelectionSlider(options=sorted(set(densities) | {density or 0.3}),
                                  value=density or 0.3, description="density",
                                  continuous_update=False, style=style)
    w_threshold = W.SelectionSlider(options=sorted(set(thresholds) | {threshold or 1e-3}),
                                    value=threshold or 1e-3, description="threshold",
                                    continuous_update=False, style=style)
    status = W.Label()
    out_head, out_recall, out_kl = W.Output(), W.Output(), W.Output()

    def redraw(*_):
        status.value = "computing…"
        dens = w_density.value if w_rule.value == "density" else None
        thr = w_threshold.value if w_rule.value == "threshold" else None
        figs = figures(w_block.value, w_layer.value, w_head.value, dens, thr)
        for out, fig in zip((out_head, out_recall, out_kl), figs, strict=True):
            with out:
                out.clear_output(wait=True)
                show(fig)
        status.value = ""

    def enable_rule(*_):  # only the chosen rule's slider moves anything
        w_density.disabled = w_rule.value != "density"
        w_threshold.disabled = w_rule.value != "threshold"

    w_rule.observe(enable_rule, "value")
    enable_rule()
    for w in (w_block, w_layer, w_head, w_rule, w_density, w_threshold):
        w.observe(redraw, "value")
    redraw()
    wrap = W.Layout(flex_flow="row wrap")  # controls wrap onto more rows in a narrow notebook
    controls = W.VBox([W.HBox([w_block, w_layer, w_head], layout=wrap),
                       W.HBox([w_rule, w_density, w_threshold, status], layout=wrap)])
    return W.VBox([controls, out_head, out_recall, out_kl])


# ---------------------------------------------------------------- head view: one query row


def query_row(gc: GateComparison, layer: int, head: int, query_block: int,
              density: float | None = None, threshold: float | None = None) -> dict:
    """What the gate and the oracle keep for one query block of one head, and the true mass.

    Returns:
        {"gate", "oracle"}: (i + 1,) bool kept key blocks of row i = `query_block` (from
        `GateComparison.masks`: `select_blocks` on the gate's logits and `ORACLE`);
        "mass": (i + 1,) exact attention mass per key block (sums to 1); "density": the head's
        achieved density (kept share of its causal blocks); "recall_gate", "recall_oracle": the
        row's mass inside each selection.
    """
    d = gc.layer(layer)
    nb = d["mass"].shape[-1]
    if not 0 <= query_block < nb:
        raise ValueError(f"query_block {query_block} is outside the {nb} query blocks "
                         f"(0..{nb - 1}) of {gc.block_size}-token blocks")
    mask, orc = gc.masks(layer, density, threshold)
    i = query_block
    mass = d["mass"][0, head, i, :i + 1].float()
    g, o = mask[0, head, i, :i + 1], orc[0, head, i, :i + 1]
    return {"gate": g.numpy(), "oracle": o.numpy(), "mass": mass.numpy(),
            "density": achieved_density(mask[:, head:head + 1]),
            "recall_gate": float(mass[g].sum()), "recall_oracle": float(mass[o].sum())}


def query_row_figure(row: dict, layer: int, head: int, query_block: int, block_size: int,
                     rule: str) -> go.Figure:
    """Side by side for one query block: the key blocks the gate keeps, those the oracle keeps
    and the exact attention mass per key block (coloured by who keeps it)."""
    g, o, mass = np.asarray(row["gate"]), np.asarray(row["oracle"]), np.asarray(row["mass"])
    keys = np.arange(len(mass))
    who = np.select([g & o, g & ~o, ~g & o], [1, 2, 3], 0)
    colors = [dict(_DIFF_COLORS)[w] for w in who]
    names = np.array(["neither", "both", "gate only", "oracle only"])[who]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.12, subplot_titles=[
        f"gate keeps {int(g.sum())}", f"{ORACLE} keeps {int(o.sum())}",
        "exact attention mass"])
    for col, kept, color in ((1, g, "#2b8cbe"), (2, o, "#31a354")):
        fig.add_trace(go.Bar(x=keys, y=kept.astype(int), marker_color=color, showlegend=False,
                             hovertemplate="key block %{x}: %{y}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(range=[0, 1.05], tickvals=[0, 1], ticktext=["dropped", "kept"],
                         showticklabels=col == 1, row=1, col=col)  # one key for both
    fig.add_trace(go.Bar(x=keys, y=mass, marker_color=colors, customdata=names,
                         showlegend=False, hovertemplate="key block %{x}: mass %{y:.4f}"
                         "<br>%{customdata}<extra></extra>"), row=1, col=3)
    fig.update_yaxes(title="share of the row", row=1, col=3)
    fig.update_xaxes(title=f"key block (b={block_size})")
    fig.update_layout(
        title=dict(text=f"Layer {layer}, head {head}, query block {query_block}, {rule}: achieved "
                   f"density {row['density']:.3f}; row recall gate {row['recall_gate']:.3f}, "
                   f"oracle {row['recall_oracle']:.3f}", font=dict(size=13)),
        bargap=0.1, height=340, plot_bgcolor="white",
        margin=dict(l=60, r=20, t=80, b=50))
    return fig


def recall_gap_figure(scores: dict, layers: Sequence[int], rule: str) -> go.Figure:
    """Per layer x head, gate recall minus `ORACLE` recall at the same achieved density
    (`GateComparison.scores`): 0 where the gate does as well as any selection of its size (a
    dense head, where both are low, reads 0), negative where the gate misses mass."""
    gap = scores["recall"] - scores["oracle_recall"]
    lim = float(max(0.05, np.abs(gap).max()))
    fig = layer_head_heatmap(
        gap, f"Gate recall minus {ORACLE} recall, {rule} (mean {gap.mean():+.3f}, worst "
        f"{gap.min():+.3f})", "gate − oracle", zrange=(-lim, lim), colorscale=_GAP_COLORS,
        fmt="+.2f", layers=layers)
    fig.update_traces(zmid=0.0)
    return fig
