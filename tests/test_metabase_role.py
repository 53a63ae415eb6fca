"""Metabase's read-only role on a real PostgreSQL warehouse: connect AS the role and do what Metabase does.

The whole flow runs on PostgreSQL (source in one fresh database, warehouse in another), grants are applied, then a
psycopg2 connection as the role lists schemas and tables, selects from a published view, and fails on everything else.
A second promotion (the next demo day, restated marts) and a forced view swap (a changed published model, planned to
prod from a copy of the project) show that a view SQLMesh recreates is readable at once (the published schema's
default privileges). A reader connected as the role then queries every published view in a loop while plain
`sqlmesh plan` promotes a changed mart, stops on a failing audit, and is killed (SIGKILL) mid-promotion: no error.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import errors, sql

from datamart import demo
from datamart.flow import run_flow
from datamart.flow import summary as flow_summary
from datamart.grants import GrantError, apply_metabase_grants
from datamart.settings import PROJECT_ROOT, PUBLISHED_SCHEMA, Warehouse, postgres_warehouse
from datamart.testing.commands import demo_settings, set_environment
from datamart.testing.project import copy_project, edit
from datamart.transform import published_views, sqlmesh_context

pytestmark = pytest.mark.postgres

PASSWORD = "metabase-test-password"
HIDDEN_SCHEMAS = {"raw_app_db", "raw_bucket", "staging", "intermediate", "sqlmesh", "ops"}
# What a role with no privilege still sees in information_schema.schemata: PUBLIC's USAGE on these.
VISIBLE_SCHEMAS = {PUBLISHED_SCHEMA, "public", "pg_catalog", "information_schema"}


@dataclass
class Stack:
    """A filled demo source, its bucket, an empty PostgreSQL warehouse and Metabase's role name."""

    source_url: str
    bucket: Path
    pipelines_dir: Path
    warehouse: Warehouse
    role: str


def _drop_role(admin_url: str, role: str) -> None:
    """Drop the role and what it holds in every database of the server (roles are cluster-wide)."""
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if cur.fetchone() is None:
                return
            cur.execute("SELECT datname FROM pg_database WHERE datallowconn")
            databases = [name for (name,) in cur.fetchall()]
        for database in databases:
            conn = psycopg2.connect(admin_url, dbname=database)
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            finally:
                conn.close()
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    finally:
        admin.close()


