# Portal Hub: `make run` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
WEB := web-client

.PHONY: run test lint typecheck pytest bench web install install-dev lock clean

run: install web
	$(BIN)/portalhub serve --demo

test: install-dev web lint typecheck pytest

lint:
	$(BIN)/ruff check server tests bench
	$(BIN)/ruff format --check server tests bench

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q

bench: install-dev
	$(BIN)/python -m bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when a lock file or pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python requirements.lock pyproject.toml
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(PIP) install -r requirements-dev.lock
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The web client is built when it has a package.json; until then web-client/public is served.
web:
	@if [ -f $(WEB)/package.json ]; then \
		cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error && npm run build; \
	else \
		echo "web client: static page in $(WEB)/public (nothing to build)"; \
	fi

lock: $(BIN)/python
	$(PIP) install pip-tools
	$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml
	$(BIN)/pip-compile -q --strip-extras --extra dev --no-emit-index-url \
		--no-emit-find-links -o requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(WEB)/node_modules $(WEB)/dist
