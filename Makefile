# Thin wrappers: each target is one command a person could type. `make help` lists them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENV ?= dev

.DEFAULT_GOAL := help
.PHONY: help install lock run scheduled verify test test-fast demo-advance plan review promote sqlmesh external-models \
	privacy-check privacy-register lint format clean airflow-venv metabase-backup metabase-restore bench

help: ## List every target with one line
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# -qq: errors only (a failed install still stops make); a pip configuration's warnings are not the user's task
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its test tools (versions from constraints.txt)

lock: ## Regenerate constraints.txt from pyproject.toml in a fresh venv (then make install, and commit it)
	PYTHON=$(PYTHON) scripts/lock.sh

run: $(STAMP) ## Whole job on the default warehouse: demo data if missing (demo: true pipelines), every pipeline, SQLMesh prod plan
	$(BIN)/python -m datamart run --demo

scheduled: $(STAMP) ## The scheduled job (cron, CronJob, Airflow): every pipeline, refresh of the marts (no promotion), review environments cleaned, alert on failure
	$(BIN)/python -m datamart scheduled

verify: $(STAMP) ## Compare every pipeline's tables with their source (counts, keys, checksums); exit 1 on drift
	$(BIN)/dlt pipeline all verify

test: $(STAMP) ## Run the tests (DuckDB and a throwaway PostgreSQL started by the tests)
	scripts/ensure-postgres.sh
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## Only the fast tier (neither slow nor postgres-marked tests): a few minutes, for the edit loop
	$(BIN)/python -m pytest -m fast

demo-advance: $(STAMP) ## Move the demo source one day forward (inserts, updates, soft and hard deletes)
	$(BIN)/python -m datamart.demo --advance-day

plan: $(STAMP) ## Build the changed models in a virtual environment (prod untouched): make plan ENV=dev
	$(BIN)/python -m datamart sqlmesh plan $(ENV) --auto-apply --no-prompts --include-unmodified

review: $(STAMP) ## Pull-request review against prod: build in pr_<branch>, report in data/review/review.md, fail on a broken contract
	$(BIN)/python -m datamart review $(if $(PR_ENV),--env $(PR_ENV))

promote: $(STAMP) ## Contract check, then the models to prod (tests, audits, views swapped) and Metabase's grants
	$(BIN)/python -m datamart promote

sqlmesh: $(STAMP) ## Run sqlmesh on the selected warehouse (same as .venv/bin/sqlmesh), e.g. make sqlmesh ARGS="plan dev"
	$(BIN)/python -m datamart sqlmesh $(ARGS)

external-models: $(STAMP) ## Regenerate external_models.yaml from the dlt pipelines' schemas (after a source changes)
	$(BIN)/python -m datamart.external_models

privacy-check: $(STAMP) ## Fail if a published column derives from personal data without an allowance (lineage)
	$(BIN)/python -m datamart privacy check

privacy-register: $(STAMP) ## Regenerate docs/personal-data.md, the personal-data register
	$(BIN)/python -m datamart privacy register

bench: $(STAMP) ## Benchmark against COPY and dump/restore (throwaway PostgreSQL): make bench SCALE=500
	$(BIN)/python bench/run.py --scale $(or $(SCALE),500)

lint: $(STAMP) ## ruff on Python, SQLMesh's linter (with the review gate) and format check on models
	$(BIN)/ruff check datamart tests dags linter macros bench config.py
	$(BIN)/ruff format --check datamart tests dags linter macros bench config.py
	$(BIN)/sqlmesh lint
	$(BIN)/sqlmesh format --check

format: $(STAMP) ## Format Python (ruff) and SQL models (sqlmesh format)
	$(BIN)/ruff format datamart tests dags linter macros bench config.py
	$(BIN)/sqlmesh format

# The URL reaches the command through the environment: make never echoes its password.
metabase-backup metabase-restore: export METABASE_DB_URL := $(METABASE_DB_URL)

metabase-backup: $(STAMP) ## Dump Metabase's own database: make metabase-backup METABASE_DB_URL=postgresql://… [FILE=…]
	$(BIN)/python -m datamart.metabase_backup backup $(if $(FILE),--file "$(FILE)")

metabase-restore: $(STAMP) ## Restore it into an empty instance (FORCE=1 wipes a non-empty one): METABASE_DB_URL=… FILE=…
	$(BIN)/python -m datamart.metabase_backup restore --file "$(FILE)" $(if $(filter 1 yes true,$(FORCE)),--force)

airflow-venv: .cache/airflow-venv/.installed ## Apache Airflow in its own venv (.cache/airflow-venv), for the DAG and its test

.cache/airflow-venv/.installed: dags/requirements-airflow.txt
	test -x .cache/airflow-venv/bin/python || $(PYTHON) -m venv .cache/airflow-venv
	.cache/airflow-venv/bin/python -m pip install --quiet --upgrade pip
	.cache/airflow-venv/bin/python -m pip install --quiet -r dags/requirements-airflow.txt
	touch $@

clean: ## Remove local data (demo source, bucket, warehouse, dlt working dirs) and caches
	rm -rf data .cache logs .pytest_cache
