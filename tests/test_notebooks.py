"""The notebooks: committed clean, and executed end to end with small parameters through the same
code as `make report` (`seerlib.report`)."""

import ast

import nbformat
import pytest
from test_report import CDN, REMOTE_SOURCE

from seerlib import report

NOTEBOOKS = ["01_attention_maps", "02_gate_vs_truth", "03_train_gate",
             "04_sparsity_vs_quality", "05_kernel_speed", "06_decode_sparsity",
             "07_long_context"]
NEEDS_MODEL = {"01_attention_maps", "02_gate_vs_truth", "03_train_gate",
               "04_sparsity_vs_quality", "06_decode_sparsity", "07_long_context"}


def path_of(name):
    return report.NOTEBOOKS / f"{name}.ipynb"


def present(names):
    return [n for n in names if path_of(n).exists()]


def params(name):
    marks = [pytest.mark.model] if name in NEEDS_MODEL else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", present(NOTEBOOKS))
def test_committed_clean_with_plain_parameters(name):
    nb = nbformat.read(str(path_of(name)), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nb.cells[0].cell_type == "markdown", "the first cell says what the notebook answers"
    for c in code:
        assert not c.outputs and c.execution_count is None, f"{name}: outputs are committed"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be `parameters`"
    names = set()
    for stmt in ast.parse(first.source).body:
        assert isinstance(stmt, ast.Assign), f"{name}: parameters cell holds assignments only"
        ast.literal_eval(stmt.value)  # plain values, nothing derived
        names |= {t.id for t in stmt.targets}
    assert "INTERACTIVE" in names
    assert set(report.SMALL_PARAMETERS.get(name, {})) <= names, "small parameters must exist"
    for c in code[1:]:
        assert len(c.source.splitlines()) <= 40, f"{name}: a long cell belongs in seerlib/"


@pytest.mark.slow
@pytest.mark.parametrize("name", [params(n) for n in present(NOTEBOOKS)])
def test_notebook_runs_small(name, tmp_path):
    path = path_of(name)
    # files a notebook writes (03's gates) go to tmp_path, not the source tree
    params = report.parameters_for(path, True, {"OUT": str(tmp_path / "gates.safetensors")})
    result = report.run_notebook(path, tmp_path, params)
    assert result.ok, result.error
    page = result.html.read_text()
    assert "Plotly.newPlot" in page or "INTERACTIVE" in page
    # offline, plotly.js shared beside the page, code folded (see test_report.py)
    assert not REMOTE_SOURCE.search(page) and not CDN.search(page)
    # plotly.js alone is 4.8 MB (and "plotly.js v" would show it); 01's small run carries about
    # 8.4 MB of its own token-level maps (each map twice since 52a10ba's hover of p: the log
    # colour and the probability), the model view's 270 thumbnails and enlarged heads; the
    # others far less (01's full report page, block-pooled, is 2.7 MB)
    limit = 10_000_000 if name.startswith("01") else 4_000_000
    assert "plotly.js v" not in page and len(page) < limit, f"{len(page)} bytes: plotly.js inlined?"
    if "Plotly.newPlot" in page:
        assert page.index('<script src="plotly.min.js">') < page.index("</head>")
        assert (tmp_path / "plotly.min.js").exists()
    assert '<details class="seer-code">' in page
    assert result.key_figures, "the notebook reports key figures for the index"
    executed = nbformat.read(str(result.ipynb), as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def write_notebook(path, *sources):
    cells = [nbformat.v4.new_markdown_cell("# a failing notebook")]
    p = nbformat.v4.new_code_cell(sources[0])
    p.metadata["tags"] = ["parameters"]
    cells += [p] + [nbformat.v4.new_code_cell(s) for s in sources[1:]]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_failing_cell_fails_the_report_naming_notebook_cell_and_error(tmp_path, monkeypatch):
    src = tmp_path / "nb"
    src.mkdir()
    write_notebook(src / "bad.ipynb", "X = 1\nINTERACTIVE = True", "y = X + 1",
                   "raise ValueError(f'X was {X}; expected 2')")
    write_notebook(src / "good.ipynb", "INTERACTIVE = True",
                   "from seerlib import viz\nviz.key_figures({'answer': 42})")
    monkeypatch.setattr(report, "NOTEBOOKS", src)
    out = tmp_path / "out"
    with pytest.raises(report.ReportError) as err:
        report.run_report([str(src / "bad.ipynb"), str(src / "good.ipynb")], overrides={"X": 3},
                          out_dir=out)
    msg = str(err.value)
    assert "bad.ipynb" in msg and "cell 4" in msg and "raise ValueError" in msg
    assert "ValueError: X was 3; expected 2" in msg and "good.ipynb" not in msg
    index = (out / "index.html").read_text()
    assert "failed" in index and "answer" in index and "42" in index
    assert ">X = 3</span>" in index, "the value the run was given, marked as set"
    assert 'href="05_kernel_speed.gpu.html"' in index, "the committed GPU run is linked"
    assert (out / "bad.html").exists() and (out / "good.html").exists()
    assert report.main(["--notebooks", str(src / "bad.ipynb"), "--out", str(out)]) == 1


def test_unknown_parameter_and_notebook_are_refused():
    with pytest.raises(report.ReportError, match="declared by none"):
        report.run_report(["01_attention_maps"], overrides={"NO_SUCH_PARAMETER": 1})
    with pytest.raises(report.ReportError, match="not found"):
        report.find_notebooks(["99_nothing"])
    assert report.find_notebooks(["04"]) == [path_of("04_sparsity_vs_quality")]
    assert report.parse_value("[1, 2]") == [1, 2] and report.parse_value("abc") == "abc"


def test_report_parameters_force_static_figures():
    p = report.parameters_for(path_of("01_attention_maps"), True, {"LAYER": 3})
    assert p["INTERACTIVE"] is False and p["LAYER"] == 3
    assert p["SEQ_LEN"] == report.SMALL_PARAMETERS["01_attention_maps"]["SEQ_LEN"]



def test_every_notebook_is_written():
    missing = [n for n in NOTEBOOKS if not path_of(n).exists()]
    assert not missing, f"notebooks not written yet: {missing}"
    assert [p.stem for p in report.find_notebooks()] == NOTEBOOKS


def test_key_figures_keep_their_order(tmp_path):
    from seerlib.viz import KEY_FIGURES_MIME

    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output(
        "display_data", data={KEY_FIGURES_MIME: {"figures": [["zeta", 1], ["alpha", 2.5]]},
                              "text/plain": "zeta: 1\nalpha: 2.5"})]
    path = tmp_path / "k.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))
    assert list(report.collect_key_figures(path).items()) == [("zeta", 1), ("alpha", 2.5)]
