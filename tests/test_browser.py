"""JupyterLab in a real browser: notebooks 01-04 run, fit a 1000 px window, and every control
redraws its figure; a saved notebook reopens without a widget error; a report draws offline.

Starts JupyterLab on 127.0.0.1 with a temporary root holding small copies of the notebooks
(`NOTEBOOKS`: their parameters cells set to a few hundred tokens, INTERACTIVE on) and the venv's
settings (`lab/overrides.json`, which `make venv` installs: widget state saved with the notebook).
Each notebook is opened in headless Chromium (Debian's `chromium`, driven by playwright through
`executable_path`; no browser download) at 1000 x 900 px with JupyterLab's default layout, all its
cells are run, and the test checks:
- no cell raised and no output reads "Error displaying widget";
- no figure or widget ends past the right edge of its cell's output area (nothing is clipped);
- each control (dropdowns, sliders, toggle buttons, the text box's button, a legend entry) is moved
  in turn, and a figure of its cell changes within the time limit.
With `SEERLIB_SCREENSHOTS=folder`, every cell with outputs is saved there as a PNG per notebook.
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
VIEWPORT = {"width": 1000, "height": 900}
REPO = Path(__file__).resolve().parents[1]
# small parameters per notebook: enough tokens for a few blocks, a few steps, one window
NOTEBOOKS = {
    "01_attention_maps": {"SEQ_LEN": 160, "LAYER": 3, "BLOCK_SIZE": 32, "INTERACTIVE": True},
    "02_gate_vs_truth": {"SEQ_LEN": 256, "LAYER": 3, "INTERACTIVE": True},
    "03_train_gate": {"STEPS": 4, "WARMUP": 1, "SEQ_LEN": 128, "BLOCK_SIZE": 32,
                      "TRAIN_WINDOWS": 2, "EVAL_WINDOWS": 1, "EVAL_EVERY": 2,
                      "INTERACTIVE": True},
    "04_sparsity_vs_quality": {"SEQ_LEN": 256, "DENSITIES": [0.5],
                               "METHODS": ["gate", "sink_window"], "PASSKEY_LEN": 256,
                               "PASSKEY_DEPTHS": [0.5], "INTERACTIVE": True},
}

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_copy(name: str, dest: Path, parameters: dict) -> Path:
    """The notebook with `parameters` set in its parameters cell and this interpreter's kernel."""
    nb = nbformat.read(str(report.NOTEBOOKS / f"{name}.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for i, line in enumerate(lines):
        key = line.split("=")[0].strip()
        if key in parameters:
            lines[i] = f"{key} = {parameters[key]!r}"
    missing = set(parameters) - {line.split("=")[0].strip() for line in lines}
    assert not missing, f"{name} has no parameter {missing}"
    cell.source = "\n".join(lines)
    kernel = report._kernel_name()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    path = dest / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving a temporary root; yields (base URL, token,
    root)."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    for name, params in NOTEBOOKS.items():
        if name.startswith("03"):  # its gates go to the temporary root, not the repo
            params = dict(params, OUT=str(root / "nb03_gates.safetensors"))
        _small_copy(name, root, params)
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # every cell laid out, so that the width checks see cells outside the window too
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    log = open(tmp / "lab.log", "w")
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
                                       + (tmp / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield base, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


# ---------------------------------------------------------------- JavaScript probes

NOTEBOOK_JSON = "() => window.jupyterapp.shell.currentWidget.content.model.toJSON()"
KERNEL_IDLE = """() => { const w = window.jupyterapp.shell.currentWidget;
    return !!(w && w.sessionContext && w.sessionContext.session &&
              w.sessionContext.session.kernel &&
              w.sessionContext.session.kernel.status === 'idle'); }"""
# per cell (by index in the notebook): a signature of its plotly figures (titles, trace types,
# visibility and data sizes and ends), so that any redraw of different data changes it
SIGNATURES = """() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(cell =>
    [...cell.querySelectorAll('.js-plotly-plot')].map(gd => JSON.stringify([
        ((gd.layout || {}).title || {}).text || '',
        (gd.data || []).map(t => [t.type, t.visible, t.name || '',
            t.z ? [t.z.length, String(t.z[t.z.length - 1]).slice(0, 120)] : null,
            t.y ? String(t.y).slice(0, 120) : null])])).join('|'))"""
# figures and widgets that end past their output area's right edge (clipped: the area hides it)
OVERFLOW = """() => { const bad = [];
    document.querySelectorAll('.jp-Notebook .jp-Cell').forEach((cell, i) => {
        const area = cell.querySelector('.jp-OutputArea');
        if (!area) return;
        const right = area.getBoundingClientRect().right;
        area.querySelectorAll('.js-plotly-plot, svg.main-svg, .jupyter-widgets, .widget-box, img, '
            + 'table')
            .forEach(el => { const r = el.getBoundingClientRect();
                if (r.width > 0 && r.right > right + 1)
                    bad.push(`cell ${i}: ${el.tagName.toLowerCase()}.${
                        String(el.className).split(' ')[0]} is ${Math.round(r.width)} px wide `
                        + `and ends ${Math.round(r.right - right)} px past the output area`); });
    });
    return bad; }"""
WIDGET_ERRORS = """() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]
    .map(o => o.innerText).filter(t => t.includes('Error displaying widget'))"""


def _end_sessions(base: str, token: str) -> None:
    """Shut down every kernel session of the server (REST API)."""
    def call(path, method="GET"):
        req = urllib.request.Request(f"{base}{path}?token={token}", method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    for session in call("/api/sessions"):
        call(f"/api/sessions/{session['id']}", "DELETE")


def _cell_errors(nb: dict) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb["cells"])
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _run_all(page, timeout: float = 900) -> None:
    """Run every cell; return when each code cell has run and the kernel is idle, or raise
    with the first error."""
    page.wait_for_function(KERNEL_IDLE, timeout=180_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.time() + timeout
    while True:
        time.sleep(1.0)
        nb = page.evaluate(NOTEBOOK_JSON)
        errors = _cell_errors(nb)
        assert not errors, errors
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        if all(c.get("execution_count") for c in code) and page.evaluate(KERNEL_IDLE):
            return
        assert time.time() < deadline, "the notebook did not finish running"


def _open(page, base: str, token: str, name: str) -> None:
    """Open one notebook, alone: `reset` drops the workspace's earlier tabs (an earlier test's
    notebook would otherwise come back, and might be the current widget)."""
    page.goto(f"{base}/lab/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector("
                           "'.jp-Notebook .jp-Cell')", timeout=180_000)


def _wait_changed(page, cell: int, before: str, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while page.evaluate(SIGNATURES)[cell] == before:
        assert time.time() < deadline, f"{what} (cell {cell}) changed no figure of its cell"
        time.sleep(0.5)
    page.wait_for_function(KERNEL_IDLE, timeout=180_000)


def _cell_of(locator) -> int:
    return locator.evaluate("el => [...document.querySelectorAll('.jp-Notebook .jp-Cell')]"
                            ".indexOf(el.closest('.jp-Cell'))")


def _move_controls(page) -> list[str]:
    """Move each control once; assert a figure of its cell changed. Returns what was moved."""
    moved = []
    nb = page.locator(".jp-Notebook")

    def check(locator, what, act):
        locator.scroll_into_view_if_needed()
        cell = _cell_of(locator)
        before = page.evaluate(SIGNATURES)[cell]
        act()
        _wait_changed(page, cell, before, what)
        moved.append(what)

    for i in range(nb.locator(".widget-dropdown select").count()):
        sel = nb.locator(".widget-dropdown select").nth(i)
        options = sel.locator("option")
        current = sel.input_value()
        other = next((options.nth(j).get_attribute("value") for j in range(options.count())
                      if options.nth(j).get_attribute("value") != current), None)
        if other is None:  # one choice only (e.g. one gate's block size): nothing to move
            continue
        label = sel.evaluate("el => el.closest('.widget-dropdown').innerText.trim()")
        check(sel, f"dropdown {label!r}", lambda s=sel, o=other: s.select_option(o))
    def move_sliders(indices):
        """Move the enabled sliders among `indices`; return the disabled ones."""
        disabled = []
        for i in indices:
            slider = nb.locator(".widget-slider").nth(i)
            if slider.locator(".noUi-target[disabled]").count():
                disabled.append(i)
                continue
            handle = slider.locator(".noUi-handle").first
            at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
            label = slider.locator("label").first.inner_text().strip()
            check(handle, f"slider {label!r}", lambda h=handle, k="ArrowLeft" if at_max
                  else "ArrowRight": (h.focus(), h.press(k)))
        return disabled

    waiting = move_sliders(range(nb.locator(".widget-slider").count()))
    for i in range(nb.locator(".widget-toggle-buttons").count()):
        group = nb.locator(".widget-toggle-buttons").nth(i)
        button = group.locator("button:not(.mod-active)").first
        check(button, f"toggle {button.inner_text().strip()!r}", button.click)
    # a slider disabled until its toggle is chosen (02's threshold) moves now
    assert not move_sliders(waiting), "a slider stayed disabled after every toggle was moved"
    for i in range(nb.locator(".widget-textarea").count()):
        box = nb.locator(".widget-textarea").nth(i)
        button = box.locator("xpath=../..").locator(".widget-button").first
        text = "In the beginning God created the heaven and the earth. " * 12
        check(button, "text box and its button",
              lambda b=box, btn=button, t=text: (b.locator("textarea").fill(t), btn.click()))
    legends = nb.locator(".js-plotly-plot .legend .traces")
    if legends.count():
        entry = legends.first
        check(entry, "a legend entry", entry.click)
    return moved


# the page position of thumbnail `i` (trace i, axes i + 1) of the model view (the figure with
# the most heatmaps), inside its lower triangle where the map has values
THUMB_AT = """(i) => { const gd = [...document.querySelectorAll('.js-plotly-plot')]
        .sort((a, b) => (b.data || []).length - (a.data || []).length)[0];
    const fl = gd._fullLayout, xa = fl['xaxis' + (i + 1)], ya = fl['yaxis' + (i + 1)];
    const r = gd.getBoundingClientRect();
    return [r.left + xa._offset + 0.25 * xa._length, r.top + ya._offset + 0.75 * ya._length]; }"""
BIG_MAP = """() => { const gd = [...document.querySelectorAll('.js-plotly-plot')]
        .sort((a, b) => (b.data || []).length - (a.data || []).length)[0];
    const t = gd.data[gd.data.length - 1];
    return JSON.stringify([t.hovertemplate, t.customdata]).slice(0, 4000); }"""


def _click_thumbnail(page, index: int) -> None:
    """Hover, then click, thumbnail `index` of the model view; assert the enlarged map changed
    each time."""
    before = page.evaluate(BIG_MAP)
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    x, y = page.evaluate(THUMB_AT, index)
    if y > page.viewport_size["height"]:  # scroll the notebook so the thumbnail is on screen
        page.mouse.wheel(0, y - page.viewport_size["height"] / 2)
        time.sleep(0.5)
        x, y = page.evaluate(THUMB_AT, index)
    page.mouse.move(x, y)
    page.mouse.move(x + 1, y + 1)
    page.wait_for_function(f"() => ({BIG_MAP})() !== {json.dumps(before)}", timeout=60_000)
    page.mouse.click(x + 1, y + 1)


def _screenshots(page, name: str) -> None:
    folder = os.environ.get("SEERLIB_SCREENSHOTS")
    if not folder:
        return
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{name}-window.png"))
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 4000})  # whole tall cells
    cells = page.locator(".jp-Notebook .jp-Cell")
    for i in range(cells.count()):
        cell = cells.nth(i)
        if cell.locator(".jp-OutputArea-output").count():
            cell.scroll_into_view_if_needed()
            cell.screenshot(path=str(out / f"{name}-cell{i:02d}.png"))
    page.set_viewport_size(VIEWPORT)


@pytest.mark.model
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_fits_and_every_control_redraws(lab, browser, name):
    base, token, root = lab
    page = browser.new_page(viewport=VIEWPORT)
    try:
        _open(page, base, token, name)
        _run_all(page)
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length > 0",
                               timeout=60_000)
        assert not page.evaluate(WIDGET_ERRORS)
        bad = page.evaluate(OVERFLOW)
        assert not bad, "\n".join(bad)
        moved = _move_controls(page)
        assert moved, "no control was found to move"
        if name.startswith("01"):  # the model view: hover previews a head, a click pins it
            heads = page.evaluate("() => Math.max(...[...document.querySelectorAll("
                                  "'.js-plotly-plot')].map(g => (g.data || []).length)) ")
            layer_menu = page.locator(".widget-dropdown", has=page.locator(
                "label", has_text="layer")).first.locator("select")
            h = 9  # SmolLM2's query heads; thumbnail of layer 2, head 3
            assert heads == 30 * h + 1, heads
            _click_thumbnail(page, 2 * h + 3)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-dropdown select')]"
                ".some(s => s.value !== '' && s.selectedOptions[0].text === '2')",
                timeout=60_000)
            assert layer_menu.evaluate("s => s.selectedOptions[0].text") == "2"
        bad = page.evaluate(OVERFLOW)
        assert not bad, "after moving the controls:\n" + "\n".join(bad)
        assert not page.evaluate(WIDGET_ERRORS)
        assert not _cell_errors(page.evaluate(NOTEBOOK_JSON))
        _screenshots(page, name)
        if name.startswith("01"):  # saved with its widget state, it reopens without an error
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context"
                                   ".model.dirty", timeout=60_000)
            saved = json.loads((root / f"{name}.ipynb").read_text())
            assert saved["metadata"].get("widgets"), "the widget state was not saved"
            page.close()
            _end_sessions(base, token)  # as after a restart: a fresh kernel knows no widget
            page = browser.new_page(viewport=VIEWPORT)
            _open(page, base, token, name)
            page.wait_for_function("() => document.querySelectorAll("
                                   "'.jp-Notebook .jp-OutputArea-output').length > 3",
                                   timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=180_000)
            time.sleep(3)
            assert not page.evaluate(WIDGET_ERRORS)
            assert page.locator(".jp-Notebook .widget-dropdown select").count(), \
                "the saved widgets were not drawn"
    except Exception:
        folder = Path(os.environ.get("SEERLIB_SCREENSHOTS") or root)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}-failure.png"))
        raise
    finally:
        page.close()
        _end_sessions(base, token)  # the next notebook starts with the CPU and memory free


