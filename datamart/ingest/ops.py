"""Run records in the warehouse, schema ``ops``: every pipeline run, its status, error and rows per table.

``ops.pipeline_runs``: one row per run of one pipeline — ``run_id``, ``pipeline``, ``target``, ``dataset``,
``tables`` (the selected tables, comma-separated; empty for all), ``full_refresh``, ``started_at``, ``ended_at``
(UTC, timestamptz), ``status`` (``running``, ``succeeded``, ``failed``), ``error`` (the root cause with secrets
redacted), ``host``, ``pid``.
``ops.pipeline_run_tables``: one row per table a run loaded (every table of a succeeded run; the loaded ones of a
run that stopped a table whose source dropped a column, recorded failed with the reason) — ``run_id``,
``pipeline``, ``dataset``, ``table_name``, ``rows_read``, ``rows_inserted``, ``rows_updated``, ``rows_deleted`` (soft
and hard), ``rows_in_warehouse``, ``ended_at``.
``ops.deleted_rows``: one row per row a hard or soft delete removed from a raw table (and per table it referred
to) — ``dataset``, ``table_name``, ``row_key``, ``referenced_table``, ``referenced_key``, ``deleted_at``: what an
incremental mart recomputes after a deletion (datamart/ingest/deletes.py writes it; a succeeded refresh removes
those older than a week, :func:`prune_deleted_rows`).
``ops.datamart_refreshes``: one row per refresh of the published views (``python -m datamart run|promote|scheduled``)
— ``refresh_id``, ``command``, ``started_at``, ``ended_at``, ``status``, ``models`` (rebuilt or restated), ``error``.
``ops.replication_slots``: one row per run of a replication pipeline (``changes: replication``), the slot measured on
the source at the end of the run, whatever its outcome (see ``datamart/ingest/slots.py``) — ``run_id``,
``pipeline``, ``slot_name``, ``retained_wal_bytes``, ``lag_bytes``, ``max_retained_wal_bytes``, ``restart_lsn``,
``confirmed_flush_lsn``, ``current_lsn``, ``measured_at``.
A succeeded refresh reflects every load that ended before its ``started_at``: the next refresh restates what was
loaded since then, and ``marts.data_freshness_v1`` says for each table whether the marts reflect its last load.

A run is written as ``running`` once the pipeline's lock is taken, then updated to ``succeeded`` or ``failed``. A
process killed meanwhile leaves ``running``: the next run of that pipeline, which holds the lock and therefore
knows the other is gone, marks it ``failed`` with ``interrupted``. The published view ``marts.data_freshness_v1``
(models/marts/) reads these tables; Metabase's role reads the view, never ``ops`` itself.

Tables are created with ``CREATE … IF NOT EXISTS``; other tables of schema ``ops`` are left alone (among them
``ops.published_contract``, the published views' columns at the last good promotion, written by SQLMesh's after_all
hook: datamart/gate/published.py).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from datamart.errors import root_cause
from datamart.redact import redact
from datamart.settings import Warehouse

if TYPE_CHECKING:
    from datamart.ingest.loading import PipelineRun
    from datamart.ingest.slots import SlotStatus

OPS_SCHEMA = "ops"
RUNS_TABLE = "pipeline_runs"
RUN_TABLES_TABLE = "pipeline_run_tables"
INTERRUPTED = "interrupted: the process stopped before recording the end of the run (killed, or its machine lost)"

# name → (SQL type, description): the DDL, the external models for SQLMesh and the docs come from these.
RUNS_COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("TEXT", "Identifier of the run."),
    "pipeline": ("TEXT", "Name of the pipeline (pipelines/<name>.yaml)."),
    "target": ("TEXT", "Warehouse kind: duckdb or postgres."),
    "dataset": ("TEXT", "Warehouse schema the pipeline loads into."),
    "tables": ("TEXT", "Tables selected for the run, comma-separated; empty when every table ran."),
    "full_refresh": ("BOOLEAN", "Whether the tables were dropped and reloaded from scratch."),
    "started_at": ("TIMESTAMPTZ", "When the run started (UTC)."),
    "ended_at": ("TIMESTAMPTZ", "When the run ended (UTC); empty while running."),
    "status": ("TEXT", "running, succeeded or failed."),
    "error": ("TEXT", "Why the run failed (secrets redacted); empty otherwise."),
    "host": ("TEXT", "Machine that ran it."),
    "pid": ("BIGINT", "Process id on that machine."),
}
RUN_TABLES_COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("TEXT", "Identifier of the run (ops.pipeline_runs.run_id)."),
    "pipeline": ("TEXT", "Name of the pipeline."),
    "dataset": ("TEXT", "Warehouse schema of the table."),
    "table_name": ("TEXT", "Table loaded."),
    "rows_read": ("BIGINT", "Rows read from the source by this run."),
    "rows_inserted": ("BIGINT", "New rows written."),
    "rows_updated": ("BIGINT", "Existing rows replaced."),
    "rows_deleted": ("BIGINT", "Rows removed (soft and hard deletes)."),
    "rows_in_warehouse": ("BIGINT", "Rows in the table after the run."),
    "ended_at": ("TIMESTAMPTZ", "When the run ended (UTC)."),
}

SLOTS_TABLE = "replication_slots"
SLOTS_COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("TEXT", "Identifier of the run that measured the slot (ops.pipeline_runs.run_id)."),
    "pipeline": ("TEXT", "Name of the replication pipeline."),
    "slot_name": ("TEXT", "Logical replication slot on the source."),
    "retained_wal_bytes": ("BIGINT", "WAL the source keeps for the slot (bytes, from its restart_lsn)."),
    "lag_bytes": ("BIGINT", "WAL written on the source since the slot's last confirmed position (bytes)."),
    "max_retained_wal_bytes": ("BIGINT", "The pipeline's source.max_retained_wal when measured (bytes)."),
    "restart_lsn": ("TEXT", "The slot's restart_lsn when measured."),
    "confirmed_flush_lsn": ("TEXT", "The slot's confirmed_flush_lsn when measured."),
    "current_lsn": ("TEXT", "The source's pg_current_wal_lsn() when measured."),
    "measured_at": ("TIMESTAMPTZ", "When the slot was measured (UTC, the source's clock)."),
}

REFRESHES_TABLE = "datamart_refreshes"
REFRESHES_COLUMNS: dict[str, tuple[str, str]] = {
    "refresh_id": ("TEXT", "Identifier of the refresh."),
    "command": ("TEXT", "What refreshed the published views: run, promote or scheduled."),
    "started_at": (
        "TIMESTAMPTZ",
        "When the refresh started (UTC): once it succeeded, every load that ended before is in the published views.",
    ),
    "ended_at": ("TIMESTAMPTZ", "When it ended (UTC); empty while running."),
    "status": ("TEXT", "running, succeeded or failed."),
    "models": ("TEXT", "Models rebuilt or restated, comma-separated; empty when nothing had changed."),
    "error": ("TEXT", "Why it failed (secrets redacted); empty otherwise."),
}

DELETED_ROWS_TABLE = "deleted_rows"
DELETED_ROWS_COLUMNS: dict[str, tuple[str, str]] = {
    "dataset": ("TEXT", "Warehouse schema of the table the row was removed from."),
    "table_name": ("TEXT", "Table the row was removed from (by a hard or soft delete)."),
    "row_key": ("TEXT", "Primary key of the removed row, as text (columns joined by | when composite)."),
    "referenced_table": (
        "TEXT",
        "A table of the same pipeline, without personal data, that the row referred to (applications → missions); "
        "empty when the row referred to none.",
    ),
    "referenced_key": ("TEXT", "Key of the row it referred to in that table (the row's <table singular>_id), as text."),
    "deleted_at": ("TIMESTAMPTZ", "When the deletion was found (UTC), just before the load that removed the row."),
}


def _ddl(table: str, columns: dict[str, tuple[str, str]], key: str) -> str:
    body = ", ".join(f"{name} {sql_type}" for name, (sql_type, _) in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {OPS_SCHEMA}.{table} ({body}, PRIMARY KEY ({key}))"


def ensure_ops_tables(warehouse: Warehouse) -> None:
    """Create schema ``ops`` and the run-record tables if missing (idempotent; other ``ops`` tables untouched)."""
    statements = [
        f"CREATE SCHEMA IF NOT EXISTS {OPS_SCHEMA}",
        _ddl(RUNS_TABLE, RUNS_COLUMNS, "run_id"),
        _ddl(RUN_TABLES_TABLE, RUN_TABLES_COLUMNS, "run_id, table_name"),
        _ddl(REFRESHES_TABLE, REFRESHES_COLUMNS, "refresh_id"),
        _ddl(SLOTS_TABLE, SLOTS_COLUMNS, "pipeline, measured_at"),
        # no key: a row deleted, loaded again and deleted again is recorded twice
        f"CREATE TABLE IF NOT EXISTS {OPS_SCHEMA}.{DELETED_ROWS_TABLE} ("
        + ", ".join(f"{name} {sql_type}" for name, (sql_type, _) in DELETED_ROWS_COLUMNS.items())
        + ")",
    ]
    with warehouse.transaction() as cur:
        warehouse.serialise(cur, "datamart.ops.ddl")  # two first runs at once: one creates, the other waits
        for statement in statements:
            cur.execute(statement)


def _now() -> datetime:
    return datetime.now(UTC)


def _execute(warehouse: Warehouse, statement: str, params: tuple[Any, ...]) -> None:
    warehouse.query(statement.replace("?", warehouse.placeholder), params)


@dataclass
class RunRecord:
    """The ``ops.pipeline_runs`` row of one run, updated at its end."""

    warehouse: Warehouse
    run_id: str
    pipeline: str
    started_at: datetime

    def succeeded(self, run: PipelineRun) -> None:
        """Mark the run succeeded and write its rows per table."""
        ended = _now()
        for table in run.tables:
            _execute(
                self.warehouse,
                f"INSERT INTO {OPS_SCHEMA}.{RUN_TABLES_TABLE} (run_id, pipeline, dataset, table_name, rows_read, "
                "rows_inserted, rows_updated, rows_deleted, rows_in_warehouse, ended_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    self.run_id,
                    self.pipeline,
                    run.dataset,
                    table.table,
                    table.rows_loaded,
                    table.inserted,
                    table.updated,
                    table.rows_deleted + table.soft_deleted,
                    table.rows_in_warehouse,
                    ended,
                ),
            )
        self._end("succeeded", None, ended)

    def failed(self, exc: BaseException) -> None:
        """Mark the run failed with its root cause, secrets redacted."""
        self._end("failed", redact(root_cause(exc))[:2000], _now())

    def _end(self, status: str, error: str | None, ended: datetime) -> None:
        _execute(
            self.warehouse,
            f"UPDATE {OPS_SCHEMA}.{RUNS_TABLE} SET status = ?, error = ?, ended_at = ? WHERE run_id = ?",
            (status, error, ended, self.run_id),
        )


def record_slot(warehouse: Warehouse, pipeline: str, status: SlotStatus) -> None:
    """Write one measurement of a replication slot, with the run of ``pipeline`` now ``running`` (the caller holds
    the pipeline's lock, so there is at most one; none outside a recorded run: run_id stays empty)."""
    ensure_ops_tables(warehouse)
    placeholder = warehouse.placeholder
    running = warehouse.query(
        f"SELECT run_id FROM {OPS_SCHEMA}.{RUNS_TABLE} WHERE pipeline = {placeholder} AND status = 'running' "
        "ORDER BY started_at DESC LIMIT 1",
        (pipeline,),
    )
    _execute(
        warehouse,
        f"INSERT INTO {OPS_SCHEMA}.{SLOTS_TABLE} ({', '.join(SLOTS_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            running[0][0] if running else None,
            pipeline,
            status.slot,
            status.retained_wal_bytes,
            status.lag_bytes,
            status.max_retained_wal_bytes,
            status.restart_lsn,
            status.confirmed_flush_lsn,
            status.current_lsn,
            status.measured_at,
        ),
    )


