"""The application database the demo writes to: a SQLite file or a PostgreSQL database, behind one interface."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent

META_TABLE = "demo_meta"

#: Every demo table: (column, portable type, nullable). The first column is the primary key.
TABLES: dict[str, list[tuple[str, str, bool]]] = {
    "organizations": [
        ("id", "int", False),
        ("name", "text", False),
        ("kind", "text", False),
        ("department", "text", False),
        ("created_at", "timestamp", False),
        ("updated_at", "timestamp", False),
        ("deleted_at", "timestamp", True),
    ],
    "missions": [
        ("id", "int", False),
        ("organization_id", "int", False),
        ("title", "text", False),
        ("domain", "text", False),
        ("department", "text", False),
        ("places", "int", False),
        ("status", "text", False),
        ("start_date", "date", False),
        ("created_at", "timestamp", False),
        ("updated_at", "timestamp", False),
        ("deleted_at", "timestamp", True),
    ],
    "volunteers": [
        ("id", "int", False),
        ("email", "text", False),
        ("first_name", "text", False),
        ("last_name", "text", False),
        ("phone", "text", False),
        ("birth_date", "date", False),
        ("postcode", "text", False),
        ("department", "text", False),
        ("created_at", "timestamp", False),
        ("updated_at", "timestamp", False),
    ],
    "applications": [
        ("id", "int", False),
        ("mission_id", "int", False),
        ("volunteer_id", "int", False),
        ("status", "text", False),
        ("created_at", "timestamp", False),
        ("updated_at", "timestamp", False),
    ],
    "stats_events": [
        ("id", "bigint", False),
        ("event_type", "text", False),
        ("partner_id", "int", False),
        ("mission_id", "int", False),
        ("occurred_at", "timestamp", False),
    ],
}

#: Indexes created after the bulk load of day 0: (table, column).
INDEXES: list[tuple[str, str]] = [(table, "updated_at") for table in TABLES if table != "stats_events"] + [
    ("stats_events", "occurred_at")
]

SQLITE_TYPES = {"int": "INTEGER", "bigint": "INTEGER", "text": "TEXT", "timestamp": "TIMESTAMP", "date": "DATE"}
POSTGRES_TYPES = {"int": "INTEGER", "bigint": "BIGINT", "text": "TEXT", "timestamp": "TIMESTAMP", "date": "DATE"}

_FETCH_BATCH = 100_000


class DemoError(RuntimeError):
    """A problem the user must act on; the message says what to do."""


def column_types(table: str) -> dict[str, str]:
    """Portable type of each column of a demo table."""
    return {name: kind for name, kind, _ in TABLES[table]}


def _as_text_columns(table: pa.Table) -> list[list[Any]]:
    """Columns as Python lists, timestamps as 'YYYY-MM-DD HH:MM:SS' and dates as 'YYYY-MM-DD' text."""
    columns = []
    for column in table.columns:
        if pa.types.is_timestamp(column.type):
            column = pc.strftime(column, "%Y-%m-%d %H:%M:%S")
        elif pa.types.is_date(column.type):
            column = pc.strftime(column, "%Y-%m-%d")
        columns.append(column.to_pylist())
    return columns


class Source:
    """Common interface of the demo application database."""

    description: str

    def has_table(self, table: str) -> bool:
        """Whether the table exists."""
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one transaction: everything or nothing."""
        raise NotImplementedError
        yield  # pragma: no cover

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement (``?`` placeholders); return the affected row count."""
        raise NotImplementedError

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All rows of a query (``?`` placeholders)."""
        raise NotImplementedError

    def query_batches(self, statement: str) -> Iterator[list[tuple[Any, ...]]]:
        """Rows of a large query, a batch at a time."""
        raise NotImplementedError

    def create_tables(self) -> None:
        """Create the demo tables (primary keys and indexes come after the bulk load)."""
        raise NotImplementedError

    def create_indexes(self) -> None:
        """Create primary keys and indexes, after the bulk load of day 0."""
        raise NotImplementedError

    def insert(self, table: str, rows: pa.Table) -> None:
        """Append rows (columns named and ordered as the table's)."""
        raise NotImplementedError

    def update(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> int:
        """Set ``columns`` of the rows whose id is the first value of each tuple; return the updated count."""
        raise NotImplementedError

    def delete_in(self, table: str, column: str, values: Sequence[int]) -> int:
        """Delete the rows whose ``column`` is one of ``values``; return the deleted count."""
        raise NotImplementedError

    def drop_tables(self) -> None:
        """Drop every demo table, if present."""
        for table in [*TABLES, META_TABLE]:
            self.execute(f"DROP TABLE IF EXISTS {table}")

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def query_array(self, statement: str, columns: int) -> list[np.ndarray]:
        """A large query of integer columns as numpy int64 arrays, fetched in batches."""
        parts: list[list[np.ndarray]] = [[] for _ in range(columns)]
        for batch in self.query_batches(statement):
            block = np.array(batch, dtype=np.int64).reshape(len(batch), columns)
            for index in range(columns):
                parts[index].append(block[:, index])
        return [np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64) for chunks in parts]


