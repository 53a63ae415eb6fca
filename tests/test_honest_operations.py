"""Issue 14, items 5-7: what a run and `verify` say is what happened. Each case runs the real commands
(`dlt pipeline <name> run`, `dlt pipeline <name> verify`) as subprocesses, on a DuckDB file and on PostgreSQL.

- A setting that is wrong (a missing source secret, a password the server refuses, a table the source lacks) is
  never retried as a lost connection, and the message says what to set; exit 2 like any other wrong input.
- A CSV file delimited by ';' is reported as such, with the declaration that reads it.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from datamart import demo
from datamart.ingest.declarations import load_declaration, load_named
from datamart.ingest.runner import make_pipeline, run_pipeline
from datamart.ingest.sources import build_resources
from datamart.settings import PROJECT_ROOT, Warehouse
from datamart.testing.commands import DLT, dlt, environment


def command_env(warehouse: Warehouse, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell would have: the warehouse given the dlt way, dlt's dirs in tmp_path."""
    settings = {"DATAMART__PII_HMAC_KEY": "honest-test-key", "DATAMART_PIPELINES_DIR": str(tmp_path / "pipelines")}
    return environment(**{**settings, **warehouse.environment_variables(), **extra})


def pg_url(warehouse: Warehouse, user: str | None = None, password: str | None = None) -> str:
    pg = warehouse.pg
    return f"postgresql://{user or pg.username}:{password or pg.password}@{pg.host}:{pg.port}/{pg.database}"


@pytest.fixture
def demo_source(tmp_path: Path) -> str:
    """The demo application database (SQLite, small) and bucket in tmp_path; the source's URL."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    demo.generate(source_url=url, bucket=tmp_path / "bucket", scale=0.05)
    return url


def _load_the_demo(folder: Path, warehouse: Warehouse) -> None:
    """The demo (scale 0.05) generated in ``folder`` and loaded into ``warehouse`` by `dlt pipeline app_db run`."""
    url = f"sqlite:///{folder / 'app.sqlite'}"
    demo.generate(source_url=url, bucket=folder / "bucket", scale=0.05)
    result = dlt(command_env(warehouse, folder, SOURCES__APP_DB__CREDENTIALS=url), "pipeline", "app_db", "run")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def loaded(request: pytest.FixtureRequest, tmp_path: Path, built_once: Any) -> tuple[Warehouse, str]:
    """A warehouse (DuckDB, then PostgreSQL) the demo source was loaded into, and the source's URL: loaded once for
    the module, copied for this test with dlt's working directory (the first load is not what these tests check)."""
    warehouse = built_once.copy("honest_loaded", _load_the_demo, request, tmp_path)
    return warehouse, f"sqlite:///{tmp_path / 'app.sqlite'}"


# --- settings: never retried, the message says what to set --------------------------------------------------------


def test_a_missing_source_secret_does_not_fall_back_to_the_demo_file(tmp_path: Path) -> None:
    # the committed config.toml's demo default, pointing at a demo database that was never generated
    project = tmp_path / "project"
    (project / ".dlt").mkdir(parents=True)
    missing = f"data/demo-{uuid.uuid4().hex[:8]}/app.sqlite"
    (project / ".dlt" / "config.toml").write_text(f'[sources.app_db]\ncredentials = "sqlite:///{missing}"\n')
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    env = command_env(warehouse, tmp_path, DLT_PROJECT_DIR=str(project))
    result = dlt(env, "pipeline", "app_db", "run", "--retries", "3")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "transient" not in result.stderr and "retry" not in result.stderr
    assert "could not be reached" not in result.stderr
    assert "no connection for its source" in result.stderr
    assert "Set SOURCES__APP_DB__CREDENTIALS=<SQLAlchemy URL>" in result.stderr
    assert "does not exist" in result.stderr  # the demo default it refused, and why
    assert not (PROJECT_ROOT / missing).parent.exists()  # nothing created in its place

    # nor in another environment: a production worker without the secret never reads the demo's file
    made = PROJECT_ROOT / missing
    made.parent.mkdir(parents=True)
    try:
        sqlite3.connect(made).close()
        prod = dlt({**env, "DATAMART_ENV": "prod"}, "pipeline", "app_db", "run")
        assert prod.returncode == 2, prod.stdout + prod.stderr
        assert "is not used with DATAMART_ENV=prod" in prod.stderr
        assert "Set SOURCES__APP_DB__CREDENTIALS=" in prod.stderr
    finally:
        made.unlink(missing_ok=True)
        made.parent.rmdir()


