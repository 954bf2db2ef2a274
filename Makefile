# Two entry points (see README): `make repro` runs the pipeline, `make test` runs the suite.
# Both build .venv from nothing on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test venv

venv: $(STAMP)

# torch goes first, pinned (constraints.txt), so pip takes the local CPU wheel instead of a CUDA
# build. The editable install uses setuptools' default mode: 'compat' is deprecated, to be removed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# pytest exits 5 when it collects no test: CI (.ci/run) fails then, as on any failure.
# One file per worker at a time (module fixtures are built once), files with more tests first.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests
