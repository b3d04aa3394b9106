# The README's two commands. Each first installs the locked environment (uv.lock) into .venv when it is
# missing or older than uv.lock / pyproject.toml; uv itself is bootstrapped into .tools/ if not on PATH.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
STUDY ?= demo

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1
# Every job imports torch/open_clip/mlflow afresh; with PYTHONDONTWRITEBYTECODE set (as on our CI machines) each
# process would recompile them from source (~15 s per job). Bytecode is written once, for the modules jobs use
# (cheaper than `uv sync --compile-bytecode`, which compiles all 21,000 files of the venv: 2 CPU-minutes).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test lint conda-env

install: $(VENV)/.installed

$(CURDIR)/.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen
	touch $@

# dvc.yaml is generated from params.yaml (the study's (run, seed) pairs); rewritten only when its text changes.
dvc.yaml: params.yaml $(VENV)/.installed
	dinorankclip dvc-yaml && touch $@

# The whole demo study: world -> download -> teacher features -> pretraining -> evaluation -> report.
# Snakemake runs the DAG; `dvc commit` then records the outputs in dvc.lock, so `dvc status` is clean too. The
# commit hashes every stage (about a minute for the demo), so it runs only when a file under results/$(STUDY) is
# newer than the last one: a second `make demo` that runs no job records nothing.
# Snakemake runs beside a fork server (src/dinorankclip/forkserver.py): torch, open_clip and MLflow are imported once,
# not once per job (5-7 CPU-s each on a 2-core machine); its cost goes to results/$(STUDY)/logs/forkserver.log. It
# imports the package from src/, as the jobs do (workflow/rules/common.smk).
COMMITTED := .dvc/tmp/committed-$(STUDY)
demo: install dvc.yaml
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} python -m dinorankclip.forkserver run \
		--log results/$(STUDY)/logs/forkserver.log -- snakemake all --config study=$(STUDY)
	@if [ -e $(COMMITTED) ] && [ -z "$$(find results/$(STUDY) -newer $(COMMITTED) -print -quit)" ]; then \
		echo "dvc.lock: current (no job ran since the last dvc commit)"; \
	else \
		echo "dvc commit: recording the outputs in dvc.lock"; \
		dvc commit --force --quiet && mkdir -p $(dir $(COMMITTED)) && touch $(COMMITTED); \
	fi
	@echo
	@cat results/$(STUDY)/report/main.md
	@echo
	@echo "table:   results/$(STUDY)/report/main.md (CSV: main.csv)"
	@echo "figure:  results/$(STUDY)/report/main.png (PDF: main.pdf)"
	@echo "MLflow:  mlflow ui --backend-store-uri sqlite:///results/$(STUDY)/mlflow.db"

# The tests on TEST_WORKERS processes (pytest-xdist; tests/conftest.py says which modules share one); 2 = the CI
# machine's cores. `pytest` alone runs them in one process.
TEST_WORKERS ?= 2
test: install
	pytest --numprocesses $(TEST_WORKERS) --no-loadscope-reorder

lint: install
	ruff check src tests bench
	snakemake --lint

conda-env: install
	UV=$(UV) envs/export-from-lock.sh
