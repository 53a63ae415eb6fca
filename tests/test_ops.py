"""Run records in schema ops and the per-pipeline lock, on DuckDB and PostgreSQL, with real processes.

A lock holder is a separate Python process (it takes the lock and records itself as running, as a run does), so
a refusal, a bounded wait and a SIGKILL are real. Two real `dlt pipeline run` processes started together load
one after the other and no row is loaded twice.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamart.ingest.declarations import load_named
from datamart.ingest.lock import PipelineLocked, pipeline_lock
from datamart.ingest.ops import INTERRUPTED
from datamart.ingest.runner import run_pipeline
from datamart.settings import PROJECT_ROOT, Warehouse
from datamart.testing.commands import demo_settings, environment, set_environment, sqlite_path

DLT = str(Path(sys.executable).parent / "dlt")
HOLDER = """
import sys, time
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.ops import start_run
from datamart.settings import Warehouse, postgres_warehouse
from pathlib import Path
target, where = sys.argv[1], sys.argv[2]
warehouse = postgres_warehouse(where) if target == "postgres" else Warehouse(target="duckdb", duckdb_path=Path(where))
with pipeline_lock(warehouse, "app_db"):
    start_run(warehouse, "app_db", "raw_app_db", None, False)
    print("locked", flush=True)
    time.sleep(600)
"""


def _url(warehouse: Warehouse) -> str:
    if warehouse.target == "duckdb":
        return str(warehouse.duckdb_path)
    pg = warehouse.pg
    return f"postgresql://{pg.username}:{pg.password}@{pg.host}:{pg.port}/{pg.database}"


@pytest.fixture
def env(warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A small demo source wired as app_db, in this process (monkeypatch) and for subprocesses (returned)."""
    values = demo_settings(tmp_path, "ops-test-key", warehouse, scale=0.05)
    set_environment(monkeypatch, values)
    return environment(("DESTINATION__", "SOURCES__"), **values)


def _holder(warehouse: Warehouse) -> subprocess.Popen[str]:
    """A process holding app_db's lock, recorded as running in ops; returns once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, warehouse.target, _url(warehouse)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def _source_ids(env: dict[str, str], table: str) -> list[int]:
    with sqlite3.connect(sqlite_path(env["SOURCES__APP_DB__CREDENTIALS"])) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def test_every_run_is_recorded_with_rows_per_table_and_failures_with_their_error(
    warehouse: Warehouse, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decl = load_named("app_db")
    run = run_pipeline(decl, warehouse, tables=["missions", "stats_events"], pipelines_dir=tmp_path / "pipelines")
    runs = warehouse.query("SELECT pipeline, target, dataset, tables, status, error, host, pid FROM ops.pipeline_runs")
    assert runs == [
        ("app_db", warehouse.target, "raw_app_db", "missions,stats_events", "succeeded", None, socket.gethostname(),
         os.getpid()),
    ]  # fmt: skip
    started, ended = warehouse.query("SELECT started_at, ended_at FROM ops.pipeline_runs")[0]
    assert started <= ended
    tables = warehouse.query(
        "SELECT table_name, rows_read, rows_inserted, rows_updated, rows_deleted, rows_in_warehouse "
        "FROM ops.pipeline_run_tables ORDER BY table_name"
    )
    expected = sorted(
        (t.table, t.rows_loaded, t.inserted, t.updated, t.rows_deleted + t.soft_deleted, t.rows_in_warehouse)
        for t in run.tables
    )
    assert tables == expected
    events = len(_source_ids(env, "stats_events"))
    assert ("stats_events", events, events, 0, 0, events) in tables

    # A failed run: recorded as failed, with the root cause and without the password of the source.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", f"postgresql://app:src-Pw-4471@127.0.0.1:{port}/app")
    with pytest.raises(Exception, match="Connection refused|could not connect"):
        run_pipeline(decl, warehouse, tables=["missions"], pipelines_dir=tmp_path / "pipelines")
    failed = warehouse.query("SELECT status, error, ended_at FROM ops.pipeline_runs WHERE status <> 'succeeded'")
    assert len(failed) == 1 and failed[0][0] == "failed" and failed[0][2] is not None
    assert "OperationalError" in failed[0][1] and "src-Pw-4471" not in failed[0][1]
    assert warehouse.query("SELECT count(*) FROM ops.pipeline_run_tables") == [(2,)]  # none for the failed run


def test_a_second_run_refuses_or_waits_and_a_killed_holder_frees_the_lock(
    warehouse: Warehouse, env: dict[str, str], tmp_path: Path
) -> None:
    decl = load_named("app_db")
    holder = _holder(warehouse)
    try:
        # In this process: refused at once, naming who holds the lock.
        with pytest.raises(PipelineLocked) as refused:
            run_pipeline(decl, warehouse, tables=["stats_events"], pipelines_dir=tmp_path / "pipelines")
        message = str(refused.value)
        assert (
            f"pipeline 'app_db' is already running (host {socket.gethostname()}, pid {holder.pid}, started " in message
        )
        assert "--wait" in message
        # From the CLI: exit 3 with the same message; with --wait 1, after waiting.
        cli = subprocess.run(
            [DLT, "pipeline", "app_db", "run", "--wait", "1"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        assert cli.returncode == 3, cli.stderr
        assert f"pid {holder.pid}" in cli.stderr and "after waiting 1s" in cli.stderr
        assert not warehouse.table_exists("raw_app_db", "stats_events")  # nothing was loaded

        # A run waiting for the lock starts as soon as the holder dies, even killed with SIGKILL.
        waiting = subprocess.Popen(
            [DLT, "pipeline", "app_db", "run", "--table", "stats_events", "--wait", "120"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert waiting.poll() is None, "the second run must wait while the lock is held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    ids = warehouse.query("SELECT id FROM raw_app_db.stats_events ORDER BY id")
    assert [i for (i,) in ids] == _source_ids(env, "stats_events")  # each row once
    # The killed holder's run is marked interrupted by the run that took the lock after it.
    statuses = warehouse.query("SELECT status, error FROM ops.pipeline_runs ORDER BY started_at")
    assert statuses == [("failed", INTERRUPTED), ("succeeded", None)]
    with pipeline_lock(warehouse, "app_db"):  # free again
        pass


def test_two_runs_started_together_load_one_after_the_other_and_nothing_twice(
    warehouse: Warehouse, env: dict[str, str]
) -> None:
    command = [DLT, "pipeline", "app_db", "run", "--table", "stats_events", "--table", "missions", "--wait", "300"]
    runs = [
        subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.communicate(timeout=300), run.returncode) for run in runs]
    assert [code for _, code in results] == [0, 0], [err for (_, err), _ in results]
    assert [i for (i,) in warehouse.query("SELECT id FROM raw_app_db.stats_events ORDER BY id")] == _source_ids(
        env, "stats_events"
    )
    intervals = warehouse.query("SELECT started_at, ended_at, status FROM ops.pipeline_runs ORDER BY started_at")
    assert [status for _, _, status in intervals] == ["succeeded", "succeeded"]
    assert intervals[0][1] <= intervals[1][0], "the two runs overlapped: the lock did not serialise them"
    loaded = warehouse.query(
        "SELECT r.started_at, t.rows_read FROM ops.pipeline_run_tables t JOIN ops.pipeline_runs r "
        "ON r.run_id = t.run_id WHERE t.table_name = 'stats_events' ORDER BY r.started_at"
    )
    assert [rows for _, rows in loaded] == [len(_source_ids(env, "stats_events")), 0]  # the second read nothing new
