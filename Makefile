# Everyday commands. `make demo` and `make test` each set up their own virtual environment first.
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(VENV)/bin

# `make demo COINYEAR_DATA_SOURCE=/path/archive.tar.gz` (or a mirror's URL): where the reference photos come from
ifdef COINYEAR_DATA_SOURCE
export COINYEAR_DATA_SOURCE
endif

.PHONY: setup setup-train data demo train-best lint test test-fast serve ui bench docs notebook clean

# pip's own output goes to $(VENV)/setup.log (shown only when the set-up fails): the demo prints its own steps.
# One pip call, torch and torchvision named and pinned (pip takes them from this machine's disk, no CUDA
# download). --no-compile: pip would byte-compile every module of every package (torch's thousands included);
# Python compiles what is imported, once, on first use. From a cold disk that set-up took 63-67 s against 100-125 s
# (benchmarks/README.md, Time).
# $(call install,EXTRA): the virtual environment with coinyear[EXTRA] installed (editable).
define install
	@echo "set-up: virtual environment $(VENV), coinyear[$(1)] from PyPI (a few minutes the first time; log: $(VENV)/setup.log)"
	@$(PYTHON) -m venv $(VENV)
	@{ $(BIN)/pip install -q --upgrade pip \
	  && $(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1 -e '.[$(1)]'; } > $(VENV)/setup.log 2>&1 \
	  || { tail -n 40 $(VENV)/setup.log >&2; echo "set-up failed: the whole log is $(VENV)/setup.log" >&2; \
	       if grep -q "No space left on device" $(VENV)/setup.log; then $(no_space); fi; exit 1; }
endef

# What a full disk looks like to the user: the set-up needs about 10 GB at its peak (torch and its CUDA libraries,
# about 7.5 GB unpacked in the virtual environment, and pip's downloads of up to 2.4 GB in its temporary folder:
# measured in benchmarks/README.md, Time), and says where the space ran out.
define no_space
echo "set-up failed: the disk is full; it needs about 10 GB free at its peak (7.5 GB stay in $(VENV)). Free now:" >&2; df -h $(VENV) $${TMPDIR:-/tmp} >&2
endef

# Everything: the network, the gateway, the UI, Spark and the tools of the tests and the lint. It holds [train].
$(BIN)/.installed: pyproject.toml
	$(call install,dev)
	@touch $@ $(BIN)/.installed-train

# What `coinyear demo` needs and no more: the core and [train] (no Spark, UI, browser or lint tools: a cold set-up
# of about 2.1 instead of 2.8 minutes, benchmarks/README.md; most of either is torch and its CUDA libraries).
# tests/code/test_extras.py runs a small demo with every module the other extras bring made unimportable.
$(BIN)/.installed-train: pyproject.toml
	$(call install,train)
	@touch $@

setup: $(BIN)/.installed
setup-train: $(BIN)/.installed-train

## The reference data: ../shared/data/ocre (or COINYEAR_DATA_DIR) checked in place, else fetched once into
## COINYEAR_HOME/data/ocre from the pinned upstream archive (or COINYEAR_DATA_SOURCE: a mirror, a .tar.gz).
data: setup-train
	$(BIN)/coinyear data fetch

## The main job on the embedded defaults (`coinyear demo`): the reference data (fetched if no copy exists; set
## COINYEAR_DATA_SOURCE to a mirror or a local archive), training, registration, promotion to production, then the
## registered model scored from the photos on the test coin types; it ends with the time of each step (set-up
## included) and the model's figures.
demo:
	@started=$$(date +%s); $(MAKE) -s --no-print-directory setup-train \
	  && $(BIN)/coinyear demo --setup-seconds $$(( $$(date +%s) - started ))

## The longer recipe (benchmarks/README.md): the demo's recipe for 12 epochs, grouped 5-fold CV+ calibration, then
## one model refit on every non-test coin, registered and given the alias staging. 12 epochs so that it fits 2 hours
## on 2 CPU cores (measured in benchmarks/README.md); on a GPU, `make train-best EPOCHS=16` (the H100 CV recipe).
## 32 coins a step, the fused portrait head and the ruler blend fitted on the five folds' coins: the recipe that was
## measured for it (the demo's 4 coins a step trains up to 18% slower on a 2-core Xeon; neither that nor the obverse
## portrait head is measured here).
EPOCHS ?= 12
BATCH ?= 32
PORTRAIT_INPUT ?= fused
train-best: setup-train
	$(BIN)/coinyear train --epochs $(EPOCHS) --folds 5 --batch-size $(BATCH) --portrait-input $(PORTRAIT_INPUT) \
	  --ruler-blend fit --promote staging

## Static checks (CI runs them before the tests): ruff and mypy with the settings in pyproject.toml.
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

## Every test CI runs.
test: setup data
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser"

serve: setup
	$(BIN)/coinyear serve

ui: setup
	$(BIN)/coinyear ui

## Regenerate docs/architecture.png, docs/imports.dot + .png (the import layers, read from the code; needs Graphviz `dot`) and the API tables in docs/api_schema.md.
docs: setup
	$(BIN)/python docs/build_docs.py

## Re-run the pipeline notebook with the full settings and keep its outputs (tens of minutes on 2 cores).
notebook: setup
	$(BIN)/python notebooks/build_notebook.py --execute

clean:
	rm -rf .coinyear .pytest_cache
