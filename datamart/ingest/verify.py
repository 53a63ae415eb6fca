"""Reconciliation: does the warehouse hold what the source holds? Row counts, key sets and per-range checksums.

``verify_pipeline`` compares every declared table (or ``tables``) of a pipeline with its source and locates a drift:
which keys are missing from the warehouse, which are extra, which rows differ, and in which key range.

How a table is read and compared, by kind:

- **SQL tables with a primary key** (merge, append, replace): the source is read in keyed chunks — ``WHERE key >
  last ORDER BY key LIMIT chunk_size``, each chunk a short query on the source's primary-key index, so tens of
  millions of rows never sit in memory nor hold a long transaction on the replica. The warehouse table is streamed
  in the same key order (one ordered server-side cursor) and merged with each chunk: per chunk, the key sets and a
  checksum of the compared columns on both sides. Compared columns: those present in the source and the warehouse,
  minus the primary key (compared as the key set), the personal columns (``hash``, ``drop``, ``year``: what the
  warehouse holds is derived from them, not equal to them; ``keep`` columns are compared), the soft-delete marker
  and dlt's own columns. Values are compared after conversion to the warehouse column's type (a SQLite text
  timestamp and a DuckDB timestamp are equal), timestamps in UTC.
- **Rows not loaded yet are not drift**: a source row whose cursor is beyond the last cursor value dlt recorded
  in the warehouse's state (``_dlt_pipeline_state``, minus the table's ``lag``) is *pending* (the next run loads
  it); it is counted, not compared. A row at or below that value missing from the warehouse is drift: no run
  reads it again (rows lost by a restore or a failover). Without a state, the warehouse's highest value stands
  in. A soft-deleted source row must be absent from the warehouse. Keys deleted from the source stay in the
  warehouse by design when the table declares no ``deletes: {hard: key_set}``: they are counted as *kept*, not
  drift; with ``hard: key_set`` they are drift until the next run removes them (run, then verify).
- **History tables** (``history: scd2``): their current versions (``_dlt_valid_to`` null) are compared as above,
  one per key like the source; the retired versions are history, compared with nothing. ``full_compare`` compares
  the current versions of both loads.
- **Tables without a primary key**: row counts only (rows up to dlt's recorded cursor value).
- **File tables** (filesystem): the rows of the files currently in the bucket, read whole (dump files are small) in
  modification order, a later file's row replacing an earlier one with the same key (the merge's result), then
  compared by key range like SQL tables. Files removed from the bucket leave their rows in the warehouse (kept).
- **REST tables**: skipped, warehouse row count only. An API gives no keyed, ordered, bounded read: comparing would
  download the whole collection again at every check and spend the API's rate limit. Use ``--full-compare``.

``full_compare`` (``dlt pipeline <name> verify --full-compare --table T``) reloads one table from scratch into a
scratch dataset ``<dataset>_verify`` with the same code and declaration, diffs it with the incrementally
maintained table the same way (all columns but dlt's, personal pseudonyms included), then drops the scratch dataset.

Both take the pipeline's lock (a load changing the warehouse mid-comparison would look like drift).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from datamart.ingest.declarations import PipelineDecl, TableDecl
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.personal import KEEP, year_column
from datamart.settings import Warehouse, quote_identifier

DEFAULT_CHUNK = 50_000
EXAMPLES = 5
INTERNAL_PREFIXES = ("_dlt_", "_datamart_")
Key = tuple[Any, ...]


@dataclass
class RangeDrift:
    """One key range whose rows differ between the source and the warehouse."""

    first: str
    last: str
    source_rows: int
    warehouse_rows: int
    missing: int
    extra: int
    changed: int
    source_checksum: str
    warehouse_checksum: str
    columns: tuple[str, ...] = ()  # the compared columns whose values differ in the changed rows (names only)


@dataclass
class TableCheck:
    """The comparison of one table."""

    table: str
    method: str  # "keys+checksums", "counts", "skipped", "not loaded"
    source_rows: int | None = None
    warehouse_rows: int | None = None
    pending: int = 0
    missing: int = 0
    extra: int = 0
    changed: int = 0
    kept: int = 0
    chunks: int = 0
    missing_examples: list[str] = field(default_factory=list)
    extra_examples: list[str] = field(default_factory=list)
    changed_examples: list[str] = field(default_factory=list)
    ranges: list[RangeDrift] = field(default_factory=list)
    columns: tuple[str, ...] = ()
    # changed rows per differing column (names only: the values, personal or not, are never reported)
    changed_columns: dict[str, int] = field(default_factory=dict)
    # source columns the warehouse table lacks (never loaded), and those a run holds back on purpose (an
    # unclassified column of a table with personal data: classified under personal:, not repaired)
    missing_columns: tuple[str, ...] = ()
    held_back_columns: tuple[str, ...] = ()
    note: str = ""
    fix: str = ""
    # for ``verify --repair`` (datamart/ingest/repair.py), not printed: the runs of consecutive differing keys as
    # [first, last, equal keys since the previous run], and the warehouse keys to delete (gone from the source
    # where deletions must follow)
    spans: list[list[Any]] = field(default_factory=list)
    gone: list[Key] = field(default_factory=list)
    _equal_since_span: int = 0

    @property
    def drift(self) -> bool:
        """True when the warehouse does not hold what the source holds."""
        if self.method == "skipped":
            return False
        if self.method == "not loaded":
            return bool(self.source_rows)
        if self.method == "counts":
            return self.source_rows != self.warehouse_rows or bool(self.missing_columns)
        return bool(self.missing or self.extra or self.changed or self.missing_columns)


@dataclass
class VerifyReport:
    """What :func:`verify_pipeline` found, per table; ``drift`` is True when any table differs."""

    pipeline: str
    dataset: str
    warehouse: str
    tables: list[TableCheck] = field(default_factory=list)
    elapsed: float = 0.0
    title: str = "verify"

    @property
    def drift(self) -> bool:
        """True when any table drifted."""
        return any(t.drift for t in self.tables)

    def format(self) -> str:
        """A table per pipeline, then each drift located (key ranges, example keys) with the command that fixes it."""
        lines = [f"{self.title} {self.pipeline} → {self.warehouse}, dataset {self.dataset}"]
        head = (
            f"{'table':<24}{'compared':<16}{'source':>10}{'warehouse':>11}{'pending':>9}{'missing':>9}{'extra':>8}"
            f"{'changed':>9}{'kept':>7}  result"
        )
        lines.append(head)

        def n(value: int | None) -> str:
            return "-" if value is None else f"{value:,}"

        for t in self.tables:
            result = "DRIFT" if t.drift else ("skipped" if t.method == "skipped" else "ok")
            lines.append(
                f"{t.table:<24}{t.method:<16}{n(t.source_rows):>10}{n(t.warehouse_rows):>11}{t.pending:>9,}"
                f"{t.missing:>9,}{t.extra:>8,}{t.changed:>9,}{t.kept:>7,}  {result}"
            )
        for t in self.tables:
            if t.note and (t.drift or t.method in ("skipped", "counts")):
                lines.append(f"  {t.table}: {t.note}")
            if t.held_back_columns:
                lines.append(
                    f"  {t.table}: source column(s) {', '.join(t.held_back_columns)} held back (the table holds "
                    f"personal data): classify them under personal: in {self.pipeline}.yaml, a run then loads them"
                )
            if not t.drift:
                continue
            where = f"{self.dataset}.{t.table}"
            if t.missing_examples:
                lines.append(
                    f"  {where}: {t.missing:,} key(s) missing from the warehouse, e.g. {_ex(t.missing_examples)}"
                )
            if t.extra_examples:
                lines.append(
                    f"  {where}: {t.extra:,} key(s) in the warehouse, not in the source, e.g. {_ex(t.extra_examples)}"
                )
            if t.missing_columns:
                lines.append(
                    f"  {where}: source column(s) not in the warehouse: {', '.join(t.missing_columns)} (never loaded: "
                    f"`dlt pipeline {self.pipeline} verify --repair --table {t.table}` reloads the table with them)"
                )
            if t.changed_examples:
                lines.append(f"  {where}: {t.changed:,} row(s) with different values, e.g. {_ex(t.changed_examples)}")
            if t.changed_columns:
                counts = ", ".join(f"{c} ({n:,} rows)" for c, n in t.changed_columns.items())
                lines.append(f"  {where}: columns that differ: {counts}")
            for r in t.ranges[:EXAMPLES]:
                differ = f"; columns {', '.join(r.columns)}" if r.columns else ""
                lines.append(
                    f"  {where}: key range {r.first} … {r.last}: source {r.source_rows:,} rows, warehouse "
                    f"{r.warehouse_rows:,}; missing {r.missing:,}, extra {r.extra:,}, changed {r.changed:,}{differ}; "
                    f"checksum {r.source_checksum} ≠ {r.warehouse_checksum}"
                )
            if len(t.ranges) > EXAMPLES:
                lines.append(f"  {where}: … and {len(t.ranges) - EXAMPLES} more key range(s)")
            if t.fix:
                lines.append(f"  DRIFT in pipeline {self.pipeline}, table {t.table}: fix with `{t.fix}`")
        drifted = [t.table for t in self.tables if t.drift]
        verdict = f"DRIFT in {', '.join(drifted)}" if drifted else "no drift"
        lines.append(f"{self.pipeline}: {verdict} ({self.elapsed:.1f}s)")
        return "\n".join(lines)


def _ex(examples: list[str]) -> str:
    return ", ".join(examples)


# --- values -------------------------------------------------------------------------------------------------------


def value_kind(sql_type: str) -> str:
    """The comparison kind of a warehouse column type (DuckDB or PostgreSQL spelling)."""
    t = sql_type.lower()
    if "timestamp" in t:
        return "timestamp"
    if t == "date":
        return "date"
    if t.startswith("time"):
        return "time"
    if "int" in t and "interval" not in t:
        return "int"
    if any(word in t for word in ("double", "real", "float")):
        return "float"
    if "decimal" in t or "numeric" in t:
        return "decimal"
    if "bool" in t:
        return "bool"
    if "json" in t:
        return "json"
    if "blob" in t or "bytea" in t:
        return "bytes"
    return "text"


def coerce(value: Any, kind: str) -> Any:
    """``value`` as the Python value of a warehouse column of ``kind`` (timestamps naive UTC); None stays None."""
    if value is None:
        return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    elif hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "decimal":
            return Decimal(str(value)).normalize()
        if kind == "bool":
            return value.strip().lower() in ("true", "t", "1", "yes") if isinstance(value, str) else bool(value)
        if kind == "timestamp":
            if isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            elif isinstance(value, date) and not isinstance(value, datetime):
                value = datetime(value.year, value.month, value.day)
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return value
        if kind == "date":
            if isinstance(value, datetime):
                return value.date()
            return date.fromisoformat(value[:10]) if isinstance(value, str) else value
        if kind == "json":
            return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True, default=str)
        if kind == "bytes":
            return bytes(value)
        return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError, ArithmeticError):
        return ("uncomparable", str(value))  # differs from any well-typed value: reported as a changed row


def _canonical(value: Any) -> str:
    if value is None:
        return "\x00"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def row_digest(values: Iterable[Any]) -> bytes:
    """The digest of a row of already coerced values: 8 bytes of the whole row, then 4 per column (CRC-32), so
    that a changed row tells which columns differ (:func:`differing_columns`) without keeping any value."""
    parts = [_canonical(v).encode() for v in values]
    whole = hashlib.blake2b(b"\x1e".join(parts), digest_size=8).digest()
    return whole + b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)


def differing_columns(left: bytes, right: bytes, columns: Iterable[str]) -> list[str]:
    """The columns whose per-column digests differ between two row digests of :func:`row_digest`."""
    return [c for i, c in enumerate(columns) if left[8 + 4 * i : 12 + 4 * i] != right[8 + 4 * i : 12 + 4 * i]]


def checksum(digests: Iterable[bytes]) -> str:
    """An order-independent checksum of row digests (8 hex characters)."""
    return hashlib.blake2b(b"".join(sorted(d[:8] for d in digests)), digest_size=4).hexdigest()


def _key_text(key: Key) -> str:
    parts = [_canonical(k) if not isinstance(k, str) else k for k in key]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


# --- the warehouse side -------------------------------------------------------------------------------------------


def _order_by(warehouse: Warehouse, keys: list[str], types: dict[str, str]) -> str:
    """ORDER BY the key in byte order on both engines (PostgreSQL's locale collation would differ from Python's)."""
    parts = []
    for key in keys:
        column = quote_identifier(key)
        if value_kind(types[key]) == "text":
            column = warehouse.text_in_byte_order(column)
        parts.append(column)
    return ", ".join(parts)


def _warehouse_rows(
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
        f"ORDER BY {_order_by(warehouse, keys, types)}"
    )
    key_kinds = [value_kind(types[k]) for k in keys]
    kinds = [value_kind(types[c]) for c in columns]
    width = len(keys)
    for row in _stream(warehouse, statement):
        key = tuple(coerce(v, k) for v, k in zip(row[:width], key_kinds, strict=True))
        yield key, row_digest(coerce(v, k) for v, k in zip(row[width:], kinds, strict=True))


def _stream(warehouse: Warehouse, statement: str, batch: int = 10_000) -> Iterator[tuple[Any, ...]]:
    """Rows of one query, fetched in batches through a server-side cursor (PostgreSQL) or DuckDB's fetchmany."""
    return warehouse.stream(statement, batch)


