"""The whole job, as `make run` runs it, on DuckDB and on PostgreSQL: demo source → dlt → SQLMesh prod → views.

Expected figures are computed from the demo source with plain SQL (and, for the small-cell rule of the volunteer
aggregate, plain Python), never from the pipeline's own output.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.commands import PYTHON, clone_environment, run
from datamart.testing.privacy import OTHER, expected_volunteer_activity
from datamart.testing.sources import source_rows

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    """An isolated source, bucket and warehouse, and the environment that points the commands at them."""

    env: dict[str, str]
    source_url: str
    bucket: Path
    warehouse: Warehouse

    def source(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of a query on the demo source (SQLite file or PostgreSQL database)."""
        return source_rows(self.source_url, statement)

    def scalar(self, statement: str) -> int:
        """One integer from the source."""
        return int(self.source(statement)[0][0] or 0)

    def mart(self, statement: str) -> int:
        """One integer from the warehouse."""
        return int(self.warehouse.query(statement)[0][0] or 0)


def _base_env(tmp_path: Path) -> dict[str, str]:
    """No warehouse, source or key from the caller; dlt reads a copy of the committed config.toml only."""
    return clone_environment(tmp_path, ("DESTINATION__", "SOURCES__", "DATAMART_", "SQLMESH__"), project="project")


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """DuckDB: a SQLite source and a DuckDB warehouse, as on a fresh clone (no key: `make run` writes one).

    PostgreSQL: a source database and a warehouse database, configured by environment as in production.
    """
    env = _base_env(tmp_path)
    if request.param == "duckdb":
        source_url = f"sqlite:///{tmp_path / 'app.sqlite'}"
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
        env["DESTINATION__DUCKDB__CREDENTIALS"] = str(warehouse.duckdb_path)
    else:
        make_database: Callable[[str], str] = request.getfixturevalue("pg_database_factory")
        source_url = make_database("source")
        warehouse_url = make_database("warehouse")
        warehouse = postgres_warehouse(warehouse_url)
        env.update(
            DATAMART_TARGET="postgres",
            DESTINATION__POSTGRES__CREDENTIALS=warehouse_url,
            DATAMART__PII_HMAC_KEY="end-to-end-test-key",
        )
    env["SOURCES__APP_DB__CREDENTIALS"] = source_url
    return Stack(env=env, source_url=source_url, bucket=tmp_path / "bucket", warehouse=warehouse)


def _run(stack: Stack, *args: str) -> str:
    return run([PYTHON, *args], stack.env, timeout=900, expect=0).stdout


def _summary_row(summary: str, table: str) -> dict[str, int]:
    """One table's line of the run summary: read, inserted, updated, deleted, in warehouse."""
    match = re.search(rf"^{re.escape(table)}((?:\s+[\d,]+){{5}})$", summary, re.MULTILINE)
    assert match, f"{table} missing from the summary:\n{summary}"
    numbers = [int(n.replace(",", "")) for n in match.group(1).split()]
    return dict(zip(("read", "inserted", "updated", "deleted", "in_warehouse"), numbers, strict=True))


def _loaded_now(summary: str, table: str) -> int:
    return _summary_row(summary, table)["read"]


