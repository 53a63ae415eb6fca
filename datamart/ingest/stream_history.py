"""History tables (``history: scd2``) in replication mode: every version the change stream carries, with the same
columns as cursor mode (``_dlt_valid_from``, ``_dlt_valid_to``, ``_datamart_row_version``: ``history.py``), so the
same models read them.

What a version is: the state of a key after each committed transaction that changed it. Its ``_dlt_valid_from`` is
that transaction's commit time on the source (pgoutput's Begin message carries it), its ``_dlt_valid_to`` the commit
time of the next transaction that changed or deleted the key (null: the current version). Several changes of one
key inside one transaction make one version, the transaction's last: the states in between were never visible to
any reader of the source, and would all share one commit time (a zero-length validity). An update that leaves every
value as it was (same row hash) makes no version, as dlt's scd2 inserts none for an unchanged row in cursor mode.

Why not dlt's own ``scd2`` merge for the stream (it is used for the copy, below): it takes one version per key per
load and dates every version it inserts and retires with one boundary timestamp per load. A batch holds several
transactions per key (two updates of a row between runs), so feeding it would mean collapsing them (losing the
versions the stream holds, the point of this mode) or one load per version of the busiest key, each dated by the
load instead of by its commit. Instead each run writes exact versions through dlt's ``merge`` (``delete-insert``,
keyed by the declared key and ``_dlt_valid_from``), in the same load as the other tables: the key's current
version in the warehouse is written again with its ``_dlt_valid_to`` set (retired), and the batch's versions are
written with their validity. Replaying a batch (a run killed before the slot moved) writes the same rows again:
changes committed before the current version's ``_dlt_valid_from`` are already in the warehouse and are skipped.

The copy (first run, or a table copied whole again) goes through dlt's ``scd2``, dated as dlt dates it: by the
creation of the load package, before the copy reads the source. Every copied row is a version valid from then, a key
the copy no longer has is retired then, and an unchanged row keeps its current version (a history is never
replaced). A change the stream replays from before that time is in the copy already (skipped, by the rule above);
one committed while the copy ran may be in it too: written again as a version, it is skipped when its values equal
the copy's (same hash). The comparison mixes the warehouse host's clock (the copy) with the source's (commits): keep
both synchronised (NTP). A source column added or retyped reloads the table as cursor mode does (``runner._reload``,
dlt's ``scd2`` keyed by the declared key): the rows that differ become versions dated by that load.

A truncate retires every current version (dlt's ``scd2`` over the rows inserted after it, dated by the load; a
truncate with no row inserted after it in the batch gives dlt no rows, and retires nothing).
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import dlt
import pyarrow as pa

from datamart.ingest.declarations import VALID_FROM, VALID_TO, PipelineDecl, TableDecl, warehouse_name
from datamart.ingest.history import ROW_VERSION, add_row_version, history_disposition
from datamart.ingest.pgoutput import UNCHANGED
from datamart.settings import quote_identifier

if TYPE_CHECKING:
    from datamart.ingest.replication import Batch
    from datamart.settings import Warehouse

#: PostgreSQL's epoch: pgoutput's timestamps are microseconds since then.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_KEYS_PER_QUERY = 5000
#: dlt's own columns, rewritten by each load: never read back from the warehouse into a version
_DLT_COLUMNS = ("_dlt_load_id", "_dlt_id")

Key = tuple[Any, ...]
#: one version of a key in a batch: (commit time, transaction id, "upsert" | "delete", row)
Entry = tuple[datetime, int, str, dict[str, Any]]


def commit_time(message: bytes) -> datetime:
    """The commit time of a pgoutput Begin message (``B``, final LSN, commit timestamp, xid)."""
    (micros,) = struct.unpack_from("!q", message, 9)
    return _PG_EPOCH + timedelta(microseconds=micros)


def note_versions(
    versions: dict[Key, list[Entry]],
    keys: list[Key],
    last: dict[Key, tuple[str, dict[str, Any]]],
    committed: datetime,
    xid: int,
) -> None:
    """Record, for each key a change touched, the key's state after it (``last``, folded by ``replication._apply``)
    as the version of transaction ``xid``: a later change of the key in the same transaction replaces it."""
    for key in keys:
        kind, row = last[key]
        entries = versions.setdefault(key, [])
        entry = (committed, xid, kind, dict(row))
        if entries and entries[-1][1] == xid:
            entries[-1] = entry
        else:
            entries.append(entry)


def copy_hints(resource: Any, table: TableDecl) -> None:
    """Load a copy of a history table through dlt's ``scd2`` (see the module's docstring): no merge key, so a key
    the copy lacks is retired."""
    resource.apply_hints(write_disposition=history_disposition(table, None), merge_key=[])
    add_row_version(resource)


def history_resources(pipeline: dlt.Pipeline, decl: PipelineDecl, batch: Batch) -> tuple[list[Any], dict[str, int]]:
    """One resource per history table with changes (its retired and new versions), and per table the keys whose
    current version a deletion retired (for the summary)."""
    from datamart.ingest.stream_rows import _arrow

    resources: list[Any] = []
    deleted: dict[str, int] = {}
    for table in decl.tables:
        if not table.history:
            continue
        last = batch.changes.get(table.name, {})
        if table.name in batch.truncated:
            resources.append(_after_truncate(pipeline, table, last))
            deleted[table.name] = 0
            continue
        versions = batch.versions.get(table.name, {})
        if not last or not versions:  # no change, or dropped by the run (a reloaded or stopped table)
            continue
        current = _current_versions(pipeline, table, list(versions))
        rows, gone = _version_rows(pipeline, table, versions, current)
        deleted[table.name] = gone
        if not rows:
            continue
        columns: dict[str, Any] = {
            k: {"name": k, "nullable": False, "primary_key": True, "merge_key": False} for k in table.primary_key
        }
        columns[VALID_FROM] = {"name": VALID_FROM, "data_type": "timestamp", "nullable": False, "primary_key": True}
        columns[VALID_TO] = {"name": VALID_TO, "data_type": "timestamp", "nullable": True}
        # not dlt's row version here: only its scd2 reads one (it warns otherwise); the copy's scd2 sets it again
        columns[ROW_VERSION] = {"name": ROW_VERSION, "data_type": "bigint", "nullable": True, "x-row-version": False}
        resources.append(
            dlt.resource(
                [_arrow(pipeline, table, rows)],
                name=table.name,
                write_disposition={"disposition": "merge", "strategy": "delete-insert"},
                primary_key=[*table.primary_key, VALID_FROM],
                columns=columns,
            )
        )
    return resources, deleted


def _version_rows(
    pipeline: dlt.Pipeline, table: TableDecl, versions: dict[Key, list[Entry]], current: dict[Key, dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The rows to write for ``versions``: per key, its current version retired when the batch changed it, and the
    batch's versions with their validity (see the module's docstring); and the number of keys deleted."""
    hashes = _hashes(pipeline, table, versions, current)
    rows: list[dict[str, Any]] = []
    gone = 0
    for key, entries in versions.items():
        now = current.get(key)
        if now is not None:  # already applied: what a replayed batch holds from before the current version
            entries = [e for e in entries if e[0] > now[VALID_FROM]]
        previous = dict(now) if now is not None else None
        retire = previous  # written again only if the batch retires it
        for committed, _, kind, row in entries:
            if kind == "upsert" and previous is not None and hashes[id(row)] == previous[ROW_VERSION]:
                continue  # the same values: no new version
            if previous is not None:
                previous[VALID_TO] = committed
                if previous is retire:
                    rows.append(previous)
                    retire = None
                    if kind == "delete":
                        gone += 1
            if kind == "delete":
                previous = None
                continue
            previous = {**row, VALID_FROM: committed, VALID_TO: None, ROW_VERSION: hashes[id(row)]}
            rows.append(previous)
    return rows, gone