# --- the source side ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
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


def _classify(plan: _Plan, key_values: list[Any], values: list[Any], cursor: Any, soft: Any) -> SourceRow:
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


def _sql_chunks(decl: PipelineDecl, table: TableDecl, plan: _Plan, chunk_size: int) -> Iterator[list[SourceRow]]:
    """Source rows in key order, one bounded keyset query per chunk; the last chunk is shorter than chunk_size."""
    import sqlalchemy as sa

    from datamart.ingest.sources import source_credentials

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
            chunk = [_classify(plan, list(r[:width]), list(r[width:-2]), r[-2], r[-1]) for r in rows]
            yield chunk
            if len(rows) < chunk_size:
                return
            last = list(rows[-1][:width])
    finally:
        engine.dispose()


def _file_records(decl: PipelineDecl, table: TableDecl) -> Iterator[dict[str, Any]]:
    """Every row of the files now in the bucket (column names normalised as dlt does), oldest file first."""
    from dlt.sources.filesystem import filesystem

    from datamart.ingest.readers import read_file_chunks
    from datamart.ingest.sources import CHUNK_SIZE, _fs_credentials, bucket_url

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
                yield {_normalize(k): v for k, v in record.items()}


def _file_chunks(decl: PipelineDecl, table: TableDecl, plan: _Plan, chunk_size: int) -> Iterator[list[SourceRow]]:
    """The rows of the files now in the bucket, later files winning on a key, sorted and cut into chunks."""
    rows: dict[Key, SourceRow] = {}
    for names in _file_records(decl, table):
        row = _classify(plan, [names.get(k) for k in plan.keys], [names.get(c) for c in plan.columns], None, None)
        rows[row[0]] = row
    ordered = [rows[k] for k in sorted(rows)]
    for start in range(0, len(ordered), chunk_size):
        yield ordered[start : start + chunk_size]
    if len(ordered) % chunk_size == 0:
        yield []  # the last chunk is shorter than chunk_size


