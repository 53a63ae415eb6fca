"""Faults on a PostgreSQL warehouse: SIGKILL in each phase, the source or the warehouse going away, a failing audit.

One demo source and one warehouse serve the module (built once with ``python -m datamart run``). Each test adds
rows to the source, injects its fault into a real ``dlt pipeline app_db run`` (or ``python -m datamart promote``)
process — triggered from outside, by watching dlt's working directory and ``pg_stat_activity`` — while another
connection keeps querying the published views; then a normal rerun, after which the warehouse equals the source.

Where a phase is too short to hit reliably, the test holds a lock that slows the writer down (a SHARE lock lets the
views be read but makes the loader's COPY, or SQLMesh's DELETE + INSERT, wait): the kill then lands while that
statement is running, observed in ``pg_stat_activity``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from datamart import demo
from datamart.ingest.declarations import load_named
from datamart.settings import PROJECT_ROOT
from datamart.testing.postgres import create_database, drop_database

pytestmark = pytest.mark.slow

DLT = str(Path(sys.executable).parent / "dlt")
VIEWS = ("marts.missions_v1", "marts.organizations_v1", "marts.partner_funnel_daily_v1", "marts.volunteer_activity_v1")
NEW_EVENTS = 300_000  # per fault: enough for each phase of a run to last a moment
BRAKED_EVENTS = 20_000  # per fault held by a lock (the write waits for it whatever its size): no need for more


@dataclass
class Stack:
    """A PostgreSQL source and warehouse, and the environment that points the commands at them."""

    env: dict[str, str]
    admin_url: str
    source_url: str
    warehouse_url: str
    source_db: str
    warehouse_db: str
    work: Path
    logs: list[Path] = field(default_factory=list)

    @property
    def pipeline_dir(self) -> Path:
        """dlt's working directory of app_db (extract and load packages live there)."""
        return self.work / "pipelines" / "postgres" / "app_db"

    def spawn(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a command of the project (``dlt …`` or ``python -m …``) with output to a log file."""
        log = self.work / f"run-{len(self.logs)}.log"
        self.logs.append(log)
        command = [DLT, *args[1:]] if args[0] == "dlt" else [sys.executable, *args]
        return subprocess.Popen(
            command,
            env={**self.env, **(extra or {})},
            cwd=PROJECT_ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, *args: str, expect: int = 0) -> str:
        """Run a command to its end; its output, after checking its exit code."""
        process = self.spawn(*args)
        code = process.wait(timeout=600)
        output = self.logs[-1].read_text()
        assert code == expect, f"{' '.join(args)} exited {code}, expected {expect}:\n{output}"
        return output

    def source(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the source (committed) and return its rows."""
        return _query(self.source_url, statement)

    def warehouse(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the warehouse (committed) and return its rows."""
        return _query(self.warehouse_url, statement)

    def admin(self, statement: str) -> None:
        """Run one statement on the server's ``postgres`` database, outside a transaction."""
        conn = psycopg2.connect(self.admin_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()


def _query(url: str, statement: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The demo world on PostgreSQL, loaded and promoted once: the last good data the faults must not disturb."""
    work = tmp_path_factory.mktemp("faults")
    suffix = uuid.uuid4().hex[:8]
    source_db, warehouse_db = f"t_fault_source_{suffix}", f"t_fault_warehouse_{suffix}"
    source_url = create_database(pg_admin_url, source_db)
    warehouse_url = create_database(pg_admin_url, warehouse_db)
    (work / "project" / ".dlt").mkdir(parents=True)
    (work / "project" / ".dlt" / "config.toml").write_text((PROJECT_ROOT / ".dlt" / "config.toml").read_text())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART_", "DATAMART__", "SQLMESH__"))
    }
    env.update(
        DLT_PROJECT_DIR=str(work / "project"),
        DATAMART_PIPELINES_DIR=str(work / "pipelines"),
        DATAMART_TARGET="postgres",
        DESTINATION__POSTGRES__CREDENTIALS=warehouse_url,
        SOURCES__APP_DB__CREDENTIALS=source_url,
        SOURCES__BUCKET__BUCKET_URL=str(work / "bucket"),
        DATAMART__PII_HMAC_KEY="faults-test-key",
    )
    demo.generate(source_url=source_url, bucket=work / "bucket", scale=1)
    stack = Stack(env, pg_admin_url, source_url, warehouse_url, source_db, warehouse_db, work)
    stack.run("-m", "datamart", "run")
    try:
        yield stack
    finally:
        for name in (source_db, warehouse_db):
            stack.admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
            drop_database(pg_admin_url, name)


# --- what the faults must not change -----------------------------------------------------------------------------

MartsState = dict[str, tuple[int, str]]


def marts_state(cur: Any) -> MartsState:
    """Row count and checksum of every published view, read on ``cur``."""
    state = {}
    for view in VIEWS:
        cur.execute(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {view} t")
        count, checksum = cur.fetchone()
        state[view] = (int(count), str(checksum))
    return state


class MartsReader(threading.Thread):
    """Metabase's stand-in: reads every published view in a loop, on its own connection, during a fault."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        self.before = marts_state(self.conn.cursor())
        self.seen: list[MartsState] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        """Read until stopped; every answer and every error is kept."""
        cur = self.conn.cursor()
        while not self.stop.is_set():
            try:
                self.seen.append(marts_state(cur))
            except psycopg2.Error as exc:
                self.errors.append(str(exc).strip())
            time.sleep(0.05)

    def __enter__(self) -> MartsReader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=30)
        self.conn.close()

    def assert_each_view_served_old_or_new(self, after: MartsState) -> None:
        """Every read answered; each view served its data of before, then its data of ``after``: never nothing,
        never a half-rebuilt view (each model is rebuilt in one transaction)."""
        assert not self.errors, f"a published view did not answer during the fault: {self.errors[:3]}"
        assert len(self.seen) >= 2, "the views were not read during the fault"
        for view in VIEWS:
            states = [s[view] for s in self.seen]
            assert set(states) <= {self.before[view], after[view]}, f"{view} served data of neither version"
            first_new = states.index(after[view]) if after[view] in states else len(states)
            assert all(s == after[view] for s in states[first_new:]), f"{view} went back to its old data"

    def assert_served_last_good_data(self) -> None:
        """Every read during the fault answered, with exactly the data of before."""
        assert not self.errors, f"a published view did not answer during the fault: {self.errors[:3]}"
        assert len(self.seen) >= 2, "the views were not read during the fault"
        changed = [s for s in self.seen if s != self.before]
        assert not changed, f"the published views changed during the fault: {changed[0]} != {self.before}"


# --- the source changes each fault interrupts, and the check that nothing drifted ----------------------------------


def change_source(stack: Stack, events: int = NEW_EVENTS) -> None:
    """New stats events (copies of existing ones under new ids), updated missions, withdrawn applications."""
    (last_id, base), *_ = stack.source("SELECT max(id), count(*) FROM stats_events")
    stack.source(
        f"INSERT INTO stats_events (id, event_type, partner_id, mission_id, occurred_at) "
        f"SELECT {last_id} + g, e.event_type, e.partner_id, e.mission_id, e.occurred_at "
        f"FROM generate_series(1, {events}) g JOIN stats_events e ON e.id = 1 + g % {base}"
    )
    stack.source(
        "UPDATE missions SET places = places + 1, updated_at = (SELECT max(updated_at) FROM missions) "
        "+ interval '1 hour' WHERE id % 7 = 0"
    )
    stack.source("DELETE FROM applications WHERE id IN (SELECT id FROM applications ORDER BY random() LIMIT 5)")


# table -> (columns compared, filter on the source: the rows that must be in the warehouse)
COMPARED = {
    "organizations": ("id, name, kind, updated_at", "deleted_at IS NULL"),
    "missions": ("id, title, places, status, updated_at", "deleted_at IS NULL"),
    "volunteers": ("id, department, updated_at", "TRUE"),
    "applications": ("id, mission_id, volunteer_id, status, updated_at", "TRUE"),
}
EVENT_FIGURES = "count(*), count(DISTINCT id), sum(id), sum(mission_id), min(id), max(id)"


def _plain(value: Any) -> Any:
    """Timestamps as naive UTC datetimes (the source has no time zone, or text in SQLite; dlt loads timestamptz)."""
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] in " T":
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


Query = Callable[[str], list[tuple[Any, ...]]]


def assert_no_drift(stack: Stack) -> None:
    """The warehouse's raw tables equal the source: compared directly (:func:`assert_same_data`), and
    ``dlt pipeline app_db verify`` (keys and checksums per key range) finds no drift either."""
    assert_same_data(stack.source, stack.warehouse)
    verify = stack.spawn("dlt", "pipeline", "app_db", "verify")
    assert verify.wait(timeout=300) == 0, stack.logs[-1].read_text()


def assert_same_data(source_query: Query, warehouse_query: Query) -> None:
    """The warehouse's raw tables equal the source: same keys, same values, no duplicate, nothing lost.

    Compared directly on both databases (the small tables row by row, the events by count, distinct ids and sums).
    """
    problems = []
    for table, (columns, live) in COMPARED.items():
        source = {r[0]: tuple(map(_plain, r)) for r in source_query(f"SELECT {columns} FROM {table} WHERE {live}")}
        # a history table (the demo's missions) mirrors the source by its current versions
        current = load_named("app_db").table(table).current_only
        rows = warehouse_query(f"SELECT {columns} FROM raw_app_db.{table} WHERE {current}")
        warehouse = {r[0]: tuple(map(_plain, r)) for r in rows}
        if len(rows) != len(warehouse):
            problems.append(f"{table}: {len(rows) - len(warehouse)} duplicated keys")
        missing = sorted(source.keys() - warehouse.keys())
        extra = sorted(warehouse.keys() - source.keys())
        changed = sorted(k for k in source.keys() & warehouse.keys() if source[k] != warehouse[k])
        for what, keys in (("missing", missing), ("extra", extra), ("changed", changed)):
            if keys:
                problems.append(f"{table}: {len(keys)} {what} keys, e.g. {keys[:5]}")
    source_events = tuple(source_query(f"SELECT {EVENT_FIGURES} FROM stats_events")[0])
    warehouse_events = tuple(warehouse_query(f"SELECT {EVENT_FIGURES} FROM raw_app_db.stats_events")[0])
    if source_events != warehouse_events:
        problems.append(f"stats_events: source {source_events} != warehouse {warehouse_events} ({EVENT_FIGURES})")
    assert not problems, "drift between source and warehouse:\n" + "\n".join(problems)


def assert_marts_match_source(stack: Stack) -> None:
    """What the published views answer after a promotion is what the source holds."""
    live = stack.source("SELECT count(*) FROM missions WHERE deleted_at IS NULL")[0][0]
    assert stack.warehouse("SELECT count(*) FROM marts.missions_v1")[0][0] == live
    organizations = stack.source("SELECT count(*) FROM organizations WHERE deleted_at IS NULL")[0][0]
    assert stack.warehouse("SELECT count(*) FROM marts.organizations_v1")[0][0] == organizations
    events = stack.source("SELECT count(*) FROM stats_events")[0][0]
    measured = "SELECT sum(impressions + clicks + applications) FROM marts.partner_funnel_daily_v1"
    assert stack.warehouse(measured)[0][0] == events


# --- observing a run from outside ------------------------------------------------------------------------------


def wait_until(what: str, condition: Callable[[], Any], process: subprocess.Popen[str], timeout: float = 120) -> Any:
    """Poll ``condition`` until it is truthy; fail if the process ends first (the phase was never seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the process ended (exit {process.returncode}) before {what} was observed")
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"{what} was not observed within {timeout}s")


def packages(stack: Stack, pattern: str) -> list[Path]:
    """Files or folders of dlt's working directory matching ``pattern`` (relative to the pipeline's folder)."""
    return list(stack.pipeline_dir.glob(pattern))


def extracting(stack: Stack) -> bool:
    """An extract in progress: a package folder under normalize/<extract id>/ holding a job file being written."""
    return any(p.parent.parent.parent.name != "extracted" for p in packages(stack, "normalize/*/*/new_jobs/*"))


# the load's write into raw_app_db.stats_events, held by a brake: a COPY (csv, or ADBC's binary COPY of parquet)
# or, for a keyed append table loaded through dlt's staging, the INSERT … SELECT from staging
LOAD_WRITE = "%stats_events%"


def waiting_statements(url: str, like: str) -> list[tuple[int, str]]:
    """Statements of other sessions waiting for a lock whose text matches ``like``: (pid, query)."""
    return [
        (int(pid), str(query))
        for pid, query in _query(
            url,
            "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
            f"AND wait_event_type = 'Lock' AND query LIKE '{like}'",
        )
    ]


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL: no handler, no clean-up, like the OOM killer or a node going down."""
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def locked(url: str, table: str) -> Any:
    """A connection holding a SHARE lock on ``table``: readers go on, writers wait until it is closed."""
    conn = psycopg2.connect(url)
    conn.cursor().execute(f"LOCK TABLE {table} IN SHARE MODE")
    return conn


# --- the faults --------------------------------------------------------------------------------------------------


# The two faults of the datamart step run first: rebuilding the marts costs what the raw tables hold, and each
# fault of the loads below adds NEW_EVENTS events to them (same checks, on a smaller warehouse).


def _physical_table(stack: Stack, view: str) -> str:
    """The SQLMesh table a prod view reads (``sqlmesh__marts.marts__<model>__<version>``)."""
    definition = stack.warehouse(f"SELECT pg_get_viewdef('{view}'::regclass)")[0][0]
    match = re.search(r"FROM (sqlmesh__marts\.\w+)", definition)
    assert match, definition
    return match.group(1)


@pytest.mark.postgres
def test_sigkill_during_sqlmesh_apply(stack: Stack) -> None:
    change_source(stack, events=20_000)
    stack.run("dlt", "pipeline", "app_db", "run")
    # The raw tables received rows since the last promotion: promote restates the marts, one
    # model after the other, each in its own transaction. Killed in the middle, the marts already rebuilt serve the
    # new data, the others the old; the rerun finishes the job. No view is ever empty or half rebuilt.
    table = _physical_table(stack, "marts.missions_v1")
    with MartsReader(stack.warehouse_url) as reader:
        brake = locked(stack.warehouse_url, table)
        try:
            promote = stack.spawn("-m", "datamart", "promote")
            writing = f"%{table.split('.')[1]}%"
            wait_until(f"SQLMesh writing {table}", lambda: waiting_statements(stack.warehouse_url, writing), promote)
            kill(promote)
        finally:
            brake.close()
        time.sleep(0.3)
    stack.run("-m", "datamart", "promote")
    with psycopg2.connect(stack.warehouse_url) as conn:
        reader.assert_each_view_served_old_or_new(marts_state(conn.cursor()))
    assert_marts_match_source(stack)


@pytest.mark.postgres
def test_failing_audit_keeps_prod(stack: Stack) -> None:
    # An organization of an unknown kind: the accepted_values audit of stg_app_db__organizations fails.
    (new_id, updated), *_ = stack.source("SELECT max(id) + 1, max(updated_at) + interval '1 hour' FROM organizations")
    stack.source(
        "INSERT INTO organizations (id, name, kind, department, created_at, updated_at) "
        f"VALUES ({new_id}, 'Coop du coin', 'cooperative', '75', '{updated}', '{updated}')"
    )
    with MartsReader(stack.warehouse_url) as reader:
        output = stack.run("-m", "datamart", "run", expect=1)
    reader.assert_served_last_good_data()
    assert "stg_app_db__organizations" in output and "accepted_values" in output, output
    assert "prod views were not changed" in output
    stack.source(
        f"UPDATE organizations SET kind = 'association', updated_at = updated_at + interval '1 second' "
        f"WHERE id = {new_id}"
    )
    stack.run("-m", "datamart", "run")
    assert_no_drift(stack)
    assert_marts_match_source(stack)


@pytest.mark.postgres
def test_sigkill_during_extract(stack: Stack) -> None:
    change_source(stack)
    with MartsReader(stack.warehouse_url) as reader:
        run = stack.spawn("dlt", "pipeline", "app_db", "run")
        wait_until("an extract package being written", lambda: extracting(stack), run)
        kill(run)
        time.sleep(0.3)
    reader.assert_served_last_good_data()
    stack.run("dlt", "pipeline", "app_db", "run")
    assert_no_drift(stack)


@pytest.mark.postgres
def test_sigkill_during_normalize(stack: Stack) -> None:
    change_source(stack)
    with MartsReader(stack.warehouse_url) as reader:
        run = stack.spawn("dlt", "pipeline", "app_db", "run")
        wait_until("a package being normalized (load/new)", lambda: packages(stack, "load/new/*"), run)
        kill(run)
        time.sleep(0.3)
    reader.assert_served_last_good_data()
    stack.run("dlt", "pipeline", "app_db", "run")
    assert_no_drift(stack)


@pytest.mark.postgres
def test_sigkill_during_load(stack: Stack) -> None:
    change_source(stack, events=BRAKED_EVENTS)
    with MartsReader(stack.warehouse_url) as reader:
        brake = locked(stack.warehouse_url, "raw_app_db.stats_events")
        try:
            run = stack.spawn("dlt", "pipeline", "app_db", "run")
            wait_until(
                "the load's write into raw_app_db.stats_events",
                lambda: waiting_statements(stack.warehouse_url, LOAD_WRITE),
                run,
            )
            # the merge tables' jobs of the same package went through meanwhile: the package is half loaded
            missions_done = "load/normalized/*/completed_jobs/missions.*"
            wait_until("the missions job of the same package loaded", lambda: packages(stack, missions_done), run)
            kill(run)
        finally:
            brake.close()
        time.sleep(0.3)
    reader.assert_served_last_good_data()
    rerun = stack.run("dlt", "pipeline", "app_db", "run")
    assert "completed a load left pending by an earlier run" in rerun
    assert_no_drift(stack)


@pytest.mark.postgres
def test_source_goes_away_mid_extract(stack: Stack) -> None:
    change_source(stack)
    with MartsReader(stack.warehouse_url) as reader:
        run = stack.spawn("dlt", "pipeline", "app_db", "run", "--retries", "1")
        wait_until("an extract package being written", lambda: extracting(stack), run)
        stack.admin(f"ALTER DATABASE {stack.source_db} WITH ALLOW_CONNECTIONS false")
        try:
            stack.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{stack.source_db}'")
            assert run.wait(timeout=120) == 1
        finally:
            stack.admin(f"ALTER DATABASE {stack.source_db} WITH ALLOW_CONNECTIONS true")
    reader.assert_served_last_good_data()
    output = stack.logs[-1].read_text()
    assert "error: pipeline 'app_db' failed" in output and "could not be reached" in output
    stack.run("dlt", "pipeline", "app_db", "run")
    assert_no_drift(stack)


@pytest.mark.postgres
def test_warehouse_goes_away_mid_load(stack: Stack) -> None:
    change_source(stack, events=BRAKED_EVENTS)
    with MartsReader(stack.warehouse_url) as reader:
        brake = locked(stack.warehouse_url, "raw_app_db.stats_events")
        run = stack.spawn("dlt", "pipeline", "app_db", "run", "--retries", "1")
        try:
            wait_until(
                "the load's write into raw_app_db.stats_events",
                lambda: waiting_statements(stack.warehouse_url, LOAD_WRITE),
                run,
            )
            # the warehouse refuses new connections and the loader's are cut (Metabase's open one stays)
            stack.admin(f"ALTER DATABASE {stack.warehouse_db} WITH ALLOW_CONNECTIONS false")
            keep = (reader.conn.get_backend_pid(), brake.get_backend_pid())
            stack.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{stack.warehouse_db}' AND pid NOT IN {keep}"
            )
            assert run.wait(timeout=120) == 1
        finally:
            brake.close()
            stack.admin(f"ALTER DATABASE {stack.warehouse_db} WITH ALLOW_CONNECTIONS true")
    reader.assert_served_last_good_data()
    output = stack.logs[-1].read_text()
    assert "error: pipeline 'app_db' failed" in output and "could not be reached" in output
    stack.run("dlt", "pipeline", "app_db", "run")
    assert_no_drift(stack)


