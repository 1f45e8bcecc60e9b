# Entry points: `make demo` (the job on embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.9.30
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast sandbox clean report bench compose-env

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --python $(BIN)/python --quiet requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

# Independent tests on both cores (pytest-xdist), then alone the ones that need the machine to
# themselves (Airflow deployments as processes, real-time rate-limit rounds).
test: install
	$(BIN)/python -m pytest -n 2 -m "not serial" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m serial $(PYTEST_ARGS)

# The quick loop while working: no PostgreSQL, no Airflow metadata database or processes.
test-fast: install
	$(BIN)/python -m pytest -n 2 -m "not postgres and not airflow and not serial" $(PYTEST_ARGS)

# The delivery report: make report [WAREHOUSE=<SQLAlchemy URL>] [OUT=<file>]
report: install
	$(BIN)/python scripts/report.py --warehouse '$(or $(WAREHOUSE),sqlite:///.demo/warehouse.db)' --out '$(or $(OUT),.demo/report.html)'

# Throughput side by side with the vendor SDK and dlt (a few minutes; BENCH_ARGS=--quick for a short run).
bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

sandbox: install
	$(BIN)/python -m cutmeshort_sandbox --port $${SANDBOX_PORT:-8765}

# docker-compose.yaml's secrets: writes the ones .env lacks, with fresh random values (never overwrites).
compose-env:
	python3 scripts/compose_env.py

clean:
	rm -rf $(VENV) .demo
