"""Where things are and which warehouse is used: the one switch shared by dlt and SQLMesh.

The warehouse is chosen by ``DATAMART_TARGET`` (``duckdb``, the default, or ``postgres``). Its credentials are read
the dlt way only (``.dlt/secrets.toml``, ``.dlt/config.toml`` or ``DESTINATION__<TARGET>__CREDENTIALS``), by dlt and
by SQLMesh alike: the project's ``config.py`` builds SQLMesh's configuration from :func:`resolve_warehouse`
(``datamart/sqlmesh_config.py``), so both tools always point at the same database, whichever command is typed.

``DATAMART_ENV`` (``dev``, the default, ``preprod`` or ``prod``) selects the environment: its warehouse credentials
are looked up under the ``<env>`` section first (``[prod.destination.postgres]`` in ``.dlt/secrets.toml``, or
``PROD__DESTINATION__POSTGRES__CREDENTIALS``), then as above. ``datamart/environments.py`` refuses a warehouse that
belongs to another environment.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
PIPELINES_DIR = PROJECT_ROOT / "pipelines"  # the project's declarations (DATAMART_DECLARATIONS_DIR overrides)
DEMO_PIPELINES_DIR = Path(__file__).resolve().parent / "demo" / "pipelines"  # the demo's own declarations
TARGETS = ("duckdb", "postgres")
ENVIRONMENTS = ("dev", "preprod", "prod")
DEFAULT_DUCKDB_PATH = "data/warehouse.duckdb"
PUBLISHED_SCHEMA = "marts"  # the one schema Metabase reads


class SettingsError(RuntimeError):
    """A configuration problem the user must fix; the message says how."""


def configure_environment() -> None:
    """Point dlt at this project (settings, working dirs) whatever the current directory, and mute telemetry."""
    os.environ.setdefault("DLT_PROJECT_DIR", str(PROJECT_ROOT))
    os.environ.setdefault("DLT_LOCAL_DIR", str(PROJECT_ROOT))
    os.environ.setdefault("DLT_DATA_DIR", str(DATA_DIR / "dlt"))
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")


def env_name(key: str) -> str:
    """The environment variable dlt reads for a setting (``sources.app_db.credentials``:
    ``SOURCES__APP_DB__CREDENTIALS``)."""
    return key.upper().replace(".", "__")


def secret(key: str) -> Any:
    """A secret (``sources.<name>.credentials``, ``datamart.pii_hmac_key`` …) as dlt resolves it: its environment
    variable (:func:`env_name`), then ``.dlt/secrets.toml``; None when unset or empty.

    The one way this project reads a secret, as dlt's verified sources do (``dlt.secrets.value``): no module reads
    ``os.environ`` or a file of its own for one, so a secret set either way is found everywhere.
    """
    import dlt

    value = dlt.secrets.get(key)
    return None if value is None or value == "" else value


PRIVATE_UMASK = 0o077  # files 0600, folders 0700: the owner only


def keep_files_private() -> None:
    """Files this process creates are readable by their owner only; so is ``data/`` if it already exists.

    Called first by every entry point (``python -m datamart``, ``python -m datamart.demo``, ``python -m
    datamart.external_models`` and the ``dlt`` CLI through the project's plugin): the warehouse file, dlt's load
    packages (rows of every loaded table), the demo source's personal data and ``.dlt/secrets.toml`` are never
    created readable by other users of the machine. ``data/`` made by an earlier version (0755) is closed too
    (without the folder's x bit nobody else reaches what is inside), and so is a ``.dlt/secrets.toml`` written by hand
    readable by others (0600).
    """
    os.umask(PRIVATE_UMASK)
    secrets_file = Path(os.environ.get("DLT_PROJECT_DIR") or PROJECT_ROOT) / ".dlt" / "secrets.toml"
    for path, mode in ((DATA_DIR, 0o700), (secrets_file, 0o600)):
        try:
            status = path.stat()
            if status.st_uid == os.getuid() and status.st_mode & 0o077:
                path.chmod(mode)
        except OSError:  # missing, or a read-only checkout: nothing to close
            pass


def declarations_dir() -> Path:
    """The folder of pipeline declarations: ``DATAMART_DECLARATIONS_DIR``, else the project's ``pipelines/``.

    The tests point it at the demo's own copies (``datamart/demo/pipelines``), so that they keep working once a
    project adds or replaces pipelines.
    """
    return Path(os.environ.get("DATAMART_DECLARATIONS_DIR") or PIPELINES_DIR)


def pipelines_dir_for(target: str, environment: str) -> Path:
    """dlt's local working dirs for a target and environment (``DATAMART_PIPELINES_DIR`` or data/dlt/pipelines).

    One folder per target (and per environment other than dev) so that switching target or ``DATAMART_ENV`` never
    mixes two warehouses' incremental states.
    """
    base = Path(os.environ.get("DATAMART_PIPELINES_DIR") or DATA_DIR / "dlt" / "pipelines")
    return base / target if environment == "dev" else base / environment / target


def selected_target(explicit: str | None = None) -> str:
    """The warehouse target: the explicit value, else ``DATAMART_TARGET``, else ``duckdb``."""
    target = (explicit or os.environ.get("DATAMART_TARGET") or "duckdb").strip().lower()
    if target not in TARGETS:
        raise SettingsError(f"DATAMART_TARGET={target!r} is not a known warehouse; use one of {', '.join(TARGETS)}.")
    return target


def selected_environment() -> str:
    """The environment: ``DATAMART_ENV``, else ``dev`` (local development, today's default behaviour)."""
    environment = (os.environ.get("DATAMART_ENV") or "dev").strip().lower()
    if environment not in ENVIRONMENTS:
        raise SettingsError(
            f"DATAMART_ENV={environment!r} is not a known environment; use one of {', '.join(ENVIRONMENTS)}."
        )
    return environment


@dataclass(frozen=True)
class Warehouse:
    """The resolved warehouse connection, for dlt (as a destination) and SQLMesh (as its gateway).

    Everything that differs between the two engines is asked of the warehouse (its :attr:`engine`: one adapter per
    engine, :class:`DuckDBEngine` and :class:`PostgresEngine`): placeholders, the SQL dialect, connections, arrow
    reads, streamed reads, URLs, how sessions are serialised. No module outside this one compares ``target``
    with an engine's name (``tests/test_structure.py`` checks it).
    """

    target: str
    duckdb_path: Path | None = None
    pg: Any = None  # dlt PostgresCredentials, resolved
    environment: str = "dev"  # DATAMART_ENV this warehouse was resolved for (see datamart/environments.py)

    @property
    def engine(self) -> DuckDBEngine | PostgresEngine:
        """The adapter of this warehouse's engine."""
        return ENGINES[self.target](self)

    @property
    def is_server(self) -> bool:
        """A server many sessions and machines reach (PostgreSQL: roles, advisory locks, parallel sessions), not a
        file one process writes at a time (DuckDB)."""
        return self.engine.is_server

    @property
    def dialect(self) -> str:
        """The SQL dialect of the warehouse, as sqlglot and SQLMesh name it."""
        return self.engine.dialect

    @property
    def placeholder(self) -> str:
        """The query parameter marker of :meth:`query`: psycopg2's ``%s`` or DuckDB's ``?``."""
        return self.engine.placeholder

    def dlt_destination(self) -> Any:
        """A dlt destination bound to this warehouse."""
        return self.engine.dlt_destination()

    def environment_variables(self) -> dict[str, str]:
        """The settings by which another process (``sqlmesh``, ``dlt``) reaches this warehouse, the dlt way.

        ``DATAMART_TARGET`` and ``DESTINATION__<TARGET>__CREDENTIALS``: what a user sets, read by
        :func:`resolve_warehouse` in that process (for SQLMesh, through the project's ``config.py``).
        """
        return self.engine.environment_variables()

    def url(self) -> str:
        """The PostgreSQL warehouse as a libpq URL, password included (never print it: see :meth:`describe`)."""
        return str(self.pg.to_native_representation())

    def sqlmesh_gateway(self, state_schema: str) -> tuple[str, dict[str, Any]]:
        """The name and settings of the SQLMesh gateway reaching this warehouse (state in ``state_schema``)."""
        return self.engine.sqlmesh_gateway(state_schema)

    def connect(self, **options: Any) -> Any:
        """A new DB-API connection to the warehouse (the caller closes it); ``options`` go to the driver."""
        return self.engine.connect(**options)

    def pg_connect(self, **options: Any) -> Any:
        """A new psycopg2 connection to the PostgreSQL warehouse (the caller closes it)."""
        return PostgresEngine(self).connect(**options)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor in one transaction, committed at the end of the block (rolled back on an error)."""
        with self.engine.transaction() as cursor:
            yield cursor

    def serialise(self, cursor: Any, name: str) -> None:
        """Wait, inside :meth:`transaction`, until no other session holds ``name``: two first runs at once create
        the same tables one after the other (PostgreSQL's ``IF NOT EXISTS`` is not race-free). A DuckDB file has one
        writer at a time: nothing to wait for."""
        self.engine.serialise(cursor, name)

    def ensure_schema(self, cursor: Any, schema: str) -> None:
        """Create ``schema`` inside :meth:`transaction` unless it exists."""
        self.engine.ensure_schema(cursor, schema)

    def query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement on the warehouse in its own short connection and return the rows."""
        return self.query_with_columns(statement, params)[1]

    def query_with_columns(self, statement: str, params: tuple[Any, ...] = ()) -> tuple[list[str], list[tuple]]:
        """Like :meth:`query`, with the result's column names (empty for a statement that returns no rows)."""
        with self.transaction() as cur:
            cur.execute(statement, list(params) or None)  # None: a literal % in a statement without parameters
            if not cur.description:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()

    def stream(self, statement: str, batch: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """Rows of one query, fetched in batches (a server-side cursor on PostgreSQL, ``fetchmany`` on DuckDB)."""
        return self.engine.stream(statement, batch)

    def read_arrow(self, statement: str, batch: int = 100_000) -> Any:
        """One query's result as a pyarrow table, read without a Python object per value."""
        return self.engine.read_arrow(statement, batch)

    def text_in_byte_order(self, column: str) -> str:
        """``column`` (an SQL expression of text) ordered by bytes, as Python orders str, on both engines."""
        return self.engine.text_in_byte_order(column)

    def table_exists(self, schema: str, table: str) -> bool:
        """Whether ``schema.table`` exists in the warehouse."""
        statement = (
            "SELECT count(*) FROM information_schema.tables "
            f"WHERE table_schema = {self.placeholder} AND table_name = {self.placeholder}"
        )
        return bool(self.query(statement, (schema, table))[0][0])

    def columns(self, schema: str, table: str) -> dict[str, str]:
        """Column name → SQL type of ``schema.table``, in table order (empty when it does not exist)."""
        rows = self.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = {self.placeholder} AND table_name = {self.placeholder} ORDER BY ordinal_position",
            (schema, table),
        )
        return {str(name): str(sql_type) for name, sql_type in rows}

    def analyze(self, tables: Iterable[tuple[str, str]]) -> None:
        """Give the planner statistics on the tables ``(schema, table)`` just written, before SQLMesh reads them:
        a load's tables (:class:`datamart.ingest.loading.AnalyzeLoaded`), ``ops.deleted_rows``. Tables that do not
        exist are skipped."""
        self.engine.analyze(sorted(set(tables)))

    def describe(self) -> str:
        """Where the data lives, without the password."""
        return self.engine.describe()

    def query_hint(self, view: str) -> str:
        """A command a person can paste to look at a published view."""
        return f'{self.engine.selected_by}.venv/bin/python -m datamart query "SELECT * FROM {view} LIMIT 10"'


# A replace (a table declared so, or a full refresh under views: runner.refresh_mode) stages the rows, then empties
# and refills the table in one transaction: never an empty or half-filled table after a failure. dlt's default
# (truncate-and-insert) empties it before the load starts.
_REPLACE_STRATEGY = "insert-from-staging"
# PostgreSQL's memory for one sort or hash in dlt's load sessions (its server default is 4 MB). dlt's merge of a
# table with history (scd2) inserts the staged rows whose row version is `NOT IN` the table's current rows: the
# server plans that as a hash of the current versions only when the hash fits in work_mem x hash_mem_multiplier,
# else it rescans them once per staged row. On the bench (scale 500, 475,000 current missions, 3,750 staged) the
# load step took 143.7 s with 4 MB, the query 1 s with 32 MB. 64 MB holds about 2-3 million current rows; a
# bigger history table needs `options=-cwork_mem=...` in the warehouse URL (a user's own setting is kept).
LOAD_WORK_MEM = "64MB"


@dataclass(frozen=True)
class DuckDBEngine:
    """The embedded warehouse: one DuckDB file, written by one process at a time."""

    warehouse: Warehouse
    is_server = False
    dialect = "duckdb"
    placeholder = "?"
    selected_by = ""  # the default target: a command needs no DATAMART_TARGET

    def dlt_destination(self) -> Any:
        import dlt

        return dlt.destinations.duckdb(credentials=str(self.warehouse.duckdb_path), replace_strategy=_REPLACE_STRATEGY)

    def environment_variables(self) -> dict[str, str]:
        return {"DATAMART_TARGET": "duckdb", "DESTINATION__DUCKDB__CREDENTIALS": str(self.warehouse.duckdb_path)}

    def sqlmesh_gateway(self, state_schema: str) -> tuple[str, dict[str, Any]]:
        # SQLMesh's state in the same file, in its own schema
        return "local", {"connection": {"type": "duckdb", "database": str(self.warehouse.duckdb_path)}}

    def connect(self, **options: Any) -> Any:
        import duckdb

        return duckdb.connect(str(self.warehouse.duckdb_path), **options)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        # DuckDB's connection is its own cursor; autocommit per statement, one writer per file
        with self.connect() as conn:
            yield conn

    def serialise(self, cursor: Any, name: str) -> None:
        return None

    def ensure_schema(self, cursor: Any, schema: str) -> None:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")

    def stream(self, statement: str, batch: int) -> Iterator[tuple[Any, ...]]:
        with self.connect(read_only=False) as conn:
            result = conn.execute(statement)
            while rows := result.fetchmany(batch):
                yield from rows

    def read_arrow(self, statement: str, batch: int) -> Any:
        with self.connect() as conn:
            return conn.execute(statement).fetch_arrow_table()

    def text_in_byte_order(self, column: str) -> str:
        return column  # DuckDB compares strings by bytes

    def analyze(self, tables: list[tuple[str, str]]) -> None:
        # Nothing to run: DuckDB keeps each table's row count and its columns' statistics (min/max, nulls, distinct
        # estimates) up to date as rows are written, and joins on equality by hashing whatever its estimates; its
        # own ANALYZE only refines join order after large deletes.
        return None

    def describe(self) -> str:
        return f"DuckDB file {self.warehouse.duckdb_path}"


@dataclass(frozen=True)
class PostgresEngine:
    """A PostgreSQL server: the shared warehouse of preprod and prod."""

    warehouse: Warehouse
    is_server = True
    dialect = "postgres"
    placeholder = "%s"
    selected_by = "DATAMART_TARGET=postgres "

    def dlt_destination(self) -> Any:
        import dlt

        credentials = copy.copy(self.warehouse.pg)
        query = dict(credentials.query or {})
        options = str(query.get("options", ""))
        if "work_mem" not in options:
            query["options"] = f"{options} -cwork_mem={LOAD_WORK_MEM}".strip()
        credentials.query = query
        return dlt.destinations.postgres(credentials=credentials, replace_strategy=_REPLACE_STRATEGY)

    def environment_variables(self) -> dict[str, str]:
        return {"DATAMART_TARGET": "postgres", "DESTINATION__POSTGRES__CREDENTIALS": self.warehouse.url()}

    def sqlmesh_gateway(self, state_schema: str) -> tuple[str, dict[str, Any]]:
        pg = self.warehouse.pg
        connection = {
            "type": "postgres",
            "host": str(pg.host),
            "port": int(pg.port or 5432),
            "user": str(pg.username),
            "password": str(pg.password or ""),
            "database": str(pg.database),
            "application_name": "datamart-sqlmesh",
        }
        # A dedicated datamart database, never the production one; SQLMesh's state in the same database, own schema.
        return "postgres", {"connection": connection, "state_schema": state_schema}

    def connect(self, **options: Any) -> Any:
        import psycopg2

        pg = self.warehouse.pg
        return psycopg2.connect(
            host=pg.host, port=pg.port, user=pg.username, password=pg.password, dbname=pg.database, **options
        )

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        conn = self.connect()
        try:
            with conn, conn.cursor() as cur:  # one transaction: commit on success, rollback on any error
                yield cur
        finally:
            conn.close()

    def serialise(self, cursor: Any, name: str) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))

    def ensure_schema(self, cursor: Any, schema: str) -> None:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if cursor.fetchone() is None:  # IF NOT EXISTS alone still needs CREATE on the database
            cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")

    def stream(self, statement: str, batch: int) -> Iterator[tuple[Any, ...]]:
        conn = self.connect()
        try:
            with conn, conn.cursor(name="datamart_stream") as cur:
                cur.itersize = batch
                cur.execute(statement)
                yield from cur
        finally:
            conn.close()

    def read_arrow(self, statement: str, batch: int) -> Any:
        """Read by connectorx (binary protocol) as a stream of record batches: measured on 10 M keys, the
        non-streaming read peaked at 1.3 GB."""
        import connectorx as cx
        import pyarrow as pa

        reader = cx.read_sql(self._connectorx_url(), statement, return_type="arrow_stream", batch_size=batch)
        return pa.Table.from_batches(list(reader), schema=reader.schema)

    def _connectorx_url(self) -> str:
        """A libpq URL as connectorx reads it (password quoted, port always given)."""
        from urllib.parse import quote

        pg = self.warehouse.pg
        password = f":{quote(str(pg.password), safe='')}" if pg.password else ""
        return f"postgresql://{quote(str(pg.username), safe='')}{password}@{pg.host}:{pg.port or 5432}/{pg.database}"

    def text_in_byte_order(self, column: str) -> str:
        return column + ' COLLATE "C"'  # the locale's collation would differ from Python's order

    def analyze(self, tables: list[tuple[str, str]]) -> None:
        # PostgreSQL plans with the statistics ANALYZE left (pg_statistic, pg_class.reltuples). dlt never runs it,
        # and autovacuum gets to a freshly loaded table up to a minute later or more (autovacuum_naptime, its
        # thresholds, its workers busy elsewhere): a first SQLMesh build planned in between chose nested loops over
        # whole tables, and a plan is kept for the statement's life. Measured on the demo at scale 5 (136,000 rows),
        # autovacuum off: `python -m datamart run` into an empty warehouse sat in marts.missions_v1's CREATE TABLE …
        # AS for 15 minutes before it was killed; with the loaded tables analysed, 40 s end to end (35 s on DuckDB).
        # ANALYZE reads a sample of 300 x default_statistics_target rows whatever the table's size: its cost follows
        # the number of tables, not their rows.
        if not tables:
            return
        pairs = ", ".join(["(%s, %s)"] * len(tables))
        with self.transaction() as cur:
            cur.execute(
                "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE c.relkind IN ('r', 'p') AND (n.nspname, c.relname) IN ({pairs}) ORDER BY 1",
                [part for pair in tables for part in pair],
            )
            existing = [row[0] for row in cur.fetchall()]
            if existing:
                cur.execute(f"ANALYZE {', '.join(existing)}")

    def describe(self) -> str:
        pg = self.warehouse.pg
        return f"PostgreSQL {pg.username}@{pg.host}:{pg.port}/{pg.database}"


ENGINES: dict[str, type[DuckDBEngine] | type[PostgresEngine]] = {"duckdb": DuckDBEngine, "postgres": PostgresEngine}


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (DuckDB and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def duckdb_warehouse(path: Path) -> Warehouse:
    """A DuckDB warehouse in the file ``path`` (a scratch warehouse, tests, tools)."""
    return Warehouse(target="duckdb", duckdb_path=path)


def postgres_warehouse(url: str) -> Warehouse:
    """A PostgreSQL warehouse from a libpq URL (tests, tools); production resolves it from dlt's config."""
    from dlt.destinations.impl.postgres.configuration import PostgresCredentials

    creds = PostgresCredentials()
    creds.parse_native_representation(url)
    return Warehouse(target="postgres", pg=creds)


def resolve_warehouse(target: str | None = None) -> Warehouse:
    """Resolve the selected warehouse's credentials through dlt's configuration providers.

    The selected environment's own section (``<env>.destination.<target>.credentials``) wins over the plain one.
    """
    configure_environment()
    target = selected_target(target)
    environment = selected_environment()
    import dlt

    own = secret(f"{environment}.destination.{target}.credentials")
    if target == "duckdb":
        configured = (
            own
            or os.environ.get("DESTINATION__DUCKDB__CREDENTIALS")
            or dlt.config.get("destination.duckdb.credentials")
        )
        path = Path(str(configured or DEFAULT_DUCKDB_PATH))
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        return Warehouse(target="duckdb", duckdb_path=path, environment=environment)

    from dlt.common.configuration import resolve_configuration
    from dlt.common.configuration.exceptions import ConfigFieldMissingException
    from dlt.destinations.impl.postgres.configuration import PostgresCredentials

    if own:
        creds = PostgresCredentials()
        if isinstance(own, str):
            creds.parse_native_representation(own)
        else:
            creds.update(dict(own))
            creds.port = creds.port or 5432
        return Warehouse(target="postgres", pg=creds, environment=environment)
    try:
        creds = resolve_configuration(PostgresCredentials(), sections=("destination", "postgres", "credentials"))
    except ConfigFieldMissingException as exc:
        raise SettingsError(
            "DATAMART_TARGET=postgres but the PostgreSQL warehouse credentials are missing "
            f"({', '.join(exc.fields)}). Set DESTINATION__POSTGRES__CREDENTIALS="
            "postgresql://user:password@host:5432/datamart or fill [destination.postgres] in "
            ".dlt/secrets.toml (see .dlt/example.secrets.toml)."
        ) from None
    return Warehouse(target="postgres", pg=creds, environment=environment)
