# Each target sets itself up from a fresh clone: it needs only Python 3.10+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo serve bench bench-lifecycle bench-policy bench-observe bench-routing bench-retry clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The suite under coverage; the testing kit's own tests again, in random order, on two workers sharing
# the database; then the soaks (thousands of requests through uvicorn per backend), two at a time.
test: $(STAMP)
	$(BIN)/python -m coverage run -m pytest -m "not slow" $(PYTEST_ARGS)
	$(BIN)/python -m coverage report
	$(BIN)/python -m pytest -q -n 2 --random-order tests/test_testing.py tests/test_pytest_plugin.py
	$(BIN)/python -m pytest -q -n 2 -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests examples bench
	$(BIN)/python -m ruff format --check src tests examples bench
	$(BIN)/python -m mypy

demo: $(STAMP)
	$(BIN)/python examples/tour.py

# The FastAPI example on http://$(HOST):$(PORT) (docs at /docs); SQLite in example.db unless DATABASE_URL is set.
HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	$(BIN)/python -m uvicorn examples.fastapi_app:app --host $(HOST) --port $(PORT)

# What the integration costs per request; BENCH_ARGS=--quick for a run under a minute.
bench: $(STAMP)
	$(BIN)/python -m bench.requests $(BENCH_ARGS)

# What change tracking costs (issue 4); BENCH_ARGS=--quick for a smoke run.
bench-lifecycle: $(STAMP)
	$(BIN)/python -m bench.lifecycle $(BENCH_ARGS)

# What per-route transaction policy costs (issue 14); needs a git clone, for its baseline.
bench-policy: $(STAMP)
	$(BIN)/python -m bench.policy $(BENCH_ARGS)

# What query statistics and the OpenTelemetry span cost (issue 15).
bench-observe: $(STAMP)
	$(BIN)/python -m bench.observe $(BENCH_ARGS)

# What reading from a replica costs (issue 16).
bench-routing: $(STAMP)
	$(BIN)/python -m bench.routing $(BENCH_ARGS)

# What replaying requests costs without conflicts, and what it buys with them (issue 17).
bench-retry: $(STAMP)
	$(BIN)/python -m bench.retry $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .coverage .mypy_cache .pytest_cache .ruff_cache
