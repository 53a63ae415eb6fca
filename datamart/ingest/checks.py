"""Bad input stops at extract, before anything is loaded, with an error naming the pipeline, the table, the file or
column, and the fix.

- Files are read one by one by dlt's own readers; a file they cannot read (truncated, malformed, not UTF-8) stops
  the run with its name. CSV files are checked first, line by line: a row with a wrong number of fields (a
  truncated file often ends with one) is an error, never a row of nulls. An empty (0-byte) file is skipped with a
  warning: when it is written again, its new modification date makes the next run read it.
- Primary-key columns are checked in each extracted chunk: a null key, or a key twice in one chunk, stops the run
  (a merge would keep one arbitrary row of the duplicates, an append would load both).
- A REST page identical to one already received means the API is looping through the same pages: the run stops
  instead of requesting pages forever (top-level endpoints; a child endpoint read per parent record may rightly
  return the same page twice).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common import logger
from dlt.common.storages.fsspec_filesystem import FileItemDict
from dlt.extract.items_transform import ItemTransform
from dlt.extract.resource import DltResource

from datamart.ingest.declarations import DeclarationError, PipelineDecl, TableDecl, closest


class BadInputError(ValueError):
    """Source data the pipeline refuses to load; the message names pipeline, table, file or column and the fix."""


def checked_file_reader(pipeline: PipelineDecl, table: TableDecl, chunk_size: int) -> DltResource:
    """A transformer reading each listed file in record batches of at most ``chunk_size`` rows (CSV and Parquet:
    :mod:`datamart.ingest.readers`; JSONL: dlt's reader), naming the file on error."""
    from datamart.ingest.readers import read_file_chunks

    @dlt.transformer(name=f"read_{table.format}")
    def read_files(items: Iterable[FileItemDict]) -> Iterator[Any]:
        for item in items:
            if item.get("size_in_bytes") == 0:
                logger.warning(
                    f"pipeline '{pipeline.name}', table {table.name}: file {item['file_name']} is empty, skipped "
                    "(it is read when it is written again)"
                )
                continue
            where = f"pipeline '{pipeline.name}', table {table.name}: file {item['file_name']}"
            fix = f"replace or remove the file in the bucket, then rerun `dlt pipeline {pipeline.name} run`"
            if table.format == "csv":
                check_csv(item, where, fix, pipeline, table)
            try:
                yield from read_file_chunks(item, str(table.format), chunk_size, table.delimiter)
            except Exception as exc:  # noqa: BLE001 - any reader failure names the file, then stops the run
                raise BadInputError(f"{where} cannot be read ({type(exc).__name__}: {exc}); {fix}") from None

    return read_files


def check_personal_columns(pipeline: PipelineDecl, table: TableDecl, files: Iterable[FileItemDict]) -> None:
    """Refuse, before any row is loaded, a ``personal:`` column that none of the table's files has: a misspelt
    name would load the real column in clear. CSV and Parquet files: their headers or footers only; JSONL files:
    the keys of their first records, then of all their records if a declared column is still missing (a JSON
    record has only the keys it has). A column some files lack (older exports) is fine: the treatment applies
    where it exists."""
    from datamart.ingest.readers import file_columns

    if not table.personal or table.format not in ("csv", "parquet", "jsonl"):
        return
    items = [item for item in files if item.get("size_in_bytes") != 0]
    missing, seen, read = set(table.personal), set(), []
    for item in items:
        try:
            names = file_columns(item, str(table.format), table.delimiter)
        except Exception:  # noqa: BLE001, S112 - an unreadable file is named by the load itself (checked_file_reader)
            continue
        read.append(item["file_name"])
        seen.update(names)
        missing -= set(names)
        if not missing:
            return
    if table.format == "jsonl":  # the first records of each file lacked a declared key: read every record's keys
        for item in items:
            try:
                names = file_columns(item, "jsonl", records=None)
            except Exception:  # noqa: BLE001, S112 - named by the load itself, as above
                continue
            seen.update(names)
            missing -= set(names)
            if not missing:
                return
    if not read:
        return  # no file to read: nothing can load in clear
    declared = sorted(missing)[0]
    shown = ", ".join(read[:3]) + (f" and {len(read) - 3} more" if len(read) > 3 else "")
    raise DeclarationError(
        f"{pipeline.path.name}: tables.{table.name}.personal.{declared}: no file of table {table.name} has a column "
        f"{declared!r}{closest(declared, seen)} (files: {shown}; their columns: {', '.join(sorted(seen))}). "
        "Nothing was loaded: correct the name (as the files spell it), or remove the entry if the column "
        "is gone. A misspelt personal column would load the real one in clear."
    )


#: Separators a CSV export uses instead of the comma (French spreadsheets write ";").
OTHER_DELIMITERS = (";", "\t", "|")


def check_csv(
    item: FileItemDict, where: str, fix: str, pipeline: PipelineDecl | None = None, table: TableDecl | None = None
) -> None:
    """Stop on a CSV file that is not UTF-8, has a row with a wrong number of fields, ends inside a quote, or whose
    header lacks the declared key (a file delimited by another character reads as one column)."""
    line = 1
    delimiter = (table.delimiter if table else None) or ","
    try:
        with item.open(mode="rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
            reader = csv.reader(text, strict=True, delimiter=delimiter)
            header = next(reader, None)
            if header is not None and pipeline is not None and table is not None:
                check_header(header, where, pipeline, table, delimiter)
            for row in reader:
                line = reader.line_num
                if row and len(row) != len(header or []):
                    raise BadInputError(
                        f"{where}: line {line} has {len(row)} fields, the header {len(header or [])} "
                        f"(a truncated or malformed file); {fix}"
                    )
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}): export it as UTF-8; {fix}"
        ) from None
    except csv.Error as exc:
        raise BadInputError(f"{where}: line {line + 1}: {exc} (a truncated or malformed file); {fix}") from None


