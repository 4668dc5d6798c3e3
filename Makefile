# Two entry points for a fresh machine: `make demo` (set-up, then the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install native sysdeps infra-up infra-down demo test test-compose lint unit integration e2e bench lock clean

# Every dependency, transitive ones included, at the versions and hashes of requirements-dev.lock (the image
# installs requirements.lock, its runtime part); then the project itself without resolving anything again.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The backtest's hot pure modules, compiled with mypyc next to their .py (scripts/build_native.py, issue 16
# item 5; about 30 s on two cores). Rebuilt whenever one of them, the list or the script changes: Python
# imports an extension before the .py beside it, so a stale one must never stay. Without it the .py run.
NATIVE_SRC := $(shell grep -v -e '^\#' -e '^$$' scripts/native_modules.txt)
NATIVE_STAMP := build/native/stamp.json

$(NATIVE_STAMP): $(STAMP) scripts/native_modules.txt scripts/build_native.py $(NATIVE_SRC)
	$(BIN)/python scripts/build_native.py

native: $(NATIVE_STAMP)

install: $(STAMP) $(NATIVE_STAMP)

sysdeps:
	bash scripts/ensure-system-deps.sh
	bash scripts/ensure-chromium.sh

infra-up: install sysdeps
	$(BIN)/mpctl infra up

infra-down: install
	$(BIN)/mpctl infra down

demo: install sysdeps
	$(BIN)/mpctl demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .  # the docs' Python blocks too
	$(BIN)/mypy
	$(BIN)/pytest tests/unit/test_import_rules.py -q -p no:cacheprovider  # services side by side (#18 item 3)

unit: install
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

integration: install sysdeps
	$(BIN)/pytest tests/integration -q $(PYTEST_ARGS)

e2e: install sysdeps
	$(BIN)/pytest tests/e2e -q $(PYTEST_ARGS)

test: install sysdeps lint
	$(BIN)/pytest tests -q -p no:cacheprovider --ignore=tests/compose $(PYTEST_ARGS)

# The compose stack for real on a Docker engine (installed and started when none answers; images built locally,
# cached between runs): tests/compose. CI runs it after `make test`.
test-compose: install sysdeps
	$(BIN)/pytest tests/compose -q -p no:cacheprovider $(PYTEST_ARGS)

# Rewrite both lock files from pyproject.toml (scripts/lock.sh); commit them with the pyproject change.
lock:
	bash scripts/lock.sh

# Benchmarks print JSON and keep it in reports/bench/ (local Kafka and Redis are started if needed). MPCTL_BUS_DIR
# holds the bus's secrets: without it the scripts would reach the authenticated broker as nobody.
# BENCH_SCALE_ARGS: scripts/bench_scale.py's (default 100 profiles, 25 per forked host; about 5 minutes here), run
# twice: the strategy hosts forking, then on one shared loop each (--shared-loop, about 3 minutes).
bench: install sysdeps
	mkdir -p reports/bench
	eval "$$($(BIN)/mpctl infra up 2>/dev/null)"; export KAFKA_BOOTSTRAP_SERVERS REDIS_URL MPCTL_BUS_DIR; \
	$(BIN)/python scripts/bench_registry.py | tee reports/bench/registry.json; \
	$(BIN)/python scripts/bench_backtest.py $(BENCH_BACKTEST_ARGS) | tee reports/bench/backtest.json; \
	$(BIN)/python scripts/bench_ingest.py | tee reports/bench/ingest.json; \
	$(BIN)/python scripts/bench_footprint.py --json reports/bench/footprint.json; \
	$(BIN)/python scripts/bench_pipeline.py --json reports/bench/pipeline.json --markdown docs/benchmarks.md; \
	$(BIN)/python scripts/bench_scale.py $(BENCH_SCALE_ARGS) | tee reports/bench/scale.json; \
	$(BIN)/python scripts/bench_scale.py $(BENCH_SCALE_ARGS) --shared-loop --out reports/bench/scale-shared \
		| tee reports/bench/scale-shared.json

clean:
	rm -rf $(VENV) reports build .pytest_cache .mypy_cache .ruff_cache
	find shared services mpctl -name '*.so' -delete
