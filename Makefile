# streamrec — `make demo` runs the live loop, `make test` runs the tests. Both set up everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
DEMO_ARGS ?=
PYTEST_ARGS ?=

# Exact versions with hashes (uv pip compile): every machine installs the same set.
LOCK := requirements/dev.txt
RUNTIME_LOCK := requirements/runtime.txt
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
# torch is the CPU build (2.13.0+cpu, no CUDA packages): machines of this workplace keep its wheel
# in /opt/wheels (pip's PIP_FIND_LINKS); elsewhere it comes from PyTorch's CPU index (same file)
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-2.13.0+cpu-*.whl),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: setup browser prometheus lock demo test test-unit bench bench-validation bench-replay bench-ingest bench-serving bench-apply bench-api bench-on-demand bench-log-flush bench-item-deltas bench-rebalance chaos-sweep soak docs clean

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes $(TORCH_SOURCE) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

# Browser tests drive Debian's chromium through its chromedriver (nothing downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The shipped alert rules are checked with promtool and evaluated by a real Prometheus (Debian
# package prometheus; its server is not left running where systemd would start it).
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus and promtool (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  && if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1; fi; \
	  command -v promtool >/dev/null && command -v prometheus >/dev/null; }

# Re-resolve the lock files from pyproject.toml's ranges (then review the diff and `make test`).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) $(TORCH_SOURCE) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml -c $(LOCK) $(LOCK_FLAGS) $(TORCH_SOURCE) -o $(RUNTIME_LOCK)

demo: $(STAMP)
	$(BIN)/streamrec demo $(DEMO_ARGS)

test: $(STAMP) browser prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) prometheus
	$(BIN)/python -m pytest tests/unit tests/contract $(PYTEST_ARGS)

bench: bench-validation bench-replay bench-apply bench-ingest bench-serving bench-api bench-on-demand bench-log-flush bench-item-deltas bench-rebalance

bench-apply: $(STAMP)
	$(BIN)/python bench/apply.py

bench-serving: $(STAMP)
	$(BIN)/python bench/serving.py

# kill -9 the worker at 15 points of a stream in each of the 6 state layouts (~40 minutes)
chaos-sweep: $(STAMP)
	STREAMREC_CHAOS_SWEEP=1 $(BIN)/python -m pytest -q tests/chaos/test_worker_kill.py $(PYTEST_ARGS)

# 10 minutes of traffic with a fault every minute; exit 0 only if nothing was lost or doubled
soak: $(STAMP)
	$(BIN)/python bench/soak.py

bench-api: $(STAMP)
	$(BIN)/python bench/api.py

# the API's compute alone (no HTTP, no Kafka): CPU per list, pass times, collector pauses
bench-on-demand: $(STAMP)
	$(BIN)/python bench/on_demand.py

# on-demand lists behind a slow impression log (Kafka acks): shared flushes vs one per pass
bench-log-flush: $(STAMP)
	$(BIN)/python bench/log_flush.py

bench-item-deltas: $(STAMP)
	$(BIN)/python bench/item_deltas.py

bench-rebalance: $(STAMP)
	$(BIN)/python bench/rebalance.py --redis-cluster 3

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
