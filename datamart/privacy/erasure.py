"""Right to erasure: prove that a person deleted in the source left no trace in the warehouse nor on disk.

What erasure means here: the person's row is hard-deleted in the source (``deletes: {hard: key_set}`` on the table),
and so are the rows that belong to them (the demo application deletes a volunteer's applications with them; a source
that keeps such rows must at least null their key). The next pipeline run removes those keys from the raw tables, and
the next SQLMesh run rebuilds what derives from them. This module checks every place a copy may survive:

- the raw table (its primary key) and the raw tables of the same dataset that refer to it by the conventional column
  ``<table singular>_id`` (``applications.volunteer_id`` for ``volunteers``);
- dlt's merge staging dataset ``<dataset>_staging`` (the last batch stays there unless ``[load]
  truncate_staging_dataset = true``, set in .dlt/config.toml);
- every SQLMesh model column that carries those keys (column lineage, aggregates excluded), in every version of the
  model: each environment's view and every physical table ``sqlmesh__<schema>.<schema>__<model>__<fingerprint>``,
  old snapshots included;
- the person's pseudonyms (the HMAC of the clear values given with ``--value email=…``) in every text column of every
  table and view of the warehouse;
- data files of load packages in the pipeline's working directory (kept after a load unless ``[load]
  delete_completed_jobs = true``) for those tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamart.gate.base import short_name
from datamart.gate.lineage import LineageIndex, PersonalColumn
from datamart.ingest.declarations import DeclarationError, PipelineDecl, TableDecl, load_named, reference_column
from datamart.ingest.personal import HASH, pseudonym, require_hmac_key
from datamart.settings import Warehouse, quote_identifier
from datamart.transform import sqlmesh_context

_SYSTEM_SCHEMAS = ("information_schema", "pg_catalog", "pg_toast")
_TEXT_TYPES = ("text", "varchar", "character varying", "string")


@dataclass(frozen=True)
class Trace:
    """One place where something of the erased person remains."""

    where: str  # schema.table, or a file path
    detail: str

    def format(self) -> str:
        """One line for the report."""
        return f"{self.where}: {self.detail}"


def find_traces(
    warehouse: Warehouse,
    pipeline: str,
    table: str,
    key: str,
    values: dict[str, str] | None = None,
    context: Any = None,
    pipelines_dir: Path | None = None,
) -> list[Trace]:
    """Every place of the warehouse and of the pipeline's working dir where source key ``key`` (or the pseudonyms of
    ``values``, clear values of the table's ``hash`` columns) of ``<pipeline>.<table>`` remains; empty when erased."""
    decl = load_named(pipeline)
    table_decl = decl.table(table)
    if len(table_decl.primary_key) != 1:
        raise DeclarationError(
            f"{decl.path.name}: tables.{table}.primary_key: the erasure check needs a one-column primary key, "
            f"not {list(table_decl.primary_key) or 'none'}"
        )
    values = values or {}
    for column in values:
        if table_decl.personal.get(column) != HASH:
            hashed = [c for c, t in table_decl.personal.items() if t == HASH] or ["none"]
            raise DeclarationError(
                f"--value {column}=…: {pipeline}.{table}.{column} is not a hashed personal column; "
                f"hashed columns: {', '.join(hashed)}"
            )
    if context is None:
        context = sqlmesh_context(warehouse)
        try:
            return _find_traces(warehouse, decl, table_decl, key, values, context, pipelines_dir)
        finally:
            context.close()  # DuckDB: one writer per file; release it for the next run
    return _find_traces(warehouse, decl, table_decl, key, values, context, pipelines_dir)


