.PHONY: install serve test test-all lint format bench typecheck-convex

VENV ?= .venv
PY := $(VENV)/bin/python

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(VENV)/bin/pip install -e '.[test]'

serve: install
	$(VENV)/bin/klipstream serve

test: install
	$(PY) -m pytest -m 'not slow and not live'

test-all: install
	$(PY) -m pytest -m 'not live'

lint: install
	$(VENV)/bin/ruff check klipstream tests bench
	$(VENV)/bin/ruff format --check klipstream tests bench

format: install
	$(VENV)/bin/ruff format klipstream tests bench
	$(VENV)/bin/ruff check --fix klipstream tests bench

typecheck-convex:
	cd convex && npm ci --no-audit --no-fund && npx tsc --noEmit

bench: install
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done
