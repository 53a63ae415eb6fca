"""History tables (`history: scd2`) in replication mode, through `dlt pipeline <name> run` as a user runs it: every
version the change stream carries, valid from its transaction's commit, deletions closing the current version; the
same history columns as cursor mode.

The warehouse's history is compared row for row with what the source went through: each transaction's resulting row,
and when it committed (read on the source's clock just before and after it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml

from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.postgres import ThrowawayPostgres, create_database
from datamart.testing.sources import Source, source_rows

DLT = str(Path(sys.executable).parent / "dlt")

pytestmark = pytest.mark.postgres

DECLARATION = {
    "name": "board",
    "source": {"kind": "sql_database", "changes": "replication"},
    "dataset": "raw_board",
    "tables": {
        "missions": {"write_disposition": "merge", "primary_key": "id", "history": "scd2"},
        "notes": {"write_disposition": "merge", "primary_key": "id"},  # no history: the last change per key
    },
}
COLUMNS = "id, status, places, starts"


class Recorder:
    """Runs each transaction on the source and records what the source went through: per key, the row after each
    transaction that changed it (None: deleted), between the source's clock before and after the transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.history: dict[int, list[tuple[tuple[Any, ...] | None, datetime, datetime]]] = {}

    def _now(self) -> datetime:
        return source_rows(self.url, "SELECT clock_timestamp()")[0][0]

    def transaction(self, *statements: str) -> None:
        before = self._now()
        conn = psycopg2.connect(self.url)
        try:
            with conn, conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()
        after = self._now()
        rows = {r[0]: r for r in source_rows(self.url, f"SELECT {COLUMNS} FROM missions")}
        for key in set(rows) | set(self.history):
            seen = self.history.setdefault(key, [])
            last = seen[-1][0] if seen else None
            if rows.get(key) != last:
                seen.append((rows.get(key), before, after))


def versions(warehouse: Warehouse) -> dict[int, list[tuple[tuple[Any, ...], datetime, datetime | None]]]:
    """Per key, its versions in the warehouse in validity order: (values, valid from, valid to)."""
    found: dict[int, list[tuple[tuple[Any, ...], datetime, datetime | None]]] = {}
    rows = warehouse.query(f"SELECT {COLUMNS}, _dlt_valid_from, _dlt_valid_to FROM raw_board.missions")
    for *values, valid_from, valid_to in sorted(rows, key=lambda r: (r[0], _utc(r[-2]))):
        found.setdefault(values[0], []).append((tuple(values), _utc(valid_from), _utc(valid_to)))
    return found


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def assert_history(warehouse: Warehouse, recorder: Recorder, copied_at: datetime) -> None:
    """Every version the source went through since the copy, each valid from its transaction's commit to the next
    change of its key; the current versions equal to the source."""
    found = versions(warehouse)
    assert set(found) == set(recorder.history), (found, recorder.history)
    for key, seen in recorder.history.items():
        # (values, its transaction's clock before and after, the closing transaction's: None while current)
        expected: list[tuple[tuple[Any, ...], datetime, datetime, tuple[datetime, datetime] | None]] = []
        for values, before, after in seen:
            if expected and expected[-1][3] is None:
                expected[-1] = (*expected[-1][:3], (before, after))  # the next transaction closed it
            if values is not None:
                expected.append((values, before, after, None))
        got = found[key]
        assert [v for v, *_ in got] == [v for v, *_ in expected], key
        for (values, valid_from, valid_to), (_, before, after, closed) in zip(got, expected, strict=True):
            if before < copied_at:  # in the copy: valid from the copy
                assert valid_from == copied_at, (key, values, valid_from, copied_at)
            else:
                assert before <= valid_from <= after, (key, values, valid_from, before, after)
            if closed is None:
                assert valid_to is None, (key, values)
            else:
                assert valid_to is not None and closed[0] <= valid_to <= closed[1], (key, values, valid_to, closed)
        for (_, _, valid_to), (_, valid_from, _) in zip(got, got[1:], strict=False):
            assert valid_to is not None and valid_to <= valid_from, key  # equal, or a deletion in between
    current = warehouse.query(f"SELECT {COLUMNS} FROM raw_board.missions WHERE _dlt_valid_to IS NULL")
    assert sorted(current) == sorted(source_rows(recorder.url, f"SELECT {COLUMNS} FROM missions"))


def run(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DLT, "pipeline", "board", "run"],
        env={**env, **extra},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(params=["duckdb", "postgres"])