def start_run(
    warehouse: Warehouse, pipeline: str, dataset: str, tables: list[str] | None, full_refresh: bool
) -> RunRecord:
    """Insert the ``running`` row of a run; earlier ``running`` rows of this pipeline are marked interrupted.

    Call it while holding the pipeline's lock: then no other run of the pipeline can be alive.
    """
    ensure_ops_tables(warehouse)
    started = _now()
    _execute(
        warehouse,
        f"UPDATE {OPS_SCHEMA}.{RUNS_TABLE} SET status = 'failed', error = ?, ended_at = ? "
        "WHERE pipeline = ? AND status = 'running'",
        (INTERRUPTED, started, pipeline),
    )
    record = RunRecord(warehouse=warehouse, run_id=uuid.uuid4().hex, pipeline=pipeline, started_at=started)
    _execute(
        warehouse,
        f"INSERT INTO {OPS_SCHEMA}.{RUNS_TABLE} (run_id, pipeline, target, dataset, tables, full_refresh, started_at, "
        "status, host, pid) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            record.run_id,
            pipeline,
            warehouse.target,
            dataset,
            ",".join(tables or []),
            full_refresh,
            started,
            "running",
            socket.gethostname(),
            os.getpid(),
        ),
    )
    return record


@contextmanager
def recorded_run(
    warehouse: Warehouse, pipeline: str, dataset: str, tables: list[str] | None = None, full_refresh: bool = False
) -> Iterator[RunRecord]:
    """Record a run: ``running`` now; ``failed`` with the error if the block raises (the error propagates).

    The block calls :meth:`RunRecord.succeeded` with its result.
    """
    record = start_run(warehouse, pipeline, dataset, tables, full_refresh)
    try:
        yield record
    except BaseException as exc:
        try:
            record.failed(exc)
        except Exception as ops_error:  # noqa: BLE001 - the warehouse may be the thing that failed
            exc.add_note(f"(the failure could not be recorded in {OPS_SCHEMA}.{RUNS_TABLE}: {redact(str(ops_error))})")
        raise


