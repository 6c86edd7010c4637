# Quick start targets: each creates its own environment from requirements*.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: demo test lint

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/smoke.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