def _find_traces(
    warehouse: Warehouse,
    decl: PipelineDecl,
    table_decl: TableDecl,
    key: str,
    values: dict[str, str],
    context: Any,
    pipelines_dir: Path | None,
) -> list[Trace]:
    pipeline, table = decl.name, table_decl.name
    columns = _warehouse_columns(warehouse)
    raw_key = table_decl.primary_key[0]
    referencing = reference_column(table)
    # (schema, table) -> key columns to search
    targets: dict[tuple[str, str], set[str]] = {}
    raw_keys = []
    for (schema, relation), cols in columns.items():
        if schema not in (decl.dataset, f"{decl.dataset}_staging"):
            continue
        if relation == table and raw_key in cols:
            targets.setdefault((schema, relation), set()).add(raw_key)
            if schema == decl.dataset:
                raw_keys.append((relation, raw_key))
        elif referencing in cols and not relation.startswith("_dlt"):
            targets.setdefault((schema, relation), set()).add(referencing)
            if schema == decl.dataset:
                raw_keys.append((relation, referencing))
    key_columns = [PersonalColumn(pipeline, t, c, "key", decl.dataset, c) for t, c in raw_keys]
    index = LineageIndex(context, key_columns)
    for model in context.models.values():
        if model.kind.is_external:
            continue
        name = short_name(model.fqn)
        carried = {c for c in model.columns_to_types or {} if any(not o.aggregated for o in index.origins(name, c))}
        if carried:
            for relation in _versions(name, columns):
                targets.setdefault(relation, set()).update(carried & columns[relation])
    traces = []
    for (schema, relation), cols in sorted(targets.items()):
        for column in sorted(cols):
            traces += _search(warehouse, schema, relation, column, key, f"source key {table}.{raw_key} = {key}")
    if values:
        secret = require_hmac_key(pipeline)
        for column, clear in sorted(values.items()):
            hashed = pseudonym(secret, clear)
            for (schema, relation), cols in sorted(columns.items()):
                for text_column in sorted(cols):
                    if columns.types.get((schema, relation, text_column), "") in _TEXT_TYPES:
                        traces += _search(
                            warehouse, schema, relation, text_column, str(hashed), f"pseudonym of {table}.{column}"
                        )
    traces += _load_package_files(pipeline, [t for t, _ in raw_keys] or [table], warehouse, pipelines_dir)
    return traces


class _Columns(dict):  # (schema, table) -> set of columns, with the types aside
    types: dict[tuple[str, str, str], str]


def _warehouse_columns(warehouse: Warehouse) -> _Columns:
    rows = warehouse.query(
        "SELECT table_schema, table_name, column_name, lower(data_type) FROM information_schema.columns "
        f"WHERE table_schema NOT IN ({', '.join(repr(s) for s in _SYSTEM_SCHEMAS)})"
    )
    columns = _Columns()
    columns.types = {}
    for schema, relation, column, data_type in rows:
        columns.setdefault((schema, relation), set()).add(column)
        columns.types[(schema, relation, column)] = data_type
    return columns


def _versions(model: str, columns: _Columns) -> list[tuple[str, str]]:
    """Every relation holding a version of ``model`` (schema.name): environment views and physical tables."""
    schema, name = model.split(".")
    found = []
    for rel_schema, relation in columns:
        if relation == name and (rel_schema == schema or rel_schema.startswith(f"{schema}__")):
            found.append((rel_schema, relation))
        elif rel_schema == f"sqlmesh__{schema}" and relation.startswith(f"{schema}__{name}__"):
            found.append((rel_schema, relation))
    return sorted(found)


def _search(warehouse: Warehouse, schema: str, relation: str, column: str, value: str, what: str) -> list[Trace]:
    qualified = f"{quote_identifier(schema)}.{quote_identifier(relation)}"
    placeholder = warehouse.placeholder
    statement = f"SELECT count(*) FROM {qualified} WHERE CAST({quote_identifier(column)} AS TEXT) = {placeholder}"
    try:
        count = int(warehouse.query(statement, (value,))[0][0])
    except Exception as exc:  # noqa: BLE001 - reported: absence cannot be proven for this relation
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [Trace(f"{schema}.{relation}", f"could not be checked ({first}): drop or repair it, then check again")]
    if count:
        return [Trace(f"{schema}.{relation}", f"{what} in column {column} ({count} row(s))")]
    return []


def _load_package_files(
    pipeline: str, tables: list[str], warehouse: Warehouse, pipelines_dir: Path | None
) -> list[Trace]:
    """Data files of the tables kept in the pipeline's working dir (load packages loaded, pending or extracted)."""
    from datamart.ingest.loading import default_pipelines_dir

    working_dir = (pipelines_dir or default_pipelines_dir(warehouse)) / pipeline
    if not working_dir.exists():
        return []
    traces = []
    for folder, _, files in os.walk(working_dir):
        if not Path(folder).name.endswith("_jobs"):
            continue
        for file in sorted(files):
            if any(file.startswith(f"{t}.") for t in tables):
                path = Path(folder) / file
                traces.append(
                    Trace(
                        str(path),
                        "data file of a load package, may hold the erased rows: set [load] delete_completed_jobs = "
                        "true in .dlt/config.toml and delete it (loaded packages never need their data again)",
                    )
                )
    return traces
