"""Run a declared pipeline with dlt and report, per table, what was loaded (counted in the warehouse)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dlt
from dlt.common import logger

from datamart.environments import check_environment
from datamart.errors import is_transient, refused_credentials, root_cause
from datamart.ingest.declarations import VALID_FROM, VALID_TO, PipelineDecl, warehouse_name
from datamart.ingest.deletes import record_replaced_rows, record_soft_deletes
from datamart.ingest.dropped import TablesStopped, dropped_columns
from datamart.ingest.evolution import RetypeRefused, SchemaChange, retype_columns, source_changes
from datamart.ingest.history import refuse_history_on_plain_table
from datamart.ingest.loading import (
    PipelineRun,
    TableLoad,
    TablesFailed,
    _build_each,
    count_rows,
    failed_table,
    finish_or_abort_pending,
    loader_file_format,
    make_pipeline,
)
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.ops import recorded_run
from datamart.ingest.sources import build_deletions, check_secrets, source_credentials
from datamart.settings import Warehouse


@dataclass
class Carried:
    """What the failed attempts of one command already did, so that the attempt that succeeds reports the whole run:
    the loads they completed (a failure after the load — a lost connection while counting, recording or deleting —
    leaves rows the next attempt does not read again) and the row counts before the first attempt."""

    loads: list[str] = field(default_factory=list)
    before: dict[str, int] | None = None


def run_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    pipelines_dir: Path | None = None,
    full_refresh: bool = False,
    wait: float = 0.0,
    record: bool = True,
    carried: Carried | None = None,
) -> PipelineRun:
    """Extract, normalise and load one pipeline; raise if any load job failed.

    ``full_refresh`` reads the selected tables whole again (their incremental state is reset) and replaces their
    contents: see :func:`refresh_mode`.
    The run holds the pipeline's lock (:func:`datamart.ingest.lock.pipeline_lock`: a second run of the same pipeline
    waits up to ``wait`` seconds, then raises ``PipelineLocked``) and is recorded in ``ops.pipeline_runs`` /
    ``ops.pipeline_run_tables`` as running, then succeeded or failed with its error. ``record=False`` does neither
    (a caller that already holds the lock, e.g. the scratch load of ``verify --full-compare``). ``carried``: what
    earlier attempts of the same command loaded (:func:`datamart.ingest.cli.run_with_retries`), counted in this run.
    """
    if not record:
        return _run_pipeline(decl, warehouse, tables, pipelines_dir, full_refresh)
    check_secrets(decl, tables)  # a missing secret stops before anything, even the run record, is written
    done: PipelineRun | None = None
    try:
        with pipeline_lock(warehouse, decl.name, wait=wait):
            check_environment(warehouse)  # inside the lock: on DuckDB the holder of the file may be the other run
            with recorded_run(warehouse, decl.name, decl.dataset, tables, full_refresh) as record_:
                try:
                    run = _run_pipeline(decl, warehouse, tables, pipelines_dir, full_refresh, carried)
                except TablesFailed as failed:
                    if failed.run is not None:
                        record_.succeeded(failed.run)  # the tables that loaded get their rows; the run is failed
                    raise
                record_.succeeded(run)  # the tables loaded; a stopped table gets no row (it was not loaded)
                if run.stopped:
                    raise TablesStopped(run, run.stopped, decl)  # the run is recorded failed, with the reason
                done = run
    except Exception as exc:
        if done is None:
            raise
        # Loaded and recorded; only releasing the lock failed: its connection was cut (a failover, a restart),
        # and the server released the lock with the session. Retrying would report a run that reads nothing.
        logger.warning("%s: the lock's connection was lost at the end of the run (%s)", decl.name, root_cause(exc))
        done.notes.append(f"the connection holding the pipeline's lock was lost ({root_cause(exc)}); the run completed")
    assert done is not None
    return done


def _run_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None,
    pipelines_dir: Path | None,
    full_refresh: bool,
    carried: Carried | None = None,
) -> PipelineRun:
    from datamart.ingest.replication import is_replication, run_replication  # here: it imports this module

    if is_replication(decl):  # logical decoding instead of cursors and key sets
        return run_replication(decl, warehouse, tables, pipelines_dir, full_refresh, reload=_reload)
    started = time.monotonic()
    deletions: dict[str, int] = {}
    held_back: dict[str, list[str]] = {}
    check_secrets(decl, tables)
    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    pipeline.sync_destination()  # a fresh worker continues from the state kept in the warehouse
    names = [t.name for t in (decl.table(n) for n in tables)] if tables else [t.name for t in decl.tables]
    refuse_history_on_plain_table(pipeline, decl, names)
    # Only merge tables need the counts before and the rows each load wrote (to tell inserts from updates): on an
    # append table of 10 million rows each of those counts is a full scan.
    merged = [n for n in names if decl.table(n).write_disposition == "merge"]
    before = {n: 0 for n in names}
    if not full_refresh:  # counted before a pending load is finished: its rows are this run's
        before.update(count_rows(pipeline, merged)[0])
    if carried is not None:  # an earlier attempt of this command counted them before it loaded anything
        carried.before = {**before, **(carried.before or {})}
        before = {n: carried.before[n] for n in names}
    notes: list[str] = []
    # loads this run reports besides its own: completed by earlier attempts, or left pending and finished here
    pending_ids: list[str] = list(carried.loads) if carried is not None else []
    if pipeline.has_pending_data:
        waiting = [*pipeline.list_extracted_load_packages(), *pipeline.list_normalized_load_packages()]
        note, completed = finish_or_abort_pending(pipeline)
        notes.append(note)
        if completed:
            pending_ids += waiting
            if carried is not None:
                carried.loads += waiting
    # a table whose source dropped a column is not loaded (it would be NULL on every changed row): see dropped.py
    stopped = {} if full_refresh else dropped_columns(decl, warehouse, names, pipeline.state)
    if stopped:
        names = [n for n in names if n not in stopped]
        merged = [n for n in merged if n not in stopped]
        tables = names
        if not names:
            _erase_in_unloaded(pipeline, decl, warehouse, list(stopped), loader_file_format(decl, warehouse), notes)
            elapsed = time.monotonic() - started
            return PipelineRun(decl.name, decl.dataset, elapsed, notes=notes, stopped=stopped)
    columns_before = _columns(pipeline, names)
    failed: dict[str, BaseException] = {}  # tables that cannot be read this run: the others still load
    resources = _build_each(decl, names, columns_before, held_back, failed, notes)
    record_soft_deletes(decl, resources, warehouse)  # what dlt's merge removes, for incremental marts
    names = [n for n in names if n not in failed]
    merged = [n for n in merged if n not in failed]
    profile: dict[str, float] = {}
    file_format = loader_file_format(decl, warehouse)
    # a column added or retyped in the source: that table is reloaded whole, first, by a run of its own
    schema = pipeline.default_schema if pipeline.default_schema_name else None
    changes = {} if full_refresh else source_changes(decl, resources, columns_before, schema)
    reloads: list[TableLoad] = []
    if decl.kind == "sql_database" and (full_refresh or changes):  # a whole replace: what it drops, for the marts
        record_replaced_rows(decl, names if full_refresh else list(changes), source_credentials(decl), warehouse)
    if changes:
        by_name = {r.name: r for r in resources}
        for name, change in changes.items():
            reload = _reload(pipeline, decl, change, by_name[name], file_format, profile, carried, failed)
            if reload is not None:  # an unclassified new column of a table with personal data stays held back
                reloads.append(replace(reload, held_back=tuple(held_back.get(name, []))))
        names = [n for n in names if n not in changes]
        merged = [n for n in merged if n not in changes]
        resources = [r for r in resources if r.name not in changes]
    info = None
    while names:
        refresh = refresh_mode(pipeline, decl, resources, names) if full_refresh else None
        try:
            info = pipeline.run(resources, refresh=refresh, loader_file_format=file_format)
            break
        except Exception as exc:
            table = failed_table(exc, decl, names)
            if table is None:
                raise
            # One table could not be extracted (a type change, a key or cursor check): nothing of the run was
            # committed (dlt commits an extract package only whole, with its state). Run again without it.
            failed[table] = exc
            names.remove(table)
            merged = [n for n in merged if n != table]
            resources = _build_each(decl, names, columns_before, held_back, failed, [])  # notes taken once
            record_soft_deletes(decl, resources, warehouse)
    # the keys deleted in the source leave the tables this run does not load too (an erased person's rows); after
    # the rows' load, whose trace the counts below read
    unloaded = [*stopped, *(n for n, e in failed.items() if isinstance(e, RetypeRefused))]
    if info is None:
        _erase_in_unloaded(pipeline, decl, warehouse, unloaded, file_format, notes)
        if not reloads:
            raise TablesFailed(decl.name, failed, None) from next(iter(failed.values()))
        run = PipelineRun(decl.name, decl.dataset, time.monotonic() - started, reloads, notes, stopped, profile)
        if failed:
            raise TablesFailed(decl.name, failed, run) from next(iter(failed.values()))
        return run
    info.raise_on_failed_jobs()
    if carried is not None:  # if this attempt fails from here on, the next one reports these rows
        carried.loads += list(info.loads_ids)
    _add_steps(profile, pipeline)
    normalized = pipeline.last_trace.last_normalize_info
    row_counts = dict(normalized.row_counts) if normalized else {}
    counted = time.monotonic()
    # The rows a finished pending load wrote are counted in the warehouse (its normalize step may have run in a
    # process that is gone): those still carrying its load id. A retried run reports what it loaded, all of it.
    from_pending = count_rows(pipeline, names, pending_ids, names)[1] if pending_ids else {}
    # append tables with a key skip the keys they already hold (sources.keep_loaded_rows): what they received is
    # counted too, in the same scan as their total
    keyed = merged + [n for n in names if decl.table(n).write_disposition == "append" and decl.table(n).primary_key]
    written_in = [n for n in keyed if row_counts.get(warehouse_name(n)) or from_pending.get(n)]
    history = {n for n in names if decl.table(n).history}
    load_ids = [*pending_ids, *info.loads_ids]
    after, written = count_rows(pipeline, names, load_ids, written_in)
    versions = new_versions(pipeline, decl, [n for n in history if n in written], load_ids)
    profile["counts"] = time.monotonic() - counted
    detecting = time.monotonic()
    first_load = {n for n in merged if before[n] == 0}  # nothing loaded before this run: nothing to delete
    deletion_resources = build_deletions(decl, resources, warehouse, deletions, names, skip=first_load, sizes=after)
    profile["key-set deletes"] = time.monotonic() - detecting
    if deletion_resources:
        rows_trace = pipeline.last_trace
        try:
            deleted = pipeline.run(deletion_resources, loader_file_format=file_format)
            _add_steps(profile, pipeline)
        finally:
            _save_whole_trace(pipeline, rows_trace)
        deleted.raise_on_failed_jobs()
    _erase_in_unloaded(pipeline, decl, warehouse, unloaded, file_format, notes)
    columns_after = _columns(pipeline, names)
    # each key found gone was one row of the warehouse (a key is unique there, and we hold the pipeline's lock)
    totals = {n: after[n] - deletions.get(n, 0) for n in names}
    loads = []
    for name in names:
        read = int(row_counts.get(warehouse_name(name), 0)) + from_pending.get(name, 0)
        if name in history:
            split = _split_history(read, before[name], after[name], written.get(name), versions.get(name))
        else:
            split = _split(decl.table(name).write_disposition, read, before[name], after[name], written.get(name))
        loads.append(
            TableLoad(
                table=name,
                rows_loaded=read,
                rows_in_warehouse=totals[name],
                rows_deleted=deletions.get(name, 0),
                new_columns=tuple(
                    c for c in columns_after[name] if columns_before[name] and c not in columns_before[name]
                ),
                held_back=tuple(held_back.get(name, [])),
                **split,
            )
        )
    elapsed = time.monotonic() - started
    run = PipelineRun(
        pipeline=decl.name,
        dataset=decl.dataset,
        elapsed=elapsed,
        tables=reloads + loads,
        profile=profile,
        notes=notes,
        stopped=stopped,
    )
    if failed:
        raise TablesFailed(decl.name, failed, run) from next(iter(failed.values()))
    return run


def _reload(
    pipeline: dlt.Pipeline,
    decl: PipelineDecl,
    change: SchemaChange,
    resource: Any,
    file_format: str | None,
    profile: dict[str, float],
    carried: Carried | None,
    failed: dict[str, BaseException],
) -> TableLoad | None:
    """Apply a source schema change to one table: migrate its retyped columns, then replace its rows with the
    source's through staging, in one transaction (its incremental state restarts from the rows read: the next run
    reads what changed after them). A table that cannot be reloaded goes into ``failed`` (None is returned)."""
    name = change.table
    started = time.monotonic()
    before = count_rows(pipeline, [name])[0][name]
    try:
        if change.retyped:

            def rebuild(scratch: dlt.Pipeline) -> None:  # the source's rows, whole, where no cast exists
                errors: dict[str, BaseException] = {}
                fresh = _build_each(decl, [name], _columns(pipeline, [name]), {}, errors)
                if errors:
                    raise errors[name]
                replace_through_staging(scratch, decl, fresh, [name])
                scratch.run(fresh, loader_file_format=file_format).raise_on_failed_jobs()

            retype_columns(pipeline, name, change, resource, rebuild, history=bool(decl.table(name).history))
        replace_through_staging(pipeline, decl, [resource], [name])
        info = pipeline.run([resource], loader_file_format=file_format)
        info.raise_on_failed_jobs()
    except RetypeRefused as exc:
        if exc.view:  # checked: that view failed to be created over the new type
            hint = (
                f"change the model behind {exc.view} so that it computes on the new type (a new version of a "
                f"published view if Metabase reads it), then rerun `dlt pipeline {decl.name} run`: the column is "
                "migrated and the table reloaded"
            )
        else:
            hint = (
                "convert the past values yourself, in the warehouse: "
                f"`ALTER TABLE {decl.dataset}.{warehouse_name(name)} ALTER COLUMN <column> TYPE <type> USING "
                "<an expression of yours>` (column and type as above), then "
                f"rerun `dlt pipeline {decl.name} run`: the table is then reloaded"
            )
        failed[name] = RetypeRefused(
            f"{exc}; nothing was changed, nothing of that table was loaded", table=name, hint=hint, view=exc.view
        )
        return None
    except Exception as exc:
        if is_transient(exc) or refused_credentials(exc) is not None:
            raise
        if pipeline.has_pending_data:  # its failed package would otherwise be retried before the other tables
            pipeline.abort_packages()
        failed[name] = exc
        return None
    if carried is not None:
        carried.loads += list(info.loads_ids)
    _add_steps(profile, pipeline)
    normalized = pipeline.last_trace.last_normalize_info
    read = int((dict(normalized.row_counts) if normalized else {}).get(warehouse_name(name), 0))
    after = count_rows(pipeline, [name])[0][name]
    seconds = time.monotonic() - started
    return TableLoad(
        table=name,
        rows_loaded=read,
        rows_in_warehouse=after,
        rows_deleted=max(before - after, 0),
        new_columns=tuple(change.added),
        inserted=max(after - before, 0),
        updated=min(before, after),
        change=change.describe(after, seconds),
    )


def _erase_in_unloaded(
    pipeline: dlt.Pipeline,
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str],
    file_format: str | None,
    notes: list[str],
) -> None:
    """Remove from ``tables`` — not loaded by this run: stopped by a gone source column (``dropped.py``), or a retype
    a view refuses — the keys deleted in the source, for those declaring ``deletes: {hard: key_set}``, as a run does
    for the tables it loads: an erased person's rows leave the warehouse at the next run whatever else stops their
    table. Only keys are read and only rows are removed, so what stopped the table (a column that would be NULL,
    a type) is not touched; their incremental state does not move."""
    from datamart.ingest.loading import _build_each

    erased = [n for n in tables if decl.table(n).deletes.get("hard") == "key_set"]
    if not erased:
        return
    failed: dict[str, BaseException] = {}
    resources = _build_each(decl, erased, _columns(pipeline, erased), {}, failed)
    counts: dict[str, int] = {}
    deletions = build_deletions(decl, resources, warehouse, counts, [r.name for r in resources])
    if deletions:
        pipeline.run(deletions, loader_file_format=file_format).raise_on_failed_jobs()
    for name, count in counts.items():
        if count:
            notes.append(f"{decl.dataset}.{name}: not loaded, but the {count:,} key(s) deleted in the source removed")


def refresh_mode(pipeline: dlt.Pipeline, decl: PipelineDecl, resources: list[Any], names: list[str]) -> str | None:
    """How a full refresh replaces the tables ``names``: dlt's refresh mode for ``pipeline.run``, or None when the
    resources were turned into a replace through staging here.

    dlt's ``drop_resources`` drops the tables and creates them again (with the source's types of today); PostgreSQL
    refuses to drop a table that a view reads (``DependentObjectsStillExist``), and SQLMesh's staging views read
    every raw table once the datamart is built. Those views must stay (the published views are built on them), so
    when a view reads one of the tables, the refresh keeps the tables and replaces their contents instead: the
    incremental state of the tables is reset (the source is read whole, as ``drop_data`` would), and the rows are
    loaded with write disposition ``replace`` through the staging dataset — the destination is configured with
    ``replace_strategy="insert-from-staging"`` (see :meth:`Warehouse.dlt_destination`), so the table is emptied
    and refilled in one transaction, after every row is staged: a failed refresh leaves the table as it was, and
    readers see the old rows or the new ones. The column types stay those of the table.

    A history table (``history: scd2``) is never dropped nor replaced: its past versions exist nowhere else. Its
    state is reset and the whole source merged again (a run with one makes the others go through staging too).
    """
    history = any(decl.table(n).history for n in names)
    if not history and not _read_by_views(pipeline, names):
        return "drop_resources"
    replace_through_staging(pipeline, decl, resources, names)
    return None


def replace_through_staging(pipeline: dlt.Pipeline, decl: PipelineDecl, resources: list[Any], names: list[str]) -> None:
    """Make the next run of ``resources`` replace the tables ``names`` whole, through the staging dataset in one
    transaction, keeping the tables (and the views reading them): their incremental state is reset and their write
    disposition set to ``replace`` (see :func:`refresh_mode`). Used by ``--full-refresh`` under views and by the
    reload of a table whose source changed (``datamart/ingest/evolution.py``)."""
    with pipeline.managed_state() as state:
        # the state of a resource lives under its source (the pipeline's name); a file table's cursor lives on its
        # file listing resource (see sources._file_resource)
        kept = state.get("sources", {}).get(decl.name, {}).get("resources", {})
        for name in names:
            kept.pop(name, None)
            kept.pop(f"filesystem_{name}", None)
    for resource in resources:
        table = decl.table(resource.name)
        if table.history:
            # a history table keeps its versions: the whole source is read again (state reset above) and merged as
            # usual, so only the rows that differ from the current versions become new versions
            continue
        resource.apply_hints(write_disposition="replace")
        soft = table.deletes.get("soft")
        if soft:  # merge removes rows carrying the soft-delete marker; a replace must not load them
            _soft_deleted_out(resource, soft)


def _soft_deleted_out(resource: Any, column: str) -> None:
    """Leave out the rows whose soft-delete ``column`` is set (a timestamp) or true (a boolean): arrow tables are
    filtered (and dropped when nothing is left: ADBC refuses an empty parquet file), row dicts are skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def live_rows(item: Any) -> Any:
        if isinstance(item, pa.Table | pa.RecordBatch) and column in item.schema.names:
            marker = item.column(column)
            deleted = marker if pa.types.is_boolean(marker.type) else pc.is_valid(marker)
            return item.filter(pc.invert(pc.fill_null(deleted, False)))
        return item

    def keep(item: Any) -> bool:
        if isinstance(item, pa.Table | pa.RecordBatch):
            return item.num_rows > 0
        return not (isinstance(item, dict) and item.get(column))

    resource.add_map(live_rows)
    resource.add_filter(keep)


