"""Secrets never appear in what the commands print, in the run records, in the logs or in the reports.

Recognisable secret values (the warehouse password, the source password, the pseudonymisation key, Metabase's
password) are given to real commands — runs, verify, failing runs (an unreachable source, a warehouse refusing the
user), the SQLMesh paths — and every output is searched for them: stdout, stderr, the ops tables, SQLMesh's log files
and dlt's working directory (traces).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from datamart import demo
from datamart.redact import redact
from datamart.settings import PROJECT_ROOT, postgres_warehouse

pytestmark = pytest.mark.postgres

DLT = str(Path(sys.executable).parent / "dlt")
WAREHOUSE_PASSWORD = "Wh-S3cret-7731"
SOURCE_PASSWORD = "Src-S3cret-5519"
HMAC_KEY = "Hmac-S3cret-9902-pseudonymisation"
METABASE_PASSWORD = "Mb-S3cret-6604"
WRONG_PASSWORD = "Wrong-S3cret-0042"
SECRETS = (WAREHOUSE_PASSWORD, SOURCE_PASSWORD, HMAC_KEY, METABASE_PASSWORD, WRONG_PASSWORD)


def _owned_database(admin_url: str, factory: object, role: str, password: str) -> str:
    """A fresh database owned by a new login role with ``password``; its URL as that role."""
    url = factory(role)  # type: ignore[operator]
    database = url.rsplit("/", 1)[1]
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD %s").format(sql.Identifier(role)), (password,)
            )
            cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(role)))
    finally:
        admin.close()
    host_part = url.split("@", 1)[1]
    return f"postgresql://{role}:{password}@{host_part}"


def _drop_roles(admin_url: str, urls: list[str], roles: list[str]) -> None:
    """Give what the roles own back to the admin in each database, then drop them (roles are cluster-wide)."""
    for url in [*urls, admin_url]:  # the databases first: a role owning objects cannot be dropped
        database = url.rsplit("/", 1)[1]
        conn = psycopg2.connect(admin_url.rsplit("/", 1)[0] + "/" + database)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for role in roles:
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    if cur.fetchone():
                        name = sql.Identifier(role)
                        cur.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(name))
                        cur.execute(sql.SQL("DROP OWNED BY {}").format(name))
                        if url == admin_url:
                            cur.execute(sql.SQL("DROP ROLE {}").format(name))
        finally:
            conn.close()


def _files_text(folder: Path, since: float) -> str:
    """The text of every file under ``folder`` written since ``since`` (binary files decoded leniently)."""
    if not folder.exists():
        return ""
    return "\n".join(
        path.read_bytes().decode("utf-8", "replace")
        for path in folder.rglob("*")
        if path.is_file() and path.stat().st_mtime >= since
    )


def test_secrets_never_appear_in_outputs_records_or_logs(
    pg_admin_url: str, pg_database_factory: object, tmp_path: Path
) -> None:
    suffix = str(os.getpid())
    wh_role, src_role, metabase = f"wh_secret_{suffix}", f"src_secret_{suffix}", f"mb_secret_{suffix}"
    started = time.time() - 1
    warehouse_url = _owned_database(pg_admin_url, pg_database_factory, wh_role, WAREHOUSE_PASSWORD)
    source_url = _owned_database(pg_admin_url, pg_database_factory, src_role, SOURCE_PASSWORD)
    try:
        demo.generate(source_url=source_url, bucket=tmp_path / "bucket", scale=0.05)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART"))}
        env = {
            **base,
            "DATAMART_TARGET": "postgres",
            "DESTINATION__POSTGRES__CREDENTIALS": warehouse_url,
            "SOURCES__APP_DB__CREDENTIALS": source_url,
            "SOURCES__BUCKET__BUCKET_URL": str(tmp_path / "bucket"),
            "DATAMART__PII_HMAC_KEY": HMAC_KEY,
            "DATAMART__METABASE_ROLE": metabase,
            "DATAMART__METABASE_PASSWORD": METABASE_PASSWORD,
            "DATAMART_PIPELINES_DIR": str(tmp_path / "pipelines"),
            "DATAMART__SQLMESH_STATE_SCHEMA": "sqlmesh_secrets_test",
        }
        unreachable_source = f"postgresql://{src_role}:{SOURCE_PASSWORD}@127.0.0.1:{closed_port}/app"
        refused_warehouse = warehouse_url.replace(
            f"{wh_role}:{WAREHOUSE_PASSWORD}", f"nobody_{suffix}:{WRONG_PASSWORD}"
        )
        python = [sys.executable, "-m", "datamart"]
        commands: list[tuple[list[str], dict[str, str], int]] = [
            ([DLT, "pipeline", "app_db", "run"], {}, 0),
            ([DLT, "pipeline", "app_db", "verify"], {}, 0),
            ([*python, "run"], {}, 0),  # every pipeline, SQLMesh's prod plan, Metabase's grants
            (
                [DLT, "pipeline", "app_db", "run", "--retries", "1"],
                {"SOURCES__APP_DB__CREDENTIALS": unreachable_source},
                1,
            ),
            ([DLT, "pipeline", "app_db", "verify"], {"SOURCES__APP_DB__CREDENTIALS": unreachable_source}, 1),
            ([DLT, "pipeline", "app_db", "run"], {"DESTINATION__POSTGRES__CREDENTIALS": refused_warehouse}, 1),
            ([*python, "promote"], {"DESTINATION__POSTGRES__CREDENTIALS": refused_warehouse}, 1),
            (
                [*python, "sqlmesh", "plan", "--no-prompts"],
                {"DESTINATION__POSTGRES__CREDENTIALS": refused_warehouse},
                1,
            ),
            ([*python, "env"], {}, 0),
        ]
        printed = []
        for command, overrides, expected in commands:
            result = subprocess.run(
                command, env={**env, **overrides}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
            )
            where = " ".join(command[1:] if command[0] == DLT else command[2:])
            assert (result.returncode == 0) == (expected == 0), f"{where}: {result.returncode}\n{result.stderr}"
            printed.append((where, result.stdout + result.stderr))

        # the failing commands said why, in a message, not a traceback
        failures = "\n".join(text for where, text in printed[3:8])
        assert "error: pipeline 'app_db' failed" in failures and "error: verify of pipeline 'app_db' failed" in failures
        assert "error: the warehouse could not be reached" in printed[6][1] + printed[7][1]
        assert not [where for where, text in printed if "Traceback" in text]

        warehouse = postgres_warehouse(warehouse_url)
        records = warehouse.query("SELECT * FROM ops.pipeline_runs") + warehouse.query(
            "SELECT * FROM ops.pipeline_run_tables"
        )
        assert any(row[8] == "failed" for row in warehouse.query("SELECT * FROM ops.pipeline_runs"))
        stored = "\n".join(str(value) for row in records for value in row)
        logs = _files_text(PROJECT_ROOT / "logs", started)
        working_dirs = _files_text(tmp_path / "pipelines", started)
        for secret in SECRETS:
            for where, text in printed:
                assert secret not in text, f"{secret} printed by `{where}`:\n{text}"
            assert secret not in stored, f"{secret} stored in the ops tables"
            assert secret not in logs, f"{secret} written in SQLMesh's logs/"
            assert secret not in working_dirs, f"{secret} written in dlt's working directory"
    finally:
        _drop_roles(pg_admin_url, [warehouse_url, source_url], [metabase, wh_role, src_role])


def test_redact_masks_connection_strings_and_known_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", HMAC_KEY)
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", f"postgresql://app:{SOURCE_PASSWORD}@replica:5432/app")
    text = redact(
        f"could not connect to postgresql+psycopg2://app:{SOURCE_PASSWORD}@replica:5432/app "
        f"(dsn: host=db password={WAREHOUSE_PASSWORD} user=x) key {HMAC_KEY}; again {SOURCE_PASSWORD}"
    )
    assert text == (
        "could not connect to postgresql+psycopg2://app:***@replica:5432/app (dsn: host=db password=*** user=x) "
        "key ***; again ***"
    )
