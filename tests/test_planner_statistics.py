"""Planner statistics follow every load on PostgreSQL: right after a command that loaded, the tables it changed (and
``ops.deleted_rows`` when it recorded deletions) have been analysed, the others not again. dlt never runs ANALYZE:
a first SQLMesh build planned before autovacuum got to the fresh raw tables ran for tens of minutes (issue 24).

Through the commands a user types (`dlt pipeline <name> run`, `… --full-refresh`, `verify --repair`, replication
mode), on throwaway PostgreSQL databases. ``pg_stat_user_tables.last_analyze`` is set by a manual ANALYZE only
(autovacuum's sets ``last_autoanalyze``): autovacuum cannot make these tests pass.
"""

from __future__ import annotations

import sqlite3
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.commands import DLT, demo_settings, environment, run, sqlite_path
from datamart.testing.postgres import ThrowawayPostgres, create_database

pytestmark = pytest.mark.postgres

DEMO_REPLICATION = PROJECT_ROOT / "datamart" / "demo" / "pipelines" / "replication" / "app_db.yaml"


def analysed(warehouse: Warehouse, *schemas: str) -> dict[str, datetime | None]:
    """``schema.table`` → when a manual ANALYZE last ran on it (None: never), for the tables of ``schemas`` that hold
    data (dlt's own ``_dlt_…`` tables left out)."""
    rows = warehouse.query(
        "SELECT schemaname || '.' || relname, last_analyze FROM pg_stat_user_tables "
        "WHERE schemaname = ANY(%s) AND relname NOT LIKE '\\_dlt\\_%%'",
        (list(schemas),),
    )
    return dict(rows)


def with_statistics(warehouse: Warehouse, *schemas: str) -> set[str]:
    """The tables of ``schemas`` the planner has column statistics for (``pg_stats``)."""
    rows = warehouse.query(
        "SELECT DISTINCT schemaname || '.' || tablename FROM pg_stats WHERE schemaname = ANY(%s)", (list(schemas),)
    )
    return {row[0] for row in rows}


def dlt_ok(env: dict[str, str], *args: str) -> str:
    """``dlt <args>``, which must exit 0; its output."""
    return run([DLT, *args], env, expect=0).stdout


def advance_day(env: dict[str, str], source_url: str, tmp_path: Path) -> None:
    """A demo day in the source: inserts, updates, soft and hard deletes (and new bucket files)."""
    command = [sys.executable, "-m", "datamart.demo", "--source-url", source_url, "--bucket", str(tmp_path / "bucket")]
    run([*command, "--advance-day"], env, expect=0)


@pytest.fixture
def cursor_demo(pg_database_factory: Callable[..., str], tmp_path: Path) -> tuple[dict[str, str], Warehouse]:
    """The demo's SQLite source and bucket (small) and an empty PostgreSQL warehouse, as a user sets them."""
    warehouse = postgres_warehouse(pg_database_factory("warehouse"))
    settings = demo_settings(tmp_path, "stats-test-key", warehouse, scale=0.05)
    return environment(**settings), warehouse


def test_every_cursor_mode_load_analyses_the_tables_it_changed(
    cursor_demo: tuple[dict[str, str], Warehouse], tmp_path: Path
) -> None:
    env, warehouse = cursor_demo
    raw = ("raw_app_db", "raw_bucket")

    # first loads: a SQL source and files
    dlt_ok(env, "pipeline", "app_db", "run")
    dlt_ok(env, "pipeline", "bucket", "run")
    first = analysed(warehouse, *raw)
    assert len(first) >= 7, first  # app_db's 5 tables and the bucket's
    assert [t for t, at in first.items() if at is None] == [], "tables loaded but never analysed"
    assert with_statistics(warehouse, *raw) == set(first)

    # a run that reads nothing new analyses nothing
    dlt_ok(env, "pipeline", "bucket", "run")
    assert analysed(warehouse, *raw) == first

    # a demo day: updates, soft deletes and hard deletes found by key set, recorded in ops.deleted_rows
    advance_day(env, env["SOURCES__APP_DB__CREDENTIALS"], tmp_path)
    summary = dlt_ok(env, "pipeline", "app_db", "run")
    second = analysed(warehouse, *raw, "ops")
    for table in ("organizations", "missions", "volunteers", "applications", "stats_events"):
        assert second[f"raw_app_db.{table}"] > first[f"raw_app_db.{table}"], (table, summary)
    assert second["ops.deleted_rows"] is not None
    assert warehouse.query("SELECT count(*) FROM ops.deleted_rows")[0][0] > 0
    assert all(second[t] == first[t] for t in first if t.startswith("raw_bucket.")), "bucket did not run"

    # a full refresh of one table
    dlt_ok(env, "pipeline", "app_db", "run", "--table", "organizations", "--full-refresh")
    third = analysed(warehouse, *raw)
    assert third["raw_app_db.organizations"] > second["raw_app_db.organizations"]
    assert third["raw_app_db.missions"] == second["raw_app_db.missions"]

    # a repair: a source update that moved no cursor, reloaded by verify --repair
    with sqlite3.connect(sqlite_path(env["SOURCES__APP_DB__CREDENTIALS"])) as conn:
        conn.execute("UPDATE volunteers SET department = 'ZZ' WHERE id = (SELECT min(id) FROM volunteers)")
    dlt_ok(env, "pipeline", "app_db", "verify", "--repair", "--table", "volunteers")
    fourth = analysed(warehouse, *raw)
    assert fourth["raw_app_db.volunteers"] > third["raw_app_db.volunteers"]


def test_every_replication_load_analyses_the_tables_it_changed(logical: ThrowawayPostgres, tmp_path: Path) -> None:
    source_url = create_database(logical.url(), f"demo_{uuid.uuid4().hex[:8]}")
    warehouse = postgres_warehouse(create_database(logical.url(), f"wh_{uuid.uuid4().hex[:8]}"))
    declaration = yaml.safe_load(DEMO_REPLICATION.read_text())
    declaration["source"]["slot"] = f"datamart_stats_{uuid.uuid4().hex[:8]}"  # slots are the cluster's
    (tmp_path / "declarations").mkdir()
    (tmp_path / "declarations" / "app_db.yaml").write_text(yaml.safe_dump(declaration), encoding="utf-8")
    env = environment(
        SOURCES__APP_DB__CREDENTIALS=source_url,
        DATAMART__PII_HMAC_KEY="stats-test-key",
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DATAMART_DECLARATIONS_DIR=str(tmp_path / "declarations"),
        **warehouse.environment_variables(),
    )
    command = [sys.executable, "-m", "datamart.demo", "--source-url", source_url, "--bucket", str(tmp_path / "bucket")]
    run([*command, "--scale", "0.05"], env, expect=0)

    dlt_ok(env, "pipeline", "app_db", "run")  # the consistent initial copy
    copied = analysed(warehouse, "raw_app_db")
    assert len(copied) >= 5 and [t for t, at in copied.items() if at is None] == [], copied

    advance_day(env, source_url, tmp_path)
    dlt_ok(env, "pipeline", "app_db", "run")  # the changes streamed from the slot
    streamed = analysed(warehouse, "raw_app_db")
    for table in ("missions", "applications"):
        assert streamed[f"raw_app_db.{table}"] > copied[f"raw_app_db.{table}"], table