def _generator_day(output: str) -> dict[str, dict[str, int]]:
    """The demo generator's own account of a day: inserted, updated, soft- and hard-deleted rows per table."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("organizations", "missions", "volunteers", "applications", "stats_events"):
            numbers = [int(p.replace(",", "")) for p in parts[1:]]
            counts[parts[0]] = dict(zip(("inserted", "updated", "soft", "hard"), numbers, strict=True))
    assert len(counts) == 5, output
    return counts


def _assert_marts_match_source(stack: Stack) -> None:
    live_missions = stack.scalar("SELECT count(*) FROM missions WHERE deleted_at IS NULL")
    assert stack.mart("SELECT count(*) FROM marts.missions_v1") == live_missions
    live_organizations = stack.scalar("SELECT count(*) FROM organizations WHERE deleted_at IS NULL")
    assert stack.mart("SELECT count(*) FROM marts.organizations_v1") == live_organizations
    for event_type in ("impression", "click", "application"):
        in_source = stack.scalar(f"SELECT count(*) FROM stats_events WHERE event_type = '{event_type}'")
        assert stack.mart(f"SELECT sum({event_type}s) FROM marts.partner_funnel_daily_v1") == in_source
    applications = stack.scalar("SELECT count(*) FROM applications")
    assert stack.mart("SELECT sum(applications) FROM marts.organizations_v1") <= applications
    _assert_volunteer_activity_matches_source(stack)


def _assert_volunteer_activity_matches_source(stack: Stack) -> None:
    """Every row of the volunteer aggregate, recomputed from the source with its small-cell rule: groups of fewer
    than 5 volunteers merged into "other", which is itself hidden while under 5. Totals differ from the source by
    exactly the volunteers of a hidden "other" group."""
    expected = expected_volunteer_activity(
        stack.source("SELECT id, department, birth_date FROM volunteers"),
        [row[0] for row in stack.source("SELECT volunteer_id FROM applications")],
    )
    rows = stack.warehouse.query(
        "SELECT department, birth_decade, volunteers, volunteers_who_applied, applications "
        "FROM marts.volunteer_activity_v1"
    )
    actual = {(d, None if b is None else int(b)): (int(v), int(w), int(a)) for d, b, v, w, a in rows}
    assert actual == expected
    assert not [cell for cell in actual if cell[0] == "48"], "Lozère's 3 volunteers are never shown on their own"
    shown = sum(v for v, _, _ in expected.values())
    hidden = stack.scalar("SELECT count(*) FROM volunteers") - shown
    assert hidden == 0 or (OTHER, None) not in expected, "only a too-small 'other' group is ever hidden"
    assert stack.mart("SELECT sum(volunteers) FROM marts.volunteer_activity_v1") == shown


def _assert_no_clear_personal_value_in_the_warehouse(stack: Stack) -> None:
    """Every cell of every raw and published table, against the volunteers' clear values in the source."""
    # Postcodes are left out: as bare numbers they equal ids; their column is never loaded (test_ingest checks it).
    query = "SELECT email, phone, birth_date, first_name || ' ' || last_name FROM volunteers"
    clear = {str(value) for row in stack.source(query) for value in row}
    tables = stack.warehouse.query(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema IN ('raw_app_db', 'raw_bucket', 'marts') AND table_name NOT LIKE '\\_dlt%' ESCAPE '\\'"
    )
    assert len(tables) >= 11
    for schema, table in tables:
        cells = {str(v) for row in stack.warehouse.query(f'SELECT * FROM "{schema}"."{table}"') for v in row}
        assert not cells & clear, f"{schema}.{table} holds clear personal values"
    names = {str(r[0]) for r in stack.source("SELECT last_name FROM volunteers")}
    volunteers = {str(v) for row in stack.warehouse.query("SELECT * FROM raw_app_db.volunteers") for v in row}
    assert not volunteers & names