def _hashes(
    pipeline: dlt.Pipeline, table: TableDecl, versions: dict[Key, list[Entry]], current: dict[Key, dict[str, Any]]
) -> dict[int, int]:
    """Each upserted row's ``ROW_VERSION`` (by ``id(row)``), computed as the copy computes it (``history.py``: dlt's
    row hash of an arrow table of the row's columns); a TOASTed value the change did not send taken first from the
    version before it (``replication._apply`` did so within the batch) or from the warehouse's current version."""
    from dlt.sources.helpers.transform import add_row_hash_to_table

    from datamart.ingest.stream_rows import _arrow

    upserts = []
    for key, entries in versions.items():
        known = current.get(key, {})
        for _, _, kind, row in entries:
            if kind != "upsert":
                continue
            for column, value in row.items():
                if value is UNCHANGED:
                    row[column] = known.get(warehouse_name(column))
            upserts.append(row)
    if not upserts:
        return {}
    hashed = add_row_hash_to_table(ROW_VERSION)(_arrow(pipeline, table, upserts))
    return {id(row): h for row, h in zip(upserts, hashed.column(ROW_VERSION).to_pylist(), strict=True)}


def _current_versions(pipeline: dlt.Pipeline, table: TableDecl, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    """The warehouse's current version of each of ``keys`` that has one: every column but dlt's load columns."""
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    found: dict[Key, dict[str, Any]] = {}
    if not keys or not pipeline.default_schema_name:
        return found
    known = pipeline.default_schema.tables.get(warehouse_name(table.name), {}).get("columns", {})
    columns = [c for c in known if c not in _DLT_COLUMNS]
    key_columns = [warehouse_name(k) for k in table.primary_key]
    names = ", ".join(quote_identifier(c) for c in key_columns)
    match = " AND ".join(f"t.{quote_identifier(c)} = k.{quote_identifier(c)}" for c in key_columns)
    one = "(" + ", ".join(["%s"] * len(key_columns)) + ")"
    selected = ", ".join(f"t.{quote_identifier(c)}" for c in columns)
    with pipeline.sql_client() as client:
        qualified = client.make_qualified_table_name(warehouse_name(table.name))
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            statement = (
                f"SELECT {selected} FROM {qualified} AS t JOIN (VALUES {', '.join([one] * len(chunk))}) "
                f"AS k({names}) ON {match} WHERE t.{quote_identifier(VALID_TO)} IS NULL"
            )
            try:
                rows = client.execute_sql(statement, *[v for key in chunk for v in key]) or []
            except DatabaseUndefinedRelation:
                return found
            for row in rows:
                values = dict(zip(columns, row, strict=True))
                if isinstance(values.get(VALID_FROM), datetime) and values[VALID_FROM].tzinfo is None:
                    values[VALID_FROM] = values[VALID_FROM].replace(tzinfo=UTC)
                found[tuple(values[k] for k in key_columns)] = values
    return found


def _after_truncate(pipeline: dlt.Pipeline, table: TableDecl, last: dict[Key, tuple[str, dict[str, Any]]]) -> Any:
    """A truncated history table: dlt's ``scd2`` over the rows inserted after the truncate, dated by the load (see
    the module's docstring)."""
    from datamart.ingest.stream_rows import _arrow

    rows = [row for kind, row in last.values() if kind == "upsert"]
    resource = dlt.resource(
        [_arrow(pipeline, table, rows)] if rows else [],
        name=table.name,
        primary_key=list(table.primary_key),
    )
    copy_hints(resource, table)
    return resource


def record_stream_deletions(decl: PipelineDecl, batch: Batch, warehouse: Warehouse) -> None:
    """Record the batch's deleted keys in ``ops.deleted_rows`` (``deletes.record_deleted_rows``, as cursor mode does
    for its deletions), before the load removes them: the incremental marts recompute what a deleted row changed (a
    withdrawn application's mission). The references are read from the warehouse's rows; a key it lacks records
    nothing."""
    from datamart.ingest.deletes import record_deleted_rows

    for table in decl.tables:
        if table.name in batch.truncated or table.personal:
            continue
        gone = [row for kind, row in batch.changes.get(table.name, {}).values() if kind == "delete"]
        if gone:
            keys = pa.table({k: [row[k] for row in gone] for k in table.primary_key})
            record_deleted_rows(decl, table, keys, warehouse)
