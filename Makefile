# make test : create .venv (unless a virtualenv is active), install ldm with test extras, run the CPU test suite
# make demo : install, build the emoji dataset, train the small default models, sample a grid
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.ldm-installed
TORCH := torch==2.14.1 torchvision==0.29.1
JOBS ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install test test-slow demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: never let a dependency pull a different build
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

clean:
	rm -rf runs/demo .pytest_cache
