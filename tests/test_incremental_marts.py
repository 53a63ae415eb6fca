"""Exactness of the refresh: after each demo day (inserts, updates, soft and hard deletes, late events) and an
erasure, every mart holding data equals a from-scratch build of its model, row for row — on DuckDB and PostgreSQL.
Then the paths that change raw rows outside a normal load, through the commands a user types, each followed by the
scheduled run (`python -m datamart scheduled`): `dlt pipeline app_db verify --repair` (rows soft-deleted and updated
below the cursor), `dlt pipeline app_db run --table organizations --full-refresh` and the reload of a table whose
source gained a column (each after a hard delete in the source): the marts equal a from-scratch build after each.

The days go through both entry points of the one refresh path: ``make run`` (``run_flow``: loads, then
``apply_prod``) and the scheduled run (loads, then ``refresh_prod``, SQLMesh's run of due intervals + the
restatement of what the loads changed, SQLMesh's run of the incremental-by-key marts). A row planted in
each incremental-by-key mart's table before each refresh must survive it: a mart silently rebuilt whole would
remove it. A deletion recorded more than a week before a refresh is pruned from ``ops.deleted_rows`` by it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from datamart import demo
from datamart.flow import run_flow, run_pipelines
from datamart.settings import Warehouse
from datamart.testing.commands import DLT, PYTHON, demo_settings, environment, run
from datamart.testing.marts import differences_from_scratch
from datamart.testing.sources import Source
from datamart.transform import refresh_prod, sqlmesh_context

pytestmark = pytest.mark.slow


def _materialised_marts(context: object) -> list[str]:
    """Every published mart with its own table (a VIEW mart is its query: nothing to drift)."""
    names = []
    for model in context.models.values():  # type: ignore[attr-defined]
        if model.kind.is_external or model.kind.is_view:
            continue
        schema_table = ".".join(model.fqn.replace('"', "").split(".")[-2:])
        if schema_table.startswith("marts."):
            names.append(schema_table)
    return sorted(names)


def _assert_exact(warehouse: Warehouse, when: str) -> None:
    context = sqlmesh_context(warehouse)
    try:
        marts = _materialised_marts(context)
        assert "marts.partner_funnel_daily_v1" in marts and "marts.missions_v1" in marts, marts
        for mart in marts:
            missing, extra = differences_from_scratch(context, warehouse, mart)
            assert (missing, extra) == ([], []), (
                f"{when}: {mart} differs from a from-scratch build: missing {missing[:5]}, extra {extra[:5]}"
            )
    finally:
        context.close()  # DuckDB: one connection to the file at a time, the next command needs it


SENTINELS = {
    "missions_v1": (
        "(mission_id, mission_status, applications_total, applications_accepted, applications_pending) "
        "VALUES (-1, 'draft', 0, 0, 0)",
        "mission_id = -1",
    ),
    "organizations_v1": (
        "(organization_id, organization_name, organization_kind, live_missions, published_missions, applications) "
        "VALUES (-1, 'sentinel', 'association', 0, 0, 0)",
        "organization_id = -1",
    ),
}


def _plant_sentinels(warehouse: Warehouse) -> dict[str, str]:
    """A row no load touches (key -1) in each incremental-by-key mart's physical table: a refresh that rebuilds the
    table whole removes it, one that recomputes only the touched keys keeps it. Mart → its prod table."""
    state = sqlmesh_context(warehouse).state_reader
    prod = state.get_environment("prod")
    snapshots = state.get_snapshots(prod.snapshots).values()
    tables = {}
    for mart, (values, _) in SENTINELS.items():
        table = next(s for s in snapshots if s.name.endswith(f'"{mart}"')).table_name()  # prod's version
        warehouse.query(f"INSERT INTO {table} {values}")
        tables[mart] = table
    return tables


def _sentinels_lost(warehouse: Warehouse, tables: dict[str, str]) -> list[str]:
    """The marts whose planted row did not survive the refresh; removed either way, so the comparison sees the real
    rows."""
    lost = []
    for mart, table in tables.items():
        where = SENTINELS[mart][1]
        if warehouse.query(f"SELECT count(*) FROM {table} WHERE {where}")[0][0] != 1:
            lost.append(mart)
        warehouse.query(f"DELETE FROM {table} WHERE {where}")
    return lost


def _deleted_rows(warehouse: Warehouse) -> list[tuple]:
    return warehouse.query("SELECT table_name, row_key FROM ops.deleted_rows ORDER BY table_name, row_key")


def test_every_mart_equals_a_from_scratch_build_after_each_day(
    warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    bucket = tmp_path / "bucket"
    demo.generate(source_url=source_url, bucket=bucket, scale=0.05)
    for key, value in {
        "SOURCES__APP_DB__CREDENTIALS": source_url,
        "SOURCES__BUCKET__BUCKET_URL": str(bucket),
        "DATAMART__PII_HMAC_KEY": "incremental-marts-test-key",
        **warehouse.environment_variables(),
    }.items():
        monkeypatch.setenv(key, value)
    pipelines = tmp_path / "pipelines"
    run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())
    _assert_exact(warehouse, "first build")

    source = Source(source_url)
    for day in range(1, 4):
        summary = demo.advance_day(source_url=source_url, bucket=bucket)
        if day == 3:
            # organizations without missions, for the paths below (a deleted one disappears from the mart only if
            # the refresh knows it was deleted: no mission, application or row of it is loaded afterwards)
            source.execute(
                "INSERT INTO organizations (id, name, kind, department, created_at, updated_at) "
                "SELECT ?, 'Association sans mission', 'association', '75', max(updated_at), max(updated_at) "
                "FROM organizations",
                rows=[(ORPHAN_OFFSET + i,) for i in range(3)],
            )
        if day == 2:
            # an erasure: a volunteer who applied is hard-deleted with their applications
            person = "(SELECT min(volunteer_id) FROM applications)"
            source.execute(
                f"DELETE FROM volunteers WHERE id = {person}", f"DELETE FROM applications WHERE volunteer_id = {person}"
            )
        sentinels = _plant_sentinels(warehouse)
        # a deletion recorded more than a week ago: a succeeded refresh prunes it, keeps the recent ones
        warehouse.query(
            "INSERT INTO ops.deleted_rows (dataset, table_name, row_key, deleted_at) "
            "VALUES ('raw_app_db', 'organizations', '-8', CURRENT_TIMESTAMP - INTERVAL '8 days')"
        )
        if day % 2:
            run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())  # make run
        else:
            _, failures = run_pipelines(warehouse, pipelines_dir=pipelines, out=io.StringIO(), err=io.StringIO())
            assert not failures, [f.message() for f in failures]
            refresh = refresh_prod(warehouse)  # the scheduled run's refresh (Airflow's too)
            assert refresh.models_restated, f"day {day}: the refresh restated nothing"
        # the refresh went through the incremental path: the by-key marts were merged into, not rebuilt whole
        assert not _sentinels_lost(warehouse, sentinels), f"day {day}: rebuilt whole"
        recorded = _deleted_rows(warehouse)
        assert ("organizations", "-8") not in recorded, f"day {day}: a deletion older than a week was kept"
        assert recorded, f"day {day}: the day's deletions were not recorded (or were pruned)"
        _assert_exact(warehouse, f"day {day} ({summary.date})")

    _paths_outside_a_normal_load(warehouse, source, tmp_path)


ORPHAN_OFFSET = 100_000


def _paths_outside_a_normal_load(warehouse: Warehouse, source: Source, tmp_path: Path) -> None:
    """verify --repair, --full-refresh, the reload after a source schema change: through the commands, each followed
    by the scheduled run, the marts equal a from-scratch build (issue 25)."""
    env = environment(
        **demo_settings(tmp_path, "incremental-marts-test-key", warehouse),
        DATAMART_DECLARATIONS_DIR=os.environ["DATAMART_DECLARATIONS_DIR"],
    )
    orphans = [row[0] for row in source.query(f"SELECT id FROM organizations WHERE id >= {ORPHAN_OFFSET} ORDER BY id")]
    assert len(orphans) == 3, orphans
    with_missions = source.query(
        "SELECT min(organization_id) FROM missions WHERE deleted_at IS NULL AND organization_id IN "
        "(SELECT id FROM organizations WHERE deleted_at IS NULL)"
    )[0][0]
    renamed = source.query(f"SELECT max(id) FROM organizations WHERE deleted_at IS NULL AND id < {ORPHAN_OFFSET}")[0][0]

    # soft-deleted and renamed below the cursor (updated_at not moved): only verify --repair sees them
    source.execute(
        f"UPDATE organizations SET deleted_at = updated_at WHERE id IN ({orphans[0]}, {with_missions})",
        f"UPDATE organizations SET name = name || ' (renamed)' WHERE id = {renamed}",
    )
    run([DLT, "pipeline", "app_db", "verify", "--repair"], env, expect=0)
    recorded = {key for table, key in _deleted_rows(warehouse) if table == "organizations"}
    assert {str(orphans[0]), str(with_missions)} <= recorded, f"the repair's deletions were not recorded: {recorded}"
    run([PYTHON, "-m", "datamart", "scheduled", "--no-alert"], env, expect=0)
    _assert_exact(warehouse, "after verify --repair and the scheduled run")
    served = warehouse.query(f"SELECT organization_name FROM marts.organizations_v1 WHERE organization_id = {renamed}")
    assert served and served[0][0].endswith("(renamed)"), served

    # hard-deleted, then the table reloaded whole by --full-refresh (no key-set comparison finds it afterwards)
    source.execute(f"DELETE FROM organizations WHERE id = {orphans[1]}")
    run([DLT, "pipeline", "app_db", "run", "--table", "organizations", "--full-refresh"], env, expect=0)
    run([PYTHON, "-m", "datamart", "scheduled", "--no-alert"], env, expect=0)
    _assert_exact(warehouse, "after --full-refresh and the scheduled run")

    # hard-deleted the day the source gains a column: the run reloads the table whole before comparing key sets
    source.execute(
        "ALTER TABLE organizations ADD COLUMN website TEXT", f"DELETE FROM organizations WHERE id = {orphans[2]}"
    )
    run([PYTHON, "-m", "datamart", "scheduled", "--no-alert"], env, expect=0)
    _assert_exact(warehouse, "after the reload of a table whose source gained a column")