def test_a_table_the_source_lacks_is_not_retried(warehouse: Warehouse, demo_source: str, tmp_path: Path) -> None:
    with sqlite3.connect(demo_source[len("sqlite:///") :]) as conn:
        conn.execute("DROP TABLE stats_events")
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    result = dlt(env, "pipeline", "app_db", "run", "--table", "stats_events", "--retries", "3")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "retry" not in result.stderr and "could not be reached" not in result.stderr
    assert "the source has no table 'stats_events'" in result.stderr
    assert "correct the table's name under tables: in app_db.yaml" in result.stderr


@pytest.fixture
def password_role(pg_admin_url: str) -> tuple[str, str]:
    """A login role whose connections over TCP must give its password (the test server trusts everyone else)."""
    if os.environ.get("DATAMART_TEST_PG_URL"):
        pytest.skip("needs the throwaway server's pg_hba.conf (DATAMART_TEST_PG_URL is an outside server)")
    role, password = f"pw_{uuid.uuid4().hex[:8]}", "the-right-password"
    conn = psycopg2.connect(pg_admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD %s").format(sql.Identifier(role)), (password,))
        cur.execute("SHOW hba_file")
        hba = Path(cur.fetchone()[0])
        rules = hba.read_text()
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{rules}")
        cur.execute("SELECT pg_reload_conf()")
    try:
        yield role, password
    finally:
        hba.write_text(rules)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_reload_conf()")
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
                (role,),
            )
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.close()


@pytest.mark.postgres
def test_a_wrong_source_password_is_not_retried_and_says_what_to_set(
    warehouse: Warehouse, password_role: tuple[str, str], pg_database_factory: object, tmp_path: Path
) -> None:
    role, _ = password_role
    source_db = pg_database_factory("source")  # type: ignore[operator]
    wrong = source_db.replace("postgresql://", "").split("@", 1)[1]
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=f"postgresql://{role}:wrong-pw@{wrong}")
    result = dlt(env, "pipeline", "app_db", "run", "--table", "missions", "--retries", "3")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "retry" not in result.stderr and "could not be reached" not in result.stderr
    assert f'the source refused the connection (password authentication failed for user "{role}")' in result.stderr
    assert "set SOURCES__APP_DB__CREDENTIALS=<SQLAlchemy URL>" in result.stderr
    assert "wrong-pw" not in result.stderr
    status, error = warehouse.query("SELECT status, error FROM ops.pipeline_runs")[0]
    assert status == "failed" and "password authentication failed" in error


@pytest.mark.postgres
def test_a_wrong_warehouse_password_is_not_retried_and_says_what_to_set(
    pg_database_factory: object, password_role: tuple[str, str], demo_source: str, tmp_path: Path
) -> None:
    from datamart.settings import postgres_warehouse

    role, _ = password_role
    warehouse = postgres_warehouse(pg_database_factory("warehouse"))  # type: ignore[operator]
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    env["DESTINATION__POSTGRES__CREDENTIALS"] = pg_url(warehouse, user=role, password="wrong-pw")
    result = dlt(env, "pipeline", "app_db", "run", "--retries", "3")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "retry" not in result.stderr and "could not be reached" not in result.stderr
    assert f'the warehouse refused the connection (password authentication failed for user "{role}")' in (result.stderr)
    assert "set DESTINATION__POSTGRES__CREDENTIALS" in result.stderr
    assert "wrong-pw" not in result.stderr


# --- files ---------------------------------------------------------------------------------------------------------


