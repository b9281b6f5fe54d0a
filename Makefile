# `make test` and `make run` (re)create .venv from requirements.txt when it changed, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# A second environment pinned to the Kaggle image's stack (jax/keras/keras-hub/TensorFlow), for one smoke run.
IMAGE_VENV := .venv-kaggle-image
IMAGE_REQ := tests/kaggle-image-requirements.txt
# with our keras-hub and keras in a folder of their own, as a Gemma 4 kernel installs them over the image
IMAGE_STACK := $(IMAGE_VENV)/newer-stack
STACK_PINS := $(shell grep -E '^keras(-hub)?==' requirements.txt)
IMAGE_STAMP := $(IMAGE_VENV)/.installed-$(shell (cat $(IMAGE_REQ) requirements-kaggle.txt; echo $(STACK_PINS)) | sha1sum | cut -c1-12)
# TensorFlow 2.20 wheels exist for Python 3.9-3.12 (Kaggle's image runs 3.12): the first of these that runs one.
SUPPORTED := 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))'
IMAGE_PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do $$p -c $(SUPPORTED) >/dev/null 2>&1 && echo $$p && break; done)
# The Kaggle CLI (its dependencies clash with keras-hub's), for the tests that drive it offline.
CLI_VENV := .venv-kaggle-cli
CLI_REQ := tests/kaggle-cli-requirements.txt
CLI_STAMP := $(CLI_VENV)/.installed-$(shell sha1sum $(CLI_REQ) | cut -c1-12)
PROFILE ?= cpu
# keras-hub 0.32 needs Python 3.11+; point make at another interpreter with PYTHON=python3.12.
PYTHON ?= python3
PYTHON_OK := 'import sys; sys.exit(sys.version_info < (3, 11))'

.PHONY: venv image-venv cli-venv lint test test-all run sync docs lab clean

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -c $(PYTHON_OK) 2>/dev/null || \
	  { echo "This project needs Python 3.11 or newer (keras-hub 0.32); '$(PYTHON)' is $$($(PYTHON) -V 2>/dev/null || echo missing). Run e.g.: make $(MAKECMDGOALS) PYTHON=python3.12"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

$(IMAGE_STAMP): $(IMAGE_REQ) requirements-kaggle.txt
	@test -n "$(IMAGE_PYTHON)" || \
	  { echo "The Kaggle-image check needs Python 3.9-3.12 (TensorFlow 2.20); set IMAGE_PYTHON=python3.12."; exit 1; }
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(IMAGE_REQ)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -rf $(IMAGE_STACK)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --target $(IMAGE_STACK) $(STACK_PINS)
	rm -f $(IMAGE_VENV)/.installed-*
	touch $(IMAGE_STAMP)

image-venv: $(IMAGE_STAMP)

$(CLI_STAMP): $(CLI_REQ)
	test -x $(CLI_VENV)/bin/python || $(PYTHON) -m venv $(CLI_VENV)
	$(CLI_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(CLI_REQ)
	rm -f $(CLI_VENV)/.installed-*
	touch $(CLI_STAMP)

cli-venv: $(CLI_STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint  ## the fast tier: unit tests and one run of the whole series on the tiny model
	$(PY) -m pytest tests -m "not slow"

test-all: lint image-venv cli-venv  ## everything: other stacks, kill/resume, meshes, real 270M, nbval, docs drift (CI)
	$(PY) -m pytest tests

run: venv
	$(PY) -m nbutils.pipeline --profile $(PROFILE)

sync: venv  ## write the parameters cells from nbutils/config.py, then the .ipynb files from the .py sources
	$(PY) -m nbutils.config --write-cells
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

docs: venv  ## render a run's executed notebooks into docs/ (RUN=<run_id>; default: the latest finished cpu run)
	$(PY) -m nbutils.docs $(RUN)
	$(PY) -m nbutils.config --markdown > docs/parameters.md

lab: venv  ## JupyterLab on the project's environment, notebooks folder open (installed into .venv on first use)
	$(PY) -c 'import jupyterlab, ipywidgets' 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check jupyterlab==4.6.6 ipywidgets==8.1.9
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) $(IMAGE_VENV) $(CLI_VENV) .pytest_cache build
