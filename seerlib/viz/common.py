"""What every story's figures share: the "seerlib" plotly renderer, `show`, `key_figures`, the
log-scaled map traces, the layer x head heatmap, plain tables and repo-relative paths.

Importing this module registers the plotly renderer "seerlib" and makes it the default: each figure
is emitted both as plotly JSON (JupyterLab's plotly renderer draws it) and as an HTML div without
plotly.js or MathJax (what nbconvert exports; the report adds plotly.js to the page).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from seerlib.io import read_metadata

# Colour range of log-scaled attention maps: probabilities below 10**LOG_FLOOR share one colour.
LOG_FLOOR = -4.0
MAP_COLORSCALE = "Viridis"
KEY_FIGURES_MIME = "application/vnd.seerlib.key-figures+json"


# ---------------------------------------------------------------- rendering


# Page scripts of the HTML div, by the figure's `layout.meta` (a story registers its own: the model
# view's click-to-enlarge). JupyterLab's plotly renderer runs none of them.
POST_SCRIPTS: dict[str, str] = {}


# A title line longer than this many characters is broken at a space: a 1000 px JupyterLab window
# with its file browser open leaves a cell about 570 px, some 65 characters of a 17 px title.
TITLE_CHARS = 64


_TOKENS = re.compile(r"(<[^>]+>)|(\s+)|([^<\s]+)")


def wrap_title(text: str, width: int = TITLE_CHARS) -> tuple[str, int]:
    """`text` with "<br>" at spaces so that no line shows more than `width` characters. Plotly's
    tags (<sub>, <b>, ...) count for nothing and are closed before a break and reopened after it.
    Returns (text, lines added)."""
    out, added, open_tags = [], 0, []  # tags stay open across "<br>" (as plotly draws them)
    for line in text.split("<br>"):
        parts, shown, pending = [], 0, ""
        for tag, space, word in (m.groups() for m in _TOKENS.finditer(line)):
            if tag:
                parts.append(tag)
                name = tag.strip("</>").split()[0].lower() if tag.strip("</>") else ""
                if tag.startswith("</"):
                    if name in open_tags:
                        open_tags.remove(name)
                elif not tag.endswith("/>"):
                    open_tags.append(name)
            elif space:
                pending = " " if shown else ""
            else:
                if shown and shown + len(pending) + len(word) > width:
                    closing = "".join(f"</{t}>" for t in reversed(open_tags))
                    opening = "".join(f"<{t}>" for t in open_tags)
                    parts.append(f"{closing}<br>{opening}")
                    shown, pending, added = 0, "", added + 1
                parts.append(pending + word)
                shown += len(pending) + len(word)
                pending = ""
        out.append("".join(parts))
    return "<br>".join(out), added


def _wrap_figure_title(fig_dict: dict) -> None:
    """Wrap the layout title in place (`wrap_title`); a wrapped title hangs from the top of the
    figure, and the top margin holds all its lines (19 px each) and a subplot title below."""
    layout = fig_dict.setdefault("layout", {})
    title = layout.get("title")
    text = title.get("text") if isinstance(title, dict) else title
    if not isinstance(text, str):
        return
    text, added = wrap_title(text)
    if not added:
        return
    base = title if isinstance(title, dict) else {}
    layout["title"] = dict(base, text=text, y=1, yref="container", yanchor="top",
                           pad=dict(t=12))
    margin = layout.setdefault("margin", {})
    margin["t"] = max(margin.get("t") or 100, 40 + 19 * (text.count("<br>") + 1))


class _OfflineRenderer(pio.base_renderers.MimetypeRenderer):
    """Plotly JSON for JupyterLab plus an HTML div that needs a page-level plotly.js; long titles
    are wrapped to fit a narrow cell (`wrap_title`)."""

    def to_mimebundle(self, fig_dict):
        _wrap_figure_title(fig_dict)
        bundle = pio.base_renderers.PlotlyRenderer().to_mimebundle(fig_dict)
        meta = (fig_dict.get("layout") or {}).get("meta")
        bundle["text/html"] = pio.to_html(
            fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
            default_height="520px", validate=False,
            post_script=POST_SCRIPTS.get(meta) if isinstance(meta, str) else None,
        )
        return bundle


pio.renderers["seerlib"] = _OfflineRenderer()
pio.renderers.default = "seerlib"


def show(fig: go.Figure) -> None:
    """Display a figure through the "seerlib" renderer (same as ending a cell with `fig`)."""
    fig.show(renderer="seerlib")


def key_figures(figures: Mapping[str, object], title: str = "Key figures") -> None:
    """Display a notebook's headline numbers as a table; `seerlib.report` collects them for the
    report index (mimetype `KEY_FIGURES_MIME`)."""
    from IPython.display import display  # lazy: IPython costs ~0.25 s and only notebooks display

    rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(value)}</td></tr>" for name, value in figures.items()
    )
    html = f"<h4>{title}</h4><table><tr><th>figure</th><th>value</th></tr>{rows}</table>"
    # a list of pairs: notebook JSON sorts object keys, and the order is the author's
    data = {"figures": [[k, v if isinstance(v, (int, float, str, bool)) or v is None else str(v)]
                        for k, v in figures.items()]}
    display({KEY_FIGURES_MIME: data, "text/html": html,
             "text/plain": "\n".join(f"{k}: {_fmt(v)}" for k, v in figures.items())}, raw=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- log-scaled maps


def _log_map(m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.clip(m, 10**LOG_FLOOR, None)).astype(np.float32)


def _log_colorbar(**kw) -> dict:
    ticks = list(range(int(LOG_FLOOR), 1))
    return dict(tickvals=ticks, ticktext=[f"1e{t}" if t else "1" for t in ticks], **kw)


def _map_trace(m: np.ndarray, labels: Sequence[str] | None, show_scale: bool,
               hover: bool = True) -> go.Heatmap:
    # z is the log colour, customdata the probability that hover shows; the gaps (NaN, above
    # the diagonal) get no hover label
    return go.Heatmap(
        z=_log_map(m), customdata=np.asarray(m, dtype=np.float32), x=labels, y=labels,
        zmin=LOG_FLOOR, zmax=0.0, colorscale=MAP_COLORSCALE, showscale=show_scale,
        colorbar=_log_colorbar(title=dict(text="prob.")), hoverongaps=False,
        hovertemplate="query %{y}<br>key %{x}<br>p = %{customdata:.3g}<extra></extra>"
        if hover else None,
    )


# ---------------------------------------------------------------- generic


def layer_head_heatmap(z: np.ndarray, title: str, colorbar: str, zrange=(0.0, 1.0),
                       colorscale: str = "Viridis", reverse: bool = False, fmt: str = ".2f",
                       layers: Sequence[int] | None = None) -> go.Figure:
    """A layer (rows) x head (columns) heatmap with the values written in the cells."""
    L, H = z.shape
    layers = list(range(L)) if layers is None else list(layers)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"h{h}" for h in range(H)], y=layers, zmin=zrange[0], zmax=zrange[1],
        colorscale=colorscale, reversescale=reverse, texttemplate=f"%{{z:{fmt}}}",
        textfont_size=9, colorbar=dict(title=dict(text=colorbar)),
        hovertemplate=f"layer %{{y}}, %{{x}}<br>{colorbar} %{{z:.4f}}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title="layer", dtick=1, tickfont_size=9)
    fig.update_xaxes(title="head")
    fig.update_layout(title=title, height=max(360, 22 * L + 140),
                      margin=dict(l=40, r=20, t=60, b=40))
    return fig


def table_figure(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                 title: str = "", formats: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> go.Figure:
    """A plain table (list of dicts) as a plotly Table, so it survives HTML export.

    Args:
        rows: one dict per row.
        columns: keys to show, in order (default: the first row's).
        title: figure title.
        formats: format spec per column for floats (default ".4g").
        headers: display name per column (default: the key).
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    formats = dict(formats or {})
    headers = dict(headers or {})

    def cell(v, c):
        if v is None:
            return ""
        if isinstance(v, float):
            return format(v, formats.get(c, ".4g"))
        return str(v)

    fig = go.Figure(go.Table(
        header=dict(values=[headers.get(c, c) for c in columns], align="left",
                    fill_color="#e8e8e8"),
        cells=dict(values=[[cell(r.get(c), c) for r in rows] for c in columns], align="left")))
    fig.update_layout(title=title, height=min(900, (60 if title else 20) + 22 * (len(rows) + 2)),
                      margin=dict(l=10, r=10, t=50 if title else 10, b=10))
    return fig


def gate_files(gate: str | None, gate_dir: str) -> list:
    """Trained gate files for a notebook: `gate` first (when given and present), then every
    `*.safetensors` in `gate_dir` and its subfolders (`data/gates/gemma3-270m/`), files before
    subfolders, that is not a training checkpoint nor a decode gate (the prefill notebooks'
    gates only); paths relative to the repo. Which model a file serves is for `load_gates` to
    check."""
    files = [repo_path(gate)] if gate else []
    folder = repo_path(gate_dir)
    if folder.is_dir():
        found = sorted(folder.rglob("*.safetensors"),
                       key=lambda f: (len(f.relative_to(folder).parts), str(f)))
        files += sorted((f for f in found if ".ckpt" not in f.name
                        and read_metadata(f).get("phase", "prefill") == "prefill"),
                        key=found.index)
    return [f for f in dict.fromkeys(files) if f.exists() and ".ckpt" not in f.name]


def repo_path(relative: str):
    """A path inside the source tree (where pyproject.toml is), for notebook parameters."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists() and (p / "seerlib").is_dir():
            return p / relative
    return Path(__file__).resolve().parents[2] / relative  # seerlib/viz/common.py -> the repo