def test_whole_flow_then_next_day_loads_only_what_changed(stack: Stack) -> None:
    result = run([PYTHON, "-m", "datamart", "run", "--demo"], stack.env, timeout=900, expect=0)
    first = result.stdout
    # quiet by default (datamart/logs.py): what it did and the summary, no library logs on the console
    assert len((result.stdout + result.stderr).splitlines()) <= 40, result.stdout + result.stderr
    assert "INFO" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    assert "Log: " in first
    assert "Published views (what Metabase reads): marts." in first
    secrets_file = Path(stack.env["DLT_PROJECT_DIR"]) / ".dlt" / "secrets.toml"
    if "DATAMART__PII_HMAC_KEY" not in stack.env:  # the fresh-clone path: a key was written, then used
        assert "wrote .dlt/secrets.toml" in first
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        key = re.search(r'pii_hmac_key = "([0-9a-f]{64})"', secrets_file.read_text()).group(1)
        email, volunteer_id = stack.source("SELECT email, id FROM volunteers ORDER BY id LIMIT 1")[0]
        pseudonym = hmac.new(key.encode(), email.encode(), hashlib.sha256).hexdigest()
        assert stack.warehouse.query(f"SELECT email FROM raw_app_db.volunteers WHERE id = {volunteer_id}") == [
            (pseudonym,)
        ]
    else:
        assert not secrets_file.exists()
    assert stack.scalar("SELECT count(*) FROM missions") > 0, "the demo source was generated"
    _assert_no_clear_personal_value_in_the_warehouse(stack)
    for table, source_table in [("raw_app_db.missions", "missions"), ("raw_app_db.stats_events", "stats_events")]:
        assert _loaded_now(first, table) == stack.scalar(f"SELECT count(*) FROM {source_table}")
    _assert_marts_match_source(stack)

    events_before = stack.scalar("SELECT max(id) FROM stats_events")
    volunteers_before = stack.scalar("SELECT max(id) FROM volunteers")
    volunteers_before_count = stack.scalar("SELECT count(*) FROM volunteers")
    changed_missions_day_1 = "SELECT count(*) FROM missions WHERE updated_at >= '2026-01-01'"
    day = _generator_day(_run(stack, "-m", "datamart.demo", "--advance-day", "--bucket", str(stack.bucket)))
    new_events = stack.scalar(f"SELECT count(*) FROM stats_events WHERE id > {events_before}")
    assert new_events > 0

    second = _run(stack, "-m", "datamart", "run", "--demo")
    assert _loaded_now(second, "raw_app_db.stats_events") == new_events
    # Merge tables: exactly the changed rows (boundary rows of the last cursor value are de-duplicated).
    assert _loaded_now(second, "raw_app_db.missions") == stack.scalar(changed_missions_day_1)
    assert _loaded_now(second, "raw_bucket.partner_reports") > 0, "the new day's report file was read"
    # Hard deletes (erasure, withdrawn applications) are found by comparing key sets.
    # Soft deletes (deleted_at) are removed from the warehouse too (missions keep their history: a deleted mission's
    # current version is retired, so the current versions are counted).
    for table, live, current in [
        ("volunteers", "", ""),
        ("applications", "", ""),
        ("missions", " WHERE deleted_at IS NULL", " WHERE _dlt_valid_to IS NULL"),
        ("organizations", " WHERE deleted_at IS NULL", ""),
    ]:
        in_source = stack.scalar(f"SELECT count(*) FROM {table}{live}")
        assert stack.mart(f"SELECT count(*) FROM raw_app_db.{table}{current}") == in_source, table
    erased = stack.scalar(f"SELECT count(*) FROM volunteers WHERE id <= {volunteers_before}")
    assert _summary_row(second, "raw_app_db.volunteers")["deleted"] == volunteers_before_count - erased
    # The summary tells exactly what the generator did in the source that day.
    for table, done in day.items():
        row = _summary_row(second, f"raw_app_db.{table}")
        assert (row["inserted"], row["updated"], row["deleted"]) == (
            done["inserted"],
            done["updated"],
            done["soft"] + done["hard"],
        ), table
    _assert_marts_match_source(stack)

    # the same run with -v shows SQLMesh's and dlt's own logs; the log file holds them either way
    verbose = run([PYTHON, "-m", "datamart", "-v", "run"], stack.env, timeout=900, expect=0)
    third = verbose.stdout
    assert _loaded_now(third, "raw_app_db.stats_events") == 0
    assert "Models built: 0" in third
    assert "INFO sqlmesh" in verbose.stderr, verbose.stderr[-3000:]
    assert "|[INFO]|" in verbose.stderr and "|dlt|" in verbose.stderr, verbose.stderr[-3000:]  # dlt's own format
    quiet = run([PYTHON, "-m", "datamart", "promote"], stack.env, timeout=900, expect=0)
    assert "INFO" not in quiet.stderr, quiet.stderr
    log_file = re.search(r"^Log: (\S+)", quiet.stdout, re.MULTILINE).group(1)
    assert "INFO sqlmesh" in (PROJECT_ROOT / log_file).read_text()
