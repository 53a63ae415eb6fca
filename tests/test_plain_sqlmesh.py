"""Plain `sqlmesh`, typed as a user types it from the project root, with no wrapper and no variable of its own.

The warehouse is given only the way dlt reads it (DESTINATION__DUCKDB__CREDENTIALS, or [destination.postgres] in
.dlt/secrets.toml with DATAMART_TARGET=postgres): `dlt pipeline all run` loads it, then the `sqlmesh` executable
runs `info`, `plan dev` and `plan` (prod) on the same warehouse. Then plain `sqlmesh plan` of a project that breaks
a published view's contract, or publishes a personal column, is refused by the review gate (linter/gate.py) with
`make review`'s message, in prod and in a dev environment, and prod is unchanged.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datamart import demo
from datamart.settings import Warehouse, postgres_warehouse
from datamart.testing import commands
from datamart.testing.commands import BIN, clone_environment
from datamart.testing.postgres import create_database, drop_database
from datamart.testing.project import copy_project, edit

pytestmark = pytest.mark.slow  # end-to-end: whole demo builds through the commands


@dataclass
class Loaded:
    """A warehouse loaded by `dlt pipeline all run` and built by plain `sqlmesh plan dev` then `sqlmesh plan`."""

    warehouse: Warehouse
    env: dict[str, str]
    tmp: Path
    outputs: dict[str, subprocess.CompletedProcess[str]]


def run(env: dict[str, str], tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The venv's ``dlt`` or ``sqlmesh`` executable, from the project root."""
    return commands.run([str(BIN / tool), *args], env, timeout=900)


def _env(tmp: Path) -> dict[str, str]:
    """No warehouse, source or SQLMesh setting from the caller; dlt reads a copy of the committed config.toml."""
    return clone_environment(
        tmp,
        DATAMART__PII_HMAC_KEY="plain-sqlmesh-" + uuid.uuid4().hex,
        COLUMNS="2000",  # SQLMesh's console wraps its messages at the terminal's width
    )


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    tmp = tmp_path_factory.mktemp(f"plain_{request.param}")
    env = _env(tmp)
    database = None
    if request.param == "duckdb":
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp / "warehouse.duckdb")
        env["DESTINATION__DUCKDB__CREDENTIALS"] = str(warehouse.duckdb_path)
    else:
        admin = request.getfixturevalue("pg_admin_url")
        database = f"t_plain_{uuid.uuid4().hex[:8]}"
        warehouse = postgres_warehouse(create_database(admin, database))
        env["DATAMART_TARGET"] = "postgres"
        secrets = Path(env["DLT_PROJECT_DIR"]) / ".dlt" / "secrets.toml"
        secrets.write_text(f'[destination.postgres]\ncredentials = "{warehouse.url()}"\n')
    demo.generate(source_url=env["SOURCES__APP_DB__CREDENTIALS"], bucket=tmp / "bucket", scale=0.05)
    outputs = {"load": run(env, "dlt", "pipeline", "all", "run")}
    outputs["info"] = run(env, "sqlmesh", "info")
    outputs["dev"] = run(env, "sqlmesh", "plan", "dev", "--auto-apply", "--no-prompts")
    outputs["prod"] = run(env, "sqlmesh", "plan", "--auto-apply", "--no-prompts")
    yield Loaded(warehouse, env, tmp, outputs)
    if database is not None:
        drop_database(request.getfixturevalue("pg_admin_url"), database)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _count(warehouse: Warehouse, view: str) -> int:
    return int(warehouse.query(f"SELECT count(*) FROM {view}")[0][0])


def test_plain_sqlmesh_reaches_the_warehouse_dlt_loaded(loaded: Loaded) -> None:
    _ok(loaded.outputs["load"])
    assert "Data warehouse connection succeeded" in _ok(loaded.outputs["info"])
    _ok(loaded.outputs["dev"])
    dev_missions = _count(loaded.warehouse, "marts__dev.missions_v1")
    assert dev_missions == _count(loaded.warehouse, "raw_app_db.missions WHERE deleted_at IS NULL") > 0
    _ok(loaded.outputs["prod"])
    assert _count(loaded.warehouse, "marts.missions_v1") == dev_missions
    if loaded.warehouse.target == "postgres":
        # SQLMesh's state is in the warehouse's own database, not in a DuckDB file of the project
        assert _count(loaded.warehouse, "sqlmesh._environments WHERE name = 'prod'") == 1


def test_missing_postgres_credentials_are_named_not_guessed(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "DATAMART_TARGET": "postgres"}
    result = run(env, "sqlmesh", "info")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "DESTINATION__POSTGRES__CREDENTIALS" in output, output
    assert "127.0.0.1:5432" not in output


