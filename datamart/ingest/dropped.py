"""Source columns that disappeared: a table whose source (SQL table, or a file to be read) lacks a column the
warehouse table has is stopped before anything is read, with a message saying which column and what to do.

Why stop rather than load: dlt merges a row by deleting it and inserting the new version, so a column the source no
longer sends becomes NULL on every changed row, silently, and the published views show those NULLs (and an append
or replace table would fill it with NULL for every new row). Keeping the old values on some rows and NULLs on
others is not what the source says either. So the table is not loaded (its incremental state does not move: nothing
is lost), the other tables of the run are, the run exits 1 and says, per table, which column went, where it was
seen missing and the two ways out: bring the column back (restore it in the source, or re-export the file with it),
or reload the table as the source now is (``--full-refresh``: the column leaves the raw table, so the models reading
it must change first — a new version of a published view).

A table loaded for the first time, or by ``--full-refresh``, is not checked (it is built from what the source has
now). Declared key, cursor and soft-delete columns are checked by :func:`datamart.ingest.sources.check_columns_exist`
(a declaration error); dlt's own columns, variant columns (``x__v_text``) and personal columns' derived forms are
skipped. JSON-lines files are not checked: a record may rightly omit a key whose value is null.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from datamart.ingest.declarations import PipelineDecl, TableDecl, warehouse_name
from datamart.ingest.personal import YEAR, year_column
from datamart.settings import Warehouse, quote_identifier

INTERNAL_PREFIXES = ("_dlt_", "_datamart")


class TablesStopped(RuntimeError):
    """Some tables of a run were not loaded because their source dropped columns; ``run`` is what was loaded."""

    def __init__(self, run: Any, stopped: dict[str, str], pipeline: PipelineDecl) -> None:
        self.run = run
        self.stopped = stopped
        reasons = "; ".join(f"table {table}: {why}" for table, why in stopped.items())
        super().__init__(f"pipeline '{pipeline.name}': not loaded, a source column is gone: {reasons}")
        first = next(iter(stopped))
        self.hint = (
            f"bring the column back (restore it in the source, or re-export the file with it), then rerun "
            f"`dlt pipeline {pipeline.name} run`; or, if it is gone for good, reload the table as the source now is "
            f"with `dlt pipeline {pipeline.name} run --table {first} --full-refresh` (the column leaves the raw "
            "table: change the models that read it first, with a new version of a published view that shows it). "
            "Loading it as it is would set the column to NULL on every changed row. The other tables were loaded"
        )
        if pipeline.options.get("changes") == "replication":  # the slot moved on: the table is copied whole again
            self.hint = (
                f"bring the column back (restore it in the source), then rerun `dlt pipeline {pipeline.name} run`: "
                f"{first} is copied whole again (its changes read meanwhile were skipped). If it is gone for good, "
                f"drop the table from the warehouse (`dlt pipeline {pipeline.name} drop {first}`, after changing the "
                "models that read it, with a new version of a published view that shows it) and rerun: it is copied "
                "without the column. Loading it as it is would set the column to NULL on every changed row. The "
                "other tables were loaded"
            )


def dropped_columns(
    decl: PipelineDecl, warehouse: Warehouse, tables: list[str], state: dict[str, Any]
) -> dict[str, str]:
    """Per stopped table, why: the warehouse columns its source no longer has (``state``: dlt's pipeline state, for
    the files a file table's run would read)."""
    found: dict[str, str] = {}
    for name in tables:
        table = decl.table(name)
        loaded = [c for c in warehouse.columns(decl.dataset, warehouse_name(name)) if _data_column(c, table)]
        if not loaded:
            continue  # never loaded: built from what the source has now
        if decl.kind == "sql_database":
            why = _sql_gone(decl, table, loaded)
        elif decl.kind == "filesystem" and table.format in ("csv", "parquet"):
            why = _files_gone(decl, table, loaded, state)
        else:
            why = None
        if why and table.history:
            # A history table keeps its past versions, the gone column's values included: once a full refresh wrote
            # new current versions without it (null), the table follows the source and is not stopped again.
            emptied = _empty_in_current_versions(warehouse, decl.dataset, name, table, loaded)
            if emptied:
                loaded = [c for c in loaded if c not in emptied]
                why = (
                    _sql_gone(decl, table, loaded)
                    if decl.kind == "sql_database"
                    else _files_gone(decl, table, loaded, state)
                )
        if why:
            found[name] = why
    return found


def _empty_in_current_versions(
    warehouse: Warehouse, dataset: str, name: str, table: TableDecl, columns: list[str]
) -> set[str]:
    """The ``columns`` null on every current version of a history table (one scan of the current versions)."""
    counts = ", ".join(f"count({quote_identifier(c)})" for c in columns)
    relation = f"{quote_identifier(dataset)}.{quote_identifier(warehouse_name(name))}"
    row = warehouse.query(f"SELECT {counts} FROM {relation} WHERE {table.current_only}")[0]
    return {c for c, n in zip(columns, row, strict=True) if not n}


def _data_column(column: str, table: TableDecl) -> bool:
    names = (*table.primary_key, table.cursor, table.deletes.get("soft"))
    declared = {warehouse_name(c) for c in names if c}
    return not column.startswith(INTERNAL_PREFIXES) and "__v_" not in column and column not in declared


def _expected(table: TableDecl, source_columns: list[str]) -> set[str]:
    """The warehouse names the source's columns load into (a coarsened date loads as its year)."""
    names = {warehouse_name(c) for c in source_columns}
    names |= {warehouse_name(year_column(c)) for c, t in table.personal.items() if t == YEAR and c in source_columns}
    return names


def _sql_gone(decl: PipelineDecl, table: TableDecl, loaded: list[str]) -> str | None:
    import sqlalchemy as sa

    from datamart.ingest.sources import source_credentials

    engine = sa.create_engine(source_credentials(decl))
    try:
        source = [c["name"] for c in sa.inspect(engine).get_columns(table.name, schema=decl.options.get("schema"))]
    except sa.exc.NoSuchTableError:
        return None  # reported by the run itself, with its own message
    finally:
        engine.dispose()
    gone = [c for c in loaded if c not in _expected(table, source)]
    if not gone:
        return None
    return f"column(s) {', '.join(gone)} no longer in the source table {table.name}"


def _files_gone(decl: PipelineDecl, table: TableDecl, loaded: list[str], state: dict[str, Any]) -> str | None:
    """The first file the next run would read that lacks a loaded column (files at or after the cursor's last
    modification date)."""
    from dlt.sources.filesystem import filesystem

    from datamart.ingest.sources import _fs_credentials, bucket_url

    url = bucket_url(decl)
    since = _last_modified(state, decl, table)
    files = sorted(
        filesystem(bucket_url=url, file_glob=str(table.files), **_fs_credentials(decl, url)),
        key=lambda f: (f["modification_date"], f["file_url"]),
    )
    for item in files:
        if since is not None and item["modification_date"] < since:
            continue
        if not item.get("size_in_bytes"):
            continue  # an empty file is skipped by the run
        columns = _file_columns(item, table)
        if columns is None:
            continue  # unreadable: the run stops on it with its own message
        gone = [c for c in loaded if c not in _expected(table, columns)]
        if gone:
            return f"column(s) {', '.join(gone)} missing from file {item['file_name']}"
    return None


def _last_modified(state: dict[str, Any], decl: PipelineDecl, table: TableDecl) -> Any:
    resources = state.get("sources", {}).get(decl.name, {}).get("resources", {})
    resource = resources.get(f"filesystem_{table.name}") or resources.get(table.name) or {}
    return resource.get("incremental", {}).get(str(table.cursor), {}).get("last_value")


def _file_columns(item: Any, table: TableDecl) -> list[str] | None:
    """A file's column names: a Parquet file's schema, a CSV file's header."""
    try:
        if table.format == "parquet":
            import pyarrow.parquet as pq

            with item.open(mode="rb") as raw:
                return list(pq.read_schema(raw).names)
        with item.open(mode="rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
            return next(csv.reader(text, delimiter=table.delimiter or ","), [])
    except Exception:  # noqa: BLE001 - a file that cannot be read stops the run later, named, by checks.py
        return None
