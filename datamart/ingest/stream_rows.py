"""A replication run's changes as rows for the warehouse (``datamart/ingest/replication.py`` reads them): one dlt
resource per table with changes, upserts and deletion rows, personal columns treated as cursor mode treats them,
an unchanged TOASTed value taken from the warehouse, the deleted keys the warehouse held counted for the summary."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dlt
import pyarrow as pa

from datamart.ingest.declarations import PipelineDecl, TableDecl, warehouse_name
from datamart.ingest.deletes import DELETED_MARKER
from datamart.ingest.personal import DROP, YEAR, personal_data_map, year_column
from datamart.ingest.pgoutput import UNCHANGED
from datamart.settings import quote_identifier

if TYPE_CHECKING:
    from datamart.ingest.replication import Batch


_KEYS_PER_QUERY = 5000  # keys looked up in the warehouse per statement (_warehouse_rows)


def _warehouse_rows(
    pipeline: dlt.Pipeline, table: TableDecl, keys: list[tuple[Any, ...]], columns: list[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The warehouse's current ``columns`` (warehouse names) of the rows with ``keys``."""
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    if not keys:
        return found
    key_columns = [warehouse_name(k) for k in table.primary_key]
    selected = ", ".join(f"t.{quote_identifier(c)}" for c in [*key_columns, *columns])
    # The keys as a VALUES list joined to the table: one scan of it per chunk, each row looked up in a hash of the
    # keys. A chain of `key = %s OR …` made PostgreSQL test every key against every row: 5,000 deleted applications
    # against 2 million rows took about 2 minutes (scale 500).
    names = ", ".join(quote_identifier(c) for c in key_columns)
    match = " AND ".join(f"t.{quote_identifier(c)} = k.{quote_identifier(c)}" for c in key_columns)
    one = "(" + ", ".join(["%s"] * len(key_columns)) + ")"
    with pipeline.sql_client() as client:
        qualified = client.make_qualified_table_name(warehouse_name(table.name))
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            values = ", ".join([one] * len(chunk))
            params = [v for key in chunk for v in key]
            statement = f"SELECT {selected} FROM {qualified} AS t JOIN (VALUES {values}) AS k({names}) ON {match}"
            try:
                rows = client.execute_sql(statement, *params) or []
            except DatabaseUndefinedRelation:
                return found
            for row in rows:
                found[tuple(row[: len(key_columns)])] = dict(zip(columns, row[len(key_columns) :], strict=True))
    return found


def _treated(
    decl: PipelineDecl, table: TableDecl, rows: list[dict[str, Any]], known: set[str], held_back: list[str]
) -> list[dict[str, Any]]:
    """The personal-data treatment of cursor mode (the same map), applied to changed rows before they leave the
    extract step. Unchanged TOASTed values are set aside first: they are not source values (see ``_toasted``).

    As in cursor mode, a table with personal columns loads no column the warehouse does not have yet (``known``,
    warehouse names) unless it is classified under ``personal:``: such columns are left out and listed in
    ``held_back``."""
    if not table.personal:
        return rows
    treat = personal_data_map(decl.name, table.name, table.personal)
    treated = []
    for row in rows:
        for column in [c for c in row if c not in table.personal and warehouse_name(c) not in known]:
            if known:  # nothing is known before the first load: the copy decides the columns
                row.pop(column)
                if column not in held_back:
                    held_back.append(column)
        unchanged = {c: v for c, v in row.items() if v is UNCHANGED}
        clean = treat({c: v for c, v in row.items() if v is not UNCHANGED})
        for column in unchanged:  # the warehouse column that holds the treated value
            treatment = table.personal.get(column)
            if treatment == DROP:
                continue
            clean[year_column(column) if treatment == YEAR else column] = UNCHANGED
        treated.append(clean)
    return treated