def _normalize(name: str) -> str:
    from dlt.common.normalizers.naming.snake_case import NamingConvention

    return NamingConvention().normalize_identifier(name)


def _source_columns(decl: PipelineDecl, table: TableDecl) -> list[str]:
    """The source table's column names (SQL sources)."""
    import sqlalchemy as sa

    from datamart.ingest.sources import source_credentials

    engine = sa.create_engine(source_credentials(decl))
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table.name, schema=decl.options.get("schema"))]
    finally:
        engine.dispose()


# --- the comparison -----------------------------------------------------------------------------------------------


class _Peek:
    def __init__(self, it: Iterator[tuple[Key, bytes]]) -> None:
        self._it = it
        self._next: tuple[Key, bytes] | None = None
        self._done = False

    def peek(self) -> tuple[Key, bytes] | None:
        if self._next is None and not self._done:
            self._next = next(self._it, None)
            self._done = self._next is None
        return self._next

    def pop(self) -> tuple[Key, bytes]:
        item = self.peek()
        assert item is not None
        self._next = None
        return item


def compare_sorted(
    check: TableCheck,
    left: Iterator[list[SourceRow]],
    right: Iterator[tuple[Key, bytes]],
    chunk_size: int,
    deletions_expected: bool,
) -> None:
    """Merge source chunks with the warehouse stream (both in key order); fill ``check`` per key range.

    ``deletions_expected``: keys gone from the source must be gone from the warehouse (else they are only *kept*).
    """
    warehouse = _Peek(right)
    check.source_rows = check.warehouse_rows = 0
    for chunk in left:
        last_chunk = len(chunk) < chunk_size
        upper = max(row[0] for row in chunk) if chunk else None
        wh_rows: dict[Key, bytes] = {}
        twice: list[Key] = []
        while (item := warehouse.peek()) is not None and (last_chunk or item[0] <= upper):
            key, digest = warehouse.pop()
            if key in wh_rows:
                twice.append(key)  # a key loaded twice: a duplicate row in the warehouse
            wh_rows[key] = digest
        check.chunks += 1
        _compare_chunk(check, chunk, wh_rows, deletions_expected, twice)
        if last_chunk:
            break
    while warehouse.peek() is not None:  # defensive: the left side ended on a full chunk
        key, digest = warehouse.pop()
        _compare_chunk(check, [], {key: digest}, deletions_expected)


