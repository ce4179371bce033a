"""The report pages (`seerlib.report`): offline, one shared plotly.js, code folded, and an index
that links the committed GPU run and lists every notebook's parameters.

The pages here are exported from notebooks built in-process with the "seerlib" renderer's outputs
(no kernel), so these tests take seconds; `test_notebooks.py` exports the real notebooks and
`test_browser.py` draws a page in Chromium with the network cut off.
"""

import os
import re
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import plotly.io as pio
import pytest

import seerlib.viz  # noqa: F401 - registers the "seerlib" plotly renderer
from seerlib import report

# a <script src> or <link href> that leaves the machine; a CDN anywhere in the page
REMOTE_SOURCE = re.compile(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", re.I)
CDN = re.compile(r"cdnjs|unpkg\.com|jsdelivr|cdn\.plot\.ly|mathjax|require(\.min)?\.js", re.I)
PLOTLY_SRC = re.compile(r'<script src="([^"]*plotly\.min\.js)"></script>')


def executed_notebook(path: Path, figures: int = 2) -> Path:
    """An "executed" notebook: a markdown cell, a parameters cell and `figures` plotly figures as
    the seerlib renderer emits them (what papermill records), plus a plain-text output."""
    cells = [nbformat.v4.new_markdown_cell("# A report\nWhat the figures show."),
             nbformat.v4.new_code_cell("INTERACTIVE = True")]
    cells[1].metadata["tags"] = ["parameters"]
    for i in range(figures):
        fig = go.Figure(go.Scatter(y=[1, 3, 2 + i]))
        bundle = pio.renderers["seerlib"].to_mimebundle(fig.to_dict())
        cell = nbformat.v4.new_code_cell(f"fig_{i} = draw({i})\nfig_{i}", execution_count=i + 1)
        cell.outputs = [nbformat.v4.new_output("execute_result", data=bundle,
                                               execution_count=i + 1)]
        cells.append(cell)
    text = nbformat.v4.new_code_cell("print('done')")
    text.outputs = [nbformat.v4.new_output("stream", name="stdout", text="done\n")]
    cells.append(text)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(page path, page text) of a two-figure notebook exported into a fresh folder."""
    out = tmp_path_factory.mktemp("report")
    page = report.export_html(executed_notebook(out / "figs.ipynb"), out / "figs.html")
    return page, page.read_text()


def test_page_fetches_nothing_from_the_network(exported):
    _, text = exported
    assert not REMOTE_SOURCE.search(text), REMOTE_SOURCE.search(text).group(0)
    assert not CDN.search(text), text[CDN.search(text).start() - 80:][:200]
    assert "<script type=\"module\">" not in text, "nbconvert's mermaid loader imports a CDN"


def test_page_loads_the_one_shared_plotly_js(exported):
    page, text = exported
    assert "plotly.js v" not in text, "plotly.js is inlined"
    assert len(text) < 600_000, f"page is {len(text)} bytes"
    srcs = PLOTLY_SRC.findall(text)
    assert srcs == ["plotly.min.js"], srcs
    shared = page.parent / srcs[0]
    assert shared.stat().st_size > 1_000_000 and "plotly.js v" in shared.read_text()[:500]
    # the figures' inline scripts call Plotly after it is loaded
    assert text.index(srcs[0]) < text.index("Plotly.newPlot") < text.index("</body>")
    assert text.count("Plotly.newPlot") == 2


def test_code_cells_are_folded(exported):
    _, text = exported
    folded = re.findall(r"<details class=\"seer-code\"( open)?>\s*<summary>(.*?)</summary>",
                        text, re.S)
    assert len(folded) == 4 and not any(o for o, _ in folded)  # every code cell, all closed
    assert "INTERACTIVE = True" in folded[0][1], "the summary shows the cell's first line"
    assert 'id="seer-toggle-code"' in text
    # outputs stay outside the fold
    assert text.index("</details>") < text.index("Plotly.newPlot")


def test_pages_in_a_subfolder_share_the_parent_plotly_js(tmp_path):
    shared = report.write_plotly_js(tmp_path)
    (tmp_path / "gpu").mkdir()
    nb = executed_notebook(tmp_path / "gpu" / "a.ipynb", figures=1)
    text = report.export_html(nb, tmp_path / "gpu" / "a.html", plotly_js=shared).read_text()
    assert PLOTLY_SRC.findall(text) == ["../plotly.min.js"]
    assert not (tmp_path / "gpu" / "plotly.min.js").exists()


def test_page_without_figures_loads_no_plotly(tmp_path):
    text = report.export_html(executed_notebook(tmp_path / "n.ipynb", figures=0),
                              tmp_path / "n.html").read_text()
    assert not PLOTLY_SRC.findall(text) and not (tmp_path / "plotly.min.js").exists()


def test_index_links_the_gpu_report_and_lists_parameters(tmp_path):
    ran = report.NotebookResult(
        name="01_attention_maps", ok=True, seconds=12.0, ipynb=tmp_path / "01.ipynb",
        html=tmp_path / "01_attention_maps.html", parameters={"SEQ_LEN": 192, "INTERACTIVE": False},
        declared={"SEQ_LEN": "1024", "LAYER": "10", "INTERACTIVE": "True"},
        key_figures={"recall": 0.9})
    committed = report.committed_runs(tmp_path)
    assert [r.name for r in committed] == ["05_kernel_speed"]
    gpu = committed[0]
    assert gpu.html == tmp_path / "05_kernel_speed.gpu.html" and gpu.html.exists()
    assert "H100" in gpu.note and gpu.key_figures and "CHECK_SEQ_LEN" in gpu.declared
    gpu_page = gpu.html.read_text()
    assert not REMOTE_SOURCE.search(gpu_page) and not CDN.search(gpu_page)
    assert PLOTLY_SRC.findall(gpu_page) == ["plotly.min.js"]

    index = report.write_index([ran, *committed], tmp_path).read_text()
    assert '<a href="05_kernel_speed.gpu.html">05_kernel_speed</a>' in index
    committed_page = Path(os.path.relpath(report.COMMITTED / "05_kernel_speed.html",
                                          tmp_path)).as_posix()
    assert f'href="{committed_page}"' in index
    # declared defaults as written, set values bold; every declared name of both notebooks
    assert "LAYER = 10" in index and ">SEQ_LEN = 192</span>" in index
    assert ">INTERACTIVE = False</span>" in index and "CHECK_SEQ_LEN = 200" in index
    assert 'LIVE_SEQ_LENS = [8192, 32768]' in index
    assert "<td>recall</td><td>0.9</td>" in index
    assert not REMOTE_SOURCE.search(index)

