# Fresh clone: `make train` trains the debug model, `make test` runs every test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NGPU ?= 1

.PHONY: train test test-fast lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The ft extra (torchft) too, so the fault-tolerance tests run; torch stays pinned.
	$(BIN)/python -m pip install -q torch==2.13.0 -e ".[dev,ft]"
	# OLMo's own MemMapDataset, read by the tests as an independent reader of our token files. --no-deps: it
	# declares numpy<2, which its data code does not need, and would downgrade numpy for everything else.
	$(BIN)/python -m pip install -q --no-deps ai2-olmo==0.6.0 ai2-olmo-core==0.1.0 omegaconf
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	NGPU=$(NGPU) ./run_train.sh

lint: $(STAMP)
	$(BIN)/ruff check torchtitan scripts tests

test: lint
	$(BIN)/python -m pytest -q -ra --durations=30

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs .pytest_cache
