# The two commands of the quick start: `make run` and `make test`.
# Each bootstraps .venv by itself when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hydra-trio up --submit examples/graph.toml

lint: $(STAMP)
	$(BIN)/ruff check hydra_trio tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict hydra_trio

system-deps:
	@scripts/system-deps.sh

unit: $(STAMP) system-deps
	$(BIN)/pytest -q

test: lint typecheck unit

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
