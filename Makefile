# Thin wrappers: each target is one command a person could type. `make help` lists them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENV ?= dev

.DEFAULT_GOAL := help
.PHONY: help install run test demo-advance plan promote sqlmesh external-models lint format clean bench

help: ## List every target with one line
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its test tools

run: $(STAMP) ## Whole job on the default warehouse: demo data if missing, every pipeline, SQLMesh prod plan
	$(BIN)/python -m datamart run --demo

test: $(STAMP) ## Run the tests (DuckDB and a throwaway PostgreSQL started by the tests)
	scripts/ensure-postgres.sh
	$(BIN)/python -m pytest

demo-advance: $(STAMP) ## Move the demo source one day forward (inserts, updates, soft and hard deletes)
	$(BIN)/python -m datamart.demo --advance-day

plan: $(STAMP) ## Build the changed models in a virtual environment (prod untouched): make plan ENV=dev
	$(BIN)/python -m datamart sqlmesh plan $(ENV) --auto-apply --no-prompts --include-unmodified

promote: $(STAMP) ## Apply the models to prod (tests, audits, then views swapped) and re-apply Metabase's grants
	$(BIN)/python -m datamart promote

sqlmesh: $(STAMP) ## Run sqlmesh on the selected warehouse, e.g. make sqlmesh ARGS="plan dev"
	$(BIN)/python -m datamart sqlmesh $(ARGS)

external-models: $(STAMP) ## Regenerate external_models.yaml from the dlt pipelines' schemas (after a source changes)
	$(BIN)/python -m datamart.external_models

bench: $(STAMP) ## Benchmark against COPY and dump/restore (throwaway PostgreSQL): make bench SCALE=500
	$(BIN)/python bench/run.py --scale $(or $(SCALE),500)

lint: $(STAMP) ## ruff on Python, SQLMesh's linter and format check on models
	$(BIN)/ruff check datamart tests
	$(BIN)/ruff format --check datamart tests
	$(BIN)/python -m datamart sqlmesh lint
	$(BIN)/python -m datamart sqlmesh format --check

format: $(STAMP) ## Format Python (ruff) and SQL models (sqlmesh format)
	$(BIN)/ruff format datamart tests
	$(BIN)/python -m datamart sqlmesh format

clean: ## Remove local data (demo source, bucket, warehouse, dlt working dirs) and caches
	rm -rf data .cache logs .pytest_cache
