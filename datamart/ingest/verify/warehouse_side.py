"""The warehouse side: a table's rows streamed in key order as digests, its counts and cursor high-water mark, and
the incremental state dlt keeps there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dlt.common.versioned_state import decompress_state

from datamart.ingest.declarations import PipelineDecl, TableDecl
from datamart.ingest.sources import cursor_path
from datamart.ingest.verify.report import Key
from datamart.ingest.verify.values import coerce, row_digest, value_kind
from datamart.settings import Warehouse, quote_identifier


def order_by(warehouse: Warehouse, keys: list[str], types: dict[str, str]) -> str:
    """ORDER BY the key in byte order on both engines (PostgreSQL's locale collation would differ from Python's)."""
    parts = []
    for key in keys:
        column = quote_identifier(key)
        if value_kind(types[key]) == "text":
            column = warehouse.text_in_byte_order(column)
        parts.append(column)
    return ", ".join(parts)


def warehouse_rows(
    warehouse: Warehouse,
    dataset: str,
    table: str,
    keys: list[str],
    columns: list[str],
    types: dict[str, str],
    current: str = "TRUE",
) -> Iterator[tuple[Key, bytes]]:
    """(key, digest of the compared columns) of every warehouse row (``current``: of those this SQL condition
    keeps, the current versions of a history table), streamed in key order."""
    selected = ", ".join(quote_identifier(c) for c in [*keys, *columns])
    statement = (
        f"SELECT {selected} FROM {quote_identifier(dataset)}.{quote_identifier(table)} WHERE {current} "
        f"ORDER BY {order_by(warehouse, keys, types)}"
    )
    key_kinds = [value_kind(types[k]) for k in keys]
    kinds = [value_kind(types[c]) for c in columns]
    width = len(keys)
    for row in warehouse.stream(statement, 10_000):  # a server-side cursor (PostgreSQL), fetchmany (DuckDB)
        key = tuple(coerce(v, k) for v, k in zip(row[:width], key_kinds, strict=True))
        yield key, row_digest(coerce(v, k) for v, k in zip(row[width:], kinds, strict=True))


def table_count(warehouse: Warehouse, dataset: str, table: str, current: str = "TRUE") -> int:
    """The rows of ``table`` that ``current`` keeps (a history table's current versions)."""
    relation = f"{quote_identifier(dataset)}.{quote_identifier(table)}"
    return int(warehouse.query(f"SELECT count(*) FROM {relation} WHERE {current}")[0][0])


def warehouse_high_water(
    warehouse: Warehouse, dataset: str, table: str, cursor: str, types: dict[str, str], current: str = "TRUE"
) -> Any:
    value = warehouse.query(
        f"SELECT max({quote_identifier(cursor)}) FROM {quote_identifier(dataset)}.{quote_identifier(table)} "
        f"WHERE {current}"
    )[0][0]
    return coerce(value, value_kind(types[cursor]))


def stored_state(warehouse: Warehouse, decl: PipelineDecl) -> dict[str, Any] | None:
    """dlt's pipeline state as the warehouse keeps it (``_dlt_pipeline_state`` of the last completed load), the one
    a run on any worker continues from; None when the warehouse has none."""
    dataset = quote_identifier(decl.dataset)
    if not warehouse.table_exists(decl.dataset, "_dlt_pipeline_state"):
        return None
    rows = warehouse.query(
        f"SELECT s.state FROM {dataset}._dlt_pipeline_state AS s JOIN {dataset}._dlt_loads AS l "
        f"ON l.load_id = s._dlt_load_id WHERE s.pipeline_name = {warehouse.placeholder} AND l.status = 0 "
        "ORDER BY l.load_id DESC LIMIT 1",
        (decl.name,),
    )
    return decompress_state(rows[0][0]) if rows else None


def state_cursor(state: dict[str, Any] | None, decl: PipelineDecl, table: TableDecl) -> Any:
    """The last cursor value dlt recorded for ``table`` (None when it recorded none): the next run reads only rows
    beyond it (minus the declared lag), so a row at or below it that the warehouse lacks is never loaded."""
    if not state or not table.cursor:
        return None
    resources = state.get("sources", {}).get(decl.name, {}).get("resources", {})
    incremental = resources.get(table.name, {}).get("incremental", {})
    return incremental.get(cursor_path(table.cursor), {}).get("last_value")


def stored_schema(warehouse: Warehouse, decl: PipelineDecl) -> Any:
    """dlt's schema of the pipeline as the warehouse keeps it (``_dlt_version``, the newest): the types its tables
    were loaded with; None when the warehouse has none. Stored as JSON, or zlib-compressed base64 (dlt's choice)."""
    import base64
    import binascii
    import json
    import zlib

    from dlt.common.schema import Schema

    if not warehouse.table_exists(decl.dataset, "_dlt_version"):
        return None
    rows = warehouse.query(
        f"SELECT schema FROM {quote_identifier(decl.dataset)}._dlt_version WHERE schema_name = "
        f"{warehouse.placeholder} ORDER BY inserted_at DESC LIMIT 1",
        (decl.name,),
    )
    if not rows:
        return None
    text = rows[0][0]
    try:
        text = zlib.decompress(base64.b64decode(text, validate=True)).decode("utf-8")
    except (binascii.Error, zlib.error, ValueError):
        pass  # plain JSON
    return Schema.from_dict(json.loads(text))


def last_failure(warehouse: Warehouse, decl: PipelineDecl, table: TableDecl) -> str:
    """Why the latest finished run that selected ``table`` did not load it (``ops.pipeline_runs``: failed, and no
    ``ops.pipeline_run_tables`` row for the table); '' when it loaded it, or no run is recorded."""
    from datamart.ingest.ops import OPS_SCHEMA, RUN_TABLES_TABLE, RUNS_TABLE

    if not warehouse.table_exists(OPS_SCHEMA, RUNS_TABLE):
        return ""
    p = warehouse.placeholder
    rows = warehouse.query(
        f"SELECT r.status, r.ended_at, r.error, (SELECT count(*) FROM {OPS_SCHEMA}.{RUN_TABLES_TABLE} t "
        f"WHERE t.run_id = r.run_id AND t.table_name = {p}) FROM {OPS_SCHEMA}.{RUNS_TABLE} r "
        f"WHERE r.pipeline = {p} AND r.status <> 'running' "
        f"AND (coalesce(r.tables, '') = '' OR ',' || r.tables || ',' LIKE {p}) ORDER BY r.started_at DESC LIMIT 1",
        (table.name, decl.name, f"%,{table.name},%"),
    )
    if not rows or rows[0][0] != "failed" or rows[0][3]:
        return ""
    _status, ended, error, _loaded = rows[0]
    when = ended.strftime("%Y-%m-%d %H:%M UTC") if ended is not None else "at an unknown time"
    cause = " ".join(str(error or "no error recorded").split())
    return f"the last run ({when}) did not load it: {cause[:400]}{'…' if len(cause) > 400 else ''}"