def _read_by_views(pipeline: dlt.Pipeline, names: list[str]) -> bool:
    """True when a view of the warehouse reads one of the tables ``names`` (PostgreSQL records it in pg_depend;
    DuckDB binds views by name at query time and lets a table be dropped and created again under them)."""
    if pipeline.destination.destination_name != "postgres":
        return False
    with pipeline.sql_client() as client:
        qualified = [client.make_qualified_table_name(warehouse_name(n)) for n in names]
        placeholders = ", ".join(["%s"] * len(qualified))
        rows = client.execute_sql(
            "SELECT count(*) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
            f"WHERE d.refobjid IN (SELECT to_regclass(q) FROM unnest(ARRAY[{placeholders}]) q) "
            "AND r.ev_class <> d.refobjid",
            *qualified,
        )
    return bool(rows and rows[0][0])


def _save_whole_trace(pipeline: dlt.Pipeline, rows_trace: Any) -> None:
    """Keep one trace for the whole run: the rows' extract/normalize/load, then the deletions' (two dlt runs).

    dlt saves the trace of its last ``run`` only, so ``dlt pipeline <name> trace`` would show the deletion package
    alone; the saved trace gets the steps of both, from the start of the first.
    """
    from dlt.pipeline.trace import save_trace

    deletions_trace = pipeline.last_trace
    if rows_trace is None or deletions_trace is None or deletions_trace is rows_trace:
        return
    whole = deletions_trace._replace(
        started_at=rows_trace.started_at, steps=[*rows_trace.steps, *deletions_trace.steps]
    )
    pipeline._last_trace = whole
    save_trace(pipeline.working_dir, whole)


