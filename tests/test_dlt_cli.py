"""`dlt pipeline <name> run`: the project's dlt CLI plugin, run as a user runs it, against real warehouses."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from datamart.settings import Warehouse
from datamart.testing.commands import DLT, demo_settings, dlt, environment, sqlite_path


@pytest.fixture
def env(warehouse: Warehouse, tmp_path: Path) -> dict[str, str]:
    """A generated demo source and bucket, and the warehouse, given to the command the dlt way."""
    return environment(("DESTINATION__", "SOURCES__"), **demo_settings(tmp_path, "cli-test-key", warehouse, scale=0.2))


def source_count(env: dict[str, str], table: str) -> int:
    with sqlite3.connect(sqlite_path(env["SOURCES__APP_DB__CREDENTIALS"])) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_run_is_listed_under_dlt_pipeline() -> None:
    result = subprocess.run([DLT, "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "run" in result.stdout.split("Available Subcommands")[1]


def test_pipeline_run_loads_then_loads_nothing_more(env: dict[str, str], warehouse: Warehouse) -> None:
    first = dlt(env, "pipeline", "app_db", "run")
    assert first.returncode == 0, first.stderr
    volunteers = source_count(env, "volunteers")
    row = next(line for line in first.stdout.splitlines() if line.startswith("raw_app_db.volunteers"))
    assert row.split()[1:] == [f"{volunteers:,}", f"{volunteers:,}", "0", "0", f"{volunteers:,}"]
    assert warehouse.query("SELECT count(*) FROM raw_app_db.volunteers") == [(volunteers,)]

    second = dlt(env, "pipeline", "app_db", "run")
    assert second.returncode == 0, second.stderr
    rows = [line.split() for line in second.stdout.splitlines() if line.startswith("raw_app_db.")]
    assert len(rows) == 5 and all(r[1:5] == ["0", "0", "0", "0"] for r in rows), second.stdout


def test_all_runs_every_declared_pipeline(env: dict[str, str], warehouse: Warehouse) -> None:
    result = dlt(env, "pipeline", "all", "run")
    assert result.returncode == 0, result.stderr
    assert "2 pipeline(s)" in result.stdout
    assert warehouse.query("SELECT count(*) FROM raw_bucket.partners") == [(12,)]
    plan = dlt(env, "pipeline", "bucket", "run", "--dry-run").stdout
    assert "partner_reports: merge, reads files with modification_date after 20" in plan


def test_dry_run_says_what_it_would_read_and_loads_nothing(env: dict[str, str], warehouse: Warehouse) -> None:
    result = dlt(env, "pipeline", "app_db", "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stats_events: append, reads everything (first run)" in result.stdout
    assert "volunteers: merge" in result.stdout and "email:hash" in result.stdout
    assert not warehouse.table_exists("raw_app_db", "volunteers")

    assert dlt(env, "pipeline", "app_db", "run", "--table", "stats_events").returncode == 0
    last_id = warehouse.query("SELECT max(id) FROM raw_app_db.stats_events")[0][0]
    again = dlt(env, "pipeline", "app_db", "run", "--dry-run", "--table", "stats_events")
    assert f"stats_events: append, reads rows with id after {last_id}" in again.stdout


def test_one_table_and_its_full_refresh(env: dict[str, str], warehouse: Warehouse) -> None:
    result = dlt(env, "pipeline", "app_db", "run", "--table", "missions")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines() if line.startswith("raw_")] == [
        "raw_app_db.missions"
    ]
    warehouse.query("DELETE FROM raw_app_db.missions WHERE id <= 10")  # the warehouse drifted
    assert dlt(env, "pipeline", "app_db", "run", "--table", "missions").returncode == 0
    live = source_count(env, "missions WHERE deleted_at IS NULL")
    assert warehouse.query("SELECT count(*) FROM raw_app_db.missions")[0][0] < live  # incremental: not repaired

    refreshed = dlt(env, "pipeline", "app_db", "run", "--table", "missions", "--full-refresh")
    assert refreshed.returncode == 0, refreshed.stderr
    assert warehouse.query("SELECT count(*) FROM raw_app_db.missions") == [(live,)]


def test_mistakes_stop_with_the_fix(env: dict[str, str]) -> None:
    unknown = dlt(env, "pipeline", "nope", "run")
    assert unknown.returncode == 2
    assert "no pipeline named 'nope'" in unknown.stderr and "known pipelines: app_db, bucket" in unknown.stderr
    table = dlt(env, "pipeline", "app_db", "run", "--table", "nope")
    assert table.returncode == 2
    assert "declares no table 'nope'" in table.stderr


def test_unreachable_source_is_retried_then_reported(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    env = {**env, "SOURCES__APP_DB__CREDENTIALS": f"postgresql://app:pw@127.0.0.1:{port}/app"}
    result = dlt(env, "pipeline", "app_db", "run", "--table", "missions", "--retries", "2")
    assert result.returncode == 1
    assert "retry 2/2" in result.stderr
    assert "error: pipeline 'app_db' failed" in result.stderr
    assert "could not be reached" in result.stderr
    assert "pw" not in result.stderr.replace("pipeline", "")  # the password is never printed


def test_dlt_own_commands_find_the_pipelines_without_pipelines_dir(env: dict[str, str], warehouse: Warehouse) -> None:
    assert dlt(env, "pipeline", "app_db", "run").returncode == 0
    with sqlite3.connect(sqlite_path(env["SOURCES__APP_DB__CREDENTIALS"])) as conn:
        conn.execute("DELETE FROM applications WHERE id = (SELECT max(id) FROM applications)")  # a hard delete
    second = dlt(env, "pipeline", "app_db", "run")
    assert second.returncode == 0, second.stderr
    working_dir = Path(env["DATAMART_PIPELINES_DIR"]) / warehouse.target

    listed = dlt(env, "pipeline", "--list-pipelines")
    assert listed.returncode == 0, listed.stderr
    assert f"1 pipelines found in {working_dir}" in listed.stdout and "app_db" in listed.stdout

    info = dlt(env, "pipeline", "app_db", "info")
    assert info.returncode == 0, info.stderr
    assert f"Found pipeline app_db in {working_dir}" in info.stdout
    assert "dataset_name: raw_app_db" in info.stdout

    # the trace of the whole run: the rows' load package and then the deletions' (two dlt runs), not the last only
    trace = dlt(env, "pipeline", "app_db", "trace")
    assert trace.returncode == 0, trace.stderr
    assert trace.stdout.count("Step extract COMPLETED") == 2, trace.stdout
    assert trace.stdout.count("Step load COMPLETED") == 2, trace.stdout
    assert "- applications: 1 row(s)" in trace.stdout  # the deletion package, after the rows' package