def running_holder(warehouse: Warehouse, pipeline: str) -> dict[str, Any] | None:
    """Host, pid and start of the latest ``running`` run of ``pipeline`` in ``ops``, or None."""
    try:
        if not warehouse.table_exists(OPS_SCHEMA, RUNS_TABLE):
            return None
        placeholder = warehouse.placeholder
        rows = warehouse.query(
            f"SELECT host, pid, started_at FROM {OPS_SCHEMA}.{RUNS_TABLE} WHERE pipeline = {placeholder} "
            "AND status = 'running' ORDER BY started_at DESC LIMIT 1",
            (pipeline,),
        )
    except Exception:  # noqa: BLE001 - DuckDB: the holder may have the file open; the caller has other sources
        return None
    if not rows:
        return None
    host, pid, started = rows[0]
    return {"host": host, "pid": pid, "started_at": started}


def last_runs(warehouse: Warehouse, pipeline: str, limit: int = 5) -> list[tuple[Any, ...]]:
    """The latest runs of ``pipeline``: (status, started_at, ended_at, error), newest first."""
    placeholder = warehouse.placeholder
    return warehouse.query(
        f"SELECT status, started_at, ended_at, error FROM {OPS_SCHEMA}.{RUNS_TABLE} WHERE pipeline = {placeholder} "
        f"ORDER BY started_at DESC LIMIT {int(limit)}",
        (pipeline,),
    )


