"""JupyterLab in a real browser: notebook 01's heatmaps draw and its sliders redraw them.

Starts JupyterLab on 127.0.0.1 with a temporary root holding a small copy of
`notebooks/01_attention_maps.ipynb` (INTERACTIVE on), opens it in headless Chromium (Debian's
`chromium`, driven by playwright through `executable_path`; no browser download), runs all cells,
checks that plotly heatmaps are drawn, moves the panel's layer slider with the keyboard and checks
that the panel's grid of heatmaps is redrawn for the new layer. Also: an exported report draws its
figures within 3 s with every network request refused, its code folded.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from seerlib import report

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "01_attention_maps"
PARAMETERS = {"SEQ_LEN": 160, "LAYER": 3, "BLOCK_SIZE": 32, "INTERACTIVE": True}

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_copy(dest: Path) -> Path:
    """The notebook with PARAMETERS set in its parameters cell and this interpreter's kernel."""
    nb = nbformat.read(str(report.NOTEBOOKS / f"{NOTEBOOK}.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for i, line in enumerate(lines):
        name = line.split("=")[0].strip()
        if name in PARAMETERS:
            lines[i] = f"{name} = {PARAMETERS[name]!r}"
    cell.source = "\n".join(lines)
    kernel = report._kernel_name()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    path = dest / f"{NOTEBOOK}.ipynb"
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a temporary root; yields its base URL and token."""
    root = tmp_path / "root"
    root.mkdir()
    _small_copy(root)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + (tmp_path / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield base, token, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# JavaScript: the titles of the plotly figures in widget outputs (the panel); all heatmaps.
PANEL_PLOTS = ", ".join(f".jp-OutputArea-output {w} .js-plotly-plot"
                        for w in (".widget-output", ".jupyter-widgets-output-area"))
PANEL_TITLES = f"""() => [...document.querySelectorAll('{PANEL_PLOTS}')]
    .map(gd => (gd.layout && gd.layout.title && gd.layout.title.text) || '')"""
ALL_HEATMAPS = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(gd => (gd.data || []).some(t => t.type === 'heatmap')).length"""


@pytest.mark.model
def test_lab_draws_heatmaps_and_slider_redraws(lab):
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    base, token, tmp_path = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}.ipynb?token={token}")
            page.wait_for_function("() => window.jupyterapp && document.querySelector("
                                   "'.jp-Notebook .jp-Cell')", timeout=120_000)
            # wait for the kernel, then run everything
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session &&"
                " w.sessionContext.session.kernel &&"
                " w.sessionContext.session.kernel.status === 'idle'; }", timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # static heatmaps (grid, one head, sparsity) and the panel's three
            page.wait_for_function(f"() => ({ALL_HEATMAPS})() >= 6", timeout=300_000)
            page.wait_for_function(f"() => ({PANEL_TITLES})().length >= 3", timeout=120_000)
            before = page.evaluate(PANEL_TITLES)
            layer = PARAMETERS["LAYER"]
            assert any(t.startswith(f"Layer {layer}:") for t in before), before
            heat_cells = page.evaluate(
                "() => document.querySelectorAll('.js-plotly-plot .hm, .js-plotly-plot image')"
                ".length")
            assert heat_cells > 0, "no heatmap image was drawn"

            slider = page.locator(".widget-slider", has=page.locator("label", has_text="layer"))
            handle = slider.locator(".noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
            page.wait_for_function(
                f"() => ({PANEL_TITLES})().some(t => t.startsWith('Layer {layer + 1}:'))",
                timeout=120_000)
            after = page.evaluate(PANEL_TITLES)
            assert after != before
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_report_html_draws_offline(tmp_path):
    """An exported report draws its plotly figures with every network request refused."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    cells = [nbformat.v4.new_markdown_cell("# offline"),
             nbformat.v4.new_code_cell("INTERACTIVE = True"),
             nbformat.v4.new_code_cell(
                 "import plotly.graph_objects as go\nfrom seerlib import viz\n"
                 "viz.show(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])))\n"
                 "go.Figure(go.Scatter(y=[1, 3, 2]))")]
    cells[1].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    src = tmp_path / "offline.ipynb"
    nbformat.write(nb, str(src))
    result = report.run_notebook(src, tmp_path / "out", {"INTERACTIVE": False})
    assert result.ok, result.error
    assert (result.html.parent / "plotly.min.js").exists(), "the shared plotly.js"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        errors, refused = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def only_files(route):
            if route.request.url.startswith("file:"):
                route.continue_()
            else:
                refused.append(route.request.url)
                route.abort()

        page.route("**/*", only_files)
        drawn = "() => document.querySelectorAll('.js-plotly-plot svg.main-svg').length >= 2"
        # The first visit compiles plotly.js's 4.8 MB (3-7 s cold on a busy 2-core box, about
        # 1 s warm); the time limit is for the page itself, so it is taken on a second visit.
        # A network wait would show either way: every request is refused at once, and counted.
        def seconds_to_draw(load):
            t0 = time.perf_counter()
            load()
            page.wait_for_function(drawn, timeout=30_000)
            return time.perf_counter() - t0

        first = seconds_to_draw(lambda: page.goto(result.html.as_uri()))
        second = seconds_to_draw(page.reload)
        kinds = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                              ".map(gd => gd.data[0].type)")
        hidden = page.locator("details.seer-code .jp-InputArea").first
        folded = not hidden.is_visible()
        page.click("#seer-toggle-code")
        unfolded = hidden.is_visible()
        page.screenshot(path=str(tmp_path / "offline.png"), full_page=True)
        browser.close()
    assert kinds == ["heatmap", "scatter"]
    assert not errors, errors
    assert not refused, f"the page asked the network for {refused}"
    assert second < 3, (f"the figures took {second:.1f} s to draw offline "
                        f"({first:.1f} s on the first visit)")
    assert folded and unfolded, "code cells are folded and 'Show code' opens them"
