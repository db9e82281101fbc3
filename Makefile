# nodepatch: every target sets itself up on a fresh clone (a local .venv from pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install demo test lint bench mutate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## make demo: a whole simulated cluster patched as one cycle (a report at the end), SQLite by default
demo: install
	$(BIN)/nodepatch demo

## make test: the whole suite (SQLite always; PostgreSQL on 127.0.0.1:5432 when reachable)
test: install
	$(BIN)/pytest

## make lint: ruff and mypy --strict
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## make bench: engine transitions/s next to the raw commit rate of the same database; the fleet
## (node runs/s driven by workers); a 16-node cycle, serial against --max-parallel auto, in
## simulated time; the CLI's start-up latency ratios. Every benchmark merges its figures by name
## into bench.json at the repository root
bench: install
	$(BIN)/python -m benchmarks.transitions
	$(BIN)/python -m benchmarks.fleet
	$(BIN)/python -m benchmarks.cycle
	$(BIN)/python -m benchmarks.cli

## make mutate: mutation testing of store, context, plan and node_patch (cosmic-ray, SQLite,
## one mutant at a time, about 40 minutes; not in CI). Report: .mutation/report.txt
mutate: install
	$(BIN)/python -m tests.mutation

clean:
	rm -rf $(VENV) .mutation .pytest_cache .mypy_cache .ruff_cache *.egg-info

## make browser: Debian's chromium for the report's browser test (root; CI does it in .ci/run)
.PHONY: browser
browser:
	bash .ci/install-chromium
