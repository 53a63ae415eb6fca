"""Back up and restore Metabase's own application database (its questions, dashboards, users, settings).

``python -m datamart.metabase_backup backup <url> [--file F]`` writes a pg_dump custom-format file;
``python -m datamart.metabase_backup restore <url> --file F [--force]`` loads it into an instance's database.
Restore refuses a database that holds anything unless ``--force``: it wipes the instance (every schema of that
database). The wipe and the restore run in one transaction, so a failed restore leaves the database as it was.

The URL is Metabase's ``MB_DB_CONNECTION_URI`` style ``postgresql://user:password@host:5432/metabase``. The password
is handed to pg_dump/psql through ``PGPASSWORD``, never on a command line, and never printed. Stop Metabase before a
restore, start it after: it caches its application data.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from datamart.settings import PROJECT_ROOT

WIPE = """
DO $$
DECLARE s record;
BEGIN
  FOR s IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
  END LOOP;
END $$;
"""


class BackupError(RuntimeError):
    """A backup or restore that could not be done; the message says why and what to do."""


def describe(url: str) -> str:
    """``user@host:port/database``: the URL without its password."""
    parts = urlsplit(url)
    return f"{parts.username or ''}@{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def libpq_env(url: str) -> dict[str, str]:
    """The PG* environment variables for ``url`` (password included, so it never appears in a process list)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise BackupError(
            f"not a PostgreSQL URL with a database: {parts.scheme}://{describe(url)}; "
            "give postgresql://user:password@host:5432/metabase"
        )
    env = dict(os.environ)
    env.update(PGHOST=parts.hostname or "localhost", PGPORT=str(parts.port or 5432), PGDATABASE=unquote(parts.path[1:]))
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    for key, values in parse_qs(parts.query).items():
        if key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout"):
            env[f"PG{key.upper()}"] = values[-1]
    return env


def client(name: str) -> str:
    """Path of a PostgreSQL client binary: ``DATAMART_PG_BIN``, Debian's newest, then the PATH."""
    candidates = [os.environ.get("DATAMART_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / name).exists():
            return str(Path(directory) / name)
    found = shutil.which(name)
    if found:
        return found
    raise BackupError(f"{name} not found: install the PostgreSQL client (apt-get install postgresql-client)")


def _run(command: list[str], url: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=libpq_env(url), capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().replace(libpq_env(url).get("PGPASSWORD") or "\0", "***")
        raise BackupError(f"{Path(command[0]).name} failed on {describe(url)}: {message}")
    return result


def objects_in(url: str) -> list[str]:
    """The tables, views and sequences of the database (none: an empty instance, safe to restore into)."""
    query = (
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT LIKE 'pg\\_%' "
        "AND n.nspname <> 'information_schema' ORDER BY 1"
    )
    result = _run([client("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query], url)
    return [line for line in result.stdout.splitlines() if line.strip()]


def backup(url: str, file: Path | None = None) -> Path:
    """Dump Metabase's application database to ``file`` (custom format); returns the file written."""
    file = file or PROJECT_ROOT / "backups" / f"metabase-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.dump"
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    try:
        _run([client("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", "--file", str(partial)], url)
    except BackupError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(file)  # a failed dump never leaves a file that looks complete
    return file


def restore(url: str, file: Path, force: bool = False) -> list[str]:
    """Restore ``file`` into the database of ``url``; refuse a non-empty one unless ``force``; returns what it wiped."""
    if not file.is_file():
        raise BackupError(f"backup file {file} not found")
    existing = objects_in(url)
    if existing and not force:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise BackupError(
            f"refused: {describe(url)} is not empty ({len(existing)} objects: {shown}). Restoring wipes this "
            "Metabase instance: every question, dashboard and user in it is replaced by the backup's. If that is "
            "what you want, stop Metabase and rerun with --force (make metabase-restore … FORCE=1)."
        )
    with tempfile.TemporaryDirectory(prefix="metabase-restore-") as tmp:
        script = Path(tmp) / "restore.sql"
        _run([client("pg_restore"), "--no-owner", "--no-privileges", "--file", str(script), str(file)], url)
        wipe = Path(tmp) / "wipe.sql"
        wipe.write_text(WIPE + "CREATE SCHEMA IF NOT EXISTS public;\n")
        # one transaction: the wipe and the restore are applied together, or not at all
        _run([client("psql"), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(wipe), "-f", str(script)], url)
    return existing


def main(argv: list[str] | None = None) -> int:
    """Command line; exit 0 done, 1 failed, 2 refused or wrong input."""
    parser = argparse.ArgumentParser(prog="python -m datamart.metabase_backup", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dump = commands.add_parser("backup", help="dump Metabase's application database to a file")
    dump.add_argument(
        "url", nargs="?", help="postgresql://user:password@host:5432/metabase (default: $METABASE_DB_URL)"
    )
    dump.add_argument("--file", type=Path, help="default: backups/metabase-<UTC time>.dump")
    load = commands.add_parser("restore", help="restore a backup into a Metabase application database")
    load.add_argument(
        "url", nargs="?", help="postgresql://user:password@host:5432/metabase (default: $METABASE_DB_URL)"
    )
    load.add_argument("--file", type=Path, required=True)
    load.add_argument("--force", action="store_true", help="wipe a non-empty database first")
    args = parser.parse_args(argv)
    url = args.url or os.environ.get("METABASE_DB_URL", "")
    try:
        if args.command == "backup":
            written = backup(url, args.file)
            print(f"Metabase backup of {describe(url)} written to {written} ({written.stat().st_size:,} bytes)")
        else:
            wiped = restore(url, args.file, args.force)
            note = f" (wiped {len(wiped)} existing objects)" if wiped else ""
            print(f"Restored {args.file} into {describe(url)}{note}. Start Metabase again.")
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if str(exc).startswith(("refused", "not a PostgreSQL", "backup file")) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
