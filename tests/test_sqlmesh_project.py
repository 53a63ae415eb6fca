"""The SQLMesh project itself: unit tests (tests/test_*.yaml) pass, models are lint- and format-clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from datamart.settings import Warehouse
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


def test_every_published_column_is_described_for_metabase_users(context: Any) -> None:
    published = [m for m in context.models.values() if not m.kind.is_external and '"marts"' in m.fqn]
    assert len(published) >= 4
    for model in published:
        assert model.description and len(model.description) > 80, model.name
        undocumented = set(model.columns_to_types or {}) - set(model.column_descriptions)
        assert not undocumented, f"{model.name}: no description for {sorted(undocumented)}"


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
        assert config.variables == {"small_cell_threshold": 5}
        assert "reviewgate" in config.linter.rules and "noselectstar" in config.linter.rules
