# Two entry points for a fresh clone:
#   make run    start the gateway on embedded defaults (http://127.0.0.1:8000)
#   make test   lint, type-check and run every test against real components
# Both create .venv on first use; `make test` also installs the Debian and npm
# packages the tests drive (prometheus, alertmanager, redis, chromium, socket.io-client).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
DEBIAN_TOOLS := prometheus prometheus-alertmanager redis-server chromium haproxy
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit tools bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NPM_STAMP)

run: $(STAMP) $(NPM_STAMP)
	$(BIN)/chat-gateway serve

# Debian packages the tests start for real; installed only when missing.
tools:
	@missing=""; \
	for tool in promtool amtool redis-server chromium haproxy; do \
		command -v $$tool >/dev/null || missing=yes; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing test tools: $(DEBIAN_TOOLS)"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(DEBIAN_TOOLS) >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(NPM_STAMP) tools lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) node_modules data .pytest_cache .mypy_cache .ruff_cache
