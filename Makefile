# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then test).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup lint bench clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when pyproject.toml changes. The demo needs the core; tests and benches also
# need the dev tools and the data extras (Ray, trafilatura, datatrove as the dedup peer).
$(VENV)/.core: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.full: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,data]"
	touch $@ $(VENV)/.core

setup: $(VENV)/.full

demo: $(VENV)/.core
	$(VENV)/bin/kiln speedrun -c recipes/quickstart.yaml

# tests/test_label_browser.py drives Debian's chromium through chromedriver: as root, install them when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			>/dev/null 2>&1 || echo "make: installing chromium failed; the browser test will be skipped" >&2; \
	else echo "make: no chromium here (apt-get install chromium chromium-driver as root); the browser test will be skipped" >&2; fi

# The layering contract (pyproject.toml [tool.importlinter], docs/architecture.md) is part of the tests.
test: $(VENV)/.full browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/tokenize_throughput.py
	$(PY) bench/dedup.py

clean:
	rm -rf runs .pytest_cache