def _prod_views(loaded: Loaded) -> dict[str, object]:
    """Each prod view's definition (which physical table it selects from)."""
    if loaded.warehouse.target == "duckdb":
        rows = loaded.warehouse.query(
            "SELECT view_name, sql FROM duckdb_views() WHERE schema_name = 'marts' ORDER BY 1"
        )
    else:
        rows = loaded.warehouse.query("SELECT viewname, definition FROM pg_views WHERE schemaname = 'marts' ORDER BY 1")
    return dict(rows)


@pytest.mark.parametrize("environment", ["prod", "dev"])
def test_plain_plan_refuses_a_removed_published_column(loaded: Loaded, environment: str) -> None:
    _ok(loaded.outputs["prod"])
    before = _prod_views(loaded)
    project = copy_project(loaded.tmp / f"removed_column_{environment}")
    edit(project, "models/marts/missions_v1.sql", "\n  department,\n  mission_status,\n", "\n  mission_status,\n")
    result = run(loaded.env, "sqlmesh", "-p", str(project), "plan", environment, "--auto-apply", "--no-prompts")
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "[Contract of the published views] marts.missions_v1: column `department` would be removed" in output
    assert "publish the change as marts.missions_v2 beside it" in output
    assert _prod_views(loaded) == before


def test_plain_plan_refuses_a_published_personal_column(loaded: Loaded) -> None:
    _ok(loaded.outputs["prod"])
    before = _prod_views(loaded)
    project = copy_project(loaded.tmp / "personal_column")
    # the birth decade without the declaration that allows it (tags ('personal:birth_decade'))
    edit(project, "models/marts/volunteer_activity_v1.sql", "  tags (\n    'personal:birth_decade'\n  ),\n", "")
    result = run(loaded.env, "sqlmesh", "-p", str(project), "plan", "--auto-apply", "--no-prompts")
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert (
        "[Personal data] marts.volunteer_activity_v1.birth_decade derives from personal column "
        "app_db.volunteers.birth_date"
    ) in output, output
    assert _prod_views(loaded) == before


# --- the gate where no linter flag reaches (issue 25): SQLMesh's before_all, then the repository's commands ----------

LEAK_MODEL = """MODEL (
  name marts.volunteer_contacts_v1,
  kind VIEW,
  grain volunteer_id,
  description 'Volunteers to contact.',
  column_descriptions (volunteer_id = 'Number.', contact = 'E-mail pseudonym.', birth_year = 'Year of birth.')
);

SELECT
  id::BIGINT AS volunteer_id,
  email AS contact,
  birth_year::BIGINT AS birth_year
FROM raw_app_db.volunteers
"""
# no audit, no small-cell suppression: what only --skip-linter lets through the linter
LEAK_COLUMNS = {"volunteer_id", "contact", "birth_year"}
# a plan typed from a checkout whose config has no hooks (one from before them, a hand-made config.py)
NO_HOOKS_CONFIG = """from datamart.sqlmesh_config import sqlmesh_config

config = sqlmesh_config().copy(update={"before_all": None, "after_all": None})
"""


def _broken_project(destination: Path, hooks: bool = True) -> Path:
    """A project publishing the e-mail pseudonym and birth year straight from raw, and marts.mission_status_history_v1
    with a column renamed and one removed; ``hooks=False``: with a config without SQLMesh's before_all / after_all."""
    project = copy_project(destination)
    (project / "models" / "marts" / "volunteer_contacts_v1.sql").write_text(LEAK_MODEL)
    history = "models/marts/mission_status_history_v1.sql"
    edit(project, history, "AS status_changed_at,\n  valid_from", "AS changed_at,\n  valid_from")
    edit(project, history, ",\n  (\n    valid_to IS NULL\n  )::BOOLEAN AS is_current\n", "\n")
    edit(project, history, "        status_changed_at,\n        is_current\n", "        changed_at\n")
    edit(project, history, "    status_changed_at = 'When", "    changed_at = 'When")
    text = (project / history).read_text()
    (project / history).write_text("\n".join(line for line in text.split("\n") if "is_current = '" not in line))
    if not hooks:
        (project / "config.py").write_text(NO_HOOKS_CONFIG)
    return project


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_skip_linter_does_not_skip_the_gate(loaded: Loaded) -> None:
    _ok(loaded.outputs["prod"])
    before = _prod_views(loaded)
    project = _broken_project(loaded.tmp / "skip_linter")
    result = run(loaded.env, "sqlmesh", "-p", str(project), "plan", "--skip-linter", "--auto-apply", "--no-prompts")
    output = _output(result)
    assert result.returncode != 0, output
    assert "refused by the review gate before the prod plan, prod was not touched" in output, output
    assert (
        "[Personal data] marts.volunteer_contacts_v1.contact derives from personal column app_db.volunteers.email"
        in (output)
    )
    assert "marts.mission_status_history_v1: column `is_current` would be removed" in output, output
    assert "column `status_changed_at` would be renamed to `changed_at`" in output
    assert _prod_views(loaded) == before