@dataclass
class RefreshRecord:
    """The ``ops.datamart_refreshes`` row of one refresh of the published views."""

    warehouse: Warehouse
    refresh_id: str
    started_at: datetime
    models: list[str] | None = None  # set by the block: what it rebuilt or restated


def last_refresh(warehouse: Warehouse) -> datetime | None:
    """When the latest succeeded refresh started (what it reflects), or None when none is recorded."""
    if not warehouse.table_exists(OPS_SCHEMA, REFRESHES_TABLE):
        return None
    value = warehouse.query(f"SELECT max(started_at) FROM {OPS_SCHEMA}.{REFRESHES_TABLE} WHERE status = 'succeeded'")
    started = value[0][0] if value else None
    if started is None:
        return None
    return started if started.tzinfo else started.replace(tzinfo=UTC)


@contextmanager
def recorded_refresh(warehouse: Warehouse, command: str) -> Iterator[RefreshRecord]:
    """Record a refresh: ``running`` now, ``succeeded`` with the block's ``models`` or ``failed`` with its error.

    Earlier ``running`` rows (a killed refresh) are marked failed. The start is taken before the block reads what
    changed, so a load that ends while the refresh runs is restated again by the next one (never missed).
    """
    ensure_ops_tables(warehouse)
    started = _now()
    _execute(
        warehouse,
        f"UPDATE {OPS_SCHEMA}.{REFRESHES_TABLE} SET status = 'failed', error = ?, ended_at = ? "
        "WHERE status = 'running'",
        (INTERRUPTED, started),
    )
    record = RefreshRecord(warehouse=warehouse, refresh_id=uuid.uuid4().hex, started_at=started)
    _execute(
        warehouse,
        f"INSERT INTO {OPS_SCHEMA}.{REFRESHES_TABLE} (refresh_id, command, started_at, status) VALUES (?,?,?,?)",
        (record.refresh_id, command, started, "running"),
    )
    try:
        yield record
    except BaseException as exc:
        try:
            _end_refresh(record, "failed", redact(root_cause(exc))[:2000])
        except Exception as ops_error:  # noqa: BLE001 - the warehouse may be the thing that failed
            exc.add_note(
                f"(the failure could not be recorded in {OPS_SCHEMA}.{REFRESHES_TABLE}: {redact(str(ops_error))})"
            )
        raise
    _end_refresh(record, "succeeded", None)


