# The README's two commands: `make pipeline` and `make test`. Both set up everything they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: pipeline test setup clean-venv bench study

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@[ -d .dvc ] || $(BIN)/dvc init -q

pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	@bash .ci/install_chromium.sh || echo "warning: no Chromium; the report's browser test will be skipped (CI installs it)"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# Throughput of this machine -> reports/bench.json and a markdown table (scripts/bench.py);
# `make bench BENCH_ARGS=--pipeline` also times a full `dvc repro` and a `dvc exp run` after it.
bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench.py $(BENCH_ARGS)

# Table 1 on the default synthetic data over 3 training seeds: one `dvc exp run -S seeds=[0,1,2]`
# -> studies/synthetic/{metrics.json,results.json,results.md} (the README's synthetic table is the
# same experiment, made as studies/synthetic_spp2 before 2 scans per patient became the default).
# The real-data table: scripts/study.py run --folder <tree> (README).
study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/study.py run --study synthetic --seeds 0 1 2