def _compare_chunk(
    check: TableCheck,
    chunk: list[SourceRow],
    wh_rows: dict[Key, bytes],
    deletions_expected: bool,
    twice: list[Key] | None = None,
) -> None:
    source = {key: (status, digest) for key, status, digest in chunk}
    for key, (status, digest) in list(source.items()):
        if status == "window":  # in the lag window: equal is compared as live, different is for the next run
            source[key] = ("live", digest) if wh_rows.get(key) == digest else ("pending", digest)
    missing: list[Key] = []
    changed: list[Key] = []
    kept: list[Key] = []
    extra: list[Key] = list(twice or [])
    for key, (status, digest) in source.items():
        if status == "pending":
            check.pending += 1
        elif status == "live":
            if key not in wh_rows:
                missing.append(key)
            elif wh_rows[key] != digest:
                changed.append(key)
    for key in wh_rows:
        status = source.get(key, ("absent", b""))[0]
        if status == "gone" or (status == "absent" and deletions_expected):
            extra.append(key)
        elif status == "absent":
            kept.append(key)
    live = [digest for status, digest in source.values() if status == "live"]
    compared_wh = [d for k, d in wh_rows.items() if source.get(k, ("absent",))[0] != "pending" and k not in kept]
    check.source_rows = (check.source_rows or 0) + len(live)
    check.warehouse_rows = (check.warehouse_rows or 0) + len(wh_rows) + len(twice or [])
    check.kept += len(kept)
    if not (missing or extra or changed):
        check._equal_since_span += len(source.keys() | wh_rows.keys())
        return
    _locate(check, source, wh_rows, {*missing, *extra, *changed}, deletions_expected)
    columns: dict[str, int] = {}
    for key in changed:
        for column in differing_columns(source[key][1], wh_rows[key], check.columns):
            columns[column] = columns.get(column, 0) + 1
    for column, count in columns.items():
        check.changed_columns[column] = check.changed_columns.get(column, 0) + count
    check.missing += len(missing)
    check.extra += len(extra)
    check.changed += len(changed)
    for examples, keys in (
        (check.missing_examples, missing),
        (check.extra_examples, extra),
        (check.changed_examples, changed),
    ):
        examples.extend(
            _key_text(k) + (" (twice)" if twice and k in twice else "") for k in keys[: EXAMPLES - len(examples)]
        )
    every = sorted([*source, *wh_rows])
    check.ranges.append(
        RangeDrift(
            first=_key_text(every[0]),
            last=_key_text(every[-1]),
            source_rows=len(live),
            warehouse_rows=len(compared_wh) + len(twice or []),
            missing=len(missing),
            extra=len(extra),
            changed=len(changed),
            source_checksum=checksum(live),
            warehouse_checksum=checksum(compared_wh),
            columns=tuple(c for c in check.columns if c in columns),
        )
    )