# How long ops.deleted_rows keeps a deletion after a refresh of the incremental marts read it: they re-read one day
# before their interval, the rest is there to look at (what a refresh recomputed, and why).
DELETED_ROWS_RETENTION = timedelta(days=7)


def prune_deleted_rows(warehouse: Warehouse, refreshed_at: datetime) -> None:
    """Remove the deletions recorded more than ``DELETED_ROWS_RETENTION`` before ``refreshed_at``.

    Called once every incremental mart of prod ran past ``refreshed_at`` (datamart/transform.py): what they needed of
    those rows is in their tables, so the table stays as small as a week of deletions instead of growing forever.
    A refresh that fails prunes nothing, so a mart that missed runs still finds every deletion when it catches up.
    """
    if warehouse.table_exists(OPS_SCHEMA, DELETED_ROWS_TABLE):
        before = refreshed_at - DELETED_ROWS_RETENTION
        warehouse.query(
            f"DELETE FROM {OPS_SCHEMA}.{DELETED_ROWS_TABLE} WHERE deleted_at < {warehouse.placeholder}", (before,)
        )


def _end_refresh(record: RefreshRecord, status: str, error: str | None) -> None:
    _execute(
        record.warehouse,
        f"UPDATE {OPS_SCHEMA}.{REFRESHES_TABLE} SET status = ?, error = ?, ended_at = ?, models = ? "
        "WHERE refresh_id = ?",
        (status, error, _now(), ",".join(record.models or []), record.refresh_id),
    )
