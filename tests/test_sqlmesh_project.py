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