def test_report_html_draws_offline(tmp_path, browser):
    """An exported report draws its plotly figures with every network request refused."""
    cells = [nbformat.v4.new_markdown_cell("# offline"),
             nbformat.v4.new_code_cell("INTERACTIVE = True"),
             nbformat.v4.new_code_cell(
                 "import plotly.graph_objects as go\nfrom seerlib import viz\n"
                 "viz.show(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])))\n"
                 "go.Figure(go.Scatter(y=[1, 3, 2]))"),
             nbformat.v4.new_code_cell(  # a model view of 2 layers x 2 heads
                 "import numpy as np\n"
                 "m = np.random.default_rng(0).random((2, 4, 4)).astype('float32')\n"
                 "m[:, ~np.tri(4, dtype=bool)] = np.nan\n"
                 "viz.model_view_figure([m, m[::-1] / 2], [0, 1], 16)")]
    cells[1].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    src = tmp_path / "offline.ipynb"
    nbformat.write(nb, str(src))
    result = report.run_notebook(src, tmp_path / "out", {"INTERACTIVE": False})
    assert result.ok, result.error
    assert (result.html.parent / "plotly.min.js").exists(), "the shared plotly.js"
    page = browser.new_page(viewport=VIEWPORT)
    errors, refused = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    drawn = "() => document.querySelectorAll('.js-plotly-plot').length >= 3 && [...document" \
        ".querySelectorAll('.js-plotly-plot')].every(gd => gd.querySelector('svg.main-svg'))"

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
    _click_thumbnail(page, 3)  # in the page, no kernel: hover previews layer 1 head 1
    clicked = page.evaluate(BIG_MAP)
    page.mouse.move(2, 2)  # leaving the thumbnail keeps the clicked head (pinned)
    time.sleep(1)
    pinned = page.evaluate(BIG_MAP)
    hidden = page.locator("details.seer-code .jp-InputArea").first
    folded = not hidden.is_visible()
    page.click("#seer-toggle-code")
    unfolded = hidden.is_visible()
    page.screenshot(path=str(tmp_path / "offline.png"), full_page=True)
    page.close()
    assert kinds == ["heatmap", "scatter", "heatmap"]
    assert pinned == clicked and "layer 1, head 1" in clicked
    assert not errors, errors
    assert not refused, f"the page asked the network for {refused}"
    assert second < 3, (f"the figures took {second:.1f} s to draw offline "
                        f"({first:.1f} s on the first visit)")
    assert folded and unfolded, "code cells are folded and 'Show code' opens them"