def board(request: pytest.FixtureRequest, logical: ThrowawayPostgres, tmp_path: Path) -> Iterator[Any]:
    url = create_database(logical.url(), f"src_{uuid.uuid4().hex[:8]}")
    if request.param == "duckdb":
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    else:
        warehouse = postgres_warehouse(create_database(logical.url(), f"wh_{uuid.uuid4().hex[:8]}"))
    Source(url).execute(
        "CREATE TABLE missions (id int PRIMARY KEY, status text, places smallint, starts date, body text)",
        "CREATE TABLE notes (id int PRIMARY KEY, text text)",
        "INSERT INTO missions SELECT i, 'draft', i, date '2026-01-01' + i, repeat('x', 10) "
        "FROM generate_series(1, 4) i",
        "INSERT INTO notes VALUES (1, 'a')",
    )
    slot = f"datamart_board_{request.param}"
    (tmp_path / "declarations").mkdir()
    declaration = {**DECLARATION, "source": {**DECLARATION["source"], "slot": slot}}
    (tmp_path / "declarations" / "board.yaml").write_text(yaml.safe_dump(declaration), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART_"))}
    env.update(
        SOURCES__BOARD__CREDENTIALS=url,
        DATAMART__PII_HMAC_KEY="history-test-key",
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DATAMART_DECLARATIONS_DIR=str(tmp_path / "declarations"),
        **warehouse.environment_variables(),
    )
    yield url, env, warehouse
    Source(logical.url()).execute(
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    )


def test_every_version_of_the_stream_is_kept(board: Any) -> None:
    url, env, warehouse = board
    recorder = Recorder(url)
    recorder.transaction()  # the rows as they are before the copy
    copied = run(env)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "initial copy of missions, notes" in copied.stdout
    copied_at = {v[1] for seen in versions(warehouse).values() for v in seen}
    assert len(copied_at) == 1, copied_at  # every copied row valid from the copy
    assert_history(warehouse, recorder, copied_at.pop())
    copied_at = versions(warehouse)[1][0][1]

    # an update that changes no value, first after the copy: no version (its hash is the copied row's)
    recorder.transaction("UPDATE missions SET status = status WHERE id = 1")
    # several updates of one row between runs, each its own transaction: a version each
    recorder.transaction("UPDATE missions SET status = 'published' WHERE id = 1")
    recorder.transaction("UPDATE missions SET places = 10 WHERE id = 1")
    recorder.transaction("UPDATE missions SET status = 'closed' WHERE id = 1")
    # several updates of one row in one transaction: one version, the transaction's result
    recorder.transaction(
        "UPDATE missions SET status = 'published' WHERE id = 2",
        "UPDATE missions SET places = 20 WHERE id = 2",
        "UPDATE notes SET text = 'b' WHERE id = 1",
    )
    recorder.transaction("UPDATE missions SET body = body WHERE id = 2")  # no value changed: no version
    # a delete, then the key inserted again; a row inserted and deleted between runs
    recorder.transaction("DELETE FROM missions WHERE id = 3")
    recorder.transaction("INSERT INTO missions VALUES (3, 'draft', 3, date '2026-03-01', 'again')")
    recorder.transaction("INSERT INTO missions VALUES (5, 'draft', 5, date '2026-03-05', 'short-lived')")
    recorder.transaction("DELETE FROM missions WHERE id = 5")
    recorder.transaction("DELETE FROM missions WHERE id = 4")
    second = run(env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert_history(warehouse, recorder, copied_at)
    assert len(versions(warehouse)[1]) == 4 and len(versions(warehouse)[2]) == 2

    # a run killed after its load, before the slot moved: the next run reads the same changes again, plus newer
    recorder.transaction("UPDATE missions SET places = 11 WHERE id = 1")
    recorder.transaction("UPDATE missions SET status = 'published' WHERE id = 3", "DELETE FROM missions WHERE id = 2")
    killed = run(env, DATAMART_TEST_REPLICATION_FAIL="after-load")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    recorder.transaction("UPDATE missions SET status = 'closed', places = 12 WHERE id = 1")
    third = run(env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert_history(warehouse, recorder, copied_at)
    assert warehouse.query("SELECT id, text FROM raw_board.notes") == [(1, "b")]

    # the same history columns as cursor mode (models read them in both modes)
    columns = {c for c in warehouse.columns("raw_board", "missions")}
    assert {"_dlt_valid_from", "_dlt_valid_to", "_datamart_row_version", "_dlt_load_id"} <= columns
    verified = subprocess.run(
        [DLT, "pipeline", "board", "verify"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr  # the current versions equal the source

    # history declared on a table loaded without it: refused before anything is read, as in cursor mode
    path = Path(env["DATAMART_DECLARATIONS_DIR"]) / "board.yaml"
    declaration = yaml.safe_load(path.read_text())
    declaration["tables"]["notes"]["history"] = "scd2"
    path.write_text(yaml.safe_dump(declaration), encoding="utf-8")
    refused = run(env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "tables.notes.history: raw_board.notes was loaded without history" in refused.stderr


# --- the demo's whole flow on its replication variant -------------------------------------------------------------

VARIANT = PROJECT_ROOT / "datamart/demo/pipelines/replication"


def scheduled(env: dict[str, str]) -> None:
    from datamart.testing.commands import PYTHON
    from datamart.testing.commands import run as command

    result = command([PYTHON, "-m", "datamart", "scheduled", "--no-alert"], env)
    assert result.returncode == 0, result.stdout + result.stderr


def _marts_differences(warehouse: Warehouse) -> dict[str, tuple[int, int, list[Any]]]:
    """Per published view that differs from a from-scratch build of the same raw tables: (missing, stale, e.g.)."""
    from datamart.testing.marts import differences_from_scratch
    from datamart.transform import published_views, sqlmesh_context

    context = sqlmesh_context(warehouse)
    found = {}
    try:
        for view in published_views(context):
            missing, extra = differences_from_scratch(context, warehouse, view)
            if missing or extra:
                found[view] = (len(missing), len(extra), [*missing[:2], *extra[:2]])
    finally:
        context.close()  # DuckDB: one writer at a time, the next command needs the file
    return found


@pytest.mark.parametrize("target", ["duckdb", "postgres"])
def test_the_demo_flow_runs_in_replication_mode(logical: ThrowawayPostgres, tmp_path: Path, target: str) -> None:
    """`python -m datamart run`, then demo days and `python -m datamart scheduled`, on the demo generated into
    PostgreSQL and read by the documented replication variant: exit 0, every published view equal to a from-scratch
    build of the raw tables, the missions' history readable by the same models as in cursor mode."""
    from datamart.testing.commands import ALL_CALLER_SETTINGS, PYTHON, dlt_project, environment
    from datamart.testing.commands import run as command

    url = create_database(logical.url(), f"demo_{uuid.uuid4().hex[:8]}")
    if target == "duckdb":
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    else:
        warehouse = postgres_warehouse(create_database(logical.url(), f"wh_{uuid.uuid4().hex[:8]}"))
    slot = f"datamart_demo_flow_{target}"  # slots are the cluster's, not a database's
    declarations = tmp_path / "declarations"
    declarations.mkdir()
    variant = yaml.safe_load((VARIANT / "app_db.yaml").read_text())
    variant["source"]["slot"] = slot
    (declarations / "app_db.yaml").write_text(yaml.safe_dump(variant, sort_keys=False), encoding="utf-8")
    (declarations / "bucket.yaml").write_text((VARIANT / "bucket.yaml").read_text(), encoding="utf-8")
    env = environment(
        ALL_CALLER_SETTINGS,
        DLT_PROJECT_DIR=str(dlt_project(tmp_path)),
        SOURCES__APP_DB__CREDENTIALS=url,
        SOURCES__BUCKET__BUCKET_URL=str(tmp_path / "bucket"),
        DATAMART__PII_HMAC_KEY="replication-demo-key",
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DATAMART_DECLARATIONS_DIR=str(declarations),
        **warehouse.environment_variables(),
    )
    demo = [PYTHON, "-m", "datamart.demo", "--source-url", url, "--bucket", str(tmp_path / "bucket")]
    source = Source(url)
    try:
        command([*demo, "--scale", "0.05"], env, expect=0)
        command([PYTHON, "-m", "datamart", "run"], env, expect=0)
        assert _marts_differences(warehouse) == {}, "first build"
        first = source.query("SELECT min(id) FROM missions")[0][0]
        command([*demo, "--advance-day"], env, expect=0)  # a demo day: inserts, updates, soft and hard deletes
        # a mission changed twice between runs
        source.execute(f"UPDATE missions SET places = places + 1 WHERE id = {first}")
        flip = "CASE status WHEN 'closed' THEN 'published' ELSE 'closed' END"
        source.execute(f"UPDATE missions SET status = {flip} WHERE id = {first}")
        scheduled(env)
        assert _marts_differences(warehouse) == {}, "after a demo day"
        versions = warehouse.query(f"SELECT count(*) FROM raw_app_db.missions WHERE id = {first}")[0][0]
        assert versions >= 3, versions  # the copy, then a version per change
        periods = f"SELECT count(*) FROM marts.mission_status_history_v1 WHERE mission_id = {first}"
        assert warehouse.query(periods)[0][0] >= 2  # its status changed
        # nothing but withdrawn applications (hard deletes): the FULL marts reading them are restated, and the
        # deletions are recorded for the incremental ones (ops.deleted_rows: on a later day, nothing else tells them)
        busiest = "SELECT mission_id FROM applications GROUP BY mission_id ORDER BY count(*) DESC, 1 LIMIT 1"
        withdrawn = source.query(busiest)[0][0]
        source.execute(f"DELETE FROM applications WHERE mission_id = {withdrawn}")
        scheduled(env)
        recorded = warehouse.query(
            "SELECT count(*) FROM ops.deleted_rows WHERE table_name = 'applications' "
            f"AND referenced_table = 'missions' AND referenced_key = '{withdrawn}'"
        )
        assert recorded[0][0] > 0, "the withdrawn applications were not recorded"
        assert _marts_differences(warehouse) == {}, "after withdrawn applications"
    finally:
        Source(logical.url()).execute(
            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        )
