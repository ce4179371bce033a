"""Execute the notebooks with papermill and publish them as self-contained HTML.

    python -m seerlib.report [--notebooks 01_attention_maps ...] [--small] [-p KEY VALUE ...]
                             [--out reports] [--timeout SECONDS]

For each notebook in `notebooks/` (all by default; pass stems or paths to pick some) this writes
`<out>/<name>.ipynb` (the executed copy) and `<out>/<name>.html` (plotly.js embedded once in the
page, readable offline), then `<out>/index.html`: a table linking every report with its run time,
parameters and key figures (what the notebook passed to `seerlib.viz.key_figures`).

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
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "SMALL_PARAMETERS",
    "NotebookResult",
    "ReportError",
    "export_html",
    "find_notebooks",
    "main",
    "run_notebook",
    "run_report",
    "write_index",
]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
REPORTS = ROOT / "reports"

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
                            html=None, parameters=params, error=error)
    if out.exists():
        result.key_figures = collect_key_figures(out)
        if html_export:
            result.html = export_html(out, out.with_suffix(".html"))
    return result


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


def _plotly_script() -> str:
    from plotly.offline import get_plotlyjs  # lazy: plotly takes a second to import

    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def export_html(ipynb: Path, html_path: Path) -> Path:
    """Export an executed notebook to HTML with plotly.js embedded at the top of <head>.

    plotly.js goes before anything else, so that it defines `window.Plotly` before nbconvert's
    require.js can claim it as an AMD module; the figures' scripts then draw offline.
    """
    # Lazy: the notebook stack (papermill, nbformat, nbconvert) takes seconds to import.
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb), as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(
        nb, resources={"metadata": {"name": ipynb.stem}})
    match = re.search(r"<head[^>]*>", body)
    if match is None:
        raise ReportError(f"nbconvert's HTML for {ipynb.name} has no <head> to embed plotly.js in")
    body = body[: match.end()] + "\n" + _plotly_script() + body[match.end():]
    html_path.write_text(body, encoding="utf-8")
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


def write_index(results: Sequence[NotebookResult], out_dir: Path = REPORTS,
                title: str = "seerlib reports") -> Path:
    """`out_dir/index.html`: one row per notebook (link, status, time, parameters, key figures)."""

    try:
        __version__ = version("seerlib")
    except PackageNotFoundError:
        __version__ = "unknown"
    esc = html.escape
    rows = []
    for r in results:
        link = (f'<a href="{esc(r.html.name)}">{esc(r.name)}</a>' if r.html else esc(r.name))
        status = ("ok" if r.ok
                  else f'<span class="fail">failed</span><br><code>{esc(r.error or "")}</code>')
        params = "<br>".join(f"{esc(k)} = {esc(repr(v))}" for k, v in r.parameters.items())
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
td.p {{ font-family: monospace; font-size: 85%; }} .fail {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Generated {now} on {esc(_device())}; seerlib {esc(__version__)}, commit {esc(_git_commit())}.
Each report is a self-contained HTML page (plotly.js embedded; no network needed).</p>
<table><tr><th>notebook</th><th>status</th><th>time</th><th>parameters</th>
<th>key figures</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path = Path(out_dir) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the command


def run_report(names: Sequence[str] | None = None, small: bool = False,
               overrides: Mapping[str, object] | None = None, out_dir: Path = REPORTS,
               timeout: float | None = None, log_output: bool = False) -> list[NotebookResult]:
    """Run the selected notebooks into out_dir, write the index, and raise `ReportError` naming
    every failed notebook, cell and error (after all have run)."""
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
