# streamrec — `make demo` runs the live loop, `make test` runs the tests. Both set up everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit bench bench-validation bench-replay bench-ingest bench-serving bench-apply docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/streamrec demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/contract $(PYTEST_ARGS)

bench: bench-validation bench-replay bench-apply bench-ingest bench-serving

bench-apply: $(STAMP)
	$(BIN)/python bench/apply.py

bench-serving: $(STAMP)
	$(BIN)/python bench/serving.py

bench-ingest: $(STAMP)
	$(BIN)/python bench/ingest.py

bench-replay: $(STAMP)
	$(BIN)/python bench/replay.py

bench-validation: $(STAMP)
	$(BIN)/python bench/validation.py

docs: $(STAMP)
	$(BIN)/streamrec docs

clean:
	rm -rf $(VENV) demo-out .pytest_cache
