# `make test` and `make run` (re)create .venv from requirements.txt when it changed, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
PROFILE ?= cpu

.PHONY: venv test run sync clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest tests

run: venv
	$(PY) -m nbutils.pipeline --profile $(PROFILE)

sync: venv  ## regenerate the .ipynb files from the reviewed .py sources
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

clean:
	rm -rf $(VENV) .pytest_cache
