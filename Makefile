# Quick start targets: each creates its own environment from requirements*.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-plus demo-convert demo-convert-ikd demo-convert-teacher demo-grow test lint

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

# A trained 12-head ViT -> importance-reordered HydraViT (hydravit.convert) -> 10 epochs of the sandwich of 4
# (configs/digits_convert.yaml, the comparison's convert_ft10). SOURCE: a trained 12-head digits ViT checkpoint
# (SOURCE_FLAGS: its loader flags); without it the source is trained first (configs/digits.yaml at k = 12 only).
# A narrower source: SOURCE_HEADS, its --model-kwargs in SOURCE_KWARGS and CONVERT_FLAGS='--grow-heads 12' (demo-grow).
CONVERT_OUT ?= output/demo_convert
CONVERT_CONFIG ?= configs/digits_convert.yaml
SOURCE ?=
SOURCE_FLAGS ?= --use-ema
SOURCE_HEADS ?= 12
SOURCE_KWARGS ?=
CONVERT_FLAGS ?=
FINETUNE_FLAGS ?=
demo-convert: $(VENV)/.installed
	@start=$$(date +%s); source="$(SOURCE)"; \
	$(PY) scripts/prepare_digits.py $(DEMO_DATA) && \
	if [ -z "$$source" ]; then \
		$(PY) -m hydravit.train $(DEMO_DATA) --config $(DEMO_CONFIG) --device cpu --heads $(SOURCE_HEADS) \
			--weights 1 $(SOURCE_KWARGS) --output $(CONVERT_OUT) --experiment source && \
		source=$(CONVERT_OUT)/source/model_best.pth.tar; \
	fi && \
	$(PY) -m hydravit.convert $(DEMO_DATA) --model hydravit_dyn_patch4_32 --checkpoint "$$source" $(SOURCE_FLAGS) \
		$(SOURCE_KWARGS) $(CONVERT_FLAGS) --num-classes 10 -o $(CONVERT_OUT)/converted.pth --report --heads 3 6 9 12 && \
	$(PY) -m hydravit.train $(DEMO_DATA) --config $(CONVERT_CONFIG) --device cpu \
		--initial-checkpoint $(CONVERT_OUT)/converted.pth --output $(CONVERT_OUT) --experiment finetune \
		$(FINETUNE_FLAGS) && \
	echo "demo-convert wall time: $$(( $$(date +%s) - start )) s"

# The same path with in-place distillation from the step's k = 12 (configs/digits_convert_ikd.yaml, the comparison's
# convert_ft10_ikd): within 0.5x of the source's training GMACs beyond it.
demo-convert-ikd:
	$(MAKE) demo-convert CONVERT_CONFIG=configs/digits_convert_ikd.yaml CONVERT_OUT=output/demo_convert_ikd

# The same path distilled from the frozen source (configs/digits_convert_teacher.yaml, the comparison's
# convert_ft8_teacher): 0.46x of the source's training GMACs beyond it. The teacher is the converted ViT at its 12
# heads, which is the source: hydravit.convert writes nothing unless both agree at full width within its tolerance.
TEACHER_OUT ?= output/demo_convert_teacher
demo-convert-teacher:
	$(MAKE) demo-convert CONVERT_CONFIG=configs/digits_convert_teacher.yaml CONVERT_OUT=$(TEACHER_OUT) \
		FINETUNE_FLAGS='--teacher-checkpoint $(TEACHER_OUT)/converted.pth'

# Progressive growing from scratch (configs/digits_grow.yaml, the comparison's grow6_ft14): a 6-head digits ViT
# (40 epochs), reordered and grown to 12 heads (hydravit.convert --grow-heads 12), then 14 epochs of the sandwich of 4;
# 0.95x the training GMACs of the 12-head ViT alone.
demo-grow:
	$(MAKE) demo-convert CONVERT_CONFIG=configs/digits_grow.yaml CONVERT_OUT=output/demo_grow SOURCE_HEADS=6 \
		SOURCE_KWARGS='--model-kwargs embed_dim=96 num_heads=6' CONVERT_FLAGS='--grow-heads 12'

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
