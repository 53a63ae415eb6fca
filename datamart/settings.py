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

import os
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
    """The resolved warehouse connection, for dlt (as a destination) and SQLMesh (as its gateway)."""

    target: str
    duckdb_path: Path | None = None
    pg: Any = None  # dlt PostgresCredentials, resolved
    environment: str = "dev"  # DATAMART_ENV this warehouse was resolved for (see datamart/environments.py)

    def dlt_destination(self) -> Any:
        """A dlt destination bound to this warehouse."""
        import dlt

        # A replace (a table declared so, or a full refresh under views: runner.refresh_mode) stages the rows, then
        # empties and refills the table in one transaction: never an empty or half-filled table after a failure.
        # dlt's default (truncate-and-insert) empties it before the load starts.
        replace = "insert-from-staging"
        if self.target == "duckdb":
            return dlt.destinations.duckdb(credentials=str(self.duckdb_path), replace_strategy=replace)
        return dlt.destinations.postgres(credentials=self.pg, replace_strategy=replace)

    def environment_variables(self) -> dict[str, str]:
        """The settings by which another process (``sqlmesh``, ``dlt``) reaches this warehouse, the dlt way.

        ``DATAMART_TARGET`` and ``DESTINATION__<TARGET>__CREDENTIALS``: what a user sets, read by
        :func:`resolve_warehouse` in that process (for SQLMesh, through the project's ``config.py``).
        """
        if self.target == "duckdb":
            return {"DATAMART_TARGET": "duckdb", "DESTINATION__DUCKDB__CREDENTIALS": str(self.duckdb_path)}
        return {"DATAMART_TARGET": "postgres", "DESTINATION__POSTGRES__CREDENTIALS": self.url()}

    def url(self) -> str:
        """The PostgreSQL warehouse as a libpq URL, password included (never print it: see :meth:`describe`)."""
        return str(self.pg.to_native_representation())

    def query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement on the warehouse in its own short connection and return the rows."""
        return self.query_with_columns(statement, params)[1]

    def query_with_columns(self, statement: str, params: tuple[Any, ...] = ()) -> tuple[list[str], list[tuple]]:
        """Like :meth:`query`, with the result's column names (empty for a statement that returns no rows)."""
        if self.target == "duckdb":
            import duckdb

            with duckdb.connect(str(self.duckdb_path)) as conn:
                cursor = conn.execute(statement, list(params))
                if cursor.description is None:
                    return [], []
                return [d[0] for d in cursor.description], cursor.fetchall()
        conn = self.pg_connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params or None)
                if not cur.description:
                    return [], []
                return [d[0] for d in cur.description], cur.fetchall()
        finally:
            conn.close()

    def pg_connect(self) -> Any:
        """A new psycopg2 connection to the PostgreSQL warehouse (the caller closes it)."""
        import psycopg2

        pg = self.pg
        return psycopg2.connect(host=pg.host, port=pg.port, user=pg.username, password=pg.password, dbname=pg.database)

    @property
    def placeholder(self) -> str:
        """The query parameter marker of :meth:`query`: psycopg2's ``%s`` or DuckDB's ``?``."""
        return "%s" if self.target == "postgres" else "?"

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

    def describe(self) -> str:
        """Where the data lives, without the password."""
        if self.target == "duckdb":
            return f"DuckDB file {self.duckdb_path}"
        return f"PostgreSQL {self.pg.username}@{self.pg.host}:{self.pg.port}/{self.pg.database}"

    def query_hint(self, view: str) -> str:
        """A command a person can paste to look at a published view."""
        target = "" if self.target == "duckdb" else "DATAMART_TARGET=postgres "
        return f'{target}.venv/bin/python -m datamart query "SELECT * FROM {view} LIMIT 10"'


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (DuckDB and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


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

    own = dlt.secrets.get(f"{environment}.destination.{target}.credentials")
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
