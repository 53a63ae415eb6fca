"""History tables (``history: scd2``): every version of a row kept, with validity dates.

dlt's ``scd2`` merge strategy keeps one row per version in the warehouse, identified by a hash of the whole row
(``_datamart_row_version``, computed here: dlt hashes rows only when they are dicts, and our SQL and file tables
arrive as arrow tables; the hash is taken after the personal columns are treated): a load inserts the rows whose
hash the table does not hold as current, sets ``_dlt_valid_from`` to the load's time, and retires the current
versions it replaces by setting their ``_dlt_valid_to``. The current version of a key is the row whose
``_dlt_valid_to`` is null.

The key is the ``merge_key``: an incremental (cursor) load reads only the rows that changed, so only the keys it
read may have their current version retired (without it, every key not read would be retired). With deletes
declared, the same scope is written as dlt's ``destination_scope`` (below), which replaces the ``merge_key``.

Deletes (``deletes: {soft: <column>}`` and ``deletes: {hard: key_set}``) retire the key's current version and
insert none: the rows carrying the deletion marker (the soft-delete column set, or a key-set deletion row) are
kept out of the inserted versions by dlt's ``source_filter``, while the retirement scope (dlt's
``destination_scope``) is every key staged, deletion rows included. A deleted key therefore has no current
version, and its history stays. A key that comes back later gets a new current version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import dlt
import pyarrow as pa
from dlt.extract.resource import DltResource

from datamart.ingest.declarations import VALID_TO, PipelineDecl, TableDecl, warehouse_name

#: The column holding each version's hash of the row (dlt's ``row_version_column_name``).
ROW_VERSION = "_datamart_row_version"


def _quoted(name: str) -> str:
    return '"' + warehouse_name(name).replace('"', '""') + '"'


def history_disposition(table: TableDecl, marker: tuple[str, str] | None) -> dict[str, Any]:
    """dlt's write disposition of a history table; ``marker`` is its deletion marker (column, type) when the
    table declares deletes."""
    disposition: dict[str, Any] = {"disposition": "merge", "strategy": "scd2", "row_version_column_name": ROW_VERSION}
    if table.deletes and marker is not None:
        column, kind = marker
        keys = [_quoted(k) for k in table.primary_key]
        key = keys[0] if len(keys) == 1 else f"({', '.join(keys)})"
        # retire the current version of every key staged, deletion rows included...
        disposition["destination_scope"] = f"{key} IN (SELECT {', '.join(keys)} FROM {{staging_table}})"
        # ...and insert only the rows that are not deletions
        disposition["source_filter"] = (
            f"{_quoted(column)} IS NULL" if kind == "timestamp" else (f"{_quoted(column)} IS NOT TRUE")
        )
    return disposition


def apply_history_hints(resource: DltResource, table: TableDecl, marker: tuple[str, str] | None) -> None:
    """Load ``resource`` as dlt's ``scd2`` with the primary key as ``merge_key`` (see the module's docstring).

    A table whose deletions are key-set rows carrying our own marker column gets that column (null) on every row,
    so the column exists in the staged rows of every load, which the ``source_filter`` reads."""
    disposition = history_disposition(table, marker)
    # with deletes, the destination scope is the key's presence among the staged rows, deletion rows included:
    # dlt then ignores a merge_key (and warns), so it is set only without one
    merge_key = None if "destination_scope" in disposition else list(table.primary_key)
    resource.apply_hints(write_disposition=disposition, merge_key=merge_key)
    if marker is not None and table.deletes and not table.deletes.get("soft"):
        _add_marker(resource, marker[0])
    add_row_version(resource)


def add_row_version(resource: DltResource) -> None:
    """Add to every row the hash of its values (``ROW_VERSION``, a signed 64-bit integer): arrow tables and record
    batches through dlt's ``add_row_hash_to_table`` (pandas' row hash), dict rows through BLAKE2b of their JSON."""
    from dlt.sources.helpers.transform import add_row_hash_to_table

    arrow_hash = add_row_hash_to_table(ROW_VERSION)

    def with_version(item: Any) -> Any:
        if isinstance(item, pa.Table | pa.RecordBatch):
            if ROW_VERSION in item.schema.names:
                return item
            return arrow_hash(item)
        if isinstance(item, dict):
            text = json.dumps({k: v for k, v in item.items() if k != ROW_VERSION}, sort_keys=True, default=str)
            item[ROW_VERSION] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), signed=True)
        return item

    resource.add_map(with_version)


def _add_marker(resource: DltResource, column: str) -> None:
    """Our key-set deletion marker on every row (null), so every load's staged rows have the column the
    ``source_filter`` reads."""
    columns = resource.columns
    if isinstance(columns, dict):
        columns[column] = {"name": column, "data_type": "timestamp", "nullable": True}

    def with_marker(item: Any) -> Any:
        if isinstance(item, pa.Table | pa.RecordBatch):
            if column in item.schema.names:
                return item
            nulls = pa.nulls(item.num_rows, pa.timestamp("us"))
            if isinstance(item, pa.RecordBatch):
                return pa.RecordBatch.from_arrays([*item.columns, nulls], names=[*item.schema.names, column])
            return item.append_column(column, nulls)
        if isinstance(item, dict):
            item.setdefault(column, None)
        return item

    resource.add_map(with_marker)


def refuse_history_on_plain_table(pipeline: dlt.Pipeline, decl: PipelineDecl, names: list[str]) -> None:
    """Stop before anything is read when a table declared ``history: scd2`` was loaded without it: its rows have
    no validity nor row version, so dlt's scd2 would leave each as a second current version of its key."""
    from datamart.ingest.declarations import DeclarationError

    if not pipeline.default_schema_name:
        return
    schema_tables = pipeline.default_schema.tables
    for name in names:
        columns = schema_tables.get(warehouse_name(name), {}).get("columns", {})
        if decl.table(name).history and columns and VALID_TO not in columns:
            raise DeclarationError(
                f"{decl.path.name}: tables.{name}.history: {decl.dataset}.{warehouse_name(name)} was loaded "
                "without history (its rows have no validity dates); drop the table and its state "
                f"(`dlt pipeline {decl.name} drop {name}`, after removing what reads it on PostgreSQL), then run "
                "again: the history starts with that load"
            )
