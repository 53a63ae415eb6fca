"""The SQLMesh project itself: unit tests (tests/test_*.yaml) pass, models are lint- and format-clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from datamart.settings import Warehouse
from datamart.testing.commands import SQLMESH, environment, run
from datamart.testing.project import copy_project, edit
from datamart.transform import sqlmesh_context


@pytest.fixture
def context(tmp_path: Path) -> Any:
    """A SQLMesh context on the project, on a throwaway DuckDB file."""
    return sqlmesh_context(Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb"))


def test_sqlmesh_unit_tests_pass(context: Any) -> None:
    result = context.test()
    assert result.testsRun >= 7
    assert result.wasSuccessful(), [str(failure) for failure in result.failures + result.errors]


def test_models_are_lint_clean(context: Any) -> None:
    assert context.lint_models(raise_on_error=True) == []


def test_models_are_formatted(context: Any) -> None:
    assert context.format(check=True), "run `make format`"


def test_plain_sqlmesh_lint_refuses_models_breaking_a_convention(tmp_path: Path) -> None:
    """The conventions of models/README.md are SQLMesh linter rules (linter/conventions.py): `sqlmesh lint`, and
    so every `sqlmesh plan`, refuses a model that breaks one, naming the model and the fix. One model breaks each."""
    project = copy_project(tmp_path / "project")
    edit(
        project,
        "models/marts/missions_v1.sql",
        "    places = 'Number of volunteers the organization is looking for.',\n",
        "",
    )
    edit(project, "models/marts/volunteer_activity_v1.sql", "    assert_no_personal_columns,\n", "")
    edit(project, "models/marts/organizations_v1.sql", "name marts.organizations_v1,", "name marts.organizations,")
    env = environment(
        ("DESTINATION__", "DATAMART_", "SQLMESH__"),
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "warehouse.duckdb"),
        COLUMNS="2000",
    )
    result = run([SQLMESH, "-p", str(project), "lint"], env)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "marts.missions_v1: published to Metabase, but no description in column_descriptions for places." in output
    assert "marts.volunteer_activity_v1: published to Metabase without the audit assert_no_personal_columns" in output
    assert "marts.organizations: a model of schema marts is named marts.<entity>_v<N>." in output


def test_the_config_declares_only_the_selected_warehouse_and_no_analytics(tmp_path: Path) -> None:
    from datamart.settings import postgres_warehouse
    from datamart.sqlmesh_config import sqlmesh_config

    local = sqlmesh_config(Warehouse(target="duckdb", duckdb_path=tmp_path / "w.duckdb"))
    assert list(local.gateways) == ["local"] and local.default_gateway == "local"
    assert local.gateways["local"].connection.database == str(tmp_path / "w.duckdb")
    pg = sqlmesh_config(postgres_warehouse("postgresql://loader:secret@db.example:6543/datamart"))
    assert list(pg.gateways) == ["postgres"] and pg.default_gateway == "postgres"
    connection = pg.gateways["postgres"].connection
    assert (connection.host, connection.port, connection.user, connection.password, connection.database) == (
        "db.example",
        6543,
        "loader",
        "secret",
        "datamart",
    )
    assert pg.gateways["postgres"].state_schema == "sqlmesh"
    for config in (local, pg):
        assert config.disable_anonymized_analytics
        assert config.default_test_connection_.type_ == "duckdb"
        assert config.model_defaults.dialect == "duckdb" and config.model_defaults.cron == "@daily"
        assert config.variables == {"small_cell_threshold": 5, "project_start": "2025-10-01"}
        assert str(config.model_defaults.start) == "2025-10-01"  # the same day: a first build computes every key
        assert "reviewgate" in config.linter.rules and "noselectstar" in config.linter.rules
