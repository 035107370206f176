# Two commands do everything on a fresh machine:
#   make demo   -> installs into .venv and runs `eclm demo` (the main job)
#   make test   -> installs into .venv and runs the test suite
# As root, `make board-test` installs and drives the edge runtime on an emulated arm64 Debian board.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install bench board-test pyver-test clean

$(BIN)/eclm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/eclm

install: $(BIN)/eclm

demo: install
	$(BIN)/eclm demo

# Two workers (one per core here); ECLM_TEST_WORKERS=1 runs the suite in one process.
test: install
	$(BIN)/python -m pytest -q --durations=10 -n $${ECLM_TEST_WORKERS:-2}

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy eclm device_profiles module_bank exporter cloud_sync edge_runtime bench

bench: install
	$(BIN)/eclm bench --suite export --out docs/benchmarks

# The rootfs (10-20 minutes to build), the digits bank and pip's downloads are cached outside the repository.
BOARD_CACHE ?= $(or $(ECLM_BOARD_CACHE),/var/cache/eclm-board)
BOARD_OUT ?= docs/benchmarks
board-test: install
	$(BIN)/python -m bench.board --cache $(BOARD_CACHE) --out $(BOARD_OUT)

# The same install and checks natively with another Python (its wheels come from the package index).
PY ?= python3.13
pyver-test: install
	$(BIN)/python -m bench.pyver --python $(PY) --out $(BOARD_OUT)

clean:
	rm -rf $(VENV) eclm-demo bank bundles