def _add_steps(profile: dict[str, float], pipeline: dlt.Pipeline) -> None:
    """Add the seconds of the last run's extract, normalize and load steps (dlt's trace) to ``profile``."""
    trace = pipeline.last_trace
    for step in trace.steps if trace else []:
        if step.step in ("extract", "normalize", "load") and step.finished_at and step.started_at:
            seconds = (step.finished_at - step.started_at).total_seconds()
            profile[step.step] = profile.get(step.step, 0.0) + seconds


def _split(disposition: str, read: int, before: int, after: int, written: int | None) -> dict[str, int]:
    """Inserted, updated and soft-deleted rows of one load, from counts taken in the warehouse.

    ``written`` rows carry this load's id. In a merge, untouched rows keep an older id, so the rows this load
    replaced are ``before - (after - written)`` and the new ones ``after - before`` — plus the rows read with their
    soft-delete marker (``read - written``: removed, or never inserted), counted as existing rows that were deleted.
    """
    if disposition != "merge":
        # an append table with a key counted what it received: rows read again (an aborted load) are not inserted
        return {"inserted": read if written is None else written, "updated": 0, "soft_deleted": 0}
    written = written or 0
    soft_deleted = max(read - written, 0)
    # an empty table had nothing to soft-delete: those rows were never inserted
    inserted = after if before == 0 else max(after - before + soft_deleted, 0)
    return {"inserted": inserted, "updated": max(written - inserted, 0), "soft_deleted": soft_deleted}