def _toasted(pipeline: dlt.Pipeline, table: TableDecl, rows: list[dict[str, Any]]) -> None:
    """Fill the unchanged TOASTed values of updates with the warehouse's values of the same keys.

    pgoutput sends no value for a large (TOASTed) column an update did not change. Reading the warehouse's value
    here keeps one upsert path (dlt's merge replaces whole rows): a column-subset update would need a second kind of
    load per table and per set of unchanged columns. The row is in the warehouse: the copy or an earlier run loaded
    it (the slot holds every change since the copy), or an earlier change of this batch gave the value already.
    A key the warehouse lacks (a copy taken after that row was deleted and re-inserted elsewhere) is left NULL and
    reported by ``verify``; it cannot happen in commit order from a complete copy.
    """
    waiting = [r for r in rows if any(v is UNCHANGED for v in r.values())]
    if not waiting:
        return
    columns = sorted({c for r in waiting for c, v in r.items() if v is UNCHANGED})
    keys = [tuple(r[k] for k in table.primary_key) for r in waiting]
    current = _warehouse_rows(pipeline, table, keys, [warehouse_name(c) for c in columns])
    for row, key in zip(waiting, keys, strict=True):
        known = current.get(key, {})
        for column in columns:
            if row.get(column) is UNCHANGED:
                row[column] = known.get(warehouse_name(column))


def _arrow(pipeline: dlt.Pipeline, table: TableDecl, rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as an arrow table typed like the warehouse table (dlt's schema): arrow, like the copy, so the
    table gets no ``_dlt_id`` column from dict rows; a column dlt does not know yet is typed from its values."""
    import json

    from dlt.common.libs.pyarrow import get_py_arrow_datatype

    known = {}
    if pipeline.default_schema_name:
        known = pipeline.default_schema.tables.get(warehouse_name(table.name), {}).get("columns", {})
    caps = pipeline.destination.capabilities()
    names: list[str] = []
    for row in rows:
        names += [c for c in row if c not in names]
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        values = [json.dumps(v) if isinstance(v, dict | list) and name in known else v for v in values]
        hint = known.get(warehouse_name(name))
        array = None
        if hint and hint.get("data_type"):
            try:
                array = pa.array(values, type=get_py_arrow_datatype(hint, caps, "UTC"))
            except (pa.ArrowException, ValueError, TypeError):
                array = None
        if array is None:
            array = pa.array(values)
        nullable = name not in table.primary_key
        arrays.append(array)
        fields.append(pa.field(name, array.type, nullable=nullable))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def change_resources(
    pipeline: dlt.Pipeline, decl: PipelineDecl, batch: Batch, held_back: dict[str, list[str]]
) -> tuple[list[Any], dict[str, int]]:
    """One resource per table with changes (upserts and deletion rows, or the table's rows after a truncate), and
    per table the number of deleted keys the warehouse held (for the summary); ``held_back``: see ``_treated``."""
    resources, deleted = [], {}
    now = datetime.now(UTC).replace(tzinfo=None)
    for table in decl.tables:
        last = batch.changes.get(table.name, {})
        truncated = table.name in batch.truncated
        if (not last and not truncated) or table.history:  # history tables: stream_history.py
            continue
        known: set[str] = set()
        if pipeline.default_schema_name:
            known = set(pipeline.default_schema.tables.get(warehouse_name(table.name), {}).get("columns", {}))
        upserts = _treated(
            decl,
            table,
            [row for kind, row in last.values() if kind == "upsert"],
            known,
            held_back.setdefault(table.name, []),
        )
        for row in upserts:  # a value kept from the warehouse (see _apply) in a column the warehouse lacks: none
            for column in [c for c, v in row.items() if v is UNCHANGED and known and warehouse_name(c) not in known]:
                row.pop(column)
        _toasted(pipeline, table, upserts)
        gone = [row for kind, row in last.values() if kind == "delete"]
        deleted[table.name] = (
            0 if truncated else len(_warehouse_rows(pipeline, table, [tuple(r.values()) for r in gone], []))
        )
        rows = [{**r, DELETED_MARKER: None} for r in upserts]
        if not truncated:
            rows += [{**r, DELETED_MARKER: now} for r in gone]
        items = [_arrow(pipeline, table, rows)] if rows else []
        columns: dict[str, Any] = {k: {"name": k, "nullable": False, "primary_key": True} for k in table.primary_key}
        columns[DELETED_MARKER] = {"name": DELETED_MARKER, "data_type": "timestamp", "hard_delete": True}
        resources.append(
            dlt.resource(
                items,
                name=table.name,
                write_disposition="replace" if truncated else "merge",
                primary_key=list(table.primary_key),
                columns=columns,
            )
        )
    return resources, deleted
