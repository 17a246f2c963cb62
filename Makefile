# dpsweep: `make sweep` runs the embedded default sweep, `make test` runs the tests.
# Both create .venv and install the project on first use; nothing else needs to run first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= sweeps/smoke.yaml
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
LINT_PATHS := trainables sweeps analysis tests benchmarks
PORT ?= 5000

.PHONY: help setup sweep test test-all test-fast prepare report bench bench-search ui lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "setup: creating $(VENV) with $$($(PYTHON) --version); a fresh install takes 2-4 minutes"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PYTHON) sweeps/_install.py $(VENV)/install.log $(PY) -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install dpsweep with its dev tools

sweep: $(STAMP)  ## run (or resume) the sweep in SPEC (default: the embedded synthetic smoke sweep)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dpsweep sweep $(SPEC)

test: $(STAMP)  ## run the tests (fast and slow tiers, not the heavy one) in $(TEST_WORKERS) processes; prints the 25 slowest
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not heavy" -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-all: $(STAMP)  ## run every test, the heavy tier too (Ray cluster, killed workers, ...; about 3 minutes more), in $(TEST_WORKERS) processes
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)  ## run the fast tier only
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

report: $(STAMP)  ## write runs/<sweep>/report/index.html for SPEC (after `make sweep`)
	$(VENV)/bin/dpsweep report $(SPEC)

prepare: $(STAMP)  ## prepare a real dataset: make prepare DATASET=chexpert ROOT=/data/CheXpert-v1.0 [SIZE=224]
	@test -n "$(DATASET)" -a -n "$(ROOT)" || { echo "usage: make prepare DATASET=<name> ROOT=<folder> [SIZE=224]"; exit 2; }
	$(VENV)/bin/dpsweep prepare $(DATASET) --root $(ROOT) --size $(or $(SIZE),224) --out data

bench: $(STAMP)  ## benchmarks; JSON results under benchmarks/results/
	$(PY) benchmarks/bench_bootstrap.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_dp_step.py
	$(PY) benchmarks/bench_trial_step.py

bench-search: $(STAMP)  ## grid vs private selection vs public proxy on a larger twin (not in CI; long)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_search.py

ui: $(STAMP)  ## serve the MLflow UI for runs/ on http://127.0.0.1:$(PORT) (make ui PORT=5123)
	$(VENV)/bin/dpsweep ui --runs runs --port $(PORT)

lint: $(STAMP)  ## ruff check, ruff format --check, mypy (strict on the packages in pyproject.toml [tool.mypy] files)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

clean:  ## remove outputs (runs/, data/) and the venv
	rm -rf runs data $(VENV) *.egg-info