def _split_history(read: int, before: int, after: int, written: int | None, versions: int | None) -> dict[str, int]:
    """Inserted, updated and soft-deleted keys of one load into a history table, from its current versions.

    ``before``/``after`` count the current versions, ``written`` the current versions this load inserted and
    ``versions`` those of them that replaced a version this load retired (an update): the others are new keys.
    Rows read again unchanged insert nothing; the keys whose current version was retired without a new one were
    read with their soft-delete marker."""
    written, updated = written or 0, versions or 0
    inserted = max(written - updated, 0)
    return {"inserted": inserted, "updated": updated, "soft_deleted": max(before + inserted - after, 0)}


def new_versions(pipeline: dlt.Pipeline, decl: PipelineDecl, tables: list[str], load_ids: list[str]) -> dict[str, int]:
    """Per history table, the current versions written by the loads ``load_ids`` that follow a version of the same
    key retired by those loads (its valid_to is the new version's valid_from): the keys updated."""

    if not tables or not load_ids:
        return {}
    loads = ", ".join(f"'{i}'" for i in load_ids)  # ids dlt generated (epoch seconds): safe to inline
    counts = {}
    with pipeline.sql_client() as client:
        for table in tables:
            qualified = client.make_qualified_table_name(warehouse_name(table))
            key = ", ".join(f'"{warehouse_name(k)}"' for k in decl.table(table).primary_key)
            # A set operation, not a correlated EXISTS: PostgreSQL hashes or sorts both sides whatever its
            # estimates, where EXISTS on a table not yet analysed (a first load) was planned as a nested loop,
            # one scan of the table per loaded row (a 50,000-row first load: more than 4 minutes).
            statement = (
                f"SELECT count(*) FROM (SELECT {key}, {VALID_FROM} AS at FROM {qualified} "
                f"WHERE _dlt_load_id IN ({loads}) AND {VALID_TO} IS NULL "
                f"INTERSECT SELECT {key}, {VALID_TO} FROM {qualified} WHERE {VALID_TO} IS NOT NULL) AS updated"
            )
            with client.execute_query(statement) as cursor:
                counts[table] = int(cursor.fetchone()[0])
    return counts


