"""Replication mode: PostgreSQL sources read by logical decoding (`source: {kind: sql_database, changes: replication}`).

Each run is a bounded batch, with no long-lived replication connection:

- First run (or when the slot is gone): create the publication (``publish_via_partition_root = true``: a partitioned
  table's changes arrive under the parent's name) and the logical slot (``pgoutput``, the built-in plugin), THEN copy
  each table whole (the declared tables, read as in cursor mode: same backends, same personal-data treatment). The
  copy's snapshot is taken after the slot exists, so a change committed between the two is in the slot too: the
  next run replays it on top of the copy, which is harmless because only the last change per key is applied (the
  values it writes are the ones the copy already saw, or newer ones).
- Later runs: note the source's flushed WAL position, read the slot up to it without consuming it
  (``pg_logical_slot_peek_binary_changes``), decode the pgoutput messages (:func:`decode`), keep the last change per
  key in commit order, load upserts and deletes through dlt's merge (deletes carry dlt's ``hard_delete`` marker,
  the same marker column as key-set deletes), a truncated table as a replace, and only once dlt's load has
  committed move the slot forward (``pg_replication_slot_advance``). A run killed anywhere before that reads the
  same changes again next time: applying them twice gives the same rows (last change per key, upserts by key).

Why not a replication connection (``START_REPLICATION``): the SQL functions need no daemon, fit cron like every
other pipeline, and let the slot be confirmed exactly when the warehouse has committed, from the same process.
The read is in memory: one run holds the changes since the last run (bounded by how often the pipeline runs).

Each run ends by measuring the slot (its retained WAL and lag, :func:`watch_slot`, ``datamart/ingest/slots.py``),
whatever its outcome: recorded in ``ops.replication_slots``, shown by ``marts.data_freshness_v1`` and the summary, and
alerted on by the scheduled run above ``source.max_retained_wal``. ``dlt pipeline <name> drop-replication`` removes
the slot and the publication and forgets which tables were copied (:func:`forget_copies`).

Source schema changes are found as cursor mode finds them (the source's columns against dlt's schema, before the
changes are loaded): a table with an added or retyped column is reloaded whole after the batch's end position while
the others load (``stream_schema.py``, which says why that converges); a change read from before the
``ALTER`` keeps the reloaded value of what it lacks (``_apply``). A table whose source dropped a loaded column is
stopped as in cursor mode (``dropped.py``) and copied whole again once it can be loaded.

One table is copied whole again inside a run's batch, while the slot serves the others (``--table t
--full-refresh``, ``verify --repair``, a table missing from the warehouse, a column classified after being held
back), and a slot the source invalidated or that vanished is recreated with a copy of every table: ``recopy.py``.

History tables (``history: scd2``) keep every version the stream carries, dated by each change's commit
(``stream_history.py``, which says why dlt's own scd2 merge serves the copy but not the stream).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dlt
import psycopg2

from datamart.ingest.declarations import DeclarationError, PipelineDecl, TableDecl
from datamart.ingest.history import refuse_history_on_plain_table
from datamart.ingest.pgoutput import UNCHANGED, Change, Relation, decode
from datamart.ingest.stream_history import (
    commit_time,
    copy_hints,
    history_resources,
    note_versions,
    record_stream_deletions,
)
from datamart.ingest.stream_rows import change_resources
from datamart.ingest.stream_schema import apply_schema_changes, definitions
from datamart.settings import Warehouse, quote_identifier

#: The state key (under the pipeline's source state) recording which tables were copied after which slot.
STATE_KEY = "replication"
#: Injected failure for tests: set to ``after-load`` to stop after dlt's load, before the slot is advanced;
#: ``drop-slot`` drops the slot just before the run reads it.
FAIL_ENV = "DATAMART_TEST_REPLICATION_FAIL"


def is_replication(decl: PipelineDecl) -> bool:
    """True for a pipeline declaring ``source.changes: replication``."""
    return decl.kind == "sql_database" and decl.options.get("changes") == "replication"


def object_name(decl: PipelineDecl, key: str) -> str:
    """The declared slot or publication name, else ``datamart_<pipeline>`` (a valid slot name: a-z, 0-9, _)."""
    declared = decl.options.get(key)
    if declared:
        return str(declared)
    return ("datamart_" + re.sub(r"[^a-z0-9_]", "_", decl.name.lower()))[:63]


# --- pgoutput protocol 1 (PostgreSQL docs, "Logical Replication Message Formats") ---------------------------------


# --- the source side ----------------------------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg2 takes it."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _fail(decl: PipelineDecl, key: str, message: str) -> DeclarationError:
    return DeclarationError(f"{decl.path.name}: {key}: pipeline '{decl.name}': {message}")


def connect_source(decl: PipelineDecl) -> Any:
    """An autocommit psycopg2 connection to the source, after checking that it can be replicated from."""
    from datamart.ingest.sources import source_credentials

    url = source_credentials(decl)
    if not url.startswith("postgresql"):
        raise _fail(
            decl,
            "source.changes",
            "replication reads PostgreSQL's logical decoding; this source is not PostgreSQL "
            f"({url.split(':', 1)[0]}). Remove `changes: replication` to read it by cursor.",
        )
    conn = psycopg2.connect(libpq_url(url))
    conn.autocommit = True
    try:
        level = _one(conn, "SHOW wal_level")
        if level != "logical":
            raise _fail(
                decl,
                "source.changes",
                f"the source server runs with wal_level = {level}; logical decoding needs wal_level = logical. "
                "A DBA runs `ALTER SYSTEM SET wal_level = logical;` and restarts the server (on a managed service, "
                "set the parameter wal_level, or rds.logical_replication = 1, and reboot), then run again.",
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _one(conn: Any, statement: str, *params: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        row = cur.fetchone()
    return row[0] if row else None


def _schema(decl: PipelineDecl, conn: Any) -> str:
    return str(decl.options.get("schema") or _one(conn, "SELECT current_schema()"))


def check_tables(decl: PipelineDecl, conn: Any, tables: list[TableDecl]) -> None:
    """Refuse, with the SQL to run, a table whose deletes would not carry its declared key (replica identity)."""
    schema = _schema(decl, conn)
    for table in tables:
        qualified = f"{quote_identifier(schema)}.{quote_identifier(table.name)}"
        row = None
        with conn.cursor() as cur:
            cur.execute(
                "SELECT c.relreplident, (SELECT array_agg(a.attname::text) FROM pg_index i "
                "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "  WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) "
                "  OR (c.relreplident = 'i' AND i.indisreplident))) "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (schema, table.name),
            )
            row = cur.fetchone()
        if row is None:
            raise _fail(decl, f"tables.{table.name}", f"the source has no table {schema}.{table.name}")
        identity, columns = row
        declared = ", ".join(table.primary_key)
        if identity == "f":  # every change carries the whole old row: the declared key is in it, if it is a column
            missing = [c for c in table.primary_key if c not in _table_columns(conn, schema, table.name)]
            if not missing:
                continue
            raise _fail(
                decl,
                f"tables.{table.name}.primary_key",
                f"table {table.name} has REPLICA IDENTITY FULL, but its declared primary_key ({declared}) names "
                f"column(s) it lacks ({', '.join(missing)}): declare the columns that identify one row of it",
            )
        if set(table.primary_key) <= set(columns or []):
            continue
        if not columns:
            raise _fail(
                decl,
                f"tables.{table.name}.primary_key",
                f"table {table.name} has no primary key (nor replica identity index): the source cannot send which "
                "row an update or a delete changed, and refuses the application's updates and deletes of it once "
                f"it is published. A DBA runs `ALTER TABLE {qualified} REPLICA IDENTITY FULL;` (each change then "
                "carries the whole old row), or adds a primary key to it; then run again. Keep primary_key: "
                f"{declared} in the declaration even so: the warehouse merges on it, so it must identify one row",
            )
        raise _fail(
            decl,
            f"tables.{table.name}.primary_key",
            f"the source sends deleted rows of {table.name} with its replica identity ({', '.join(columns)}), not "
            f"the declared key ({declared}): declare primary_key: {', '.join(columns)}, or a DBA runs "
            f"`ALTER TABLE {qualified} REPLICA IDENTITY FULL;` (each change then carries the whole old row)",
        )


def _table_columns(conn: Any, schema: str, table: str) -> set[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        )
        return {name for (name,) in cur.fetchall()}


def ensure_publication(decl: PipelineDecl, conn: Any, tables: list[TableDecl]) -> None:
    """Create the publication of the declared tables, or add those it lacks; refuse with the DBA's SQL when the
    credentials may not."""
    name, schema = object_name(decl, "publication"), _schema(decl, conn)
    qualified = [f"{quote_identifier(schema)}.{quote_identifier(t.name)}" for t in tables]
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
        exists = cur.fetchone() is not None
        cur.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s", (name, schema)
        )
        published = {r[0] for r in cur.fetchall()}
    if exists:
        # a partitioned table is listed by its partitions unless the publication publishes via the root
        missing = [q for t, q in zip(tables, qualified, strict=True) if t.name not in published]
        statement = f"ALTER PUBLICATION {quote_identifier(name)} ADD TABLE {', '.join(missing)};" if missing else ""
    else:
        statement = (
            f"CREATE PUBLICATION {quote_identifier(name)} FOR TABLE {', '.join(qualified)} "
            "WITH (publish_via_partition_root = true);"
        )
    if not statement:
        return
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.InvalidParameterValue) as exc:
        user = _one(conn, "SELECT current_user")
        raise _fail(
            decl,
            "source.publication",
            f"the source user {user!r} may not publish the tables ({str(exc).strip()}). "
            f"A DBA (the tables' owner, or a superuser) runs: {statement}  Then run again.",
        ) from exc


def ensure_slot(decl: PipelineDecl, conn: Any) -> bool:
    """Create the logical slot when it does not exist; True when it was created now."""
    name = object_name(decl, "slot")
    if _one(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", name):
        plugin, database = None, None
        with conn.cursor() as cur:
            cur.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (name,))
            plugin, database = cur.fetchone()
        if plugin != "pgoutput" or database != conn.get_dsn_parameters().get("dbname"):
            raise _fail(
                decl,
                "source.slot",
                f"the slot {name!r} exists for another use (plugin {plugin}, database {database}): "
                "declare another slot name",
            )
        return False
    try:
        _one(conn, "SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput')", name)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise _privilege(decl, conn, exc) from exc
    return True


def _privilege(decl: PipelineDecl, conn: Any, exc: BaseException) -> DeclarationError:
    user = _one(conn, "SELECT current_user")
    return _fail(
        decl,
        "source.changes",
        f"the source user {user!r} may not use replication slots ({str(exc).strip()}). A DBA runs: "
        f"ALTER ROLE {quote_identifier(user)} WITH REPLICATION;  (on Amazon RDS: GRANT rds_replication TO "
        f"{quote_identifier(user)};) Then run again.",
    )


def check_replication_role(decl: PipelineDecl, conn: Any) -> None:
    """Refuse before anything is created when the user has neither REPLICATION nor superuser."""
    allowed = _one(
        conn,
        "SELECT rolreplication OR rolsuper OR pg_has_role(current_user, 'rds_replication', 'member') "
        "FROM pg_roles WHERE rolname = current_user"
        if _one(conn, "SELECT count(*) FROM pg_roles WHERE rolname = 'rds_replication'")
        else "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    if not allowed:
        raise _privilege(decl, conn, PermissionError("no REPLICATION attribute"))


@dataclass
class Batch:
    """The changes read from the slot: per table the last change per key, the truncated tables, the end LSN."""

    changes: dict[str, dict[tuple[Any, ...], tuple[str, dict[str, Any]]]]
    truncated: set[str]
    read: dict[str, int]  # change messages read per table
    end_lsn: str  # where the slot goes once loaded
    xids: set[int] = field(default_factory=set)  # the transactions read (see _wait_until_visible)
    # history tables: per key, its state after each transaction (stream_history.py)
    versions: dict[str, dict[tuple[Any, ...], list[Any]]] = field(default_factory=dict)


def read_changes(decl: PipelineDecl, conn: Any, tables: list[TableDecl]) -> Batch:
    """Peek every change committed up to now (the source's flushed WAL position, noted first) without consuming
    the slot; keep the last change per key, in commit order, with the values typed as psycopg2 types them."""
    slot, publication = object_name(decl, "slot"), object_name(decl, "publication")
    schema = _schema(decl, conn)
    declared = {t.name: t for t in tables}
    upto = _one(conn, "SELECT pg_current_wal_flush_lsn()")
    relations: dict[int, Relation] = {}
    changes: dict[str, dict[tuple[Any, ...], tuple[str, dict[str, Any]]]] = {t: {} for t in declared}
    read = dict.fromkeys(declared, 0)
    truncated: set[str] = set()
    xids: set[int] = set()
    versions: dict[str, dict[tuple[Any, ...], list[Any]]] = {t.name: {} for t in tables if t.history}
    xid, committed = 0, None
    end = _lsn_int(upto)
    with conn.cursor() as cur:
        if os.environ.get(FAIL_ENV) == "drop-slot":  # tests: the slot dropped while the run reads it
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        try:
            cur.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s, NULL, 'proto_version', '1', "
                "'publication_names', %s)",
                (slot, upto, publication),
            )
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise _privilege(decl, conn, exc) from exc
        except psycopg2.Error as exc:  # invalidated or dropped since the run began: say so (recopy.py)
            from datamart.ingest.recopy import slot_lost_while_reading

            lost = slot_lost_while_reading(decl, slot, exc)
            if lost is None:
                raise
            raise lost from exc
        rows = cur.fetchall()
        current = definitions(cur, schema, list(declared))  # read after the peek: see _apply
        for (data,) in rows:
            kind, payload = decode(bytes(data), relations)
            if kind == "begin":
                xids.add(payload)
                xid, committed = payload, commit_time(bytes(data))
            if kind == "commit":
                end = max(end, payload)
            if kind != "change":
                continue
            if payload.kind == "truncate":
                for oid in payload.relations:
                    rel = relations.get(oid)
                    if rel is not None and rel.schema == schema and rel.name in declared:
                        truncated.add(rel.name)
                        changes[rel.name].clear()  # what came before the truncate is gone
                        versions.get(rel.name, {}).clear()
                        read[rel.name] += 1
                continue
            rel = relations[payload.relation]
            table = declared.get(rel.name) if rel.schema == schema else None
            if table is None:
                continue
            read[table.name] += 1
            keys = _apply(table, rel, payload, changes[table.name], cur, current.get(table.name))
            if table.history:
                note_versions(versions[table.name], keys, changes[table.name], committed, xid)
    return Batch(changes, truncated, read, _lsn_text(end), xids, versions)


def _apply(
    table: TableDecl,
    rel: Relation,
    change: Change,
    last: dict[tuple[Any, ...], tuple[str, dict[str, Any]]],
    cur: Any,
    current: dict[str, tuple[int, int]] | None = None,
) -> list[tuple[Any, ...]]:
    """Fold one change into ``last`` (key -> (upsert|delete, row)): the last change per key wins; an unchanged
    TOASTed value takes the value of an earlier change of the same key in this batch, when there is one. Returns
    the keys the change touched.

    ``current``: the table's columns as the source has them now. A change made before a schema change the warehouse
    already took (the table was reloaded after it, see ``stream_schema.py``) lacks an added column, or
    holds a retyped column's value in its old type: those values are marked UNCHANGED, so they keep the
    warehouse's value, like an unchanged TOASTed value. That is the source's value: the reload's snapshot was taken
    after that schema change, hence after this change, and a later change of the key would come later in this batch
    and win. A column the source no longer has is left out (``dropped.py`` stops a table that lost a loaded one)."""
    names = [c for c, _ in rel.columns]
    types = [t for _, t in rel.columns]
    modifiers = rel.modifiers or [-1] * len(names)

    def as_now(row: dict[str, Any]) -> dict[str, Any]:
        if not current:
            return row
        for name, type_oid, modifier in zip(names, types, modifiers, strict=True):
            if name not in current:
                row.pop(name)
            elif current[name] != (type_oid, modifier) and name not in table.primary_key:
                row[name] = UNCHANGED
        for name in current:
            row.setdefault(name, UNCHANGED)
        return row

    def typed(values: list[Any]) -> dict[str, Any]:
        return {n: _cast(v, t, cur) for n, v, t in zip(names, values, types, strict=True)}

    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[k] for k in table.primary_key)

    if change.kind == "delete":
        old = typed(change.old or [])
        last[key_of(old)] = ("delete", {k: old[k] for k in table.primary_key})
        return [key_of(old)]
    row = as_now(typed(change.new or []))
    touched = []
    if change.kind == "update" and change.old is not None:
        old_key = key_of(typed(change.old))
        if old_key != key_of(row):  # the key itself changed: the old key is gone
            previous = last.get(old_key)
            last[old_key] = ("delete", dict(zip(table.primary_key, old_key, strict=True)))
            touched.append(old_key)
            if previous and previous[0] == "upsert":
                _fill_unchanged(row, previous[1])
    previous = last.get(key_of(row))
    if previous and previous[0] == "upsert":
        _fill_unchanged(row, previous[1])
    last[key_of(row)] = ("upsert", row)
    return [*touched, key_of(row)]


def _fill_unchanged(row: dict[str, Any], earlier: dict[str, Any]) -> None:
    for column, value in row.items():
        if value is UNCHANGED and earlier.get(column, UNCHANGED) is not UNCHANGED:
            row[column] = earlier[column]


def _cast(value: Any, type_oid: int, cur: Any) -> Any:
    """A text value as psycopg2 reads that type from a query (its own typecasters); unknown types stay text."""
    if value is None or value is UNCHANGED:
        return value
    caster = psycopg2.extensions.string_types.get(type_oid)
    return caster(value, cur) if caster is not None else value


def _lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def advance(decl: PipelineDecl, conn: Any, lsn: str) -> None:
    """Confirm everything up to ``lsn``: the source may now recycle that WAL, and the next run reads after it."""
    _one(conn, "SELECT end_lsn FROM pg_replication_slot_advance(%s, %s::pg_lsn)", object_name(decl, "slot"), lsn)


# --- the run ------------------------------------------------------------------------------------------------------


class _Lap:
    """Adds the seconds since the previous call to ``profile[part]`` (parts may repeat: they add up)."""

    def __init__(self, profile: dict[str, float]) -> None:
        self.profile = profile
        self.last = time.monotonic()

    def __call__(self, part: str) -> None:
        now = time.monotonic()
        self.profile[part] = self.profile.get(part, 0.0) + now - self.last
        self.last = now


def run_replication(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None,
    pipelines_dir: Any,
    full_refresh: bool,
    reload: Any = None,
) -> Any:
    """One replication run of ``decl`` (see the module's docstring); returns the runner's ``PipelineRun``.

    ``reload``: the runner's reload of one table whose source changed (``runner._reload``: migrate its retyped
    columns, replace its rows through staging), passed in because the runner imports this module."""

    from datamart.ingest.dropped import dropped_columns
    from datamart.ingest.evolution import RetypeRefused
    from datamart.ingest.loading import (
        PipelineRun,
        TableLoad,
        TablesFailed,
        _build_each,
        count_rows,
        finish_or_abort_pending,
        loader_file_format,
        make_pipeline,
    )
    from datamart.ingest.recopy import copy_resources, recover_slot, tables_to_copy

    started = time.monotonic()
    profile: dict[str, float] = {}  # seconds per part of the run, printed as "<name> profile: …" (make bench)
    lap = _Lap(profile)
    selected = list(decl.tables)
    names = [t.name for t in selected]
    # --full-refresh copies the tables named (all without --table) again, while the slot serves the others
    requested = dict.fromkeys((tables or names) if full_refresh else [], "--full-refresh")
    conn = connect_source(decl)
    try:
        pipeline = make_pipeline(decl, warehouse, pipelines_dir)
        pipeline.sync_destination()
        refuse_history_on_plain_table(pipeline, decl, names)  # its rows have no validity to retire
        notes: list[str] = []
        before = count_rows(pipeline, names)[0]  # before a pending load is finished: its rows are this run's
        if pipeline.has_pending_data:  # a killed run's load: finish it (the slot was not advanced: re-read after)
            notes.append(finish_or_abort_pending(pipeline)[0])
        check_replication_role(decl, conn)
        check_tables(decl, conn, selected)
        ensure_publication(decl, conn, selected)
        slot = object_name(decl, "slot")
        state = pipeline.state.get("sources", {}).get(decl.name, {}).get(STATE_KEY, {})
        lost = recover_slot(decl, conn, slot, state)  # an invalidated slot is dropped: created again below
        if lost:
            notes.append(lost)
        if tables and not full_refresh:
            notes.append(f"--table {', '.join(tables)}: the slot holds the changes of every table: all were applied")
        created = ensure_slot(decl, conn)
        copied = {} if created else dict(state.get("copied", {}))
        slot_id = str(_one(conn, "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", slot))
        if created:
            state_slot = slot_id
        else:
            state_slot = state.get("slot") or slot_id
        to_copy = [t for t in selected if copied.get(t.name) != state_slot]
        # a table whose source dropped a loaded column is neither copied nor changed (as in cursor mode): dropped.py
        stopped = dropped_columns(decl, warehouse, names, pipeline.state)
        stopped = {n: why for n, why in stopped.items() if n not in requested}
        to_copy = [t for t in to_copy if t.name not in stopped]
        if not created:  # copied in the batch below, while the slot serves the other tables (recopy.py)
            requested.update({t.name: "not copied since the slot was created" for t in to_copy})
            to_copy = []
        file_format = loader_file_format(decl, warehouse)
        lap("start")
        loads: list[TableLoad] = []
        if to_copy:
            # the initial copy: a whole read of each table, after the slot exists (see the module's docstring)
            failed: dict[str, BaseException] = {}
            held_back: dict[str, list[str]] = {}
            resources = _build_each(decl, [t.name for t in to_copy], {}, held_back, failed, notes)
            if failed:
                name, error = next(iter(failed.items()))
                raise RuntimeError(f"pipeline '{decl.name}': table {name} could not be copied: {error}") from error
            for resource in resources:
                if decl.table(resource.name).history:  # its versions stay: merged, never replaced
                    copy_hints(resource, decl.table(resource.name))
                else:
                    resource.apply_hints(write_disposition="replace")
            resources.append(_mark_copied(decl, {**copied, **{t.name: state_slot for t in to_copy}}, state_slot))
            info = pipeline.run(resources, loader_file_format=file_format)
            info.raise_on_failed_jobs()
            after = count_rows(pipeline, names)[0]
            for t in to_copy:
                loads.append(TableLoad(t.name, after[t.name], after[t.name], inserted=after[t.name]))
            notes.append(
                f"initial copy of {', '.join(t.name for t in to_copy)} taken after creating slot {slot!r}; "
                "the changes since are applied by the next run"
            )
            return watch_slot(
                decl,
                warehouse,
                conn,
                PipelineRun(decl.name, decl.dataset, time.monotonic() - started, loads, notes, stopped),
            )
        batch = read_changes(decl, conn, selected)
        lap("read changes")
        for name in stopped:  # copied whole again once it can be loaded: this batch's changes of it are skipped,
            # but its deletes (an erased person's rows leave the warehouse whatever stops their table)
            batch.changes[name] = {k: c for k, c in batch.changes[name].items() if c[0] == "delete"}
            batch.truncated.discard(name)
        live = [n for n in names if n not in stopped]
        recopy = tables_to_copy(pipeline, decl, conn, _schema(decl, conn), live, requested)
        held: dict[str, list[str]] = {}
        copies = copy_resources(pipeline, decl, conn, batch, recopy, held, notes)
        lap("copies")
        reloads, failed = apply_schema_changes(
            pipeline, decl, conn, batch, [n for n in live if n not in recopy], reload, file_format
        )
        # copied whole again by the next run: a table stopped, or whose reload failed after it may have changed the
        # warehouse (a refused retype changed nothing: the next run finds the change again and reloads it)
        forget = [*stopped, *(n for n, e in failed.items() if not isinstance(e, RetypeRefused))]
        lap("schema changes")
        resources, deleted = change_resources(pipeline, decl, batch, held)
        versions, retired = history_resources(pipeline, decl, batch)
        resources, deleted = [*resources, *versions, *copies], {**deleted, **retired}
        lap("changes to rows")
        if forget or recopy:
            kept = {n: s for n, s in copied.items() if n not in forget}
            resources.append(_mark_copied(decl, {**kept, **dict.fromkeys(recopy, state_slot)}, state_slot))
        written: dict[str, int] = {}
        if resources:
            record_stream_deletions(decl, batch, warehouse)  # for the incremental marts, before the load
            info = pipeline.run(resources, loader_file_format=file_format)
            info.raise_on_failed_jobs()
            lap("load")
            changed = [n for n in names if n in deleted]
            written = count_rows(pipeline, changed, list(info.loads_ids), changed)[1]
        if os.environ.get(FAIL_ENV) == "after-load":
            raise RuntimeError(f"{FAIL_ENV}=after-load: stopped after the load, before the slot was advanced")
        advance(decl, conn, batch.end_lsn)  # only now: the warehouse has committed the load
        lap("slot")
        after = count_rows(pipeline, names)[0]
        lap("counts")
        loads += reloads
        for n in recopy:  # copied whole: every row read; the warehouse's rows before were replaced
            grown = after[n] - before.get(n, 0)
            loads.append(
                TableLoad(
                    n, after[n], after[n], max(-grown, 0), held_back=tuple(held.get(n, [])), inserted=max(grown, 0)
                )
            )
        done = {*stopped, *failed, *recopy, *(r.table for r in reloads)}
        for name in [n for n in names if n not in done]:
            gone = deleted.get(name, 0)
            inserted = max(after[name] - before[name] + gone, 0) if name not in batch.truncated else after[name]
            loads.append(
                TableLoad(
                    table=name,
                    rows_loaded=batch.read[name],
                    rows_in_warehouse=after[name],
                    rows_deleted=gone if name not in batch.truncated else before[name],
                    inserted=inserted,
                    updated=max(written.get(name, 0) - inserted, 0),
                    held_back=tuple(held.get(name, [])),
                )
            )
        if batch.truncated:
            notes.append(f"truncated in the source, replaced here: {', '.join(sorted(batch.truncated))}")
        run = watch_slot(
            decl,
            warehouse,
            conn,
            PipelineRun(decl.name, decl.dataset, time.monotonic() - started, loads, notes, stopped, profile),
        )
        lap("slot")
        run.elapsed = time.monotonic() - started
        if failed:
            raise TablesFailed(decl.name, failed, run) from next(iter(failed.values()))
        return run
    except TablesFailed:
        raise  # the slot was measured and recorded with the run above
    except Exception as exc:
        watch_slot(decl, warehouse, conn, failure=exc)  # a failed run leaves the slot where it was: record it too
        raise
    finally:
        conn.close()


def watch_slot(
    decl: PipelineDecl, warehouse: Warehouse, conn: Any, run: Any = None, failure: BaseException | None = None
) -> Any:
    """Measure the slot at the end of a run (``datamart/ingest/slots.py``), record it in ``ops.replication_slots``
    and, for a run that loaded, say it in the summary; returns ``run``. After a ``failure`` the measurement is
    best-effort: when it fails too, the failure gets a note and stays the error reported."""
    from datamart.ingest.ops import record_slot
    from datamart.ingest.slots import max_retained_wal, measure

    try:
        status = measure(conn, object_name(decl, "slot"), max_retained_wal(decl))
        if status is not None:
            record_slot(warehouse, decl.name, status)
    except Exception as exc:
        if failure is None:
            raise
        failure.add_note(f"(the slot could not be measured after the failure: {exc})")
        return run
    if run is not None and status is not None:
        run.notes.append(status.describe())
    return run


def _mark_copied(decl: PipelineDecl, copied: dict[str, str], slot_id: str) -> Any:
    """A resource that loads no row and records, in dlt's state (committed with the copy's load), which tables were
    copied after which slot: a run killed before that commit copies them again."""

    @dlt.resource(name="_datamart_replication", selected=True)
    def mark() -> Iterator[Any]:
        state = dlt.current.source_state().setdefault(STATE_KEY, {})
        state["copied"] = copied
        state["slot"] = slot_id
        yield from ()

    return mark()


def forget_copies(decl: PipelineDecl, warehouse: Warehouse, pipelines_dir: Any = None) -> bool:
    """Forget, in dlt's state kept in the warehouse, which tables were copied after which slot: the next run copies
    every table whole again (``dlt pipeline <name> drop-replication``). False when nothing was recorded.

    A load a killed run left pending is finished first (dlt loads pending packages before anything new): its rows
    are replaced by the next copy anyway."""
    from datamart.ingest.loading import finish_or_abort_pending, make_pipeline

    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    pipeline.sync_destination()
    state = pipeline.state.get("sources", {}).get(decl.name, {}).get(STATE_KEY, {})
    if not state.get("copied") and not state.get("slot"):
        return False
    if pipeline.has_pending_data:
        finish_or_abort_pending(pipeline)
    pipeline.run([_mark_copied(decl, {}, "")]).raise_on_failed_jobs()
    return True
