"""Airflow DAG ``datamart``: one task per declared pipeline (pipelines/*.yaml), then the SQLMesh run of prod.

The tasks are generated from the declarations when the DAG file is parsed: a new pipeline needs no edit here. Each
task runs ``make scheduled``'s command in the project's own virtualenv (Airflow and the project never share one):
``python -m datamart scheduled --only pipelines --pipeline <name>`` per pipeline (what ``dlt pipeline <name> run``
does, with its retries, plus the summary and the alert), then ``python -m datamart scheduled --skip pipelines`` (the
SQLMesh run of prod's due intervals and every later step, never a promotion). Each task has its own retries and its
own log in Airflow; the webhook alert is posted by a task's last try only.

Settings (environment variable, else Airflow Variable, else the default):
- ``DATAMART_PROJECT_DIR`` / Variable ``datamart_project_dir``: the project checkout (default: this file's parent's
  parent, i.e. the DAG is used from the checkout's ``dags/`` folder).
- ``DATAMART_VENV`` / ``datamart_venv``: the project's virtualenv (default ``<project>/.venv``, made by make install).
- ``DATAMART_SCHEDULE`` / ``datamart_schedule``: the cron expression (default ``@daily``).
- ``DATAMART_TASK_RETRIES`` / ``datamart_task_retries``: Airflow's retries per task (default 2, 5 minutes apart and
  doubling), on top of the retries ``dlt pipeline <name> run`` makes itself on lost connections.
- ``DATAMART_ENV`` / ``datamart_env``: the environment of every task (default ``prod``, as the promotion workflow and
  the CronJob: the warehouse refuses an environment other than its own).
- ``DATAMART_TARGET`` and the secrets (``DESTINATION__POSTGRES__CREDENTIALS``,
  ``SOURCES__<NAME>__…``, ``DATAMART__PII_HMAC_KEY``, ``DATAMART__ALERT_WEBHOOK_URL``) are read by the commands from
  the worker's environment, as they are by cron; nothing secret is written in this file or in Airflow's database.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

DAG_ID = "datamart"
# Airflow retries a failed task: only its last try posts the webhook alert (rendered by Airflow at run time)
LAST_TRY_ALERT = "{{ '' if ti.try_number > ti.max_tries else ' --no-alert' }}"


def setting(name: str, default: str) -> str:
    """An environment variable (``DATAMART_…``), else the Airflow Variable of the same name in lower case."""
    value = os.environ.get(name.upper())
    if value:
        return value
    try:
        from airflow.sdk import Variable

        return str(Variable.get(name.lower(), default=default))
    except Exception:  # noqa: BLE001 - no Variable store reachable while parsing: the default
        return default


PROJECT_DIR = Path(setting("DATAMART_PROJECT_DIR", str(Path(__file__).resolve().parent.parent)))
# The environment the tasks run in: prod, like the promotion workflow and the CronJob (one warehouse, one environment;
# a warehouse marked prod refuses DATAMART_ENV=dev). A worker serving preprod sets DATAMART_ENV=preprod.
ENVIRONMENT = setting("DATAMART_ENV", "prod")
VENV = Path(setting("DATAMART_VENV", str(PROJECT_DIR / ".venv")))


def declared_pipelines(project_dir: Path = PROJECT_DIR) -> list[str]:
    """The pipeline names declared in ``pipelines/*.yaml`` (the ``name`` key, else the file name), or in
    ``DATAMART_DECLARATIONS_DIR`` when set (the folder the commands read too)."""
    folder = Path(os.environ.get("DATAMART_DECLARATIONS_DIR") or project_dir / "pipelines")
    names = []
    for path in sorted(folder.glob("*.yaml")):
        declaration = yaml.safe_load(path.read_text()) or {}
        names.append(str(declaration.get("name") or path.stem))
    return names


with DAG(
    dag_id=DAG_ID,
    description="datamart: every dlt pipeline, then the refresh of prod's marts (make scheduled, split into tasks)",
    schedule=setting("DATAMART_SCHEDULE", "@daily"),
    start_date=datetime(2025, 10, 1),
    catchup=False,  # a pipeline reads everything new since its last run: one run catches up
    max_active_runs=1,
    # DuckDB has one writer at a time: pipelines in turn; PostgreSQL: in parallel
    max_active_tasks=1 if os.environ.get("DATAMART_TARGET", "duckdb") == "duckdb" else 8,
    default_args={
        "retries": int(setting("DATAMART_TASK_RETRIES", "2")),
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
    },
    tags=["datamart"],
) as dag:
    python = shlex.quote(str(VENV / "bin" / "python"))
    refresh = BashOperator(
        task_id="refresh",
        bash_command=f"{python} -m datamart scheduled --skip pipelines" + LAST_TRY_ALERT,
        cwd=str(PROJECT_DIR),
        env={"DATAMART_ENV": ENVIRONMENT},
        append_env=True,
        doc_md="The refresh of prod's published views from what the pipelines loaded, and the later steps of "
        "`make scheduled` (no promotion).",
    )
    for name in declared_pipelines():
        load = BashOperator(
            task_id=f"pipeline_{name}",
            # the scheduled entry point for this one pipeline: dlt pipeline <name> run's retries on lost connections,
            # the summary in the task's log, and the webhook alert on the task's last try only
            bash_command=f"{python} -m datamart scheduled --only pipelines --pipeline {shlex.quote(name)}"
            + LAST_TRY_ALERT,
            cwd=str(PROJECT_DIR),
            env={"DATAMART_ENV": ENVIRONMENT},
            append_env=True,
            doc_md=f"pipelines/{name}.yaml into the warehouse (as `dlt pipeline {name} run`), then a summary.",
        )
        load >> refresh