class SqliteSource(Source):
    """A SQLite file; timestamps stored as 'YYYY-MM-DD HH:MM:SS' text in TIMESTAMP columns."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        self.description = f"SQLite file {path}"
        if not create and not path.exists():
            self.conn: sqlite3.Connection | None = None
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=OFF")

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise DemoError(f"{self.path} does not exist; generate it first with `python -m datamart.demo`.")
        return self.conn

    def has_table(self, table: str) -> bool:
        """Whether the table exists (False when the file does not exist)."""
        if self.conn is None:
            return False
        row = self.conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?", (table,))
        return bool(row.fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement."""
        return self._conn().execute(statement, tuple(params)).rowcount

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All rows of a query."""
        return self._conn().execute(statement, tuple(params)).fetchall()

    def query_batches(self, statement: str) -> Iterator[list[tuple[Any, ...]]]:
        """Rows in batches."""
        cursor = self._conn().execute(statement)
        while batch := cursor.fetchmany(_FETCH_BATCH):
            yield batch

    def create_tables(self) -> None:
        """CREATE TABLE with the primary key inline (SQLite cannot add it later; an INTEGER PK is the rowid)."""
        for table, columns in TABLES.items():
            parts = []
            for index, (name, kind, nullable) in enumerate(columns):
                if index == 0:
                    parts.append(f"{name} INTEGER PRIMARY KEY")
                else:
                    parts.append(f"{name} {SQLITE_TYPES[kind]}{'' if nullable else ' NOT NULL'}")
            self.execute(f"CREATE TABLE {table} ({', '.join(parts)})")
        self.execute(f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def create_indexes(self) -> None:
        """Indexes on the cursor columns."""
        for table, column in INDEXES:
            self.execute(f"CREATE INDEX ix_{table}_{column} ON {table} ({column})")

    def insert(self, table: str, rows: pa.Table) -> None:
        """executemany of the chunk."""
        names = rows.column_names
        statement = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        self._conn().executemany(statement, zip(*_as_text_columns(rows), strict=True))

    def update(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> int:
        """executemany of one UPDATE per row."""
        if not rows:
            return 0
        statement = f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"
        cursor = self._conn().executemany(statement, [(*row[1:], row[0]) for row in rows])
        return cursor.rowcount

    def delete_in(self, table: str, column: str, values: Sequence[int]) -> int:
        """DELETE … IN (…) in batches of 500 values."""
        deleted = 0
        for start in range(0, len(values), 500):
            batch = [int(v) for v in values[start : start + 500]]
            marks = ", ".join("?" * len(batch))
            deleted += self.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", batch)
        return deleted

    def close(self) -> None:
        """Close the connection (checkpoints the WAL)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class PostgresSource(Source):
    """A PostgreSQL database (tables in the default schema, ``public``); bulk loads with COPY."""

    def __init__(self, dsn: str) -> None:
        import psycopg2

        self.description = "PostgreSQL " + dsn.split("@")[-1]
        try:
            self.conn = psycopg2.connect(dsn)
        except psycopg2.OperationalError as exc:
            raise DemoError(f"cannot connect to {self.description}: {exc}".strip()) from exc
        self._batch_cursor = 0

    @staticmethod
    def _sql(statement: str, params: Sequence[Any]) -> str:
        """psycopg2 placeholders when there are parameters (it interpolates only then)."""
        return statement.replace("%", "%%").replace("?", "%s") if params else statement

    def has_table(self, table: str) -> bool:
        """Whether the table exists in the search path."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
            return bool(cur.fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One PostgreSQL transaction (DDL included)."""
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement."""
        with self.conn.cursor() as cur:
            cur.execute(self._sql(statement, params), tuple(params) or None)
            return cur.rowcount

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All rows of a query."""
        with self.conn.cursor() as cur:
            cur.execute(self._sql(statement, params), tuple(params) or None)
            return cur.fetchall()

    def query_batches(self, statement: str) -> Iterator[list[tuple[Any, ...]]]:
        """Rows in batches through a server-side cursor (bounded memory)."""
        self._batch_cursor += 1
        with self.conn.cursor(name=f"demo_batch_{self._batch_cursor}") as cur:
            cur.itersize = _FETCH_BATCH
            cur.execute(statement)
            while batch := cur.fetchmany(_FETCH_BATCH):
                yield batch

    def create_tables(self) -> None:
        """CREATE TABLE without constraints; the primary key is added after the load."""
        for table, columns in TABLES.items():
            parts = [
                f"{name} {POSTGRES_TYPES[kind]}{'' if nullable else ' NOT NULL'}" for name, kind, nullable in columns
            ]
            self.execute(f"CREATE TABLE {table} ({', '.join(parts)})")
        self.execute(f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def create_indexes(self) -> None:
        """Primary keys, indexes on the cursor columns, then fresh planner statistics."""
        for table in TABLES:
            self.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
        for table, column in INDEXES:
            self.execute(f"CREATE INDEX ix_{table}_{column} ON {table} ({column})")
        for table in TABLES:
            self.execute(f"ANALYZE {table}")

    def insert(self, table: str, rows: pa.Table) -> None:
        """COPY FROM STDIN of the chunk as CSV (an empty unquoted field is NULL; strings are quoted)."""
        buffer = io.BytesIO()
        pacsv.write_csv(rows, buffer, pacsv.WriteOptions(include_header=False))
        buffer.seek(0)
        with self.conn.cursor() as cur:
            cur.copy_expert(f"COPY {table} ({', '.join(rows.column_names)}) FROM STDIN WITH (FORMAT csv)", buffer)

    def update(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> int:
        """One UPDATE … FROM (VALUES …) per 10 000 rows."""
        from psycopg2.extras import execute_values

        if not rows:
            return 0
        types = column_types(table)
        names = ["id", *columns]
        template = "(" + ", ".join(f"%s::{POSTGRES_TYPES[types[name]]}" for name in names) + ")"
        statement = (
            f"UPDATE {table} AS t SET {', '.join(f'{c} = v.{c}' for c in columns)} "
            f"FROM (VALUES %s) AS v ({', '.join(names)}) WHERE t.id = v.id"
        )
        updated = 0
        with self.conn.cursor() as cur:
            for start in range(0, len(rows), 10_000):
                execute_values(cur, statement, rows[start : start + 10_000], template=template, page_size=10_000)
                updated += cur.rowcount
        return updated

    def delete_in(self, table: str, column: str, values: Sequence[int]) -> int:
        """DELETE … WHERE column = ANY(array)."""
        if len(values) == 0:
            return 0
        with self.conn.cursor() as cur:
            cur.execute(f"DELETE FROM {table} WHERE {column} = ANY(%s)", ([int(v) for v in values],))
            return cur.rowcount

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///path`` URL; a relative path is anchored at the project root."""
    raw = url[len("sqlite:///") :].split("?", 1)[0]
    if not raw or raw == ":memory:":
        raise DemoError(f"{url!r}: the demo needs a SQLite file, e.g. sqlite:///data/demo/app.sqlite")
    path = Path(raw)
    return path if path.is_absolute() else PROJECT_ROOT / path


def postgres_dsn(url: str) -> str:
    """A libpq URL for psycopg2: ``postgresql+psycopg2://`` and ``postgres://`` become ``postgresql://``."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}"


def open_source(url: str, create: bool = True) -> Source:
    """Connect to the source named by a SQLAlchemy-style URL (``create=False``: never create a SQLite file)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return SqliteSource(sqlite_path(url), create=create)
    if scheme.split("+", 1)[0] in ("postgresql", "postgres"):
        return PostgresSource(postgres_dsn(url))
    raise DemoError(
        f"unsupported source URL {url!r}: use sqlite:///path/to/app.sqlite or postgresql://user:password@host/db"
    )
