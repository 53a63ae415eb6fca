"""Replication mode's ways back (``datamart/ingest/replication.py`` calls them): one table copied whole again while
the slot keeps serving the others, and a slot the source invalidated or that vanished.

**One table copied again.** A run copies a table whole, inside its ordinary batch, when:

- ``dlt pipeline <name> run --table <t> --full-refresh`` asks for it (``--full-refresh`` alone: every table), and
  ``dlt pipeline <name> verify --repair`` for each table that drifted (``datamart/ingest/repair.py``);
- the declaration names a table the warehouse does not have (``dlt pipeline <name> drop <t>``, a table dropped by
  hand), or one not copied since the slot was created (a table added to the declaration, a stopped table);
- a column of a personal table that runs held back (unclassified) has been classified under ``personal:`` and is
  not in the warehouse yet.

Why it converges, and why no per-table snapshot position is needed: the run reads the batch (every change since
the slot's confirmed position, up to its end position E), waits until the batch's transactions are visible, then
reads the table whole; the batch's changes of that table are dropped (the copy holds them, and newer values), the
others' are loaded with the copy, and the slot is advanced to E once the warehouse has committed. The next run
replays that table's changes committed after E on top of the copy: those the copy already holds write the values it
holds again, or newer ones, because only the last change per key is applied, in commit order, and every change
carries the whole row (an unchanged TOASTed value is taken from the warehouse, i.e. from the copy or a later change).
This is the argument of the initial copy and of a schema change's reload (``stream_schema.py``). Skipping the
table's changes "at or below the copy's LSN" instead would need the exact set of transactions the copy's snapshot
saw: ``pg_current_wal_lsn()`` read in a REPEATABLE READ transaction is a position *after* its snapshot, and a
transaction whose commit record lies before it may still be invisible to that snapshot, so skipping by position
could lose a change. Replaying loses none.

**A slot lost.** A slot the source invalidated (``wal_status = 'lost'``: it retained more WAL than
``max_slot_wal_keep_size``) can never be read again, and a slot that vanished (dropped by hand, a restore, a failover
to a server without it) holds nothing: either way the changes since the last run are gone, and only a new slot with a
new copy of every table recovers. The run does it by itself (:func:`recover_slot` drops the lost slot; the run then
creates one and copies every table whole, deleted rows leaving the warehouse with the replace) and says so in a
warning line that the scheduled run turns into a failed ``replication_slots`` step, hence an alert
(:func:`slot_warnings`). Automatic rather than by a command: the command would do exactly that copy, and the
warehouse would hold stale and deleted rows until someone typed it; the alert is for the cause (the pipeline ran too
seldom for ``max_slot_wal_keep_size``, or someone dropped the slot), which no command of ours fixes. A slot lost
while a run reads it stops that run with :class:`SlotLost` (the next run recovers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg2

from datamart.ingest.declarations import PipelineDecl, TableDecl, warehouse_name
from datamart.ingest.personal import loaded_column
from datamart.ingest.stream_history import copy_hints
from datamart.settings import quote_identifier

if TYPE_CHECKING:
    from datamart.ingest.replication import Batch

#: The warning of a run that recreated its slot: the scheduled run's ``replication_slots`` step alerts on it.
SLOT_RECREATED = "every table was copied whole again"


class SlotLost(RuntimeError):
    """The slot was invalidated or dropped while this run read it; ``hint``: the command that recovers."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def recover_slot(decl: PipelineDecl, conn: Any, slot: str, state: dict[str, Any]) -> str | None:
    """Before a run uses its slot: drop it when the source invalidated it; the warning line when the slot is lost
    or vanished although tables were copied after it (``state``: the pipeline's replication state), else None.
    The run then creates a slot and copies every table whole (see the module's docstring)."""
    from datamart.ingest.slots import wal_status

    status = wal_status(conn, slot)
    then = (
        f"{SLOT_RECREATED} from the source with a new slot: the warehouse equals the source after this run. "
        f"Run `dlt pipeline {decl.name} run` more often than the source's max_slot_wal_keep_size fills, or have a "
        "DBA raise it, to keep it from happening again"
    )
    if status == "lost":
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise SlotLost(
                f"pipeline '{decl.name}': slot {slot!r} was invalidated by the source (wal_status lost: it kept more "
                "WAL than max_slot_wal_keep_size allows, and the changes it held are gone), and the source user may "
                f"not drop it ({str(exc).strip()})",
                f"a DBA runs SELECT pg_drop_replication_slot('{slot}');  then `dlt pipeline {decl.name} run` creates "
                "a new slot and copies every table whole again",
            ) from exc
        return (
            f"WARNING: slot {slot!r} was invalidated by the source (wal_status lost: it kept more WAL than "
            f"max_slot_wal_keep_size allows, and the changes it held are gone); dropped, and {then}"
        )
    if status is None and state.get("slot") and state.get("copied"):
        return (
            f"WARNING: slot {slot!r} was not on the source (dropped by hand, or the source was restored or failed "
            f"over to a server without it): the changes since the last run were lost; {then}"
        )
    return None


