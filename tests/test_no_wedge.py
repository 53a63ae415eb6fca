"""No duplicate and no wedge after a failure (issue 14, items 3 and 4), through the real commands.

Each test runs `dlt pipeline app_db run …` (or `python -m datamart run`) as a subprocess on a real DuckDB file and
a real PostgreSQL database, with the demo source in SQLite:

- a load that fails on one table (a row the warehouse refuses) while the append table's events were read: after
  "fix the data and rerun", every event is there once — also when dlt's working directory was lost meanwhile;
- `--full-refresh --table <t>`, the repair the README proposes (and `verify`, for file tables), works with SQLMesh's
  views reading the raw table, and a failure never leaves a pending package that blocks later runs;
- a source table gone (renamed) stops that table only: the others load, the run exits 1 naming it and the fix.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from datamart.settings import Warehouse
from datamart.testing import commands
from datamart.testing.commands import DLT, PYTHON, demo_settings, environment, sqlite_path

pytestmark = pytest.mark.slow


def _environment(folder: Path, warehouse: Warehouse) -> dict[str, str]:
    """The source and bucket in ``folder`` and the warehouse, given to the commands the dlt way."""
    return environment(**demo_settings(folder, "wedge-test-key", warehouse))


def _load_the_demo(folder: Path, warehouse: Warehouse) -> None:
    """The demo (scale 0.2) generated in ``folder`` and loaded into ``warehouse`` by `dlt pipeline app_db run`."""
    run(
        environment(**demo_settings(folder, "wedge-test-key", warehouse, scale=0.2)), "dlt", "pipeline", "app_db", "run"
    )


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path, built_once: Any) -> Warehouse:
    """The demo loaded once per warehouse kind for the module, copied for this test (source, bucket, dlt's working
    directory and warehouse): the first load is not what these tests are about, what follows it is."""
    return built_once.copy("wedge_loaded", _load_the_demo, request, tmp_path)


@pytest.fixture
def env(warehouse: Warehouse, tmp_path: Path) -> dict[str, str]:
    """The demo source and bucket, loaded by `dlt pipeline app_db run` into the warehouse (see ``warehouse``),
    given to the commands the dlt way."""
    return _environment(tmp_path, warehouse)


def run(env: dict[str, str], *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run ``dlt …`` or ``python -m datamart …`` from the project root; check its exit code unless None."""
    return commands.run([DLT, *args[1:]] if args[0] == "dlt" else [PYTHON, "-m", *args], env, expect=expect)


def source(env: dict[str, str], *statements: str) -> list[tuple[object, ...]]:
    """Run statements on the SQLite source (committed); the rows of the last one."""
    with sqlite3.connect(sqlite_path(env["SOURCES__APP_DB__CREDENTIALS"])) as conn:
        rows: list[tuple[object, ...]] = []
        for statement in statements:
            rows = conn.execute(statement).fetchall()
        return rows


def add_events(env: dict[str, str], count: int) -> None:
    """``count`` new stats events, copies of existing ones under new ids."""
    (last_id, base), *_ = source(env, "SELECT max(id), count(*) FROM stats_events")
    source(
        env,
        f"INSERT INTO stats_events WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {count}) "
        f"SELECT {last_id} + n, e.event_type, e.partner_id, e.mission_id, e.occurred_at "
        f"FROM g JOIN stats_events e ON e.id = 1 + n % {base}",
    )


def bump(env: dict[str, str], table: str, assignment: str, where: str) -> None:
    """Change rows of the source and move their cursor past every other row's."""
    source(
        env,
        f"UPDATE {table} SET {assignment}, updated_at = datetime((SELECT max(updated_at) FROM {table}), '+1 hour') "
        f"WHERE {where}",
    )


def events_in_step(env: dict[str, str], warehouse: Warehouse) -> None:
    """The warehouse's events are the source's: same count, each id once, same sums."""
    figures = "count(*), count(DISTINCT id), sum(id), sum(mission_id)"
    assert tuple(warehouse.query(f"SELECT {figures} FROM raw_app_db.stats_events")[0]) == tuple(
        source(env, f"SELECT {figures} FROM stats_events")[0]
    )


def refuse_large_places(warehouse: Warehouse) -> None:
    """A rule of the warehouse on a merge table: on PostgreSQL a CHECK constraint; DuckDB has no ADD CONSTRAINT, so
    a narrower column type (a value out of its range is refused the same way)."""
    if warehouse.target == "postgres":
        warehouse.query("ALTER TABLE raw_app_db.missions ADD CONSTRAINT few_places CHECK (places < 10000)")
    else:
        warehouse.query("ALTER TABLE raw_app_db.missions ALTER COLUMN places TYPE SMALLINT")


