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
