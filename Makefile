# Portal Hub: `make run` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
WEB := web-client

.PHONY: run test lint typecheck pytest bench web web-test install install-dev lock clean

run: install web
	$(BIN)/portalhub serve --demo

test: install-dev web lint typecheck web-test pytest

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

# The web client: npm ci when the lock changes, a build when a source changes.
WEB_SRC := $(shell find $(WEB)/src $(WEB)/public $(WEB)/index.html $(WEB)/vite.config.ts \
	$(WEB)/tsconfig.json -type f 2>/dev/null)

$(WEB)/node_modules/.installed: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(WEB)/dist/index.html: $(WEB)/node_modules/.installed $(WEB_SRC)
	cd $(WEB) && npm run build

web: $(WEB)/dist/index.html

web-test: $(WEB)/node_modules/.installed
	cd $(WEB) && npm run typecheck && npm test

lock: $(BIN)/python
	$(PIP) install pip-tools
	$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml
	$(BIN)/pip-compile -q --strip-extras --extra dev --no-emit-index-url \
		--no-emit-find-links -o requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(WEB)/node_modules $(WEB)/dist
