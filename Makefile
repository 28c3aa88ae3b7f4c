# Two commands for a fresh machine:  make run   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test bench lint typecheck unit install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the gateway on its embedded default (demo model, loopback, port 8080).
run: $(STAMP)
	$(BIN)/tokyo-ia serve

## The whole suite: lint, type check, tests.
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

## Measure the gateway against a bare passthrough (docs/performance.md); ~7 min, uses wrk if installed.
## Pass options with BENCH_ARGS, e.g.  make bench BENCH_ARGS="--quick --repeat 1"
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
