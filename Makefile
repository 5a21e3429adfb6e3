# Everything a fresh machine needs: `make run` serves, `make test` runs the whole suite.
# Needs Python 3.11 or 3.12, gcc (durable-rules builds its C core) and make.

PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' 2>/dev/null && echo $$p && break; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The plugins: every folder of plugins/ with a pyproject.toml. The Dockerfile installs the same ones, so
# adding a plugin is adding its folder (tests/test_image.py checks both against plugins/).
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

.PHONY: install run test lint clean bench bench-engine bench-cut bench-backtest bench-scale docs screenshots browser

$(STAMP): pyproject.toml requirements/embedded.txt $(addsuffix /pyproject.toml,$(PLUGINS))
	@test -n "$(PYTHON)" || { echo "rulesvc needs Python 3.11 or 3.12 (durable-rules does not build on 3.13)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/embedded.txt
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	$(BIN)/python -m pip install --quiet $(foreach p,$(PLUGINS),-e '$(p)/[test]')
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rulesvc serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The console's browser tests drive Debian's Chromium through its ChromeDriver (tests/browser.py): installed
# here when missing, with apt-get (as root, or through sudo).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		command -v apt-get >/dev/null || { echo "the console's tests need chromium and chromedriver (Debian: chromium, chromium-driver)"; exit 1; }; \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
			chromium chromium-driver fonts-dejavu-core; \
	fi

test: lint browser
	$(BIN)/pytest -q

# The console's pictures in docs/console.md: the browser tests take them (build/console/), this keeps them.
DOC_SCREENSHOTS := login overview rulesets ruleset ruleset-uplift ruleset-check contact-search contact messages message try backtest channels
screenshots: $(STAMP) browser
	$(BIN)/pytest -q tests/console
	mkdir -p docs/console
	for f in $(DOC_SCREENSHOTS); do \
		if command -v pngquant >/dev/null; then pngquant --quality 60-85 --force --output docs/console/$$f.png build/console/$$f.png; \
		else cp build/console/$$f.png docs/console/; fi; done

# The configuration reference, generated from rulesvc/config.py (tests/test_config_reference.py checks it).
docs: $(STAMP)
	$(BIN)/python -m rulesvc.configdoc > docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The whole service under load, with baselines from the same run (BENCHMARKS.md); a few minutes.
bench: $(STAMP)
	$(BIN)/python bench/service_bench.py

# One instance against two on a three-member replica set, and the primary killed under load
# (docs/deploy.md); about two minutes.
bench-scale: $(STAMP)
	$(BIN)/python bench/scale_bench.py

# The engine, inbox and schedule alone, in one process.
bench-engine: $(STAMP)
	$(BIN)/python bench/engine_bench.py

# Cutting a catalog fan-out of 1M interests into parts, against reading every id into a list; a minute.
bench-cut: $(STAMP)
	$(BIN)/python bench/cut_bench.py

# The backtest over a stored two-week history (1M events, 100k contacts) against the engine alone, with
# its peak memory; several minutes.
bench-backtest: $(STAMP)
	$(BIN)/python bench/backtest_bench.py