def test_a_semicolon_csv_is_named_as_such_and_the_declared_delimiter_reads_it(
    warehouse: Warehouse, demo_source: str, tmp_path: Path
) -> None:
    partners = tmp_path / "bucket" / "referentials" / "partners.csv"
    original = partners.read_text(encoding="utf-8")
    partners.write_text(original.replace(",", ";"), encoding="utf-8")  # the demo's names hold no comma
    env = command_env(warehouse, tmp_path, SOURCES__BUCKET__BUCKET_URL=str(tmp_path / "bucket"))
    result = dlt(env, "pipeline", "bucket", "run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "null primary key" not in result.stderr
    assert "file partners.csv: the header reads as 1 column" in result.stderr
    assert "the file is delimited by ';'" in result.stderr
    assert "Declare `delimiter: ';'` under tables.partners in bucket.yaml" in result.stderr
    assert not warehouse.table_exists("raw_bucket", "partners")

    # the declaration it names reads the file (same table, declared with its delimiter)
    declared = tmp_path / "declarations" / "bucket.yaml"
    declared.parent.mkdir()
    declared.write_text(
        (PROJECT_ROOT / "pipelines" / "bucket.yaml")
        .read_text()
        .replace("    format: csv\n", "    format: csv\n    delimiter: ';'\n")
    )
    os.environ["SOURCES__BUCKET__BUCKET_URL"] = str(tmp_path / "bucket")
    try:
        run = run_pipeline(load_declaration(declared), warehouse, tables=["partners"], pipelines_dir=tmp_path / "p")
    finally:
        del os.environ["SOURCES__BUCKET__BUCKET_URL"]
    lines = original.strip().splitlines()
    assert run.tables[0].rows_loaded == len(lines) - 1
    names = [row[0] for row in warehouse.query("SELECT name FROM raw_bucket.partners ORDER BY partner_id")]
    assert names == [line.split(",")[lines[0].split(",").index("name")] for line in lines[1:]]


# --- verify compares with dlt's own state --------------------------------------------------------------------------


def test_rows_lost_below_dlts_cursor_are_drift_not_pending(loaded: tuple[Warehouse, str], tmp_path: Path) -> None:
    warehouse, demo_source = loaded
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    # A restore (or a failover) takes the warehouse's missions back before the last load; dlt's state, which
    # says those rows were loaded, stays: the newest missions are gone and no run will read them again.
    newest = warehouse.query("SELECT max(updated_at) FROM raw_app_db.missions")[0][0]
    lost = sorted(r[0] for r in warehouse.query(f"SELECT id FROM raw_app_db.missions WHERE updated_at = '{newest}'"))
    warehouse.query(f"DELETE FROM raw_app_db.missions WHERE updated_at = '{newest}'")
    # and one change the next run will load: pending, not drift
    with sqlite3.connect(demo_source[len("sqlite:///") :]) as conn:
        conn.execute("UPDATE applications SET status = 'refused', updated_at = '2099-01-01 00:00:00' WHERE id = 3")

    report = dlt(env, "pipeline", "app_db", "verify")
    assert report.returncode == 1, report.stdout + report.stderr
    rows = {line.split()[0]: line.split() for line in report.stdout.splitlines()[2:] if line.split()}
    assert rows["missions"][-1] == "DRIFT" and rows["missions"][4] == "0"  # pending 0
    assert rows["missions"][5] == str(len(lost))  # missing
    assert rows["applications"][4] == "1" and rows["applications"][-1] == "ok"
    assert f"raw_app_db.missions: {len(lost)} key(s) missing from the warehouse, e.g. {lost[0]}" in report.stdout
    assert "dlt's state says rows up to updated_at = " in report.stdout and "never read again" in report.stdout
    assert "fix with `dlt pipeline app_db verify --repair --table missions`" in report.stdout

    # a run indeed does not bring them back; the repair verify names does
    assert dlt(env, "pipeline", "app_db", "run").returncode == 0
    assert dlt(env, "pipeline", "app_db", "verify", "--table", "missions").returncode == 1
    repaired = dlt(env, "pipeline", "app_db", "verify", "--repair", "--table", "missions")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    again = dlt(env, "pipeline", "app_db", "verify")
    assert again.returncode == 0, again.stdout + again.stderr


# --- the counts are those of what was loaded -----------------------------------------------------------------------


def test_rows_of_a_load_finished_by_a_later_attempt_are_counted(
    loaded: tuple[Warehouse, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse, demo_source = loaded
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    demo.advance_day(source_url=demo_source, bucket=tmp_path / "bucket")
    # An attempt extracts and normalises the day's changes, then loses the warehouse before its load: the package
    # waits in dlt's working directory (as after `warehouse goes away mid-load`, or a kill during the load).
    for key in ("SOURCES__APP_DB__CREDENTIALS", "DATAMART__PII_HMAC_KEY", "DATAMART_PIPELINES_DIR"):
        monkeypatch.setenv(key, env[key])
    decl = load_named("app_db")
    pipeline = make_pipeline(decl, warehouse)
    pipeline.sync_destination()
    pipeline.extract(build_resources(decl, ["stats_events", "missions"]))
    pipeline.normalize()
    waiting = pipeline.last_trace.last_normalize_info.row_counts
    assert pipeline.has_pending_data and waiting["stats_events"] > 0

    result = dlt(env, "pipeline", "app_db", "run")  # the next attempt finishes it, then reads what changed since
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed a load left pending" in result.stdout
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("raw_app_db.stats_events"))
    events = f"{waiting['stats_events']:,}"
    assert row[1:3] == [events, events], result.stdout  # read, inserted
    total = warehouse.query("SELECT count(*) FROM raw_app_db.stats_events")[0][0]
    assert row[-1] == f"{total:,}"
    missions = next(line.split() for line in result.stdout.splitlines() if line.startswith("raw_app_db.missions"))
    assert int(missions[1].replace(",", "")) > 0 and missions[2:4] != ["0", "0"], result.stdout
    recorded = dict(
        warehouse.query(
            "SELECT t.table_name, t.rows_read FROM ops.pipeline_run_tables t JOIN ops.pipeline_runs r "
            "ON r.run_id = t.run_id WHERE r.status = 'succeeded' AND t.table_name = 'stats_events' "
            "ORDER BY r.started_at DESC LIMIT 1"
        )
    )
    assert recorded == {"stats_events": waiting["stats_events"]}


# --- a dropped source column ---------------------------------------------------------------------------------------


def test_a_dropped_sql_column_stops_its_table_and_says_so(loaded: tuple[Warehouse, str], tmp_path: Path) -> None:
    warehouse, demo_source = loaded
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    titles = dict(warehouse.query("SELECT id, title FROM raw_app_db.missions"))  # one version per key so far
    with sqlite3.connect(demo_source[len("sqlite:///") :]) as conn:  # the application drops a column ...
        conn.execute("ALTER TABLE missions DROP COLUMN title")
        # ... and its rows keep changing, like the other tables'
        conn.execute("UPDATE missions SET places = places + 1, updated_at = '2099-01-01 00:00:00' WHERE id <= 5")
        conn.execute("UPDATE organizations SET name = 'Renamed', updated_at = '2099-01-01 00:00:00' WHERE id = 1")

    result = dlt(env, "pipeline", "app_db", "run", "--retries", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "retry" not in result.stderr
    assert "table missions: column(s) title no longer in the source table missions" in result.stderr
    assert "dlt pipeline app_db run --table missions --full-refresh" in result.stderr
    assert "raw_app_db.missions: NOT LOADED: column(s) title" in result.stdout
    loaded = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("raw_app_db.")]
    assert "raw_app_db.organizations" in loaded and "raw_app_db.missions" not in loaded
    # the other tables were loaded; the missions keep their titles, none nulled
    assert warehouse.query("SELECT name FROM raw_app_db.organizations WHERE id = 1") == [("Renamed",)]
    assert dict(warehouse.query("SELECT id, title FROM raw_app_db.missions")) == titles
    status, error = warehouse.query("SELECT status, error FROM ops.pipeline_runs ORDER BY started_at DESC LIMIT 1")[0]
    assert status == "failed" and "table missions: column(s) title no longer in the source" in error
    recorded = warehouse.query(
        "SELECT table_name FROM ops.pipeline_run_tables t JOIN ops.pipeline_runs r ON r.run_id = t.run_id "
        "WHERE r.status = 'failed'"
    )
    assert ("organizations",) in recorded and ("missions",) not in recorded

    # the way out it names: the table reloaded as the source now is. The demo's missions keep their history
    # (history: scd2): the versions before the drop keep their titles, the current versions have none, and the
    # next runs load the table again
    accepted = dlt(env, "pipeline", "app_db", "run", "--table", "missions", "--full-refresh")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    current = "_dlt_valid_to IS NULL"
    assert warehouse.query(f"SELECT count(title) FROM raw_app_db.missions WHERE {current}") == [(0,)]
    retired = warehouse.query(f"SELECT id, title FROM raw_app_db.missions WHERE NOT {current} AND title IS NOT NULL")
    assert dict(retired) == titles
    with sqlite3.connect(demo_source[len("sqlite:///") :]) as conn:
        conn.execute("UPDATE missions SET places = places + 1, updated_at = '2099-01-02 00:00:00' WHERE id = 7")
    again = dlt(env, "pipeline", "app_db", "run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "raw_app_db.missions" in again.stdout


def test_a_file_reexported_without_a_column_stops_its_table_and_says_so(
    warehouse: Warehouse, demo_source: str, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    env = command_env(warehouse, tmp_path, SOURCES__BUCKET__BUCKET_URL=str(tmp_path / "bucket"))
    assert dlt(env, "pipeline", "bucket", "run").returncode == 0
    before = warehouse.query("SELECT report_date, partner_id, clicks FROM raw_bucket.partner_reports ORDER BY 1, 2")
    # the partner re-exports the last day without its clicks column (a new modification date: the next run reads it)
    latest = sorted((tmp_path / "bucket" / "exports" / "partner_reports").glob("*.parquet"))[-1]
    pq.write_table(pq.read_table(latest).drop_columns(["clicks"]), latest)
    os.utime(latest, (latest.stat().st_atime, latest.stat().st_mtime + 60))

    result = dlt(env, "pipeline", "bucket", "run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"table partner_reports: column(s) clicks missing from file {latest.name}" in result.stderr
    assert "raw_bucket.partner_reports: NOT LOADED: column(s) clicks" in result.stdout
    after = warehouse.query("SELECT report_date, partner_id, clicks FROM raw_bucket.partner_reports ORDER BY 1, 2")
    assert after == before  # no clicks nulled
    assert warehouse.query("SELECT status FROM ops.pipeline_runs ORDER BY started_at DESC LIMIT 1") == [("failed",)]
    # stopped again until the file is fixed: the file is still to be read (its state did not move)
    assert dlt(env, "pipeline", "bucket", "run").returncode == 1


def add_events(source_url: str, count: int) -> None:
    """``count`` new stats_events rows in the demo source."""
    with sqlite3.connect(source_url[len("sqlite:///") :]) as conn:
        last = conn.execute("SELECT max(id) FROM stats_events").fetchone()[0]
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) INSERT INTO stats_events "
            "SELECT ? + i, 'view', 1, 1, '2099-01-01 00:00:00' FROM n",
            (count, last),
        )


def run_cut_while_waiting(env: dict[str, str], url: str, table: str, statement: str, log: Path) -> str:
    """Run `dlt pipeline app_db run --table stats_events --retries 2` while ``table`` is locked; once a statement
    like ``statement`` waits for it, cut every other connection to the warehouse (a failover, a network cut), then
    let the run go on. Its output, after checking it exited 0."""
    import time

    brake = psycopg2.connect(url)
    brake.cursor().execute(f"LOCK TABLE {table} IN SHARE MODE")
    with log.open("w") as out:
        run = subprocess.Popen(
            [DLT, "pipeline", "app_db", "run", "--table", "stats_events", "--retries", "2"],
            env=env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline, waiting = time.monotonic() + 300, []
            while not waiting and time.monotonic() < deadline and run.poll() is None:
                conn = psycopg2.connect(url)
                with conn, conn.cursor() as cur:
                    cur.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE %s",
                        (statement,),
                    )
                    waiting = cur.fetchall()
                conn.close()
                time.sleep(0.05)
            assert waiting, log.read_text()
            conn = psycopg2.connect(url)
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid NOT IN (pg_backend_pid(), %s)",
                    (brake.get_backend_pid(),),
                )
            conn.close()
        finally:
            brake.close()
        assert run.wait(timeout=300) == 0, log.read_text()
    return log.read_text()


def reported(output: str, warehouse: Warehouse) -> tuple[list[str], list[tuple[int, int]]]:
    """The summary's stats_events row (read, inserted) and the latest succeeded run record's (read, inserted)."""
    row = next(line.split() for line in output.splitlines() if line.startswith("raw_app_db.stats_events"))
    recorded = warehouse.query(
        "SELECT t.rows_read, t.rows_inserted FROM ops.pipeline_run_tables t JOIN ops.pipeline_runs r "
        "ON r.run_id = t.run_id WHERE t.table_name = 'stats_events' AND r.status = 'succeeded' "
        "ORDER BY r.started_at DESC LIMIT 1"
    )
    return row[1:3], recorded


@pytest.mark.postgres
def test_a_run_that_loses_the_warehouse_connections_reports_what_it_loaded(
    pg_database_factory: object, demo_source: str, tmp_path: Path
) -> None:
    from datamart.settings import postgres_warehouse

    warehouse = postgres_warehouse(pg_database_factory("warehouse"))  # type: ignore[operator]
    url = pg_url(warehouse)
    env = command_env(warehouse, tmp_path, SOURCES__APP_DB__CREDENTIALS=demo_source)
    assert dlt(env, "pipeline", "app_db", "run").returncode == 0
    count = 30_000
    expected = [f"{count:,}", f"{count:,}"]

    # cut while the load writes the table (its rows go through the staging dataset since append tables with a key are
    # merged insert-only, so the statement waiting is the insert into the table): dlt retries the job and the load
    # completes; the connection holding the pipeline's lock
    # was cut too (the server released the lock with it), which must not turn the loaded run into a retried one
    add_events(demo_source, count)
    output = run_cut_while_waiting(env, url, "raw_app_db.stats_events", "%stats_events%", tmp_path / "a.log")
    assert reported(output, warehouse) == (expected, [(count, count)]), output
    assert "the connection holding the pipeline's lock was lost" in output

    # cut while the run record is written, after the load: that attempt fails (transient) and the retry reads
    # nothing new, yet the command loaded the rows: the summary and the record of the run say so
    add_events(demo_source, count)
    output = run_cut_while_waiting(
        env, url, "ops.pipeline_run_tables", "INSERT INTO ops.pipeline_run_tables%", tmp_path / "b.log"
    )
    assert "retry 2/2" in output
    assert reported(output, warehouse) == (expected, [(count, count)]), output
    total = warehouse.query("SELECT count(*) FROM raw_app_db.stats_events")[0][0]
    assert total == warehouse.query("SELECT count(DISTINCT id) FROM raw_app_db.stats_events")[0][0]


def test_verify_with_a_lag_window(warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datamart.ingest.verify import verify_pipeline

    source = f"sqlite:///{tmp_path / 'shop.sqlite'}"
    with sqlite3.connect(tmp_path / "shop.sqlite") as conn:
        conn.execute("CREATE TABLE missions (id INTEGER PRIMARY KEY, places INTEGER, updated_at TIMESTAMP)")
        conn.execute("INSERT INTO missions VALUES (1, 5, '2025-01-01 00:00:00'), (2, 6, '2025-01-02 00:00:00')")
    monkeypatch.setenv("SOURCES__SHOP__CREDENTIALS", source)
    path = tmp_path / "shop.yaml"
    path.write_text(
        "name: shop\nsource: {kind: sql_database}\ndataset: raw_shop\ntables:\n"
        "  missions: {write_disposition: merge, primary_key: id, cursor: updated_at, lag: 3600}\n"
    )
    decl = load_declaration(path)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    check = verify_pipeline(decl, warehouse).tables[0]
    assert (check.source_rows, check.pending, check.drift) == (2, 0, False)  # right after a run: all compared
    # a row committed late, inside the lag window: the next run reads it
    with sqlite3.connect(tmp_path / "shop.sqlite") as conn:
        conn.execute("INSERT INTO missions VALUES (3, 7, '2025-01-01 23:30:00')")
    check = verify_pipeline(decl, warehouse).tables[0]
    assert (check.pending, check.drift) == (1, False)
    # a row below the window lost from the warehouse: no run reads it again
    warehouse.query("DELETE FROM raw_shop.missions WHERE id = 1")
    check = verify_pipeline(decl, warehouse).tables[0]
    assert check.drift and check.missing_examples == ["1"]
