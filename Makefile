# The two commands of the README: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 5005
LOCAL := .local

.PHONY: setup run test lint types unit trial bench diagrams vm-test clean

setup: $(STAMP)

# The working tree itself is what runs: a .pth file of our own puts the checkout on the venv's
# sys.path, so `import pyro_reactor` and twistd's plugin search (twisted/plugins/ of every
# sys.path entry) both see the tree, whatever mode setuptools' editable install uses. The
# editable install only brings the dependencies, the metadata and the console script.
# The last line refreshes twisted/plugins/dropin.cache, from another directory, and fails
# setup if twistd would not find the pyro-agent plugin.
$(STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pyro_reactor_worktree.pth"
	cd / && $(CURDIR)/$(BIN)/python -c "from twisted.application.service import IServiceMaker; \
		from twisted.plugin import getPlugins; \
		names = [maker.tapname for maker in getPlugins(IServiceMaker)]; \
		assert 'pyro-agent' in names, f'twistd does not find the pyro-agent plugin: {names}'"
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