def check_header(header: list[str], where: str, pipeline: PipelineDecl, table: TableDecl, delimiter: str) -> None:
    """The declared primary key must be among the header's columns; a header read as one column that contains
    another usual separator means the file is not delimited by ``delimiter``: say so, and how to declare it."""
    from datamart.ingest.declarations import warehouse_name

    names = {warehouse_name(h) for h in header}
    missing = [k for k in table.primary_key if warehouse_name(k) not in names]
    if not missing:
        return
    shown = repr(delimiter)
    others = [d for d in OTHER_DELIMITERS if d != delimiter and len(header) == 1 and d in header[0]]
    if others:
        found = repr(others[0])
        raise BadInputError(
            f"{where}: the header reads as 1 column ({header[0][:80]!r}) with the delimiter {shown}: the file is "
            f"delimited by {found}, so its columns and the declared primary key ({', '.join(table.primary_key)}) "
            f"do not match. Declare `delimiter: {found}` under tables.{table.name} in {pipeline.path.name} (or export "
            f"the file with {shown}), then rerun `dlt pipeline {pipeline.name} run`; nothing of this run was loaded"
        )
    raise BadInputError(
        f"{where}: the header has no column {missing[0]!r} of the declared primary key (its columns, delimited by "
        f"{shown}: {', '.join(header[:20])}); fix the file's header, or declare the right primary_key (or delimiter) "
        f"under tables.{table.name} in {pipeline.path.name}; nothing of this run was loaded"
    )


class KeyCheck(ItemTransform[Any, dict[str, Any]]):
    """Stops on a null primary-key value, or a key present twice in one extracted chunk."""

    def __init__(self, pipeline: PipelineDecl, table: TableDecl, key: tuple[str, ...]) -> None:
        super().__init__(lambda item: item)
        self.pipeline, self.table, self.key = pipeline, table, key

    def __call__(self, item: Any, meta: Any = None) -> Any:
        """Check the chunk and pass it on unchanged."""
        if isinstance(item, pa.Table | pa.RecordBatch):
            if not all(c in item.schema.names for c in self.key):
                return item  # the declared key was checked against the source's columns before the run
            nulls = {c: item.column(c).null_count for c in self.key}
            duplicated = self._arrow_duplicates(item) if not any(nulls.values()) else []
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            nulls = {c: sum(1 for row in item if _is_null(row.get(c))) for c in self.key}
            counts = Counter(tuple(row.get(c) for c in self.key) for row in item)
            duplicated = [dict(zip(self.key, k, strict=True)) for k, n in counts.items() if n > 1]
        else:
            return item
        where = f"pipeline '{self.pipeline.name}', table {self.table.name}"
        fix = f"fix those rows in the source, or declare the right primary_key in {self.pipeline.path.name}"
        for name, count in nulls.items():
            if count:
                raise BadInputError(f"{where}: {count} row(s) with a null primary key ({name}); {fix}")
        if duplicated:
            raise BadInputError(
                f"{where}: {len(duplicated)} primary key value(s) on more than one row, e.g. {duplicated[:3]}; {fix}"
            )
        return item

    def _arrow_duplicates(self, item: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
        keys = pa.table({c: item.column(c) for c in self.key}).group_by(list(self.key)).aggregate([([], "count_all")])
        return keys.filter(pc.greater(keys.column("count_all"), 1)).drop_columns(["count_all"]).to_pylist()


def _is_null(value: Any) -> bool:
    """None, or the NaN / NaT pandas reads for an empty CSV field."""
    return value is None or value != value  # noqa: PLR0124 - NaN and NaT are the values not equal to themselves


def is_child_endpoint(raw_table: dict[str, Any] | None) -> bool:
    """Whether a REST table is read once per record of a parent (``resolve`` params or ``{…}`` in its path): two
    parents may rightly get the same page, so :class:`PageLoopGuard` does not apply."""
    endpoint = (raw_table or {}).get("endpoint")
    if isinstance(endpoint, str):
        return "{" in endpoint
    if not isinstance(endpoint, dict):
        return False
    params = endpoint.get("params") or {}
    resolved = any(isinstance(v, dict) and v.get("type") == "resolve" for v in params.values())
    return resolved or "{" in str(endpoint.get("path", ""))


class PageLoopGuard(ItemTransform[Any, dict[str, Any]]):
    """Stops when a REST endpoint returns a page it already returned (a pagination loop)."""

    def __init__(self, pipeline: PipelineDecl, table: TableDecl) -> None:
        super().__init__(lambda item: item)
        self.pipeline, self.table = pipeline, table
        self.seen: set[str] = set()

    def __call__(self, item: Any, meta: Any = None) -> Any:
        """Remember the page's digest; a repeat stops the run."""
        if not isinstance(item, list) or not item:
            return item
        digest = hashlib.sha256(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()
        if digest in self.seen:
            raise BadInputError(
                f"pipeline '{self.pipeline.name}', table {self.table.name}: the API returned a page it had already "
                f"returned, after {len(self.seen)} page(s): its pagination loops. Check the endpoint's paginator in "
                f"{self.pipeline.path.name} (e.g. page_number needs total_path or maximum_page), or the API itself"
            )
        self.seen.add(digest)
        return item
