# Two entry points for a newcomer: `make serve` (install, then serve the bundled weights on :8000)
# and `make test` (install with the dev extras, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve test clean

$(BIN)/did: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/did

serve: install
	$(BIN)/did serve --host $(HOST) --port $(PORT) --weights weights

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