REFUSED = "places = 100000"  # a row the warehouse refuses
FIXED = "places = 12"


# --- item 3: no duplicate after a failed load, whatever happened to the working directory ----------------------------


@pytest.mark.parametrize("working_dir", ["kept", "lost"])
def test_failed_load_then_fix_and_rerun_loads_each_event_once(
    env: dict[str, str], warehouse: Warehouse, tmp_path: Path, working_dir: str
) -> None:
    refuse_large_places(warehouse)
    add_events(env, 30_000)
    bump(env, "missions", REFUSED, "id = 3")  # one row the warehouse refuses

    failed = run(env, "dlt", "pipeline", "app_db", "run", expect=1)
    assert "could not be reached" not in failed.stderr and "retry" not in failed.stderr, failed.stderr
    assert "missions" in failed.stderr, failed.stderr
    if working_dir == "lost":  # a fresh worker: the CronJob keeps no volume for dlt's working directory
        shutil.rmtree(tmp_path / "pipelines")

    bump(env, "missions", FIXED, "id = 3")  # "fix the data and rerun", as the message says
    rerun = run(env, "dlt", "pipeline", "app_db", "run")
    events_in_step(env, warehouse)
    # missions keep their history (history: scd2): the current version is the fixed row, once
    current = "SELECT places FROM raw_app_db.missions WHERE id = 3 AND _dlt_valid_to IS NULL"
    assert warehouse.query(current) == [(12,)]
    again = run(env, "dlt", "pipeline", "app_db", "run")  # and nothing more is loaded
    assert "raw_app_db.stats_events" in again.stdout
    events_in_step(env, warehouse)
    assert rerun.returncode == 0


# --- item 4: the repair the messages propose works with SQLMesh's views in place; no pending package wedges ---------


def test_full_refresh_of_one_table_under_sqlmesh_views(env: dict[str, str], warehouse: Warehouse) -> None:
    run(env, "datamart", "run")  # loads, builds and promotes: SQLMesh's staging views read the raw tables
    published = warehouse.query("SELECT count(*) FROM marts.missions_v1")
    warehouse.query("DELETE FROM raw_app_db.missions WHERE id <= 10")  # the warehouse drifted (verify says so)

    refreshed = run(env, "dlt", "pipeline", "app_db", "run", "--table", "missions", "--full-refresh", expect=None)
    assert refreshed.returncode == 0, refreshed.stderr
    live = source(env, "SELECT count(*) FROM missions WHERE deleted_at IS NULL")[0][0]
    assert warehouse.query("SELECT count(*) FROM raw_app_db.missions") == [(live,)]
    assert warehouse.query("SELECT count(*) FROM staging.stg_app_db__missions") == [(live,)]  # the view still reads it
    assert warehouse.query("SELECT count(*) FROM marts.missions_v1") == published
    # nothing is left pending: the next runs load, the datamart is rebuilt on the repaired table
    bump(env, "missions", "places = places + 1", "id = 20")
    after = run(env, "dlt", "pipeline", "app_db", "run")
    assert "left pending" not in after.stdout, after.stdout
    run(env, "datamart", "run")
    assert warehouse.query("SELECT count(*) FROM marts.missions_v1") == [(live,)]
    # a refresh reads everything again, incrementally after that: the next run reads nothing more
    quiet = run(env, "dlt", "pipeline", "app_db", "run", "--table", "missions")
    row = next(line.split() for line in quiet.stdout.splitlines() if line.startswith("raw_app_db.missions"))
    assert row[1] == "0", quiet.stdout


def test_a_failure_leaves_nothing_pending_that_blocks_later_runs(env: dict[str, str], warehouse: Warehouse) -> None:
    """A load the warehouse refuses for a reason no retry fixes (an object depends on what it would drop) is not
    reported as a lost connection, not retried, and does not block the next runs."""
    refuse_large_places(warehouse)
    bump(env, "missions", REFUSED, "id = 3")
    failed = run(env, "dlt", "pipeline", "app_db", "run", expect=1)
    assert "retry" not in failed.stderr and "could not be reached" not in failed.stderr, failed.stderr
    # the source is fixed: the next run loads it, whatever was left of the failed load
    bump(env, "missions", FIXED, "id = 3")
    run(env, "dlt", "pipeline", "app_db", "run")
    # missions keep their history (history: scd2): the current version is the fixed row, once
    current = "SELECT places FROM raw_app_db.missions WHERE id = 3 AND _dlt_valid_to IS NULL"
    assert warehouse.query(current) == [(12,)]