def _drop_role(warehouse: Warehouse, role: str) -> None:
    with warehouse.transaction() as cur:
        cur.execute(f'DROP OWNED BY "{role}"')
        cur.execute(f'DROP ROLE IF EXISTS "{role}"')


def _columns_the_role_reads(warehouse: Warehouse, role: str, password: str) -> dict[str, set[str]]:
    """Each view the role can list in the published schema, with its columns, as Metabase's sync sees them."""
    import psycopg2

    pg = warehouse.pg
    conn = psycopg2.connect(host=pg.host, port=pg.port, user=role, password=password, dbname=pg.database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'marts' "
                "AND has_table_privilege(quote_ident(table_schema) || '.' || quote_ident(table_name), 'SELECT')"
            )
            found: dict[str, set[str]] = {}
            for table, column in cur.fetchall():
                found.setdefault(table, set()).add(column)
            return found
    finally:
        conn.close()


def test_a_view_published_past_the_gate_is_taken_away_and_the_way_back_is_accepted(loaded: Loaded) -> None:
    """A plan from a config without the hooks publishes personal columns and breaks a published view (nothing can
    refuse it beforehand); the scheduled run takes both views away from Metabase, fails and says what to do; the
    documented way back (the original project, `make review`, `make promote`) is accepted and publishes them again."""
    warehouse = loaded.warehouse
    role = f"metabase_{uuid.uuid4().hex[:8]}"
    password = "gate-test-password"
    env = dict(loaded.env, DATAMART__METABASE_ROLE=role, DATAMART__METABASE_PASSWORD=password)
    try:
        _ok(run(env, "python", "-m", "datamart", "promote"))  # the role and its default privileges (PostgreSQL)
        project = _broken_project(loaded.tmp / "no_hooks", hooks=False)
        _ok(run(env, "sqlmesh", "-p", str(project), "plan", "--skip-linter", "--auto-apply", "--no-prompts"))
        assert _count(warehouse, "marts.volunteer_contacts_v1") > 0  # published past the gate
        if warehouse.target == "postgres":
            assert _columns_the_role_reads(warehouse, role, password)["volunteer_contacts_v1"] == LEAK_COLUMNS

        scheduled = run(env, "python", "-m", "datamart", "scheduled", "--no-alert")
        output = _output(scheduled)
        assert scheduled.returncode == 1, output
        assert "prod publishes 5 violation(s) of the review gate (applied past the gate)" in output, output
        assert "[Personal data] marts.volunteer_contacts_v1.contact derives from personal column" in output
        assert (
            "Taken away from Metabase (dropped from the published schema): marts.mission_status_history_v1, " in output
        )
        assert "then `make review` and `make promote`" in output
        published = {
            name
            for (name,) in warehouse.query(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'marts'"
            )
        }
        assert not published & {"volunteer_contacts_v1", "mission_status_history_v1"}, published
        if warehouse.target == "postgres":
            readable = _columns_the_role_reads(warehouse, role, password)
            assert readable and "volunteer_contacts_v1" not in readable, readable
            assert not any(columns & {"contact", "birth_year"} for columns in readable.values()), readable
        again = run(env, "python", "-m", "datamart", "scheduled", "--no-alert", "--only", "refresh")
        assert again.returncode == 1, _output(again)  # refuses to go on until the way back is taken

        # the way back, as documented: the original project through the repository's own commands
        review = run(
            env, "python", "-m", "datamart", "review", "--env", "pr_restore", "--output", str(loaded.tmp / "r.md")
        )
        assert review.returncode == 0, _output(review)
        _ok(run(env, "python", "-m", "datamart", "promote"))
        assert "is_current" in warehouse.columns("marts", "mission_status_history_v1")
        assert _count(warehouse, "marts.mission_status_history_v1") > 0
        assert not warehouse.table_exists("marts", "volunteer_contacts_v1")
        if warehouse.target == "postgres":
            readable = _columns_the_role_reads(warehouse, role, password)
            assert "is_current" in readable["mission_status_history_v1"], readable
        _ok(run(env, "python", "-m", "datamart", "scheduled", "--no-alert", "--only", "refresh"))
    finally:
        if warehouse.target == "postgres":
            _drop_role(warehouse, role)
