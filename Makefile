# The two commands of the README: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 5005
LOCAL := .local

.PHONY: setup run test lint types unit trial bench diagrams vm-test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[dev]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

run: setup
	mkdir -p $(LOCAL)/workspace $(LOCAL)/state
	@echo "pyro-agent: listening on tcp:$(PORT) (127.0.0.1), workspace $(LOCAL)/workspace, state $(LOCAL)/state"
	$(BIN)/twistd --nodaemon --pidfile= pyro-agent --listen tcp:$(PORT):interface=127.0.0.1 \
		--workspace $(LOCAL)/workspace --state-dir $(LOCAL)/state

lint: setup
	$(BIN)/ruff check pyro_reactor twisted tests benchmarks
	$(BIN)/ruff format --check pyro_reactor twisted tests benchmarks

types: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

trial: setup
	rm -rf _trial_temp
	$(BIN)/trial tests

test: lint types unit trial

bench: setup
	$(BIN)/python -m compileall -q pyro_reactor twisted/plugins
	$(BIN)/python benchmarks/run.py

diagrams: setup
	$(BIN)/automat-visualize -t svg -i docs/diagrams -d build/dot pyro_reactor

vm-test: setup
	bash tests/vm/run.sh

clean:
	rm -rf $(VENV) $(LOCAL) build dist *.egg-info
