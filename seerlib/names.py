"""What tables and figures call a method, and the colour it is drawn in: one table.

Rows of a sweep (one method and selection rule at several densities) share a *series*: the
config's label without its budget, plus the budget rule in words, e.g. "gate+sink+floor0.25
relative" for "gate+sink+floor0.25@r=0.2", "oracle-max" for "oracle-max@0.1". `series`
gives it, `display_name` a reader's name for it, `color` its colour (unknown series get none,
and plotly picks one).
"""

from __future__ import annotations

from dataclasses import replace

from seerlib.methods import METHODS, PRESETS, SparseConfig, parse_config, split_method
from seerlib.select import series_selection

__all__ = ["METHOD_STYLE", "color", "display_name", "series", "sweep"]

# method -> (display name, colour)
METHOD_STYLE = {
    "dense": ("dense", "black"),
    "gate": ("gate (learned)", "#d62728"),
    "oracle-max": ("oracle (max-pooled)", "#2ca02c"),
    "oracle-sum": ("oracle (attention mass)", "#98df8a"),
    "sink_window": ("sink + window", "#1f77b4"),
    "vertical_slash": ("vertical-slash", "#9467bd"),
}
# series other than a method's own plain one that have a colour of their own
SERIES_COLORS = {
    "gate+sink": "#e7ba52", "gate adaptive": "#e377c2", "gate+sink adaptive": "#8c564b",
    "gate+sink+local adaptive": "#bcbd22", "gate+sink+local+last adaptive": "#7f7f7f",
    "gate+sink+local relative": "#393b79", "oracle-max adaptive": "#17becf",
    "oracle-max relative": "#9edae5",
}
PRESET_COLORS = {"recommended": "#ff7f0e"}  # tab10 orange: apart from the gate's red


def series(x) -> str:
    """The series of a config, a label or a result row (a dict with "label")."""
    cfg = x if isinstance(x, SparseConfig) else parse_config(x["label"] if isinstance(x, dict)
                                                             else x)
    return cfg.method + cfg.selection.series()


def sweep(key: str, densities, **config) -> list[SparseConfig]:
    """The configs of a series at each density (a CLI's `--methods` entry): `key` is a series
    ("gate+sink+floor0.25 relative", "oracle-max", "dense"), a preset name, or a label whose
    budget's number is replaced ("gate+sink@a=0.3"). `config`: SparseConfig's other fields
    (block_size=, attention=). "dense" gives one config."""
    if key in PRESETS:
        return [replace(PRESETS[key].at(density=d), **config) for d in densities]
    method, tail = split_method(key)
    if not METHODS[method].sparse:
        return [SparseConfig(method, **config)]
    return [SparseConfig(method, series_selection(tail, d), **config) for d in densities]


def _preset_of(key: str) -> str | None:
    return next((name for name, cfg in PRESETS.items() if series(cfg) == key), None)


def display_name(key: str) -> str:
    """A reader's name for a series: "gate (learned) + sink block, relative adaptive budget";
    a preset's series by the preset's name ("gate, recommended")."""
    name = _preset_of(key)
    if name is not None:
        return f"{PRESETS[name].method}, {name}"
    method, tail = split_method(key)
    return METHOD_STYLE.get(method, (method,))[0] + series_selection(tail, 1.0).describe()


def color(key: str) -> str | None:
    """The series' colour, or None (plotly's next)."""
    name = _preset_of(key)
    if name is not None:
        return PRESET_COLORS.get(name)
    if key in SERIES_COLORS:
        return SERIES_COLORS[key]
    return METHOD_STYLE.get(key, (None, None))[1]
