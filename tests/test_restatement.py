"""After a load, the prod promotion rebuilds what the new rows touch: the changed raw tables' marts, and a
time-incremental mart only from the earliest day of the new rows — on DuckDB and PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from datamart.flow import run_flow
from datamart.settings import Warehouse, quote_identifier
from datamart.testing.commands import demo_settings, set_environment
from datamart.testing.sources import Source
from datamart.transform import sqlmesh_context

pytestmark = pytest.mark.slow

FUNNEL = "marts.partner_funnel_daily_v1"
MARKER = "not recomputed"


def test_new_events_restate_only_their_days_and_leave_other_marts_alone(
    warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = demo_settings(tmp_path, "restatement-test-key", warehouse, scale=0.1)
    set_environment(monkeypatch, settings)
    source_url = settings["SOURCES__APP_DB__CREDENTIALS"]
    pipelines = tmp_path / "pipelines"
    run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())

    # Mark the first day in the mart's physical table: a restatement of that day would overwrite the mark.
    physical = sqlmesh_context(warehouse).get_snapshot(FUNNEL).table_name()
    physical = ".".join(quote_identifier(p.strip('"')) for p in physical.split(".")[-2:])
    first_day = warehouse.query(f"SELECT min(event_date) FROM {physical}")[0][0]
    marked = warehouse.query(f"SELECT count(*) FROM {physical} WHERE event_date = '{first_day}'")[0][0]
    assert marked > 0
    update = f"UPDATE {physical} SET partner_name = '{MARKER}' WHERE event_date = '{first_day}'"
    warehouse.query(update)

    # New events, the hour after the last one; nothing else changes in the source.
    source = Source(source_url)
    source.execute(
        "INSERT INTO stats_events (id, event_type, partner_id, mission_id, occurred_at) "
        "SELECT id + (SELECT max(id) FROM stats_events), event_type, partner_id, mission_id, "
        "(SELECT max(occurred_at) FROM stats_events) FROM stats_events ORDER BY id LIMIT 50"
    )
    flow = run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())

    assert flow.transform is not None
    built = set(flow.transform.models_built)
    assert FUNNEL in built
    assert not built & {"marts.missions_v1", "marts.organizations_v1", "marts.volunteer_activity_v1"}, built
    # the first day was not recomputed; the new events are all counted
    still_marked = f"SELECT count(*) FROM {physical} WHERE event_date = '{first_day}' AND partner_name = '{MARKER}'"
    assert warehouse.query(still_marked)[0][0] == marked
    events = warehouse.query("SELECT count(*) FROM raw_app_db.stats_events")[0][0]
    measured = warehouse.query(f"SELECT sum(impressions + clicks + applications) FROM {FUNNEL}")[0][0]
    assert measured == events


def test_a_run_that_only_deletes_rows_rebuilds_the_marts_reading_them(
    warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard delete leaves no newer row in its table (and dlt's staging copy is emptied after each load): the run
    records in ops tell the promotion which tables lost rows."""
    settings = demo_settings(tmp_path, "restatement-test-key", warehouse, scale=0.1)
    set_environment(monkeypatch, settings)
    source_url = settings["SOURCES__APP_DB__CREDENTIALS"]
    pipelines = tmp_path / "pipelines"
    run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())
    missions = warehouse.query("SELECT count(*) FROM marts.missions_v1")[0][0]
    gone = warehouse.query("SELECT min(mission_id) FROM marts.missions_v1")[0][0]

    source = Source(source_url)
    source.execute(f"DELETE FROM applications WHERE mission_id = {gone}")
    source.execute(f"DELETE FROM missions WHERE id = {gone}")
    flow = run_flow(warehouse, pipelines_dir=pipelines, out=io.StringIO())

    assert flow.transform is not None
    assert "marts.missions_v1" in flow.transform.models_built
    assert warehouse.query("SELECT count(*) FROM marts.missions_v1")[0][0] == missions - 1
    assert warehouse.query(f"SELECT count(*) FROM marts.missions_v1 WHERE mission_id = {gone}")[0][0] == 0