def _columns(pipeline: dlt.Pipeline, tables: list[str]) -> dict[str, list[str]]:
    """The data columns dlt's schema knows per table (empty before the first load)."""
    if not pipeline.default_schema_name:
        return {t: [] for t in tables}
    schema_tables = pipeline.default_schema.tables
    internal = ("_dlt", "_datamart")  # dlt's columns and our deletion marker
    return {
        t: [c for c in schema_tables.get(warehouse_name(t), {}).get("columns", {}) if not c.startswith(internal)]
        for t in tables
    }


def format_loads(runs: list[PipelineRun]) -> str:
    """The per-table summary: rows loaded and deleted this run, rows now in the warehouse."""
    lines = [f"{'table':<36}{'read':>10}{'inserted':>10}{'updated':>10}{'deleted':>10}{'in warehouse':>14}"]
    for run in runs:
        for t in run.tables:
            deleted = t.rows_deleted + t.soft_deleted
            lines.append(
                f"{run.dataset + '.' + t.table:<36}{t.rows_loaded:>10,}{t.inserted:>10,}{t.updated:>10,}"
                f"{deleted:>10,}{t.rows_in_warehouse:>14,}"
            )
    changes = [
        f"  {run.dataset}.{table.table}: new column(s) {', '.join(table.new_columns)}"
        for run in runs
        for table in run.tables
        if table.new_columns and not table.change
    ]
    changes += [
        f"  {run.dataset}.{table.table}: {table.change}" for run in runs for table in run.tables if table.change
    ]
    changes += [
        f"  {run.dataset}.{table.table}: new column(s) {', '.join(table.held_back)} NOT loaded: the table holds "
        f"personal data; classify them under personal: in pipelines/{run.pipeline}.yaml (keep, hash, drop or year)"
        for run in runs
        for table in run.tables
        if table.held_back
    ]
    changes += [
        f"  {run.dataset}.{table}: NOT LOADED: {why} (it would be NULL on every changed row; see the error)"
        for run in runs
        for table, why in run.stopped.items()
    ]
    if changes:
        lines += ["schema changes:", *changes]
    lines += [f"{run.pipeline}: {note}" for run in runs for note in run.notes]
    seconds = sum(run.elapsed for run in runs)
    lines.append(f"{len(runs)} pipeline(s) in {seconds:.1f}s")
    for run in runs:
        parts = ", ".join(f"{part} {spent:.1f}s" for part, spent in run.profile.items())
        if parts:
            lines.append(f"{run.pipeline} profile: {parts}")
    return "\n".join(lines)
