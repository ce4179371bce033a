"""Execute the notebooks with papermill and publish them as HTML pages that read offline.

    python -m seerlib.report [--notebooks 01_attention_maps ...] [--small] [-p KEY VALUE ...]
                             [--out reports] [--timeout SECONDS]

For each notebook in `notebooks/` (all by default; pass stems or paths to pick some) this writes
`<out>/<name>.ipynb` (the executed copy) and `<out>/<name>.html`, then `<out>/index.html`: a table
linking every report with its run time, parameters (declared defaults and what was set) and key
figures (what the notebook passed to `seerlib.viz.key_figures`). The index also links an offline
export of each committed GPU run in `reports/gpu/` (`<out>/<name>.gpu.html`).

The pages read offline: nothing comes from a CDN (no require.js, MathJax, mermaid or widget
loader), and every page loads the one `<out>/plotly.min.js` beside it by a relative <script src>.
Code cells are folded into <details> ("Show code" at the top opens them all).

Parameters: `INTERACTIVE` is always False here (plain figures only: widget state does not survive
HTML export). `--small` applies each notebook's entry of `SMALL_PARAMETERS` (what CI and the tests
run); `-p KEY VALUE` (repeatable, VALUE read as a Python literal, else a string) overrides a
parameter in every selected notebook that declares it.

A cell that raises fails the command (exit status 1) after every selected notebook has run; the
message names the notebook, the cell (its number in the committed notebook, its execution count and
first line) and the error. The failed notebook's executed copy and HTML are still written.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import html
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from seerlib.io import atomic_write_text

__all__ = [
    "SMALL_PARAMETERS",
    "NotebookResult",
    "ReportError",
    "committed_runs",
    "export_html",
    "find_notebooks",
    "main",
    "run_notebook",
    "run_report",
    "write_index",
    "write_plotly_js",
]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
REPORTS = ROOT / "reports"
# Executed copies committed from GPU runs (`bench/README.md`): the index links an offline export.
COMMITTED = REPORTS / "gpu"

# Each notebook's parameters for CI and the tests (`--small`): a few seconds to a minute each on a
# 2-core CPU, same code paths as the defaults.
SMALL_PARAMETERS: dict[str, dict] = {
    "01_attention_maps": {"SEQ_LEN": 192, "LAYER": 10, "BLOCK_SIZE": 32},
    "02_gate_vs_truth": {"SEQ_LEN": 256, "LAYER": 10},
    "03_train_gate": {"STEPS": 4, "SEQ_LEN": 256, "BLOCK_SIZE": 32, "TRAIN_WINDOWS": 2,
                      "EVAL_WINDOWS": 1, "EVAL_EVERY": 2, "WARMUP": 1,
                      "OUT": "reports/gates/nb03_small.safetensors"},
    "04_sparsity_vs_quality": {"SEQ_LEN": 256, "N_WINDOWS": 1, "DENSITIES": [0.3],
                               "METHODS": ["gate", "recommended",
                                           "oracle-max"],
                               "PASSKEY_LEN": 256,
                               "PASSKEY_DEPTHS": [0.5]},
    "05_kernel_speed": {"CHECK_SEQ_LEN": 97},
    "06_decode_sparsity": {"FALLBACK_STEPS": 4, "FALLBACK_SEQ_LEN": 512, "FALLBACK_WINDOWS": 2,
                           "FALLBACK_ROWS": 128, "SEQ_LEN": 512, "GEN_TOKENS": 16,
                           "BUDGET": 128, "BUDGETS": [128, 256]},
    "07_long_context": {"PPL_LENGTHS": [256, 512], "SPARSITY_LENGTHS": [512, 1024]},
}


class ReportError(RuntimeError):
    """One or more notebooks failed; the message names each notebook, cell and error."""


@dataclass
class NotebookResult:
    """What running one notebook produced."""

    name: str
    ok: bool
    seconds: float
    ipynb: Path
    html: Path | None
    parameters: dict
    error: str | None = None
    key_figures: dict = field(default_factory=dict)
    declared: dict = field(default_factory=dict)  # {name: default source text}
    note: str = ""  # where the run comes from, when not from this command (a committed GPU run)


# ---------------------------------------------------------------- finding and parameters


def find_notebooks(names: Sequence[str] | None = None, root: Path = NOTEBOOKS) -> list[Path]:
    """The notebooks to run: every `root/*.ipynb` in order, or the given stems, unique stem
    prefixes ("04") or paths."""
    if not names:
        found = sorted(p for p in root.glob("*.ipynb") if not p.name.startswith("."))
        if not found:
            raise ReportError(f"no notebooks in {root}")
        return found
    paths = []
    for n in names:
        p = Path(n)
        cands = [p, root / p, root / f"{n}.ipynb", ROOT / p]
        hit = next((c for c in cands if c.suffix == ".ipynb" and c.is_file()), None)
        prefixed = sorted(root.glob(f"{n}*.ipynb")) if "/" not in n else []
        if hit is None and len(prefixed) == 1:  # a unique prefix such as "04"
            hit = prefixed[0]
        if hit is None:
            known = ", ".join(q.stem for q in sorted(root.glob("*.ipynb")))
            raise ReportError(f"notebook {n!r} not found; expected one of: {known}")
        paths.append(hit.resolve())
    return paths


def declared_parameters(path: Path) -> dict:
    """{name: default source text} of the notebook's `parameters` cell."""
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import papermill

    return {k: v.get("default") for k, v in papermill.inspect_notebook(str(path)).items()}


