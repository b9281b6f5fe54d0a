# `make test` and `make run` (re)create .venv from requirements.txt when it changed, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# A second environment pinned to the Kaggle image's stack (jax/keras/keras-hub/TensorFlow), for one smoke run.
IMAGE_VENV := .venv-kaggle-image
IMAGE_REQ := tests/kaggle-image-requirements.txt
IMAGE_STAMP := $(IMAGE_VENV)/.installed-$(shell cat $(IMAGE_REQ) requirements-kaggle.txt | sha1sum | cut -c1-12)
# TensorFlow 2.19 wheels exist for Python 3.9-3.12 (Kaggle's image runs 3.12): the first of these that runs one.
SUPPORTED := 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))'
IMAGE_PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do $$p -c $(SUPPORTED) >/dev/null 2>&1 && echo $$p && break; done)
PROFILE ?= cpu

.PHONY: venv image-venv test run sync clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

$(IMAGE_STAMP): $(IMAGE_REQ) requirements-kaggle.txt
	@test -n "$(IMAGE_PYTHON)" || \
	  { echo "The Kaggle-image check needs Python 3.9-3.12 (TensorFlow 2.19); set IMAGE_PYTHON=python3.12."; exit 1; }
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(IMAGE_REQ)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(IMAGE_VENV)/.installed-*
	touch $(IMAGE_STAMP)

image-venv: $(IMAGE_STAMP)

test: venv image-venv
	$(PY) -m pytest tests

run: venv
	$(PY) -m nbutils.pipeline --profile $(PROFILE)

sync: venv  ## regenerate the .ipynb files from the reviewed .py sources
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

clean:
	rm -rf $(VENV) $(IMAGE_VENV) .pytest_cache build
