"""Figures and interactive panels for the notebooks, one module per story.

Every `*_figure` builder returns a plain `plotly.graph_objects.Figure`: it renders in JupyterLab,
survives papermill and exports to offline HTML (`seerlib.report` writes plotly.js once, beside the
pages, and each page loads it by a relative path). A `*_panel` builder returns ipywidgets only when
`interactive=True`; otherwise it returns the plain figures of its default view, so the report path
never holds widget state.

Importing this package registers the plotly renderer "seerlib" and makes it the default
(`seerlib.viz.common`): each figure is emitted both as plotly JSON (JupyterLab's plotly renderer
draws it) and as an HTML div without plotly.js or MathJax (what nbconvert exports; the report's
pages load the shared plotly.js).

Panels redraw plain figures inside `ipywidgets.Output` areas, so no widget-backed figure (and no
`anywidget`) is needed.

Modules: `common` (renderer, `show`, `key_figures`, shared heatmaps, tables, paths), `maps`
(notebook 01, attention maps), `model_view` (01, every layer x head as thumbnails), `text` (01 and
02, your own text), `gate_truth` (02, gate vs ground truth), `training` (03, gate
training), `quality` (04, sparsity vs quality), `speed` (05, kernel speed), `decode` (06, decode
sparsity step by step, against the budget, and its speed), `long_context` (07, YaRN, sparsity
against length and the 32k GPU runs).
"""

from __future__ import annotations

# `viz.pio.renderers["seerlib"]` is the registered renderer, as when viz was one module
import plotly.io as pio  # noqa: F401

from seerlib.viz.common import (
    KEY_FIGURES_MIME,
    gate_files,
    key_figures,
    layer_head_heatmap,
    repo_path,
    show,
    table_figure,
)
from seerlib.viz.decode import (
    DecodeTrace,
    decode_generation_table,
    decode_layer_recall_figure,
    decode_panel,
    decode_passkey_figure,
    decode_quality_figure,
    decode_quality_results,
    decode_speed_figure,
    decode_speed_records,
    decode_speed_tables,
    decode_steps_figure,
    trace_generation,
)
from seerlib.viz.gate_truth import (
    ORACLE,
    GateComparison,
    gate_panel,
    gate_vs_truth_figure,
    query_row,
    query_row_figure,
    recall_gap_figure,
)
from seerlib.viz.long_context import (
    LongResults,
    backward_figure,
    backward_records,
    common_density,
    long_passkey_figure,
    long_results,
    mass_at_density,
    mass_by_length,
    mass_by_length_figure,
    mass_rows,
    mass_table,
    quality_by_length_figure,
    quality_views,
    show_views,
    speed_views,
    yarn_perplexity,
    yarn_ppl_figure,
    yarn_ppl_table,
    yarn_views,
)
from seerlib.viz.maps import (
    AttentionMaps,
    attention_grid_figure,
    attention_head_figure,
    attention_maps_panel,
    blocks_to_cover,
    coverage_density,
    display_tokens,
    gated_layers,
    sparsity_by_layer_figure,
    sparsity_heatmap_figure,
)
from seerlib.viz.model_view import model_view_figure, model_view_panel, thumbnail
from seerlib.viz.quality import (
    dense_failures,
    method_name,
    passkey_figure,
    quality_figure,
    quality_table,
    rank_caveat,
)
from seerlib.viz.speed import (
    PROVIDER_NAMES,
    bench_records,
    dense_throughput_figure,
    prefill_figure,
    prefill_records,
    speed_panel,
    speedup_figure,
    speedups,
)
from seerlib.viz.text import prompt_box, read_text, text_ids
from seerlib.viz.training import (
    LossCurve,
    build_caches,
    layer_loss_figure,
    log_ticks,
    loss_curve_figure,
    progress_text,
    tracked_densities,
)

__all__ = [
    "KEY_FIGURES_MIME",
    "ORACLE",
    "LongResults",
    "PROVIDER_NAMES",
    "AttentionMaps",
    "DecodeTrace",
    "GateComparison",
    "LossCurve",
    "attention_grid_figure",
    "attention_head_figure",
    "attention_maps_panel",
    "backward_figure",
    "backward_records",
    "build_caches",
    "bench_records",
    "blocks_to_cover",
    "common_density",
    "coverage_density",
    "decode_generation_table",
    "dense_failures",
    "decode_layer_recall_figure",
    "decode_panel",
    "decode_passkey_figure",
    "decode_quality_figure",
    "decode_quality_results",
    "decode_speed_figure",
    "decode_speed_records",
    "decode_speed_tables",
    "decode_steps_figure",
    "dense_throughput_figure",
    "display_tokens",
    "gated_layers",
    "gate_files",
    "gate_panel",
    "gate_vs_truth_figure",
    "key_figures",
    "layer_head_heatmap",
    "layer_loss_figure",
    "log_ticks",
    "long_passkey_figure",
    "long_results",
    "loss_curve_figure",
    "mass_at_density",
    "mass_by_length",
    "mass_by_length_figure",
    "mass_rows",
    "mass_table",
    "method_name",
    "passkey_figure",
    "progress_text",
    "quality_by_length_figure",
    "quality_figure",
    "quality_table",
    "rank_caveat",
    "quality_views",
    "repo_path",
    "show",
    "show_views",
    "sparsity_by_layer_figure",
    "sparsity_heatmap_figure",
    "prefill_figure",
    "prefill_records",
    "speed_panel",
    "speed_views",
    "speedup_figure",
    "speedups",
    "table_figure",
    "tracked_densities",
    "trace_generation",
    "yarn_perplexity",
    "yarn_ppl_figure",
    "yarn_ppl_table",
    "yarn_views",
    "model_view_figure",
    "prompt_box",
    "query_row",
    "query_row_figure",
    "read_text",
    "recall_gap_figure",
    "text_ids",
    "thumbnail",
    "model_view_panel",
]