def parse_value(text: str):
    """A -p value: a Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parameters_for(path: Path, small: bool, overrides: Mapping[str, object]) -> dict:
    """The parameters to inject: small set, overrides, INTERACTIVE=False; only declared names."""
    declared = declared_parameters(path)
    params: dict = {}
    if small:
        params.update(SMALL_PARAMETERS.get(path.stem, {}))
    params.update(overrides)
    params["INTERACTIVE"] = False
    return {k: v for k, v in params.items() if k in declared}


# ---------------------------------------------------------------- execution


def _kernel_name() -> str:
    """The `seerlib` kernel when it runs this very interpreter (the .venv one), else `python3`
    (ipykernel's native spec, which also runs this interpreter)."""
    try:
        # Lazy: part of the notebook stack (see declared_parameters)
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec("seerlib")
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return "seerlib"
    except Exception:  # noqa: BLE001 - no such kernel: fall back
        pass
    return "python3"


def _describe_failure(src: Path, exc) -> str:
    """'notebooks/x.ipynb, cell 5 (In [4]: `first line`): ValueError: message'."""
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import nbformat

    source = (exc.source or "").strip()
    number = "?"
    try:
        cells = nbformat.read(str(src), as_version=4).cells
        number = next(str(i + 1) for i, c in enumerate(cells) if c.source.strip() == source)
    except (StopIteration, OSError, ValueError):
        pass
    first = next((ln for ln in source.splitlines() if ln.strip()), "")
    try:
        shown = src.relative_to(ROOT)
    except ValueError:
        shown = src
    return (f"{shown}, cell {number} (In [{exc.exec_count}]: `{first[:80]}`): "
            f"{exc.ename}: {exc.evalue}")


def run_notebook(path: Path, out_dir: Path = REPORTS, parameters: Mapping | None = None,
                 timeout: float | None = None, log_output: bool = False,
                 html_export: bool = True) -> NotebookResult:
    """Execute one notebook with papermill into out_dir (and export its HTML).

    Args:
        path: the notebook.
        out_dir: where the executed `.ipynb` and the `.html` go.
        parameters: injected after the `parameters` cell (see `parameters_for`).
        timeout: seconds per cell (None: no limit).
        log_output: stream the notebook's output to this process's stderr.
        html_export: also write the HTML.
    Returns:
        NotebookResult; `ok` False and `error` set when a cell raised.
    """
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    params = dict(parameters or {})
    error = None
    t0 = time.time()
    try:
        papermill.execute_notebook(
            str(path), str(out), parameters=params, kernel_name=_kernel_name(),
            progress_bar=False, log_output=log_output, cwd=str(path.parent),
            execution_timeout=timeout,
        )
    except PapermillExecutionError as exc:
        error = _describe_failure(path, exc)
    except Exception as exc:  # noqa: BLE001 - a kernel death or timeout fails this notebook only
        error = f"{path.name}: {type(exc).__name__}: {exc}"
    seconds = time.time() - t0
    result = NotebookResult(name=path.stem, ok=error is None, seconds=seconds, ipynb=out,
                            html=None, parameters=params, error=error,
                            declared=declared_parameters(path))
    if out.exists():
        result.key_figures = collect_key_figures(out)
        if html_export:
            result.html = export_html(out, out.with_suffix(".html"))
    return result


def committed_runs(out_dir: Path = REPORTS, folder: Path = COMMITTED) -> list[NotebookResult]:
    """The executed notebooks committed in `folder` (GPU runs), each exported to an offline page
    `out_dir/<name>.gpu.html` (the committed page loads require.js and MathJax from a CDN)."""
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import nbformat

    results = []
    for ipynb in sorted(Path(folder).glob("*.ipynb")):
        meta = nbformat.read(str(ipynb), as_version=4).metadata.get("papermill", {})
        device = folder / "device.txt"
        lines = device.read_text().splitlines() if device.exists() else []
        gpu = lines[1].split(",")[0].strip() if len(lines) > 1 else "a GPU"
        when = (meta.get("end_time") or "")[:10]
        page = export_html(ipynb, Path(out_dir) / f"{ipynb.stem}.gpu.html")
        results.append(NotebookResult(
            name=ipynb.stem, ok=meta.get("exception") is None,
            seconds=float(meta.get("duration") or 0.0), ipynb=ipynb, html=page,
            parameters=dict(meta.get("parameters") or {}), declared=declared_parameters(ipynb),
            key_figures=collect_key_figures(ipynb),
            note=f"committed run on {gpu}{', ' + when if when else ''}"))
    return results


def collect_key_figures(ipynb: Path) -> dict:
    """The key figures a notebook displayed with `seerlib.viz.key_figures` (merged, in order)."""
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import nbformat

    from seerlib.viz import KEY_FIGURES_MIME  # plotly too

    figures: dict = {}
    for cell in nbformat.read(str(ipynb), as_version=4).cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if KEY_FIGURES_MIME in data:
                figures.update((k, v) for k, v in data[KEY_FIGURES_MIME].get("figures", []))
    return figures


# ---------------------------------------------------------------- HTML

PLOTLY_JS = "plotly.min.js"  # written once per output folder; every page points at it

# nbconvert's "lab" page without anything fetched from a CDN: require.js and MathJax go (no
# notebook uses LaTeX, and plotly.js runs as a plain script), as do mermaid (unused) and the
# ipywidgets embed loader (reports draw plain figures only). plotly.js comes from the file beside
# the page, before the figures' inline scripts call `Plotly.newPlot`. Code cells are folded into
# <details>; the button at the top opens or closes them all.
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}
{%- if resources.plotly_js_src %}
<script src="{{ resources.plotly_js_src }}"></script>
{%- endif -%}
{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block extra_css -%}
<style type="text/css">
details.seer-code > summary { cursor: pointer; color: var(--jp-content-font-color2, #666);
  font: 12px var(--jp-code-font-family, monospace); padding: 2px 0 2px 8px; }
details.seer-code > summary::marker { color: #999; }
.seer-toolbar { position: sticky; top: 0; z-index: 10; text-align: right; padding: 4px 8px; }
.seer-toolbar button { font-size: 12px; }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<div class="seer-toolbar"><button type="button" id="seer-toggle-code"
  onclick="var o = this.textContent.startsWith('Show');
  document.querySelectorAll('details.seer-code').forEach(function (d) { d.open = o; });
  this.textContent = o ? 'Hide code' : 'Show code';">Show code</button></div>
{%- endblock body_header -%}
{%- block input_group -%}
<details class="seer-code"><summary>code
{%- set first = cell.source.strip().splitlines() | first | default('') %}
{%- if first %}: <code>{{ first | truncate(90) | escape }}</code>{% endif %}</summary>
{{ super() }}
</details>
{%- endblock input_group -%}
"""


def write_plotly_js(out_dir: Path) -> Path:
    """`out_dir/plotly.min.js`: the installed plotly's plotly.js (rewritten when it differs)."""
    from plotly.offline import get_plotlyjs  # lazy: plotly takes a second to import

    path = Path(out_dir) / PLOTLY_JS
    source = get_plotlyjs()
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        atomic_write_text(path, source)
    return path


def _draws_plotly(nb) -> bool:
    """Whether any output of the notebook calls plotly.js (the seerlib renderer's HTML divs)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            html_text = output.get("data", {}).get("text/html", "")
            if "Plotly.newPlot" in "".join(html_text):
                return True
    return False


def export_html(ipynb: Path, html_path: Path, plotly_js: Path | None = None) -> Path:
    """Export an executed notebook to an HTML page that needs no network.

    Args:
        ipynb: the executed notebook.
        html_path: the page to write.
        plotly_js: the shared plotly.js the page loads by a relative `<script src>` (default:
            `plotly.min.js` beside the page, written when missing); loaded only when a figure
            needs it.
    Returns:
        html_path.
    """
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    html_path = Path(html_path)
    nb = nbformat.read(str(ipynb), as_version=4)
    resources: dict = {"metadata": {"name": Path(ipynb).stem}}
    if _draws_plotly(nb):
        plotly_js = Path(plotly_js) if plotly_js else write_plotly_js(html_path.parent)
        if not plotly_js.exists():
            raise ReportError(f"{plotly_js} does not exist; the page {html_path.name} loads it")
        src = os.path.relpath(plotly_js.resolve(), html_path.parent.resolve())
        resources["plotly_js_src"] = Path(src).as_posix()
    exporter = HTMLExporter(template_name="lab", template_file="seerlib.html.j2",
                            extra_loaders=[DictLoader({"seerlib.html.j2": _TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    atomic_write_text(html_path, body)
    return html_path


def _device() -> str:
    try:
        import torch  # lazy and optional: the index says 'cpu' without it

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except Exception:  # noqa: BLE001
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _git_commit() -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _parameter_lines(r: NotebookResult) -> list[str]:
    """'NAME = value' for each parameter the notebook ran with: every declared one (its default,
    or the injected value, marked) and any injected one it does not declare."""
    esc = html.escape
    lines = []
    for name, default in r.declared.items():
        if name in r.parameters:
            lines.append(f'<span class="set" title="set for this run (default {esc(default)})">'
                         f"{esc(name)} = {esc(repr(r.parameters[name]))}</span>")
        else:
            lines.append(f"{esc(name)} = {esc(default)}")
    lines += [f'<span class="set">{esc(k)} = {esc(repr(v))}</span>'
              for k, v in r.parameters.items() if k not in r.declared]
    return lines


def write_index(results: Sequence[NotebookResult], out_dir: Path = REPORTS,
                title: str = "seerlib reports") -> Path:
    """`out_dir/index.html`: one row per notebook (link, status, time, parameters, key figures)."""

    try:
        __version__ = version("seerlib")
    except PackageNotFoundError:
        __version__ = "unknown"
    esc = html.escape
    out_dir = Path(out_dir)
    rows = []
    for r in results:
        link = (f'<a href="{esc(_relative(r.html, out_dir))}">{esc(r.name)}</a>' if r.html
                else esc(r.name))
        if r.note:
            link += f"<br><small>{esc(r.note)}"
            committed = r.ipynb.with_suffix(".html")
            if committed.exists() and committed != r.html:
                link += (f' (<a href="{esc(_relative(committed, out_dir))}">committed page</a>,'
                         " needs a network)")
            link += "</small>"
        status = ("ok" if r.ok
                  else f'<span class="fail">failed</span><br><code>{esc(r.error or "")}</code>')
        params = "<br>".join(_parameter_lines(r))
        figs = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>"
                       for k, v in r.key_figures.items())
        rows.append(f"<tr><td>{link}</td><td>{status}</td><td>{r.seconds:.0f} s</td>"
                    f"<td class='p'>{params}</td><td><table class='k'>{figs}</table></td></tr>")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px;
vertical-align: top; text-align: left; }} table.k td {{ border: none; padding: 1px 6px; }}
td.p {{ font-family: monospace; font-size: 85%; }} td.p .set {{ font-weight: bold; }}
.fail {{ color: #b00; font-weight: bold; }}
table.i {{ width: 100%; table-layout: fixed; }} table.i > tbody > tr > td {{
overflow-wrap: break-word; }} table.k {{ width: 100%; }} table.k td + td {{
overflow-wrap: anywhere; min-width: 8ch; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Generated {now} on {esc(_device())}; seerlib {esc(__version__)}, commit {esc(_git_commit())}.
Every page reads offline: nothing is fetched from the network, and the pages share one
plotly.js ({PLOTLY_JS}) beside them. Code cells are folded; "Show code" opens them.
Parameters in bold were set for the run; the others are the notebook's defaults.</p>
<table class="i"><col style="width: 17%"><col style="width: 7%"><col style="width: 6%">
<col style="width: 36%"><col style="width: 34%">
<tr><th>notebook</th><th>status</th><th>time</th><th>parameters</th><th>key figures</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    return path


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the command


def run_report(names: Sequence[str] | None = None, small: bool = False,
               overrides: Mapping[str, object] | None = None, out_dir: Path = REPORTS,
               timeout: float | None = None, log_output: bool = False,
               committed: Path | None = COMMITTED) -> list[NotebookResult]:
    """Run the selected notebooks into out_dir, write the index (with the committed GPU runs in
    `committed`, exported offline; None: none), and raise `ReportError` naming every failed
    notebook, cell and error (after all have run)."""
    paths = find_notebooks(names)
    overrides = dict(overrides or {})
    if overrides:
        declared = set().union(*(declared_parameters(p) for p in paths))
        unknown = sorted(set(overrides) - declared)
        if unknown:
            raise ReportError(f"parameters {unknown} are declared by none of "
                              f"{[p.stem for p in paths]}; declared: {sorted(declared)}")
    results = []
    for path in paths:
        params = parameters_for(path, small, overrides)
        print(f"seerlib.report: running {path.stem} {json.dumps(params, default=str)}",
              file=sys.stderr, flush=True)
        r = run_notebook(path, out_dir, params, timeout=timeout, log_output=log_output)
        state = "ok" if r.ok else f"FAILED: {r.error}"
        print(f"seerlib.report: {path.stem}: {state} ({r.seconds:.0f} s)", file=sys.stderr,
              flush=True)
        results.append(r)
    if committed is not None:
        results += committed_runs(out_dir, committed)
    index = write_index(results, out_dir)
    print(f"seerlib.report: wrote {index}", file=sys.stderr)
    failed = [r for r in results if not r.ok]
    if failed:
        raise ReportError("notebook(s) failed:\n" + "\n".join(f"  {r.error}" for r in failed))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seerlib.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", nargs="+", metavar="NAME",
                        help="notebook stems or paths (default: every notebook in notebooks/)")
    parser.add_argument("--small", action="store_true",
                        help="small parameters (CI and tests): SMALL_PARAMETERS per notebook")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("KEY", "VALUE"), help="override a parameter (repeatable)")
    parser.add_argument("--out", type=Path, default=REPORTS, help="output folder (reports/)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    parser.add_argument("--log", action="store_true", help="stream the notebooks' output")
    args = parser.parse_args(argv)
    overrides = {k: parse_value(v) for k, v in args.parameter}
    try:
        run_report(args.notebooks, args.small, overrides, args.out, args.timeout, args.log)
    except ReportError as exc:
        print(f"seerlib.report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
