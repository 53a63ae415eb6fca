"""Promotion safety on both warehouses: a dev environment leaves prod identical; a failing audit blocks promotion.

Each test runs the whole flow on its own warehouse (a DuckDB file in tmp, or a fresh PostgreSQL database, each with
its own SQLMesh state), snapshots every published view (row count and a checksum of its sorted rows), then plans a
changed copy of the SQLMesh project and checks what prod serves afterwards.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlmesh.utils.errors import PlanError

from datamart.flow import run_flow
from datamart.settings import Warehouse
from datamart.testing.commands import demo_settings, set_environment
from datamart.testing.project import copy_project, failed_audits
from datamart.testing.views import view_checksum
from datamart.transform import published_views, sqlmesh_context

pytestmark = pytest.mark.slow

MISSIONS = "marts.missions_v1"
FINAL_SELECT = "SELECT\n  mission_id,\n  mission_title,"
FINAL_FROM = "FROM changes;"
Snapshot = dict[str, tuple[int, str]]


def _changed_project(tmp_path: Path, change: tuple[str, str] | None = None, append: str = "") -> Path:
    """A copy of the SQLMesh project where missions_v1.sql has one replacement and/or a clause after its query."""
    project = copy_project(tmp_path / "project", unit_tests=True)
    model = project / "models" / "marts" / "missions_v1.sql"
    text = model.read_text()
    # the model's query ends at FROM changes; the statement after it deletes the missions that no longer exist
    for old, new in [*([change] if change else []), (FINAL_FROM, FINAL_FROM.replace(";", append + ";"))]:
        assert text.count(old) == 1, f"{old!r} not found once in missions_v1.sql"
        text = text.replace(old, new)
    model.write_text(text)
    return project


def _snapshot(warehouse: Warehouse, views: list[str]) -> Snapshot:
    """Every given view's row count and checksum."""
    return {view: view_checksum(warehouse.query, view) for view in views}


def _prod_snapshots(context: Any) -> dict[str, str]:
    """The prod environment's snapshot fingerprint of each model, by name."""
    prod = context.state_reader.get_environment("prod")
    assert prod is not None
    return {s.name: s.fingerprint.to_identifier() for s in prod.snapshots}


@pytest.fixture
def prod(warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Snapshot]:
    """The whole flow run on an isolated demo source and this test's warehouse: prod's published views and snapshot."""
    # through monkeypatch: SQLMesh's exports are undone after the test
    set_environment(monkeypatch, demo_settings(tmp_path, "promotion-test-key", warehouse, scale=0.2))
    flow = run_flow(warehouse, pipelines_dir=tmp_path / "pipelines", out=io.StringIO())
    assert flow.transform is not None
    views = flow.transform.published_views
    assert MISSIONS in views
    snapshot = _snapshot(warehouse, views)
    assert snapshot[MISSIONS][0] > 0
    return views, snapshot


def test_dev_environment_leaves_prod_identical(
    warehouse: Warehouse, prod: tuple[list[str], Snapshot], tmp_path: Path
) -> None:
    views, before = prod
    project = _changed_project(tmp_path, append="\nWHERE\n  mission_status <> 'closed'")
    context = sqlmesh_context(warehouse, project)
    prod_before = _prod_snapshots(context)
    # The change contradicts the model's unit test on purpose; this test is about environments, not logic.
    plan = context.plan("dev", auto_apply=True, no_prompts=True, skip_tests=True)

    missions_fqn = context.get_model(MISSIONS).fqn
    expected = {missions_fqn, *context.dag.downstream(missions_fqn)}
    assert {s.name for s in plan.directly_modified} == {missions_fqn}
    built = {s.name for s in plan.new_snapshots if s.is_model and not s.is_symbolic}
    assert built == expected, "only the changed model and its downstream are built"

    dev_count, dev_checksum = view_checksum(warehouse.query, "marts__dev.missions_v1")
    assert 0 < dev_count < before[MISSIONS][0]
    closed = warehouse.query(f"SELECT count(*) FROM {MISSIONS} WHERE mission_status = 'closed'")[0][0]
    assert dev_count == before[MISSIONS][0] - closed
    assert dev_checksum != before[MISSIONS][1]

    assert _snapshot(warehouse, views) == before, "prod views are unchanged"
    assert _prod_snapshots(context) == prod_before


def test_failing_audit_blocks_promotion_and_prod_stays(
    warehouse: Warehouse, prod: tuple[list[str], Snapshot], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    views, before = prod
    # Half the missions lose their key: the not_null audit on mission_id fails.
    nulls = "SELECT\n  CASE WHEN mission_id % 2 = 0 THEN NULL ELSE mission_id END AS mission_id,\n  mission_title,"
    project = _changed_project(tmp_path, change=(FINAL_SELECT, nulls))
    context = sqlmesh_context(warehouse, project)
    prod_before = _prod_snapshots(context)
    assert prod_before == _prod_snapshots(sqlmesh_context(warehouse))

    caplog.set_level(logging.INFO, logger="sqlmesh")
    with pytest.raises(PlanError, match="Plan application failed"):
        # Unit tests skipped so that the audit, run on the warehouse's data, is what stops the promotion.
        context.plan("prod", auto_apply=True, no_prompts=True, skip_tests=True)
    assert "not_null" in failed_audits(caplog.records)

    assert _snapshot(warehouse, views) == before, "prod views serve exactly what they served before"
    assert _prod_snapshots(context) == prod_before, "prod's snapshot of every model is unchanged"
    assert published_views(context) == views
