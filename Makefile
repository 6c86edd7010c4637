# Quick start targets: each creates its own environment from requirements*.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-plus test lint

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

DEMO_DATA ?= data/digits
DEMO_OUT ?= output/demo
DEMO_CONFIG ?= configs/digits.yaml

# Bundled digits -> train hydravit_dyn_patch4_32 on CPU -> per-k validation (k = 3..12) -> per-k table.
demo: $(VENV)/.installed
	@start=$$(date +%s); \
	$(PY) scripts/prepare_digits.py $(DEMO_DATA) && \
	$(PY) -m hydravit.train $(DEMO_DATA) --config $(DEMO_CONFIG) --device cpu \
		--output $(DEMO_OUT) --experiment digits && \
	echo "demo wall time (data + training + validation): $$(( $$(date +%s) - start )) s"

# The best recipe of the digits comparison (sandwich of 4, 40 epochs): 4x the demo's compute.
demo-plus:
	$(MAKE) demo DEMO_CONFIG=configs/digits_plus.yaml DEMO_OUT=output/demo_plus

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