def _locate(
    check: TableCheck,
    source: dict[Key, tuple[str, bytes]],
    wh_rows: dict[Key, bytes],
    differing: set[Key],
    deletions_expected: bool,
) -> None:
    """Record for the repair the runs of consecutive differing keys (``check.spans``) and the warehouse keys the
    source no longer has where deletions must follow (``check.gone``)."""
    for key in sorted(source.keys() | wh_rows.keys()):
        if key not in differing:
            check._equal_since_span += 1
            continue
        if check.spans and check._equal_since_span == 0:
            check.spans[-1][1] = key  # the run of differing keys goes on
        else:
            check.spans.append([key, key, check._equal_since_span])
        check._equal_since_span = 0
        if key not in source and deletions_expected:
            check.gone.append(key)


# --- per table ----------------------------------------------------------------------------------------------------


def _excluded(table: TableDecl) -> set[str]:
    """Warehouse columns never compared: personal ones (as loaded) and the soft-delete marker."""
    names = set()
    for column, treatment in table.personal.items():
        if treatment != KEEP:
            names |= {_normalize(column), _normalize(year_column(column))}
    if table.deletes.get("soft"):
        names.add(_normalize(table.deletes["soft"]))
    return names


def _high_water(
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
    from dlt.common.versioned_state import decompress_state

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
    from datamart.ingest.sources import cursor_path

    if not state or not table.cursor:
        return None
    resources = state.get("sources", {}).get(decl.name, {}).get("resources", {})
    incremental = resources.get(table.name, {}).get("incremental", {})
    return incremental.get(cursor_path(table.cursor), {}).get("last_value")


def _reread_from(value: Any, kind: str, lag: float | None) -> Any:
    """The lowest cursor value the next run reads again: dlt's last value minus the table's lag."""
    if value is None or not lag:
        return value
    if kind in ("timestamp", "date"):
        from datetime import timedelta

        return value - timedelta(seconds=lag)
    if kind in ("int", "float", "decimal"):
        return value - type(value)(lag) if kind != "decimal" else value - Decimal(str(lag))
    return value


def verify_table(
    decl: PipelineDecl, warehouse: Warehouse, table: TableDecl, chunk_size: int = DEFAULT_CHUNK
) -> TableCheck:
    """Compare one declared table with its source (see the module's docstring for what is compared per kind)."""
    name = _normalize(table.name)
    types = warehouse.columns(decl.dataset, name)
    refresh = f"dlt pipeline {decl.name} run --table {table.name} --full-refresh"
    if decl.kind == "rest_api":
        count = _count(warehouse, decl.dataset, name) if types else 0
        return TableCheck(
            table=table.name,
            method="skipped",
            warehouse_rows=count,
            note="REST API: not compared (no keyed, bounded read of an API; comparing would download the whole "
            f"collection and spend its rate limit); use `dlt pipeline {decl.name} verify --full-compare --table "
            f"{table.name}`",
        )
    if decl.kind == "sql_database":
        source_names = {_normalize(c): c for c in _source_columns(decl, table)}
    else:  # file columns are only known from the files: the warehouse's columns are looked up in each record
        source_names = {c: c for c in types}
    if not types:
        check = TableCheck(
            table=table.name, method="not loaded", warehouse_rows=0, fix=refresh.replace(" --full-refresh", "")
        )
        check.note = "the table is not in the warehouse: it was never loaded"
        if decl.kind == "sql_database":
            check.source_rows = _source_count(decl, table)
        else:
            check.source_rows = sum(1 for _ in _file_records(decl, table))
        return check
    keys = [_normalize(k) for k in table.primary_key]
    excluded = _excluded(table) | set(keys)
    columns = [c for c in types if c in source_names and c not in excluded and not c.startswith(INTERNAL_PREFIXES)]
    cursor = _normalize(table.cursor) if table.cursor else None
    if cursor not in types or cursor not in source_names:
        cursor = None  # a file table's cursor is the file's modification date: not a column
    soft = _normalize(table.deletes["soft"]) if table.deletes.get("soft") else None
    if soft is not None and soft not in source_names:
        soft = None
    # a history table mirrors the source by its current versions: the retired ones are compared with nothing
    current = table.current_only
    high_water, recorded = None, None
    if cursor:
        # Rows beyond the cursor dlt recorded are pending: the next run reads them. The warehouse's own highest
        # value is only a stand-in when dlt's state is gone: rows lost from the warehouse (a restore, a failover)
        # below dlt's cursor are never read again, hence drift, not pending.
        recorded = state_cursor(stored_state(warehouse, decl), decl, table)
        kind = value_kind(types[cursor])
        if recorded is not None:
            high_water = coerce(recorded, kind)
        else:
            high_water = _high_water(warehouse, decl.dataset, name, cursor, types, current)
    if soft and soft not in types:
        types = {**types, soft: "timestamp"}
    window_from = _reread_from(high_water, value_kind(types[cursor]), table.lag) if cursor and table.lag else None
    plan = _Plan(keys, columns, types, source_names, cursor, high_water, soft, window_from)
    missing_columns, held_back = _columns_not_loaded(decl, table, types, source_names, soft)
    if not keys:
        check = _counts_only(decl, warehouse, table, plan, refresh)
        check.missing_columns, check.held_back_columns = missing_columns, held_back
        return check
    # SQL tables: the repair reloads only the key ranges that differ (datamart/ingest/repair.py); files are read whole
    repair = f"dlt pipeline {decl.name} verify --repair --table {table.name}"
    fix = repair if decl.kind == "sql_database" else refresh
    check = TableCheck(table=table.name, method="keys+checksums", columns=tuple(columns), fix=fix)
    check.missing_columns, check.held_back_columns = missing_columns, held_back
    chunks = (
        _sql_chunks(decl, table, plan, chunk_size)
        if decl.kind == "sql_database"
        else _file_chunks(decl, table, plan, chunk_size)
    )
    # replication pipelines apply deletes exactly (datamart/ingest/replication.py): a key kept is drift
    deletions_expected = table.write_disposition == "replace" or table.deletes.get("hard") == "key_set"
    deletions_expected = deletions_expected or decl.options.get("changes") == "replication"
    compare_sorted(
        check,
        chunks,
        _warehouse_rows(warehouse, decl.dataset, name, keys, columns, types, current),
        chunk_size,
        deletions_expected,
    )
    if check.kept:
        check.note = f"{check.kept:,} key(s) gone from the source are kept in the warehouse (no hard-delete detection)"
    if check.missing and recorded is not None:
        check.note = (
            f"dlt's state says rows up to {table.cursor} = {_plain(recorded)} were loaded: missing ones are never "
            "read again by a run (lost from the warehouse after a load, e.g. by a restore or a failover)"
        )
    if check.extra and not (check.missing or check.changed) and table.deletes.get("hard") == "key_set":
        # keys deleted at the source since the last run: the next run removes them
        check.fix = f"dlt pipeline {decl.name} run --table {table.name}` (then verify again; if it persists: `{fix}"
    return check


def _columns_not_loaded(
    decl: PipelineDecl, table: TableDecl, types: dict[str, str], source_names: dict[str, str], soft: str | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Source columns the warehouse table lacks (SQL sources): those never loaded, and those a run holds back on
    purpose (an unclassified column of a table with personal data). Dropped and coarsened personal columns are
    absent by design; a variant table (``data_type: evolve``, minimal reflection) creates a column from its first
    non-null value only, so it is not checked."""
    if decl.kind != "sql_database" or table.schema_contract.get("data_type") == "evolve":
        return (), ()
    missing, held_back = [], []
    for name, original in source_names.items():
        absent_by_design = table.personal.get(original) in ("drop", "year")
        if name in types or name == soft or absent_by_design or name.startswith(INTERNAL_PREFIXES):
            continue
        (held_back if table.personal and original not in table.personal else missing).append(original)
    return tuple(missing), tuple(held_back)


def _plain(value: Any) -> str:
    return value.isoformat(sep=" ") if isinstance(value, datetime) else str(value)


def _count(warehouse: Warehouse, dataset: str, table: str, current: str = "TRUE") -> int:
    """The rows of ``table`` that ``current`` keeps (a history table's current versions)."""
    relation = f"{quote_identifier(dataset)}.{quote_identifier(table)}"
    return int(warehouse.query(f"SELECT count(*) FROM {relation} WHERE {current}")[0][0])


def _source_count(decl: PipelineDecl, table: TableDecl, where: Any = None) -> int:
    import sqlalchemy as sa

    from datamart.ingest.sources import source_credentials

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


def _counts_only(decl: PipelineDecl, warehouse: Warehouse, table: TableDecl, plan: _Plan, fix: str) -> TableCheck:
    """Tables without a primary key: rows up to the warehouse's cursor high-water mark, counted on both sides."""
    check = TableCheck(table=table.name, method="counts", fix=fix, note="no primary key: row counts only")
    check.warehouse_rows = _count(warehouse, decl.dataset, _normalize(table.name))
    if decl.kind != "sql_database":
        check.source_rows = sum(1 for _ in _file_records(decl, table))
        return check
    if plan.cursor and plan.high_water is not None:
        column = plan.source_names[plan.cursor]
        check.source_rows = _source_count(decl, table, lambda t: t.c[column] <= plan.high_water)
        check.pending = _source_count(decl, table, lambda t: t.c[column] > plan.high_water)
    else:
        check.source_rows = _source_count(decl, table)
    return check


def verify_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    wait: float = 0.0,
    lock: bool = True,
) -> VerifyReport:
    """Compare every declared table (or ``tables``) of ``decl`` with its source; ``.drift`` tells, ``.format()`` shows.

    Holds the pipeline's lock while comparing (waiting up to ``wait`` seconds; ``lock=False`` when the caller holds
    it). Raises ``PipelineLocked`` when a run holds it, and the source's or warehouse's error when unreachable.
    """
    started = time.monotonic()
    selected = [decl.table(t) for t in tables] if tables else list(decl.tables)
    report = VerifyReport(pipeline=decl.name, dataset=decl.dataset, warehouse=warehouse.describe())
    with pipeline_lock(warehouse, decl.name, wait=wait) if lock else _nothing():
        for table in selected:
            report.tables.append(verify_table(decl, warehouse, table, chunk_size))
    report.elapsed = time.monotonic() - started
    return report


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- full vs incremental ------------------------------------------------------------------------------------------

SCRATCH_SUFFIX = "_verify"  # one underscore: dlt normalises "__" in dataset names


def full_compare(
    decl: PipelineDecl,
    warehouse: Warehouse,
    table: str,
    chunk_size: int = DEFAULT_CHUNK,
    wait: float = 0.0,
    keep_scratch: bool = False,
) -> VerifyReport:
    """Reload ``table`` from scratch into the scratch dataset ``<dataset>_verify``, diff it with the incremental one.

    The scratch load runs the same declaration (personal treatment included) with its own dlt working dir and state,
    under the pipeline's lock; the scratch dataset and working dir are dropped afterwards (``keep_scratch`` keeps
    them to look at). Every column but dlt's is compared, the pseudonyms too.
    """
    from datamart.ingest.runner import run_pipeline

    started = time.monotonic()
    declared = decl.table(table)
    scratch = dataclasses.replace(decl, dataset=decl.dataset + SCRATCH_SUFFIX)
    name = _normalize(declared.name)
    report = VerifyReport(
        pipeline=decl.name,
        dataset=decl.dataset,
        warehouse=warehouse.describe(),
        title=f"full compare (scratch reload into {scratch.dataset})",
    )
    work = Path(tempfile.mkdtemp(prefix=f"datamart-verify-{decl.name}-"))
    with pipeline_lock(warehouse, decl.name, wait=wait):
        try:
            _drop_dataset(warehouse, scratch.dataset)
            run_pipeline(scratch, warehouse, tables=[table], pipelines_dir=work, record=False)
            full_types = warehouse.columns(scratch.dataset, name)
            types = warehouse.columns(decl.dataset, name)
            check = TableCheck(
                table=declared.name,
                method="full reload",
                fix=f"dlt pipeline {decl.name} run --table {declared.name} --full-refresh",
            )
            if not types:
                check.method, check.source_rows, check.warehouse_rows = (
                    "not loaded",
                    _count(warehouse, scratch.dataset, name),
                    0,
                )
            else:
                keys = [_normalize(k) for k in declared.primary_key]
                columns = [
                    c for c in full_types if c in types and c not in keys and not c.startswith(INTERNAL_PREFIXES)
                ]
                check.columns = tuple(columns)
                merged_types = {**types, **{c: full_types[c] for c in full_types if c not in types}}
                if not keys:
                    check.method = "counts"
                    check.source_rows = _count(warehouse, scratch.dataset, name)
                    check.warehouse_rows = _count(warehouse, decl.dataset, name)
                else:
                    left = _chunked(
                        (
                            (key, "live", digest)
                            for key, digest in _warehouse_rows(
                                warehouse, scratch.dataset, name, keys, columns, merged_types, declared.current_only
                            )
                        ),
                        chunk_size,
                    )
                    right = _warehouse_rows(
                        warehouse, decl.dataset, name, keys, columns, merged_types, declared.current_only
                    )
                    compare_sorted(check, left, right, chunk_size, deletions_expected=True)
                    check.note = "source = a fresh full load; gone-from-source keys still in the table count as extra"
            report.tables.append(check)
        finally:
            if not keep_scratch:
                _drop_dataset(warehouse, scratch.dataset)
                shutil.rmtree(work, ignore_errors=True)
    report.elapsed = time.monotonic() - started
    return report


def _chunked(rows: Iterator[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    chunk: list[SourceRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    yield chunk  # shorter than size: the last one


def _drop_dataset(warehouse: Warehouse, dataset: str) -> None:
    """Drop a scratch dataset and dlt's staging dataset beside it (merges stage rows in ``<dataset>_staging``)."""
    for schema in (dataset, f"{dataset}_staging"):
        warehouse.query(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE")
