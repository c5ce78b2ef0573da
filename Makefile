# sub8 — the README's two commands are `make study` and `make test`; each sets up whatever is missing first.
PROFILE ?= default
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sub8-installed

.PHONY: setup system-packages data study test bench clean-runs

setup: system-packages $(STAMP)

system-packages:
	@bash scripts/install_system_packages.sh $(PYTHON)

# Re-installs (and rebuilds the C kernels) only when pyproject.toml, setup.py or _kernels.c changes.
# torch/torchaudio come from the local wheel store when present.
$(STAMP): pyproject.toml setup.py lib/sub8/quant/_kernels.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "sub8 needs Python 3.11, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Only the corpus, tokenizer and feature caches of PROFILE.
data: setup
	$(BIN)/python -m sub8.study --profile $(PROFILE) --only 00_data

# The whole study: every notebook, in order, through papermill; results land in results/$(PROFILE)/.
study: setup
	$(BIN)/python -m sub8.study --profile $(PROFILE)

# Unit tests and the notebooks' regression (nbval) on the smoke profile.
test: setup
	$(BIN)/python -m pytest

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-runs:
	rm -rf runs/$(PROFILE)
