"""Shared fixtures: a real PostgreSQL server for the session, a fresh database per test, and states built once per
module that each test starts from a copy of (:class:`BuiltOnce`).

The server is ``DATAMART_TEST_PG_URL`` when set (an admin URL, e.g. ``postgresql://postgres:pw@host:5432/postgres``),
else a throwaway PostgreSQL cluster started here. A machine without PostgreSQL binaries skips the PostgreSQL tests
with the reason, except in CI (``CI=true``) where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from datamart.settings import DEMO_PIPELINES_DIR, PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.postgres import (
    PostgresUnavailable,
    ThrowawayPostgres,
    create_database,
    drop_database,
)

_ISOLATED_DLT = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Keep tests away from the developer's own secrets and pipelines: dlt reads a copy of the committed config.toml
    only, and the declarations are the demo's own copies (``datamart/demo/pipelines``)."""
    isolated = Path(tempfile.mkdtemp(prefix="datamart-tests-dlt-"))
    (isolated / ".dlt").mkdir()
    shutil.copy(PROJECT_ROOT / ".dlt" / "config.toml", isolated / ".dlt" / "config.toml")
    os.environ["DLT_PROJECT_DIR"] = str(isolated)
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    # the tests' own copies of the demo pipelines: a project that adds or replaces pipelines/ keeps its tests working
    os.environ["DATAMART_DECLARATIONS_DIR"] = str(DEMO_PIPELINES_DIR)
    for key in [k for k in os.environ if k.startswith(("DESTINATION__", "SOURCES__", "DATAMART__"))]:
        del os.environ[key]
    os.environ.pop("DATAMART_TARGET", None)
    config.stash[_ISOLATED_DLT] = isolated


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tiers: a test marked neither ``slow`` nor ``postgres`` is ``fast`` (``make test-fast`` runs those only, in a
    few minutes; ``make test``, which CI runs, runs every tier)."""
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.fast)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the isolated dlt project folder."""
    isolated = config.stash.get(_ISOLATED_DLT, None)
    if isolated is not None:
        shutil.rmtree(isolated, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """An admin URL of a running PostgreSQL server, for the whole test session."""
    if os.environ.get("DATAMART_TEST_PG_URL"):
        yield os.environ["DATAMART_TEST_PG_URL"]
        return
    try:
        server = ThrowawayPostgres()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and PostgreSQL tests cannot run: {exc}")
        pytest.skip(f"PostgreSQL tests skipped: {exc}")
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()


@pytest.fixture
def pg_database(pg_admin_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_admin_url, name)
    try:
        yield url
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def pg_database_factory(pg_admin_url: str) -> Iterator[Callable[..., str]]:
    """Create named fresh databases on the session's server (e.g. a source and a warehouse); all dropped after.

    ``make(role, template=name)`` copies database ``name`` instead (a state built once per module: :class:`BuiltOnce`).
    """
    created: list[str] = []

    def make(role: str, template: str | None = None) -> str:
        name = f"t_{role}_{uuid.uuid4().hex[:8]}"
        url = create_database(pg_admin_url, name, template=template)
        created.append(name)
        return url

    yield make
    for name in created:
        drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def fresh_warehouse(request: pytest.FixtureRequest) -> Callable[..., AbstractContextManager[Warehouse]]:
    """For module-scoped fixtures (which the per-test ``warehouse`` cannot serve): ``with fresh_warehouse(kind,
    folder, prefix) as warehouse`` gives an empty DuckDB file in ``folder``, or a new PostgreSQL database
    ``<prefix>_<random>`` on the session's server (started only then), dropped at the end."""

    @contextmanager
    def make(kind: str, folder: Path, prefix: str = "t") -> Iterator[Warehouse]:
        if kind == "duckdb":
            yield Warehouse(target="duckdb", duckdb_path=folder / "warehouse.duckdb")
            return
        admin, name = request.getfixturevalue("pg_admin_url"), f"{prefix}_{uuid.uuid4().hex[:8]}"
        try:
            yield postgres_warehouse(create_database(admin, name))
        finally:
            drop_database(admin, name)

    return make


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    """An empty warehouse of each kind: a DuckDB file in tmp_path, and a fresh PostgreSQL database."""
    if request.param == "duckdb":
        return Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    return postgres_warehouse(request.getfixturevalue("pg_database_factory")("warehouse"))


class BuiltOnce:
    """States built once per test module and copied for each test, instead of each test building them again.

    A state is a folder (e.g. the demo's SQLite source, its bucket, dlt's working directory) and a warehouse: a DuckDB
    file in that folder, or a PostgreSQL database each copy takes as its template (``CREATE DATABASE … TEMPLATE``, a
    file copy on the server). For what a test starts from, not for what it tests.
    """

    DUCKDB_FILE = "warehouse.duckdb"

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.folders: dict[tuple[str, str], Path] = {}
        self.databases: dict[tuple[str, str], str] = {}  # PostgreSQL: the template database of a state
        self.admin_url = ""

    def copy(
        self, name: str, build: Callable[[Path, Warehouse], None], request: pytest.FixtureRequest, destination: Path
    ) -> Warehouse:
        """State ``name`` on the warehouse kind ``request.param`` ("duckdb" or "postgres"), built by ``build(folder,
        empty warehouse)`` on first use, copied: its files into ``destination``, its warehouse (a DuckDB file there,
        or a new database dropped after the test by ``pg_database_factory``)."""
        key = (name, request.param)
        if key not in self.folders:
            folder = self.tmp_path_factory.mktemp(f"{name}-{request.param}")
            if request.param == "duckdb":
                warehouse = Warehouse(target="duckdb", duckdb_path=folder / self.DUCKDB_FILE)
            else:
                self.admin_url = request.getfixturevalue("pg_admin_url")
                self.databases[key] = f"t_{name}_{uuid.uuid4().hex[:8]}"
                warehouse = postgres_warehouse(create_database(self.admin_url, self.databases[key]))
            build(folder, warehouse)
            self.folders[key] = folder
        folder = self.folders[key]
        assert not (folder / f"{self.DUCKDB_FILE}.wal").exists(), f"{name}: the DuckDB file was left open"
        for path in folder.iterdir():
            if path.is_dir():
                shutil.copytree(path, destination / path.name)
            else:
                shutil.copy(path, destination / path.name)
        if request.param == "duckdb":
            return Warehouse(target="duckdb", duckdb_path=destination / self.DUCKDB_FILE)
        return postgres_warehouse(
            request.getfixturevalue("pg_database_factory")("warehouse", template=self.databases[key])
        )

    def close(self) -> None:
        """Drop the template databases."""
        for database in self.databases.values():
            drop_database(self.admin_url, database)


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltOnce]:
    """States built once for the module and copied for each test (see :class:`BuiltOnce`)."""
    states = BuiltOnce(tmp_path_factory)
    try:
        yield states
    finally:
        states.close()


@pytest.fixture(scope="module")
def logical() -> Iterator[ThrowawayPostgres]:
    """A cluster started with wal_level=logical, for the whole module (replication tests: a slot is the cluster's,
    so each module has its own)."""
    try:
        server = ThrowawayPostgres(wal_level="logical")
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and PostgreSQL tests cannot run: {exc}")
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server standing for Mattermost: (its URL, the bodies posted to it). A module may define its own."""
    import http.server
    import threading

    posted: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            posted.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/Tok{uuid.uuid4().hex}", posted
    finally:
        server.shutdown()
        server.server_close()
