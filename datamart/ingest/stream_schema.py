"""Source schema changes in replication mode (``datamart/ingest/replication.py``): a column added (with a DEFAULT
too, which changes no row and so sends nothing in the stream) or retyped in a source table makes the run reload that
table whole, as cursor mode does (``evolution.py``, ``runner._reload``), while the other tables load their changes.

Why this converges: the reload reads the table after the batch's end position, where the slot is advanced once the
run has loaded, and the batch's changes of that table are dropped (the reload holds them, and newer values). The
next run applies the changes committed after that position on top of the reload: some are already in it, and
applying one again writes the value it holds, or a newer one, since only the last change per key is applied, in
commit order. A change made before the ``ALTER`` lacks the added column, or holds the retyped one in its old type:
those values keep the reloaded ones (``replication._apply``, given the source's columns as :func:`definitions`
reads them). A run killed before the slot moved reads the same batch again next time: the same argument holds from
the older position.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import dlt

from datamart.ingest.declarations import PipelineDecl, warehouse_name

if TYPE_CHECKING:
    from datamart.ingest.replication import Batch


def definitions(cur: Any, schema: str, tables: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per table, the source's columns as they are now: name -> (type oid, type modifier), as pgoutput sends them."""
    cur.execute(
        "SELECT c.relname, a.attname, a.atttypid, a.atttypmod FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (schema, tables),
    )
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for table, column, type_oid, modifier in cur.fetchall():
        found.setdefault(table, {})[column] = (type_oid, modifier)
    return found


def apply_schema_changes(
    pipeline: dlt.Pipeline,
    decl: PipelineDecl,
    conn: Any,
    batch: Batch,
    names: list[str],
    reload: Any,
    file_format: str | None,
) -> tuple[list[Any], dict[str, BaseException]]:
    """Reload the tables whose source added or retyped a column (found as cursor mode finds them, by comparing the
    source's reflected columns with dlt's schema: ``evolution.source_changes``), each as cursor mode does
    (``runner._reload``: the retyped columns migrated, views kept, the rows replaced through staging), while the
    other tables load their changes (see the module's docstring). The stream alone would not do: a column added with
    a DEFAULT emits no change at all. Returns the reloads (``TableLoad``, with the change and its cost) and the
    tables that failed."""
    from datamart.ingest.evolution import RetypeRefused, source_changes
    from datamart.ingest.loading import _build_each

    schema = pipeline.default_schema if pipeline.default_schema_name else None
    if schema is None or not names:
        return [], {}
    internal = ("_dlt", "_datamart")
    known = {
        n: [c for c in schema.tables.get(warehouse_name(n), {}).get("columns", {}) if not c.startswith(internal)]
        for n in names
    }
    held_back: dict[str, list[str]] = {}
    failed: dict[str, BaseException] = {}
    resources = _build_each(decl, names, known, held_back, failed)
    if failed:  # check_tables found every table a moment ago
        name, error = next(iter(failed.items()))
        raise RuntimeError(f"pipeline '{decl.name}': table {name} could not be reflected: {error}") from error
    changes = source_changes(decl, resources, known, schema)
    if not changes:
        return [], {}
    _wait_until_visible(conn, batch.xids)
    by_name = {r.name: r for r in resources}
    reloads = []
    for name, change in changes.items():
        read = batch.changes[name]
        batch.changes[name] = {}
        batch.truncated.discard(name)
        loaded = reload(pipeline, decl, change, by_name[name], file_format, {}, None, failed)
        if loaded is not None:
            reloads.append(replace(loaded, held_back=tuple(held_back.get(name, []))))
        elif isinstance(failed.get(name), RetypeRefused):  # nothing changed: its deletes still apply (erasures)
            batch.changes[name] = {k: c for k, c in read.items() if c[0] == "delete"}
    return reloads, failed


def _wait_until_visible(conn: Any, xids: set[int], timeout: float = 60.0) -> None:
    """Wait until no transaction of the batch is still in progress for a new snapshot. Its commit record was flushed
    (that is how it came to be read), but a transaction becomes visible a moment after that flush: a reload reading
    before then would miss a change the advanced slot no longer holds. Microseconds in practice; checked anyway."""
    deadline = time.monotonic() + timeout
    statement = (
        "SELECT count(*) FROM txid_snapshot_xip(txid_current_snapshot()) x WHERE (x %% 4294967296) = ANY(%s::bigint[])"
    )
    while xids and _count(conn, statement, sorted(xids)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"transactions {sorted(xids)} still committing after {timeout:.0f} s: run again")
        time.sleep(0.05)


def _count(conn: Any, statement: str, *params: Any) -> int:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return int(cur.fetchone()[0])
