"""One declared table compared with its source, by kind (see the package's docstring), and a pipeline's tables
under its lock."""

from __future__ import annotations

import time
from contextlib import nullcontext
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from datamart.ingest.declarations import PipelineDecl, TableDecl
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.personal import DROP, KEEP, YEAR, year_column
from datamart.ingest.verify.compare import compare_sorted
from datamart.ingest.verify.report import DEFAULT_CHUNK, INTERNAL_PREFIXES, TableCheck, VerifyReport
from datamart.ingest.verify.source_side import (
    Plan,
    file_chunks,
    file_records,
    normalize,
    source_columns,
    source_count,
    sql_chunks,
)
from datamart.ingest.verify.values import coerce, value_kind
from datamart.ingest.verify.warehouse_side import (
    last_failure,
    state_cursor,
    stored_schema,
    stored_state,
    table_count,
    warehouse_high_water,
    warehouse_rows,
)
from datamart.settings import Warehouse


def _excluded(table: TableDecl) -> set[str]:
    """Warehouse columns never compared: personal ones (as loaded) and the soft-delete marker."""
    names = set()
    for column, treatment in table.personal.items():
        if treatment != KEEP:
            names |= {normalize(column), normalize(year_column(column))}
    if table.deletes.get("soft"):
        names.add(normalize(table.deletes["soft"]))
    return names


def _reread_from(value: Any, kind: str, lag: float | None) -> Any:
    """The lowest cursor value the next run reads again: dlt's last value minus the table's lag."""
    if value is None or not lag:
        return value
    if kind in ("timestamp", "date"):
        return value - timedelta(seconds=lag)
    if kind in ("int", "float", "decimal"):
        return value - type(value)(lag) if kind != "decimal" else value - Decimal(str(lag))
    return value


