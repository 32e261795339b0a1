# Two commands on a fresh machine (Python 3.11+ and make):
#   make demo   install into .venv, then run the main job on the shipped example
#   make test   install into .venv, then lint and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/guideflow run examples/manifest.csv --preprocessor canny --output out/demo/guides --ledger out/demo/ledger

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/engine.py