def slot_lost_while_reading(decl: PipelineDecl, slot: str, exc: BaseException) -> SlotLost | None:
    """The error to raise when reading the slot failed because it was invalidated or dropped meanwhile."""
    invalidated = isinstance(exc, psycopg2.errors.ObjectNotInPrerequisiteState)
    if not invalidated and not isinstance(exc, psycopg2.errors.UndefinedObject):
        return None
    what = "was invalidated by the source (max_slot_wal_keep_size exceeded)" if invalidated else "was dropped"
    return SlotLost(
        f"pipeline '{decl.name}': slot {slot!r} {what} while this run read it ({str(exc).strip()}); nothing was loaded",
        f"rerun `dlt pipeline {decl.name} run`: it creates a new slot and copies every table whole again (the "
        "changes the slot held are gone)",
    )


def slot_warnings(run: Any) -> list[str]:
    """The warnings of a run (a ``PipelineRun``) that recreated its slot: the scheduled run alerts on them."""
    return [note for note in getattr(run, "notes", []) if SLOT_RECREATED in note]


def tables_to_copy(
    pipeline: Any, decl: PipelineDecl, conn: Any, schema: str, names: list[str], requested: dict[str, str]
) -> dict[str, str]:
    """Per table of ``names`` to copy whole in this run, why: ``requested`` (table -> reason), then those the
    warehouse lacks, then those with a classified column the warehouse lacks (see the module's docstring)."""
    reasons = dict(requested)
    loaded = _warehouse_columns(pipeline, [n for n in names if n not in reasons])
    for name in names:
        if name in reasons:
            continue
        columns = loaded.get(warehouse_name(name), set())
        if not columns:
            reasons[name] = "not in the warehouse"
            continue
        classified = _classified_not_loaded(conn, schema, decl.table(name), columns)
        if classified:
            reasons[name] = f"column(s) {', '.join(classified)} classified"
    return reasons


def _warehouse_columns(pipeline: Any, tables: list[str]) -> dict[str, set[str]]:
    """Per warehouse table name (of ``tables``, declared names), its columns in the warehouse: one query."""
    found: dict[str, set[str]] = {}
    if not tables:
        return found
    with pipeline.sql_client() as client:
        rows = client.execute_sql(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
            client.dataset_name,
        )
    wanted = {warehouse_name(t) for t in tables}
    for table, column, *_ in rows or []:
        if table in wanted:
            found.setdefault(str(table), set()).add(str(column))
    return found


def _classified_not_loaded(conn: Any, schema: str, table: TableDecl, loaded: set[str]) -> list[str]:
    """The source columns classified under ``personal:`` (to load) whose warehouse column is missing, among those
    holding a value (a column of NULLs only may never be created: it would be copied at every run)."""
    missing = []
    for column, treatment in table.personal.items():
        target = loaded_column(column, treatment)
        if target is None or warehouse_name(target) in loaded:
            continue
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "AND column_name = %s",
                (schema, table.name, column),
            )
            if not cur.fetchone()[0]:
                continue
            qualified = f"{quote_identifier(schema)}.{quote_identifier(table.name)}"
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM {qualified} WHERE {quote_identifier(column)} IS NOT NULL)")
            if cur.fetchone()[0]:
                missing.append(column)
    return missing


def copy_resources(
    pipeline: Any,
    decl: PipelineDecl,
    conn: Any,
    batch: Batch,
    reasons: dict[str, str],
    held_back: dict[str, list[str]],
    notes: list[str],
) -> list[Any]:
    """The resources that replace each table of ``reasons`` with the source's rows, read after the batch's
    transactions are visible; the batch's changes of those tables are dropped (the copies hold them)."""
    from datamart.ingest.loading import _build_each
    from datamart.ingest.stream_schema import _wait_until_visible

    if not reasons:
        return []
    _wait_until_visible(conn, batch.xids)
    for name in reasons:
        batch.changes[name] = {}
        batch.truncated.discard(name)
    internal = ("_dlt", "_datamart")
    # a table with personal data keeps holding back its unclassified columns: the known ones are the warehouse's
    loaded = _warehouse_columns(pipeline, list(reasons))
    known = {n: [c for c in loaded.get(warehouse_name(n), ()) if not c.startswith(internal)] for n in reasons}
    failed: dict[str, BaseException] = {}
    resources = _build_each(decl, list(reasons), known, held_back, failed, notes)
    if failed:
        name, error = next(iter(failed.items()))
        raise RuntimeError(f"pipeline '{decl.name}': table {name} could not be copied: {error}") from error
    for resource in resources:
        if decl.table(resource.name).history:  # its versions stay: merged through dlt's scd2, never replaced
            copy_hints(resource, decl.table(resource.name))
        else:
            resource.apply_hints(write_disposition="replace")  # through staging, in one transaction: views kept
    for name, why in reasons.items():
        notes.append(f"{name}: copied whole from the source ({why}) while the slot served the other tables")
    return resources