def verify_table(
    decl: PipelineDecl, warehouse: Warehouse, table: TableDecl, chunk_size: int = DEFAULT_CHUNK
) -> TableCheck:
    """Compare one declared table with its source (see the module's docstring for what is compared per kind)."""
    name = normalize(table.name)
    types = warehouse.columns(decl.dataset, name)
    refresh = f"dlt pipeline {decl.name} run --table {table.name} --full-refresh"
    if decl.kind == "rest_api":
        count = table_count(warehouse, decl.dataset, name) if types else 0
        return TableCheck(
            table=table.name,
            method="skipped",
            warehouse_rows=count,
            note="REST API: not compared (no keyed, bounded read of an API; comparing would download the whole "
            f"collection and spend its rate limit); use `dlt pipeline {decl.name} verify --full-compare --table "
            f"{table.name}`",
        )
    if decl.kind == "sql_database":
        source_names = {normalize(c): c for c in source_columns(decl, table)}
    else:  # file columns are only known from the files: the warehouse's columns are looked up in each record
        source_names = {c: c for c in types}
    if not types:
        check = TableCheck(
            table=table.name, method="not loaded", warehouse_rows=0, fix=refresh.replace(" --full-refresh", "")
        )
        check.note = "the table is not in the warehouse: it was never loaded"
        if decl.kind == "sql_database":
            check.source_rows = source_count(decl, table)
        else:
            check.source_rows = sum(1 for _ in file_records(decl, table))
        return check
    keys = [normalize(k) for k in table.primary_key]
    excluded = _excluded(table) | set(keys)
    columns = [c for c in types if c in source_names and c not in excluded and not c.startswith(INTERNAL_PREFIXES)]
    cursor = normalize(table.cursor) if table.cursor else None
    if cursor not in types or cursor not in source_names:
        cursor = None  # a file table's cursor is the file's modification date: not a column
    soft = normalize(table.deletes["soft"]) if table.deletes.get("soft") else None
    if soft is not None and soft not in source_names:
        soft = None
    # a history table mirrors the source by its current versions: the retired ones are compared with nothing
    current = table.current_only
    high_water, recorded = None, None
    state = stored_state(warehouse, decl)
    stopped, stopped_hint = _why_not_loaded(decl, warehouse, table, state)
    if cursor and not stopped:
        # Rows beyond the cursor dlt recorded are pending: the next run reads them — unless the runs do not load
        # the table (stopped, or failing): then every row is compared. The warehouse's own highest value is only a
        # stand-in when dlt's state is gone: rows lost from the warehouse (a restore, a failover) below dlt's cursor
        # are never read again, hence drift, not pending.
        recorded = state_cursor(state, decl, table)
        kind = value_kind(types[cursor])
        if recorded is not None:
            high_water = coerce(recorded, kind)
        else:
            high_water = warehouse_high_water(warehouse, decl.dataset, name, cursor, types, current)
    if soft and soft not in types:
        types = {**types, soft: "timestamp"}
    window_from = _reread_from(high_water, value_kind(types[cursor]), table.lag) if cursor and table.lag else None
    plan = Plan(keys, columns, types, source_names, cursor, high_water, soft, window_from)
    missing_columns, held_back = _columns_not_loaded(decl, table, types, source_names, soft)
    retyped = _retyped(decl, warehouse, table)
    if not keys:
        check = _counts_only(decl, warehouse, table, plan, refresh)
        check.missing_columns, check.held_back_columns = missing_columns, held_back
        check.stopped, check.stopped_hint, check.retyped = stopped, stopped_hint, retyped
        return check
    # SQL tables: the repair reloads only the key ranges that differ (datamart/ingest/repair.py); files are read whole
    repair = f"dlt pipeline {decl.name} verify --repair --table {table.name}"
    fix = repair if decl.kind == "sql_database" else refresh
    check = TableCheck(table=table.name, method="keys+checksums", columns=tuple(columns), fix=fix)
    check.missing_columns, check.held_back_columns = missing_columns, held_back
    check.stopped, check.stopped_hint, check.retyped = stopped, stopped_hint, retyped
    chunks = (
        sql_chunks(decl, table, plan, chunk_size)
        if decl.kind == "sql_database"
        else file_chunks(decl, table, plan, chunk_size)
    )
    # replication pipelines apply deletes exactly (datamart/ingest/replication.py): a key kept is drift
    deletions_expected = table.write_disposition == "replace" or table.deletes.get("hard") == "key_set"
    deletions_expected = deletions_expected or decl.options.get("changes") == "replication"
    compare_sorted(
        check,
        chunks,
        warehouse_rows(warehouse, decl.dataset, name, keys, columns, types, current),
        chunk_size,
        deletions_expected,
    )
    if check.kept:
        check.note = f"{check.kept:,} key(s) gone from the source are kept in the warehouse (no hard-delete detection)"
    if check.missing and recorded is not None:
        check.note = (
            f"dlt's state says rows up to {table.cursor} = {_plain(recorded)} were loaded: missing ones are never "
            "read again by a run (lost from the warehouse after a load, e.g. by a restore or a failover)"
        )
    if stopped:  # the way out is the stop's (printed with it): a repair would write what the run refuses to
        check.fix = ""
    elif retyped:
        check.fix = f"dlt pipeline {decl.name} run"
    elif check.extra and not (check.missing or check.changed) and table.deletes.get("hard") == "key_set":
        # keys deleted at the source since the last run: the next run removes them
        check.fix = f"dlt pipeline {decl.name} run --table {table.name}` (then verify again; if it persists: `{fix}"
    return check


def _why_not_loaded(
    decl: PipelineDecl, warehouse: Warehouse, table: TableDecl, state: dict[str, Any] | None
) -> tuple[str, str]:
    """Why runs do not load ``table``, and what to do ('' twice when they do): a source column gone (checked now,
    as a run checks it: ``dropped.py``), or the latest run that selected it failed without loading it (``ops``)."""
    from datamart.ingest.dropped import TablesStopped, dropped_columns

    why = dropped_columns(decl, warehouse, [table.name], state or {}).get(table.name)
    if why:
        hint = TablesStopped(None, {table.name: why}, decl).hint.removesuffix(". The other tables were loaded")
        return f"its loads are stopped: {why}", hint  # the hint a run prints, less what only a run can say
    failure = last_failure(warehouse, decl, table)
    if failure:
        hint = f"run `dlt pipeline {decl.name} run`: its message names the cause and the way out; then verify again"
        return f"its loads fail: {failure}", hint
    return "", ""


