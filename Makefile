# The two commands of the README: `make run` serves the default models, `make test` runs the tests.
# Both bootstrap .venv (once; again only when pyproject.toml changes) and pull missing models.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.frontier-installed
export FRONTIER_HOST ?= 127.0.0.1
export FRONTIER_PORT ?= 8000

.PHONY: run test venv models bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

models: $(STAMP)
	$(BIN)/frontier pull

run: models
	$(BIN)/frontier serve --host $(FRONTIER_HOST) --port $(FRONTIER_PORT)

test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: models
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
