"""The source side: what is compared for a table (:class:`Plan`), and its rows classified (live, pending, in the
lag window, soft-deleted) and digested, read in bounded keyset chunks (SQL) or whole from the bucket (files)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from dlt.common.normalizers.naming.snake_case import NamingConvention

from datamart.ingest.declarations import PipelineDecl, TableDecl
from datamart.ingest.readers import read_file_chunks
from datamart.ingest.sources import CHUNK_SIZE, _fs_credentials, bucket_url, source_credentials
from datamart.ingest.verify.report import Key
from datamart.ingest.verify.values import coerce, row_digest, value_kind


@dataclass
class Plan:
    """What is compared for one table: key, columns (warehouse names) and their kinds, cursor high-water mark."""

    keys: list[str]
    columns: list[str]
    types: dict[str, str]
    source_names: dict[str, str]  # warehouse name → source name
    cursor: str | None
    high_water: Any
    soft: str | None
    window_from: Any = None  # a declared lag: rows with a cursor above it (and up to high_water) are read again


SourceRow = tuple[Key, str, bytes]  # key, "live" | "pending" | "window" | "gone", digest


def classify(plan: Plan, key_values: list[Any], values: list[Any], cursor: Any, soft: Any) -> SourceRow:
    key = tuple(coerce(v, value_kind(plan.types[k])) for v, k in zip(key_values, plan.keys, strict=True))
    status = "live"
    if plan.cursor and plan.high_water is not None and cursor is not None:
        value = coerce(cursor, value_kind(plan.types[plan.cursor]))
        if value > plan.high_water:
            status = "pending"
        elif plan.window_from is not None and value > plan.window_from:
            status = "window"  # the next run reads it again (lag): compared, but a difference is pending
    if status == "live" and plan.soft and coerce(soft, value_kind(plan.types[plan.soft])) not in (None, False):
        status = "gone"
    digest = row_digest(coerce(v, value_kind(plan.types[c])) for v, c in zip(values, plan.columns, strict=True))
    return key, status, digest


def sql_chunks(decl: PipelineDecl, table: TableDecl, plan: Plan, chunk_size: int) -> Iterator[list[SourceRow]]:
    """Source rows in key order, one bounded keyset query per chunk; the last chunk is shorter than chunk_size."""
    engine = sa.create_engine(source_credentials(decl))
    try:
        source = sa.Table(table.name, sa.MetaData(), autoload_with=engine, schema=decl.options.get("schema"))
        key_cols = [source.c[plan.source_names[k]] for k in plan.keys]
        if engine.dialect.name == "postgresql":  # byte order, like the warehouse side and Python's str order
            key_cols = [c.collate("C") if isinstance(c.type, sa.String) else c for c in key_cols]
        value_cols = [source.c[plan.source_names[c]] for c in plan.columns]
        extra = [
            source.c[plan.source_names[plan.cursor]] if plan.cursor else sa.null(),
            source.c[plan.source_names[plan.soft]] if plan.soft else sa.null(),
        ]
        width = len(key_cols)
        last: list[Any] | None = None
        while True:
            query = sa.select(*key_cols, *value_cols, *extra).order_by(*key_cols).limit(chunk_size)
            if last is not None:
                bound = key_cols[0] > last[0] if width == 1 else sa.tuple_(*key_cols) > sa.tuple_(*last)
                query = query.where(bound)
            with engine.connect() as conn:
                rows = conn.execute(query).fetchall()
            chunk = [classify(plan, list(r[:width]), list(r[width:-2]), r[-2], r[-1]) for r in rows]
            yield chunk
            if len(rows) < chunk_size:
                return
            last = list(rows[-1][:width])
    finally:
        engine.dispose()


def file_records(decl: PipelineDecl, table: TableDecl) -> Iterator[dict[str, Any]]:
    """Every row of the files now in the bucket (column names normalised as dlt does), oldest file first."""
    from dlt.sources.filesystem import filesystem  # here: fsspec is loaded only when a file table is read

    url = bucket_url(decl)
    files = sorted(
        filesystem(bucket_url=url, file_glob=str(table.files), **_fs_credentials(decl, url)),
        key=lambda f: (f["modification_date"], f["file_url"]),
    )
    if not files:
        return
    for file in files:  # read as the load reads them (datamart/ingest/readers.py): the same types
        for chunk in read_file_chunks(file, str(table.format), CHUNK_SIZE, table.delimiter):
            for record in chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk:
                yield {normalize(k): v for k, v in record.items()}


def file_chunks(decl: PipelineDecl, table: TableDecl, plan: Plan, chunk_size: int) -> Iterator[list[SourceRow]]:
    """The rows of the files now in the bucket, later files winning on a key, sorted and cut into chunks."""
    rows: dict[Key, SourceRow] = {}
    for names in file_records(decl, table):
        row = classify(plan, [names.get(k) for k in plan.keys], [names.get(c) for c in plan.columns], None, None)
        rows[row[0]] = row
    ordered = [rows[k] for k in sorted(rows)]
    for start in range(0, len(ordered), chunk_size):
        yield ordered[start : start + chunk_size]
    if len(ordered) % chunk_size == 0:
        yield []  # the last chunk is shorter than chunk_size


def normalize(name: str) -> str:
    return NamingConvention().normalize_identifier(name)


def source_columns(decl: PipelineDecl, table: TableDecl) -> list[str]:
    """The source table's column names (SQL sources)."""
    engine = sa.create_engine(source_credentials(decl))
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table.name, schema=decl.options.get("schema"))]
    finally:
        engine.dispose()


def source_count(decl: PipelineDecl, table: TableDecl, where: Any = None) -> int:
    engine = sa.create_engine(source_credentials(decl))
    try:
        source = sa.Table(table.name, sa.MetaData(), autoload_with=engine, schema=decl.options.get("schema"))
        query = sa.select(sa.func.count()).select_from(source)
        if where is not None:
            query = query.where(where(source))
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()
