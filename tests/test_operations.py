"""Operations: the scheduled run, its alerts, environments that refuse each other's warehouse, Metabase backups,
and the Kubernetes CronJob and image running exactly what `make scheduled` runs."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg2
import pytest
import yaml

from datamart.alerts import redact
from datamart.environments import EnvironmentMismatch, check_environment, warehouse_environment
from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse, resolve_warehouse
from datamart.testing.commands import BIN, MAKE_VARIABLES, PYTHON, clone_environment, environment, run

pytestmark = pytest.mark.slow  # end-to-end: whole demo builds through the commands

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _base_env(tmp: Path) -> dict[str, str]:
    """No warehouse, source, key or environment from the caller; dlt reads a copy of the committed config.toml."""
    return clone_environment(tmp, project="project", DATAMART__PII_HMAC_KEY="Hmac-Key-" + uuid.uuid4().hex)


def _run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python <args>`` (or the venv's ``dlt``/``sqlmesh`` ``<args>``) from the project root."""
    command = [str(BIN / args[0]), *args[1:]] if args[0] in ("dlt", "sqlmesh") else [PYTHON, *args]
    return run(command, env, expect=0 if check else None)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "body": body.decode(), "type": self.headers["Content-Type"]})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """A local HTTP server standing for Mattermost: (the webhook URL with its secret token, the requests received)."""
    recorder = type("Recorder", (_Recorder,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = "Tok" + uuid.uuid4().hex
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/{token}", recorder.requests
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# the scheduled run on the DuckDB demo


@dataclass
class Demo:
    env: dict[str, str]
    tmp: Path
    warehouse: Warehouse

    def source(self, statement: str) -> int:
        with sqlite3.connect(self.tmp / "app.sqlite") as conn:
            return int(conn.execute(statement).fetchone()[0])

    def mart(self, statement: str) -> int:
        return int(self.warehouse.query(statement)[0][0])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The DuckDB demo after `make run`: prod built from the project."""
    tmp = tmp_path_factory.mktemp("scheduled")
    env = _base_env(tmp)
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp / "warehouse.duckdb")
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(warehouse.duckdb_path)
    _run(env, "-m", "datamart", "run", "--demo")
    return Demo(env, tmp, warehouse)


def _changed_project(tmp: Path) -> Path:
    """A copy of the SQLMesh project with one model's description changed (a new version of that model)."""
    copy = tmp / "changed_project"
    for name in ("models", "audits", "macros", "linter"):
        shutil.copytree(PROJECT_ROOT / name, copy / name)
    for name in ("config.py", "external_models.yaml"):
        shutil.copy(PROJECT_ROOT / name, copy / name)
    model = copy / "models" / "staging" / "bucket" / "stg_bucket__partners.sql"
    text = model.read_text()
    assert "description" in text
    model.write_text(text.replace("description '", "description 'Changed in a pull request not merged yet. ", 1))
    return copy


def _assert_marts_equal_a_build_from_scratch(demo: Demo) -> None:
    """Every published view serves what its model computes from the raw tables now (row for row)."""
    from datamart.testing.marts import differences_from_scratch
    from datamart.transform import published_views, sqlmesh_context

    context = sqlmesh_context(demo.warehouse)
    try:
        for view in published_views(context):
            missing, extra = differences_from_scratch(context, demo.warehouse, view)
            assert not missing and not extra, f"{view}: {len(missing)} missing, {len(extra)} stale, e.g. {missing[:2]}"
    finally:
        context.close()  # DuckDB: one writer at a time, the next command needs the file


def _freshness(demo: Demo) -> dict[str, bool]:
    rows = demo.warehouse.query("SELECT table_name, last_success_published FROM marts.data_freshness_v1")
    return {str(table): bool(published) for table, published in rows}


def test_scheduled_run_refreshes_the_marts_and_never_promotes(demo: Demo) -> None:
    # prod is built from a project that differs from the checkout (a model changed elsewhere): the scheduled run
    # must refresh prod's own versions and say so, not promote the checkout's
    changed = _changed_project(demo.tmp)
    sqlmesh_env = dict(demo.env, **demo.warehouse.environment_variables())
    _run(sqlmesh_env, "sqlmesh", "-p", str(changed), "plan", "prod", "--auto-apply", "--no-prompts")
    prod_versions = _prod_fingerprints(demo)
    _run(demo.env, "-m", "datamart.demo", "--advance-day", "--bucket", str(demo.tmp / "bucket"))
    live_missions = demo.source("SELECT count(*) FROM missions WHERE deleted_at IS NULL")
    assert demo.mart("SELECT count(*) FROM marts.missions_v1") != live_missions, "the day changed the missions"

    # the same day, as cron runs it: nothing is "due" by the models' @daily cron, the marts must still follow
    result = _run(demo.env, "-m", "datamart", "scheduled")
    out = result.stdout
    assert re.search(r"^  ok +pipeline app_db +5 tables, [1-9][\d,]* rows", out, re.M), out
    assert re.search(r"^  ok +pipeline bucket +2 tables", out, re.M), out
    # the first four models are named: a missions mart among them
    rebuilt = r"^  ok +refresh +\d+ models rebuilt from new data \(.*marts\.mission(s_v1|_status_history_v1)"
    assert re.search(rebuilt, out, re.M), out
    assert re.search(r"the project differs from prod \(.*staging\.stg_bucket__partners.*\): NOT promoted", out), out
    assert re.search(r"^  ok +reconcile app_db +5 tables match", out, re.M), out  # app_db.yaml: verify: true
    assert out.rstrip().endswith("result: ok")
    assert len(out[out.index("datamart scheduled run") :].splitlines()) <= 25, "one screen"
    # the loads reached the warehouse and the marts Metabase reads reflect them, as a build from scratch would
    assert demo.mart("SELECT count(*) FROM raw_app_db.stats_events") == demo.source("SELECT count(*) FROM stats_events")
    assert demo.mart("SELECT count(*) FROM marts.missions_v1") == live_missions
    _assert_marts_equal_a_build_from_scratch(demo)
    assert set(_freshness(demo).values()) == {True}, _freshness(demo)
    assert _prod_fingerprints(demo) == prod_versions, "prod kept its own model versions"
    # nothing new: the next refresh has nothing to rebuild and still does not promote
    again = _run(demo.env, "-m", "datamart", "scheduled", "--only", "refresh").stdout
    assert "the published views already reflect every load" in again and "NOT promoted" in again
    assert "[pipelines]" not in again


def test_freshness_says_when_the_marts_are_behind_a_load(demo: Demo) -> None:
    """A pipeline run alone (dlt's own command) loads raw data: the freshness view says the marts lag until the
    scheduled run refreshes them."""
    _run(demo.env, "-m", "datamart.demo", "--advance-day", "--bucket", str(demo.tmp / "bucket"))
    _run(demo.env, "dlt", "pipeline", "app_db", "run")
    behind = _freshness(demo)
    assert behind["missions"] is False and behind["partners"] is True, behind
    _run(demo.env, "-m", "datamart", "scheduled", "--only", "refresh")
    assert set(_freshness(demo).values()) == {True}
    _assert_marts_equal_a_build_from_scratch(demo)


def test_promote_names_the_views_it_switched(demo: Demo) -> None:
    """Switching prod back to versions that are still built swaps views without building anything: the command says
    so instead of "Models built: 0 (prod already matches)"."""
    # prod runs the changed project (first test); promoting the checkout builds its versions again if the scheduled
    # run's janitor removed them (it drops what no environment uses)
    _run(demo.env, "-m", "datamart", "promote")
    checkout = _prod_fingerprints(demo)
    sqlmesh_env = dict(demo.env, **demo.warehouse.environment_variables())
    _run(
        sqlmesh_env, "sqlmesh", "-p", str(demo.tmp / "changed_project"), "plan", "prod", "--auto-apply", "--no-prompts"
    )
    assert _prod_fingerprints(demo) != checkout
    result = _run(demo.env, "-m", "datamart", "promote")
    assert _prod_fingerprints(demo) == checkout
    assert re.search(
        r"^Models built: 0 \(none: the data they read had not changed\); views switched to a version built "
        r"earlier: .*staging\.stg_bucket__partners",
        result.stdout,
        re.M,
    ), result.stdout


def _prod_fingerprints(demo: Demo) -> dict[str, str]:
    from datamart.transform import sqlmesh_context

    context = sqlmesh_context(demo.warehouse)
    try:
        prod = context.state_reader.get_environment("prod")
        return {s.name: s.fingerprint for s in prod.snapshots}
    finally:
        context.close()  # DuckDB: one writer at a time, the next command needs the file


def test_run_exits_non_zero_when_a_pipeline_fails(demo: Demo) -> None:
    env = dict(demo.env, SOURCES__APP_DB__CREDENTIALS=f"sqlite:///{demo.tmp / 'no-such-dir' / 'app.sqlite'}")
    views = demo.mart("SELECT count(*) FROM marts.missions_v1")
    result = _run(env, "-m", "datamart", "run", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pipeline 'app_db' failed" in result.stderr and "The published views were not changed." in result.stderr
    assert demo.mart("SELECT count(*) FROM marts.missions_v1") == views


def test_query_prints_a_header_and_fails_cleanly(demo: Demo) -> None:
    result = _run(demo.env, "-m", "datamart", "query", "SELECT mission_id, mission_status FROM marts.missions_v1")
    lines = result.stdout.splitlines()
    assert lines[0] == "mission_id\tmission_status"
    assert lines[-1] == f"({len(lines) - 2} rows)" and len(lines) > 3
    bad = _run(demo.env, "-m", "datamart", "query", "SELECT no_such_column FROM marts.missions_v1", check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: the query failed on DuckDB file ") and "no_such_column" in bad.stderr
    assert "Traceback" not in bad.stderr
    # a reader that stops early (`… | head -1`): no traceback, no error
    command = [sys.executable, "-m", "datamart", "query", "SELECT * FROM raw_app_db.stats_events"]
    reader = subprocess.Popen(command, env=demo.env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stdout.readline().startswith(b"id\t")
    reader.stdout.close()
    _, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr


@pytest.mark.postgres
def test_scheduled_run_refreshes_the_marts_on_postgres(pg_database_factory, tmp_path: Path) -> None:
    """The same refresh on a PostgreSQL warehouse: a new day, `make scheduled`'s command, marts equal to a build
    from scratch, and the freshness view says the dashboards reflect every load."""
    warehouse = postgres_warehouse(pg_database_factory("warehouse"))
    env = dict(_base_env(tmp_path), DATAMART_TARGET="postgres", DESTINATION__POSTGRES__CREDENTIALS=warehouse.url())
    demo = Demo(env, tmp_path, warehouse)
    _run(env, "-m", "datamart", "run", "--demo")
    _run(env, "-m", "datamart.demo", "--advance-day", "--bucket", str(tmp_path / "bucket"))
    stale = demo.mart("SELECT count(*) FROM marts.missions_v1")
    result = _run(env, "-m", "datamart", "scheduled")
    assert re.search(r"^  ok +refresh +\d+ models rebuilt from new data", result.stdout, re.M), result.stdout
    live = demo.source("SELECT count(*) FROM missions WHERE deleted_at IS NULL")
    assert live != stale and demo.mart("SELECT count(*) FROM marts.missions_v1") == live
    _assert_marts_equal_a_build_from_scratch(demo)
    assert set(_freshness(demo).values()) == {True}


def test_scheduled_reconciliation_fails_on_drift(demo: Demo) -> None:
    """A row deleted behind dlt's back: the reconcile step (pipelines declaring ``verify: true``) fails and says so."""
    organization = demo.mart("SELECT min(id) FROM raw_app_db.organizations")
    demo.warehouse.query(f"DELETE FROM raw_app_db.organizations WHERE id = {organization}")
    result = _run(demo.env, "-m", "datamart", "scheduled", "--only", "reconcile", "--no-alert", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"FAILED +reconcile app_db .*organizations", result.stdout), result.stdout
    assert "dlt pipeline app_db verify" in result.stdout


def test_scheduled_run_bad_input_exits_2(demo: Demo) -> None:
    result = _run(demo.env, "-m", "datamart", "scheduled", "--only", "no_such_step", check=False)
    assert result.returncode == 2
    assert "unknown step(s) no_such_step; the steps are pipelines, repair, refresh" in result.stderr


def _make_dry_run(target: str) -> subprocess.CompletedProcess[str]:
    """``make -n target`` as a person would type it (not as a sub-make of ``make test``, which adds its own lines)."""
    env = environment(MAKE_VARIABLES)
    command = ["make", "--no-print-directory", "-n", target]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=True)


def test_make_scheduled_runs_the_documented_command() -> None:
    dry = _make_dry_run("scheduled")
    assert dry.stdout.strip().splitlines()[-1] == ".venv/bin/python -m datamart scheduled"


# ---------------------------------------------------------------------------------------------------------------
# a failed scheduled run alerts, without a secret


@pytest.mark.postgres
def test_failed_run_posts_an_alert_without_secrets(
    pg_admin_url: str, pg_database_factory, webhook, tmp_path: Path
) -> None:
    url, requests = webhook
    warehouse_url = pg_database_factory("warehouse")
    password = "Wh-Pa55-" + uuid.uuid4().hex[:10]
    role = "loader_" + uuid.uuid4().hex[:6]
    conn = psycopg2.connect(warehouse_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        cur.execute(f"GRANT ALL ON DATABASE {warehouse_url.rsplit('/', 1)[1]} TO {role}")
    conn.close()
    loader_url = warehouse_url.replace("postgres:postgres@", f"{role}:{password}@")
    source_password = "Src-Pa55-" + uuid.uuid4().hex[:10]
    env = _base_env(tmp_path)
    env.update(
        DATAMART_TARGET="postgres",
        DATAMART_ENV="preprod",
        DESTINATION__POSTGRES__CREDENTIALS=loader_url,
        # the application database is down: nothing listens on port 9
        SOURCES__APP_DB__CREDENTIALS=f"postgresql+psycopg2://reader:{source_password}@127.0.0.1:9/app",
        DATAMART__ALERT_WEBHOOK_URL=url,
    )
    (tmp_path / "bucket").mkdir()
    result = _run(env, "-m", "datamart", "scheduled", "--retries", "1", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^  FAILED +pipeline app_db +.*OperationalError", result.stdout, re.M), result.stdout
    assert re.search(r"^  ok +pipeline bucket", result.stdout, re.M), "a failed pipeline does not stop the others"
    assert re.search(r"^  skipped +refresh +skipped: pipeline app_db failed", result.stdout, re.M)
    assert "result: FAILED, alert posted to the webhook" in result.stdout

    assert len(requests) == 1
    request = requests[0]
    assert request["type"] == "application/json"
    text = json.loads(request["body"])["text"]
    assert text.startswith(f"datamart scheduled run FAILED (preprod, PostgreSQL {role}@127.0.0.1:")
    assert "- pipeline app_db, step pipelines" in text
    assert "OperationalError" in text and "Connection refused" in text
    assert "what to run: check the connection, then `dlt pipeline app_db run`" in text
    assert "not run: repair, refresh" in text
    assert len(text.splitlines()) <= 10
    for secret in (password, source_password, env["DATAMART__PII_HMAC_KEY"], url, url.rsplit("/", 1)[1]):
        assert secret not in request["body"] and secret not in result.stdout, secret


def test_redact_masks_url_passwords_and_known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATAMART__ALERT_WEBHOOK_URL", "https://chat.example.org/hooks/abcdefghijklmnop1234")
    monkeypatch.setenv("SOURCES__API__TOKEN", "tok-0123456789")
    text = (
        "could not parse postgresql+psycopg2://reader:Secret-Pw@db/app; token tok-0123456789 sent to "
        "/hooks/abcdefghijklmnop1234"
    )
    masked = redact(text)
    assert masked == "could not parse postgresql+psycopg2://reader:***@db/app; token *** sent to /hooks/***"


def test_unreachable_webhook_is_reported_not_swallowed(demo: Demo) -> None:
    env = dict(demo.env, DATAMART__ALERT_WEBHOOK_URL="http://127.0.0.1:9/hooks/Tok1234567890abcdef")
    env["SOURCES__APP_DB__CREDENTIALS"] = f"sqlite:///{demo.tmp / 'no-such-dir' / 'app.sqlite'}"
    result = _run(env, "-m", "datamart", "scheduled", "--retries", "1", "--only", "pipelines", check=False)
    assert result.returncode == 1
    assert "result: FAILED, ALERT NOT SENT: the alert webhook could not be reached" in result.stdout
    assert "Tok1234567890abcdef" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# environments


def test_environment_marker_refuses_the_other_environment(warehouse: Warehouse) -> None:
    assert warehouse_environment(warehouse) is None
    prod = Warehouse(warehouse.target, warehouse.duckdb_path, warehouse.pg, environment="prod")
    assert check_environment(prod) == "prod"  # first use marks it
    assert check_environment(prod) == "prod"  # then compares
    assert warehouse_environment(warehouse) == "prod"
    dev = Warehouse(warehouse.target, warehouse.duckdb_path, warehouse.pg, environment="dev")
    with pytest.raises(EnvironmentMismatch) as refused:
        check_environment(dev)
    message = str(refused.value)
    assert message.startswith(f"refused: DATAMART_ENV=dev but the warehouse {warehouse.describe()} is the prod ")
    assert "set DATAMART_ENV=prod" in message
    assert f"DEV__DESTINATION__{warehouse.target.upper()}__CREDENTIALS" in message
    assert warehouse.query("SELECT count(*) FROM ops.warehouse_environment") == [(1,)]


@pytest.mark.parametrize("target", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_commands_refuse_prod_with_dev_credentials_and_the_reverse(
    target: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = _base_env(tmp_path)
    if target == "duckdb":
        dev_creds, prod_creds = str(tmp_path / "dev.duckdb"), str(tmp_path / "prod.duckdb")
    else:
        make = request.getfixturevalue("pg_database_factory")
        dev_creds, prod_creds = make("dev"), make("prod")
        env["DATAMART_TARGET"] = target
    # each environment's own credentials (the <ENV>__ section); first use marks each warehouse
    env[f"DEV__DESTINATION__{target.upper()}__CREDENTIALS"] = dev_creds
    env[f"PROD__DESTINATION__{target.upper()}__CREDENTIALS"] = prod_creds
    assert "(1 rows)" in _run(env, "-m", "datamart", "query", "SELECT 1").stdout  # DATAMART_ENV unset: dev
    prod = Warehouse("duckdb", duckdb_path=Path(prod_creds)) if target == "duckdb" else postgres_warehouse(prod_creds)
    assert check_environment(replace(prod, environment="prod")) == "prod"

    # prod credentials with DATAMART_ENV=dev: every command stops, nothing is loaded
    mixed = dict(env, DATAMART_ENV="dev")
    mixed[f"DEV__DESTINATION__{target.upper()}__CREDENTIALS"] = prod_creds
    for command in (["-m", "datamart", "scheduled"], ["dlt", "pipeline", "app_db", "run"]):
        result = _run(mixed, *command, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "refused: DATAMART_ENV=dev but the warehouse" in result.stderr
        assert "is the prod warehouse (ops.warehouse_environment = 'prod')" in result.stderr
    plain = _run(mixed, "sqlmesh", "info", check=False)  # plain sqlmesh: config.py checks the marker too
    said = " ".join((plain.stdout + plain.stderr).split())
    assert plain.returncode != 0 and "refused: DATAMART_ENV=dev but the warehouse" in said, said
    # and dev credentials with DATAMART_ENV=prod
    reverse = dict(env, DATAMART_ENV="prod")
    reverse[f"PROD__DESTINATION__{target.upper()}__CREDENTIALS"] = dev_creds
    result = _run(reverse, "-m", "datamart", "promote", check=False)
    assert result.returncode == 2
    assert "refused: DATAMART_ENV=prod but the warehouse" in result.stderr and "is the dev warehouse" in result.stderr
    # nothing was loaded into either warehouse by the refused commands
    for creds in (dev_creds, prod_creds):
        wh = Warehouse("duckdb", duckdb_path=Path(creds)) if target == "duckdb" else postgres_warehouse(creds)
        assert not wh.table_exists("raw_app_db", "_dlt_loads")


def test_each_environment_resolves_its_own_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATAMART_TARGET", "postgres")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", "postgresql://shared:pw1@shared-host:5432/datamart")
    monkeypatch.setenv("PROD__DESTINATION__POSTGRES__CREDENTIALS", "postgresql://loader:pw2@prod-host:5432/datamart")
    monkeypatch.setenv("DATAMART_ENV", "prod")
    prod = resolve_warehouse()
    assert (prod.environment, prod.pg.host, prod.pg.username) == ("prod", "prod-host", "loader")
    monkeypatch.setenv("DATAMART_ENV", "preprod")  # no preprod section: the plain credentials (one env per worker)
    preprod = resolve_warehouse()
    assert (preprod.environment, preprod.pg.host) == ("preprod", "shared-host")
    monkeypatch.delenv("DATAMART_ENV")
    assert resolve_warehouse().environment == "dev"
    monkeypatch.setenv("DATAMART_ENV", "staging")
    with pytest.raises(Exception, match="DATAMART_ENV='staging' is not a known environment; use one of dev"):
        resolve_warehouse()
    # dlt's local working directories are kept apart per environment too
    from datamart.ingest.loading import default_pipelines_dir

    monkeypatch.setenv("DATAMART_PIPELINES_DIR", str(tmp_path))
    assert default_pipelines_dir(prod) == tmp_path / "prod" / "postgres"
    assert default_pipelines_dir(Warehouse("duckdb", duckdb_path=tmp_path / "w.duckdb")) == tmp_path / "duckdb"


# ---------------------------------------------------------------------------------------------------------------
# Metabase backup and restore


def _metabase_like(url: str, cards: int) -> None:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE report_dashboard (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz);"
            "CREATE TABLE report_card (id serial PRIMARY KEY, name text NOT NULL, dataset_query jsonb,"
            " dashboard_id int REFERENCES report_dashboard(id));"
            "CREATE TABLE core_user (id serial PRIMARY KEY, email text UNIQUE);"
            "INSERT INTO report_dashboard (name, created_at) VALUES ('Missions', now()), ('Partenaires', now());"
        )
        for i in range(cards):
            cur.execute(
                "INSERT INTO report_card (name, dataset_query, dashboard_id) VALUES (%s, %s, %s)",
                (f"card {i}", json.dumps({"native": {"query": f"SELECT {i} FROM marts.missions_v1"}}), 1 + i % 2),
            )
    conn.close()


def _dump_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            rows = {}
            for table in ("report_dashboard", "report_card", "core_user"):
                cur.execute(f"SELECT * FROM {table} ORDER BY id")
                rows[table] = cur.fetchall()
            cur.execute("SELECT last_value, is_called FROM report_card_id_seq")
            rows["card_id_sequence"] = cur.fetchall()
            return rows
    finally:
        conn.close()


def _make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.postgres
def test_metabase_backup_and_restore_round_trip(pg_admin_url: str, pg_database_factory, tmp_path: Path) -> None:
    source = pg_database_factory("metabase")
    _metabase_like(source, cards=25)
    expected = _dump_rows(source)
    password = "postgres"  # the throwaway server's: it must appear in no output
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE", "FILE", "METABASE_DB_URL")}
    dump = tmp_path / "metabase.dump"

    backup = _make("metabase-backup", f"METABASE_DB_URL={source}", f"FILE={dump}", env=env)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert dump.stat().st_size > 0 and dump.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    assert f"written to {dump}" in backup.stdout
    assert f":{password}@" not in backup.stdout + backup.stderr

    empty = pg_database_factory("metabase_new")
    restored = _make("metabase-restore", f"METABASE_DB_URL={empty}", f"FILE={dump}", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert _dump_rows(empty) == expected

    # a non-empty instance is refused: its own dashboards would be wiped
    other = pg_database_factory("metabase_used")
    _metabase_like(other, cards=3)
    conn = psycopg2.connect(other)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE extra_from_newer_metabase (id int)")
    conn.close()
    refused = _make("metabase-restore", f"METABASE_DB_URL={other}", f"FILE={dump}", env=env)
    assert refused.returncode != 0
    assert "refused:" in refused.stderr and "is not empty (" in refused.stderr and "FORCE=1" in refused.stderr
    assert f":{password}@" not in refused.stdout + refused.stderr
    assert len(_dump_rows(other)["report_card"]) == 3, "nothing changed"

    forced = _make("metabase-restore", f"METABASE_DB_URL={other}", f"FILE={dump}", "FORCE=1", env=env)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert _dump_rows(other) == expected
    conn = psycopg2.connect(other)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'extra_from_newer_metabase'")
        assert cur.fetchone() == (0,), "the instance was wiped, not merged"
    conn.close()


@pytest.mark.postgres
def test_failed_restore_leaves_the_instance_as_it_was(pg_database_factory, tmp_path: Path) -> None:
    from datamart.metabase_backup import BackupError, backup, restore

    source = pg_database_factory("metabase")
    _metabase_like(source, cards=2)
    dump = backup(source, tmp_path / "ok.dump")
    target = pg_database_factory("metabase_used")
    _metabase_like(target, cards=7)
    # a role that may not create the restored tables: the restore fails after the wipe, inside one transaction
    conn = psycopg2.connect(target)
    conn.autocommit = True
    role = "mb_" + uuid.uuid4().hex[:6]
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'Mb-Pw-123456'")
        cur.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    conn.close()
    limited = target.replace("postgres:postgres@", f"{role}:Mb-Pw-123456@")
    with pytest.raises(BackupError) as failed:
        restore(limited, dump, force=True)
    assert "Mb-Pw-123456" not in str(failed.value)
    assert len(_dump_rows(target)["report_card"]) == 7


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes CronJob and the container image


def _makefile_command(target: str) -> list[str]:
    dry = _make_dry_run(target)
    return shlex.split(dry.stdout.strip().splitlines()[-1])


def test_cronjob_and_image_run_exactly_make_scheduled() -> None:
    make_command = _makefile_command("scheduled")  # .venv/bin/python -m datamart scheduled
    assert make_command[0] == ".venv/bin/python"
    manifests = list(yaml.safe_load_all((PROJECT_ROOT / "deploy" / "k8s" / "cronjob.yaml").read_text()))
    cronjob = next(m for m in manifests if m and m["kind"] == "CronJob")
    assert cronjob["apiVersion"] == "batch/v1"
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    command = container.get("command", []) + container.get("args", [])

    dockerfile = (PROJECT_ROOT / "deploy" / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)[-1]
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.M)[-1])
    cmd = json.loads(re.findall(r"^CMD\s+(\[.*\])", dockerfile, re.M)[-1])
    # the image's venv is the project's .venv under WORKDIR: the same interpreter path as the Makefile's
    assert entrypoint == [f"{workdir}/{make_command[0]}", *make_command[1:3]]
    assert entrypoint + cmd == [f"{workdir}/{make_command[0]}", *make_command[1:]]
    # the CronJob runs the image's entry point unchanged (or spells out the same command)
    assert command in ([], cmd, entrypoint + cmd), command
    assert container.get("workingDir", workdir) == workdir
    # secrets come from a Secret, as environment variables; no secret value is written in the manifest
    env_from = container.get("envFrom", [])
    assert any("secretRef" in source for source in env_from)
    secret_names = {source["secretRef"]["name"] for source in env_from if "secretRef" in source}
    for manifest in manifests:
        if manifest and manifest["kind"] == "Secret":
            assert manifest["metadata"]["name"] not in secret_names or not manifest.get("data")
    for variable in container.get("env", []):
        assert not re.search(r"PASSWORD|CREDENTIALS|KEY|TOKEN|WEBHOOK", variable["name"]) or "valueFrom" in variable
    names = {v["name"]: v.get("value") for v in container.get("env", [])}
    assert names.get("DATAMART_ENV") == "prod" and names.get("DATAMART_TARGET") == "postgres"


def test_unreachable_warehouse_fails_the_run_and_alerts(webhook, tmp_path: Path) -> None:
    url, requests = webhook
    env = _base_env(tmp_path)
    env.update(
        DATAMART_TARGET="postgres",
        DATAMART_ENV="prod",
        DESTINATION__POSTGRES__CREDENTIALS="postgresql://loader:Wh-Down-Pa55@127.0.0.1:9/datamart",
        DATAMART__ALERT_WEBHOOK_URL=url,
    )
    result = _run(env, "-m", "datamart", "scheduled", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^  FAILED +warehouse +OperationalError: .*Connection refused", result.stdout, re.M)
    assert re.search(r"^  skipped +pipelines +skipped: the warehouse did not answer", result.stdout, re.M)
    (request,) = requests
    text = json.loads(request["body"])["text"]
    assert text.startswith("datamart scheduled run FAILED (prod, PostgreSQL loader@127.0.0.1:9/datamart)")
    assert "- step warehouse: OperationalError" in text and "Wh-Down-Pa55" not in request["body"]


def test_summary_stays_one_screen_with_many_tables() -> None:
    from datamart.ingest.runner import PipelineRun, TableLoad
    from datamart.scheduled import ScheduledRun, StepResult, summary

    tables = [TableLoad(f"t{i:02}", rows_loaded=5 if i in (3, 17) else 0, rows_in_warehouse=10) for i in range(40)]
    run = ScheduledRun(Warehouse("duckdb", duckdb_path=Path("/srv/w.duckdb")))
    run.loads = [PipelineRun("big", "raw_big", 2.0, tables)]
    run.results = [StepResult("pipelines", True, "40 tables, 10 rows, 2.0s", pipeline="big")]
    text = summary(run)
    assert "raw_big.t03" in text and "raw_big.t17" in text and "raw_big.t04" not in text
    assert "(38 unchanged tables not listed)" in text
    assert len(text.splitlines()) <= 25