# --- item 4: a source table gone stops that table only -------------------------------------------------------------


def test_a_renamed_source_table_stops_only_that_table(env: dict[str, str], warehouse: Warehouse) -> None:
    source(env, "ALTER TABLE applications RENAME TO candidatures")
    add_events(env, 500)
    bump(env, "missions", "places = places + 1", "id = 5")

    result = run(env, "dlt", "pipeline", "app_db", "run", expect=1)
    assert "applications" in result.stderr and "correct the table's name" in result.stderr, result.stderr
    events_in_step(env, warehouse)  # the other tables loaded
    places = source(env, "SELECT places FROM missions WHERE id = 5")[0][0]
    current = "_dlt_valid_to IS NULL"  # the demo's missions keep their history: the current version
    assert warehouse.query(f"SELECT places FROM raw_app_db.missions WHERE id = 5 AND {current}") == [(places,)]
    assert "raw_app_db.stats_events" in result.stdout, result.stdout  # the summary of what did load

    source(env, "ALTER TABLE candidatures RENAME TO applications")  # reverted (or the declaration corrected)
    run(env, "dlt", "pipeline", "app_db", "run")
    applications = source(env, "SELECT count(*) FROM applications")[0][0]
    assert warehouse.query("SELECT count(*) FROM raw_app_db.applications") == [(applications,)]


def test_a_column_type_change_is_applied_under_views_while_the_other_tables_load(
    env: dict[str, str], warehouse: Warehouse
) -> None:
    """A retyped source column is migrated in the warehouse (SQLMesh's views recreated around it on PostgreSQL) and
    its table reloaded in the same run; the other tables load, the run exits 0, and the next run does not reload."""
    (create,) = source(env, "SELECT sql FROM sqlite_master WHERE name = 'missions'")[0]
    assert "places INTEGER" in create
    source(  # the application turns missions.places into text (SQLite rebuilds the table to change a type)
        env,
        "ALTER TABLE missions RENAME TO old_missions",
        create.replace("places INTEGER", "places TEXT"),
        "INSERT INTO missions SELECT * FROM old_missions",
        "DROP TABLE old_missions",
    )
    bump(env, "missions", "places = 'N/A'", "id = 4")
    add_events(env, 500)

    result = run(env, "dlt", "pipeline", "app_db", "run")
    assert "raw_app_db.missions: column places retyped" in result.stdout, result.stdout
    assert "could not be reached" not in result.stderr and "retry" not in result.stderr, result.stderr
    events_in_step(env, warehouse)  # the other tables loaded
    current = "_dlt_valid_to IS NULL"  # the demo's missions keep their history: the current versions
    assert warehouse.query(f"SELECT places FROM raw_app_db.missions WHERE id = 4 AND {current}") == [("N/A",)]
    in_source = dict(source(env, "SELECT id, places FROM missions WHERE deleted_at IS NULL"))
    loaded = dict(warehouse.query(f"SELECT id, places FROM raw_app_db.missions WHERE {current}"))
    assert loaded == {k: str(v) for k, v in in_source.items()}
    # the next run reads what changed since, without reloading the table again
    add_events(env, 100)
    again = run(env, "dlt", "pipeline", "app_db", "run")
    assert "retyped" not in again.stdout and "left pending" not in again.stdout, again.stdout
    events_in_step(env, warehouse)


@pytest.mark.postgres
def test_an_object_depending_on_a_table_is_not_a_lost_connection(pg_database: str) -> None:
    """PostgreSQL's DependentObjectsStillExist is filed by psycopg2 under InternalError, hence by dlt as transient:
    it is a refusal (SQLSTATE 2BP01), neither retried nor reported as a connection problem."""
    import psycopg2
    from dlt.destinations.exceptions import DatabaseTransientException

    from datamart.errors import is_transient

    conn = psycopg2.connect(pg_database)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE raw (id int)")
            cur.execute("CREATE VIEW reads_raw AS SELECT id FROM raw")
            with pytest.raises(psycopg2.Error) as refused:
                cur.execute("DROP TABLE raw")
        conn.rollback()
    finally:
        conn.close()
    assert refused.value.pgcode == "2BP01"
    try:
        raise DatabaseTransientException(refused.value) from refused.value
    except DatabaseTransientException as wrapped:
        assert not is_transient(wrapped)
    lost = psycopg2.OperationalError("server closed the connection unexpectedly")
    assert is_transient(DatabaseTransientException(lost))