def _retyped(decl: PipelineDecl, warehouse: Warehouse, table: TableDecl) -> list[tuple[str, str, str]]:
    """The columns whose type in the source (as dlt maps it) differs from the type they were loaded with (dlt's
    schema kept in the warehouse): found as a run finds them (``evolution.source_changes``), SQL tables only."""
    from datamart.ingest.evolution import INTERNAL_PREFIXES as INTERNAL
    from datamart.ingest.evolution import source_changes
    from datamart.ingest.loading import _build_each

    if decl.kind != "sql_database":
        return []
    schema = stored_schema(warehouse, decl)
    if schema is None:
        return []
    loaded = schema.tables.get(normalize(table.name), {}).get("columns", {})
    known = {table.name: [c for c in loaded if not c.startswith(INTERNAL)]}
    failed: dict[str, BaseException] = {}
    resources = _build_each(decl, [table.name], known, {}, failed)
    change = source_changes(decl, resources, known, schema).get(table.name)
    return list(change.retyped) if change else []


def _columns_not_loaded(
    decl: PipelineDecl, table: TableDecl, types: dict[str, str], source_names: dict[str, str], soft: str | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Source columns the warehouse table lacks (SQL sources): those never loaded, and those a run holds back on
    purpose (an unclassified column of a table with personal data). Dropped and coarsened personal columns are
    absent by design; a variant table (``data_type: evolve``, minimal reflection) creates a column from its first
    non-null value only, so it is not checked."""
    if decl.kind != "sql_database" or table.schema_contract.get("data_type") == "evolve":
        return (), ()
    missing, held_back = [], []
    for name, original in source_names.items():
        absent_by_design = table.personal.get(original) in (DROP, YEAR)
        if name in types or name == soft or absent_by_design or name.startswith(INTERNAL_PREFIXES):
            continue
        (held_back if table.personal and original not in table.personal else missing).append(original)
    return tuple(missing), tuple(held_back)


def _plain(value: Any) -> str:
    return value.isoformat(sep=" ") if isinstance(value, datetime) else str(value)


def _counts_only(decl: PipelineDecl, warehouse: Warehouse, table: TableDecl, plan: Plan, fix: str) -> TableCheck:
    """Tables without a primary key: rows up to the warehouse's cursor high-water mark, counted on both sides."""
    check = TableCheck(table=table.name, method="counts", fix=fix, note="no primary key: row counts only")
    check.warehouse_rows = table_count(warehouse, decl.dataset, normalize(table.name))
    if decl.kind != "sql_database":
        check.source_rows = sum(1 for _ in file_records(decl, table))
        return check
    if plan.cursor and plan.high_water is not None:
        column = plan.source_names[plan.cursor]
        check.source_rows = source_count(decl, table, lambda t: t.c[column] <= plan.high_water)
        check.pending = source_count(decl, table, lambda t: t.c[column] > plan.high_water)
    else:
        check.source_rows = source_count(decl, table)
    return check


def verify_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    wait: float = 0.0,
    lock: bool = True,
) -> VerifyReport:
    """Compare every declared table (or ``tables``) of ``decl`` with its source; ``.drift`` tells, ``.format()`` shows.

    Holds the pipeline's lock while comparing (waiting up to ``wait`` seconds; ``lock=False`` when the caller holds
    it). Raises ``PipelineLocked`` when a run holds it, and the source's or warehouse's error when unreachable.
    """
    started = time.monotonic()
    selected = [decl.table(t) for t in tables] if tables else list(decl.tables)
    report = VerifyReport(pipeline=decl.name, dataset=decl.dataset, warehouse=warehouse.describe())
    with pipeline_lock(warehouse, decl.name, wait=wait) if lock else nullcontext():
        for table in selected:
            report.tables.append(verify_table(decl, warehouse, table, chunk_size))
    report.elapsed = time.monotonic() - started
    return report