def test_sigkill_during_load_on_duckdb(tmp_path: Path) -> None:
    """DuckDB (one writer: nothing reads the file while dlt loads): killed while a load job runs, the rerun finishes
    the pending load and the warehouse equals the source."""
    import sqlite3

    import duckdb

    source_file, warehouse_file = tmp_path / "app.sqlite", tmp_path / "warehouse.duckdb"
    demo.generate(source_url=f"sqlite:///{source_file}", bucket=tmp_path / "bucket", scale=0.5)
    (tmp_path / "project" / ".dlt").mkdir(parents=True)
    (tmp_path / "project" / ".dlt" / "config.toml").write_text((PROJECT_ROOT / ".dlt" / "config.toml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART"))}
    env.update(
        DLT_PROJECT_DIR=str(tmp_path / "project"),
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DESTINATION__DUCKDB__CREDENTIALS=str(warehouse_file),
        SOURCES__APP_DB__CREDENTIALS=f"sqlite:///{source_file}",
        DATAMART__PII_HMAC_KEY="faults-test-key",
    )
    stack = Stack(env, "", "", "", "", "", tmp_path)
    stack.run("dlt", "pipeline", "app_db", "run")

    with sqlite3.connect(source_file) as conn:
        last_id, base = conn.execute("SELECT max(id), count(*) FROM stats_events").fetchone()
        conn.execute(
            f"INSERT INTO stats_events WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g "
            f"WHERE n < {NEW_EVENTS // 3}) "
            f"SELECT {last_id} + n, e.event_type, e.partner_id, e.mission_id, e.occurred_at "
            f"FROM g JOIN stats_events e ON e.id = 1 + n % {base}"
        )
        conn.execute("UPDATE missions SET places = places + 1, updated_at = datetime(updated_at, '+400 days')")
    dlt_dir = tmp_path / "pipelines" / "duckdb" / "app_db"
    run = stack.spawn("dlt", "pipeline", "app_db", "run")
    wait_until("a load job running", lambda: list(dlt_dir.glob("load/normalized/*/started_jobs/*")), run)
    kill(run)

    rerun = stack.run("dlt", "pipeline", "app_db", "run")
    assert "completed a load left pending by an earlier run" in rerun

    def source_query(statement: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(source_file) as conn:
            return conn.execute(statement).fetchall()

    def warehouse_query(statement: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(warehouse_file), read_only=True) as conn:
            return conn.execute(statement).fetchall()

    assert_same_data(source_query, warehouse_query)


def test_whole_run_names_the_failed_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m datamart run` stops at the first failed pipeline with the same message as `dlt pipeline … run`."""
    import io
    import socket

    from datamart.flow import RunFailed, run_flow
    from datamart.settings import Warehouse

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", f"postgresql://app:pw@127.0.0.1:{port}/app")
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", "faults-test-key")
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    with pytest.raises(RunFailed) as failed:
        run_flow(warehouse, pipelines_dir=tmp_path / "pipelines", out=io.StringIO())
    message = str(failed.value)
    assert "error: pipeline 'app_db' failed" in message and "could not be reached" in message, message
    assert "The published views were not changed." in message
