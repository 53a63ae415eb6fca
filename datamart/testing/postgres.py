"""A throwaway PostgreSQL cluster for tests and benchmarks: temp directory, free port, stopped and removed at the end.

PostgreSQL refuses to run as root, so when this process is root the server runs as the ``postgres`` OS user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

PASSWORD = "postgres"  # trust authentication ignores it, but dlt refuses credentials without one


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: ``DATAMART_PG_BIN``, Debian's newest, or the PATH."""
    candidates = []
    if os.environ.get("DATAMART_PG_BIN"):
        candidates.append(os.environ["DATAMART_PG_BIN"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (looked in DATAMART_PG_BIN, /usr/lib/postgresql/*/bin and PATH); "
        "install them with `apt-get install postgresql` or set DATAMART_TEST_PG_URL to an existing server"
    )


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    """Start with :meth:`start`, get URLs with :meth:`url`, always :meth:`stop` (or use as a context manager)."""

    def __init__(self, bin_dir: Path | None = None, port: int | None = None, wal_level: str | None = None) -> None:
        self.wal_level = wal_level  # e.g. "logical" for a source read by logical decoding (replication mode)
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="datamart-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}"
            )

    def start(self) -> ThrowawayPostgres:
        """initdb in the temp directory and start the server on 127.0.0.1:<port>."""
        sock = self.root / "sock"
        self.data.mkdir()
        sock.mkdir()
        os.chmod(self.root, 0o755)  # mkdtemp makes it 0700: postgres must be able to traverse it
        if self._as_postgres:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(sock, "postgres", "postgres")
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            self.bin_dir / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-locale",
        )  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sock}'\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nmax_connections = 100\n"
            )
            if self.wal_level:
                conf.write(f"wal_level = {self.wal_level}\n")
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url("postgres")).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (fast mode) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for a database of this server, as the superuser."""
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` on the server of ``admin_url`` and return its URL.

    ``template``: a copy of that database (``CREATE DATABASE … TEMPLATE``, a file copy: far cheaper than loading the
    same data again); nobody may be connected to the template meanwhile.
    """
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    _admin(admin_url, statement)
    return _with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (closing its other connections first)."""
    _admin(admin_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _admin(admin_url: str, statement: sql.Composable) -> None:
    conn = psycopg2.connect(admin_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))