@pytest.fixture
def role(pg_admin_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A unique Metabase role name for this test (roles outlive databases), dropped after it."""
    name = f"metabase_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DATAMART__METABASE_ROLE", name)
    monkeypatch.delenv("DATAMART__METABASE_PASSWORD", raising=False)
    yield name
    _drop_role(pg_admin_url, name)


@pytest.fixture
def stack(
    role: str, pg_database_factory: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Stack:
    """The environment of a production run: source, bucket, key and warehouse set by environment variables."""
    source_url = pg_database_factory("source")
    warehouse_url = pg_database_factory("warehouse")
    warehouse = postgres_warehouse(warehouse_url)
    bucket = tmp_path / "bucket"
    demo.generate(source_url=source_url, bucket=bucket, scale=0.2)
    settings = demo_settings(tmp_path, "metabase-role-test-key", warehouse)  # the demo's bucket; app_db below
    settings.update(SOURCES__APP_DB__CREDENTIALS=source_url, DATAMART__METABASE_PASSWORD=PASSWORD)
    set_environment(monkeypatch, settings)
    return Stack(source_url, bucket, tmp_path / "pipelines", warehouse, role)


def _connect_as(warehouse: Warehouse, role: str) -> Any:
    """A connection as Metabase would open it: the role, its password, the warehouse database."""
    pg = warehouse.pg
    conn = psycopg2.connect(host=pg.host, port=pg.port, user=role, password=PASSWORD, dbname=pg.database)
    conn.autocommit = True
    return conn


def _rows(conn: Any, statement: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(statement)
        return cur.fetchall()


def _visible_tables(conn: Any) -> list[str]:
    """What Metabase's sync lists: information_schema.tables outside the system schemas."""
    rows = _rows(
        conn,
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    return [name for (name,) in rows]


def _view_oids(warehouse: Warehouse) -> dict[str, int]:
    """The published views' OIDs: a new OID means SQLMesh dropped and recreated the view."""
    rows = warehouse.query(
        "SELECT c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'v'",
        (PUBLISHED_SCHEMA,),
    )
    return {f"{PUBLISHED_SCHEMA}.{name}": int(oid) for name, oid in rows}


def _can_read_missions(stack: Stack) -> bool:
    """Whether the role can select from marts.missions_v1 right now."""
    conn = _connect_as(stack.warehouse, stack.role)
    try:
        _rows(conn, "SELECT count(*) FROM marts.missions_v1")
        return True
    except errors.InsufficientPrivilege:
        return False
    finally:
        conn.close()


def _assert_reads_published_views_only(stack: Stack, published: list[str]) -> None:
    """Checks 2 and 3: the role lists exactly the published views and counts the same rows as the superuser."""
    conn = _connect_as(stack.warehouse, stack.role)
    try:
        assert _visible_tables(conn) == published
        as_role = _rows(conn, "SELECT count(*) FROM marts.missions_v1")[0][0]
    finally:
        conn.close()
    assert as_role == stack.warehouse.query("SELECT count(*) FROM marts.missions_v1")[0][0] > 0


def _physical_table(warehouse: Warehouse, view: str) -> str:
    """The SQLMesh physical table a prod view selects from, read from its definition."""
    schema, name = view.split(".")
    definition = warehouse.query(
        "SELECT definition FROM pg_views WHERE schemaname = %s AND viewname = %s", (schema, name)
    )[0][0]
    match = re.search(r"FROM\s+(sqlmesh__\w+\.\w+)", definition)
    assert match, f"no physical table in the definition of {view}: {definition}"
    return match.group(1)


def _plan_changed_model(stack: Stack, tmp_path: Path) -> None:
    """Promote a changed marts.missions_v1 to prod from a copy of the project: a real view swap."""
    project = copy_project(tmp_path / "project", unit_tests=True)
    _filter_missions(project, "NOT mission_id IS NULL")
    context = sqlmesh_context(stack.warehouse, project)
    context.plan("prod", auto_apply=True, no_prompts=True)


def test_metabase_reads_published_views_only_after_every_promotion(
    stack: Stack, tmp_path: Path, pg_database_factory: Callable[[str], str], pg_admin_url: str
) -> None:
    other = psycopg2.extensions.parse_dsn(pg_database_factory("other"))["dbname"]  # another database of the server
    flow = run_flow(stack.warehouse, pipelines_dir=stack.pipelines_dir, out=io.StringIO())
    published = published_views(sqlmesh_context(stack.warehouse))
    assert published and flow.transform is not None and flow.transform.published_views == published

    report = flow.transform.grants  # the promotion applied them
    assert report is not None and report.role == stack.role
    assert report.created and report.can_login and report.warnings == []
    assert f"Metabase role {stack.role}, created: may read marts." in flow_summary(flow)
    assert report.views == published
    assert PASSWORD not in report.format()

    conn = _connect_as(stack.warehouse, stack.role)
    try:
        # 1. the schemas Metabase's sync would offer
        schemas = {name for (name,) in _rows(conn, "SELECT schema_name FROM information_schema.schemata")}
        assert PUBLISHED_SCHEMA in schemas
        assert schemas <= VISIBLE_SCHEMAS, f"the role sees {sorted(schemas - VISIBLE_SCHEMAS)}"
        assert not schemas & HIDDEN_SCHEMAS
        assert not any(name.startswith("sqlmesh__") or "__" in name for name in schemas)
        # 2. the tables it would sync: exactly the published views
        assert _visible_tables(conn) == published
        # 3. a question on a published view
        as_role = _rows(conn, "SELECT count(*) FROM marts.missions_v1")[0][0]
        assert as_role == stack.warehouse.query("SELECT count(*) FROM marts.missions_v1")[0][0] > 0
        # the freshness view reads the run records of schema ops: through the view only
        freshness = _rows(conn, "SELECT pipeline, table_name FROM marts.data_freshness_v1 ORDER BY 1, 2")
        assert ("app_db", "volunteers") in freshness and len(freshness) == 7
        # 4. raw data, staging, run records, SQLMesh's physical table behind the view and its state: refused
        physical = _physical_table(stack.warehouse, "marts.missions_v1")
        assert physical.startswith("sqlmesh__marts.")
        relations = ("raw_app_db.volunteers", "staging.stg_app_db__missions", "ops.pipeline_runs", physical)
        for relation in (*relations, "sqlmesh._environments"):
            with pytest.raises(errors.InsufficientPrivilege):
                _rows(conn, f"SELECT * FROM {relation} LIMIT 1")
        # 5. no table of its own, in public or in the published schema
        for schema in ("public", PUBLISHED_SCHEMA):
            with pytest.raises(errors.InsufficientPrivilege):
                _rows(conn, f"CREATE TABLE {schema}.metabase_scratch (id int)")
        with pytest.raises(errors.InsufficientPrivilege):
            _rows(conn, "CREATE SCHEMA metabase_scratch")
        # 5b. nor a temporary one
        with pytest.raises(errors.InsufficientPrivilege):
            _rows(conn, "CREATE TEMP TABLE metabase_scratch (id int)")
    finally:
        conn.close()

    # 5c. The server's other databases: named, with the statement their owner runs; run as written, it closes them.
    assert other in report.other_databases
    line = next(line for line in report.format().splitlines() if "other database(s)" in line)
    statement = re.search(r"(REVOKE CONNECT ON DATABASE <name> FROM PUBLIC)", line).group(1)
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(statement.replace("<name>", sql.Identifier(other).as_string(admin)))
    finally:
        admin.close()
    pg = stack.warehouse.pg
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        psycopg2.connect(host=pg.host, port=pg.port, user=stack.role, password=PASSWORD, dbname=other).close()

    # Idempotent: a second application changes nothing and creates nothing.
    again = apply_metabase_grants(stack.warehouse)
    assert again is not None and not again.created and again.views == published
    assert other not in again.other_databases

    # 6a. The next day: new rows, marts restated by the prod plan.
    oids = _view_oids(stack.warehouse)
    demo.advance_day(source_url=stack.source_url, bucket=stack.bucket)
    second = run_flow(stack.warehouse, pipelines_dir=stack.pipelines_dir, out=io.StringIO())
    assert second.transform is not None and "marts.missions_v1" in second.transform.models_built
    restatement_recreated = {v for v in published if _view_oids(stack.warehouse).get(v) != oids.get(v)}
    # Measured with SQLMesh 0.236: a restatement rebuilds the physical tables and leaves the views (and their grants).
    assert restatement_recreated == set()
    assert _can_read_missions(stack)
    assert second.transform.grants is not None and second.transform.grants.views == published
    _assert_reads_published_views_only(stack, published)

    # 6b. A changed published model promoted to prod: SQLMesh drops and recreates its view; the schema's default
    # privileges granted the new view in the transaction that created it, nothing is re-applied.
    oids = _view_oids(stack.warehouse)
    _plan_changed_model(stack, tmp_path)
    assert _view_oids(stack.warehouse)["marts.missions_v1"] != oids["marts.missions_v1"], "the view was swapped"
    assert _can_read_missions(stack), "the swapped view is readable without re-applying any grant"
    _assert_reads_published_views_only(stack, published)
    report = apply_metabase_grants(stack.warehouse)
    assert report is not None and report.views == published
    _assert_reads_published_views_only(stack, published)


def test_role_without_password_is_created_nologin_with_a_warning(role: str, pg_database: str) -> None:
    report = apply_metabase_grants(postgres_warehouse(pg_database))
    assert report is not None and report.created and not report.can_login
    assert any("DATAMART__METABASE_PASSWORD" in warning for warning in report.warnings)
    assert any("schema marts holds no view yet" in warning for warning in report.warnings)
    rows = postgres_warehouse(pg_database).query(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s", (role,)
    )
    assert rows == [(False, False, False, False)]


def test_role_with_superuser_rights_is_refused(
    role: str, pg_database: str, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = postgres_warehouse(pg_database)
    admin = psycopg2.connect(pg_admin_url)
    try:
        with admin, admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(role)))
    finally:
        admin.close()
    monkeypatch.setenv("DATAMART__METABASE_PASSWORD", PASSWORD)
    with pytest.raises(GrantError, match=rf"{role}.*CREATEDB.*NOCREATEDB") as raised:
        apply_metabase_grants(warehouse)
    assert PASSWORD not in str(raised.value)


def test_duckdb_has_no_roles(tmp_path: Path) -> None:
    assert apply_metabase_grants(Warehouse(target="duckdb", duckdb_path=tmp_path / "w.duckdb")) is None


class _Reader(threading.Thread):
    """Metabase, as the role: every published view queried in a loop until stopped; every error kept."""

    def __init__(self, stack: Stack, views: list[str]) -> None:
        super().__init__(daemon=True)
        self.stack, self.views = stack, views
        self.queries, self.errors = 0, []
        self._halt = threading.Event()

    def run(self) -> None:
        conn = _connect_as(self.stack.warehouse, self.stack.role)
        try:
            while not self._halt.is_set():
                for view in self.views:
                    try:
                        _rows(conn, f"SELECT count(*) FROM {view}")
                    except psycopg2.Error as exc:
                        self.errors.append(f"{view}: {type(exc).__name__}: {str(exc).strip()}")
                    self.queries += 1
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


def _plain_sqlmesh(project: Path, *args: str) -> subprocess.Popen[str]:
    """The `sqlmesh` executable on ``project``, reaching the warehouse the dlt way (the stack's environment)."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "sqlmesh"), "-p", str(project), *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "COLUMNS": "2000"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _physical_tables(warehouse: Warehouse) -> int:
    return int(warehouse.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'sqlmesh__marts'")[0][0])


def _filter_missions(project: Path, condition: str) -> None:
    """A new version of marts.missions_v1 (same columns, fewer rows): a real build and view swap in prod."""
    # the model's query ends at FROM changes (a statement deleting gone missions follows it)
    edit(project, "models/marts/missions_v1.sql", "FROM changes;", f"FROM changes\nWHERE\n  {condition};")


def _kill_when(process: subprocess.Popen[str], moment: Callable[[], bool], timeout: float = 600) -> bool:
    """SIGKILL ``process`` as soon as ``moment()`` holds (polled 20 times a second); False if it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if moment():
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return True
        time.sleep(0.05)
    process.wait(timeout=60)
    return False


def test_metabase_reads_every_published_view_through_promotions_failures_and_kills(
    stack: Stack, tmp_path: Path
) -> None:
    run_flow(stack.warehouse, pipelines_dir=stack.pipelines_dir, out=io.StringIO())  # prod built, role set up
    published = published_views(sqlmesh_context(stack.warehouse))
    model = "models/marts/missions_v1.sql"
    reader = _Reader(stack, published)
    reader.start()
    try:
        # (a) a changed mart promoted by plain `sqlmesh plan`: its view is dropped and recreated
        oids = _view_oids(stack.warehouse)
        changed = copy_project(tmp_path / "changed")
        _filter_missions(changed, "places >= 0")
        out, _ = _plain_sqlmesh(changed, "plan", "--auto-apply", "--no-prompts").communicate(timeout=900)
        assert _view_oids(stack.warehouse)["marts.missions_v1"] != oids["marts.missions_v1"], out
        promoted = reader.queries

        # (b) a promotion stopped by a failing audit (half the missions lose their key: not_null fails)
        oids = _view_oids(stack.warehouse)
        failing = copy_project(tmp_path / "failing")
        nulls = "SELECT\n  CASE WHEN mission_id % 2 = 0 THEN NULL ELSE mission_id END AS mission_id,\n"
        edit(failing, model, "SELECT\n  mission_id,\n", nulls)
        process = _plain_sqlmesh(failing, "plan", "--auto-apply", "--no-prompts")
        out, _ = process.communicate(timeout=900)
        assert process.returncode != 0 and "not_null" in out, out
        assert _view_oids(stack.warehouse) == oids, "a failed audit leaves every view as it was"

        # (c) promotions killed: while building the new table, and right after the first view was swapped
        tables = _physical_tables(stack.warehouse)
        killed = copy_project(tmp_path / "killed_building")
        _filter_missions(killed, "places >= -1")
        process = _plain_sqlmesh(killed, "plan", "--auto-apply", "--no-prompts")
        assert _kill_when(process, lambda: _physical_tables(stack.warehouse) > tables), "killed while building"

        oids = _view_oids(stack.warehouse)
        swapped = copy_project(tmp_path / "killed_swapping")
        _filter_missions(swapped, "places >= -2")
        process = _plain_sqlmesh(swapped, "plan", "--auto-apply", "--no-prompts")
        assert _kill_when(process, lambda: _view_oids(stack.warehouse) != oids), "killed after a swap"
        time.sleep(2)  # and after: the views left by the killed promotions stay readable
    finally:
        reader.stop()
    assert reader.errors == [], reader.errors[:5]
    assert promoted > 50 and reader.queries > promoted, "the reader queried throughout"
    _assert_reads_published_views_only(stack, published)
